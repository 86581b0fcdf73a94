"""torch's fused AdamW step and the power EMA's update in one pass over memory (a Triton kernel; fp32 weights).

As two steps, torch's fused AdamW reads weight, gradient and both moments and writes weight and moments back (given
a clipping factor it also writes the unscaled gradient back): 32 bytes per parameter; the EMA then reads the new
weight and its shadow and writes the shadow: 12 more. One kernel over every tensor of a parameter group moves 36
bytes per parameter (72 GB a step for the 2B model, against 88). The formula is torch's AdamW (decoupled weight
decay, bias corrections from each tensor's own step count) followed by torch.lerp's, in fp32 with Triton's fast
square root, division and exp/log (weights within 1.3e-7 of torch's after five steps on an H100). The clipping
factor and the skip flag are the device tensors torch's fused AdamW reads (`grad_scale`, `found_inf` on the
optimizer): a skipped step leaves weights, moments, step counts and the EMA as they were, and nothing waits for the
GPU.

Applies to torch's AdamW created fused, with plain fp32 weights, gradients and moments on a GPU (FSDP's local shards
included), after its first step (torch's step creates the state); the caller falls back to optimizer.step() and
PowerEMA.update otherwise, and for good if the kernel fails to build. Under TRITON_INTERPRET=1 it runs on CPU
tensors instead (the tests), never on GPU ones.
"""

import functools
import logging
import os

import torch

from .distributed import inner_optimizer, local_parts, plain_fused_adamw

logger = logging.getLogger(__name__)
# the fastest of 1024-8192 elements x 4 or 8 warps on an H100: 7.1 ms per 510M parameters (2.6 TB/s), against 8.8 ms
# for torch's fused AdamW (given a clipping factor) followed by the EMA's foreach lerp
BLOCK, NUM_WARPS = 1024, 4
COLUMNS = 6  # per tensor: weight, gradient, exp_avg, exp_avg_sq, EMA shadow, step count (addresses)
_state = {"working": False, "failed": False}  # whether the kernel has run, or failed to build, in this process


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def adamw_ema(addresses, block_tensor, block_start, numels, grad_scale, found_inf, lr, beta1, beta2, eps,
                  weight_decay, ema_weight, BLOCK: tl.constexpr, COLUMNS: tl.constexpr):
        if tl.load(found_inf) != 0:
            return
        block = tl.program_id(0)
        tensor = tl.load(block_tensor + block)
        row = addresses + tensor * COLUMNS
        f32 = tl.pointer_type(tl.float32)
        weight, grad = tl.load(row).to(f32), tl.load(row + 1).to(f32)
        exp_avg, exp_avg_sq = tl.load(row + 2).to(f32), tl.load(row + 3).to(f32)
        shadow, step = tl.load(row + 4).to(f32), tl.load(tl.load(row + 5).to(f32))
        offsets = tl.load(block_start + block) + tl.arange(0, BLOCK)
        inside = offsets < tl.load(numels + tensor)
        bias_correction1 = 1 - tl.exp(step * tl.log(beta1))
        bias_correction2_sqrt = tl.sqrt(1 - tl.exp(step * tl.log(beta2)))

        g = tl.load(grad + offsets, mask=inside) / tl.load(grad_scale)
        p = tl.load(weight + offsets, mask=inside)
        m = tl.load(exp_avg + offsets, mask=inside)
        v = tl.load(exp_avg_sq + offsets, mask=inside)
        p = p - lr * weight_decay * p
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p - (lr / bias_correction1) * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
        tl.store(weight + offsets, p, mask=inside)
        tl.store(exp_avg + offsets, m, mask=inside)
        tl.store(exp_avg_sq + offsets, v, mask=inside)
        e = tl.load(shadow + offsets, mask=inside)
        if ema_weight < 0.5:  # torch.lerp's two forms, for the same rounding
            e = e + ema_weight * (p - e)
        else:
            e = p - (p - e) * (1 - ema_weight)
        tl.store(shadow + offsets, e, mask=inside)

    return adamw_ema


def _usable(tensors) -> bool:
    """All fp32 and contiguous on a GPU; on the CPU instead under Triton's interpreter, which copies the kernel's
    tensor arguments to the host (device addresses in the table would be read as host memory)."""
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    return {(t.device.type, t.dtype, t.is_contiguous()) for t in tensors} == {(device, torch.float32, True)}


@functools.lru_cache(maxsize=4)
def _blocks(numels: tuple, device: torch.device) -> tuple:
    """Which tensor and which first element each kernel block takes; cached, as the shapes do not change (for the
    2B model 2M blocks, 24 MB on the GPU)."""
    counts = torch.tensor([-(-n // BLOCK) for n in numels])
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), counts)
    first = torch.cat([torch.arange(c, dtype=torch.int64) * BLOCK for c in counts.tolist()])
    return tensor.to(device), first.to(device), torch.tensor(numels, dtype=torch.int64, device=device)


@torch.no_grad()
def step_adamw_with_ema(optimizer, ema, iteration: int) -> bool:
    """One AdamW step with the EMA's update for `iteration` in the same kernel, clipping factor and skip flag taken
    from the optimizer as torch's fused step takes them. Returns False, having done nothing, where this does not
    apply (see the module's docstring)."""
    inner = inner_optimizer(optimizer)
    if type(inner) is not torch.optim.AdamW or ema is None or _state["failed"]:
        return False
    shadow_of = {id(p): s for p, s in zip(ema.params, ema.shadow)}
    launches, stepped = [], set()  # stepped: ids of the local weights the kernel takes
    for group in inner.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            continue
        if not plain_fused_adamw(group):
            return False
        if not all(inner.state.get(p) and id(p) in shadow_of for p in params):
            return False  # before the first step (torch's creates the state), or a weight without an EMA
        states = [inner.state[p] for p in params]
        columns = [local_parts(params), local_parts([p.grad for p in params]),
                   local_parts([s["exp_avg"] for s in states]), local_parts([s["exp_avg_sq"] for s in states]),
                   local_parts([shadow_of[id(p)] for p in params])]
        steps = [s["step"] for s in states]
        if not _usable([t for column in columns for t in column] + steps) or any(s.dim() for s in steps):
            return False
        launches.append((group, columns, steps))
        stepped.update(id(t) for t in columns[0])
    if not launches:
        return False
    device = launches[0][2][0].device
    grad_scale, found_inf = getattr(inner, "grad_scale", None), getattr(inner, "found_inf", None)
    grad_scale = torch.ones((), device=device) if grad_scale is None else grad_scale.to(device, torch.float32)
    found_inf = torch.zeros((), device=device) if found_inf is None else found_inf.to(device, torch.float32)
    ema_weight = 1 - ema.beta(iteration)
    for group, columns, steps in launches:
        table = torch.tensor([[t.data_ptr() for t in row] for row in zip(*columns, steps)], dtype=torch.int64,
                             pin_memory=device.type == "cuda")
        block_tensor, block_start, numels = _blocks(tuple(t.numel() for t in columns[0]), device)
        torch._foreach_add_(steps, 1)  # as torch's fused AdamW: counted, then taken back if the step is skipped
        beta1, beta2 = group["betas"]
        try:
            _kernel()[(len(block_tensor),)](
                table.to(device, non_blocking=True), block_tensor, block_start, numels, grad_scale, found_inf,
                group["lr"], beta1, beta2, group["eps"], group["weight_decay"], ema_weight,
                BLOCK=BLOCK, COLUMNS=COLUMNS, num_warps=NUM_WARPS)
        except Exception as error:  # building it (no Triton, no compiler for this GPU): torch's step from here on
            if _state["working"] or group is not launches[0][0]:
                raise
            torch._foreach_sub_(steps, 1)
            _state["failed"] = True
            logger.warning("the one-kernel AdamW + EMA step is unavailable (%s: %s); using torch's fused AdamW and "
                           "a separate EMA update", type(error).__name__, error)
            return False
        torch._foreach_sub_(steps, [found_inf] * len(steps))
    if not _state["working"]:
        logger.info("AdamW and the EMA's update run as one kernel (cosmos_t2i/adamw_ema.py)")
        _state["working"] = True
    for shadow, param in zip(local_parts(ema.shadow), local_parts(ema.params)):
        if id(param) not in stepped:  # the EMA of weights without a gradient moves too (not when skipped)
            shadow.lerp_(param.float(), ema_weight * (1 - found_inf))
    return True
