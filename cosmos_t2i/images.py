"""Decoding images (reduced when the size they are fitted to is known) and fitting them to a training size."""

import math
import threading

import numpy as np
import torch
from PIL import Image

RESIZE_MODES = ("resize", "center_crop", "pad")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited on white
# decode at least twice the size the fit samples, the default gap of Pillow's thumbnail() and libvips' resize (the
# same two steps: an integer reduction, then a fair resample). 3 is closer still (tests: mean difference 0.8 instead
# of 2.8 levels on hard edges) but, at 768x1360 from 12000x12000, decodes 4 times the pixels and fits 2.4 times slower
REDUCING_GAP = 2
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_BOMB_CHECK = threading.Lock()


def _open(source) -> Image.Image:
    """Image.open without PIL's decompression-bomb check (a warning, an error past twice its limit): the callers
    here read the header or decode a large image reduced, never at a size they did not ask for."""
    with _BOMB_CHECK:  # the limit is a module global: restored before another thread of ours opens a file
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(source)
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def _transposed(img) -> bool:
    """Whether the EXIF orientation the header holds swaps width and height (a PNG without EXIF before its pixels
    is taken as not: its getexif() would decode the whole image to look after them)."""
    if img.format == "PNG" and "exif" not in img.info:
        return False
    return img.getexif().get(0x0112) in TRANSPOSED


def _displayed_size(img) -> tuple[int, int]:
    """(width, height) once EXIF orientation is applied."""
    width, height = img.size
    return (height, width) if _transposed(img) else (width, height)


def image_size(source) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header alone."""
    with _open(source) as img:
        return _displayed_size(img)


def decode_size(size, target, mode: str) -> tuple[int, int]:
    """The smallest (width, height) an image of `size` (width, height) may be decoded at for the fit to
    `target` (height, width): REDUCING_GAP times what the fit samples."""
    (w, h), (height, width) = size, target
    if mode == "resize":
        return width * REDUCING_GAP, height * REDUCING_GAP
    scale = (max if mode == "center_crop" else min)(height / h, width / w)
    return math.ceil(w * scale * REDUCING_GAP), math.ceil(h * scale * REDUCING_GAP)


def reduction(size, target, mode: str) -> int:
    """The integer factor an image of `size` is decoded reduced by for that fit (1: at full size)."""
    need = decode_size(size, target, mode)
    return max(1, min(size[0] // need[0], size[1] // need[1]))


def _reducible(img) -> Image.Image:
    """img in a mode Image.reduce averages correctly (not palette indices, not 1-bit or 16-bit)."""
    if img.mode in ("P", "PA"):
        return img.convert("RGBA" if img.mode == "PA" or "transparency" in img.info else "RGB")
    if img.mode == "1":
        return img.convert("L")
    return img.convert("I") if img.mode.startswith("I;16") else img


def _reduced(img, target, mode: str) -> Image.Image:
    """img decoded reduced for the fit to target: JPEG's DCT scaling (1/2 to 1/8) at decode, then Image.reduce.

    A side that is not a multiple of the reduction would end in a pixel averaged over less (or padded) source,
    which the fit would stretch like a whole one: less than one reduced pixel is left out instead (JPEG's at the
    right and bottom, Image.reduce's split between both sides).
    """
    need = decode_size(_displayed_size(img), target, mode)
    need = need[::-1] if _transposed(img) else need
    drafted = img.draft(img.mode, need)  # JPEG only; other formats ignore it and return None
    exact = [math.floor(side) for side in (drafted[1][2:] if drafted else img.size)]
    factor = min(exact[0] // need[0], exact[1] // need[1])
    if factor >= 2:
        left, top = exact[0] % factor // 2, exact[1] % factor // 2
        return _reducible(img).reduce(factor, (left, top, left + exact[0] // factor * factor,
                                               top + exact[1] // factor * factor))
    return img.crop((0, 0, *exact)) if tuple(exact) != img.size else img


def load_image(path, name=None, size=None, mode: str = "resize") -> torch.Tensor:
    """Decode an image to uint8 [3, H, W]; a corrupt file raises a one-line ValueError naming it and the fix.

    With `size` (height, width) and `mode`, the fit it is decoded for, a large image is decoded reduced (see
    decode_size). EXIF orientation is applied; 16-bit greyscale is scaled to 8 bits (not clipped to white); images
    with transparency are composited on BACKGROUND.
    """
    from PIL import ImageOps

    try:
        with _open(path) as img:
            if size is not None:
                img = _reduced(img, size, mode)
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                grey = np.asarray(img, dtype=np.float64)
                img = Image.fromarray(np.clip(grey / 257.0 + 0.5, 0, 255).astype(np.uint8), "L")
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                rgba = img.convert("RGBA")
                img = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
                img.alpha_composite(rgba)
            array = np.asarray(img.convert("RGB"))
    except Exception as e:
        reason = " ".join(str(e).split())[:160]  # one short line: the fix after it must survive a truncated log line
        raise ValueError(f"{name or path}: cannot decode image ({reason}). Replace or remove the file.") from e
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def _fit_sides(h: int, w: int, size, mode: str) -> tuple[float, float]:
    """The unrounded (height, width) the fit of an h x w image to size resizes to: the whole target ("resize"),
    the centred source box kept ("center_crop") or the image inside the padding ("pad")."""
    height, width = size
    if mode == "resize":
        return height, width
    if mode == "center_crop":
        scale = min(h / height, w / width)
        return height * scale, width * scale
    if mode == "pad":
        scale = min(height / h, width / w)
        return h * scale, w * scale
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def fit_geometry(h: int, w: int, size, mode: str) -> tuple[int, int]:
    """_fit_sides rounded, each side at least one pixel and at most what it is taken from or fitted into."""
    bounds = (h, w) if mode == "center_crop" else size
    return tuple(min(bound, max(1, round(side))) for side, bound in zip(_fit_sides(h, w, size, mode), bounds))


def thin_side(h: int, w: int, size, mode: str) -> bool:
    """Whether a side of that fit rounds to no pixel (kept at one: mostly padding, or a stretched sliver)."""
    return min(round(side) for side in _fit_sides(h, w, size, mode)) == 0


def fit_image(image: torch.Tensor, size: tuple[int, int], mode: str = "resize"):
    """uint8 [3,h,w] -> (float [3,H,W] in [-1,1], padding mask [1,H,W]); any h, w >= 1 in every mode.

    "resize" is NVIDIA's: straight to (H, W), antialiased, aspect not kept. "center_crop" crops the centre to
    the target's aspect and scales it. "pad" scales to fit inside and reflection-pads, with the mask 1 on padded
    pixels (as NVIDIA's pre-training augmentor does).
    """
    import torch.nn.functional as F
    import torchvision.transforms.functional as TF

    height, width = size
    x = image.float() / 255.0
    mask = torch.zeros(1, height, width)
    h, w = fit_geometry(x.shape[1], x.shape[2], size, mode)
    if mode == "resize":
        x = TF.resize(x, [height, width], antialias=True)
    elif mode == "center_crop":  # crop first: a thin image never becomes a huge intermediate
        top, left = (x.shape[1] - h) // 2, (x.shape[2] - w) // 2
        x = TF.resize(x[:, top:top + h, left:left + w], [height, width], antialias=True)
    else:
        x = TF.resize(x, [h, w], antialias=True)
        top, left = (height - h) // 2, (width - w) // 2
        pads = (left, width - w - left, top, height - h - top)
        # reflection needs the pad smaller than the image; fall back to replicate for extreme aspects
        x = F.pad(x[None], pads, mode="reflect" if max(pads[:2]) < w and max(pads[2:]) < h else "replicate")[0]
        mask[:] = 1
        mask[:, top:top + h, left:left + w] = 0
    return x.clamp(0, 1) * 2 - 1, mask


def resize_image(image: torch.Tensor, size, mode: str = "resize") -> torch.Tensor:
    """fit_image without the mask."""
    return fit_image(image, size, mode)[0]
