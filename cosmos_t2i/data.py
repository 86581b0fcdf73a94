"""The seed's dataset layout (images/, metas/, t5_xxl/) as a checked, deterministic torch Dataset (notes section 6)."""

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .t5 import pad_embedding, read_embedding

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
RESIZE_MODES = ("resize", "center_crop")
logger = logging.getLogger(__name__)


def _listing(paths, limit=5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return f"{shown}{f' (and {len(paths) - limit} more)' if len(paths) > limit else ''}"


def list_images(dataset_dir) -> list[Path]:
    """Images under dataset_dir/images with an accepted extension (any case), sorted by name."""
    image_dir = Path(dataset_dir) / "images"
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir} does not exist. A dataset folder holds images/, metas/ (one .txt "
                                "caption per image) and, after precompute_t5.py, t5_xxl/.")
    images = sorted(p for p in image_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"{image_dir} holds no .jpg/.jpeg/.png/.webp images.")
    return images


def find_samples(dataset_dir, skip_incomplete: bool = False) -> list[dict]:
    """Pair each image with its caption and embedding; report every incomplete sample at once.

    Raises one error listing what is missing or malformed (first few and a count) unless skip_incomplete,
    in which case those samples are dropped with a warning.
    """
    root = Path(dataset_dir)
    samples, problems = [], []
    for image in list_images(root):
        caption = root / "metas" / f"{image.stem}.txt"
        embedding = root / "t5_xxl" / f"{image.stem}.pickle"
        if not caption.is_file():
            problems.append(f"{image.name}: no caption {caption}")
        elif not embedding.is_file():
            problems.append(f"{image.name}: no embedding {embedding}")
        else:
            try:
                read_embedding(embedding)
            except ValueError as e:
                problems.append(str(e).split(". Rerun")[0])
                continue
            samples.append({"name": image.stem, "image": image, "caption": caption, "embedding": embedding})
    if problems and not skip_incomplete:
        raise ValueError(f"{root}: {len(problems)} of {len(problems) + len(samples)} samples are incomplete: "
                         f"{_listing(problems)}. Fix: write a caption per image in metas/<name>.txt, run "
                         f"`python precompute_t5.py --dataset_path {root}`, or pass --skip_incomplete to train "
                         "on the complete ones.")
    if problems:
        logger.warning("%s: skipping %d incomplete samples (%s)", root, len(problems), _listing(problems, 3))
    if not samples:
        raise ValueError(f"{root}: no complete samples (image + metas/*.txt + t5_xxl/*.pickle).")
    logger.info("%s: %d samples", root, len(samples))
    return samples


def load_image(path) -> torch.Tensor:
    """Decode an image to uint8 [3, H, W]; a corrupt file raises an error naming it."""
    try:
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    except Exception as e:
        raise ValueError(f"{path}: cannot decode image ({e}). Replace or remove the file.") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def resize_image(image: torch.Tensor, size: tuple[int, int], mode: str = "resize") -> torch.Tensor:
    """uint8 [3,h,w] -> float [3,H,W] in [-1, 1].

    "resize" is NVIDIA's: straight to (H, W), antialiased, aspect not kept. "center_crop" scales the shortest
    side to fit, then crops the centre, so nothing is distorted.
    """
    import torchvision.transforms.functional as TF

    height, width = size
    x = image.float() / 255.0
    if mode == "resize":
        x = TF.resize(x, [height, width], antialias=True)
    elif mode == "center_crop":
        scale = max(height / x.shape[1], width / x.shape[2])
        new_size = [max(height, round(x.shape[1] * scale)), max(width, round(x.shape[2] * scale))]
        x = TF.center_crop(TF.resize(x, new_size, antialias=True), [height, width])
    else:
        raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {mode!r}")
    return x.clamp(0, 1) * 2 - 1


class ImageDataset(torch.utils.data.Dataset):
    """NVIDIA's sample dict: images [3,H,W] in [-1,1], t5_text_embeddings [512,1024], masks, fps, ..."""

    def __init__(self, dataset_dir, image_size=(768, 1360), resize_mode: str = "resize",
                 skip_incomplete: bool = False):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if any(s % 16 for s in image_size):
            raise ValueError(f"image_size {tuple(image_size)} must be multiples of 16 (height width).")
        self.samples = find_samples(dataset_dir, skip_incomplete)
        self.image_size = tuple(image_size)
        self.resize_mode = resize_mode

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        embedding, mask = pad_embedding(read_embedding(sample["embedding"]))
        height, width = self.image_size
        return {
            "images": resize_image(load_image(sample["image"]), self.image_size, self.resize_mode),
            "t5_text_embeddings": embedding,
            "t5_text_mask": mask,
            "padding_mask": torch.zeros(1, height, width),
            "fps": 16,
            "image_size": torch.tensor([height, width, height, width]),
            "num_frames": 1,
            "index": index,
            "name": sample["name"],
        }
