"""How long `infer_text2image.py --compile` waits before its first image: a cold compile cache, then warm.

    python benchmarks/bench_compile_warmup.py [--model_size 2B]

Runs the CLI itself twice on a randomly initialised DiT at the real shape, 1360x768, 35 steps with guidance,
three images each, with TORCHINDUCTOR_CACHE_DIR pointing at a fresh folder for the first run and the same folder
for the second (the CLI keeps torch's caches there, as it would between a user's runs). The text encoder is the
tiny bundle's (its 1024-wide output is the T5-11B's format), so what is timed is the DiT and the VAE. Prints one
JSON line with the first image's seconds (compile included) for each run, the steady seconds per image, and their
difference: the wait that compilation adds.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from common import report  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="2B")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cosmos_warmup_"))
    subprocess.run([sys.executable, str(ROOT / "examples/tiny/make_assets.py"), "--output_dir", str(work / "tiny")],
                   check=True, capture_output=True)
    import torch
    from diffusers import AutoencoderKLWan
    AutoencoderKLWan().to(torch.bfloat16).save_pretrained(work / "vae")  # Wan2.1's shape, random weights
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor_cache"))
    result = {"bench": "compile_warmup", "model_size": args.model_size}
    for run in ("cold_cache", "warm_cache"):
        out = subprocess.run([sys.executable, str(ROOT / "infer_text2image.py"), "--model_size", args.model_size,
                              "--vae_path", str(work / "vae"), "--text_encoder", str(work / "tiny/models/text_encoder"),
                              "--prompt", "a red circle on a blue background", "--num_images", "3", "--compile",
                              "--save_path", str(work / run / "image.jpg")], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        found = re.search(r"(\d+) image\(s\): ([\d.]+) s per image after the first \(([\d.]+) s\)", out.stderr)
        result[f"first_image_s_{run}"] = float(found.group(3))
        result[f"s_per_image_{run}"] = float(found.group(2))
        # what compilation adds to the first image: its time less a steady image's
        result[f"compile_wait_s_{run}"] = result[f"first_image_s_{run}"] - result[f"s_per_image_{run}"]
    report(result)


if __name__ == "__main__":
    main()
