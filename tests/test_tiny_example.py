"""The embedded tiny example shows that the pipeline learns: its VAE really reconstructs, and a minute of training
turns "a red circle on a blue background" into red shapes on blue (and likewise for the other class)."""

import sys

import numpy as np
import torch
from conftest import ROOT, run_script

sys.path.insert(0, str(ROOT / "examples" / "tiny"))
from make_assets import CLASSES  # noqa: E402
from train_vae import new_vae, reconstruction_mse, shape_images  # noqa: E402


def colour_shares(image) -> np.ndarray:
    """Share of pixels nearest to each class colour, in the order red, blue, yellow, green (fg, bg per class)."""
    colours = np.array([c for spec in CLASSES for c in (spec["fg"], spec["bg"])], dtype=float)
    pixels = np.asarray(image.convert("RGB"), dtype=float).reshape(-1, 1, 3)
    nearest = ((pixels - colours[None]) ** 2).sum(-1).argmin(1)
    return np.bincount(nearest, minlength=len(colours)) / len(nearest)


def test_tiny_vae_reconstructs_unseen_shapes(tiny_bundle):
    from diffusers import AutoencoderKLWan
    images = shape_images(8, seed=7)  # drawn afresh: not the images it was trained on
    trained = AutoencoderKLWan.from_pretrained(tiny_bundle / "models" / "vae").eval()
    torch.manual_seed(0)
    error, untrained = reconstruction_mse(trained, images), reconstruction_mse(new_vae().eval(), images)
    assert error < 0.03 < 0.1 < untrained, (error, untrained)  # pixels in [-1, 1]: PSNR above 21 dB


def test_example_config_learns_each_class(tiny_bundle, tmp_path):
    """examples/tiny/train.yaml as run.sh uses it, then one image per class through the pipeline."""
    from cosmos_t2i.pipeline import CosmosText2Image
    run_script("train_text2image.py", "--config", ROOT / "examples" / "tiny" / "train.yaml",
               "--dit_path", tiny_bundle / "models" / "transformer", "--vae_path", tiny_bundle / "models" / "vae",
               "--dataset_dir", tiny_bundle / "dataset", "--output_root", tmp_path)
    pipe = CosmosText2Image.from_pretrained(tmp_path / "posttraining" / "text2image" / "tiny", tiny_bundle / "models" /
                                            "vae", tiny_bundle / "models" / "text_encoder", load_ema=True,
                                            device="cpu", dtype=torch.float32)
    images = pipe([spec["caption"] for spec in CLASSES], height=64, width=64)
    for c, image in enumerate(images):
        shares = colour_shares(image)
        fg, bg, others = shares[2 * c], shares[2 * c + 1], np.delete(shares, [2 * c, 2 * c + 1]).sum()
        assert 0.03 < fg < 0.5 and bg > 0.45 and others < 0.05, (CLASSES[c]["caption"], shares)
