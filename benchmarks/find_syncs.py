"""Where the training script makes the host wait for the GPU: every synchronising CUDA call, by call site.

    python benchmarks/find_syncs.py                      # a random 2B, synthetic 768x1360 data, batch 2, 8 iterations
    python benchmarks/find_syncs.py --dit_path ... --dataset_dir ... --max_iter 8 ...   # the script's own flags

Runs train_text2image.py in this process with the given flags (without any: the first line's run, its data made
under /tmp/cosmos_find_syncs as benchmarks/bench_multi_gpu.py makes it) under
torch.cuda.set_sync_debug_mode("warn") and prints, most frequent first, each distinct stack of this repository's
and diffusers' frames that led to a sync, with how many times it ran. A site that runs once per iteration (count = --max_iter, or a multiple) stalls every
step: after it the GPU's queue is empty, and the GPU idles until the host has launched enough work again. Start-up
syncs (loading, compiling, the latent cache) show up with small counts. Needs a GPU.
"""

import collections
import logging
import runpy
import sys
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main():
    if "-h" in sys.argv or "--help" in sys.argv:
        print(__doc__)
        return
    import torch
    if not torch.cuda.is_available():
        raise SystemExit("find_syncs.py needs a CUDA GPU: it lists the GPU syncs of a training run.")
    sites, show = collections.Counter(), warnings.showwarning
    roots = (str(ROOT), "diffusers")

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if any(r in f.filename for r in roots)
                  and not f.filename.endswith("find_syncs.py")]
        sites[" <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))] += 1

    warnings.showwarning = record
    logging.captureWarnings = lambda capture: None  # libraries that route warnings to logging would drop the hook
    warnings.simplefilter("always")
    flags = sys.argv[1:]
    if not flags:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_multi_gpu import make_dataset
        work = Path("/tmp/cosmos_find_syncs")
        data, vae = make_dataset(work, 48, 768, 1360)
        flags = ["--dit_path", "random", "--model_size", "2B", "--dataset_dir", str(data), "--vae_path", str(vae),
                 "--image_size", "768", "1360", "--cache_latents", "--compile", "--batch_size", "2", "--max_iter", "8",
                 "--save_iter", "1000", "--no-final_save", "--report_to", "none", "--output_root", str(work / "runs"),
                 "--name", "syncs"]
    torch.cuda.set_sync_debug_mode("warn")
    sys.argv = [str(ROOT / "train_text2image.py"), *flags]
    sys.path.insert(0, str(ROOT))
    try:
        runpy.run_path(str(ROOT / "train_text2image.py"), run_name="__main__")
    finally:
        torch.cuda.set_sync_debug_mode(0)
        print(f"{sum(sites.values())} synchronising calls at {len(sites)} call sites:")
        for site, count in sites.most_common(40):
            print(f"{count:6d}  {site or '(no frame of this repository or diffusers)'}")


if __name__ == "__main__":
    main()
