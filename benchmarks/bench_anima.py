"""Anima against diffusers on one GPU: random weights at the real shapes, 1024x1024 (4096 tokens). One JSON line
per measurement (common.report: appended to benchmarks/results.jsonl).

    python benchmarks/bench_anima.py --work /tmp/anima_bench      # every default run, in ORDER (about 9 min, H100)
    # the same in two calls that each fit a 10-minute limit (ratios within each call; the work folder is shared):
    python benchmarks/bench_anima.py --work /tmp/anima_bench --runs baseline_lora ours_lora ours_lora_lowmem \\
        ours_lora_swap_all ours_full_24gb                                                    # about 4 min
    python benchmarks/bench_anima.py --work /tmp/anima_bench --runs baseline_image ours_image ours_image_compile \\
        ours_image_fp8 predict2_14b_lora_swap                                                # about 5 min
    python benchmarks/bench_anima.py --tiny                       # CPU check (about 2.5 min): tiny shapes, prints only

Shapes: the 2B Anima DiT (28 blocks, 2048 wide), the AnimaTextConditioner of the released model (6 blocks, 1024
wide), a Qwen3-0.6B-shaped text encoder (28 layers, 1024 wide), the Qwen-Image VAE (AutoencoderKLQwenImage's
defaults); tokenizers are the tiny bundle's locally built ones (examples/tiny/make_assets.py), no network.

Runs (each "ours" line names its baseline and the ratio when both ran in this invocation, or in an earlier one on the
same --work folder and the same device, which the line then says):

  baseline_lora         diffusers' plain LoRA step: CosmosTransformer3DModel in bf16, eager, PEFT LoRA r32 on
                        to_q/to_k/to_v/to_out.0 (attn1 and attn2), the frozen AnimaTextConditioner run on Qwen states
                        and T5 ids each step, batch 1, torch AdamW, rectified-flow loss; s/step (median after warm-up,
                        synced per step) and torch.cuda.max_memory_allocated; then again with
                        enable_gradient_checkpointing() (line baseline_lora_ckpt)
  baseline_image        diffusers' AnimaModularPipeline at its defaults (50 steps, CFG 4, 1024x1024) from a local
                        folder of random components (save_pretrained), all bf16 on the GPU; s/image and peak
  ours_image[...]       CosmosText2Image(family="anima") on the same folder, same prompt and defaults, text encoding
                        and VAE decode included; IMAGE_RUNS names the variants (eager, --compile, --fp8 + --compile);
                        a compiled variant's first image (compile included) is reported apart as first_image_s
  ours_lora ... (TRAINER_RUNS) train_text2image.py as a subprocess (bench_multi_gpu.launch) on a synthetic Anima
                        dataset (bench_multi_gpu.make_anima_dataset, latents cached here first so that no run's peak
                        holds the VAE encoder); s/iter and peak GPU memory as the trainer logs them
                        (bench_multi_gpu.parse_log: median of --log_every windows after --skip iterations)
  predict2_14b_lora_swap  the same for Predict2 14B at 768x1360 (bench_multi_gpu.make_dataset)

Large files (the model folder, a written 14B base, run folders) are deleted at the end unless --keep.
"""

import argparse
import gc
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "examples" / "tiny"))

# ---------------------------------------------------------------- recipes (edit here)
# Words of the tiny tokenizers' vocabularies, so that both tokenizers give about one token per word (~75 tokens).
PROMPT = ("a large bright red circle on a dark blue background with a small yellow square and a green triangle, "
          "an image of a teal robot in the picture, a photo of a white square on a black background, small and "
          "large shapes, a bright yellow circle with a dark green square, a blue triangle on a white background, "
          "the robot with a red circle and a small teal square in the photo")

LORA_R32 = ["--train_architecture", "lora", "--lora_rank", "32", "--lora_alpha", "32",
            "--lora_target_modules", "q_proj,k_proj,v_proj,output_proj",  # attn1 and attn2: to_q, to_k, to_v, to_out.0
            "--batch_size", "1", "--no-ema", "--compile"]  # no EMA: the baseline has none
# name: (family, flags, the baseline its ratio is taken against)
TRAINER_RUNS = {
    "ours_lora": ("anima", LORA_R32, "baseline_lora"),
    "ours_lora_lowmem": ("anima", [*LORA_R32, "--gradient_checkpointing", "--lora_base_dtype", "fp8"],
                         "baseline_lora_ckpt"),
    # the last 6 blocks' base streamed from host memory and only those checkpointed: less memory, little time
    "ours_lora_swap6": ("anima", [*LORA_R32, "--blocks_to_swap", "6"], "baseline_lora"),
    # ours_lora with 4 iterations profiled (the log's per-phase and per-kernel-kind times, a trace in the run folder)
    "ours_lora_profile": ("anima", [*LORA_R32, "--profile_iters", "4"], "baseline_lora"),
    # checkpointing every block with no swap: what --blocks_to_swap all costs on top of it
    "ours_lora_ckpt": ("anima", [*LORA_R32, "--gradient_checkpointing"], "baseline_lora_ckpt"),
    # the low-memory recipe without fp8's dequantisation: the last 8 blocks' bf16 base streamed instead
    "ours_lora_ckpt_swap8": ("anima", [*LORA_R32, "--gradient_checkpointing", "--blocks_to_swap", "8"],
                             "baseline_lora_ckpt"),
    "ours_lora_swap_all": ("anima", [*LORA_R32, "--gradient_checkpointing", "--blocks_to_swap", "all"],
                           "baseline_lora_ckpt"),
    "ours_lora_swap_all_fp8": ("anima", [*LORA_R32, "--gradient_checkpointing", "--blocks_to_swap", "all",
                                         "--lora_base_dtype", "fp8"], "baseline_lora_ckpt"),
    # the trainer's 24 GB recipe (docs/training.md): bf16 weights through StochasticAdamW; --optimizer adamw8bit is refused
    # with --weight_dtype bf16, so it is not part of it
    "ours_full_24gb": ("anima", ["--weight_dtype", "bf16", "--gradient_checkpointing", "--no-ema", "--batch_size", "1",
                                 "--compile"], None),
    # NVIDIA's LoRA (rank 16 on q/k/v/out and the MLP, the trainer's defaults) on an fp8 base, as the 14B row of docs/performance.md;
    # not in the default set: the 14B swap run's baseline, without block swap (results.jsonl line 13, H100: 17.9 GB, 0.789 s)
    "predict2_14b_lora_fp8": ("predict2", ["--train_architecture", "lora", "--lora_base_dtype", "fp8",
                                           "--gradient_checkpointing", "--batch_size", "1", "--compile"], None),
    # the same with the frozen base of the last 24 of 36 blocks in pinned host memory
    "predict2_14b_lora_swap": ("predict2", ["--train_architecture", "lora", "--lora_base_dtype", "fp8",
                                            "--gradient_checkpointing", "--blocks_to_swap", "24", "--batch_size", "1",
                                            "--compile"], "predict2_14b_lora_fp8"),
}
# name: CosmosText2Image.from_pretrained options; all against baseline_image
IMAGE_RUNS = {
    "ours_image": {},
    "ours_image_compile": {"compile": True},
    "ours_image_fp8": {"fp8": True, "compile": True},  # torchao float8 is slower than bf16 without compile
    "ours_image_swap_all": {"compile": True, "blocks_to_swap": "all"},  # small cards: every block streamed
}
CUDA_ONLY = {"ours_image_fp8": "torchao float8 matmuls need an H100-class GPU (compute capability 9.0)"}
ORDER = ["baseline_lora", "baseline_image", *IMAGE_RUNS, *TRAINER_RUNS]  # baselines first, then in-process runs
DEFAULT_RUNS = [r for r in ORDER if r not in ("predict2_14b_lora_fp8", "ours_lora_profile")]


# ---------------------------------------------------------------- helpers
def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Setup:
    """Sizes and places of this invocation (--tiny: the registry's tiny sizes and small images on the CPU)."""

    def __init__(self, args):
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.size = "tiny" if args.tiny else "2B"
        self.size_14b = "tiny" if args.tiny else "14B"
        self.side = 64 if args.tiny else 1024
        self.predict2_hw = (64, 112) if args.tiny else (768, 1360)
        self.work = Path(args.work) / ("tiny" if args.tiny else "real")
        self.work.mkdir(parents=True, exist_ok=True)
        self.folder = self.work / "anima_folder"
        self.args = args


# ---------------------------------------------------------------- results
class Results:
    """Emits each line (common.report on a GPU, a plain print with --tiny) and keeps baselines for the ratios,
    also in <work>/baselines.json for a later invocation on the same device."""

    def __init__(self, setup: Setup):
        self.setup, self.here = setup, {}
        self.file = setup.work / "baselines.json"
        self.device_name = torch.cuda.get_device_name() if setup.device.type == "cuda" else "cpu"

    def baseline(self, name):
        if name in self.here:
            return self.here[name], "this invocation"
        earlier = json.loads(self.file.read_text()) if self.file.exists() else {}
        entry = earlier.get(name)
        if entry and entry["device"] == self.device_name:
            return entry, f"an earlier invocation ({entry['time']}, same --work, same device)"
        return None, None

    def keep_baseline(self, name, seconds, peak):
        entry = {"seconds": seconds, "peak_gb": peak, "device": self.device_name,
                 "time": time.strftime("%Y-%m-%d %H:%M")}
        self.here[name] = entry
        earlier = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.file.write_text(json.dumps({**earlier, name: entry}, indent=1))

    def emit(self, line: dict, base_name=None, unit="sec_per_iter") -> None:
        if base_name:
            line["baseline"] = base_name
            base, source = self.baseline(base_name)
            if base is not None and line.get(unit):
                line[f"baseline_{unit}"] = base["seconds"]
                line["speedup"] = base["seconds"] / line[unit]
                if base["peak_gb"] and line.get("peak_gb"):
                    line["baseline_peak_gb"] = base["peak_gb"]
                    line["peak_vs_baseline"] = line["peak_gb"] / base["peak_gb"]
                if source != "this invocation":
                    line["baseline_from"] = source
        line = {"bench": "anima", **line}
        if self.setup.tiny:
            print(json.dumps({"device": "cpu (--tiny check)", **{k: round(v, 4) if isinstance(v, float) else v
                                                                    for k, v in line.items()}}), flush=True)
        else:
            from common import report
            report(line)


# ---------------------------------------------------------------- the model folder
def qwen3_config(tiny: bool, vocab: int):
    from transformers import Qwen3Config
    if tiny:  # the tiny bundle's text encoder (make_assets.write_anima)
        return Qwen3Config(vocab_size=-(-vocab // 64) * 64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=1024,
                           tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=0)
    # Qwen3-0.6B(-Base): 28 layers, 1024 wide, 16 query and 8 key/value heads of 128, MLP 3072, 151936 tokens
    return Qwen3Config(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, max_position_embeddings=40960,
                       rms_norm_eps=1e-6, tie_word_embeddings=True)


def write_anima_folder(setup: Setup) -> Path:
    """An Anima diffusers folder of random components at the setup's shapes, as the released one is laid out:
    transformer/, text_conditioner/, text_encoder/ (Qwen3Model), tokenizer/ (Qwen-style BPE), t5_tokenizer/, vae/,
    scheduler/ and modular_model_index.json (make_assets' functions). Kept across invocations until cleanup."""
    folder, done = setup.folder, setup.folder / ".complete"
    if done.exists():
        return folder
    from diffusers import AnimaTextConditioner, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Model

    import make_assets
    from bench_multi_gpu import make_anima_dataset
    from cosmos_t2i.models import new_transformer
    from cosmos_t2i.registry import anima_conditioner_config

    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    device, bf16 = setup.device, torch.bfloat16
    torch.manual_seed(0)
    new_transformer(setup.size, bf16, device).save_pretrained(folder / "transformer")
    free(device)
    with torch.device(device):
        conditioner = AnimaTextConditioner(**anima_conditioner_config(setup.size)).to(bf16)
    for name, p in conditioner.named_parameters():  # diffusers zero-initialises some layers: make every one count
        p.data = 1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
    conditioner.save_pretrained(folder / "text_conditioner")
    vocab = make_assets.write_qwen_tokenizer(folder / "tokenizer")
    make_assets.write_tokenizer(folder / "t5_tokenizer")
    with torch.device(device):
        Qwen3Model(qwen3_config(setup.tiny, vocab)).to(bf16).save_pretrained(folder / "text_encoder")
    conditioner = None
    free(device)
    _, vae = make_anima_dataset(setup.work, 0, setup.side, setup.side, setup.size)  # only its VAE (0 images)
    shutil.copytree(vae, folder / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    make_assets.write_modular_index(folder)
    done.write_text("")
    print(f"wrote {folder} in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


# ---------------------------------------------------------------- baseline_lora
def baseline_lora(setup: Setup, results: Results) -> None:
    """diffusers' plain LoRA step (see the module docstring), without and with gradient checkpointing."""
    for checkpointing in (False, True):
        name = "baseline_lora_ckpt" if checkpointing else "baseline_lora"
        start = time.perf_counter()
        try:
            seconds, peak, trainable = lora_step_time(setup, checkpointing)
        except Exception as e:  # report and go on
            results.emit({"run": name, "failed": f"{type(e).__name__}: {e}"[-1500:]})
            free(setup.device)
            continue
        results.keep_baseline(name, seconds, peak)
        results.emit({"run": name, "what": "diffusers LoRA training step", "model_size": setup.size,
                      "image_size": f"{setup.side}x{setup.side}", "sec_per_iter": seconds, "peak_gb": peak,
                      "trainable_params_m": trainable / 1e6, "wall_s": time.perf_counter() - start,
                      "flags": "bf16 eager, PEFT LoRA r32 alpha 32 on to_q,to_k,to_v,to_out.0 (attn1+attn2), frozen "
                               "AnimaTextConditioner per step, batch 1, torch.optim.AdamW lr 1e-4, rectified flow"
                               + (", enable_gradient_checkpointing()" if checkpointing else "")})


def lora_step_time(setup: Setup, checkpointing: bool) -> tuple[float, float | None]:
    from diffusers import AnimaTextConditioner
    from peft import LoraConfig

    from cosmos_t2i.anima import keep_rope_in_fp32
    from cosmos_t2i.models import new_transformer
    from cosmos_t2i.registry import anima_conditioner_config

    device, bf16, args = setup.device, torch.bfloat16, setup.args
    reset_peak(device)
    torch.manual_seed(0)
    transformer = new_transformer(setup.size, bf16, device).requires_grad_(False)
    adapter_config = anima_conditioner_config(setup.size)
    with torch.device(device):
        conditioner = AnimaTextConditioner(**adapter_config).to(bf16).eval().requires_grad_(False)
    keep_rope_in_fp32(conditioner)  # as from_pretrained(torch_dtype=bf16) leaves its RoPE frequencies
    transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side = setup.side
    x0 = torch.randn(1, 16, 1, side // 8, side // 8, device=device, dtype=bf16)  # a cached latent
    qwen = torch.randn(1, 120, adapter_config["source_dim"], device=device, dtype=bf16)  # precomputed Qwen3 states
    t5_ids = torch.randint(2, adapter_config["target_vocab_size"], (1, 100), device=device)
    padding_mask = torch.zeros(1, 1, side, side, device=device, dtype=bf16)

    def step():
        with torch.no_grad():
            context = conditioner(source_hidden_states=qwen, target_input_ids=t5_ids)
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(1, device=device))  # logit-normal, as the author's trainer
        xt = ((1 - t) * x0.float() + t * noise.float()).to(bf16)
        with torch.autocast(device.type, dtype=bf16):
            pred = transformer(hidden_states=xt, timestep=t.to(bf16), encoder_hidden_states=context,
                               padding_mask=padding_mask, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(args.iters):
        sync(device)
        tick = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - tick)
    peak = peak_gb(device)
    transformer = conditioner = optimizer = params = None
    free(device)
    return statistics.median(times[args.skip:] or times), peak, trainable


# ---------------------------------------------------------------- images
def size_kwargs(setup: Setup) -> dict:
    return {"height": setup.side, "width": setup.side}


def time_images(setup: Setup, generate) -> dict:
    """First image (compile included where there is one), then the median of --repeat images, synced."""
    device = setup.device
    sync(device)
    tick = time.perf_counter()
    generate()
    sync(device)
    first = time.perf_counter() - tick
    times = []
    for _ in range(setup.args.repeat):
        tick = time.perf_counter()
        generate()
        sync(device)
        times.append(time.perf_counter() - tick)
    return {"sec_per_image": statistics.median(times), "first_image_s": first, "peak_gb": peak_gb(device)}


def quiet_progress_bars(blocks) -> None:
    """The denoising loop's progress bar off (ModularPipeline.set_progress_bar_config reaches only the top blocks,
    not the loop nested below them)."""
    for block in getattr(blocks, "sub_blocks", {}).values():
        if hasattr(block, "set_progress_bar_config"):
            block.set_progress_bar_config(disable=True)
        quiet_progress_bars(block)


def baseline_image(setup: Setup, results: Results) -> None:
    from diffusers import ModularPipeline

    folder = write_anima_folder(setup)
    start = time.perf_counter()
    pipe = ModularPipeline.from_pretrained(str(folder))
    pipe.load_components(dtype=torch.bfloat16)
    pipe.to(setup.device)
    quiet_progress_bars(pipe._blocks)  # the pipeline's own blocks (its .blocks property is a copy)
    if not setup.tiny:  # its defaults are the benchmark's size
        assert (pipe.default_height, pipe.default_width) == (setup.side, setup.side)
    load_s = time.perf_counter() - start
    reset_peak(setup.device)  # the peak of generating, the loaded components included

    def generate():
        return pipe(prompt=PROMPT, generator=torch.Generator().manual_seed(0), output="images",
                    **(size_kwargs(setup) if setup.tiny else {}))
    out = time_images(setup, generate)
    images = generate()
    assert images[0].size == (setup.side, setup.side), images[0].size
    results.keep_baseline("baseline_image", out["sec_per_image"], out["peak_gb"])
    results.emit({"run": "baseline_image", "what": "diffusers AnimaModularPipeline image", "model_size": setup.size,
                  "image_size": f"{setup.side}x{setup.side}", **out, "load_s": load_s,
                  "wall_s": time.perf_counter() - start,
                  "flags": "defaults: 50 steps, guidance 4.0, negative '', bf16 components, text encoder resident"})
    pipe = None
    free(setup.device)


def ours_image(setup: Setup, results: Results, name: str) -> None:
    from cosmos_t2i.pipeline import CosmosText2Image

    options = IMAGE_RUNS[name]
    folder = write_anima_folder(setup)
    torch._dynamo.reset()  # each variant compiles afresh
    start = time.perf_counter()
    pipe = CosmosText2Image.from_pretrained(dit_path=str(folder), vae_path=str(folder), text_encoder=str(folder),
                                            family="anima", device=str(setup.device), dtype=torch.bfloat16, **options)
    load_s = time.perf_counter() - start
    reset_peak(setup.device)
    out = time_images(setup, lambda: pipe([PROMPT], seed=0, **size_kwargs(setup)))
    flags = "family defaults: flow_euler 50 steps, guidance 4.0, shift 3, negative ''; text encoding and VAE decode " \
            "included" + "".join(f", {k}={v}" for k, v in options.items())
    results.emit({"run": name, "what": "our CosmosText2Image image", "model_size": setup.size,
                  "image_size": f"{setup.side}x{setup.side}", **out, "load_s": load_s,
                  "wall_s": time.perf_counter() - start, "flags": flags},
                 "baseline_image", unit="sec_per_image")
    pipe = None
    free(setup.device)


# ---------------------------------------------------------------- trainer runs
def trainer_has_flag(flag: str) -> bool:
    try:
        from train_text2image import build_parser
        return flag in build_parser()._option_string_actions
    except Exception:  # can't tell: let the run say
        return True


def fill_latent_cache(setup: Setup, data: Path, vae: Path, image_size, family_name: str) -> None:
    """Encode the dataset into the latent cache the trainer reads (its default place and key), so that no timed
    run encodes (its logged peak would otherwise hold the VAE encoder's)."""
    from cosmos_t2i.data import ImageDataset
    from cosmos_t2i.families import get_family
    from cosmos_t2i.latent_cache import LatentCache
    from cosmos_t2i.models import load_vae

    family = get_family(family_name)
    dataset = ImageDataset(data, tuple(image_size), "resize", family=family)
    cache = LatentCache(dataset.source.root / "latents_cache", dataset, str(vae))
    stale = cache.stale()
    if stale:
        model = load_vae(str(vae), torch.bfloat16, setup.device, family)
        cache.fill(stale, model, setup.device, show_progress=False)
        model = None
        free(setup.device)


def tiny_flags(flags: list) -> list:
    """The tiny model has 2 blocks: a --blocks_to_swap count above that becomes 1."""
    out = list(flags)
    for i, flag in enumerate(out[:-1]):
        if flag == "--blocks_to_swap" and out[i + 1] != "all" and int(out[i + 1]) > 2:
            out[i + 1] = "1"
    return out


def trainer_run(setup: Setup, results: Results, name: str, port: int, base_14b: str | None) -> None:
    from bench_multi_gpu import launch, make_anima_dataset, make_dataset, parse_log

    args = setup.args
    family, flags, base_name = TRAINER_RUNS[name]
    if "--blocks_to_swap" in flags and not trainer_has_flag("--blocks_to_swap"):
        results.emit({"run": name, "skipped": "train_text2image.py has no --blocks_to_swap yet",
                      "flags": " ".join(flags)})
        return
    n_images = args.iters + 4  # batch 1: no image repeats
    if family == "anima":
        height = width = setup.side
        data, vae = make_anima_dataset(setup.work, n_images, height, width, setup.size)
        model = ["--model_size", setup.size, "--dit_path", "random"]
    else:
        height, width = setup.predict2_hw
        data, vae = make_dataset(setup.work, n_images, height, width)
        model = ["--model_size", setup.size_14b, "--dit_path", base_14b or "random"]
    fill_latent_cache(setup, data, vae, (height, width), family)
    flags = tiny_flags(flags) if setup.tiny else list(flags)
    run_dir = setup.work / "runs" / "posttraining" / "text2image" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    command = ["--family", family, *model, "--vae_path", vae, "--dataset_dir", data, "--image_size", height, width,
               "--cache_latents", "--num_workers", 1 if setup.tiny else 4, "--report_to", "none",
               "--logging_iter", args.log_every, "--hit_thres", 0, "--scheduler", "constant", "--lr", "1e-5",
               "--max_iter", args.iters, "--save_iter", 10 ** 6, "--no-final_save",
               "--output_root", setup.work / "runs", "--name", name, *flags]
    env = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"} if setup.tiny else {}
    config = "multi_gpu.yaml" if setup.tiny else "single_gpu.yaml"
    start = time.perf_counter()
    try:
        text = launch(config, 1, command, setup.work / f"{name}.log", port, env, timeout=args.launch_timeout)
    except RuntimeError as e:
        results.emit({"run": name, "failed": str(e)[-1500:], "flags": " ".join(map(str, flags))})
        return
    finally:
        if not args.keep:  # a profiled run's trace is in it
            shutil.rmtree(run_dir, ignore_errors=True)
    parsed = parse_log(text, args.skip, args.log_every)
    trainable = re.findall(r"([\d.]+)M trainable parameters", text)
    line = {"run": name, "what": "train_text2image.py step (its own log)", "family": family,
            "model_size": model[1], "image_size": f"{height}x{width}", "sec_per_iter": parsed.get("sec_per_iter"),
            "peak_gb": parsed.get("gpu_peak_allocated_gb"), "peak_reserved_gb": parsed.get("gpu_peak_reserved_gb"),
            "host_rss_gb_end": parsed.get("host_rss_gb_end"),
            "trainable_params_m": float(trainable[0]) if trainable else None, "wall_s": time.perf_counter() - start,
            "iters": args.iters, "skip": args.skip, "flags": " ".join(map(str, flags))}
    if "encoding" in text and "into the latent cache" in text:
        line["note"] = "the trainer encoded latents itself: its peak holds the VAE encoder"
    if model[3] != "random":
        line["dit_path"] = "a random 14B written to disk"
    results.emit({k: v for k, v in line.items() if v is not None}, base_name)


def write_14b_base(setup: Setup) -> str:
    """A random Predict2 14B diffusers folder (28 GB in bf16), for --base_14b file."""
    from cosmos_t2i.models import new_transformer

    path = setup.work / "predict2_14b_random"
    if not (path / ".complete").exists():
        shutil.rmtree(path, ignore_errors=True)
        start = time.perf_counter()
        new_transformer(setup.size_14b, torch.bfloat16, setup.device).save_pretrained(path)
        free(setup.device)
        (path / ".complete").write_text("")
        print(f"wrote {path} in {time.perf_counter() - start:.1f} s", flush=True)
    return str(path)


# ---------------------------------------------------------------- main
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=ORDER,
                        help="what to measure (run in the order of the list in this help, baselines first)")
    parser.add_argument("--work", default="/tmp/anima_bench", help="data, model folder, logs, baselines.json")
    parser.add_argument("--iters", type=int, default=12, help="training steps per run (baseline and trainer)")
    parser.add_argument("--skip", type=int, default=4, help="warm-up steps left out of the median")
    parser.add_argument("--log_every", type=int, default=2, help="the trainer's --logging_iter (one sync per window)")
    parser.add_argument("--repeat", type=int, default=2, help="timed images after the first (warm-up) image")
    parser.add_argument("--base_14b", choices=["random", "file"], default="random",
                        help="the 14B run's base: built randomly by the trainer (--dit_path random), or written to "
                             "<work>/predict2_14b_random once (28 GB) and loaded from there")
    parser.add_argument("--launch_timeout", type=int, default=300,
                        help="seconds before a trainer run is killed (reported as failed; the next run goes on)")
    parser.add_argument("--keep", action="store_true", help="keep the model folder, 14B base and run folders")
    parser.add_argument("--tiny", "--dry", action="store_true",
                        help="CPU check of this script: tiny registry sizes, 64x64 images; prints, writes nothing "
                             "to results.jsonl")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no GPU visible: run with --tiny for the CPU check.")
    setup = Setup(args)
    results = Results(setup)
    wanted = [r for r in ORDER if r in args.runs]
    start, base_14b = time.perf_counter(), None
    try:
        for i, name in enumerate(wanted):
            print(f"--- {name} ({time.perf_counter() - start:.0f} s so far)", flush=True)
            if setup.tiny and name in CUDA_ONLY:
                results.emit({"run": name, "skipped": f"CUDA only: {CUDA_ONLY[name]}"})
                continue
            try:
                if name == "baseline_lora":
                    baseline_lora(setup, results)
                elif name == "baseline_image":
                    baseline_image(setup, results)
                elif name in IMAGE_RUNS:
                    ours_image(setup, results, name)
                else:
                    if TRAINER_RUNS[name][0] == "predict2" and args.base_14b == "file" and base_14b is None:
                        base_14b = write_14b_base(setup)
                    free(setup.device)  # the trainer gets the whole card
                    trainer_run(setup, results, name, 29850 + i, base_14b)
            except Exception as e:  # report and go on with the next run
                import traceback
                traceback.print_exc()
                results.emit({"run": name, "failed": f"{type(e).__name__}: {e}"[-1500:]})
                free(setup.device)
    finally:
        if not args.keep:
            for path in (setup.folder, setup.work / "predict2_14b_random", setup.work / "runs"):
                shutil.rmtree(path, ignore_errors=True)
    print(f"--- done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
