"""The training script's flags (build_parser) and their checks (validate): every flag with its help text, and each
wrong combination refused before anything loads, saying what to change. train_text2image.py runs them."""

import argparse
import logging
import os
from pathlib import Path

from .block_swap import flag_value, requested
from .families import FAMILIES, get_family
from .registry import MODEL_SIZES
from .training import NVIDIA_LORA_TARGETS

logger = logging.getLogger("train")


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """Every flag of train_text2image.py; `description` heads --help (the script's usage)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML file with any of these flags (command-line flags override it)")
    g = p.add_argument_group("model")
    g.add_argument("--family", choices=list(FAMILIES), default="predict2",
                   help="model family: predict2 (NVIDIA's Cosmos-Predict2: T5 text, Wan2.1 VAE) or anima (the "
                        "community model on the 2B DiT: Qwen3 text through its adapter, Qwen-Image VAE; docs/anima.md). "
                        "It sets the text files the data needs, the VAE, the loss scale and the sampler")
    g.add_argument("--model_size", choices=list(MODEL_SIZES), default="2B", help="DiT shape (registry key)")
    g.add_argument("--dit_path", help="the DiT to start from (required): NVIDIA's model.pt/.safetensors, a diffusers "
                                      "folder, a hub id, a training run folder (its latest checkpoint) or a LoRA "
                                      "file (its base with the adapter merged); 'random' = a randomly initialised "
                                      "--model_size (benchmarks)")
    g.add_argument("--vae_path", required=False, help="the family's VAE: a diffusers folder (AutoencoderKLWan for "
                                                      "predict2, AutoencoderKLQwenImage for anima) or its single file "
                                                      "(NVIDIA's tokenizer.pth; qwen_image_vae.safetensors)")
    g.add_argument("--train_architecture", choices=["full", "lora"], default="full")
    g.add_argument("--lora_rank", type=int, default=16)
    g.add_argument("--lora_alpha", type=float, default=16)
    g.add_argument("--lora_target_modules", default=NVIDIA_LORA_TARGETS, help="NVIDIA module names, comma separated")
    g.add_argument("--init_lora", metavar="LORA",
                   help="start the LoRA from this file or folder (ours, diffusers/PEFT, ComfyUI, kohya, diffusion-pipe): "
                        "same --lora_rank and modules; its scale is kept, --lora_alpha applies to the updates")
    g.add_argument("--base_dit_path", help="the base of a LoRA given as --dit_path when the file records none (other "
                                           "tools' LoRAs) or it moved")
    g.add_argument("--lora_base_dtype", choices=["bf16", "fp8"], default="bf16",
                   help="LoRA: store the frozen base's block weights as fp8 (e5m2, per-tensor scale; computed in bf16): "
                        "half the weight memory (14B: 14 GB instead of 28), at a small cost in fidelity")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute block activations in backward")
    g.add_argument("--blocks_to_swap", default="0", type=flag_value, metavar="N|all",
                   help="LoRA on small cards: keep the frozen base of the last N blocks (or all) in pinned host memory "
                        "and stream each to the GPU ahead of use, overlapped with compute; same results, less GPU "
                        "memory, slower steps (the swapped blocks are checkpointed; docs/anima.md, small cards)")
    g.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    g.add_argument("--fp8", action="store_true",
                   help="full fine-tune: the blocks' projections run float8 matmuls (torchao Float8Linear: dynamic "
                        "scales, e4m3 forward, e5m2 gradients; weights, optimizer and checkpoints unchanged). Needs an "
                        "H100-class GPU and torchao; use with --compile. Measured at 2B: no faster than bf16, 12 GB "
                        "less activation memory at batch 2 (docs/training.md)")
    g.add_argument("--weight_dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: full fine-tune with bf16 weights and no fp32 masters (StochasticAdamW: bf16 moments, "
                        "stochastic rounding); with --gradient_checkpointing --no-ema a 2B fits 24 GB cards")
    g.add_argument("--mixed_precision", choices=["bf16", "no"], default="bf16",
                   help="bf16 autocast over fp32 master weights (NVIDIA: bf16 net, fp32 optimizer masters)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset_dir", "--dataset_path", dest="dataset_dir", help="images/, metas/, t5_xxl/")
    g.add_argument("--dataset_name", help="instead of --dataset_dir: a Hugging Face dataset (save_to_disk folder, "
                                          "imagefolder, or hub id) with the t5_xxl column precompute_t5.py adds")
    g.add_argument("--image_column", default="image", help="image column of --dataset_name")
    g.add_argument("--split", default="train", help="split of --dataset_name")
    g.add_argument("--aspect_buckets", action="store_true",
                   help="bucket images by aspect ratio (the five of --resolution) instead of one --image_size")
    g.add_argument("--resolution", choices=["1024", "720", "512", "480"], default="1024",
                   help="resolution class of the buckets (NVIDIA's table)")
    g.add_argument("--bucket_fit", choices=["crop", "pad"], help=argparse.SUPPRESS)  # older spelling of --resize_mode
    g.add_argument("--cache_latents", action="store_true",
                   help="encode each image once with the VAE and train from the cache (no VAE encoder at all)")
    g.add_argument("--latent_cache_dir", help="default: <dataset>/latents_cache")
    g.add_argument("--image_size", type=int, nargs=2, default=[768, 1360], metavar=("HEIGHT", "WIDTH"))
    g.add_argument("--resize_mode", choices=["resize", "center_crop", "pad"],
                   help="how an image fits --image_size or its aspect bucket: resize = NVIDIA's (distorts other "
                        "aspects), center_crop, or pad (reflection padding, padding_mask = 1 there); default resize, "
                        "center_crop with --aspect_buckets")
    g.add_argument("--skip_incomplete", action="store_true", help="drop samples lacking caption or embedding")
    g.add_argument("--batch_size", type=int, default=1, help="per process")
    g.add_argument("--num_workers", type=int, default=8)
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2 ** -14.5)
    g.add_argument("--adapter_lr", type=float, default=0.0,
                   help="anima: also train its text adapter (the 6-block LLM adapter) at this learning rate; 0 keeps "
                        "it frozen, as the model author's trainer does by default (training it helps new concepts "
                        "and tags take hold; a tenth of --lr is a common start)")
    g.add_argument("--weight_decay", type=float, default=0.2)
    g.add_argument("--betas", type=float, nargs=2, default=[0.9, 0.99])
    g.add_argument("--eps", type=float, default=1e-8)
    g.add_argument("--optimizer", choices=["adamw", "adamw8bit"], default="adamw")
    g.add_argument("--scheduler", choices=["lambdalinear", "constant"], default="lambdalinear")
    g.add_argument("--warm_up_steps", type=int, nargs="+", default=[0])
    g.add_argument("--cycle_lengths", type=int, nargs="+", default=[1000])
    g.add_argument("--f_start", type=float, nargs="+", default=[1e-6])
    g.add_argument("--f_max", type=float, nargs="+", default=[0.4])
    g.add_argument("--f_min", type=float, nargs="+", default=[0.0])
    g.add_argument("--grad_accum", type=int, default=1,
                   help="micro-batches per optimizer step (global batch = batch_size x processes x grad_accum); the "
                        "optimizer, EMA and clipping then run once per step, but the fp32 gradients stay allocated "
                        "through the micro-batches (2B full fine-tune, batch 3: 7 GB more peak memory)")
    g.add_argument("--clip_grad_norm", type=float, default=1.0)
    g.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="power EMA, fp32 copy")
    g.add_argument("--ema_rate", type=float, default=0.1)
    g.add_argument("--caption_dropout", type=float, default=0.2)
    g.add_argument("--timestep_shift", type=float, default=1.0,
                   help="shift the training timesteps towards noise, t' = s t / (1 + (s - 1) t) (diffusion-pipe's "
                        "optional shift for Anima, e.g. 3; default 1: none, as NVIDIA and the model author train)")
    g.add_argument("--loss_scale", type=float, default=None,
                   help="factor on the velocity MSE (default: the family's, predict2 10 as NVIDIA, anima 1 as the "
                        "model author's trainer)")
    g.add_argument("--max_iter", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max_nonfinite", type=int, default=20, help="stop after this many non-finite losses in a row")
    g.add_argument("--context_parallel_size", type=int, default=1, help="only 1: text2image has no CP (as NVIDIA)")
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--output_root", default=os.environ.get("IMAGINAIRE_OUTPUT_ROOT", "checkpoints"))
    g.add_argument("--project", default="posttraining")
    g.add_argument("--group", default="text2image")
    g.add_argument("--name", default="2b_custom_data")
    g.add_argument("--save_iter", type=int, default=500)
    g.add_argument("--save_interval", help="also save (in the background) once this much time has passed since the "
                                            "last save, e.g. 30m: bounds what a hard kill loses when a launcher "
                                            "allows less time than a stop save takes (each is a full "
                                            "checkpoint: pair it with --keep_last; docs/preemption.md)")
    g.add_argument("--keep_last", type=int, default=None, help="keep only the newest K checkpoints (default all)")
    g.add_argument("--start_over", action="store_true",
                   help="when no checkpoint of this run folder can be resumed from, train from iteration 0 there "
                        "instead of stopping (files are kept until saves of the same iterations replace them)")
    g.add_argument("--max_wall_time", help="save and exit (code 75) before this much time has passed, e.g. 3h50m "
                                            "for a 4-hour job slot; uses the measured iteration and save times")
    g.add_argument("--final_save", action=argparse.BooleanOptionalAction, default=True,
                   help="save at --max_iter even when it is not a multiple of --save_iter")
    g.add_argument("--async_save", action=argparse.BooleanOptionalAction, default=True,
                   help="write checkpoints in the background (training stalls only while shards are copied to host "
                        "memory, which then holds a copy of this process's training state)")
    g.add_argument("--logging_iter", type=int, default=10)
    g.add_argument("--hit_thres", type=int, default=10, help="log every iteration's time for the first N")
    g.add_argument("--report_to", choices=["tensorboard", "wandb", "none"], default="tensorboard")
    g.add_argument("--validation_prompts", nargs="*", default=[], help="prompts sampled with EMA weights")
    g.add_argument("--validation_iter", type=int, default=0, help="sample validation prompts every N iterations")
    g.add_argument("--validation_steps", type=int, default=None,
                   help="sampler steps for validation images (default: the family's, predict2 35, anima 50)")
    g.add_argument("--text_encoder", default=None,
                   help="text encoder for validation prompts, freed after encoding them (default: the family's, "
                        "google-t5/t5-11b for predict2; for anima its diffusers folder)")
    g.add_argument("--profile_iters", type=int, default=0,
                   help="profile N iterations after 3 warm-up ones: per-phase times and GPU time by kernel kind in the "
                        "log, a trace per process in <run>/profile/ (ui.perfetto.dev; benchmarks/trace_gaps.py "
                        "finds where the GPU waited for the host)")
    g.add_argument("--dryrun", action="store_true", help="print the resolved config and exit")
    return p


def validate(args, parser) -> None:
    """Reject invalid combinations before any model is loaded, saying what to change."""
    family = get_family(args.family)
    args.loss_scale = family.loss_scale if args.loss_scale is None else args.loss_scale
    args.text_encoder = args.text_encoder or family.text_encoder
    args.validation_steps = args.validation_steps or family.num_steps
    if not args.timestep_shift > 0:
        parser.error(f"--timestep_shift {args.timestep_shift}: must be positive (1 = no shift).")
    if args.adapter_lr < 0:
        parser.error(f"--adapter_lr {args.adapter_lr}: a learning rate is not negative (0 keeps the adapter frozen).")
    if args.adapter_lr > 0 and not family.has_text_adapter:
        parser.error(f"--adapter_lr {args.adapter_lr}: the {family.name} family has no text adapter to train; it is "
                     "for --family anima.")
    # whether the adapter trains decides what a checkpoint holds: a resume cannot switch it (its rate may change)
    args.text_adapter_trains = args.adapter_lr > 0
    if args.context_parallel_size != 1:
        parser.error("--context_parallel_size must be 1: NVIDIA's text2image has no context parallelism "
                     "(an image is a single latent frame).")
    if args.scheduler == "lambdalinear":
        lists = [args.warm_up_steps, args.cycle_lengths, args.f_start, args.f_max, args.f_min]
        if len({len(x) for x in lists}) != 1:
            parser.error("--warm_up_steps, --cycle_lengths, --f_start, --f_max, --f_min need one value per cycle.")
        if args.max_iter > sum(args.cycle_lengths):
            parser.error(f"--max_iter {args.max_iter} exceeds sum(--cycle_lengths) = {sum(args.cycle_lengths)}; "
                         "past the last cycle NVIDIA's schedule goes negative. Raise --cycle_lengths or lower "
                         "--max_iter.")
        if any(w >= c for w, c in zip(args.warm_up_steps, args.cycle_lengths)):
            parser.error("each --warm_up_steps value must be smaller than its --cycle_lengths value.")
    if any(s <= 0 or s % 16 for s in args.image_size):
        parser.error(f"--image_size {args.image_size}: height and width must be positive multiples of 16.")
    for name in ("batch_size", "grad_accum", "max_iter", "save_iter", "lora_rank", "logging_iter"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1.")
    if not args.lr > 0 or not args.eps > 0 or args.weight_decay < 0:
        parser.error("--lr and --eps must be positive and --weight_decay not negative.")
    if not all(0 <= b < 1 for b in args.betas):
        parser.error(f"--betas {args.betas}: each must be in [0, 1).")
    if not 0 < args.ema_rate < 1 or not args.clip_grad_norm > 0:
        parser.error("--ema_rate must be in (0, 1) and --clip_grad_norm positive.")
    if not 0 <= args.caption_dropout <= 1:
        parser.error("--caption_dropout is a probability in [0, 1].")
    if args.keep_last is not None and args.keep_last < 1:
        parser.error("--keep_last must be at least 1 (leave it out to keep every checkpoint).")
    if args.weight_dtype == "bf16" and (args.optimizer != "adamw" or args.train_architecture != "full"):
        parser.error("--weight_dtype bf16 is for full fine-tuning with --optimizer adamw (it then uses the "
                     "stochastic-rounding AdamW); LoRA already keeps its base in bf16.")
    if args.report_to == "wandb":
        import importlib.util
        if importlib.util.find_spec("wandb") is None:
            parser.error("--report_to wandb needs the wandb package: pip install wandb (or use tensorboard).")
    for name in ("max_wall_time", "save_interval"):
        if getattr(args, name) is not None:
            from cosmos_t2i.run_control import parse_duration
            try:
                if parse_duration(getattr(args, name)) <= 0:
                    parser.error(f"--{name} must be longer than 0 s.")
            except ValueError as e:
                parser.error(f"--{name}: {e}")
    if args.bucket_fit is not None:
        args.resize_mode = {"crop": "center_crop", "pad": "pad"}[args.bucket_fit]
    if args.resize_mode is None:
        args.resize_mode = "center_crop" if args.aspect_buckets else "resize"
    if requested(args.blocks_to_swap) and args.train_architecture != "lora":
        parser.error("--blocks_to_swap swaps a frozen base: it needs --train_architecture lora (a full fine-tune "
                     "updates every block; for small cards see --weight_dtype bf16 --gradient_checkpointing --no-ema).")
    if args.init_lora and (args.train_architecture != "lora" or not Path(args.init_lora).exists()):
        parser.error(f"--init_lora {args.init_lora}: " + ("no such file or folder." if args.train_architecture == "lora"
                     else "it starts a LoRA run: add --train_architecture lora (or merge it: --dit_path LORA)."))
    if args.lora_base_dtype == "fp8" and args.train_architecture != "lora":
        parser.error("--lora_base_dtype fp8 stores a LoRA's frozen base: it needs --train_architecture lora.")
    if args.fp8:
        if args.train_architecture != "full":
            parser.error("--fp8 speeds up full fine-tuning; for LoRA use --lora_base_dtype fp8 (fp8 storage of the "
                         "frozen base, for memory).")
        if not args.compile:
            logger.warning("--fp8 without --compile: torchao's float8 casts run unfused and the step is slower "
                           "than bf16; add --compile.")
        if not args.dryrun:
            from cosmos_t2i.fp8 import fp8_unavailable
            if problem := fp8_unavailable("training"):
                parser.error(problem)
    if args.validation_prompts and args.validation_iter < 1:
        parser.error("--validation_prompts needs --validation_iter N (sample every N iterations).")
    if not args.dryrun:
        if args.dit_path is None:
            parser.error("--dit_path is required: NVIDIA's model.pt, a diffusers transformer folder, or 'random' "
                         "for a randomly initialised --model_size (benchmarks only).")
        if args.dit_path == "random":
            args.dit_path = None  # from here on: no weights to load
        elif not Path(args.dit_path).exists() and (
                args.dit_path.startswith(("/", ".", "~")) or args.dit_path.count("/") != 1 or
                Path(args.dit_path).suffix in (".pt", ".pth", ".safetensors")):  # not a Hub id: never sent there
            parser.error(f"--dit_path {args.dit_path}: no such file or folder.")
        if not args.vae_path:
            parser.error("--vae_path is required.")
        if bool(args.dataset_dir) == bool(args.dataset_name):
            parser.error("give exactly one of --dataset_dir (the seed's folder layout) and --dataset_name.")
        if args.dataset_dir and not Path(args.dataset_dir).is_dir():
            parser.error(f"--dataset_dir {args.dataset_dir}: no such folder.")
        if args.cache_latents and args.dataset_name and not args.latent_cache_dir and \
                not Path(args.dataset_name).is_dir():
            parser.error("--cache_latents with a hub dataset needs --latent_cache_dir.")
