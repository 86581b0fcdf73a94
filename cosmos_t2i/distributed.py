"""Full (gathered) model and optimizer state whatever the sharding: plain, DDP or FSDP2 (fully_shard).

Checkpoints always hold full tensors keyed by parameter name, so a run saved on N processes resumes on any
other number and its model file loads for single-GPU inference. Every process must call the gather functions.
"""

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)


def is_sharded(model) -> bool:
    """True when parameters are DTensors (FSDP2)."""
    return any(hasattr(p, "device_mesh") for p in model.parameters())


def _inner(optimizer):
    """The optimizer itself, without Accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _portable(optimizer) -> bool:
    # torch's optimizers go through torch.distributed.checkpoint (keys are parameter names);
    # bitsandbytes' 8-bit state has its own layout and is saved as is (unsharded runs only).
    return type(_inner(optimizer)).__module__.startswith("torch.")


def gather_model_state(model) -> dict:
    """{name: full CPU tensor}; under FSDP only the main process receives the tensors."""
    state = get_model_state_dict(model, options=_GATHER)
    return {k.replace("_orig_mod.", ""): v for k, v in state.items()}


def gather_optimizer_state(model, optimizer) -> dict:
    """Optimizer state keyed by parameter name (full tensors on the main process)."""
    if _portable(optimizer):
        return get_optimizer_state_dict(model, _inner(optimizer), options=_GATHER)
    if is_sharded(model):
        raise ValueError("8-bit AdamW checkpoints are not supported under FSDP; use --optimizer adamw.")
    return optimizer.state_dict()


def load_model_state(model, state: dict, strict: bool = True) -> None:
    """Load full tensors into a plain, DDP or FSDP model (each process keeps its shard)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    """Restore what gather_optimizer_state wrote, on any number of processes."""
    if _portable(optimizer):
        set_optimizer_state_dict(model, _inner(optimizer), state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


@torch.no_grad()
def nan_to_zero_(grads) -> None:
    """NVIDIA's GradClip(force_finite=True): non-finite gradient entries become 0."""
    for g in grads:
        torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
