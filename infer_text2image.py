"""Generate images with Cosmos-Predict2 Text2Image or Anima from any checkpoint: the released ones, yours, full or LoRA.

    python infer_text2image.py --model_size 2B --dit_path checkpoints/posttraining/text2image/2b_custom_data \\
        --load_ema --vae_path tokenizer.pth --prompt "A descriptive prompt for physical AI." \\
        --save_path output/generated_image.jpg

    python infer_text2image.py --family anima --dit_path Anima --vae_path Anima --text_encoder Anima \\
        --prompt "1girl, watercolor, night sky" --aspect_ratio 3:4 --save_path output/anima.png

Predict2's default sampler is NVIDIA's (RES/Adams-Bashforth 2, 35 steps, guidance 4, numpy-seeded noise, so a seed
gives NVIDIA's image); `--sampler euler` reproduces diffusers' Cosmos2TextToImagePipeline. Anima's (--family anima;
`Anima` above is a local copy of circlestone-labs/Anima-Base-v1.0-Diffusers, and --dit_path may also be the original
single file or a training run) is diffusers' AnimaModularPipeline's: flow-matching Euler, 50 steps, shift 3,
guidance 4 against the negative prompt "", noise from torch.Generator().manual_seed(seed), so a seed gives that
pipeline's image. Flags left out take the
family's defaults. Beside each image a .txt records prompt, negative prompt, seed and settings.
"""

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cosmos_t2i.cli import one_line_errors, run_main
from cosmos_t2i.block_swap import flag_value, requested
from cosmos_t2i.config import parse_with_config
from cosmos_t2i.families import FAMILIES, get_family
from cosmos_t2i.models import keep_compile_cache
from cosmos_t2i.pipeline import SAMPLERS
from cosmos_t2i.registry import MODEL_SIZES, RESOLUTIONS, image_size_for

logger = logging.getLogger("infer")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MAX_SEED = 2 ** 32 - 1  # numpy's RandomState, which draws the noise (and NVIDIA's distilled re-noising, seed + 1)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--config", help="YAML file with any of these flags")
    a("--family", choices=sorted(FAMILIES), default="predict2",
      help="the model: predict2 (NVIDIA's Cosmos-Predict2) or anima (the same DiT with Anima's Qwen3 text adapter "
           "and the Qwen-Image VAE); it sets the defaults of --text_encoder, --sampler, --num_steps, --guidance, "
           "--shift and --negative_prompt")
    a("--model_size", choices=list(MODEL_SIZES), default=None,
      help="needed for bare weight files (.pt/.safetensors); a diffusers folder's config.json decides otherwise")
    a("--dit_path", help="NVIDIA model.pt/.safetensors, a training run folder or its model/iter_*.pt (full or "
                         "LoRA), NVIDIA LoRA checkpoints, or a diffusers transformer folder; for Anima its single "
                         "file (net./ComfyUI keys) or its diffusers folder (transformer/ and text_conditioner/)")
    a("--load_ema", action="store_true", help="use the EMA weights (net_ema.*) of a post-training checkpoint")
    a("--base_dit_path", help="base weights for a LoRA checkpoint whose recorded base is elsewhere; overrides the "
                              "recorded base path (a base whose content differs from the one trained against is "
                              "still used, with a warning)")
    a("--lora_path", help="an extra LoRA (ours, diffusers adapter folder, or ComfyUI safetensors) merged in")
    a("--lora_scale", type=float, default=1.0)
    a("--vae_path", required=False, help="Predict2: diffusers AutoencoderKLWan folder or NVIDIA "
                                         "tokenizer/tokenizer.pth; Anima: its diffusers folder (vae/) or "
                                         "qwen_image_vae.safetensors")
    a("--text_encoder", default=None, help="Predict2: the T5 encoder (hub id or local folder; default "
                                           "google-t5/t5-11b); Anima: its diffusers folder (text_encoder/, "
                                           "tokenizer/, t5_tokenizer/; default circlestone-labs/Anima-Base-v1.0-Diffusers)")
    a("--prompt", help="text prompt")
    a("--negative_prompt", default=None, help="default: the family's; Predict2: none, i.e. a zero text embedding "
                                              "(as NVIDIA); Anima: the empty prompt \"\" (as diffusers)")
    a("--batch_input_json", help="JSON list of {prompt, output_image} (NVIDIA's batch mode)")
    a("--save_path", default="output/generated_image.jpg", help=".jpg or .png (.mp4 is written as .jpg)")
    a("--jpeg_quality", type=int, default=95, help="JPEG quality of saved .jpg images (1-100)")
    a("--aspect_ratio", choices=["1:1", "4:3", "3:4", "16:9", "9:16"], default="16:9")
    a("--resolution", choices=list(RESOLUTIONS), default="1024")
    a("--height", type=int, help="override the table's height (multiple of 16)")
    a("--width", type=int, help="override the table's width (multiple of 16)")
    a("--guidance", type=float, default=None,
      help="default 4 for both families, in the sampler's convention: ab2/euler x0 = cond + g * (cond - uncond) "
           "(NVIDIA's; 0 turns guidance off), flow_euler v = uncond + g * (cond - uncond) (diffusers'; 1 turns it "
           "off)")
    a("--num_steps", type=int, default=None, help="default: Predict2 35, Anima 50")
    a("--sampler", choices=list(SAMPLERS), default=None,
      help="default: Predict2 ab2 (NVIDIA's), Anima flow_euler (diffusers' AnimaModularPipeline); euler is "
           "diffusers' Cosmos2TextToImagePipeline")
    a("--shift", type=float, default=None, help="flow_euler's sigma shift (default: the family's, Anima 3)")
    a("--distill_steps", type=int, choices=[1, 2, 3, 4], help="NVIDIA's distilled 0.6B mode (no guidance)")
    a("--seed", type=int, default=0)
    a("--num_images", type=int, default=1, help="images per prompt (seeds seed, seed+1, ...)")
    a("--dtype", choices=list(DTYPES), default="bf16")
    a("--compile", action="store_true", help="torch.compile each transformer block")
    a("--cuda_graphs", action=argparse.BooleanOptionalAction, default=True,
      help="on a GPU, replay each sampling step's transformer call from a CUDA graph: one launch per step instead "
           "of hundreds, the same image (--no-cuda_graphs turns it off; never with --blocks_to_swap)")
    a("--blocks_to_swap", default="0", type=flag_value, metavar="N|all",
      help="small cards: keep the last N blocks' weights (or all) in pinned host memory and stream each to the GPU "
           "one block ahead, overlapped with compute: the same image in less memory, slower steps")
    a("--fp8", action="store_true",
      help="float8 matmuls in the blocks' projections (torchao: weights and activations per-row scaled e4m3); "
           "with --compile 1.2x faster sampling on an H100 (2B: 2.02 s/image), images close to bf16's but not "
           "identical (docs/inference.md gives the measured PSNR). Needs an H100-class GPU, --dtype bf16 and torchao")
    a("--offload_text_encoder", action="store_true",
      help="encode all prompts with the text encoder alone, free it, then load the DiT and sample (lowest peak "
           "memory)")
    a("--text_encoder_8bit", action="store_true",
      help="load the text encoder in 8 bits (bitsandbytes): about half the memory")
    a("--disable_guardrail", action="store_true", help="accepted for NVIDIA compatibility (there is no guardrail)")
    a("--offload_guardrail", action="store_true", help="accepted for NVIDIA compatibility")
    return one_line_errors(p)


def apply_family_defaults(args) -> None:
    """Flags left out take the family's values (families.py): text encoder, sampler, steps, guidance, shift and
    negative prompt (an empty --negative_prompt is the family's too: Predict2's none, Anima's "")."""
    family = get_family(args.family)
    for flag in ("text_encoder", "sampler", "num_steps", "guidance", "shift"):
        if getattr(args, flag) is None:
            setattr(args, flag, getattr(family, flag))
    args.negative_prompt = args.negative_prompt or family.negative_prompt


def check_numbers(args, parser) -> None:
    """Every numeric flag in its range, before anything is loaded or written."""
    if args.num_steps < 1:
        parser.error(f"--num_steps must be at least 1, got {args.num_steps} (NVIDIA's default is 35).")
    if args.sampler == "euler" and args.num_steps < 2 and not args.distill_steps:
        parser.error("--sampler euler needs --num_steps 2 or more: its last step is a no-op (diffusers' schedule), "
                     "so 1 step would save pure noise.")
    if args.num_images < 1:
        parser.error(f"--num_images must be at least 1, got {args.num_images}.")
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and value < 16:
            parser.error(f"--{flag} must be a positive multiple of 16, got {value}.")
    if not 1 <= args.jpeg_quality <= 100:
        parser.error(f"--jpeg_quality must be between 1 and 100, got {args.jpeg_quality}.")
    if not 0 <= args.seed <= MAX_SEED - args.num_images:
        parser.error(f"--seed must be between 0 and {MAX_SEED - args.num_images} (numpy's seed range, less "
                     f"--num_images), got {args.seed}.")
    if not math.isfinite(args.guidance) or args.guidance < 0:
        parser.error(f"--guidance must be a finite number of 0 or more (0 turns guidance off), got {args.guidance}.")
    if not math.isfinite(args.lora_scale):
        parser.error(f"--lora_scale must be a finite number, got {args.lora_scale}.")
    if not math.isfinite(args.shift) or args.shift <= 0:
        parser.error(f"--shift must be a finite number above 0, got {args.shift}.")


def resolve_jobs(args, parser) -> list[dict]:
    """[{prompt, path}] from --prompt/--save_path or --batch_input_json; checks happen before loading models."""
    if args.batch_input_json:
        path = Path(args.batch_input_json)
        try:
            items = json.loads(path.read_text())
            jobs = [{"prompt": str(i["prompt"]), "path": Path(i["output_image"])} for i in items]
        except (OSError, ValueError, KeyError, TypeError) as e:
            parser.error(f"--batch_input_json {path}: expected a JSON list of {{prompt, output_image}} ({e})")
        if not jobs:
            parser.error(f"--batch_input_json {path}: the list is empty; add {{prompt, output_image}} entries.")
        empty = [i for i, job in enumerate(jobs) if not job["prompt"].strip()]
        if empty:
            parser.error(f"--batch_input_json {path}: entries {empty[:5]} have an empty prompt; give each the text "
                         "of its image.")
    elif args.prompt is None:
        parser.error("give --prompt (with --save_path) or --batch_input_json.")
    elif not args.prompt.strip():
        parser.error("--prompt is empty (an unset shell variable?): give the text of the image to generate.")
    else:
        jobs = [{"prompt": args.prompt, "path": Path(args.save_path)}]
    for job in jobs:
        suffix = job["path"].suffix.lower()
        if suffix in (".mp4", ".avi", ".mov", ".gif"):
            logger.warning("%s: Text2Image writes images; saving %s instead", job["path"],
                           job["path"].with_suffix(".jpg"))
            job["path"] = job["path"].with_suffix(".jpg")
        elif suffix not in (".jpg", ".jpeg", ".png", ".webp"):
            parser.error(f"{job['path']}: unsupported extension; use .jpg or .png.")
    for folder in sorted({j["path"].parent for j in jobs}):  # fail now, not after minutes of loading models
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".write_test_{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            parser.error(f"cannot write images to {folder} ({e.strerror}); choose another --save_path.")
    if args.num_images > 1:
        jobs = [{"prompt": j["prompt"], "path": j["path"].with_name(f"{j['path'].stem}_{i}{j['path'].suffix}"),
                 "index": i} for j in jobs for i in range(args.num_images)]
    return jobs


def main(argv=None):
    parser = build_parser()
    args = parse_with_config(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    family = get_family(args.family)
    apply_family_defaults(args)
    check_numbers(args, parser)
    jobs = resolve_jobs(args, parser)
    height, width = image_size_for(args.resolution, args.aspect_ratio)
    height, width = args.height or height, args.width or width
    if height % 16 or width % 16:
        parser.error(f"--height/--width must be multiples of 16, got {height}x{width}.")
    if not args.vae_path:
        parser.error(f"--vae_path is required (a diffusers {family.vae_class} folder or its single file; "
                     "Predict2: NVIDIA tokenizer.pth).")
    if not args.dit_path and not args.model_size:
        parser.error("--dit_path is required (or --model_size alone for a randomly initialised model).")
    if args.fp8:
        from cosmos_t2i.fp8 import fp8_unavailable
        if args.dtype != "bf16":
            parser.error("--fp8 quantizes a bf16 model: use --dtype bf16 (the default).")
        if problem := fp8_unavailable("inference"):
            parser.error(problem)
    if args.fp8 and requested(args.blocks_to_swap):
        parser.error("--blocks_to_swap and --fp8 do not combine: swap bf16 blocks, or use --fp8 alone.")
    for flag in ("dit_path", "vae_path", "lora_path", "base_dit_path", "text_encoder"):
        value = getattr(args, flag)
        hub_id = flag in ("dit_path", "text_encoder") and value and value.count("/") == 1 and value[0] not in "/."
        if value and not Path(value).exists() and not hub_id:
            parser.error(f"--{flag} {value}: no such file or folder.")

    from cosmos_t2i.models import quiet_library_logs
    from cosmos_t2i.pipeline import CosmosText2Image, encode_prompts_once

    quiet_library_logs()  # here, not first: a flag error needs no diffusers imported
    if args.compile:
        keep_compile_cache()
    start = time.perf_counter()
    has_negative = args.negative_prompt is not None  # Predict2's default has none: a zero embedding
    prompts = sorted({j["prompt"] for j in jobs}) + ([args.negative_prompt] if has_negative else [])
    if args.offload_text_encoder:  # the encoder alone first, then the DiT and VAE: peak = the larger phase, not the sum
        device = "cuda" if torch.cuda.is_available() else "cpu"
        text = encode_prompts_once(family, args.text_encoder, prompts, device, load_in_8bit=args.text_encoder_8bit)
    pipe = CosmosText2Image.from_pretrained(
        dit_path=args.dit_path, vae_path=args.vae_path,
        text_encoder=None if args.offload_text_encoder else args.text_encoder, model_size=args.model_size,
        load_ema=args.load_ema, lora_path=args.lora_path, lora_scale=args.lora_scale,
        base_dit_path=args.base_dit_path, dtype=DTYPES[args.dtype], text_encoder_8bit=args.text_encoder_8bit,
        compile=args.compile, fp8=args.fp8, family=family, blocks_to_swap=args.blocks_to_swap,
        cuda_graphs=args.cuda_graphs)
    logger.info("loaded in %.1f s on %s", time.perf_counter() - start, pipe.device)
    # each prompt's context once (Anima: its text adapter runs here, not at every step)
    embeddings = pipe.context(text) if args.offload_text_encoder else pipe.encode(prompts)
    embedded = dict(zip(prompts, embeddings))
    negative = embedded[args.negative_prompt] if has_negative else None

    cuda = pipe.device.type == "cuda"
    seconds = []
    for job in tqdm(jobs, desc="images", disable=len(jobs) == 1):
        tick = time.perf_counter()
        seed = args.seed + job.get("index", 0)
        bar = tqdm(total=args.distill_steps or args.num_steps, desc="sampling", leave=False)
        latents = pipe.sample_latents(embedded[job["prompt"]][None], None if negative is None else negative[None],
                                      [seed], height, width, args.guidance, args.num_steps, args.sampler,
                                      args.distill_steps, progress=lambda: bar.update(1), shift=args.shift)
        bar.close()
        image = pipe.decode(latents)[0]  # to PIL: waits for the GPU
        seconds.append(time.perf_counter() - tick)
        job["path"].parent.mkdir(parents=True, exist_ok=True)
        image.save(job["path"], quality=args.jpeg_quality)  # (PIL's default JPEG quality is 75)
        settings = {k: getattr(args, k) for k in ("family", "dit_path", "load_ema", "lora_path", "lora_scale",
                                                  "guidance", "num_steps", "sampler", "shift", "distill_steps",
                                                  "dtype", "fp8")}
        job["path"].with_suffix(".txt").write_text(
            f"prompt: {job['prompt']}\nnegative_prompt: {args.negative_prompt or ''}\nseed: {seed}\n"
            f"size: {width}x{height}\n" + "".join(f"{k}: {v}\n" for k, v in settings.items()))
        logger.info("saved %s (%.2f s)", job["path"], seconds[-1])
    steady = seconds[1:] or seconds  # the first image includes compilation and warm-up
    logger.info("%d image(s): %.2f s per image%s%s", len(seconds), sum(steady) / len(steady),
                f" after the first ({seconds[0]:.2f} s)" if len(seconds) > 1 else "",
                f"; GPU peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GB allocated, "
                f"{torch.cuda.max_memory_reserved() / 2 ** 30:.1f} GB reserved" if cuda else "")


if __name__ == "__main__":
    run_main(main, "infer_text2image.py")
