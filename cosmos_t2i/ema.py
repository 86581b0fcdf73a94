"""NVIDIA's power EMA (EDM2 style): an fp32 copy updated with beta(n) = (1 - 1/(n+1))^(gamma+1) (docs/training.md)."""

import contextlib

import numpy as np
import torch

from .distributed import local_parts


def power_ema_gamma(rate: float = 0.1) -> float:
    """gamma: the largest real root of x^3 + 7x^2 + (16 - s^-2) x + (12 - s^-2) for relative width s = rate."""
    s2 = rate ** -2
    roots = np.roots([1, 7, 16 - s2, 12 - s2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def power_ema_beta(iteration: int, gamma: float) -> float:
    """Decay at a given iteration; 0 at iteration 0 (the EMA starts as a copy)."""
    return (1 - 1 / (iteration + 1)) ** (gamma + 1)


class PowerEMA:
    """fp32 shadow copies of named parameters (sharded like them under FSDP), updated with foreach ops."""

    def __init__(self, named_parameters, rate: float = 0.1):
        self.gamma = power_ema_gamma(rate)
        self.names, params = zip(*[(n, p) for n, p in named_parameters])
        self.shadow = [p.detach().float().clone() for p in params]
        self.params = list(params)

    def beta(self, iteration: int) -> float:
        return power_ema_beta(iteration, self.gamma)

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """shadow = beta * shadow + (1 - beta) * param (cosmos_t2i/adamw_ema.py does it inside the AdamW step)."""
        torch._foreach_lerp_(local_parts(self.shadow), [p.float() for p in local_parts(self.params)],
                             1 - self.beta(iteration))

    def tensors(self) -> dict:
        """{name: live fp32 shadow} (DTensor shards under FSDP): what checkpoints save and restore in place."""
        return dict(zip(self.names, self.shadow))

    @contextlib.contextmanager
    def applied(self):
        """Within the block the live parameters hold the EMA weights (validation); restored afterwards."""
        with torch.no_grad():
            backup = [p.detach().clone() for p in self.params]
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(self.params, backup):
                    p.copy_(b)

