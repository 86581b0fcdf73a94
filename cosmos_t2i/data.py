"""Training data: the seed's folder layout or a Hugging Face dataset, one size or aspect-ratio buckets.

Either source yields NVIDIA's sample dict: images [3,H,W] in [-1,1], t5_text_embeddings
[512,1024], t5_text_mask, padding_mask [1,H,W], ... With a latent cache it yields `latents` instead of images.
The text entries are the model family's (families.py): Anima's samples carry its adapter's inputs instead.
Every sample also carries "unreadable" (see ImageDataset.__getitem__). Decoding and fitting images: images.py.
"""

import bisect
import io
import logging
import math
import traceback
from pathlib import Path

import torch
from PIL import Image

from .files import atomic_write
from .images import RESIZE_MODES, fit_image, image_size, load_image, reduction, thin_side
from .images import BACKGROUND, resize_image  # noqa: F401  (imported from here before images.py existed)
from .registry import RESOLUTIONS
from .families import PREDICT2

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}
# the start check decodes for a small fit: a large JPEG at 1/8 scale (every coefficient is still read, so a
# damaged or truncated file fails as it would whole), other formats whole, then reduced
CHECK_SIZE = (64, 64)
EMBEDDING_COLUMN = PREDICT2.text.COLUMN  # Predict2's column, named here before families existed
logger = logging.getLogger(__name__)


def _listing(paths, limit=5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return f"{shown}{f' (and {len(paths) - limit} more)' if len(paths) > limit else ''}"


# ---------------------------------------------------------------- the seed's folder layout
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


def find_samples(dataset_dir, skip_incomplete: bool = False, family=PREDICT2) -> list[dict]:
    """Pair each image with its caption and pre-computed text (the family's); report every incomplete sample at once.

    Raises one error listing what is missing or malformed (first few and a count) unless skip_incomplete,
    in which case those samples are dropped with a warning.
    """
    root = Path(dataset_dir)
    samples, problems = [], []
    images = list_images(root)
    stems = {}
    for image in images:
        stems.setdefault(image.stem, []).append(image.name)
    clashes = [" and ".join(names) for names in stems.values() if len(names) > 1]
    if clashes:
        raise ValueError(f"{root / 'images'}: images share a name, so they would share one caption and embedding: "
                         f"{_listing(clashes)}. Rename or remove one of each.")
    text = family.text
    embeddings = {image: root / text.FOLDER / f"{image.stem}{text.SUFFIX}" for image in images}
    present = {image for image, embedding in embeddings.items() if embedding.is_file()}
    unreadable = check_files(images + [embeddings[image] for image in images if image in present], root,
                             root / ".file_check.json", family)
    for image in images:
        caption, embedding = root / "metas" / f"{image.stem}.txt", embeddings[image]
        bad = [unreadable[name] for name in (str(image.relative_to(root)), str(embedding.relative_to(root)))
               if name in unreadable]
        if bad:
            problems.append(bad[0])
        elif not caption.is_file():
            problems.append(f"{image.name}: no caption {caption}")
        elif image not in present:
            problems.append(f"{image.name}: no embedding {embedding}")
        else:
            samples.append({"name": image.stem, "image": image, "caption": caption, "embedding": embedding})
    if problems and not skip_incomplete:
        raise ValueError(f"{root}: {len(problems)} of {len(problems) + len(samples)} samples are incomplete or "
                         f"unreadable: {_listing(problems)}. Fix: replace unreadable images, write a caption per "
                         f"image in metas/<name>.txt, run `python precompute_t5.py --dataset_path {root}"
                         f"{family.precompute_flags}`, or pass --skip_incomplete to train on the complete ones.")
    if problems:
        logger.warning("%s: skipping %d incomplete samples (%s)", root, len(problems), _listing(problems, 3))
    if not samples:
        raise ValueError(f"{root}: no complete samples (image + metas/*.txt + {text.FOLDER}/*{text.SUFFIX}).")
    logger.info("%s: %d samples", root, len(samples))
    return samples


class FolderSource:
    """images/, metas/ and the family's text folder (t5_xxl/ for Predict2) as indexable samples."""

    headers_cheap = True

    def __init__(self, dataset_dir, skip_incomplete=False, family=PREDICT2):
        self.root, self.family = Path(dataset_dir), family
        self.samples = find_samples(dataset_dir, skip_incomplete, family)

    def __len__(self):
        return len(self.samples)

    def name(self, i):
        return self.samples[i]["name"]

    def where(self, i) -> str:
        return str(self.samples[i]["image"])

    def image(self, i, size=None, mode="resize") -> torch.Tensor:
        return load_image(self.samples[i]["image"], None, size, mode)

    def image_size(self, i) -> tuple[int, int]:
        """(width, height) as displayed, from the file header, without decoding."""
        return image_size(self.samples[i]["image"])

    def text(self, i):
        return self.family.text.read_text(self.samples[i]["embedding"])

    def version(self, i) -> str:
        """Changes when the image file changes (size and modification time), for the latent cache."""
        stat = self.samples[i]["image"].stat()
        return f"{stat.st_size}-{stat.st_mtime_ns}"


# ---------------------------------------------------------------- Hugging Face datasets
def load_hf_dataset(name: str, split: str = "train"):
    """A `save_to_disk` folder, a local `imagefolder`, or a hub id (the last needs network)."""
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))
    elif path.is_dir():
        ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        ds = datasets.load_dataset(name)
    return ds[split] if isinstance(ds, datasets.DatasetDict) else ds


class HFSource:
    """A datasets.Dataset with an image column and the family's text column that precompute_t5.py adds (`t5_xxl`
    for Predict2)."""

    headers_cheap = False  # a row's header comes with its whole image out of the arrow file

    def __init__(self, dataset_name, image_column="image", split="train", family=PREDICT2):
        self.dataset = load_hf_dataset(dataset_name, split)
        self.root, self.family = Path(dataset_name), family
        column = family.text.COLUMN
        columns = self.dataset.column_names
        if image_column not in columns:
            raise ValueError(f"{dataset_name}: no image column {image_column!r} (columns: {columns}); pass "
                             "--image_column.")
        if column not in columns:
            raise ValueError(f"{dataset_name}: no {column!r} column; run `python precompute_t5.py "
                             f"--dataset_name {dataset_name}{family.precompute_flags}` and train on the dataset it "
                             "writes.")
        self.image_column = image_column
        self.images = self.dataset.cast_column(image_column, _image_feature(decode=False))[image_column]
        # arrays as numpy (fast); bytes as Python bytes: numpy's bytes_ drops trailing zero bytes
        binary = getattr(self.dataset.features[column], "dtype", None) == "binary"
        self.texts = self.dataset.select_columns([column]).with_format(None if binary else "numpy")
        logger.info("%s: %d samples", dataset_name, len(self.dataset))

    def __len__(self):
        return len(self.dataset)

    def name(self, i):
        return f"{i:08d}"

    def where(self, i) -> str:
        return f"{self.root} row {i}"

    def _file(self, i):
        """The row's image bytes as a file, or its path (opened by the reader, so a missing file is named)."""
        entry = self.images[i]
        return io.BytesIO(entry["bytes"]) if entry.get("bytes") else Path(entry["path"])

    def image(self, i, size=None, mode="resize") -> torch.Tensor:
        return load_image(self._file(i), self.where(i), size, mode)

    def image_size(self, i):
        return image_size(self._file(i))

    def text(self, i):
        return self.family.text.from_column(self.texts[i][self.family.text.COLUMN], self.where(i))

    def version(self, i) -> str:
        return f"{self.dataset._fingerprint}-{i}"


def _image_feature(decode):
    import datasets
    return datasets.Image(decode=decode)


# ---------------------------------------------------------------- the check at start
def _check_file(path: Path, family=PREDICT2) -> None:
    """Raise ValueError (its first sentence says what is wrong) unless the image decodes or the text file is valid."""
    if path.parent.name == family.text.FOLDER:
        family.text.read_text(path)
    else:
        load_image(path, None, CHECK_SIZE)


def check_files(paths, root, cache_file, family=PREDICT2) -> dict[str, str]:
    """{path relative to root: problem} for the images that do not decode and embeddings that are malformed.

    Files that passed before with the same size and modification time (recorded in `cache_file`; skipped if it
    cannot be written) are not read again, so a large dataset is read once; the rest are checked by a pool of
    threads (decoding and reading release the GIL), sharing the machine's cores with the other processes on it.
    """
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    cache_file, root = Path(cache_file), Path(root)
    try:
        known = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        known = {}

    def check(path):
        try:
            _check_file(path, family)
            return None
        except ValueError as e:
            return str(e).split(" Replace or remove")[0].split(". Rerun precompute")[0].rstrip(".")

    seen = {}  # relative name -> (path, size-mtime as found before reading: a file changed meanwhile is read again)
    for path in paths:
        stat = path.stat()
        seen[str(path.relative_to(root))] = path, f"{stat.st_size}-{stat.st_mtime_ns}"
    todo = [name for name, (_, key) in seen.items() if known.get(name) != key]
    problems = {}
    if todo:
        from tqdm import tqdm
        processes_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, min(32, (os.cpu_count() or 1) // processes_here))
        with ThreadPoolExecutor(threads) as pool:
            results = tqdm(pool.map(check, [seen[name][0] for name in todo]), total=len(todo),
                           desc="checking images and embeddings", disable=len(todo) < 500)
            for name, problem in zip(todo, results):
                if problem is None:
                    known[name] = seen[name][1]
                else:
                    problems[name] = problem
                    known.pop(name, None)  # an earlier good file of that name no longer vouches for this one
        try:
            with atomic_write(cache_file, "w") as f:
                f.write(json.dumps(known))
        except OSError:
            pass  # a read-only dataset is checked again next time
    return problems


def nearest_bucket(width: int, height: int, resolution: str) -> str:
    """The aspect ratio of NVIDIA's table nearest to width/height (in log aspect)."""
    table = RESOLUTIONS[resolution]
    return min(table, key=lambda k: abs(math.log(width / height) - math.log(table[k][0] / table[k][1])))


# ---------------------------------------------------------------- batching
def global_batches(groups, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's global batches: each group (bucket) shuffled with a generator seeded seed+epoch (for one
    group, DistributedSampler's order), cut into full global batches (incomplete tails dropped), then the
    batches of all buckets shuffled together, so every batch comes from one bucket."""
    generator = torch.Generator().manual_seed(seed + epoch)
    batches = []
    for group in groups:
        order = [group[i] for i in torch.randperm(len(group), generator=generator).tolist()]
        batches += [order[i:i + global_batch] for i in range(0, len(order) - global_batch + 1, global_batch)]
    if len(groups) > 1:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


class ResumableBatchSampler:
    """This process's slice of every global batch, endlessly, from a given global-batch step (for resume)."""

    def __init__(self, groups, batch_size, rank, world, seed, start_step=0):
        self.args = (groups, batch_size * world, seed)
        self.batch_size, self.rank, self.start_step = batch_size, rank, start_step
        self.per_epoch = sum(len(g) // (batch_size * world) for g in groups)
        self.n_samples = sum(len(g) for g in groups)
        if self.per_epoch == 0:
            raise ValueError(f"no bucket holds a full global batch of {batch_size * world} samples: lower "
                             "--batch_size or add data.")

    def __iter__(self):
        step = self.start_step
        while True:
            epoch, k = divmod(step, self.per_epoch)
            batch = global_batches(*self.args, epoch)[k]
            yield batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            step += 1



# ---------------------------------------------------------------- the dataset
class ImageDataset(torch.utils.data.Dataset):
    """Samples from a folder (dataset_dir) or an HF dataset (source=HFSource), at one size or in buckets.

    With `resolution` set, each image goes to the nearest of that class's five aspect ratios and is fitted
    with `resize_mode` ("center_crop" or "pad"); `groups` lists the indices of each bucket. A sample that cannot be
    read during training is replaced by another of its bucket (see __getitem__).
    """

    def __init__(self, dataset_dir=None, image_size=(768, 1360), resize_mode: str = "resize",
                 skip_incomplete: bool = False, resolution: str | None = None, source=None, family=PREDICT2):
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.source = source if source is not None else FolderSource(dataset_dir, skip_incomplete, family)
        self.text_side, self.text_like = family.text, None  # text_like: the last text fields read (placeholders)
        self.resize_mode, self.skip_unreadable = resize_mode, skip_incomplete
        self.latent_cache = None
        self.failed = {}  # index -> the error that made its sample unreadable during training (in this process)
        # each image's size decides its bucket, and tells at start which images fit badly (read where cheap)
        image_sizes = self._header_sizes() if resolution is not None or self.source.headers_cheap else None
        if resolution is None:
            if any(s % 16 for s in image_size):
                raise ValueError(f"image_size {tuple(image_size)} must be multiples of 16 (height width).")
            self.sizes = [tuple(image_size)] * len(self.source)
            self.buckets = ["fixed"] * len(self.source)
        else:
            self.buckets = [nearest_bucket(*size, resolution) for size in image_sizes]
            table = RESOLUTIONS[resolution]
            self.sizes = [(table[b][1], table[b][0]) for b in self.buckets]
        self.group_names = sorted(set(self.buckets))
        self.groups = [[i for i, b in enumerate(self.buckets) if b == name] for name in self.group_names]
        self.histogram = {name: len(g) for name, g in zip(self.group_names, self.groups)}
        if image_sizes is not None:
            self._name_hard_fits(image_sizes)

    def _header_sizes(self) -> list[tuple[int, int]]:
        """Each image's displayed (width, height), read from its header; one error lists those that do not read."""
        sizes, problems = [], []
        for i in range(len(self.source)):
            try:
                sizes.append(self.source.image_size(i))
            except Exception as e:
                problems.append(f"{self.source.where(i)} ({' '.join(str(e).split())})")
        if problems:
            raise ValueError(f"{len(problems)} images cannot be read: {_listing(problems)}. Replace or remove them.")
        return sizes

    def _name_hard_fits(self, image_sizes) -> None:
        """Warn about the images too thin for the fit (a side kept at one pixel) and those PIL calls bombs."""
        thin = []
        for i, (w, h) in enumerate(image_sizes):
            if thin_side(h, w, self.sizes[i], self.resize_mode):
                thin.append(f"{self.source.where(i)} ({w}x{h})")
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                factor = reduction((w, h), self.sizes[i], self.resize_mode)
                logger.warning("%s: %d pixels (%dx%d), over PIL's decompression-bomb limit of %d; it is decoded %s "
                               "for its %dx%d fit", self.source.where(i), w * h, w, h, Image.MAX_IMAGE_PIXELS,
                               f"reduced {factor}x" if factor > 1 else "at full size", *self.sizes[i][::-1])
        if thin:
            logger.warning("%d images are too thin for --resize_mode %s: a side of their fit rounds to under one pixel "
                           "and is kept at one (%s). Crop them, choose another --resize_mode, or remove them.",
                           len(thin), self.resize_mode, _listing(thin))

    def __len__(self):
        return len(self.source)

    def fitted(self, index):
        """(image in [-1,1] fitted to its size, padding mask), a large image decoded reduced."""
        size = self.sizes[index]
        return fit_image(self.source.image(index, size, self.resize_mode), size, self.resize_mode)

    def _read(self, index) -> dict:
        """The sample dict; ValueError (naming the file and the fix) if its image, latents or embedding do not read."""
        height, width = self.sizes[index]
        self.text_like = self.text_side.sample_fields(self.source.text(index))
        sample = {**self.text_like, "fps": 16, "num_frames": 1,
                  "image_size": torch.tensor([height, width, height, width]), "index": index,
                  "name": self.source.name(index), "unreadable": ""}
        if self.latent_cache is not None:
            sample["latents"], sample["padding_mask"] = self.latent_cache.load(index)
        else:
            sample["images"], sample["padding_mask"] = self.fitted(index)
        return sample

    def _fail(self, index, error: ValueError) -> None:
        """Remember that the sample does not read (this process tries it no more); warn once if it is skipped."""
        for e in (error, error.__cause__):  # free what the failed read held (a large image's buffer)
            if e is not None:
                traceback.clear_frames(e.__traceback__)
        self.failed[index] = error
        if self.skip_unreadable:
            logger.warning("%s Skipped for the rest of this run: the next readable sample of its bucket takes its "
                           "place.", " ".join(str(error).split()))

    def __getitem__(self, index):
        """The sample dict; its "unreadable" is "" unless the sample could not be read during training.

        Then (the error remembered, a warning logged once per process under skip_incomplete) the next sample of its
        group that reads, wrapping around, is returned in its place (same size, so the batch stacks and every process's
        collectives still run), with "unreadable" "" under skip_incomplete and otherwise the one-line error naming
        the file and the fix, for the training loop to act on. If none of the group reads: the error is raised under
        skip_incomplete, else a placeholder of zeros carries it.
        """
        if index not in self.failed:
            try:
                return self._read(index)
            except ValueError as e:
                self._fail(index, e)
        group = self.groups[self.group_names.index(self.buckets[index])]
        at = bisect.bisect_left(group, index)  # groups hold their indices in ascending order
        for step in range(1, len(group)):
            other = group[(at + step) % len(group)]
            if other in self.failed:
                continue
            try:
                sample = self._read(other)
            except ValueError as e:
                self._fail(other, e)
                continue
            sample["unreadable"] = "" if self.skip_unreadable else " ".join(str(self.failed[index]).split())
            return sample
        if self.skip_unreadable:
            raise self.failed[index]
        return self._placeholder(index)  # nothing of its group reads: zeros of the right shapes, for a step not taken

    def _placeholder(self, index) -> dict:
        """A sample of zeros shaped like `index`'s, marked unreadable (the training loop saves and stops on it)."""
        height, width = self.sizes[index]
        pixels = {"latents": torch.zeros(16, 1, height // 8, width // 8)} if self.latent_cache is not None else \
            {"images": torch.zeros(3, height, width)}
        return {**self.text_side.placeholder_fields(self.text_like), "fps": 16, "num_frames": 1,
                "image_size": torch.tensor([height, width, height, width]), "index": index,
                "name": self.source.name(index), "unreadable": " ".join(str(self.failed[index]).split()),
                **pixels, "padding_mask": torch.zeros(1, height, width)}
