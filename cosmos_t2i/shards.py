"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP reads a folder's `.metadata` with plain `pickle` and loads entries it stores as bytes with
`torch.load(weights_only=False)`: a crafted run folder (a shared disk, a downloaded checkpoint to start from) would
run its payload while we only look at it. Every read here goes through `reader(folder)` and `PLANNER`: the metadata
through an unpickler that admits only the classes DCP metadata is made of, and byte entries not at all (this project
stores tensors only).
"""

import mmap
import os
import pickle
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from .files import fsync_dir, temporary_name
from .weight_files import diffusers_to_nvidia_key

_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},  # looks a name up among torch's layouts
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset"},
}


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something this project never writes there (possibly crafted to run code)."""


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module, name):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refused to unpickle {module}.{name}; a checkpoint's .metadata holds only "
            "torch.distributed.checkpoint's own classes, so this file may have been made to run code. Delete that "
            "checkpoint folder or restore it from a copy you trust.")


class SafeReader(dcp.FileSystemReader):
    """FileSystemReader whose .metadata is read with _MetadataUnpickler."""

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        path = Path(self.path) / ".metadata"
        with open(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f, path).load()
            except UnsafeCheckpointError:
                raise
            except Exception as e:
                raise ValueError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
        if not isinstance(metadata, Metadata):
            raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not checkpoint metadata.")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that refuses entries stored as pickled bytes instead of unpickling them."""

    def load_bytes(self, read_item, value):
        raise UnsafeCheckpointError(
            f"checkpoint entry {read_item.dest_index.fqn!r} is stored as pickled bytes, which this project never "
            "writes; refusing to unpickle it (the checkpoint may have been made to run code).")


def tensors_in(obj):
    """Every tensor in nested dicts."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)


def reader(folder) -> SafeReader:
    return SafeReader(str(folder))


def read_metadata(folder):
    """The folder's DCP metadata, read safely."""
    return reader(folder).read_metadata()


def load(state: dict, folder, **kwargs) -> None:
    """dcp.load into `state` (in place) through SafeReader and SafePlanner; a refusal is raised as itself, not inside
    torch's CheckpointException (a BaseException that `except Exception` misses)."""
    from torch.distributed.checkpoint.api import CheckpointException

    from .cli import first_failure

    try:
        dcp.load(state, storage_reader=reader(folder), planner=SafePlanner(), **kwargs)
    except CheckpointException as e:
        inner = first_failure(e)
        if isinstance(inner, Exception):
            raise inner from None
        raise RuntimeError(f"{folder}: {e}") from None


# ---------------------------------------------------------------- the model file, built from the shards
def canonical_name(name: str) -> str:
    """Parameter name without compile or activation-checkpoint wrappers or PEFT's adapter name (model-file keys)."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "").replace(".default", "")


def read_shards(folder, prefix: str, keys=None) -> dict:
    """Full tensors of `prefix.*` entries (model, ema) of a shards folder, on one process without collectives.

    `keys` limits the read (the model-file writer goes block by block); the result is keyed without the prefix.
    """
    metadata = read_metadata(folder).state_dict_metadata
    wanted = {k[len(prefix) + 1:]: m for k, m in metadata.items() if k.startswith(prefix + ".")
              and hasattr(m, "size") and (keys is None or k[len(prefix) + 1:] in keys)}
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in wanted.items()}
    if out:
        load({prefix: out}, folder, no_dist=True)
    return out


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "transformer_blocks" else parts[0]


def write_model_file(folder, path, lora_metadata: dict | None = None) -> None:
    """Build model/iter_*.pt (NVIDIA layout) from a shards folder, holding one transformer block at a time.

    The file is first written with torch.save as a skeleton without tensor data, then memory-mapped and filled
    block by block, so neither the full model nor the optimizer state is ever in one process's memory.
    """
    metadata = read_metadata(folder).state_dict_metadata
    net_dtype = torch.float32 if lora_metadata is not None else torch.bfloat16
    layout = {}  # file key -> (shards prefix, shards key, shape, dtype)
    for key, m in metadata.items():
        prefix, _, name = key.partition(".")
        if prefix in ("model", "ema") and hasattr(m, "size"):
            file_key = ("net." if prefix == "model" else "net_ema.") + diffusers_to_nvidia_key(canonical_name(name))
            layout[file_key] = (prefix, name, tuple(m.size), net_dtype if prefix == "model" else torch.float32)
    skeleton = {k: torch.empty(shape, dtype=dtype) for k, (_, _, shape, dtype) in layout.items()}  # never touched
    if lora_metadata is not None:
        skeleton["lora_metadata"] = lora_metadata
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with torch.serialization.skip_data():
            torch.save(skeleton, tmp)
        del skeleton
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):  # writes go to the file
            target = torch.load(tmp, mmap=True, weights_only=True)
        blocks = {}
        for file_key, (prefix, name, _, _) in layout.items():
            blocks.setdefault(_block_of(name), []).append((file_key, prefix, name))
        for entries in blocks.values():
            for prefix in ("model", "ema"):
                names = {name for _, p, name in entries if p == prefix}
                values = read_shards(folder, prefix, names) if names else {}
                for file_key, p, name in entries:
                    if p == prefix:
                        target[file_key].copy_(values[name])
        del target
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
