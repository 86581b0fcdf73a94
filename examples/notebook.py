# %% [markdown]
# # Sample a trained checkpoint from a notebook
# `pip install -e .` in the repository makes `cosmos_t2i` importable from any folder. Open this file in Jupyter or
# VS Code (cells are marked `# %%`), or run it as a script: `python examples/notebook.py [--prompt ...]`.
# Defaults point at the tiny example's outputs (README's command 1, examples/tiny/run.sh); give your own paths as
# flags or environment variables (COSMOS_DIT_PATH, COSMOS_VAE_PATH, COSMOS_TEXT_ENCODER, COSMOS_PROMPT, COSMOS_OUT).

# %% Settings: flags, else environment variables, else the tiny example's files
import argparse
import os
import sys
from pathlib import Path

import torch

# the repository root (this file's parent's parent; in a notebook without __file__, the current folder's parent)
ROOT = Path(__file__).resolve().parents[1] if "__file__" in globals() else Path.cwd().parent
try:
    import cosmos_t2i  # noqa: F401 (installed by `pip install -e .`)
except ModuleNotFoundError:  # not installed: the checkout this file is in
    sys.path.insert(0, str(ROOT))
from cosmos_t2i.models import quiet_library_logs  # noqa: E402
from cosmos_t2i.pipeline import CosmosText2Image  # noqa: E402

TINY = ROOT / "examples" / "tiny" / "assets" / "models"
p = argparse.ArgumentParser(description="Load a checkpoint with cosmos_t2i and sample one image.")
p.add_argument("--dit_path", default=os.environ.get("COSMOS_DIT_PATH",
                                                    ROOT / "checkpoints" / "posttraining" / "text2image" / "tiny"),
               help="a training run folder, its model/iter_*.pt, or a model file (then give --model_size)")
p.add_argument("--model_size", default=os.environ.get("COSMOS_MODEL_SIZE"), help="e.g. 2B, for bare model files")
p.add_argument("--no_ema", action="store_true", help="the trained weights, not their EMA (files without EMA)")
p.add_argument("--vae_path", default=os.environ.get("COSMOS_VAE_PATH", TINY / "vae"))
p.add_argument("--text_encoder", default=os.environ.get("COSMOS_TEXT_ENCODER", TINY / "text_encoder"))
p.add_argument("--prompt", default=os.environ.get("COSMOS_PROMPT", "a red circle on a blue background"))
p.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("HEIGHT", "WIDTH"),
               help="multiples of 16 (the tiny model was trained at 64 64; 2B at e.g. 768 1360)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default=os.environ.get("COSMOS_OUT", ROOT / "output" / "notebook.png"))
args, _ = p.parse_known_args()  # known only: a Jupyter kernel passes its own arguments

# %% Load the DiT (a run's EMA weights unless --no_ema), the VAE and the text encoder once
quiet_library_logs()  # no dtype-cast notes from diffusers
device = "cuda" if torch.cuda.is_available() else "cpu"
pipe = CosmosText2Image.from_pretrained(
    dit_path=str(args.dit_path), model_size=args.model_size, load_ema=not args.no_ema, vae_path=str(args.vae_path),
    text_encoder=str(args.text_encoder), device=device,
    dtype=torch.bfloat16 if device == "cuda" else torch.float32)

# %% Sample: one PIL image per prompt (settings left out are the family's: NVIDIA's sampler, 35 steps, guidance 4)
height, width = args.size
image = pipe([args.prompt], seed=args.seed, height=height, width=width)[0]

# %% Show it: inline in IPython/Jupyter, else as a PNG file
try:
    get_ipython  # noqa: F821 (defined only inside IPython)
    from IPython.display import display
    display(image)
except NameError:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    print(f"saved {out} ({image.width}x{image.height}) for {args.prompt!r}")
