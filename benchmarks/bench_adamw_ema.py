"""The one-kernel AdamW + EMA step (cosmos_t2i/adamw_ema.py) against torch's fused AdamW followed by the EMA's
foreach lerp, on a GPU. Prints one JSON line.

    python benchmarks/bench_adamw_ema.py [--params_m 500] [--blocks 1024 2048 4096 8192]

Numerics: five steps of `apply_gradients` (the training script's update) on 60M parameters of the 2B model's shapes,
once through the kernel and once through torch, largest relative difference of weights, EMA and second moments.
Speed: one step on --params_m million parameters, clipping factor given, by each kernel block size and warp count,
against torch's two-step path measured in the same run (ms per step and the bytes moved per second: the kernel moves
36 bytes per parameter).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import report  # noqa: E402

import cosmos_t2i.adamw_ema as adamw_ema  # noqa: E402
import cosmos_t2i.update as update  # noqa: E402
from cosmos_t2i.ema import PowerEMA  # noqa: E402
from cosmos_t2i.schedule import make_optimizer, make_scheduler  # noqa: E402

SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (2048,), (6144, 2048), (2048, 1024)]  # 2B's tensors


def build(total: float):
    generator = torch.Generator(device="cuda").manual_seed(0)
    shapes, n = [], 0
    while n < total:
        shapes.append(SHAPES[len(shapes) % len(SHAPES)])
        n += torch.Size(shapes[-1]).numel()
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", generator=generator) * 0.02) for s in shapes]
    optimizer = make_optimizer(params, lr=1e-4, weight_decay=0.1)
    ema = PowerEMA([(str(i), p) for i, p in enumerate(params)])
    return params, optimizer, make_scheduler(optimizer, "constant"), ema


def new_gradients(params, seed: int):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, device="cuda", generator=generator) * 0.01


def ms_per_call(fn, params, repeats: int = 10) -> float:
    total = 0.0
    for i in range(repeats + 1):
        new_gradients(params, i)
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        total += (time.perf_counter() - start) if i else 0.0  # the first call warms up (Triton compiles)
    return total / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params_m", type=float, default=500)
    parser.add_argument("--blocks", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    args = parser.parse_args()
    out = {"bench": "adamw_ema", "kernel_block": adamw_ema.BLOCK, "kernel_warps": adamw_ema.NUM_WARPS}

    kernel_run, torch_run = build(60e6), build(60e6)
    for step in range(1, 6):
        for (params, optimizer, scheduler, ema), use_kernel in ((kernel_run, True), (torch_run, False)):
            new_gradients(params, step)
            update.step_adamw_with_ema = adamw_ema.step_adamw_with_ema if use_kernel else (lambda *a: False)
            update.apply_gradients(params, optimizer, scheduler, ema, 1.0, step)
    update.step_adamw_with_ema = adamw_ema.step_adamw_with_ema

    def worst(a, b):  # as text: report() rounds numbers to 4 decimals
        return f"{max(((x - y).abs().max() / y.abs().max()).item() for x, y in zip(a, b)):.2e}"
    out["max_rel_diff_weights"] = worst(kernel_run[0], torch_run[0])
    out["max_rel_diff_ema"] = worst(kernel_run[3].shadow, torch_run[3].shadow)
    out["max_rel_diff_exp_avg_sq"] = worst(*([run[1].state[p]["exp_avg_sq"] for p in run[0]]
                                             for run in (kernel_run, torch_run)))
    del kernel_run, torch_run
    torch.cuda.empty_cache()

    params, optimizer, scheduler, ema = build(args.params_m * 1e6)
    new_gradients(params, 0)
    update.apply_gradients(params, optimizer, scheduler, ema, 1.0, 1)  # torch's first step creates the state
    out["params_m"] = sum(p.numel() for p in params) / 1e6

    def torch_step():
        optimizer.grad_scale, optimizer.found_inf = torch.full((), 1.5, device="cuda"), torch.zeros((), device="cuda")
        optimizer.step()
        del optimizer.grad_scale, optimizer.found_inf
        ema.update(5)

    def kernel_step():
        optimizer.grad_scale = torch.full((), 1.5, device="cuda")
        assert adamw_ema.step_adamw_with_ema(optimizer, ema, 5)
        del optimizer.grad_scale

    out["torch_fused_adamw_then_ema_ms"] = ms_per_call(torch_step, params)
    default = adamw_ema.BLOCK, adamw_ema.NUM_WARPS
    for block in args.blocks:
        for warps in (4, 8):
            adamw_ema.BLOCK, adamw_ema.NUM_WARPS = block, warps
            adamw_ema._blocks.cache_clear()
            ms = ms_per_call(kernel_step, params)
            out[f"kernel_block{block}_warps{warps}_ms"] = ms
            out[f"kernel_block{block}_warps{warps}_tb_per_s"] = out["params_m"] * 1e6 * 36 / ms / 1e9
    adamw_ema.BLOCK, adamw_ema.NUM_WARPS = default
    out["speedup_default_vs_torch"] = out["torch_fused_adamw_then_ema_ms"] / out[
        f"kernel_block{default[0]}_warps{default[1]}_ms"]
    report(out)


if __name__ == "__main__":
    main()
