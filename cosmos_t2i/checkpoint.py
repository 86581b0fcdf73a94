"""Everything about a run's checkpoints: what goes into each part, where, when it is complete, and restore.

    checkpoints/
      model/iter_000001000.pt      one consolidated NVIDIA-layout file (net.* bf16, net_ema.* fp32; LoRA: adapters)
      optim/iter_000001000/        torch.distributed.checkpoint folder: each process's shards of the fp32 master
                                   weights of what trains, the optimizer state and the EMA shadow
      scheduler/iter_000001000.pt  LR scheduler state
      trainer/iter_000001000.pt    iteration, data position, RNG, optimizer hyper-parameters
      latest_checkpoint.txt        iter_000001000.pt, written only once every part above is on disk

The training script uses `Checkpointer.save(iteration, trainer_state)` and `Checkpointer.restore(iteration)`.
Saves run in the background: each process copies its shards to host memory (the only stall), the writes go on
in threads, the model file is then built on the main process from the written shards block by block, and
`latest_checkpoint.txt` moves last. A kill at any moment leaves the previous checkpoint complete and latest.
"""

import logging
import mmap
import os
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from .files import atomic_write, fsync_dir, temporary_name
from .weight_files import diffusers_to_nvidia_key

PARTS = ("model", "optim", "scheduler", "trainer")
LATEST = "latest_checkpoint.txt"
logger = logging.getLogger(__name__)
# one process without torch.distributed is a supported case, not a warning
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def checkpoint_dir(output_root, project, group, name) -> Path:
    """OUTPUT_ROOT/PROJECT/GROUP/NAME/checkpoints."""
    return Path(output_root) / project / group / name / "checkpoints"


def iter_name(iteration: int) -> str:
    """`iter_000001000.pt`."""
    return f"iter_{iteration:09d}.pt"


def model_file(ckpt_dir, iteration: int) -> Path:
    return Path(ckpt_dir) / "model" / iter_name(iteration)


def shards_dir(ckpt_dir, iteration: int) -> Path:
    """The torch.distributed.checkpoint folder of one iteration (optim/iter_000001000/)."""
    return Path(ckpt_dir) / "optim" / iter_name(iteration).removesuffix(".pt")


def atomic_save(obj, path) -> None:
    """torch.save to a temporary name in the same folder, fsync, then rename: never a truncated file."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_text(path, text: str) -> None:
    """Write a small text file atomically and durably."""
    with atomic_write(path, "w") as f:
        f.write(text)


def latest_iteration(ckpt_dir) -> int | None:
    """The iteration named in latest_checkpoint.txt, or None for a fresh run."""
    path = Path(ckpt_dir) / LATEST
    if not path.exists():
        return None
    name = path.read_text().strip()
    try:
        return int(name.removeprefix("iter_").removesuffix(".pt"))
    except ValueError:
        raise ValueError(f"{path}: unreadable ({name!r}); expected e.g. iter_000001000.pt.") from None


def load_part(ckpt_dir, part: str, iteration: int):
    """One of the single-file parts (model, scheduler, trainer), read with weights_only=True."""
    return torch.load(Path(ckpt_dir) / part / iter_name(iteration), map_location="cpu", weights_only=True)


def resolve_model_file(path) -> Path:
    """A model file from itself, a run folder, or its checkpoints/ folder (then the latest iteration)."""
    path = Path(path)
    if path.is_file():
        return path
    for ckpt in (path, path / "checkpoints"):
        if (ckpt / LATEST).exists():
            return model_file(ckpt, latest_iteration(ckpt))
    raise FileNotFoundError(f"{path}: neither a model file nor a training run folder (no {LATEST}).")


def prune(ckpt_dir, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    done = sorted(int(p.stem.removeprefix("iter_")) for p in (ckpt_dir / "model").glob("iter_*.pt"))
    for old in done[:-keep_last]:
        for part in ("model", "scheduler", "trainer"):
            (ckpt_dir / part / iter_name(old)).unlink(missing_ok=True)
        shutil.rmtree(shards_dir(ckpt_dir, old), ignore_errors=True)


def checkpoint_problem(ckpt_dir, iteration: int) -> str | None:
    """Why the checkpoint of `iteration` cannot be resumed from (a part missing, truncated or unreadable), or None.

    Cheap: files are opened and their indexes read, tensor data is not (the model file is memory-mapped).
    """
    ckpt_dir = Path(ckpt_dir)
    for part in ("trainer", "scheduler", "model"):
        path = ckpt_dir / part / iter_name(iteration)
        if not path.is_file():
            return f"{path} is missing"
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=part == "model")
        except Exception as e:
            return f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    folder = shards_dir(ckpt_dir, iteration)
    try:
        storage = dcp.FileSystemReader(str(folder)).read_metadata().storage_data
    except Exception as e:
        return f"{folder} has no readable .metadata ({type(e).__name__})"
    for info in storage.values():
        path = folder / info.relative_path
        if not path.is_file() or path.stat().st_size < info.offset + info.length:
            return f"{path} is missing or truncated"
    return None


def resume_point(ckpt_dir) -> int | None:
    """The newest complete checkpoint no newer than latest_checkpoint.txt (or the newest at all if the pointer is
    gone); each newer one that is incomplete is named in a warning. None for a fresh run."""
    ckpt_dir = Path(ckpt_dir)
    try:
        pointer = latest_iteration(ckpt_dir)
    except ValueError as e:
        logger.warning("%s; looking for the newest complete checkpoint instead", e)
        pointer = None
    found = {int(p.name.removeprefix("iter_").removesuffix(".pt")) for part in ("model", "trainer")
             for p in (ckpt_dir / part).glob("iter_*.pt")} | ({pointer} if pointer is not None else set())
    for iteration in sorted((i for i in found if pointer is None or i <= pointer), reverse=True):
        problem = checkpoint_problem(ckpt_dir, iteration)
        if problem is None:
            if iteration != pointer:
                logger.warning("resuming from the newest complete checkpoint, iteration %d", iteration)
            return iteration
        logger.warning("checkpoint of iteration %d cannot be used: %s", iteration, problem)
    return None


def remove_leftovers(ckpt_dir) -> None:
    """Delete what interrupted saves left: temporary files, and parts of checkpoints newer than the one
    latest_checkpoint.txt names (a save that never completed). Complete or damaged older ones are left alone."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for tmp in [*ckpt_dir.glob(".*.tmp*"), *ckpt_dir.glob("*/.*.tmp*")]:
        logger.info("removing %s, left by an interrupted save", tmp)
        tmp.unlink(missing_ok=True)
    try:
        pointer = latest_iteration(ckpt_dir)
    except ValueError:
        return
    incomplete = {}  # with no pointer yet, only parts of saves that never completed go
    for part in ("model", "scheduler", "trainer", "optim"):
        for path in (ckpt_dir / part).glob("iter_*"):
            iteration = int(path.name.removeprefix("iter_").removesuffix(".pt"))
            if pointer is None and iteration not in incomplete:
                incomplete[iteration] = checkpoint_problem(ckpt_dir, iteration) is not None
            if (iteration > pointer) if pointer is not None else incomplete[iteration]:
                logger.info("removing %s, part of a save that did not complete", path)
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


# ---------------------------------------------------------------- sharded training state
def canonical_name(name: str) -> str:
    """Parameter name without compile or activation-checkpoint wrappers or PEFT's adapter name (model-file keys)."""
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "").replace(".default", "")


def read_shards(folder, prefix: str, keys=None) -> dict:
    """Full tensors of `prefix.*` entries (model, ema) of a shards folder, on one process without collectives.

    `keys` limits the read (the model-file writer goes block by block); the result is keyed without the prefix.
    """
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    wanted = {k[len(prefix) + 1:]: m for k, m in metadata.items() if k.startswith(prefix + ".")
              and hasattr(m, "size") and (keys is None or k[len(prefix) + 1:] in keys)}
    out = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in wanted.items()}
    if out:
        dcp.load({prefix: out}, checkpoint_id=str(folder), no_dist=True)
    return out


def _block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "transformer_blocks" else parts[0]


def write_model_file(folder, path, lora_metadata: dict | None = None) -> None:
    """Build model/iter_*.pt (NVIDIA layout) from a shards folder, holding one transformer block at a time.

    The file is first written with torch.save as a skeleton without tensor data, then memory-mapped and filled
    block by block, so neither the full model nor the optimizer state is ever in one process's memory.
    """
    metadata = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata
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


class Checkpointer:
    """Saves and restores one run's checkpoints; every process creates one and calls save/restore together."""

    def __init__(self, ckpt_dir, model, optimizer, scheduler, ema=None, lora_metadata=None, keep_last=None,
                 async_save=True, is_main=True):
        from .distributed import cpu_group, is_portable

        self.dir, self.model, self.optimizer = Path(ckpt_dir), model, optimizer
        self.scheduler, self.ema, self.lora_metadata = scheduler, ema, lora_metadata
        self.keep_last, self.async_save, self.is_main = keep_last, async_save, is_main
        self.portable = is_portable(optimizer)
        self.group = cpu_group()  # DCP's collectives and the wait for the main process's model file
        # one writer for every save, so the pinned host buffers that shards are staged into are reused
        self.writer = dcp.FileSystemWriter(str(self.dir), sync_files=True, thread_count=2,
                                           cache_staged_state_dict=torch.cuda.is_available())
        self._future = None
        self._finisher = None
        self._error = None
        self.last_save_s = 0.0  # how long the last save took from start to latest_checkpoint.txt

    def _state(self) -> tuple[dict, list]:
        from .distributed import optimizer_state, trainable_state

        state = {"model": trainable_state(self.model)}
        param_groups = []
        if self.portable:
            optim = optimizer_state(self.model, self.optimizer)
            state["optim"], param_groups = optim["state"], optim["param_groups"]
        if self.ema is not None:
            state["ema"] = self.ema.tensors()
        return state, param_groups

    def prepare_staging(self) -> None:
        """Allocate the pinned host buffers that background saves copy shards into, once, outside any save.

        Call after the first optimizer step (the optimizer state must exist); without it the first save pays the
        allocation (tens of seconds for tens of GB) as a training stall.
        """
        from .distributed import host_copy_target, local_parts

        if not (self.async_save and torch.cuda.is_available()):
            return
        start = time.perf_counter()
        # DCP's writer copies each save into its state_dict_cache, which it would otherwise allocate itself
        self.writer.state_dict_cache = host_copy_target(self._state()[0], pin=True)
        size = sum(t.numel() * t.element_size() for t in local_parts(list(tensors_in(self.writer.state_dict_cache))))
        size /= 2 ** 30
        logger.info("checkpoint: %.1f GB of pinned host memory per process for background saves, allocated in %.1f s",
                    size, time.perf_counter() - start)

    def save(self, iteration: int, trainer_state: dict, blocking: bool = False) -> None:
        """Start writing the checkpoint of `iteration`; returns once this process's shards are staged, or, with
        `blocking` (the last save before the process exits), once everything is on disk: then the shards are
        written in this thread, so no background writer thread is still winding down when the process exits."""
        self.wait()  # at most one save in flight
        start = time.perf_counter()
        state, param_groups = self._state()
        folder = shards_dir(self.dir, iteration)
        small = {"scheduler": self.scheduler.state_dict(),
                 "trainer": {**trainer_state, "iteration": iteration, "param_groups": param_groups}}
        if not self.portable:  # bitsandbytes' 8-bit state: one unsharded file (its runs are never sharded)
            small["optimizer_8bit"] = _to_cpu(self.optimizer.state_dict())
        if self.async_save and not blocking:
            self._future = dcp.async_save(state, checkpoint_id=str(folder), storage_writer=self.writer,
                                          process_group=self.group)
        else:
            dcp.save(state, checkpoint_id=str(folder), storage_writer=self.writer, process_group=self.group)
        stalled = time.perf_counter() - start
        if self.is_main:
            self._finisher = threading.Thread(target=self._finish, args=(iteration, small, self._future, start,
                                                                       stalled), daemon=False)
            self._finisher.start()
        if blocking or not self.async_save:
            self.wait()

    def _finish(self, iteration, small, future, start, stalled) -> None:
        try:
            if future is not None:
                future.result()
            folder = shards_dir(self.dir, iteration)
            if "optimizer_8bit" in small:
                atomic_save(small.pop("optimizer_8bit"), folder / "optimizer_8bit.pt")
            write_model_file(folder, model_file(self.dir, iteration), self.lora_metadata)
            for part, obj in small.items():
                atomic_save(obj, self.dir / part / iter_name(iteration))
            atomic_write_text(self.dir / LATEST, iter_name(iteration))
            if self.keep_last:
                prune(self.dir, self.keep_last)
            self.last_save_s = time.perf_counter() - start
            logger.info("checkpoint %s: stalled %.2f s, written in %.1f s", iter_name(iteration), stalled,
                        self.last_save_s)
        except BaseException as e:  # reported by the next wait() on the training thread
            self._error = e

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk; re-raise its failure here."""
        if self._future is not None:
            self._future.result()
            self._future = None
        if self._finisher is not None:
            self._finisher.join()
            self._finisher = None
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"saving a checkpoint in {self.dir} failed: {error}") from error

    def wait_everyone(self) -> None:
        """wait(), then every process waits for the others (the main one may still be writing the model file) with
        cpu_group's long timeout: call before processes exit, since a launcher kills the rest as soon as one exits
        with a non-zero code (a stop's 75)."""
        from .distributed import wait_for_everyone

        self.wait()
        wait_for_everyone()

    def restore(self, iteration: int) -> dict:
        """Load the checkpoint of `iteration` into the model, optimizer, scheduler and EMA (in place, each process
        its own shards, whatever process count wrote it); returns the trainer state."""
        from .distributed import load_optimizer_state, load_trainable_state

        trainer = load_part(self.dir, "trainer", iteration)
        state, _ = self._state()
        folder = shards_dir(self.dir, iteration)
        dcp.load(state, checkpoint_id=str(folder), process_group=self.group)
        load_trainable_state(self.model, state["model"])
        if self.portable:
            load_optimizer_state(self.model, self.optimizer, {"state": state["optim"],
                                                              "param_groups": trainer["param_groups"]})
        else:
            self.optimizer.load_state_dict(torch.load(folder / "optimizer_8bit.pt", weights_only=True))
        self.scheduler.load_state_dict(load_part(self.dir, "scheduler", iteration))
        return trainer


def tensors_in(obj):
    """Every tensor in nested dicts."""
    if torch.is_tensor(obj):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v)


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
