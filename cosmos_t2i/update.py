"""One optimizer update after backward, in NVIDIA's order: non-finite gradient entries to 0 and the global norm
clipped (GradClip(force_finite=True)), AdamW, schedule, EMA.

The host has to read a few numbers each step (the loss, the run's stop and save flags, whether the gradient norm is
finite), and every read makes it wait for the GPU. Done naively (read, then launch the optimizer) the GPU's queue is
empty when the host gets the numbers and stays idle while the host launches the next work. Here the read is queued
first and, with torch's fused AdamW, the step is launched before the host waits: the clipping factor and a "skip"
flag are device tensors its kernel reads (a non-finite norm, or a step the caller drops, turns it into a no-op on the
GPU: weights, moments and step counts untouched). The host's wait then ends while the GPU runs the step, and the EMA
and the next forward are queued behind it. A non-finite norm (rare) takes NVIDIA's path afterwards: zero the
non-finite entries, norm again, step. Other optimizers step after the read, as before.

    pending = start_update(params, optimizer, max_norm, read=[loss_and_flags], skip=drop_this_step)
    loss_and_flags_on_host = pending.read()           # the one wait per step
    grad_norm = finish_update(pending, params, optimizer, scheduler, ema, max_norm, iteration)
"""

import math
from dataclasses import dataclass, field

import torch
from torch.profiler import record_function

from .adamw_ema import step_adamw_with_ema
from .distributed import (clip_grad_norm_, end_grad_scale, global_norm, inner_optimizer, reduces_own_norm,
                          scale_to_norm_, step_adamw_on_local_shards, takes_grad_scale)


@dataclass
class PendingUpdate:  # holds no gradient: the caller's loop keeps it through the next backward
    norm: torch.Tensor | None  # global norm of the gradients as backward left them; None: torch's clipping applies
    stepped: bool = False  # the fused step is queued (a no-op on the GPU if the norm is not finite or it was skipped)
    ema_done: bool = False  # the EMA was updated inside that step
    asked: int = 0  # how many of the values are the caller's; then the skip flag (if given), then the norm (if taken)
    has_skip: bool = False
    queued: torch.Tensor | None = None  # the values, on their way to the host
    ready: torch.cuda.Event | None = None
    values: list = field(default_factory=list)

    def _all(self) -> list:
        if self.queued is not None:
            if self.ready is not None:
                self.ready.synchronize()
            self.values, self.queued = self.queued.tolist(), None
        return self.values

    def read(self) -> list:
        """The values given as `read` to start_update, as floats: waits for the GPU up to the end of the norm, not
        for the step queued after it."""
        return self._all()[:self.asked]

    def skipped(self) -> bool:
        return self.has_skip and self._all()[self.asked] != 0

    def norm_is_finite(self) -> bool:
        return self.norm is None or math.isfinite(self._all()[-1])


def step_optimizer(optimizer, ema=None, iteration: int = 0) -> bool:
    """optimizer.step() (on FSDP's local shards where that applies), or AdamW and the EMA's update in one kernel;
    then the clipping factor and skip flag go. Returns whether the EMA was updated."""
    try:
        if step_adamw_with_ema(optimizer, ema, iteration):
            return True
        if not step_adamw_on_local_shards(optimizer):  # FSDP: the same step without DTensor's dispatch
            optimizer.step()
        return False
    finally:
        end_grad_scale(optimizer)


@torch.no_grad()
def start_update(params, optimizer, max_norm: float, read=(), skip: torch.Tensor | None = None, ema=None,
                 iteration: int = 0) -> PendingUpdate:
    """Queue the global gradient norm and a copy to the host of `read` (device tensors) and the norm; with torch's
    fused AdamW also the clipped step (and the `ema`'s update for `iteration` where one kernel does both), a no-op
    on the GPU where the norm is not finite or `skip` (a device bool, the same on every process) is true. Nothing
    here waits for the GPU."""
    grads = [p.grad for p in params if p.grad is not None]
    with record_function("clip_grad_norm"):
        norm = global_norm(grads) if reduces_own_norm(grads) else None
    values = [v.detach().float().reshape(-1) for v in read]
    pending = PendingUpdate(norm, asked=sum(v.numel() for v in values), has_skip=skip is not None)
    values += ([skip.float().reshape(1)] if skip is not None else []) + ([norm.reshape(1)] if norm is not None else [])
    if values:
        pending.queued = torch.cat(values)
        if pending.queued.is_cuda:
            pending.queued = pending.queued.to("cpu", non_blocking=True)  # into page-locked memory: no wait here
            pending.ready = torch.cuda.Event()
            pending.ready.record()
    if norm is not None and takes_grad_scale(optimizer):
        dropped = ~torch.isfinite(norm) if skip is None else ~torch.isfinite(norm) | skip
        scale_to_norm_(grads, norm, max_norm, optimizer)
        inner_optimizer(optimizer).found_inf = dropped.float()  # fused AdamW's kernel returns at once when 1
        with record_function("optimizer_step"):
            pending.ema_done = step_optimizer(optimizer, ema, iteration)
        pending.stepped = True
    return pending


@torch.no_grad()
def finish_update(pending: PendingUpdate, params, optimizer, scheduler, ema, max_norm: float,
                  iteration: int) -> torch.Tensor:
    """The rest of a step the caller keeps (after pending.read()): the step itself where it was not queued or was
    dropped for a non-finite norm (NVIDIA's zeroing first), then schedule, gradients released, EMA. Returns the
    gradient norm before clipping (after zeroing). Not for a step start_update was told to skip: the caller drops it
    (zero_grad) instead."""
    if pending.skipped():
        raise RuntimeError("finish_update on a step that start_update was told to skip")
    norm, ema_done = pending.norm, pending.ema_done
    with record_function("optimizer_step"):
        # torch's clipping for a mix of gradient kinds this code does not reduce itself; for a non-finite norm (the
        # same on every process: it is global) NVIDIA's zeroing first, at the cost of a second norm and a host sync
        if norm is None or not pending.norm_is_finite():
            norm = clip_grad_norm_(params, max_norm, optimizer)
            ema_done = step_optimizer(optimizer, ema, iteration)
        elif not pending.stepped:
            scale_to_norm_([p.grad for p in params if p.grad is not None], norm, max_norm, optimizer)
            ema_done = step_optimizer(optimizer, ema, iteration)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    if ema is not None and not ema_done:
        with record_function("ema_update"):
            ema.update(iteration)
    return norm


def apply_gradients(params, optimizer, scheduler, ema, max_norm: float, iteration: int) -> torch.Tensor:
    """A whole update for a step that is kept: start, read the norm, finish. Returns the gradient norm before
    clipping."""
    pending = start_update(params, optimizer, max_norm, ema=ema, iteration=iteration)
    pending.read()
    return finish_update(pending, params, optimizer, scheduler, ema, max_norm, iteration)
