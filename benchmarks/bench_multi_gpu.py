"""Multi-GPU training runs through the training script itself (accelerate launch), one JSON line per run.

    python benchmarks/bench_multi_gpu.py --runs scaling            # 2B full fine-tune on 1, 2, 4 GPUs + resume
    python benchmarks/bench_multi_gpu.py --runs 14b lora multinode

Every run is `accelerate launch --config_file accelerate_configs/... train_text2image.py` on a synthetic dataset at
768x1360 (random images, random T5 embeddings, latents cached once with a randomly initialised Wan2.1 VAE) and a
randomly initialised DiT at the real shape. Timings, peak GPU memory, host RSS and checkpoint stalls are read off
the training script's own log. The baseline for weak scaling is the plain single-GPU path (no FSDP) on the same
machine in the same invocation. MFU = model FLOPs per sample (torch's FLOP counter, as bench_train.py) x samples
per second per GPU / the bf16 matmul rate measured here. s/iter is the median of the log's windows of --log_every
iterations (one GPU sync per window, as in a user's run; results.jsonl's lines 1-61, up to 2026-11-27, logged and
synced every iteration, which `--log_every 1` reproduces).
"""

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def write_images(data: Path, n_images: int, height: int, width: int, text_folder: str, write_text) -> None:
    """images/, metas/ and text_folder/ of n random images; write_text(stem, rng) writes one image's text file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "metas", text_folder):
        (data / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        if not (data / "images" / f"{i:05d}.jpg").exists():
            Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
                data / "images" / f"{i:05d}.jpg")
            (data / "metas" / f"{i:05d}.txt").write_text(f"synthetic image {i}")
            write_text(f"{i:05d}", rng)


def make_dataset(work: Path, n_images: int, height: int, width: int) -> tuple[Path, Path]:
    """Random images + NVIDIA-format random T5 pickles + a random Wan2.1 VAE folder; returns (dataset, vae)."""
    import torch

    from cosmos_t2i.t5 import write_embedding

    data, vae_dir = work / "dataset", work / "vae"
    write_images(data, n_images, height, width, "t5_xxl", lambda stem, rng: write_embedding(
        data / "t5_xxl" / f"{stem}.pickle", rng.standard_normal((120, 1024)) * 0.1))
    if not (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKLWan
        AutoencoderKLWan().to(torch.bfloat16).save_pretrained(vae_dir)  # Wan2.1's shape, random weights
    return data, vae_dir


def make_anima_dataset(work: Path, n_images: int, height: int, width: int, model_size: str) -> tuple[Path, Path]:
    """Random images + random Anima text files (Qwen3 states, T5 ids, of the adapter's widths) + a random Qwen-Image
    VAE folder; returns (dataset, vae)."""
    import torch

    from cosmos_t2i.anima_text import FOLDER, SUFFIX, write_text
    from cosmos_t2i.registry import anima_conditioner_config

    adapter = anima_conditioner_config(model_size)
    data, vae_dir = work / "anima_dataset", work / "qwen_image_vae"
    write_images(data, n_images, height, width, FOLDER, lambda stem, rng: write_text(data / FOLDER / f"{stem}{SUFFIX}", {
        "qwen": torch.from_numpy(rng.standard_normal((120, adapter["source_dim"]), dtype=np.float32)).bfloat16(),
        "t5_ids": torch.from_numpy(rng.integers(2, adapter["target_vocab_size"], 100))}))
    if not (vae_dir / "config.json").exists():
        from diffusers import AutoencoderKLQwenImage
        if model_size == "tiny":  # the tiny bundle's VAE shape
            import inspect
            config = json.loads((ROOT / "examples" / "tiny" / "vae" / "config.json").read_text())
            keep = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
            vae = AutoencoderKLQwenImage(**{k: v for k, v in config.items() if k in keep})
        else:
            vae = AutoencoderKLQwenImage()  # the released shape, random weights
        vae.to(torch.bfloat16).save_pretrained(vae_dir)
    return data, vae_dir


def parse_log(text: str, skip: int, log_every: int = 1) -> dict:
    """Seconds per iteration (median of the logged windows of `log_every` iterations that lie wholly after `skip`
    warm-up iterations), losses, memory, checkpoint and resume lines."""
    speeds = [(int(i), float(s)) for i, s in re.findall(r"iter (\d+) loss \S+ lr \S+ grad_norm \S+ iter_speed ([\d.]+)",
                                                        text)]
    losses = {int(i): float(v) for i, v in re.findall(r"iter (\d+) loss ([-\d.eE+naif]+)", text)}
    out = {"losses": losses}
    resumed = re.findall(r"resumed from \S+ at iteration (\d+)", text)
    if resumed:
        out["resumed_at"] = int(resumed[-1])
    steady = [s for i, s in speeds if i - log_every >= skip] or [s for _, s in speeds]
    if steady:
        out["sec_per_iter"] = statistics.median(steady)
    saves = re.findall(r"checkpoint \S+: stalled ([\d.]+) s, written in ([\d.]+) s", text)
    if saves:
        out["checkpoint_stall_s"], out["checkpoint_written_s"] = float(saves[-1][0]), float(saves[-1][1])
    staging = re.findall(r"checkpoint: ([\d.]+) GB of pinned host memory per process for background saves, "
                         r"allocated in ([\d.]+) s", text)
    if staging:  # one line per process; the slowest is the step's stall
        out["staging_gb"] = float(staging[0][0])
        out["staging_alloc_s"] = max(float(t) for _, t in staging)
    rss = re.findall(r"host RSS per process \(GB, now/peak\): ([^;\n]+)", text)
    if rss:
        out["host_rss_gb_startup"], out["host_rss_gb_end"] = rss[0].strip(), rss[-1].strip()
    profile = re.findall(r"profile of \d+ iterations \(ms per iteration\): (.*?); trace and op table", text)
    if profile:
        out["profile_ms_per_iter_rank0"] = profile[0]
    gpu = re.findall(r"GPU peak ([\d.]+) GB allocated, ([\d.]+) GB reserved", text)
    if gpu:
        out["gpu_peak_allocated_gb"], out["gpu_peak_reserved_gb"] = float(gpu[-1][0]), float(gpu[-1][1])
    return out


def interconnect(n: int, topology: str | None = None) -> str:
    """How GPU 0 reaches GPUs 1..n-1, read off `nvidia-smi topo -m` (NV<k>: NVLink with k links; PIX, PXB, PHB,
    NODE, SYS: PCIe paths, SYS crossing CPU sockets): FSDP's weak scaling depends on it."""
    if topology is None:
        try:
            topology = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return "unknown"
    for line in topology.splitlines():
        cells = re.sub(r"\x1b\[[0-9;]*m", "", line).split()
        if len(cells) > n and cells[:2] == ["GPU0", "X"]:  # its row (the header starts with GPU0 too)
            return ", ".join(f"GPU0-GPU{i} {cells[1 + i]}" for i in range(1, n))
    return "unknown"


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc), children before their parents' parents."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found, frontier = children + found, children
    return found


def launch(config: str, n: int, flags: list, log: Path, port: int, env_extra=None, machine=None,
           extra_launch=(), timeout=None) -> str:
    """One accelerate launch of the training script; returns its combined log (raises with its tail on failure, or
    when it has not ended after `timeout` seconds: then the launcher and every process below it are killed)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ROOT / "accelerate_configs" / config),
           "--num_processes", str(n), "--main_process_port", str(port)]
    if machine is not None:
        cmd += ["--num_machines", "2", "--machine_rank", str(machine), "--main_process_ip", "127.0.0.1"]
    cmd += list(extra_launch)
    cmd += [str(ROOT / "train_text2image.py"), *map(str, flags)]
    env = dict(os.environ, **(env_extra or {}))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid in [*descendants(proc.pid), proc.pid]:  # torchrun starts each trainer in a session of its own
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{' '.join(cmd)} had not ended after {timeout} s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-3000:]}")
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["scaling"],
                        choices=["scaling", "stall", "reshard", "14b", "14b_nvidia", "lora", "lora14b", "lora14b_fp8",
                                 "lowmem", "multinode", "fp8", "14b_fp8", "anima", "predict2_square"],
                        help="run sets, in the order given")
    parser.add_argument("--work", default="/tmp/cosmos_bench")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch_size", type=int, default=2, help="per GPU")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--skip", type=int, default=8,
                        help="iterations left out of the median: warm-up, and the profiled ones (4-6) in scaling")
    parser.add_argument("--log_every", type=int, default=4,
                        help="the script's --logging_iter for timed runs: s/iter is the mean over each logged window, "
                             "with one GPU sync per window as in a user's run (the loss comparisons log every "
                             "iteration)"),
    parser.add_argument("--images", type=int, help="dataset size (default: enough that no image repeats)")
    parser.add_argument("--launch_timeout", type=int, default=1200,
                        help="seconds after which a launch that has not ended is killed (reported as failed)")
    parser.add_argument("--tiny", action="store_true", help="CPU check of this script: tiny model, 64x64, gloo")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    height, width = (64, 64) if args.tiny else (768, 1360)
    n_images = args.images or max(args.gpus) * args.batch_size * (args.iters + 4)
    data, vae = make_dataset(work, n_images, height, width)
    peak, flops = None, {}
    if not args.tiny:
        import torch
        from bench_train import step_flops
        from common import matmul_peak_tflops
        peak = matmul_peak_tflops()
        for size in ("2B", "14B"):
            flops[size] = step_flops(size)
        torch.cuda.empty_cache()
    size_2b = "tiny" if args.tiny else "2B"
    common = ["--dit_path", "random", "--vae_path", vae, "--dataset_dir", data, "--image_size", height, width, "--num_workers", 4,
              "--cache_latents", "--report_to", "none", "--logging_iter", args.log_every, "--hit_thres", 0,
              "--scheduler", "constant",
              "--lr", "1e-5", "--output_root", work / "runs"]
    if args.tiny:
        common += ["--mixed_precision", "no"]
    else:
        common += ["--compile"]
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if args.tiny else {}
    port = [29700]

    def run(name, config, n, model_size, extra, machine=None, env_extra=None, batch=None, report=True,
            extra_launch=(), log_every=None, sample_flops=None):
        port[0] += 1
        batch, log_every = batch or args.batch_size, log_every or args.log_every
        flags = common + ["--model_size", model_size, "--batch_size", batch, "--max_iter", args.iters,
                          "--save_iter", args.iters, "--name", name, "--logging_iter", log_every, *extra]
        start = time.perf_counter()
        try:
            text = launch(config, n, flags, work / f"{name}.log", port[0], {**env, **(env_extra or {})}, machine,
                          extra_launch, args.launch_timeout)
        finally:  # op tables and rank 0's trace are kept when the launch fails too; runs/ is removed between runs
            profile = work / "runs" / "posttraining" / "text2image" / name / "profile"
            for table in [*profile.glob("ops_rank*.txt"), *profile.glob("trace_rank0.json")]:
                shutil.copy(table, work / f"{name}_{table.name}")
        result = dict(run=name, gpus=n, model_size=model_size, batch_per_gpu=batch, wall_s=time.perf_counter() - start,
                      **parse_log(text, args.skip, log_every))
        saved = work / "runs" / "posttraining" / "text2image" / name / "checkpoints"
        if saved.is_dir():
            result["checkpoints_on_disk_gb"] = sum(f.stat().st_size for f in saved.rglob("*") if f.is_file()) / 2 ** 30
        if n > 1 and not args.tiny:
            result["interconnect"] = interconnect(n)
        if "sec_per_iter" in result:
            result["samples_per_s"] = n * batch / result["sec_per_iter"]
            sample_flops = sample_flops or flops.get(model_size)
            if sample_flops:
                result["mfu_per_gpu"] = sample_flops * batch / result["sec_per_iter"] / (peak * 1e12)
        if report:
            emit({k: v for k, v in result.items() if k != "losses"})
        return result

    def emit(line: dict):  # on GPUs into benchmarks/results.jsonl as well (common.report); a CPU check only prints
        if args.tiny:
            print(json.dumps(line), flush=True)
        else:
            from common import report
            report(line)

    single = "single_gpu.yaml" if not args.tiny else "multi_gpu.yaml"
    size_14b = "tiny" if args.tiny else "14B"
    widest = max(args.gpus)
    no_save = ["--save_iter", 1000, "--no-final_save"]

    def scaling():  # iterations 4-6 profiled (per-phase times in the JSON), the median taken after them
        profiled = ["--profile_iters", 3]
        base = run("2b_1gpu_plain", single, 1, size_2b, [*profiled, *no_save])
        for n in [g for g in args.gpus if g > 1]:
            shutil.rmtree(work / "runs", ignore_errors=True)  # disk: a 2B checkpoint is about 40 GB
            r = run(f"2b_fsdp_{n}gpu", "fsdp_2b.yaml", n, size_2b, profiled + ([] if n == widest > 2 else no_save))
            emit({"run": f"2b_fsdp_{n}gpu", "weak_scaling_vs_1gpu_plain":
                  round(r["samples_per_s"] / (n * base["samples_per_s"]), 4)})
        if widest > 2:  # resume the widest run's checkpoint on 2 GPUs
            r = run(f"2b_fsdp_{widest}gpu", "fsdp_2b.yaml", 2, size_2b,
                    ["--max_iter", args.iters + 4, "--no-final_save"])
            emit({"run": f"resume {widest}->2 GPUs", "resumed": r.get("resumed_at") == args.iters})
        shutil.rmtree(work / "runs", ignore_errors=True)

    def stall():  # two saves: the second shows the steady-state stall (pinned buffers allocated at the first step)
        run("2b_1gpu_two_saves", single, 1, size_2b, ["--save_iter", args.iters // 2, "--keep_last", 1])
        shutil.rmtree(work / "runs", ignore_errors=True)

    def reshard():  # 2B: blocks kept gathered from forward to backward (fsdp_2b.yaml's setting) against resharded
        profiled = ["--profile_iters", 3, *no_save]
        rates = {}
        for keep in ("true", "false"):
            r = run(f"2b_fsdp_{widest}gpu_" + ("reshard" if keep == "true" else "no_reshard"), "fsdp_2b.yaml", widest,
                    size_2b, profiled, extra_launch=["--fsdp_reshard_after_forward", keep])
            rates[keep] = r.get("samples_per_s")
            shutil.rmtree(work / "runs", ignore_errors=True)
        if all(rates.values()):
            emit({"run": f"2B FSDP {widest} GPUs, reshard_after_forward false vs true",
                  "speedup_samples_per_s": rates["false"] / rates["true"]})

    # 14B: few, slow iterations (over a second each), so every one is logged and timed
    def fourteen():  # fits 4 x 80 GB: bf16 weights (stochastic rounding), fp32 EMA sharded, activation checkpointing
        # on 2 x 80 GB only without the EMA (8 bytes per parameter: 56 GB per GPU); iterations 4-5 profiled
        ema = [] if widest >= 4 else ["--no-ema"]
        run("14b_fsdp_bf16" + ("_no_ema" if ema else ""), "fsdp_14b.yaml", widest, size_14b,
            ["--weight_dtype", "bf16", "--max_iter", 10, "--profile_iters", 2, *ema, *no_save], batch=1, log_every=1)

    def fourteen_nvidia():  # NVIDIA's recipe: fp32 master weights and fp32 EMA (20 bytes per parameter)
        run("14b_fsdp_fp32_nvidia", "fsdp_14b.yaml", widest, size_14b, ["--max_iter", 6, *no_save], batch=1,
            log_every=1)

    def fourteen_fp8():  # NVIDIA's recipe with and without --fp8 (14B's width, 5120, is where float8 should pay)
        runs = {name: run(name, "fsdp_14b.yaml", widest, size_14b, [*extra, *no_save], batch=1, log_every=1)
                for name, extra in (("14b_fsdp_fp32_nvidia", []), ("14b_fsdp_fp32_nvidia_fp8", ["--fp8"]))}
        bf16, fp8 = (runs[n].get("samples_per_s") for n in ("14b_fsdp_fp32_nvidia", "14b_fsdp_fp32_nvidia_fp8"))
        if bf16 and fp8:
            emit({"run": f"14B --fp8 vs bf16, FSDP {widest} GPUs", "fp8_speedup_samples_per_s": fp8 / bf16})

    def lora(size):
        for config in ("multi_gpu.yaml", "fsdp_2b.yaml"):
            run(f"lora_{size}_{config.split('_')[0].split('.')[0]}_{widest}gpu", config, widest, size,
                ["--train_architecture", "lora", "--gradient_checkpointing", *no_save], batch=1)

    def lora_fp8():  # one GPU: 14B LoRA on a bf16 base against one stored in fp8 (the 24 GB recipe)
        for dtype in ("bf16", "fp8"):
            run(f"lora_14B_{dtype}_base_1gpu", single, 1, size_14b, ["--train_architecture", "lora",
                "--gradient_checkpointing", "--lora_base_dtype", dtype, *no_save], batch=1)

    def lowmem():  # one GPU, the 24 GB full fine-tune recipe at batch 4, with and without expandable segments
        recipe = ["--weight_dtype", "bf16", "--no-ema", "--gradient_checkpointing", *no_save]
        # fill the latent cache first: encoding with the VAE would otherwise set the first run's peak
        run("2b_lowmem_fill_cache", single, 1, size_2b, [*recipe, "--max_iter", 1], batch=4, report=False)
        for alloc in ("", "expandable_segments:True"):
            run("2b_lowmem_b4" + ("_expandable" if alloc else ""), single, 1, size_2b, recipe, batch=4,
                env_extra={"PYTORCH_CUDA_ALLOC_CONF": alloc})

    def multinode():  # two "machines" of half the GPUs each on one host against one launch of all GPUs
        # On GPUs bf16 reductions are not bitwise reproducible, so the second launch of the same command gives the
        # run-to-run noise; iteration 1 (before any update) must agree exactly.
        one = run("multinode_reference", "fsdp_2b.yaml", widest, size_2b, no_save, batch=1, report=False, log_every=1)
        shutil.rmtree(work / "runs", ignore_errors=True)
        again = run("multinode_reference", "fsdp_2b.yaml", widest, size_2b, no_save, batch=1, report=False,
                    log_every=1)
        shutil.rmtree(work / "runs", ignore_errors=True)
        results, half = {}, widest // 2

        def side(machine, visible):
            flags = common + ["--model_size", size_2b, "--batch_size", 1, "--max_iter", args.iters, "--no-final_save",
                              "--name", "multinode_two_launches", "--logging_iter", 1]
            results[machine] = launch("multi_node_fsdp.yaml", widest, flags, work / f"multinode_{machine}.log", 29690,
                                      {**env, **({} if args.tiny else {"CUDA_VISIBLE_DEVICES": visible})}, machine,
                                      timeout=args.launch_timeout)
        threads = [threading.Thread(target=side, args=(m, ",".join(map(str, range(m * half, (m + 1) * half)))))
                   for m in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        two = parse_log(results.get(0, ""), args.skip)["losses"]
        ref = one["losses"]

        def max_rel(a):
            return max(abs(a[i] - ref[i]) / abs(ref[i]) for i in ref) if a.keys() == ref.keys() and ref else None
        noise, diff = max_rel(again["losses"]), max_rel(two)
        emit({"run": f"multinode 2 launches x {half} vs 1 launch x {widest}",
              "iteration_1_equal": bool(two) and two.get(1) == ref.get(1),
              "max_rel_diff": diff, "same_command_twice_max_rel_diff": noise,
              "within_noise": diff is not None and diff <= max(2 * noise, 1e-5),
              "losses_one_launch": ref, "losses_two_launches": two})

    def fp8():  # one GPU, 2B: bf16 against --fp8 over the same iterations (same data order, noise and sigmas)
        runs = {}
        for name, extra in (("2b_bf16_curve", []), ("2b_fp8_curve", ["--fp8"])):
            runs[name] = run(name, single, 1, size_2b, [*extra, *no_save], log_every=1)
            shutil.rmtree(work / "runs", ignore_errors=True)
        bf16, fp8 = runs["2b_bf16_curve"]["losses"], runs["2b_fp8_curve"]["losses"]
        window = 20
        its = sorted(set(bf16) & set(fp8))
        means = [(statistics.mean(bf16[i] for i in its[k:k + window]), statistics.mean(fp8[i] for i in its[k:k + window]))
                 for k in range(0, len(its) - window + 1, window)]
        emit({"run": f"fp8 vs bf16 loss, {len(its)} iterations", "window": window,
              "fp8_speedup_samples_per_s": runs["2b_fp8_curve"].get("samples_per_s", 0) /
              runs["2b_bf16_curve"].get("samples_per_s", float("inf")),
              "bf16_window_means": [round(a, 5) for a, _ in means], "fp8_window_means": [round(b, 5) for _, b in means],
              "max_rel_diff_window_mean": max(abs(b - a) / abs(a) for a, b in means) if means else None,
              "max_rel_diff_per_iteration": max(abs(fp8[i] - bf16[i]) / abs(bf16[i]) for i in its) if its else None})

    def square(families):  # one GPU at 1024x1024 (Anima's size): LoRA (batch 1) and the full fine-tune recipe
        side = 64 if args.tiny else 1024
        sample_flops = None
        if not args.tiny:  # the DiT's FLOPs at this size (the adapter's are left out: under 1% of a step)
            from cosmos_t2i.models import training_flops_per_sample
            sample_flops = training_flops_per_sample("2B", side, side)
        at_square = ["--image_size", side, side]
        recipes = {"lora": ["--train_architecture", "lora", *no_save], "full": no_save}
        for name in families:
            data_flags = []
            if name == "anima":
                anima_data, qwen_vae = make_anima_dataset(work, n_images, side, side, size_2b)
                data_flags = ["--family", "anima", "--vae_path", qwen_vae, "--dataset_dir", anima_data]
            for recipe, extra in recipes.items():
                run(f"{name}_{recipe}_1gpu_{side}", single, 1, size_2b, [*data_flags, *at_square, *extra],
                    batch=1 if recipe == "lora" else args.batch_size, sample_flops=sample_flops)
                shutil.rmtree(work / "runs", ignore_errors=True)

    sets = {"scaling": scaling, "stall": stall, "reshard": reshard, "14b": fourteen, "14b_nvidia": fourteen_nvidia,
            "lora": lambda: lora(size_2b), "lora14b": lambda: lora(size_14b), "lora14b_fp8": lora_fp8, "lowmem": lowmem,
            "multinode": multinode, "fp8": fp8, "14b_fp8": fourteen_fp8,
            "anima": lambda: square(["anima"]), "predict2_square": lambda: square(["predict2"])}
    for name in args.runs:
        try:
            sets[name]()
        except RuntimeError as e:  # report and go on with the next set
            emit({"run": name, "failed": str(e)[-1500:]})


if __name__ == "__main__":
    main()
