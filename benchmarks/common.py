"""Helpers shared by the GPU benchmarks: timing, peak matmul rate, random models at the real shapes."""

import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results.jsonl"


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


def report(result: dict, save: bool = True) -> None:
    """Print the one JSON line each benchmark promises, with the device, torch version, date and the command that
    reproduces it, and append it to benchmarks/results.jsonl (perf_table.py makes docs/performance.md and README's
    table from that file)."""
    script = Path(sys.argv[0]).resolve()
    command = " ".join(["python", str(script.relative_to(RESULTS.parents[1])) if script.is_relative_to(
        RESULTS.parents[1]) else sys.argv[0], *sys.argv[1:]])
    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": command, **result}
    line = json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()})
    print(line, flush=True)
    if save:
        with open(RESULTS, "a") as f:
            f.write(line + "\n")
