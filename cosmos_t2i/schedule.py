"""NVIDIA's LambdaLinear learning-rate multiplier and the optimizer factory (docs/training.md)."""

import torch

from .distributed import local_parts


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


def make_scheduler(optimizer, kind: str = "lambdalinear", warm_up_steps=(0,), cycle_lengths=(1000,), f_start=(1e-6,),
                   f_max=(0.4,), f_min=(0.0,)):
    """LambdaLR with lambda_linear (kind "lambdalinear") or a constant multiplier of 1 (kind "constant")."""
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    lists = [list(warm_up_steps), list(cycle_lengths), list(f_start), list(f_max), list(f_min)]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lambda_linear(step, *lists))


def make_optimizer(params, lr: float, betas=(0.9, 0.99), eps: float = 1e-8, weight_decay: float = 0.2,
                   kind: str = "adamw", bf16_weights: bool = False, device_type: str = "cuda"):
    """AdamW (fused on CUDA and the CPU, foreach elsewhere), bitsandbytes' AdamW8bit (kind "adamw8bit"), or, for
    bf16 weights, StochasticAdamW."""
    kwargs = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    if bf16_weights:
        return StochasticAdamW(params, **kwargs)
    if kind == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = device_type in ("cuda", "cpu")  # the CPU runs the same kernel semantics as the GPU (tests)
    return torch.optim.AdamW(params, fused=fused, foreach=None if fused else True, **kwargs)


def stochastic_round_(target: torch.Tensor, value: torch.Tensor) -> None:
    """Write fp32 `value` into bf16 `target`, rounding up or down at random in proportion to the remainder.

    In expectation the stored number equals the fp32 one, so updates far below bf16's resolution (lr ~1e-5 on
    weights ~1e-2) still move the weights on average instead of vanishing.
    """
    bits = value.float().contiguous().view(torch.int32)
    noise = torch.randint_like(bits, 0, 1 << 16)
    target.copy_(((bits + noise) & -65536).view(torch.float32))  # low 16 bits zero: the cast to bf16 is exact


class StochasticAdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights without fp32 masters: bf16 moments, fp32 arithmetic, stochastic rounding.

    Memory per parameter: 2 (weight) + 2 (gradient) + 4 (moments) bytes, against 16 for fp32 AdamW with masters.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                step = float(state["step"])
                # the arithmetic on this process's shards: plain tensors, no DTensor dispatch per operation
                param, grad, avg, avg_sq = local_parts([p, p.grad, state["exp_avg"], state["exp_avg_sq"]])
                grad = grad.float()
                exp_avg = avg.float().lerp_(grad, 1 - beta1)
                exp_avg_sq = avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                stochastic_round_(avg, exp_avg)
                stochastic_round_(avg_sq, exp_avg_sq)
                denom = (exp_avg_sq / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
                weight = param.float().mul_(1 - group["lr"] * group["weight_decay"])
                weight.addcdiv_(exp_avg, denom, value=-group["lr"] / (1 - beta1 ** step))
                if param.dtype == torch.bfloat16:
                    stochastic_round_(param, weight)
                else:
                    param.copy_(weight)
