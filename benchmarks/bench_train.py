"""Training-step benchmark at the real shapes (random weights), 768x1360, one GPU. Prints one JSON line.

    python benchmarks/bench_train.py --model_size 2B --mode compile_ckpt --batch_size 4

Baseline, measured in the same run: the same step eager (no compile; diffusers defaults), fp32 weights under
bf16 autocast, fused AdamW, fp32 EMA, batch 1. Ours: the training script's own functions (its model preparation
`prepare_for_training`, precision decision, optimizer factory, `flow_loss` and `apply_gradients`: GradClip, AdamW,
schedule, PowerEMA) in the chosen mode, timed over --steps steps run back to back (results.jsonl's lines 1-61, up
to 2026-11-27: the median of steps synced one by one). MFU = model FLOPs of one eager step without checkpointing
(torch's FLOP counter on 1- and 2-block models, extrapolated to the depth, times the batch) / (seconds x bf16 matmul
peak measured here).
"""

import argparse
import functools
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cuda_time, matmul_peak_tflops, peak_gb, report, reset_peak  # noqa: E402
from trace_gaps import gaps  # noqa: E402

from cosmos_t2i.ema import PowerEMA  # noqa: E402
from cosmos_t2i.flow import flow_loss  # noqa: E402
from cosmos_t2i.models import new_transformer, training_flops_per_sample  # noqa: E402
from cosmos_t2i.monitor import finish_profile, start_profile  # noqa: E402
from cosmos_t2i.schedule import make_optimizer, make_scheduler  # noqa: E402
from cosmos_t2i.training import NVIDIA_LORA_TARGETS, base_dtype, prepare_for_training  # noqa: E402
from cosmos_t2i.update import apply_gradients  # noqa: E402

MODES = {
    "eager": dict(),
    "compile": dict(compile=True),
    "compile_ckpt": dict(compile=True, checkpointing=True),
    "lora": dict(compile=True, lora=True),
    "lora_ckpt": dict(compile=True, lora=True, checkpointing=True),
    # --lora_base_dtype fp8: the frozen base's block weights stored as fp8 (e5m2)
    "lora_fp8_ckpt": dict(compile=True, lora=True, checkpointing=True, base_fp8=True),
    # --fp8: torchao float8 matmuls in the blocks' projections
    "compile_fp8": dict(compile=True, fp8=True),
    "compile_ckpt_fp8": dict(compile=True, checkpointing=True, fp8=True),
    # the 24 GB recipe: --weight_dtype bf16 (StochasticAdamW) --gradient_checkpointing --no-ema --compile
    "bf16_lowmem": dict(compile=True, checkpointing=True, bf16_weights=True),
}


def build(model_size, compile=False, checkpointing=False, lora=False, bf16_weights=False, base_fp8=False, fp8=False):
    """(model, optimizer, scheduler, EMA or None, trainable params) as train_text2image.py builds them."""
    dtype = base_dtype("lora" if lora else "full", "bf16", "bf16" if bf16_weights else "fp32")
    model = prepare_for_training(  # an fp8 base is built on the CPU and converted layer by layer, as the script does
        new_transformer(model_size, dtype, "cpu" if base_fp8 else "cuda"),
        {"rank": 16, "alpha": 16, "targets": NVIDIA_LORA_TARGETS.split(","), "base_dtype": "fp8" if base_fp8 else "bf16"}
        if lora else None,
        gradient_checkpointing=checkpointing, compile=compile, device="cuda", fp8=fp8).to("cuda")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    optimizer = make_optimizer(params, lr=1e-5, bf16_weights=bf16_weights)
    ema = None if bf16_weights else PowerEMA(trainable)  # the 24 GB recipe runs --no-ema
    return model, optimizer, make_scheduler(optimizer, "constant"), ema, params


def make_batch(batch, height=768, width=1360):
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, 16, 1, height // 8, width // 8)
    return dict(latents=torch.randn(shape, device="cuda", generator=g),
                text=torch.randn(batch, 512, 1024, device="cuda", generator=g),
                sigma=torch.randn(batch, device="cuda", generator=g).exp(),
                noise=torch.randn(shape, device="cuda", generator=g), keep=torch.ones(batch, device="cuda"),
                padding_mask=torch.zeros(1, 1, height, width, device="cuda"))  # equal masks: one, as the script


def train_step(model, optimizer, scheduler, ema, params, batch, iteration, grad_accum=1):
    for _ in range(grad_accum):  # as the script's --grad_accum: backward through each micro-batch, then one update
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = flow_loss(model, batch["latents"], batch["text"], batch["sigma"], batch["noise"], batch["keep"],
                             batch["padding_mask"])
        (loss / grad_accum).backward()
    apply_gradients(params, optimizer, scheduler, ema, 1.0, iteration)


def step_flops(model_size):
    """FLOPs of forward+backward of one sample at 768x1360 without checkpointing (the training log's own count)."""
    return training_flops_per_sample(model_size, 768, 1360)


def measure(model_size, mode, batch, steps, vae=None, profile_dir=None, grad_accum=1):
    """Time the step; with a VAE, also the step that encodes its images on the fly (no latent cache); with a
    profile folder, profile two more steps there (trace, op table) and add GPU milliseconds by kernel kind."""
    reset_peak()
    parts = build(model_size, **MODES[mode])
    data = make_batch(batch)
    counter = iter(range(1, 10 ** 6))
    step = functools.partial(train_step, *parts, data, grad_accum=grad_accum)
    start = time.perf_counter()
    step(next(counter))
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(2):  # warm-up
        step(next(counter))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):  # back to back, as the training loop runs them: no sync between steps
        step(next(counter))
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    result = dict(sec_per_iter=seconds, samples_per_s=batch * grad_accum / seconds, peak_gb=peak_gb(),
                  peak_reserved_gb=torch.cuda.max_memory_reserved() / 2 ** 30, first_step_s=first)
    if vae is not None:
        from cosmos_t2i.models import encode_images
        images = torch.rand(batch, 3, 768, 1360, device="cuda") * 2 - 1

        def step_with_encode():
            data["latents"] = encode_images(vae, images)
            step(next(counter))
        result["sec_per_iter_encoding_on_the_fly"] = cuda_time(step_with_encode, 1, steps)
        result["latent_cache_speedup"] = result["sec_per_iter_encoding_on_the_fly"] / seconds
    if profile_dir is not None:
        profile = start_profile()
        for _ in range(2):
            step(next(counter))
        folder = Path(profile_dir) / f"{model_size}_{mode}_b{batch}"
        summary = finish_profile(profile, 2, folder, 0)
        result["profile_ms_per_iter"] = {k: round(v, 1) for k, v in summary["kernels_ms"].items()}
        idle = gaps(folder / "trace_rank0.json")  # where the GPU waited for the host, by what launched after
        result["profile_idle_ms_per_iter"] = round(idle["idle_ms"] / 2, 1)
        result["profile_idle_ms_by_launch_site"] = {k: round(v / 2, 2) for k, v in
                                                    list(idle["idle_ms_by_launch_site"].items())[:6]}
    parts = data = None  # free the model before the next measurement
    gc.collect()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="2B")
    parser.add_argument("--mode", choices=list(MODES), default="compile_ckpt")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--skip_baseline", action="store_true")
    parser.add_argument("--against", choices=list(MODES),
                        help="also measure this mode at the same batch size and report the ratio (e.g. --mode "
                             "compile_fp8 --against compile)")
    parser.add_argument("--against_batch_size", type=int,
                        help="batch size of the --against mode (default: --batch_size), e.g. each mode at the "
                             "largest batch that fits the card")
    parser.add_argument("--vae", action="store_true",
                        help="also time the step with the Wan2.1 VAE encoding its images (what --cache_latents saves)")
    parser.add_argument("--grad_accum", type=int, default=1,
                        help="micro-batches of --batch_size per optimizer step, as the script's --grad_accum: the "
                             "optimizer, EMA and clipping run once per --grad_accum x --batch_size samples")
    parser.add_argument("--profile", metavar="DIR",
                        help="profile two steps of each mode after timing them: trace and op table under DIR, GPU "
                             "milliseconds per step by kernel kind (matmul, attention, triton, ...) and the GPU's "
                             "idle time by the host operation that ended it (trace_gaps.py) in the JSON")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    peak = matmul_peak_tflops()
    flops_per_sample = step_flops(args.model_size)
    out = dict(bench="train", model_size=args.model_size, mode=args.mode, batch_size=args.batch_size,
               **({"grad_accum": args.grad_accum} if args.grad_accum > 1 else {}),
               resolution="768x1360", matmul_peak_tflops=peak, tflops_per_sample=flops_per_sample / 1e12)
    if not args.skip_baseline:
        base = measure(args.model_size, "eager", 1, args.steps)
        out.update({f"baseline_{k}": v for k, v in base.items()})
        out["baseline_mfu"] = flops_per_sample / base["sec_per_iter"] / (peak * 1e12)
    vae = None
    if args.vae:
        from diffusers import AutoencoderKLWan
        vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)  # Wan2.1 shape
    ours = measure(args.model_size, args.mode, args.batch_size, args.steps, vae, args.profile, args.grad_accum)
    out.update(ours)
    out["mfu"] = flops_per_sample * ours["samples_per_s"] / (peak * 1e12)
    if "lora" in args.mode:
        out["note"] = "MFU counts full-model FLOPs; LoRA skips weight gradients of the frozen base"
    if args.against:
        other_batch = args.against_batch_size or args.batch_size
        other = measure(args.model_size, args.against, other_batch, args.steps, profile_dir=args.profile)
        out[f"{args.against}_batch_size"] = other_batch
        out.update({f"{args.against}_{k}": v for k, v in other.items()})
        out[f"speedup_vs_{args.against}"] = ours["samples_per_s"] / other["samples_per_s"]
    if not args.skip_baseline:
        out["speedup_samples_per_s"] = ours["samples_per_s"] / out["baseline_samples_per_s"]
    report(out)


if __name__ == "__main__":
    main()
