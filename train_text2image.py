"""Post-train Cosmos-Predict2 Text2Image (full or LoRA) with Accelerate, faithful to NVIDIA's recipe.

    accelerate launch train_text2image.py --config examples/2b_custom_data.yaml
    accelerate launch train_text2image.py --model_size 2B --dit_path model.pt --vae_path tokenizer.pth \\
        --dataset_dir datasets/custom_text2image_dataset --train_architecture lora

Checkpoints go to OUTPUT_ROOT/PROJECT/GROUP/NAME/checkpoints/{model,optim,scheduler,trainer}/iter_*.pt with
latest_checkpoint.txt; running the same command again resumes from there. See README.md.
"""

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i.config import parse_with_config, to_yaml
from cosmos_t2i.families import get_family
from cosmos_t2i.saving import (end_run, make_checkpointer, resume, save_or_exit, save_or_warn, stop_on_unreadable_data,
                               stop_with_checkpoint, trainer_state)
from cosmos_t2i import train_flags
from cosmos_t2i.training import (background_save_ahead, build_data, build_training, embed_validation_prompts,
                                 forward_backward)
from cosmos_t2i.update import finish_update, start_update

logger = logging.getLogger("train")
# Changing these on resume would not continue the same run: refuse rather than silently mix.
SHAPE_KEYS = ("family", "text_adapter_trains", "weight_dtype", "model_size", "train_architecture", "lora_rank",
              "lora_target_modules", "lora_base_dtype", "image_size", "ema", "aspect_buckets", "resolution", "optimizer")


def build_parser():
    """The script's flags (cosmos_t2i/train_flags.py) under its usage text."""
    return train_flags.build_parser(__doc__)


def open_run(args):
    """The Accelerator and logging, then the run folder claimed (one job per folder) and where to resume found, all
    before anything loads: (accelerator, run folder, checkpoints folder, iteration to resume or None), or None for
    a run that already finished (its model file built if a stop save at max_iter left it out)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from cosmos_t2i.cli import log_to_file
    from cosmos_t2i.run_control import check_one_job, check_resume_settings, claim_run, record_exit_code

    ckpt_dir = ckpt.checkpoint_dir(args.output_root, args.project, args.group, args.name)
    run_dir = ckpt_dir.parent
    accelerator = Accelerator(mixed_precision=args.mixed_precision, project_dir=str(run_dir),
                              log_with=None if args.report_to == "none" else args.report_to)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    check_one_job(accelerator)
    set_seed(args.seed + accelerator.process_index)
    latest = claim_run(accelerator, run_dir, ckpt_dir, args.start_over)
    log_to_file(run_dir / ("train.log" if accelerator.is_main_process else f"train.rank{accelerator.process_index}.log"))
    if (latest or 0) >= args.max_iter:
        accelerator.print(f"{ckpt_dir}: already finished at iteration {latest or 0} (max_iter {args.max_iter}).")
        if accelerator.is_main_process:
            ckpt.resolve_model_file(ckpt_dir)
            record_exit_code(run_dir, 0)
        return None
    if latest is not None:
        check_resume_settings(run_dir, to_yaml(args), SHAPE_KEYS, latest, write_history=accelerator.is_main_process)
    return accelerator, run_dir, ckpt_dir, latest


def validate_with_images(args, accelerator, t, vae, validation, iteration: int, run_dir: Path) -> None:
    """--validation_prompts: images of the model as it is now (its EMA weights when EMA is on)."""
    from cosmos_t2i.pipeline import save_validation_images

    with t.ema.applied() if t.ema is not None else contextlib.nullcontext():
        save_validation_images(accelerator, t.unwrapped, vae, validation, iteration, run_dir / "validation",
                               args.image_size, args.validation_steps, args.seed, get_family(args.family))


def main(argv=None):
    from cosmos_t2i.cli import one_line_errors, resilient_output
    from cosmos_t2i.models import quiet_library_logs

    resilient_output()  # a launcher or terminal that went away must not end the run at its next log line
    quiet_library_logs()
    parser = one_line_errors(build_parser())
    args = parse_with_config(parser, argv)
    train_flags.validate(args, parser)
    if args.dryrun:
        print(to_yaml(args))
        return

    if args.compile:
        from cosmos_t2i.models import keep_compile_cache
        keep_compile_cache()
    from cosmos_t2i.monitor import IterationProfiler, Progress, memory_report
    from cosmos_t2i.run_control import StopRequest, WallClock, parse_duration, stop_save_warning

    opened = open_run(args)
    if opened is None:  # finished already
        return
    accelerator, run_dir, ckpt_dir, latest = opened
    start_iter = latest or 0
    dataset, sampler, loader, vae = build_data(args, accelerator, start_iter)
    t = build_training(args, accelerator, len(dataset))
    checkpointer, (launcher, grace_s) = make_checkpointer(args, accelerator, t, ckpt_dir, start_iter)
    if latest is not None:
        resume(args, checkpointer, t, sampler, latest)
    logger.info("%s", memory_report(accelerator))
    if accelerator.is_main_process:
        ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(args))
    accelerator.init_trackers(args.name, config={k: str(v) for k, v in vars(args).items()})
    validation = embed_validation_prompts(args, accelerator)  # None without prompts

    stop = StopRequest()  # from here on a signal means: save at the end of this iteration, then exit
    clock = WallClock(parse_duration(args.max_wall_time) if args.max_wall_time else None)
    save_interval = parse_duration(args.save_interval) if args.save_interval else None
    grace_warning, last_save = None, time.monotonic()  # once a save is slower than the launcher's grace: warn once
    staged = False  # pinned host buffers for background saves, allocated after the first applied step
    profiler = IterationProfiler(args.profile_iters, start_iter + 4, run_dir / "profile", accelerator.process_index)
    progress, data_iter, nonfinite_run, skipped = Progress(args, accelerator, start_iter), iter(loader), 0, 0

    for iteration in range(start_iter + 1, args.max_iter + 1):
        tick = time.perf_counter()
        profiler.begin(iteration)
        loss, unreadable = forward_backward(args, accelerator, t.model, vae, data_iter, iteration)
        # the loss and each process's requests in one reduction: every process decides alike, no extra sync (the
        # flags are filled in on the device: copied from the host, they would wait for the backward to finish)
        flags = [float(stop.requested or clock.out_of_time()), float(bool(unreadable)),
                 float(save_interval is not None and time.monotonic() - last_save >= save_interval)]
        summed = accelerator.reduce(torch.stack([loss.float(), *(torch.full((), f, device=accelerator.device)
                                                                 for f in flags)]), "sum")
        # one read per step, the optimizer step queued behind it (dropped on the GPU if the loss is not finite or the
        # data was unreadable; cosmos_t2i/update.py)
        update = start_update(t.params, t.optimizer, args.clip_grad_norm, read=[summed],
                              skip=~torch.isfinite(summed[0]) | (summed[2] > 0), ema=t.ema, iteration=iteration)
        loss_sum, *flag_sums = update.read()
        mean_loss, (stop_here, bad_data, save_now) = loss_sum / accelerator.num_processes, (f > 0 for f in flag_sums)
        if bad_data:  # this step is not applied: save what the previous one left and stop, naming the file
            t.optimizer.zero_grad(set_to_none=True)
            stop_on_unreadable_data(accelerator, checkpointer, run_dir, iteration - 1, unreadable,
                                    trainer_state(args, sampler, iteration - 1, skipped))
        if not math.isfinite(mean_loss):  # the same decision on every process: no deadlock
            t.optimizer.zero_grad(set_to_none=True)
            nonfinite_run, skipped = nonfinite_run + 1, skipped + 1
            logger.warning("iteration %d: non-finite loss, step skipped (%d in a row)", iteration, nonfinite_run)
            if nonfinite_run >= args.max_nonfinite:
                raise SystemExit(f"{nonfinite_run} non-finite losses in a row: stopping. The last checkpoint in "
                                 f"{ckpt_dir} is intact; lower --lr or check the data.")
            if stop_here:
                stop_with_checkpoint(accelerator, checkpointer, run_dir, iteration,
                                     trainer_state(args, sampler, iteration, skipped), stop.reason)
            continue
        nonfinite_run = 0
        grad_norm = finish_update(update, t.params, t.optimizer, t.scheduler, t.ema, args.clip_grad_norm, iteration)
        if not staged and (save_interval or background_save_ahead(iteration, args.save_iter, args.max_iter)):
            checkpointer.prepare_staging()  # once the optimizer state exists: later saves only copy into it
        staged = True
        progress.update(iteration, tick, mean_loss, grad_norm, t.scheduler.get_last_lr()[0], skipped)
        if validation is not None and iteration % args.validation_iter == 0:
            validate_with_images(args, accelerator, t, vae, validation, iteration, run_dir)
        profiler.end(iteration)
        if stop_here:
            stop_with_checkpoint(accelerator, checkpointer, run_dir, iteration,
                                 trainer_state(args, sampler, iteration, skipped), stop.reason)
        if iteration == args.max_iter and args.final_save:
            save_or_exit(accelerator, checkpointer, run_dir, iteration, trainer_state(args, sampler, iteration, skipped))
        elif iteration % args.save_iter == 0 or save_now:
            save_or_warn(checkpointer, iteration, trainer_state(args, sampler, iteration, skipped))
            last_save = time.monotonic()
        clock.record_iteration(time.perf_counter() - tick)
        clock.record_save(checkpointer.last_save_s)
        if grace_warning is None and (grace_warning := stop_save_warning(checkpointer.last_save_s, grace_s, launcher)):
            logger.warning("%s", grace_warning)
    save_or_exit(accelerator, checkpointer, run_dir, None, None)  # waits for a save still being written
    logger.info("%s", memory_report(accelerator))
    progress.bar.close()
    if skipped:
        logger.warning("%d steps were skipped for non-finite losses", skipped)
    end_run(accelerator, run_dir)


if __name__ == "__main__":
    from cosmos_t2i.cli import run_main

    run_main(main, "train_text2image.py")
