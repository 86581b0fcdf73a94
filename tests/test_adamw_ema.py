"""The one-kernel AdamW + EMA step (cosmos_t2i/adamw_ema.py) against torch's AdamW and PowerEMA's own update, run on
the CPU through Triton's interpreter (in a subprocess: the interpreter is chosen when the kernel is defined)."""

import os
import subprocess
import sys

import torch
from conftest import ROOT, losses_of, run_script, tiny_args

from cosmos_t2i import checkpoint as ckpt

CHECK = r'''
import torch
import cosmos_t2i.adamw_ema as adamw_ema
from cosmos_t2i.ema import PowerEMA
from cosmos_t2i.schedule import make_optimizer, make_scheduler
from cosmos_t2i.update import apply_gradients, start_update

used = []
real = adamw_ema.step_adamw_with_ema
adamw_ema_step = lambda *a: used.append(real(*a)) or used[-1]
import cosmos_t2i.update as update
update.step_adamw_with_ema = adamw_ema_step

# more than one kernel block in a tensor, a tensor ending mid-block, a weight without a gradient, two groups
shapes = [(3, 4096 + 7), (5,), (70, 3), (4,)]
def weights():
    return [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)]
ours, reference = weights(), weights()
def groups(ws):
    return [{"params": ws[:2], "lr": 1e-2}, {"params": ws[2:], "lr": 3e-3}]
optimizer = make_optimizer(groups(ours), lr=1e-2, weight_decay=0.2, device_type="cpu")
reference_optimizer = torch.optim.AdamW(groups(reference), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.2, foreach=True)
ema = PowerEMA([(str(i), p) for i, p in enumerate(ours)])
reference_ema = PowerEMA([(str(i), p) for i, p in enumerate(reference)])
scheduler = make_scheduler(optimizer, "constant")

# the EMA's weight 1 - beta(iteration) falls below 0.5 from iteration 11: iterations 1, 7, 14, ... take both forms
for step, (size, skip, poison) in enumerate([(3.0, False, False), (5.0, False, False), (5.0, True, False),
                                             (4.0, False, True), (0.01, False, False)], start=1):
    iteration = 1 if step == 1 else 7 * step
    grads = [torch.randn(s, generator=torch.Generator().manual_seed(10 * step + i)) * size for i, s in enumerate(shapes)]
    if poison:
        grads[2][1, 1] = float("inf")
    for i, (p, q, g) in enumerate(zip(ours, reference, grads)):
        if i == 3 and step > 1:  # no gradient after the first step: neither optimizer steps it
            p.grad = q.grad = None
            continue
        p.grad, q.grad = g.clone(), torch.nan_to_num(g, posinf=0.0)
    if skip:  # dropped on the device: weights, moments, step counts and EMA untouched
        before = [t.clone() for t in [*ours, *ema.shadow] + [v for s in optimizer.state.values() for v in s.values()]]
        pending = start_update(ours, optimizer, 1.0, skip=torch.tensor(True), ema=ema, iteration=iteration)
        pending.read()
        after = [*ours, *ema.shadow] + [v for s in optimizer.state.values() for v in s.values()]
        assert used[-1] is True and all(torch.equal(a, b) for a, b in zip(before, after))
        optimizer.zero_grad(set_to_none=True)
        continue
    norm = apply_gradients(ours, optimizer, scheduler, ema, 1.0, iteration)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(reference, 1.0))
    reference_optimizer.step()
    reference_optimizer.zero_grad()
    reference_ema.update(iteration)
    for p, q in zip(ours, reference):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(optimizer.state[p][key], reference_optimizer.state[q][key], rtol=1e-6, atol=1e-9)
    for a, b in zip(ema.shadow, reference_ema.shadow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
# step 1 creates the state through torch; every later step ran the kernel (the non-finite one twice: dropped, redone)
assert used == [False, True, True, True, True, True], used
print("same")
'''


def test_adamw_and_ema_in_one_kernel_equal_torch_adamw_then_the_ema():
    """Steps 2-5 through the kernel (clipped, skipped, a non-finite norm redone, unclipped; two parameter groups, a
    tensor over several blocks, a weight left without gradient) equal torch's foreach AdamW after torch's clipping
    and PowerEMA.update: weights, moments, step counts, EMA."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "same" in result.stdout, result.stderr[-3000:]


def test_training_script_takes_the_kernel_and_trains_the_same(tiny_bundle, tmp_path):
    """The training script on the tiny example, with the kernel (interpreted) and without it: it says which path it
    took, and losses, weights, moments and EMA after 4 iterations agree (the kernel runs from iteration 2)."""
    runs = {}
    interpreted = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}  # the interpreter: CPU only
    for name, env in (("torch", {**os.environ, "CUDA_VISIBLE_DEVICES": ""}), ("kernel", interpreted)):
        runs[name] = run_script(*tiny_args(tiny_bundle, tmp_path / name, "--max_iter", "4", "--save_iter", "4"),
                                env=env)
    assert "one kernel" in runs["kernel"].stderr and "one kernel" not in runs["torch"].stderr
    a, b = (losses_of(r.stderr) for r in runs.values())
    assert a.keys() == b.keys() == {1, 2, 3, 4} and all(abs(a[i] - b[i]) <= 1e-6 * abs(a[i]) for i in a)
    dirs = [ckpt.checkpoint_dir(tmp_path / name, "posttraining", "text2image", "t") for name in runs]
    for prefix in ("model", "optim", "ema"):
        sa, sb = (ckpt.read_shards(ckpt.shards_dir(d, 4), prefix) for d in dirs)
        assert sa.keys() == sb.keys(), prefix
        for k in sa:
            if torch.is_tensor(sa[k]) and sa[k].is_floating_point():
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-7, msg=f"{prefix} {k}")


def test_a_kernel_that_cannot_be_built_leaves_torch_to_step(monkeypatch, caplog):
    """Where Triton cannot build the kernel, the step falls back to torch's fused AdamW and the EMA's own update (the
    same numbers as never trying), with one warning, and the kernel is not tried again."""
    import cosmos_t2i.adamw_ema as adamw_ema
    from cosmos_t2i.ema import PowerEMA
    from cosmos_t2i.schedule import make_optimizer, make_scheduler
    from cosmos_t2i.update import apply_gradients

    def no_compiler():
        raise RuntimeError("no compiler for this GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors qualify
    monkeypatch.setattr(adamw_ema, "_kernel", no_compiler)
    monkeypatch.setattr(adamw_ema, "_state", {"working": False, "failed": False})
    runs = []
    for attempt in (True, False):
        weights = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                   for i, s in enumerate([(6, 4), (5,)])]
        optimizer = make_optimizer(weights, lr=1e-2, device_type="cpu")
        ema, scheduler = PowerEMA([(str(i), p) for i, p in enumerate(weights)]), make_scheduler(optimizer, "constant")
        if not attempt:  # the reference: never tried
            monkeypatch.setattr("cosmos_t2i.update.step_adamw_with_ema", lambda *a: False)
        for step in range(1, 4):
            for i, p in enumerate(weights):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
            apply_gradients(weights, optimizer, scheduler, ema, 1.0, step)
        runs.append([*weights, *ema.shadow, *(v for s in optimizer.state.values() for v in s.values())])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert caplog.text.count("one-kernel AdamW + EMA step is unavailable") == 1 and adamw_ema._state["failed"]
