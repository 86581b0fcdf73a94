"""How long a stop (preemption) takes and whether its checkpoint survives, under each launcher, one JSON line each.

    python benchmarks/bench_stop.py --model_size 2B                 # full recipe: fp32 masters, AdamW, fp32 EMA
    python benchmarks/bench_stop.py --launchers none torchrun --model_size tiny   # a CPU check of the script

Each run starts train_text2image.py (a randomly initialised DiT at the real shape, synthetic data with cached
latents, as bench_multi_gpu.py) in its own process group under the launcher, waits for --stop_at iterations, then
sends SIGTERM to the whole group, as SLURM and Kubernetes do on preemption. Reported: seconds from the signal to the
last process's exit, exit code, whether the stopped iteration's checkpoint is complete, and the save time and the
launcher line the script itself logged. Each run's folder is deleted before the next (a 2B checkpoint's shards are
about 32 GB).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

LAUNCHERS = {"none": [], "accelerate": ["-m", "accelerate.commands.launch", "--num_processes", "1",
                                        "--mixed_precision", "bf16", "--dynamo_backend", "no"],
             "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29681"]}


def alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.append(pid)
    return out


def one_run(launcher: str, work: Path, data: Path, vae: Path, args) -> dict:
    from bench_multi_gpu import descendants

    from cosmos_t2i import checkpoint as ckpt
    from cosmos_t2i import run_folder

    out = work / f"run_{launcher}"
    shutil.rmtree(out, ignore_errors=True)
    log = work / f"{launcher}.log"
    flags = ["--model_size", args.model_size, "--dit_path", "random", "--vae_path", vae, "--dataset_dir", data,
             "--image_size", args.size, args.size, "--cache_latents", "--num_workers", 2, "--report_to", "none",
             "--max_iter", 100000, "--save_iter", 100000, "--cycle_lengths", 100000, "--logging_iter", 1,
             "--hit_thres", 0, "--output_root", out, "--name", "stop", "--batch_size", 1]
    if args.model_size == "tiny":
        flags += ["--mixed_precision", "no"]
    command = [sys.executable, *LAUNCHERS[launcher], "train_text2image.py", *map(str, flags)]
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + args.timeout
    while time.time() < deadline and proc.poll() is None:
        if any(int(i) >= args.stop_at for i in re.findall(r"iter (\d+) loss", log.read_text())):
            break
        time.sleep(0.5)
    pids = [proc.pid, *descendants(proc.pid)]
    signalled = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    code = proc.wait()
    while alive(pids) and time.time() - signalled < 300:
        time.sleep(0.1)
    gone_s = time.time() - signalled
    text = log.read_text()
    run_log = out / "posttraining" / "text2image" / "stop" / "train.log"
    text += run_log.read_text() if run_log.exists() else ""
    d = ckpt.checkpoint_dir(out, "posttraining", "text2image", "stop")
    latest = ckpt.latest_iteration_or_none(d)
    saved = re.findall(r"checkpoint iter_\d+\.pt: stalled ([\d.]+) s, written in ([\d.]+) s", text)
    launcher_line = re.search(r"launcher: ([^\n]*)", text)
    from importlib.metadata import version

    import torch
    result = {"bench": "stop", "launcher": launcher, "accelerate": version("accelerate"), "model_size": args.model_size,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "exit_code": code,
              "stop_to_exit_s": round(gone_s, 1), "checkpoint_iteration": latest,
              "checkpoint_complete": latest is not None and run_folder.checkpoint_problem(d, latest) is None,
              "stop_save_s": float(saved[-1][1]) if saved else None,
              "launcher_line": launcher_line.group(1)[:200] if launcher_line else None,
              "last_log_line": text.strip().splitlines()[-1][:200]}
    shutil.rmtree(out, ignore_errors=True)
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    p.add_argument("--model_size", default="2B")
    p.add_argument("--size", type=int, default=512, help="image side (the stop time does not depend on it)")
    p.add_argument("--stop_at", type=int, default=6)
    p.add_argument("--timeout", type=float, default=400)
    p.add_argument("--work", default="/tmp/bench_stop")
    args = p.parse_args()
    from bench_multi_gpu import make_dataset

    work = Path(args.work)
    data, vae = make_dataset(work, 8, args.size, args.size)
    for launcher in args.launchers:
        result = one_run(launcher, work, data, vae, args)
        if result["device"] == "cpu":
            print(json.dumps(result), flush=True)
        else:  # with device, torch, date and command, appended to results.jsonl
            from common import report
            report({k: v for k, v in result.items() if k != "device"})


if __name__ == "__main__":
    main()
