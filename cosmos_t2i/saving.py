"""A run's checkpoints as the training loop sees them: the Checkpointer set up once the disk is known to hold its
checkpoints, the resume, periodic and last saves (a failed one said in one line), stops on a signal or unreadable
data, and the end of a run with its exit code (docs/preemption.md lists them)."""

import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from . import checkpoint as ckpt
from .cli import size_text

logger = logging.getLogger("train")


def end_run(accelerator, run_dir, exit_code: int = 0) -> None:
    """Close the trackers and record exit_code in the run folder (job scripts read it there: launchers turn 75 into
    1); a process of a distributed run then waits for its peers at a last barrier and ends here with exit_code,
    without tearing down the process group or the interpreter."""
    from .run_control import record_exit_code

    for tracker in accelerator.trackers:
        tracker.finish()
    if accelerator.is_main_process:
        record_exit_code(run_dir, exit_code)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    torch.distributed.barrier()
    # Every checkpoint is on disk and every peer is past the barrier, so nothing is left to coordinate; tearing the
    # process group and the interpreter down aborted about one in ten 4-process CPU runs ("terminate called
    # without an active exception": a communication thread still joinable when C++ objects are destroyed).
    import atexit
    atexit._run_exitfuncs()  # what a normal exit runs first: the loader workers' end, the run lock's release, logging
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def trainer_state(args, sampler, iteration: int, skipped: int) -> dict:
    """What a resume needs beside the tensors: steps skipped so far, the RNG, and the position in the data."""
    return {"skipped_steps": skipped, "rng": {"torch": torch.get_rng_state()},
            "data_position": {"global_batch_step": iteration * args.grad_accum,
                              "batches_per_epoch": sampler.per_epoch, "samples": sampler.n_samples}}


def make_checkpointer(args, accelerator, t, ckpt_dir, start_iter: int):
    """The run's Checkpointer, once the disk is known to hold its checkpoints; says how long the launcher lets a stop
    save run. Returns (checkpointer, (launcher name, grace seconds or None))."""
    from .distributed import from_main_process
    from .run_control import detect_launcher, grace_advice

    checkpointer = ckpt.Checkpointer(ckpt_dir, t.unwrapped, t.optimizer, t.scheduler, t.ema, t.lora_meta,
                                     args.keep_last, args.async_save, accelerator.is_main_process)
    shards, model = estimate_checkpoint_bytes(t.params, args.optimizer, args.ema, args.train_architecture == "lora")
    checkpointer.expected_bytes = shards + model
    first = start_iter - start_iter % args.save_iter + args.save_iter
    saves = len(range(first, args.max_iter + 1, args.save_iter)) + int(args.final_save and args.max_iter % args.save_iter > 0)
    from_main_process(lambda: check_disk_space(ckpt_dir, shards + model, args.keep_last, max(1, saves)))
    launcher, grace = detect_launcher()
    if grace is not None and accelerator.is_main_process:
        logger.log(logging.WARNING if grace < 10 else logging.INFO,
                   "launcher: %s, which kills the trainer %.0f s after a stop signal (preemption); a stop save writes "
                   "about %s (what a resume needs; the model file follows at the next start). If that takes "
                   "longer, %s.", launcher, grace, size_text(shards), grace_advice(launcher))
    return checkpointer, (launcher, grace)


def resume(args, checkpointer, t, sampler, latest: int) -> None:
    """Restore the checkpoint of `latest` (this command's optimizer settings win), start building its model file if
    a stop save left it out, and say how the saved data position maps onto a dataset that changed since."""
    from .run_control import apply_optimizer_settings

    state = checkpointer.restore(latest)
    from .training import group_lrs

    apply_optimizer_settings(t.optimizer, t.scheduler, group_lrs(args, t.optimizer), args.betas, args.eps,
                             args.weight_decay)
    torch.set_rng_state(state["rng"]["torch"])
    checkpointer.build_model_file(latest)
    saved = state.get("data_position", {})
    before, before_samples = saved.get("batches_per_epoch"), saved.get("samples")
    if (before is not None and before != sampler.per_epoch) or (before_samples not in (None, sampler.n_samples)):
        step = latest * args.grad_accum
        logger.warning("the data changed since the checkpoint: %s samples, %s global batches per epoch then; %d, %d "
                       "now. The run goes on at global batch %d, which is now batch %d of epoch %d (the order is drawn "
                       "anew from the current samples, so some samples of this epoch may be seen twice or not at "
                       "all).", before_samples if before_samples is not None else "?", before, sampler.n_samples,
                       sampler.per_epoch, step, step % sampler.per_epoch, step // sampler.per_epoch)
    logger.info("resumed from %s at iteration %d", checkpointer.dir, latest)


def save(checkpointer, iteration: int, state: dict, blocking: bool = False, with_model_file: bool = True) -> None:
    """Checkpointer.save; if the save before it failed (found when this one waits for it), say so once and still
    try this one. Raises SaveFailed only for this iteration's save, on every process alike."""
    for attempt in range(2):
        try:
            checkpointer.save(iteration, state, blocking=blocking, with_model_file=with_model_file)
            return
        except ckpt.SaveFailed as e:
            if e.iteration == iteration or attempt:
                raise
            if checkpointer.is_main:  # every process has it; one says it
                logger.warning("%s", e)


def save_or_warn(checkpointer, iteration: int, state: dict) -> None:
    """A periodic save: if it fails, say so in one line and go on training; the next save tries again."""
    try:
        save(checkpointer, iteration, state)
    except ckpt.SaveFailed as e:
        if checkpointer.is_main:
            logger.warning("%s Training goes on; the next save tries again.", e)


def save_or_exit(accelerator, checkpointer, run_dir, iteration: int | None, state: dict | None) -> None:
    """The last save of a run, on disk before returning (iteration None: at the end, wait for every process and the
    save still in flight); if it fails, the run ends with exit code 74."""
    try:
        if iteration is not None:
            save(checkpointer, iteration, state, blocking=True)  # the process ends right after the last
        else:
            checkpointer.wait_everyone()
    except ckpt.SaveFailed as e:
        raise_save_failed(accelerator, run_dir, e)


def stop_with_checkpoint(accelerator, checkpointer, run_dir, iteration: int, state: dict, reason: str | None):
    """Save `iteration` synchronously and end the run with exit code 75, every process together (they all decided
    to stop at this iteration); reason None means --max_wall_time. Only what a resume needs is written, to fit the
    launcher's grace period (the model file is built at the next start), and no process waits for anything else.
    A failed save ends with exit code 74."""
    from .run_control import STOPPED_EXIT_CODE

    try:
        save(checkpointer, iteration, state, blocking=True, with_model_file=False)
        checkpointer.wait_everyone(join_builder=False)
    except ckpt.SaveFailed as e:
        raise_save_failed(accelerator, run_dir, e)
    accelerator.print(f"stopped ({reason or '--max_wall_time'}) at iteration {iteration}: checkpoint saved in "
                      f"{checkpointer.dir}; run the same command again to resume (exit code {STOPPED_EXIT_CODE}).")
    end_run(accelerator, run_dir, STOPPED_EXIT_CODE)
    raise SystemExit(STOPPED_EXIT_CODE)


DATA_ERROR_EXIT_CODE = 65  # EX_DATAERR: a sample could not be read; the state before it is saved


def stop_on_unreadable_data(accelerator, checkpointer, run_dir, iteration: int, problems: list[str], state: dict):
    """A sample of the step after `iteration` could not be read: save `iteration` (unless this run has it saved
    already), name the file, and end the run with exit code 65 on every process together."""
    for problem in problems:  # only the process that read it knows the file
        logger.error("%s", problem)
    try:
        checkpointer.wait()  # a save in flight: done (or failed) before deciding
        if iteration > 0 and iteration != checkpointer.last_saved:
            save(checkpointer, iteration, state, blocking=True, with_model_file=False)
        checkpointer.wait_everyone(join_builder=False)
    except ckpt.SaveFailed as e:
        raise_save_failed(accelerator, run_dir, e)
    kept = (f"The checkpoint of iteration {iteration} is in {checkpointer.dir}" if checkpointer.last_saved is not None
            else "Nothing was saved yet")
    accelerator.print(f"stopped: a sample of iteration {iteration + 1} could not be read (named above). {kept}; "
                      f"replace or remove the file and run the same command again, or add --skip_incomplete to skip "
                      f"such samples (exit code {DATA_ERROR_EXIT_CODE}).")
    end_run(accelerator, run_dir, DATA_ERROR_EXIT_CODE)
    raise SystemExit(DATA_ERROR_EXIT_CODE)


def raise_save_failed(accelerator, run_dir, error):
    """End the run after a save that had to succeed (a stop or the last one) failed: exit code 74, one line, once
    every process is here (the main one may still be removing the partial checkpoint)."""
    from .distributed import wait_for_everyone
    from .run_control import record_exit_code

    if accelerator.is_main_process:
        record_exit_code(run_dir, ckpt.SAVE_FAILED_EXIT_CODE)
        sys.stderr.write(f"train_text2image.py: {error}\n")
    wait_for_everyone()
    sys.exit(ckpt.SAVE_FAILED_EXIT_CODE)


def estimate_checkpoint_bytes(params, optimizer: str, ema: bool, lora: bool) -> tuple[int, int]:
    """Bytes of one checkpoint's shards (weights as trained, two optimizer moments, EMA) and of its model file (bf16
    weights for a full fine-tune, fp32 adapters for LoRA, and the fp32 EMA)."""
    shards = model = 0
    for p in params:
        moments = 2 * (1 if optimizer == "adamw8bit" else p.element_size())
        shards += p.numel() * (p.element_size() + moments + (4 if ema else 0))
        model += p.numel() * ((4 if lora else 2) + (4 if ema else 0))
    return shards, model


def check_disk_space(ckpt_dir, expected_bytes: int, keep_last: int | None, saves_planned: int) -> None:
    """Refuse to start when one checkpoint does not fit the free space under ckpt_dir; warn when the checkpoints
    kept at once (--keep_last + 1 while a save is written, or every planned one) do not."""
    folder = Path(ckpt_dir)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if free < expected_bytes:
        raise SystemExit(f"{ckpt_dir}: one checkpoint needs about {size_text(expected_bytes)} but the disk holding "
                         f"it has {size_text(free)} free. Free space or choose another --output_root.")
    kept_at_once = min(keep_last + 1, saves_planned) if keep_last else saves_planned
    existing = len(ckpt.saved_iterations(ckpt_dir))
    if kept_at_once > existing and free < (kept_at_once - existing) * expected_bytes:
        logger.warning("the disk under %s has %s free: room for %d more checkpoints of about %s, but this run "
                       "keeps up to %d at once%s; saves past that will fail (the run goes on). Free space or set "
                       "--keep_last.", ckpt_dir, size_text(free), free // expected_bytes, size_text(expected_bytes),
                       kept_at_once, f" (--keep_last {keep_last} + the one being written)" if keep_last else "")
