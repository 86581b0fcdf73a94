"""What the training log reports: progress (loss, speed, MFU, GPU memory), host memory, and --profile_iters."""

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

from .registry import RESOLUTIONS

logger = logging.getLogger("train")
PHASES = ("forward", "backward", "clip_grad_norm", "optimizer_step", "ema_update")


def start_profile() -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profile = torch.profiler.profile(activities=activities)
    profile.start()
    return profile


def finish_profile(profile, iterations: int, out_dir: Path, rank: int) -> dict:
    """Stop; write trace_rank<r>.json (chrome://tracing, Perfetto) and ops_rank<r>.txt; log milliseconds per
    iteration of each training phase (CPU time to issue it, device time it ran) and of the kernels by kind."""
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
        summary["kernels_ms"] = kernel_time_by_kind(out_dir / f"trace_rank{rank}.json", iterations)
    logger.info("profile of %d iterations (ms per iteration): %s; trace and op table in %s", iterations,
                "; ".join(f"{k} cpu {v['cpu_ms']:.1f} device {v['device_ms']:.1f}" for k, v in per_iter.items())
                + "".join(f"; {k} {v:.1f}" for k, v in summary.get("kernels_ms", {}).items()), out_dir)
    return summary


# kernel name fragments (lower case) of each kind, tried in this order; anything else is "other"
KERNEL_KINDS = (("nccl", ("nccl",)), ("attention", ("flash", "fmha", "sdpa", "attention")),
                ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "wgmma", "triton_tem")),
                ("multi_tensor", ("multi_tensor", "foreach", "adam")), ("triton", ("triton",)))


def gpu_work(events: list) -> list:
    """A chrome trace's GPU events (kernels, copies, memsets), in order of their start."""
    return sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e),
                  key=lambda e: e["ts"])


def kernel_time_by_kind(trace_path: Path, iterations: int) -> dict:
    """Milliseconds per iteration of GPU work read off a chrome trace: each kind's summed kernel time (matmul,
    attention, triton = compiled fused elementwise/norm/cast kernels, multi_tensor = optimizer/EMA/clip, nccl, copies,
    other) and busy_ms, the time at least one kernel runs, so that kernels overlapping on several streams (NCCL beside
    compute) count once."""
    work = gpu_work(json.loads(Path(trace_path).read_text())["traceEvents"])
    by_kind = defaultdict(float)
    for e in work:
        name = e["name"].lower()
        kind = "copies" if e["cat"] != "kernel" else next(
            (k for k, parts in KERNEL_KINDS if any(part in name for part in parts)), "other")
        by_kind[kind] += e["dur"]
    busy, end = 0.0, float("-inf")
    for start, stop in ((e["ts"], e["ts"] + e["dur"]) for e in work):
        if stop > end:
            busy, end = busy + stop - max(start, end), stop
    out = {f"{kind}_ms": us / 1e3 / iterations for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1])}
    return {"busy_ms": busy / 1e3 / iterations, **out}


class IterationProfiler:
    """Profiles `count` iterations from `first` on (nothing when count is 0): begin() and end() around each."""

    def __init__(self, count: int, first: int, out_dir: Path, rank: int):
        self.count, self.first, self.out_dir, self.rank, self.profile = count, first, out_dir, rank, None

    def begin(self, iteration: int) -> None:
        if self.count and iteration == self.first:
            self.profile = start_profile()

    def end(self, iteration: int) -> None:
        if self.profile is not None and iteration >= self.first + self.count - 1:
            finish_profile(self.profile, self.count, self.out_dir, self.rank)
            self.profile = None


def memory_report(accelerator) -> str:
    """Host RSS (now and peak) of every process, and this process's peak GPU memory."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line) \
        if Path("/proc/self/status").exists() else {}
    rss = [float(status.get(k, "0 kB").split()[0]) / 2 ** 20 for k in ("VmRSS", "VmHWM")]
    every = accelerator.gather(torch.tensor([rss], device=accelerator.device)).cpu().tolist()
    text = "host RSS per process (GB, now/peak): " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in every)
    if accelerator.device.type == "cuda":
        text += (f"; GPU peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GB allocated, "
                 f"{torch.cuda.max_memory_reserved() / 2 ** 30:.1f} GB reserved")
    return text


# dense bf16 matrix rate from the vendors' datasheets, TFLOP/s: the denominator of the logged MFU estimate
DATASHEET_BF16_TFLOPS = {"H100": 989, "H200": 989, "H800": 989, "GH200": 989, "B200": 2250, "A100": 312, "A800": 312,
                         "L40S": 362, "L40": 181, "RTX 4090": 165, "RTX 6000 Ada": 364, "A6000": 155}


class Progress:
    """The progress bar and log line: loss, lr, grad norm, seconds per iteration, samples/s, an MFU estimate (model
    FLOPs per sample from the FLOP counter / the GPU's datasheet bf16 rate) and peak GPU memory."""

    def __init__(self, args, accelerator, start_iter: int):
        self.args, self.accelerator, self.start_iter = args, accelerator, start_iter
        self.samples_per_iter = args.batch_size * accelerator.num_processes * args.grad_accum
        self.bar = tqdm(total=args.max_iter, initial=start_iter, desc="train",
                        disable=not accelerator.is_main_process)
        self.window_start, self.window_iters, self.flops, self.peak = time.perf_counter(), 0, None, None
        if accelerator.device.type == "cuda":
            from .models import training_flops_per_sample
            name = torch.cuda.get_device_name(accelerator.device)
            self.peak = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
            height, width = args.image_size if not args.aspect_buckets else RESOLUTIONS[args.resolution]["1:1"]
            self.flops = training_flops_per_sample(args.model_size, height, width)

    def update(self, iteration: int, tick: float, mean_loss, grad_norm, lr: float, skipped: int) -> None:
        args, early = self.args, iteration - self.start_iter <= self.args.hit_thres
        self.window_iters += 1
        self.bar.update(1)
        if not early and iteration % args.logging_iter:
            return
        cuda = self.accelerator.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        per_iter = (time.perf_counter() - (tick if early else self.window_start)) / (1 if early else self.window_iters)
        samples_s, loss_value = self.samples_per_iter / per_iter, float(mean_loss)
        extra = ""
        if cuda:
            if self.peak and self.flops:
                mfu = self.flops * samples_s / self.accelerator.num_processes / (self.peak * 1e12)
                extra += f", MFU {100 * mfu:.1f}% (of the datasheet's {self.peak} TFLOP/s)"
            extra += (f", GPU peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GB allocated, "
                      f"{torch.cuda.max_memory_reserved() / 2 ** 30:.1f} GB reserved")
        self.bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples_s:.2f}")
        logger.info("iter %d loss %.5f lr %.3e grad_norm %.3f iter_speed %.3f s/iter, %.2f samples/s%s", iteration,
                    loss_value, lr, float(grad_norm), per_iter, samples_s, extra)
        self.accelerator.log({"loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "sec_per_iter": per_iter,
                              "samples_per_s": samples_s, "skipped_steps": skipped}, step=iteration)
        self.window_start, self.window_iters = time.perf_counter(), 0
