"""Building and running a training run, for train_text2image.py (and the benchmarks that time its step): the
precision decision, the DiT with LoRA / float8 / checkpointing / compile applied from outside, data, optimizer,
schedule and EMA prepared by Accelerate, NVIDIA's loss and update (saves, stops and the end of a run: saving.py)."""

import contextlib
import logging
from types import SimpleNamespace

import torch

from . import checkpoint as ckpt
from .block_swap import requested
from .families import NVIDIA_LORA_TARGETS, get_family  # noqa: F401  (NVIDIA_LORA_TARGETS: imported from here)
from .registry import RESOLUTIONS

logger = logging.getLogger("train")


def collate(samples):
    """Stack tensors, keep lists of the rest."""
    return {k: torch.stack([s[k] for s in samples]) if torch.is_tensor(samples[0][k]) else [s[k] for s in samples]
            for k in samples[0]}


def base_dtype(train_architecture: str, mixed_precision: str, weight_dtype: str) -> torch.dtype:
    """The one precision decision: what the model's weights are stored in while training.

    LoRA under bf16 autocast: a bf16 frozen base (adapters are fp32). Full fine-tune: fp32 master weights under
    bf16 autocast (NVIDIA's recipe), or bf16 weights with --weight_dtype bf16 (StochasticAdamW).
    """
    if (train_architecture == "lora" and mixed_precision == "bf16") or weight_dtype == "bf16":
        return torch.bfloat16
    return torch.float32


def prepare_for_training(model, lora: dict | None = None, seed: int = 0, gradient_checkpointing: bool = False,
                         compile: bool = False, device=None, fp8: bool = False, train_text_adapter: bool = False,
                         blocks_to_swap=0):
    """LoRA injection (lora = {"rank", "alpha", "targets"}: NVIDIA module names; "base_dtype": "fp8" stores the
    frozen block weights in fp8, converting layer by layer on `device`), float8 matmuls (fp8), diffusers' gradient
    checkpointing and per-block torch.compile, then train mode. A text adapter (Anima's `text_conditioner`) trains
    fully with `train_text_adapter`, else it stays frozen, in LoRA runs as in full fine-tunes. `blocks_to_swap`
    (N or "all", LoRA only): the frozen base of the last N blocks in pinned host memory (block_swap.py); the model
    comes on the CPU then, and the swapped blocks are checkpointed. Shared with benchmarks/bench_train.py."""
    from .lora import add_lora, store_frozen_linears_in_fp8_

    if lora is not None:
        add_lora(model, lora["rank"], lora["alpha"], lora["targets"], seed)
        swap = swap_lora_base(model, blocks_to_swap, device, lora.get("base_dtype") == "fp8", gradient_checkpointing)
        if lora.get("base_dtype") == "fp8":  # the resident blocks (the swapped ones converted on their way out)
            moved = store_frozen_linears_in_fp8_(model.transformer_blocks, device) + (swap.fp8_params if swap else 0)
            logger.info("LoRA base: %.1fM frozen block weights stored in fp8 (e5m2)", moved / 1e6)
    adapter = getattr(model, "text_conditioner", None)
    if adapter is not None:
        adapter.requires_grad_(train_text_adapter)
        if train_text_adapter:
            from .anima import train_adapter_without_cudnn_attention
            train_adapter_without_cudnn_attention(adapter)
            if lora is not None:  # in fp32 beside LoRA's adapters (a full fine-tune: the model's dtype, one per FSDP
                for p in adapter.parameters():  # group)
                    p.data = p.data.float()
    if fp8:
        from .fp8 import convert_to_fp8_training
        logger.info("--fp8: %d block projections run float8 matmuls (torchao)", convert_to_fp8_training(model))
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if compile:
        for block in model.transformer_blocks:
            block.compile()
    return model.train()


def swap_lora_base(model, count, device, base_fp8: bool, checkpoint_all: bool):
    """block_swap.swap_blocks for a LoRA's frozen base, its float8 storage converted block by block on the GPU; the
    swapped blocks are checkpointed (all blocks with `checkpoint_all`, --gradient_checkpointing)."""
    from .block_swap import checkpoint_swapped_blocks, swap_blocks
    from .lora import store_frozen_linears_in_fp8_

    converted = []

    def to_fp8(block):
        converted.append(store_frozen_linears_in_fp8_(block))

    swap = swap_blocks(model, count, device, to_fp8 if base_fp8 else None)
    if swap is not None:
        swap.fp8_params = sum(converted)
        if not checkpoint_all:
            checkpoint_swapped_blocks(model, swap)
        logger.info("block swap: the frozen weights of the last %d of %d blocks (%.2f GB) in pinned host memory, "
                    "%.2f GB of GPU slots; activation checkpointing on %s", swap.num_blocks - swap.first,
                    swap.num_blocks, swap.host_bytes() / 1e9, swap.resident_bytes() / 1e9,
                    "every block" if checkpoint_all else "the swapped blocks")
    return swap


def start_lora_from_file(model, path, adapter_trains: bool) -> None:
    """--init_lora: the run's adapters start from a LoRA of any tool (ours, diffusers, ComfyUI, kohya,
    diffusion-pipe; lora_formats.py) or a LoRA run folder, and a text adapter it carries in full replaces the
    base's (it must go on training to be saved with the run). A resume then loads the run's own checkpoint over it."""
    from .lora import load_adapter_into_peft_, read_full_weights, read_lora
    from .models import load_full_weights, resolve_dit_path

    path = resolve_dit_path(path)
    adapter, _ = read_lora(path)
    full = read_full_weights(path)
    if full and not adapter_trains:
        raise ValueError(f"{path} carries a trained text adapter: pass --adapter_lr > 0 so that the run keeps "
                         "training it and saves it (a frozen one would be left out of the run's LoRA files).")
    load_full_weights(model, full, path)
    load_adapter_into_peft_(model, adapter, path)
    logger.info("LoRA started from %s (%d modules)", path, len(adapter))


def build_transformer(args, device, sharded: bool):
    """The DiT ready to train; returns (model, weights to load after sharding, LoRA metadata).

    A full fine-tune under FSDP is built on the meta device: Accelerate shards it empty and each process then
    copies in only its own shards from the memory-mapped weights (weights is None: random init). Otherwise the
    model is loaded here, on `device`, and the returned weights are None.
    """
    from .models import fingerprint, load_dit, lora_file_state, resolve_dit_path, transformer_weights
    from .registry import size_of_config

    family = get_family(args.family)
    dtype = base_dtype(args.train_architecture, args.mixed_precision, args.weight_dtype)
    weights, meta, lora = None, None, None
    path = resolve_dit_path(args.dit_path) if args.dit_path else None  # a run folder: its latest model file
    # an fp8 LoRA base is converted layer by layer on the GPU, and a swapped one block by block: both from the CPU
    load_on = "cpu" if args.lora_base_dtype == "fp8" or requested(args.blocks_to_swap) else device
    dit_is_lora = path is not None and lora_file_state(path) is not None
    if args.base_dit_path and not dit_is_lora:
        logger.warning("--base_dit_path %s is not used: --dit_path %s is not a LoRA file.", args.base_dit_path, path)
    if dit_is_lora:  # a LoRA file: its base with the adapter merged
        merged = load_dit(path, args.model_size, dtype=torch.float32, family=family, base_dit_path=args.base_dit_path)
        args.model_size = size_of_config(dict(merged.config))
        if sharded and args.train_architecture == "full":
            weights, model = merged.state_dict(), family.new_model(args.model_size, dtype, "meta")
        else:
            model = merged.to(device=load_on, dtype=dtype).requires_grad_(True)
    elif sharded and args.train_architecture == "full":
        if path is not None:
            args.model_size, weights = transformer_weights(path, args.model_size, family=family)
        model = family.new_model(args.model_size, dtype, "meta")
    else:
        model = family.load_model(path, args.model_size, dtype=dtype, device=load_on)
    if args.train_architecture == "lora":
        targets = [t.strip() for t in args.lora_target_modules.split(",") if t.strip()]
        lora = {"rank": args.lora_rank, "alpha": args.lora_alpha, "targets": targets, "base_dtype": args.lora_base_dtype}
        meta = {"rank": args.lora_rank, "alpha": float(args.lora_alpha), "target_modules": targets,
                "base_dtype": args.lora_base_dtype,
                "model_size": args.model_size, "base_path": str(path), "base_fingerprint": fingerprint(path),
                "base_dit_path": args.base_dit_path, "family": family.name}
    # under FSDP Accelerate checkpoints inside each sharded block instead (see build_training)
    model = prepare_for_training(model, lora, args.seed, args.gradient_checkpointing and not sharded, args.compile,
                                 device, args.fp8, train_text_adapter=args.adapter_lr > 0,
                                 blocks_to_swap=args.blocks_to_swap)
    if args.init_lora:
        start_lora_from_file(model, args.init_lora, adapter_trains=args.adapter_lr > 0)
    return (model if weights is not None or model.device.type == "meta" else model.to(device)), weights, meta


def background_save_ahead(iteration: int, save_iter: int, max_iter: int) -> bool:
    """Whether a save in the background comes at `iteration` or later: a multiple of save_iter before max_iter
    (the save at max_iter and a stop save are written synchronously). Without one, the pinned host buffers are not
    worth allocating (14B on 4 GPUs: 53 GB per process, 139 s measured at the first step)."""
    next_save = -(-iteration // save_iter) * save_iter
    return next_save < max_iter


def prepare_latent_cache(args, dataset, accelerator):
    """Encode what the cache lacks (split across processes) and switch the dataset to it.

    Returns the VAE if it had to be loaded and validation will need it, else None.
    """
    from .distributed import from_main_process, wait_for_everyone
    from .latent_cache import LatentCache
    from .models import load_vae

    cache = LatentCache(args.latent_cache_dir or dataset.source.root / "latents_cache", dataset, args.vae_path)
    # one list for all: a process scanning the cache while another already fills it would see a shorter list, and
    # the shares taken from different lists leave entries to nobody
    stale, vae = from_main_process(cache.stale), None
    if stale:
        logger.info("encoding %d of %d images into the latent cache %s", len(stale), len(dataset), cache.dir)
        vae = load_vae(args.vae_path, torch.bfloat16, accelerator.device, get_family(args.family))
        cache.fill(stale[accelerator.process_index::accelerator.num_processes], vae, accelerator.device,
                   show_progress=accelerator.is_local_main_process)
    wait_for_everyone()  # with a long timeout: for a large dataset, one share can take far longer than another
    dataset.latent_cache = cache
    return vae if args.validation_prompts else None


def build_data(args, accelerator, start_iter: int):
    """(dataset, resumable batch sampler, loader, VAE or None): the VAE is loaded when images are encoded on the fly
    or validation decodes; with --cache_latents only to fill what the cache lacks."""
    from .data import HFSource, ImageDataset, ResumableBatchSampler
    from .models import load_vae
    from .run_control import end_workers_at_exit, ignore_stop_signals

    family = get_family(args.family)
    source = HFSource(args.dataset_name, args.image_column, args.split, family) if args.dataset_name else None
    dataset = ImageDataset(args.dataset_dir, tuple(args.image_size), args.resize_mode, args.skip_incomplete,
                           args.resolution if args.aspect_buckets else None, source, family)
    if args.aspect_buckets:
        logger.info("aspect buckets (%s, %s): %s", args.resolution, args.resize_mode, ", ".join(
            f"{k} {RESOLUTIONS[args.resolution][k][0]}x{RESOLUTIONS[args.resolution][k][1]}: {n}"
            for k, n in dataset.histogram.items()))
    global_batch = args.batch_size * accelerator.num_processes
    dropped = sum(len(g) % global_batch for g in dataset.groups)
    if dropped:
        logger.info("each epoch drops %d samples (incomplete global batches of %d per bucket)", dropped, global_batch)
    sampler = ResumableBatchSampler(dataset.groups, args.batch_size, accelerator.process_index,
                                    accelerator.num_processes, args.seed, start_iter * args.grad_accum)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                                         pin_memory=accelerator.device.type == "cuda", collate_fn=collate,
                                         worker_init_fn=ignore_stop_signals, persistent_workers=args.num_workers > 0)
    if args.num_workers > 0:
        end_workers_at_exit()
    vae = prepare_latent_cache(args, dataset, accelerator) if args.cache_latents else None
    if vae is None and (not args.cache_latents or args.validation_prompts):
        vae = load_vae(args.vae_path, torch.bfloat16, accelerator.device, family)
    return dataset, sampler, loader, vae


def build_training(args, accelerator, n_samples: int) -> SimpleNamespace:
    """Model, optimizer, schedule and EMA prepared by Accelerate (sharded under FSDP): a namespace of model (as
    prepared, for forward/backward), unwrapped, params (what trains), optimizer, scheduler, ema, lora_meta."""
    from .distributed import is_sharded, materialize_
    from .ema import PowerEMA
    from .schedule import make_optimizer, make_scheduler

    device = accelerator.device
    if accelerator.is_fsdp2 and args.gradient_checkpointing:
        # checkpoint inside each sharded block (Accelerate's wrapper): diffusers' own wraps the block from outside,
        # where FSDP does not cast the recomputed inputs to bf16 again and the recompute no longer matches
        accelerator.state.fsdp_plugin.activation_checkpointing = True
    if accelerator.is_fsdp2 and requested(args.blocks_to_swap):
        raise SystemExit("--blocks_to_swap runs with one process or plain data parallel (accelerate_configs/"
                         "multi_gpu.yaml), not under FSDP, which already spreads the weights over the GPUs.")
    if accelerator.is_fsdp2 and args.lora_base_dtype == "fp8":
        raise SystemExit("--lora_base_dtype fp8 runs with one process or plain data parallel (accelerate_configs/"
                         "multi_gpu.yaml, the faster choice for LoRA anyway), not under FSDP.")
    if accelerator.is_fsdp2:  # our loading already gives each process only its shards (build_transformer)
        accelerator.state.fsdp_plugin.cpu_ram_efficient_loading = False
    model, weights, lora_meta = build_transformer(args, device, sharded=accelerator.is_fsdp2)
    optimizer = make_optimizer(param_groups(model, args), args.lr, args.betas, args.eps, args.weight_decay,
                               args.optimizer, args.weight_dtype == "bf16", device.type)
    scheduler = make_scheduler(optimizer, args.scheduler, args.warm_up_steps, args.cycle_lengths, args.f_start,
                               args.f_max, args.f_min)
    swap = model.__dict__.get("block_swap")
    if args.lora_base_dtype == "fp8" or swap is not None:
        # DDP broadcasts every parameter and buffer at start, which NCCL/gloo refuse for fp8 and which would find
        # swapped weights empty; every process built the same base from the same file: nothing to broadcast
        from torch.nn.parallel import DistributedDataParallel
        swapped = {id(p) for params in (swap.params.values() if swap else []) for p in params}
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, [
            n for n, t in [*model.named_parameters(), *model.named_buffers()]
            if t.dtype == torch.float8_e5m2 or n.endswith("weight_scale") or id(t) in swapped])
    model, optimizer = accelerator.prepare(model, optimizer)
    # FSDP replaces parameters with sharded ones: refer to those from here on
    unwrapped = accelerator.unwrap_model(model)
    trainable = [(n, p) for n, p in unwrapped.named_parameters() if p.requires_grad]
    params = [p for _, p in trainable]
    if any(p.is_meta for p in unwrapped.parameters()):
        materialize_(unwrapped, weights, device, args.seed)
        # Accelerate matched the optimizer's parameters to the sharded ones by storage address, which every meta
        # tensor shares: point it at the sharded parameters (the same groups and order, built from the model)
        for group, built in zip(getattr(optimizer, "optimizer", optimizer).param_groups, param_groups(unwrapped, args)):
            group["params"] = built["params"]
    ema = PowerEMA([(ckpt.canonical_name(n), p) for n, p in trainable], args.ema_rate) if args.ema else None
    logger.info("model %s (%s): %.1fM trainable parameters%s; %d samples; global batch %d x %d accumulation",
                args.model_size, args.train_architecture, sum(p.numel() for p in params) / 1e6,  # DTensors: full
                f", sharded across {accelerator.num_processes} processes (FSDP2)" if is_sharded(unwrapped) else "",
                n_samples, args.batch_size * accelerator.num_processes, args.grad_accum)
    return SimpleNamespace(model=model, unwrapped=unwrapped, params=params, optimizer=optimizer, scheduler=scheduler,
                           ema=ema, lora_meta=lora_meta)


def param_groups(model, args) -> list[dict]:
    """What trains, as optimizer groups: the DiT (or its LoRA adapters) at --lr, then a text adapter (Anima's) at
    --adapter_lr when it trains. Built from the model's parameter order, so the same on every process."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    adapter = [p for n, p in named if ckpt.canonical_name(n).startswith("text_conditioner.")]
    groups = [{"params": [p for n, p in named if not ckpt.canonical_name(n).startswith("text_conditioner.")]}]
    return groups + ([{"params": adapter, "lr": args.adapter_lr}] if adapter else [])


def group_lrs(args, optimizer) -> list[float]:
    """The learning rate of each optimizer group (see param_groups), from this command's flags."""
    return [args.lr, args.adapter_lr][:len(getattr(optimizer, "optimizer", optimizer).param_groups)]


def embed_validation_prompts(args, accelerator):
    """The validation prompts' T5 embeddings (on the CPU), or None without prompts. Only the main process loads the
    T5, embeds and frees it, then sends the embeddings to the others (over cpu_group: long timeout), instead of every
    process loading the T5-11B encoder (4.9B parameters, about 10 GB in bf16) at once."""
    if not args.validation_prompts:
        return None
    from .distributed import from_main_process

    from .pipeline import encode_prompts_once

    return from_main_process(lambda: encode_prompts_once(get_family(args.family), args.text_encoder,
                                                         args.validation_prompts, accelerator.device))


def forward_backward(args, accelerator, model, vae, data_iter, iteration: int) -> tuple[torch.Tensor, list[str]]:
    """NVIDIA's loss over --grad_accum micro-batches, backward through each; returns this process's mean loss and
    the problems of samples that could not be read (the dataset put readable ones in their place, so every process
    still runs its collectives; the caller must not apply this step)."""
    from torch.profiler import record_function

    from .flow import draw_training_randomness, flow_loss
    from .models import encode_images

    device, total = accelerator.device, torch.zeros((), device=accelerator.device)
    text_side = get_family(args.family).text

    def to_device(x):  # from pinned memory (the loader pins its batches): no wait for the GPU's queue to drain
        return x.to(device, non_blocking=True)
    unreadable = []
    for micro in range(args.grad_accum):
        batch = next(data_iter)
        unreadable += [problem for problem in batch.get("unreadable", []) if problem]
        latents = to_device(batch["latents"]) if "latents" in batch else encode_images(vae, to_device(batch["images"]))
        # each sample's noise, sigma and dropout depend on its place in the global batch, not on the process count
        first = (micro * accelerator.num_processes + accelerator.process_index) * args.batch_size
        randomness = draw_training_randomness(args.seed, iteration, range(first, first + args.batch_size),
                                              latents.shape[1:], args.caption_dropout)
        # a copy from pageable memory synchronises with the GPU: the host would wait for the previous step's
        # optimizer and EMA, then launch this forward onto an empty queue
        sigma, noise, keep = (to_device(x.pin_memory() if device.type == "cuda" else x) for x in randomness)
        masks = batch["padding_mask"]  # one for all when they are equal, decided here on the CPU (no GPU sync)
        masks = masks[:1] if bool((masks == masks[:1]).all()) else masks
        with accelerator.autocast(), record_function("forward"):
            loss = flow_loss(model, latents, text_side.model_inputs(batch, to_device), sigma, noise, keep,
                             to_device(masks), args.loss_scale, text_side.drop_captions, args.timestep_shift)
        with record_function("backward"), \
                accelerator.no_sync(model) if micro < args.grad_accum - 1 else contextlib.nullcontext():
            accelerator.backward(loss / args.grad_accum)
        total += loss.detach() / args.grad_accum
    return total, unreadable
