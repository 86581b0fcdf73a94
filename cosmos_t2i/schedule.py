"""NVIDIA's LambdaLinear learning-rate multiplier and the optimizer factory (notes section 7)."""

import torch


def lambda_linear(step: int, warm_up_steps, cycle_lengths, f_start, f_max, f_min) -> float:
    """Multiplier at `step` (0-based, as LambdaLR counts): linear warm-up f_start -> f_max, then linear to f_min
    at the cycle's end; restarts per cycle. Like NVIDIA's, no clamp past the last cycle (the caller forbids it)."""
    start = 0
    cycle = len(cycle_lengths) - 1
    for i, length in enumerate(cycle_lengths):
        if step <= start + length:
            cycle = i
            break
        start += length
    n = step - start
    warm, length = warm_up_steps[cycle], cycle_lengths[cycle]
    if n < warm:
        return f_start[cycle] + (f_max[cycle] - f_start[cycle]) * n / warm
    return f_min[cycle] + (f_max[cycle] - f_min[cycle]) * (length - n) / (length - warm)


def make_scheduler(optimizer, args):
    """LambdaLR with lambda_linear (or a constant multiplier of 1)."""
    if args.scheduler == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    lists = [args.warm_up_steps, args.cycle_lengths, args.f_start, args.f_max, args.f_min]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lambda_linear(step, *lists))


def make_optimizer(params, args, device_type: str):
    """AdamW (fused on CUDA, foreach elsewhere) or bitsandbytes' AdamW8bit, with the seed's hyperparameters."""
    kwargs = dict(lr=args.lr, betas=tuple(args.betas), eps=args.eps, weight_decay=args.weight_decay)
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = device_type == "cuda"
    return torch.optim.AdamW(params, fused=fused, foreach=None if fused else True, **kwargs)
