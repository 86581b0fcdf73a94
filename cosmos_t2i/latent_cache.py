"""Encode each training image once with the VAE; training then reads latents and never loads the encoder.

Entries live in CACHE_ROOT/<key>/<name>.safetensors, where <key> hashes what the latents depend on (fitted size
or bucket table, fit mode, VAE weights) and each entry records its image's version (file size and mtime, or
the dataset fingerprint), so a changed image, size or VAE is re-encoded, never silently reused. The cache is derived
data: an entry that does not load counts as stale and is encoded again.
"""

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from .files import atomic_write
from .models import encode_images, fingerprint

logger = logging.getLogger(__name__)


def cache_key(dataset, vae_path) -> str:
    """Hash of the settings that decide the latents."""
    vae = vae_path  # a pipeline folder: its vae/ alone decides the latents
    if vae is not None and (Path(vae) / "vae" / "config.json").is_file():
        vae = Path(vae) / "vae"
    settings = {"sizes": sorted(set(map(tuple, dataset.sizes))), "fit": dataset.resize_mode,
                "vae": fingerprint(vae), "version": 2}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


class LatentCache:
    """safetensors files of (latents [16,1,h,w] fp32, padding mask) per sample."""

    def __init__(self, root, dataset, vae_path):
        self.dataset = dataset
        self.dir = Path(root) / cache_key(dataset, vae_path)

    def path(self, index) -> Path:
        return self.dir / f"{self.dataset.source.name(index)}.safetensors"

    def is_fresh(self, index) -> bool:
        """Whether the entry exists, reads, and was made from this version of the image."""
        path = self.path(index)
        if not path.exists():
            return False
        try:
            with safe_open(str(path), "pt") as f:
                version = (f.metadata() or {}).get("image_version")
        except Exception as e:  # random bytes, emptied, truncated: SafetensorError, OSError, ...
            logger.warning("%s: damaged latent cache entry (%s); it is encoded again", path, " ".join(str(e).split()))
            return False
        return version == self.dataset.source.version(index)

    def stale(self) -> list[int]:
        """Indices whose entry is missing or was made from another version of the image."""
        return [i for i in range(len(self.dataset)) if not self.is_fresh(i)]

    def load(self, index):
        """(latents, padding mask); a ValueError naming the file if the entry does not load."""
        path = self.path(index)
        try:
            with safe_open(str(path), "pt") as f:
                return f.get_tensor("latents"), f.get_tensor("padding_mask")
        except Exception as e:
            raise ValueError(f"{path}: cannot load the cached latents ({' '.join(str(e).split())[:160]}); the entry is "
                             "encoded again at the next start.") from e

    @torch.no_grad()
    def fill(self, indices, vae, device, batch_size=8, show_progress=True) -> None:
        """Encode the given samples (bf16 VAE, deterministic mean) and write their entries atomically."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for start in tqdm(range(0, len(indices), batch_size), desc="caching latents", disable=not show_progress):
            chunk = indices[start:start + batch_size]
            by_size: dict = {}
            for i in chunk:
                by_size.setdefault(self.dataset.sizes[i], []).append(i)
            for size, group in by_size.items():
                fitted = [self.dataset.fitted(i) for i in group]
                latents = encode_images(vae, torch.stack([f[0] for f in fitted]).to(device))
                for i, latent, (_, mask) in zip(group, latents.cpu(), fitted):
                    with atomic_write(self.path(i)) as f:
                        f.write(save({"latents": latent.contiguous(), "padding_mask": mask.contiguous()},
                                     metadata={"image_version": self.dataset.source.version(i)}))
