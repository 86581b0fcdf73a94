"""--profile_iters: torch.profiler over a few training iterations, summarised in the log and saved for a viewer."""

import logging
from pathlib import Path

import torch

logger = logging.getLogger("train")
PHASES = ("forward", "backward", "grad_nan_to_zero", "clip_grad_norm", "optimizer_step", "ema_update")


def start_profile() -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profile = torch.profiler.profile(activities=activities)
    profile.start()
    return profile


def finish_profile(profile, iterations: int, out_dir: Path, rank: int) -> dict:
    """Stop; write trace_rank<r>.json (chrome://tracing, Perfetto) and ops_rank<r>.txt; log milliseconds per
    iteration of each training phase (CPU time to issue it, device time it ran) and of all non-NCCL kernels."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    profile.stop()
    out_dir.mkdir(parents=True, exist_ok=True)
    profile.export_chrome_trace(str(out_dir / f"trace_rank{rank}.json"))
    events = profile.key_averages()
    on_gpu = torch.cuda.is_available()
    (out_dir / f"ops_rank{rank}.txt").write_text(events.table(
        sort_by="self_device_time_total" if on_gpu else "self_cpu_time_total", row_limit=40))
    per_iter = {}
    for e in events:
        if e.key in PHASES:
            per_iter[e.key] = {"cpu_ms": e.cpu_time_total / 1e3 / iterations,
                               "device_ms": e.device_time_total / 1e3 / iterations}
    summary = {"phases": per_iter}
    if on_gpu:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        summary["kernels_ms"] = sum(e.self_device_time_total for e in kernels
                                    if "nccl" not in e.key.lower()) / 1e3 / iterations
        summary["nccl_ms"] = sum(e.self_device_time_total for e in kernels if "nccl" in e.key.lower()) / 1e3 / iterations
    logger.info("profile of %d iterations (ms per iteration): %s; trace and op table in %s", iterations,
                "; ".join(f"{k} cpu {v['cpu_ms']:.1f} device {v['device_ms']:.1f}" for k, v in per_iter.items())
                + "".join(f"; {k} {summary[k]:.1f}" for k in ("kernels_ms", "nccl_ms") if k in summary), out_dir)
    return summary
