"""What start-up finds in a run's checkpoint folder: whether a checkpoint can be resumed from, which one to resume
from (the pointer honoured, newer complete ones kept), and what interrupted saves left that is proven incomplete and
may go. Nothing here deletes a checkpoint whose parts all load (docs/preemption.md)."""

import logging
import shutil
from pathlib import Path

import torch

from . import shards
from .checkpoint import (LATEST, iter_name, latest_iteration, latest_iteration_or_none, remove_checkpoint,
                         saved_iterations, shards_dir)

logger = logging.getLogger(__name__)


def checkpoint_problem(ckpt_dir, iteration: int) -> str | None:
    """Why the checkpoint of `iteration` cannot be resumed from (a part missing, truncated or unreadable), or None.

    The model file may be absent (a stop save writes only what a resume needs; it is built from the shards later);
    if present it must load. Cheap: files are opened and their indexes read, tensor data is not.
    """
    ckpt_dir = Path(ckpt_dir)
    for part in ("trainer", "scheduler", "model"):
        path = ckpt_dir / part / iter_name(iteration)
        if not path.is_file():
            if part == "model":
                continue
            return f"{path} is missing"
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=part == "model")
        except Exception as e:
            return f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]})"
    folder = shards_dir(ckpt_dir, iteration)
    try:
        storage = shards.read_metadata(folder).storage_data
    except shards.UnsafeCheckpointError as e:
        return str(e)
    except Exception as e:
        return f"{folder} has no readable .metadata ({type(e).__name__})"
    for info in storage.values():
        path = folder / info.relative_path
        if not path.is_file() or path.stat().st_size < info.offset + info.length:
            return f"{path} is missing or truncated"
    return None


def resume_point(ckpt_dir, start_over: bool = False) -> int | None:
    """The checkpoint to resume from: the one latest_checkpoint.txt names if it is usable, else the newest usable one
    no newer than it, else the newest usable one at all (a pointer naming a missing iteration). None for a fresh run.

    When checkpoints exist but none is usable, raise SystemExit listing each and why, unless `start_over`. Nothing is
    deleted here; newer usable checkpoints than the pointer (a rollback by hand) are kept and named.
    """
    ckpt_dir = Path(ckpt_dir)
    try:
        pointer = latest_iteration(ckpt_dir)
    except ValueError as e:
        logger.warning("%s; looking for the newest complete checkpoint instead", e)
        pointer = None
    found = sorted(set(saved_iterations(ckpt_dir)) | ({pointer} if pointer is not None else set()), reverse=True)
    problems = {}  # checked as needed, newest first: usually the pointer's checkpoint alone

    def usable(i):
        if i not in problems:
            problems[i] = checkpoint_problem(ckpt_dir, i)
        return problems[i] is None
    chosen = next((i for i in found if (pointer is None or i <= pointer) and usable(i)), None)
    if chosen is None:
        chosen = next((i for i in found if usable(i)), None)
    newer = [i for i in found if chosen is not None and i > chosen and usable(i)]
    for i, problem in problems.items():
        if problem is not None and (chosen is None or i > chosen or i == pointer):
            logger.warning("checkpoint of iteration %d cannot be used: %s", i, problem)
    if chosen is None:
        if found and not start_over:
            raise SystemExit(f"{ckpt_dir}: none of the {len(found)} checkpoints can be resumed from: " + "; ".join(
                f"iteration {i}: {p}" for i, p in problems.items()) + ". Repair or restore one, or pass --start_over "
                "to train from iteration 0 in this folder (existing files are kept until saves replace them).")
        return None
    if chosen != pointer:
        logger.warning("resuming from the newest complete checkpoint, iteration %d", chosen)
    if newer:
        logger.warning("%s names iteration %d, but newer complete checkpoints exist (%s): resuming from %d as it says. "
                       "They are kept until this run saves past them (then --keep_last prunes them, or a save of the "
                       "same iteration replaces it); to resume from the newest instead, write %s into %s.",
                       LATEST, chosen, ", ".join(map(str, sorted(newer))), chosen, iter_name(max(newer)),
                       ckpt_dir / LATEST)
    return chosen


def remove_leftovers(ckpt_dir) -> None:
    """Delete what interrupted saves left, and only what is proven incomplete: temporary files, shard folders without
    their .metadata (DCP writes it last), and the parts of an iteration whose save never reached its trainer part
    (written last before the pointer) and that cannot be resumed from. Usable checkpoints are never touched."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return
    for tmp in [*ckpt_dir.glob(".*.tmp*"), *ckpt_dir.glob("*/.*.tmp*"), *ckpt_dir.glob("optim/*/.*.tmp*")]:
        logger.info("removing %s, left by an interrupted save", tmp)
        tmp.unlink(missing_ok=True)
    pointer = latest_iteration_or_none(ckpt_dir)
    for iteration in saved_iterations(ckpt_dir):
        folder = shards_dir(ckpt_dir, iteration)
        if iteration == pointer:  # an interrupted save never moved the pointer: whatever is here, it is not that
            continue
        if not (ckpt_dir / "trainer" / iter_name(iteration)).is_file() and checkpoint_problem(ckpt_dir, iteration):
            logger.info("removing the checkpoint parts of iteration %d, left by a save that did not complete", iteration)
            remove_checkpoint(ckpt_dir, iteration)
        elif folder.is_dir() and not (folder / ".metadata").is_file():
            logger.info("removing %s, shards of a save that did not complete", folder)
            shutil.rmtree(folder, ignore_errors=True)
