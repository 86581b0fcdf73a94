"""Helpers shared by the GPU benchmarks: timing, peak matmul rate, random models at the real shapes."""

import json
import time

import torch


def cuda_time(fn, warmup=2, repeat=5) -> float:
    """Median seconds of fn() over `repeat` runs after `warmup`, synchronising around each."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_peak_tflops(n=8192) -> float:
    """Measured bf16 matmul rate on random data (the MFU denominator)."""
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda",
                                                                                 dtype=torch.bfloat16)
    seconds = cuda_time(lambda: a @ b, warmup=3, repeat=10)
    return 2 * n ** 3 / seconds / 1e12


def peak_gb() -> float:
    return torch.cuda.max_memory_allocated() / 2 ** 30


def reset_peak() -> None:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def report(result: dict) -> None:
    """Print the one JSON line each benchmark promises, with the device named."""
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, **result}
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))
