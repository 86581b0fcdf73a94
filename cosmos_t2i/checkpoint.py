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
import shutil
import threading
import time
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from . import shards
from .files import atomic_write
from .shards import canonical_name, read_shards, tensors_in, write_model_file  # noqa: F401 (callers reach them here)

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
    """A model file from itself, a run folder, or its checkpoints/ folder (then the latest iteration's, built from its
    shards first if a stop save left it out)."""
    path = Path(path)
    if path.is_file():
        return path
    for ckpt in (path, path / "checkpoints"):
        if (ckpt / LATEST).exists():
            iteration = latest_iteration(ckpt)
            if not model_file(ckpt, iteration).is_file() and (shards_dir(ckpt, iteration) / ".metadata").is_file():
                logger.info("building %s from the shards of the stop save", model_file(ckpt, iteration))
                model_file_from_shards(ckpt, iteration)
            return model_file(ckpt, iteration)
    raise FileNotFoundError(f"{path}: neither a model file nor a training run folder (no {LATEST}).")


def model_file_from_shards(ckpt_dir, iteration: int) -> None:
    """Write the model file of a checkpoint saved without one (a stop save) from its shards; a LoRA's metadata comes
    from the trainer part."""
    lora = load_part(ckpt_dir, "trainer", iteration).get("lora_metadata")
    write_model_file(shards_dir(ckpt_dir, iteration), model_file(ckpt_dir, iteration), lora)


def saved_iterations(ckpt_dir) -> list[int]:
    """Every iteration with any part on disk (complete or not), ascending."""
    found = {int(p.name.removeprefix("iter_").removesuffix(".pt")) for part in PARTS
             for p in (Path(ckpt_dir) / part).glob("iter_*") if p.name.removeprefix("iter_").removesuffix(".pt").isdigit()}
    return sorted(found)


def remove_checkpoint(ckpt_dir, iteration: int) -> None:
    """Delete every part of one iteration's checkpoint."""
    for part in ("trainer", "scheduler", "model"):  # the trainer part first: what is left then reads as incomplete
        (Path(ckpt_dir) / part / iter_name(iteration)).unlink(missing_ok=True)
        for tmp in (Path(ckpt_dir) / part).glob(f".{iter_name(iteration)}.tmp*"):
            tmp.unlink(missing_ok=True)
    shutil.rmtree(shards_dir(ckpt_dir, iteration), ignore_errors=True)


def prune(ckpt_dir, keep_last: int, newest: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints up to `newest` (the one just saved). Newer ones, left
    by a run rolled back by hand, stay until the run saves past them."""
    ckpt_dir = Path(ckpt_dir)
    done = [i for i in saved_iterations(ckpt_dir) if i <= newest and (ckpt_dir / "trainer" / iter_name(i)).is_file()]
    for old in done[:-keep_last]:
        remove_checkpoint(ckpt_dir, old)


def latest_iteration_or_none(ckpt_dir) -> int | None:
    try:
        return latest_iteration(ckpt_dir)
    except ValueError:
        return None


SAVE_FAILED_EXIT_CODE = 74  # EX_IOERR: a stop or final save could not be written (the previous checkpoint is intact)


class SaveFailed(Exception):
    """A checkpoint could not be written; its partial files are gone and the pointer still names the previous one."""

    def __init__(self, ckpt_dir, iteration, error, expected_bytes=None):
        from .cli import describe, size_text

        free = shutil.disk_usage(ckpt_dir).free if Path(ckpt_dir).exists() else None
        latest = latest_iteration_or_none(ckpt_dir)
        need = f"a checkpoint needs about {size_text(expected_bytes)}, " if expected_bytes else ""
        room = f"{size_text(free)} free" if free is not None else "free space unknown"
        self.iteration = iteration
        super().__init__(
            f"checkpoint {iter_name(iteration)} not saved ({describe(error)}) on the disk of {ckpt_dir}: {need}"
            f"{room}; {iter_name(latest) if latest is not None else 'no checkpoint'} stays the latest. Free space, "
            "lower --keep_last or choose another --output_root.")


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
        self._future = self._finisher = self._error = self._builder = self._iteration = None
        self.last_saved = None  # the iteration of the newest checkpoint this run has completed or resumed from
        self.expected_bytes = None  # a checkpoint's estimated size, for the message when a save fails
        self.last_save_s = 0.0  # how long the last save took from start to latest_checkpoint.txt

    def _state(self) -> tuple[dict, list]:
        from .distributed import optimizer_state, trainable_state

        # a LoRA run saves what trains; a full fine-tune the whole model, frozen parts included (Anima's text adapter
        # when it does not train), so its model file is the complete model
        state = {"model": trainable_state(self.model, frozen_too=self.lora_metadata is None)}
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

    def save(self, iteration: int, trainer_state: dict, blocking: bool = False, with_model_file: bool = True) -> None:
        """Start writing the checkpoint of `iteration`; returns once this process's shards are staged, or, with
        `blocking` (the last save before the process exits), once everything is on disk: then the shards are
        written in this thread, so no background writer thread is still winding down when the process exits.

        Without `with_model_file` (stop saves, which must fit a launcher's grace period) only what a resume needs is
        written; the model file is built from the shards at the next start (build_model_file) or by export.
        A failed save raises SaveFailed from this call or the next wait(), on every process alike."""
        self.wait()  # at most one save in flight
        start = time.perf_counter()
        state, param_groups = self._state()
        folder = shards_dir(self.dir, iteration)
        stale_trainer = self.dir / "trainer" / iter_name(iteration)
        if self.is_main and stale_trainer.is_file():  # before any shard is written (DCP plans collectively first)
            logger.warning("replacing the checkpoint of iteration %d left from before the rollback", iteration)
            stale_trainer.unlink()  # from here on the old parts read as incomplete, never mixed with the new ones
        small = {"scheduler": self.scheduler.state_dict(),
                 "trainer": {**trainer_state, "iteration": iteration, "param_groups": param_groups,
                             "lora_metadata": self.lora_metadata}}  # to build a model file from the shards later
        if not self.portable:  # bitsandbytes' 8-bit state: one unsharded file (its runs are never sharded)
            small["optimizer_8bit"] = _to_cpu(self.optimizer.state_dict())
        self._iteration = iteration
        try:
            self._future = self._write_shards(state, folder, background=self.async_save and not blocking)
        except BaseException as e:  # torch's CheckpointException derives from BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            self._error = e
        stalled = time.perf_counter() - start
        if self.is_main and self._error is None:
            self._finisher = threading.Thread(target=self._finish, args=(iteration, small, self._future, start,
                                                                       stalled, with_model_file), daemon=False)
            self._finisher.start()
        if blocking or not self.async_save or self._error is not None:
            self.wait()

    def _write_shards(self, state: dict, folder, background: bool):
        """Every process's shards into `folder`: in the background (returns DCP's future) or now (returns None)."""
        if background:
            try:
                return dcp.async_save(state, checkpoint_id=str(folder), storage_writer=self.writer,
                                      process_group=self.group)
            except Exception as e:  # staging failed here alone (before any collective): the other processes' saves
                logger.warning("background save into %s could not stage (%s); writing it synchronously", folder, e)
        dcp.save(state, checkpoint_id=str(folder), storage_writer=self.writer, process_group=self.group)
        return None

    def _finish(self, iteration, small, future, start, stalled, with_model_file) -> None:
        try:
            if future is not None:
                future.result()
            folder = shards_dir(self.dir, iteration)
            if "optimizer_8bit" in small:
                atomic_save(small.pop("optimizer_8bit"), folder / "optimizer_8bit.pt")
            if with_model_file:
                write_model_file(folder, model_file(self.dir, iteration), self.lora_metadata)
            else:
                model_file(self.dir, iteration).unlink(missing_ok=True)  # one left from before a rollback
            for part, obj in small.items():
                atomic_save(obj, self.dir / part / iter_name(iteration))
            atomic_write_text(self.dir / LATEST, iter_name(iteration))
        except BaseException as e:  # reported by the next wait() on the training thread
            self._error = e
            return
        self.last_save_s = time.perf_counter() - start
        logger.info("checkpoint %s: stalled %.2f s, written in %.1f s%s", iter_name(iteration), stalled,
                    self.last_save_s, "" if with_model_file else " (its model file is built at the next start)")
        if self.keep_last and with_model_file:  # a stop save leaves pruning to the next start's saves: no waiting
            self.join_builder()  # it reads shards that pruning may remove
            try:
                prune(self.dir, self.keep_last, iteration)
            except OSError as e:
                logger.warning("could not remove old checkpoints (%s); they stay on disk", e)

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete on disk. If it failed on any process, every process
        removes nothing that was complete, the main one deletes the partial checkpoint, and all raise SaveFailed."""
        if self._future is not None:
            try:
                self._future.result()
            except BaseException as e:
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                self._error = self._error or e
            self._future = None
        if self._finisher is not None:
            self._finisher.join()
            self._finisher = None
        failed = self._error is not None
        if failed and self.is_main and latest_iteration_or_none(self.dir) == self._iteration:
            logger.warning("checkpoint %s is complete, but writing it ended with %s", iter_name(self._iteration),
                           self._error)
            failed, self._error = False, None  # what failed came after the pointer moved (fsync of its folder)
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # the same answer everywhere
            flag = torch.tensor([float(failed)])
            torch.distributed.all_reduce(flag, group=self.group)
            failed = bool(flag.item())
        if not failed:
            if self._iteration is not None:
                self.last_saved = self._iteration
            return
        error, self._error, iteration = self._error, None, self._iteration
        self._iteration = None
        if self.is_main and latest_iteration_or_none(self.dir) != iteration:
            remove_checkpoint(self.dir, iteration)
        raise SaveFailed(self.dir, iteration, error, self.expected_bytes)

    def build_model_file(self, iteration: int) -> None:
        """Main process: write the model file of a checkpoint saved without one (a stop save), in a background
        thread; training does not need it (it resumes from the shards)."""
        if not self.is_main or model_file(self.dir, iteration).is_file():
            return

        def build():
            try:
                model_file_from_shards(self.dir, iteration)
                logger.info("wrote %s from the shards of the stop save", model_file(self.dir, iteration))
            except Exception as e:
                logger.warning("could not write %s from its shards (%s); the next start tries again",
                               model_file(self.dir, iteration), e)
        logger.info("building %s from the shards of the stop save, in the background", model_file(self.dir, iteration))
        # a daemon: a stop does not wait for it (the next start builds it again; its temporary file is removed)
        self._builder = threading.Thread(target=build, name="model-file-builder", daemon=True)
        self._builder.start()

    def join_builder(self) -> None:
        if self._builder is not None:
            self._builder.join()
            self._builder = None

    def wait_everyone(self, join_builder: bool = True) -> None:
        """wait(), then every process waits for the others (the main one may still be writing the model file) with
        cpu_group's long timeout: call before processes exit, since a launcher kills the rest as soon as one exits
        with a non-zero code (a stop's 75). A stop passes join_builder=False: it does not wait for a model file
        being built from the checkpoint it resumed from."""
        from .distributed import wait_for_everyone

        self.wait()
        if join_builder:
            self.join_builder()
        wait_for_everyone()

    def restore(self, iteration: int) -> dict:
        """Load the checkpoint of `iteration` into the model, optimizer, scheduler and EMA (in place, each process
        its own shards, whatever process count wrote it); returns the trainer state."""
        from .distributed import load_optimizer_state, load_trainable_state

        trainer = load_part(self.dir, "trainer", iteration)
        self.last_saved = iteration
        state, _ = self._state()
        folder = shards_dir(self.dir, iteration)
        shards.load(state, folder, process_group=self.group)
        load_trainable_state(self.model, state["model"])
        if self.portable:
            load_optimizer_state(self.model, self.optimizer, {"state": state["optim"],
                                                              "param_groups": trainer["param_groups"]})
        else:
            self.optimizer.load_state_dict(torch.load(folder / "optimizer_8bit.pt", weights_only=True))
        self.scheduler.load_state_dict(load_part(self.dir, "scheduler", iteration))
        return trainer


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
