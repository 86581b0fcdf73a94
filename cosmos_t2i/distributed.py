"""Model and training state whatever the sharding: one process, DDP, or FSDP2 (fully_shard through Accelerate).

Training state is exchanged as each process's own shards (torch.distributed.checkpoint re-shards on load, so a run
saved on N processes resumes on any other number); nothing here gathers a full copy onto one process.
"""

from datetime import timedelta

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)


# How long processes wait for each other where one works alone for minutes: the main process writing a 14B model
# file on a slow shared file system, a process encoding its share of a large latent cache (GPU collectives give up
# after 10 minutes)
LONG_WAIT = timedelta(hours=2)
_cpu_group = []


def cpu_group():
    """One gloo process group with LONG_WAIT as its timeout, made on first use (every process must get there
    together), or None without torch.distributed: for those waits and for checkpoints' own collectives, which DCP
    runs over the CPU, from a background thread during async saves (on the default group they would interleave with
    the training step's and both sides deadlock: seen with plain data parallel on CPU processes)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if not _cpu_group:
        _cpu_group.append(torch.distributed.new_group(backend="gloo", timeout=LONG_WAIT))
    return _cpu_group[0]


def wait_for_everyone() -> None:
    """A barrier over cpu_group (nothing with one process)."""
    group = cpu_group()
    if group is not None:
        torch.distributed.barrier(group=group)


def from_main_process(compute):
    """compute() on the main process (global rank 0) alone; every process gets its result, sent over cpu_group
    (the others may wait minutes for it). If it fails there, the main process raises its error and the others exit
    quietly (SystemExit 1) instead of waiting for a result that never comes."""
    group = cpu_group()
    if group is None:
        return compute()
    error, value = None, [None]
    if torch.distributed.get_rank() == 0:
        try:
            value = [("ok", compute())]
        except (SystemExit, Exception) as e:
            error, value = e, [("error", None)]
    torch.distributed.broadcast_object_list(value, src=0, group=group)
    if error is not None:
        raise error
    if value[0][0] == "error":
        raise SystemExit(1)  # the main process says why
    return value[0][1]


def is_sharded(model) -> bool:
    """True when parameters are DTensors (FSDP2)."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def release_gathered_weights(model) -> None:
    """After forwards without a backward (sampling): FSDP2 frees gathered weights in the backward, and its root
    module's (all blocks' too without reshard_after_forward) stay gathered after a forward. A later forward does
    not gather again, so it would compute with these copies: the EMA weights after sampling with them applied, the
    weights before the optimizer step otherwise."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def inner_optimizer(optimizer):
    """The optimizer itself, without Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def is_portable(optimizer) -> bool:
    """torch's optimizers have per-parameter state that DCP can re-shard; bitsandbytes' 8-bit state does not."""
    kind = type(inner_optimizer(optimizer))
    return kind.__module__.startswith("torch.") or kind.__name__ == "StochasticAdamW"


@torch.no_grad()
def materialize_(model, weights: dict | None, device, seed: int = 0) -> None:
    """Give a model built on the meta device (and possibly already sharded) real storage on `device`.

    With `weights` ({name: full CPU tensor}, typically memory-mapped) every process copies in only its own shard,
    one tensor at a time; without, parameters get a random init (benchmarks): N(0, 0.02) for matrices, ones for
    norm scales, zeros for biases.
    """
    # buffers computed at construction (Anima's adapter RoPE frequencies, built off the meta device) are no weights
    # and not in `weights`: keep their values through to_empty
    computed = {name: b.clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, value in computed.items():
        model.get_buffer(name).copy_(value)
    if weights is not None:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    generator = torch.Generator(device).manual_seed(seed)
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        if p.ndim >= 2:  # drawn whole on every process, so the init does not depend on the process count
            full = torch.randn(p.shape, generator=generator, device=device) * 0.02
            local.copy_(_local_slice(p, full))
        else:
            local.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)


def _local_slice(param, full: torch.Tensor) -> torch.Tensor:
    """This process's part of a full tensor, for a DTensor parameter (dim-0 shards, as fully_shard makes)."""
    if not hasattr(param, "device_mesh"):
        return full
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(full.to(param.device), param.device_mesh, param.placements).to_local()


def trainable_state(model, frozen_too: bool = False) -> dict:
    """{name: tensor} of what trains (and, with frozen_too, of the frozen rest), each process's shards (DTensors under
    FSDP)."""
    return get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=not frozen_too))


def optimizer_state(model, optimizer) -> dict:
    """Optimizer state keyed by parameter name, each process's shards; `state` holds only tensors."""
    return get_optimizer_state_dict(model, inner_optimizer(optimizer))


def load_trainable_state(model, state: dict) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(strict=False))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, inner_optimizer(optimizer), state)


def local_parts(tensors) -> list:
    """Each tensor's part on this process: the local shard of a DTensor (sharing its storage), else the tensor.

    In-place work on these changes the DTensors themselves without DTensor's per-operation dispatch, which costs
    tens of microseconds per tensor: with hundreds of parameters, every step, that is most of FSDP's overhead.
    """
    from torch.distributed.tensor import DTensor

    # the attribute, not to_local(): that goes through an autograd function, about 4 us per tensor per call
    return [t._local_tensor if isinstance(t, DTensor) else t for t in tensors]


def host_copy_target(state: dict, pin: bool) -> dict:
    """Where background saves copy `state` to: the same nesting of dicts, a CPU tensor for each tensor (for each
    DTensor, a DTensor around a CPU copy of its local shard), all page-aligned slices of one host allocation of
    their total size, registered with the CUDA driver as page-locked if `pin`. Returns it; raises nothing if
    pinning fails (it logs why, and the saves copy more slowly).

    DCP's own staging pins each tensor through torch's caching host allocator, which rounds every block up to a
    power of two (14B on 4 GPUs: 68 instead of 53 GiB per process) and asks the driver for each one in turn (139 s
    measured, 4 processes at once). Here 8 threads touch the pages first and the driver registers them once.
    """
    import concurrent.futures
    import logging
    import mmap

    from torch.distributed.tensor import DTensor

    from .shards import tensors_in

    page = 4096
    offsets, total = {}, 0
    for t in local_parts(list(tensors_in(state))):
        if t.dim() and t.numel() and id(t) not in offsets:
            offsets[id(t)] = total
            total += -(-t.numel() * t.element_size() // page) * page
    # anonymous memory, page-aligned; each view gets a storage of exactly its own size (DCP's writer clones any
    # tensor whose storage is larger than the tensor before writing it)
    buffer = mmap.mmap(-1, max(total, page))
    whole = torch.frombuffer(buffer, dtype=torch.uint8)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # fill_ releases the GIL: the page faults run in parallel
        list(pool.map(lambda chunk: chunk.fill_(0), whole.chunk(8)))
        error = 0
        if pin and total:  # in a worker thread: a failure stays that thread's last CUDA error, where the training
            # thread's next kernel-launch check would report it (flag 1, portable, as torch registers memory)
            error = int(pool.submit(torch.cuda.cudart().cudaHostRegister, whole.data_ptr(), total, 1).result())
    if error:
        logging.getLogger(__name__).warning(
            "could not page-lock %.1f GB of host memory for checkpoint staging (cudaError %d): background saves copy "
            "from the GPU more slowly", total / 2 ** 30, error)

    def copy_of(local):
        if not local.dim():  # as DCP: scalars (the optimizer's step) get their own small tensor
            return torch.tensor(0, dtype=local.dtype)
        if not local.numel():
            return torch.zeros_like(local, device="cpu")
        return torch.frombuffer(buffer, dtype=local.dtype, count=local.numel(), offset=offsets[id(local)]).view(
            local.shape)

    def mirror(obj):
        if isinstance(obj, dict):
            return {k: mirror(v) for k, v in obj.items()}
        if isinstance(obj, DTensor):
            return obj if not obj.dim() else DTensor(copy_of(obj._local_tensor), obj._spec, requires_grad=False)
        if torch.is_tensor(obj):
            return copy_of(obj)
        return obj

    return mirror(state)


def _fully_sharded(tensors) -> bool:
    """DTensors sharded over every dimension of one mesh (FSDP2's 1-D mesh): local sums add up to the global sum.
    One mesh by value: Accelerate shards each block with a mesh object of its own, all equal."""
    from torch.distributed.tensor import Shard
    return bool(tensors) and all(hasattr(t, "placements") and all(isinstance(pl, Shard) for pl in t.placements)
                                 for t in tensors) and len({t.device_mesh for t in tensors}) == 1


@torch.no_grad()
def nan_to_zero_(grads) -> None:
    """NVIDIA's GradClip(force_finite=True): non-finite gradient entries become 0."""
    for g in local_parts(grads):
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)


def global_norm(grads) -> torch.Tensor:
    """L2 norm over all gradients: one foreach norm over local parts, one all-reduce when they are FSDP shards."""
    local = local_parts(grads)
    squared = torch.stack([n.float() for n in torch._foreach_norm(local)]).square().sum()
    if _fully_sharded(grads):
        torch.distributed.all_reduce(squared, group=grads[0].device_mesh.get_group())
    return squared.sqrt()


def reduces_own_norm(grads) -> bool:
    """Whether global_norm and scale_to_norm_ apply: plain tensors, or DTensors sharded as FSDP2 shards them. A mix
    (e.g. replicated DTensors) goes through torch's clip_grad_norm_ instead."""
    return bool(grads) and len({type(g) for g in grads}) == 1 and (
        not hasattr(grads[0], "placements") or _fully_sharded(grads))


def takes_grad_scale(optimizer) -> bool:
    """torch's fused Adam/AdamW: its kernel divides each gradient by `optimizer.grad_scale` (a tensor) as it reads
    it, so a clipping factor given there costs nothing, where scaling the gradients first reads and writes them all."""
    inner = inner_optimizer(optimizer)  # groups, not defaults: a resumed state brings its groups' settings along
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups)


def scale_to_norm_(grads, total: torch.Tensor, max_norm: float, optimizer=None) -> None:
    """Scale gradients whose global norm is `total` to a norm of at most `max_norm` (torch's clip_grad_norm_
    factor). Given an `optimizer` that takes_grad_scale, the gradients are left as they are and the factor is handed
    to its next step (the caller steps it, then calls end_grad_scale)."""
    if optimizer is not None and takes_grad_scale(optimizer):
        inner_optimizer(optimizer).grad_scale = ((total + 1e-6) / max_norm).clamp(min=1.0)
    else:
        torch._foreach_mul_(local_parts(grads), (max_norm / (total + 1e-6)).clamp(max=1.0))


@torch.no_grad()
def clip_grad_norm_(params, max_norm: float, optimizer=None) -> torch.Tensor:
    """NVIDIA's GradClip(force_finite=True): non-finite gradient entries become 0, then gradients are scaled so
    that their global L2 norm is at most `max_norm`. Returns the norm before scaling.

    torch.nn.utils.clip_grad_norm_'s arithmetic, on local shards under FSDP. The zeroing pass over every gradient
    runs only when needed: the norm is taken first and is finite exactly when every entry is (one host sync; the
    training step avoids it, see cosmos_t2i/update.py). With an `optimizer`, as scale_to_norm_.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if not reduces_own_norm(grads):
        nan_to_zero_(grads)
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = global_norm(grads)
    if not torch.isfinite(total):  # the same on every process: the norm is global
        nan_to_zero_(grads)
        total = global_norm(grads)
    scale_to_norm_(grads, total, max_norm, optimizer)
    return total


def plain_fused_adamw(group: dict) -> bool:
    """A param group of torch's AdamW that its fused kernel steps with no option beyond the plain update."""
    return bool(group["fused"]) and bool(group.get("decoupled_weight_decay")) and not (
        group["amsgrad"] or group["maximize"] or group["capturable"] or group["differentiable"]
        or torch.is_tensor(group["lr"]))


def step_adamw_on_local_shards(optimizer) -> bool:
    """One step of torch's fused AdamW over FSDP2 shards, run on each DTensor's local shard (parameters, gradients
    and moments share storage with the DTensors) through torch's own functional AdamW: the same arithmetic without
    DTensor's dispatch of the fused op over every tensor list, which costs tens of milliseconds of CPU time per step
    while the GPU waits (the loss check before it empties the queue). Returns False, having done nothing, where
    this does not apply: not fused AdamW, not fully sharded, or before the first step has created the state."""
    from torch.optim.adam import adam

    inner = inner_optimizer(optimizer)
    if type(inner) is not torch.optim.AdamW:
        return False
    groups = []
    for group in inner.param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params and not (_fully_sharded(params) and all(inner.state.get(p) for p in params)):
            return False
        if not plain_fused_adamw(group):
            return False
        groups.append((group, params, [inner.state[p] for p in params]))
    for group, params, states in groups:
        if not params:
            continue
        (beta1, beta2), steps = group["betas"], [s["step"] for s in states]  # plain tensors, even for DTensors
        adam(local_parts(params), local_parts([p.grad for p in params]), local_parts([s["exp_avg"] for s in states]),
             local_parts([s["exp_avg_sq"] for s in states]), [], steps, fused=True,
             grad_scale=getattr(inner, "grad_scale", None), found_inf=getattr(inner, "found_inf", None),
             has_complex=False, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
             weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
    return True


def end_grad_scale(optimizer) -> None:
    """After the step that used them: later steps must not divide by the same factor again, nor skip."""
    inner_optimizer(optimizer).__dict__.pop("grad_scale", None)
    inner_optimizer(optimizer).__dict__.pop("found_inf", None)
