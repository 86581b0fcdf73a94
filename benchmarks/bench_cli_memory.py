"""Peak GPU memory of `infer_text2image.py` itself, 2B at 1360x768, with the T5-11B encoder in 8 bits and offloaded.

    python benchmarks/bench_cli_memory.py [--work /tmp/cosmos_cli] [--variants offload_8bit resident_bf16]

Writes randomly initialised weights at the real shapes into --work (a 2B diffusers transformer folder, a Wan2.1
VAE folder, a T5-11B encoder folder with the tiny example's tokenizer: about 30 GB of disk), then runs the CLI as a
user would and reads its own log line ("N image(s): X s per image ...; GPU peak A GB allocated, R GB reserved").
One JSON line per variant.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {
    "offload_8bit": ["--offload_text_encoder", "--text_encoder_8bit"],
    "offload_bf16": ["--offload_text_encoder"],
    "resident_8bit": ["--text_encoder_8bit"],
    "resident_bf16": [],
}


def write_models(work: Path) -> dict:
    """Random-weight folders at the real shapes (kept between runs)."""
    import shutil

    import torch
    from bench_infer import t5_11b
    from diffusers import AutoencoderKLWan

    from cosmos_t2i.models import new_transformer

    paths = {"dit": work / "dit_2b", "vae": work / "vae", "t5": work / "t5_11b"}
    if not (paths["dit"] / "config.json").exists():
        new_transformer("2B", torch.bfloat16, "cuda").save_pretrained(paths["dit"])
    if not (paths["vae"] / "config.json").exists():
        AutoencoderKLWan().to(torch.bfloat16).save_pretrained(paths["vae"])
    if not (paths["t5"] / "config.json").exists():
        t5_11b("cuda").save_pretrained(paths["t5"])
        tiny = work / "tiny"  # a locally built tokenizer (no network); its ids fall inside T5's vocabulary
        subprocess.run([sys.executable, "examples/tiny/make_assets.py", "--output_dir", tiny], cwd=ROOT, check=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tiny / "models" / "text_encoder" / name, paths["t5"] / name)
    torch.cuda.empty_cache()
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/cosmos_cli")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["offload_8bit", "resident_bf16"])
    parser.add_argument("--num_images", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    paths = {k: str(v) for k, v in write_models(work).items()}
    from common import report
    for variant in args.variants:
        cmd = [sys.executable, "infer_text2image.py", "--dit_path", paths["dit"], "--vae_path", paths["vae"],
               "--text_encoder", paths["t5"], "--prompt", "a robot arm stacking red cubes in a bright warehouse",
               "--save_path", str(work / f"{variant}.jpg"), "--num_images", str(args.num_images),
               *VARIANTS[variant]]
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        found = re.search(r"(\d+) image\(s\): ([\d.]+) s per image.*GPU peak ([\d.]+) GB allocated, ([\d.]+) GB "
                          r"reserved", result.stderr)
        line = {"bench": "infer_cli_memory", "model_size": "2B", "size": "1360x768", "variant": variant,
                "flags": " ".join(VARIANTS[variant])}
        if result.returncode != 0 or not found:
            line["failed"] = result.stderr[-1500:]
        else:
            line.update(sec_per_image=float(found.group(2)), gpu_peak_allocated_gb=float(found.group(3)),
                        gpu_peak_reserved_gb=float(found.group(4)))
        report(line)


if __name__ == "__main__":
    main()
