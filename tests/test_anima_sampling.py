"""Anima sampling: our pipeline against diffusers' AnimaModularPipeline (0.42.1) on tiny random models, the
flow-matching Euler pieces against FlowMatchEulerDiscreteScheduler, LoRA, validation images (FSDP2 too), and the
CLI end to end."""

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_script
from PIL import Image

from cosmos_t2i import flow
from cosmos_t2i.families import ANIMA
from cosmos_t2i.pipeline import CosmosText2Image

WORDS = "a red circle blue square green yellow triangle on white black background small large blurry".split()
STEPS = 6  # the comparisons' step count: every step is the same arithmetic; test_defaults_are_the_reference_s checks 50


def word_tokenizer(folder: Path, end_token: bool) -> None:
    """A word-level tokenizer (pad 0, </s> 1, unk 2): T5's stand-in appends </s>, Qwen's adds nothing."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}},
                                     unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    if end_token:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                            model_max_length=512).save_pretrained(folder)


def write_tiny_anima(out: Path, seed: int = 0) -> Path:
    """A tiny random Anima diffusers folder: the tiny DiT, the tiny adapter, a 64-wide Qwen3, word tokenizers, the tiny example's VAE as AutoencoderKLQwenImage
    (the same architecture and keys as its Wan VAE) and the shift-3 scheduler."""
    from diffusers import (AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)
    from safetensors.torch import load_file
    from transformers import Qwen3Config, Qwen3Model

    from cosmos_t2i.registry import anima_conditioner_config, transformer_config

    root = Path(__file__).resolve().parents[1]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        dit = CosmosTransformer3DModel(**transformer_config("tiny"))
        for block in dit.transformer_blocks:  # a text that matters: cross-attention values scaled up
            block.attn2.to_k.weight.data *= 4
            block.attn2.to_v.weight.data *= 30
        dit.save_pretrained(out / "transformer")
        AnimaTextConditioner(**anima_conditioner_config("tiny")).save_pretrained(out / "text_conditioner")
        Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0)
                   ).save_pretrained(out / "text_encoder")
    word_tokenizer(out / "tokenizer", end_token=False)
    word_tokenizer(out / "t5_tokenizer", end_token=True)
    config = json.loads((root / "examples/tiny/vae/config.json").read_text())
    vae = AutoencoderKLQwenImage(**{k: config[k] for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks",
                                                           "attn_scales", "temperal_downsample", "dropout",
                                                           "latents_mean", "latents_std")})
    vae.load_state_dict(load_file(root / "examples/tiny/vae/diffusion_pytorch_model.safetensors"), strict=True)
    vae.save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(out / "scheduler")
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_anima(tmp_path_factory.mktemp("anima_models"))


def reference_pipeline(folder: Path, dtype=torch.float32):
    """diffusers' AnimaModularPipeline assembled from the folder's components (no network)."""
    from diffusers import (AnimaTextConditioner, AutoencoderKLQwenImage, CosmosTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)
    from diffusers.modular_pipelines import AnimaAutoBlocks
    from transformers import AutoTokenizer, Qwen3Model

    pipe = AnimaAutoBlocks().init_pipeline()
    pipe.update_components(
        transformer=CosmosTransformer3DModel.from_pretrained(folder / "transformer", torch_dtype=dtype).eval(),
        text_conditioner=AnimaTextConditioner.from_pretrained(folder / "text_conditioner", torch_dtype=dtype).eval(),
        text_encoder=Qwen3Model.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval(),
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        t5_tokenizer=AutoTokenizer.from_pretrained(folder / "t5_tokenizer"),
        vae=AutoencoderKLQwenImage.from_pretrained(folder / "vae", torch_dtype=dtype).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"))
    return pipe


def ours(folder: Path, dtype=torch.float32, **kwargs) -> CosmosText2Image:
    return CosmosText2Image.from_pretrained(dit_path=str(folder), vae_path=str(folder), text_encoder=str(folder),
                                            family="anima", device="cpu", dtype=dtype, **kwargs)


def relative_error(actual, expected) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


# ---------------------------------------------------------------- the flow-matching Euler pieces
@pytest.mark.parametrize("num_steps", [1, 2, 7, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.5])
def test_sigmas_are_the_schedulers_bit_for_bit(num_steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps))  # as AnimaSetTimestepsStep
    ours_ = flow.flow_match_sigmas(num_steps, shift)
    assert ours_.dtype == torch.float32 and torch.equal(ours_, scheduler.sigmas)
    assert torch.equal(ours_[:-1] * flow.NUM_TRAIN_TIMESTEPS, scheduler.timesteps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_euler_steps_are_the_schedulers_in_every_dtype(dtype):
    """x in fp32 for the update, stored in the velocity's dtype (bf16 between steps for a bf16 model), as
    FlowMatchEulerDiscreteScheduler.step does; checked bit for bit with a velocity of the state."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 9, 9))
    x0 = torch.randn(2, 16, 1, 4, 6, generator=torch.Generator().manual_seed(0))

    def velocity(x, sigma):
        return (torch.sin(3 * x.float()) * sigma - x.float()).to(dtype)
    expected = x0.clone()
    for t, sigma in zip(scheduler.timesteps, scheduler.sigmas):
        expected = scheduler.step(velocity(expected, sigma), t, expected, return_dict=False)[0]
    got = flow.sample_flow_euler(velocity, x0.clone(), flow.flow_match_sigmas(9, 3.0))
    assert got.dtype == expected.dtype == dtype and torch.equal(got, expected)


def test_velocity_guidance_and_timestep_are_the_pipelines():
    """v = u + g (c - u) from one batched forward at timestep (sigma * 1000 in the model dtype) / 1000; guidance 1
    runs the conditional half alone (diffusers' guider skips the unconditional pass)."""
    calls = []

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))

        def forward(self, hidden_states, timestep, encoder_hidden_states, padding_mask, return_dict):
            calls.append(timestep)
            return (hidden_states * self.w + encoder_hidden_states.mean((1, 2)).view(-1, 1, 1, 1, 1),)
    model, x = Model(), torch.randn(1, 16, 1, 2, 2)
    cond, uncond, mask = torch.full((1, 4, 8), 2.0), torch.full((1, 4, 8), -1.0), torch.zeros(1, 1, 16, 16)
    sigma = flow.flow_match_sigmas(7, 3.0)[3]
    v = flow.make_velocity_denoiser(model, cond, uncond, 4.0, mask)(x, sigma)
    assert torch.equal(calls[0], (sigma * 1000).expand(2).to(torch.bfloat16) / 1000) and len(calls) == 1
    with torch.no_grad():
        c, u = (model(x.bfloat16(), None, text.bfloat16(), None, False)[0] for text in (cond, uncond))
    assert v.dtype == torch.bfloat16 and torch.equal(v, u + 4.0 * (c - u))
    assert torch.equal(flow.make_velocity_denoiser(model, cond, uncond, 1.0, mask)(x, sigma), c)
    assert len(calls[-1]) == 1


# ---------------------------------------------------------------- against diffusers' AnimaModularPipeline
def test_defaults_are_the_reference_s(folder):
    """Steps, guidance, shift, sampler and negative prompt "": the family's are the reference pipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines import AnimaAutoBlocks

    reference = reference_pipeline(folder)
    defaults = {p.name: p.default for p in AnimaAutoBlocks().inputs if p.name}
    assert ANIMA.num_steps == defaults["num_inference_steps"] == 50
    assert ANIMA.guidance == reference.guider.guidance_scale == 4.0 and not reference.guider.use_original_formulation
    assert ANIMA.shift == reference.scheduler.config.shift == 3.0 and ANIMA.sampler == "flow_euler"
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 50, 50))
    assert torch.equal(flow.flow_match_sigmas(ANIMA.num_steps, ANIMA.shift), scheduler.sigmas)
    assert ANIMA.negative_prompt == "" and defaults["negative_prompt"] is None  # encode_prompt: None means ""
    # the default negative, made without the encoder from the prompt's own inputs, is the reference's context
    negative = reference(prompt="a red circle", num_inference_steps=1, height=32, width=32,
                         output="negative_prompt_embeds")
    pipe = ours(folder)
    text = pipe.text_inputs(["a red circle"])
    assert relative_error(pipe.context(pipe.default_negative(text, None)), negative) < 1e-6
    assert relative_error(pipe.encode([""]), negative) < 1e-6


CASES = {  # name: (prompts, pipeline settings)
    "defaults": (["a red circle"], {}),
    "non_square": (["a blue square on white background"], dict(height=48, width=80)),
    "batch_of_two": (["a red circle", "a large green triangle on black background"],
                     dict(height=32, width=64, negative_prompt="blurry", guidance=2.5)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sampling_reproduces_anima_modular_pipeline(folder, case):
    """The same seed gives the reference's latents and image: with its defaults (at STEPS steps), at a non-square
    size, and for a batch of two prompts with a negative prompt (image i seeded seed + i)."""
    prompts, settings = CASES[case]
    height, width = settings.get("height", 64), settings.get("width", 64)
    reference = reference_pipeline(folder)
    if "guidance" in settings:
        reference.guider.guidance_scale = settings["guidance"]
    generators = [torch.Generator().manual_seed(7 + i) for i in range(len(prompts))]
    expected = reference(prompt=prompts, negative_prompt=settings.get("negative_prompt"), height=height, width=width,
                         generator=generators, num_inference_steps=STEPS, output=["latents", "images"],
                         output_type="pt")
    pipe = ours(folder)
    text = pipe.text_inputs(prompts)
    negative = pipe.text_inputs([settings["negative_prompt"]]) if "negative_prompt" in settings else None
    latents = pipe.sample_latents(text, negative, seeds=[7, 8][:len(prompts)], height=height, width=width,
                                  guidance=settings.get("guidance"), num_steps=STEPS)
    assert latents.shape == expected["latents"].shape == (len(prompts), 16, 1, height // 8, width // 8)
    assert relative_error(latents, expected["latents"]) < 1e-5
    from cosmos_t2i.models import decode_latents
    images = (decode_latents(pipe.vae, latents) + 1) / 2
    assert (images - expected["images"].clamp(0, 1)).abs().max() < 1e-4
    # the PIL images of __call__ (negative "" by default) are the reference's 8-bit images, level for level
    pil = pipe(prompts, negative_prompt=settings.get("negative_prompt"), seed=7, height=height, width=width,
               guidance=settings.get("guidance"), num_steps=STEPS)
    levels = np.stack([np.asarray(p) for p in pil]).astype(int)
    reference_levels = np.round(expected["images"].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(int)
    assert np.abs(levels - reference_levels).max() <= 1 and (levels == reference_levels).mean() > 0.99


@pytest.mark.parametrize("form", ["diffusers", "comfyui"])
def test_lora_merged_reproduces_diffusers_applying_it(folder, tmp_path, form):
    """A LoRA on the DiT, merged into the weights by load_dit (lora_path), samples what the reference samples with
    the same file loaded through its AnimaLoraLoaderMixin (PEFT layers beside the weights, not merged)."""
    from diffusers import CosmosTransformer3DModel
    from safetensors.torch import save_file

    from cosmos_t2i.lora_formats import save_diffusers_adapter, to_comfyui
    g = torch.Generator().manual_seed(5)
    modules = dict(CosmosTransformer3DModel.from_pretrained(folder / "transformer").named_modules())
    rank, alpha = 4, 8.0 if form == "diffusers" else 4.0  # ComfyUI files without alpha entries: alpha = rank
    adapter = {name: {"A": torch.randn(rank, modules[name].in_features, generator=g) * 0.3,
                      "B": torch.randn(modules[name].out_features, rank, generator=g) * 0.3, "alpha": alpha}
               for name in [f"transformer_blocks.{i}.{m}" for i in range(2)
                            for m in ("attn1.to_q", "attn1.to_v", "attn2.to_q", "ff.net.0.proj")]}
    if form == "diffusers":
        path = save_diffusers_adapter(adapter, tmp_path / "lora")
    else:  # diffusers refuses ComfyUI's .alpha entries (no "lora" in their names)
        path = tmp_path / "lora.safetensors"
        save_file({k: v for k, v in to_comfyui(adapter).items() if not k.endswith(".alpha")}, str(path))
    reference = reference_pipeline(folder)
    call = dict(prompt="a red circle", height=32, width=48, num_inference_steps=STEPS, output="latents")
    plain = reference(generator=torch.Generator().manual_seed(1), **call)
    reference.load_lora_weights(str(path))
    expected = reference(generator=torch.Generator().manual_seed(1), **call)
    pipe = ours(folder, lora_path=str(path))
    latents = pipe.sample_latents(pipe.text_inputs(["a red circle"]), seeds=[1], height=32, width=48,
                                  num_steps=STEPS)
    assert relative_error(expected, plain) > 0.05  # the LoRA matters
    assert relative_error(latents, expected) < 1e-5


def test_bf16_sampling_follows_the_reference(folder):
    """In bf16 (the model dtype; latents kept in bf16 between steps, as diffusers keeps them) the reference's
    latents: the adapter's inputs are cut to the longest caption as diffusers pads them, so even 16-bit rounding
    agrees (batched cond/uncond and the lean attention processor could still round differently elsewhere)."""
    reference = reference_pipeline(folder, torch.bfloat16)
    expected = reference(prompt="a red circle", height=32, width=32, generator=torch.Generator().manual_seed(2),
                         num_inference_steps=STEPS, output="latents")
    pipe = ours(folder, torch.bfloat16)
    latents = pipe.sample_latents(pipe.text_inputs(["a red circle"]), seeds=[2], height=32, width=32,
                                  num_steps=STEPS)
    assert latents.dtype == expected.dtype == torch.bfloat16
    assert relative_error(latents, expected) < 1e-3  # measured: 0 (bit for bit) on an x86 CPU


def test_validation_images_take_adapter_inputs_or_contexts(folder, tmp_path):
    """save_validation_images with the family: the validation prompts' adapter inputs (on the CPU, no encoder:
    the negative "" is made from them), or their contexts with the negative's, give the pipeline's own images."""
    from cosmos_t2i.pipeline import save_validation_images

    pipe = ours(folder)
    text = pipe.text_inputs(["a red circle", "a blue square"])
    expected = [np.asarray(im).astype(int) for im in pipe(None, embeddings=text, seed=4, height=32, width=48,
                                                          num_steps=STEPS)]
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext, is_main_process=True,
                                  trackers=[])
    for name, given, negative in (("inputs", {k: v.cpu() for k, v in text.items()}, None),
                                  ("contexts", pipe.context(text), pipe.encode([""]))):
        save_validation_images(accelerator, pipe.transformer, pipe.vae, given, 3, tmp_path / name, (32, 48),
                               num_steps=STEPS, seed=4, family=ANIMA, negative=negative)
        saved = [np.asarray(Image.open(tmp_path / name / f"iter_000000003_{i}.jpg")).astype(int) for i in range(2)]
        assert [im.shape for im in saved] == [(32, 48, 3)] * 2
        assert all(np.abs(s - e).mean() < 2 for s, e in zip(saved, expected))  # JPEG: close, not equal
    with pytest.raises(ValueError, match="negative prompt '' needs its text encoder"):
        CosmosText2Image(pipe.transformer, pipe.vae, family=ANIMA).sample_latents(
            pipe.context(text), height=32, width=32, num_steps=1)


FSDP_SCRIPT = """
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from cosmos_t2i.anima import new_anima, text_inputs
from cosmos_t2i.distributed import release_gathered_weights
from cosmos_t2i.pipeline import text_context
dist.init_process_group("gloo")
torch.manual_seed(0)
model = new_anima("tiny").eval()
g = torch.Generator().manual_seed(1)
text = text_inputs(torch.randn(2, 512, 64, generator=g), (torch.arange(512) < 5).long().expand(2, -1),
                   torch.randint(3, 60, (2, 512), generator=g), (torch.arange(512) < 7).long().expand(2, -1))
expected = text_context(model, text)
for block in model.transformer_blocks:
    fully_shard(block)
fully_shard(model)  # the adapter is sharded with the root, as under Accelerate's FSDP2
got = text_context(model, text)
release_gathered_weights(model)
assert type(next(model.text_conditioner.parameters())).__name__ == "DTensor"
assert torch.equal(got, expected)
print("context equal on rank", dist.get_rank())
dist.destroy_process_group()
"""


def test_context_under_fsdp2_equals_the_unsharded_model_s(tmp_path):
    """Validation under FSDP2 computes each prompt's context once from the sharded adapter (gathered with the
    root, released after): the unsharded model's context, on 2 CPU processes."""
    import os
    script = tmp_path / "fsdp_context.py"
    script.write_text(FSDP_SCRIPT)
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    result = run_script("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, env=env)
    assert result.stdout.count("context equal on rank") == 2


# ---------------------------------------------------------------- the CLI
@pytest.fixture
def cli_models(request, folder):
    """The tiny bundle's Anima folder (conftest's anima_bundle) where there is one, else this module's."""
    try:
        return request.getfixturevalue("anima_bundle") / "models"
    except pytest.FixtureLookupError:
        return folder


def test_cli_family_anima_writes_the_reference_image(cli_models, tmp_path):
    """infer_text2image.py --family anima with the family's defaults (bar steps): the reference's image for the
    seed, the settings beside it; --offload_text_encoder (encoder first, alone) gives the same image."""
    common = ["infer_text2image.py", "--family", "anima", "--dit_path", cli_models, "--vae_path", cli_models,
              "--text_encoder", cli_models, "--prompt", "a red circle", "--num_steps", "3", "--height", "48",
              "--width", "64", "--dtype", "fp32", "--seed", "5"]
    run_script(*common, "--save_path", tmp_path / "kept.png")
    run_script(*common, "--save_path", tmp_path / "offloaded.png", "--offload_text_encoder")
    image = np.asarray(Image.open(tmp_path / "kept.png")).astype(int)
    assert image.shape == (48, 64, 3)
    assert np.array_equal(image, np.asarray(Image.open(tmp_path / "offloaded.png")))
    settings = (tmp_path / "kept.txt").read_text()
    for line in ("family: anima", "sampler: flow_euler", "guidance: 4.0", "shift: 3.0", "num_steps: 3",
                 "negative_prompt: \n", "seed: 5", "size: 64x48"):
        assert line in settings, (line, settings)
    expected = reference_pipeline(cli_models)(prompt="a red circle", height=48, width=64, num_inference_steps=3,
                                              generator=torch.Generator().manual_seed(5), output="images")[0]
    expected = np.asarray(expected).astype(int)
    assert np.abs(image - expected).max() <= 1 and (image == expected).mean() > 0.99
