"""What `--fp8` costs in quality, measured where a difference could show: the tiny example trained the same way
with and without float8 matmuls, from the same start, on the same data order and noise. Needs a GPU with float8
tensor cores (H100/H200). Prints one JSON line per comparison and appends them to results.jsonl.

    python benchmarks/fp8_quality.py [--iters 300] [--work /tmp/cosmos_fp8_quality]

Runs of train_text2image.py on examples/tiny's assets (built in --work; 16 captioned images, the 2-block tiny DiT,
64x64, batch 4, lr 1e-3, the example's own settings), each from the example's random start:
  bf16          --mixed_precision bf16 (the reference)
  bf16_compile  --mixed_precision bf16 --compile: compile alone, so that fp8's cost is not confused with it
  fp8           --mixed_precision bf16 --compile --fp8 (torchao Float8Linear in the blocks' projections)
  fp32          --mixed_precision no: a precision change the recipe already accepts, the yardstick
For each run against bf16: the distance of its final live and EMA weights from bf16's, over the distance bf16's
travelled from the start (0 = the same model; 1 = as far apart as the whole training moved), the mean loss of the
last quarter, and the PSNR of images sampled from its EMA weights (the example's prompts, same seeds, bf16
sampling) against bf16's. Then inference `--fp8` (float8 e4m3 weights, one scale per row) on bf16's weights
against bf16 sampling of the same weights: where our float8 weight storage stands.
"""

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import report  # noqa: E402

from cosmos_t2i.models import transformer_weights  # noqa: E402

RUNS = {"bf16": ["--mixed_precision", "bf16"],
        "bf16_compile": ["--mixed_precision", "bf16", "--compile"],
        "fp8": ["--mixed_precision", "bf16", "--compile", "--fp8"],
        "fp32": ["--mixed_precision", "no"]}
PROMPTS = ["a red circle on a blue background", "a yellow square on a green background"]


def run(cmd: list, log: Path) -> str:
    with open(log, "w") as f:
        code = subprocess.call([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{text[-3000:]}")
    return text


def train(work: Path, assets: Path, name: str, iters: int) -> dict:
    """Train one run; returns its losses, final live and EMA weights (diffusers names, fp32) and run folder."""
    text = run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--dynamo_backend", "no", *RUNS[name][:2], "train_text2image.py",
                "--config", "examples/tiny/train.yaml", "--dit_path", assets / "models/transformer",
                "--vae_path", assets / "models/vae", "--dataset_dir", assets / "dataset",
                "--output_root", work / "runs", "--name", name, "--max_iter", iters, "--save_iter", iters,
                "--logging_iter", 1, *RUNS[name]], work / f"train_{name}.log")
    losses = [float(x) for x in re.findall(r"iter \d+ loss ([0-9.eE+-]+)", text)]
    folder = work / "runs" / "posttraining" / "text2image" / name
    model_file = folder / "checkpoints" / "model" / f"iter_{iters:09d}.pt"
    live = {k: v.float() for k, v in transformer_weights(model_file, "tiny")[1].items()}
    ema = {k: v.float() for k, v in transformer_weights(model_file, "tiny", load_ema=True)[1].items()}
    return dict(losses=losses, live=live, ema=ema, folder=folder)


def sample(work: Path, assets: Path, folder: Path, tag: str, extra=()) -> list:
    """Images (float arrays) sampled from a run's EMA weights for PROMPTS, seeds fixed, saved as PNG."""
    out = work / "images" / tag
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    batch = [{"prompt": p, "output_image": str(out / f"{i}.png")} for i, p in enumerate(PROMPTS)]
    (out / "batch.json").write_text(json.dumps(batch))
    run([sys.executable, "infer_text2image.py", "--dit_path", folder, "--load_ema", "--vae_path",
         assets / "models/vae", "--text_encoder", assets / "models/text_encoder", "--height", 64, "--width", 64,
         "--batch_input_json", out / "batch.json", "--seed", 0, "--dtype", "bf16", *extra], work / f"infer_{tag}.log")
    return [np.asarray(Image.open(b["output_image"]).convert("RGB"), dtype=np.float64) for b in batch]


def psnr(a: list, b: list) -> float:
    mse = np.mean([np.mean((x - y) ** 2) for x, y in zip(a, b)])
    return float("inf") if mse == 0 else 10 * math.log10(255 ** 2 / mse)


def relative_distance(a: dict, b: dict, start: dict) -> float:
    """|a - b| / |b - start| over every transformer weight."""
    num = sum(((a[k] - b[k]) ** 2).sum() for k in b)
    den = sum(((b[k] - start[k]) ** 2).sum() for k in b)
    return float((num / den).sqrt())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--work", default="/tmp/cosmos_fp8_quality")
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    args = parser.parse_args()
    work = Path(args.work)
    if work.exists() and any(work.iterdir()) and not (work / "assets.log").exists():
        raise SystemExit(f"--work {work} holds files this script did not write: name an empty or new folder.")
    shutil.rmtree(work, ignore_errors=True)
    assets = work / "assets"
    work.mkdir(parents=True)
    run([sys.executable, "examples/tiny/make_assets.py", "--output_dir", assets], work / "assets.log")
    run([sys.executable, "precompute_t5.py", "--dataset_path", assets / "dataset", "--text_encoder",
         assets / "models/text_encoder"], work / "precompute.log")
    start = {k: v.float() for k, v in transformer_weights(assets / "models/transformer", "tiny")[1].items()}
    names = ["bf16", *[n for n in args.runs if n != "bf16"]]
    trained = {n: train(work, assets, n, args.iters) for n in names}
    images = {n: sample(work, assets, trained[n]["folder"], n) for n in names}
    reference = trained["bf16"]
    quarter = max(1, args.iters // 4)
    common = dict(bench="fp8_quality", model_size="tiny", image_size="64x64", iters=args.iters, batch_size=4,
                  prompts=len(PROMPTS))
    for name in names:
        run_ = trained[name]
        line = dict(common, run=name, flags=" ".join(RUNS[name]),
                    mean_loss_last_quarter=float(np.mean(run_["losses"][-quarter:])) if run_["losses"] else None)
        if name != "bf16":
            line.update(weights_distance_vs_bf16=relative_distance(run_["live"], reference["live"], start),
                        ema_distance_vs_bf16=relative_distance(run_["ema"], reference["ema"], start),
                        image_psnr_db_vs_bf16=psnr(images[name], images["bf16"]))
        report(line)
    if not torch.cuda.is_available():  # the training runs above work on a CPU (a check of this script)
        return
    fp8_sampled = sample(work, assets, reference["folder"], "bf16_weights_fp8_inference", ["--fp8"])
    report(dict(common, run="fp8_inference", flags="infer_text2image.py --fp8 --dtype bf16 on bf16's EMA weights",
                image_psnr_db_vs_bf16=psnr(fp8_sampled, images["bf16"]),
                image_psnr_db_fp32_training_vs_bf16=psnr(images["fp32"], images["bf16"]) if "fp32" in images
                else None))


if __name__ == "__main__":
    main()
