"""Notebook API: load once, generate many times, get PIL images back. One class for every family (families.py).

    from cosmos_t2i.pipeline import CosmosText2Image
    pipe = CosmosText2Image.from_pretrained(dit_path="model.pt", model_size="2B", vae_path="tokenizer.pth",
                                            text_encoder="google-t5/t5-11b")
    images = pipe(["a robot arm stacking red cubes"], seed=0)

    anima = CosmosText2Image.from_pretrained(dit_path="Anima", vae_path="Anima", text_encoder="Anima", family="anima")
    images = anima(["1girl, watercolor"], seed=0)      # diffusers' AnimaModularPipeline's image for this seed

What differs between families is data, not branches: the family names its text side, its VAE and its sampling
defaults (sampler, steps, guidance, shift, negative prompt); samplers are looked up by name in SAMPLERS.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import flow
from .attention import use_lean_attention
from .families import PREDICT2, Family, get_family
from .models import decode_latents, load_dit, load_vae


# ---------------------------------------------------------------- samplers
@dataclass(frozen=True)
class Sampler:
    """A sampler: its starting noise for one seed (fp32, drawn on the CPU, so a seed gives the same image on any
    device), the fewest steps it runs, and its loop run(transformer, x, cond, uncond, guidance, num_steps, shift,
    padding_mask, progress) -> latents. Guidance follows the sampler's convention (see SAMPLERS)."""
    noise: Callable[[int, tuple], torch.Tensor]
    min_steps: int
    run: Callable


def edm_noise(seed: int, shape) -> torch.Tensor:
    """NVIDIA's: numpy RandomState(seed) at sigma_max."""
    return flow.initial_noise(seed, shape) * flow.SIGMA_MAX


def torch_noise(seed: int, shape) -> torch.Tensor:
    """diffusers' randn_tensor with torch.Generator().manual_seed(seed) (a CPU generator), at sigma 1."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def run_ab2(transformer, x, cond, uncond, guidance, num_steps, shift, padding_mask, progress):
    denoise = flow.make_denoiser(transformer, cond, uncond, guidance, padding_mask)
    return flow.sample_ab2(denoise, x, flow.karras_sigmas(num_steps), progress)


def run_euler(transformer, x, cond, uncond, guidance, num_steps, shift, padding_mask, progress):
    denoise = flow.make_denoiser(transformer, cond, uncond, guidance, padding_mask, x0_dtype=transformer.dtype)
    return flow.sample_euler(denoise, x, flow.euler_sigmas(num_steps).to(x.device), progress)


def run_flow_euler(transformer, x, cond, uncond, guidance, num_steps, shift, padding_mask, progress):
    velocity = flow.make_velocity_denoiser(transformer, cond, uncond, guidance, padding_mask)
    return flow.sample_flow_euler(velocity, x, flow.flow_match_sigmas(num_steps, shift).to(x.device), progress)


SAMPLERS = {
    # NVIDIA's RectifiedFlowAB2 over Karras sigmas; guidance on x0: x0 = c + g (c - u)
    "ab2": Sampler(edm_noise, 1, run_ab2),
    # diffusers' Cosmos2TextToImagePipeline, step for step (its last step is a no-op); guidance as ab2's
    "euler": Sampler(edm_noise, 2, run_euler),
    # diffusers' AnimaModularPipeline, step for step: shifted linspace sigmas; guidance on velocity v = u + g (c - u)
    "flow_euler": Sampler(torch_noise, 1, run_flow_euler),
}


def prepare_for_inference(transformer, fp8: bool = False, compile: bool = False, lean_attention: bool = True,
                          cuda_graphs: bool = False):
    """The lean attention processor (same arithmetic, fewer memory passes when not compiled; lean_attention=False
    keeps diffusers' for comparison), then float8 matmuls (fp8), per-block torch.compile and CUDA-graph replay of
    the samplers' transformer calls (cuda_graphs.py). Shared with benchmarks/profile_infer.py and bench_infer.py."""
    if lean_attention:
        use_lean_attention(transformer)
    if fp8:
        from .fp8 import quantize_for_fp8_inference
        quantize_for_fp8_inference(transformer)
    if compile:
        for block in transformer.transformer_blocks:
            block.compile()
    if cuda_graphs:
        from .cuda_graphs import sample_with_cuda_graphs
        sample_with_cuda_graphs(transformer)
    return transformer


# ---------------------------------------------------------------- text
def as_family(family) -> Family:
    """A Family, its name, or None (Predict2)."""
    return family if isinstance(family, Family) else get_family(family) if family else PREDICT2


def prompt_text(family: Family, encoder, prompts, device):
    """Prompts -> the family's text as its DiT takes it, exactly as the training data: a context (Predict2's
    zero-padded T5 embeddings [B,512,1024]) or the adapter's inputs (Anima)."""
    return family.text.prompt_inputs(encoder, list(prompts), device)


def encode_prompts_once(family, text_encoder: str, prompts, device, dtype=None, load_in_8bit: bool = False):
    """Load the family's text encoder, encode the prompts (prompt_text), free it: the encoder never shares the GPU
    with the DiT (inference's --offload_text_encoder, validation prompts). The text comes back on the CPU."""
    family = as_family(family)
    encoder = family.text.load_encoder(text_encoder, device, dtype, load_in_8bit=load_in_8bit)
    text = prompt_text(family, encoder, prompts, device)
    del encoder
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return text.cpu() if torch.is_tensor(text) else {k: v.cpu() for k, v in text.items()}


def batch_size(text) -> int:
    return len(text) if torch.is_tensor(text) else len(next(iter(text.values())))


@torch.no_grad()
def text_context(transformer, text) -> torch.Tensor:
    """The DiT's context [B,512,1024] of a family's text: a context tensor as it is; a text adapter's inputs (a dict,
    Anima's) through the DiT's adapter once, not at every step (anima.adapter_context)."""
    if torch.is_tensor(text):
        return text
    from .anima import adapter_context
    return adapter_context(transformer, text)


# ---------------------------------------------------------------- the pipeline
class CosmosText2Image:
    """DiT + VAE (+ optional text encoder) of one family with its sampler; call with prompts to get PIL images."""

    def __init__(self, transformer, vae, tokenizer=None, text_encoder=None, device="cpu", family=None):
        """`text_encoder`: the family's encoder as its text side's load_encoder returns it (Predict2's may also come
        as `tokenizer` and T5 model), or None: text then comes as embeddings=."""
        self.transformer, self.vae = transformer, vae
        self.encoder = text_encoder if tokenizer is None else (tokenizer, text_encoder)
        self.device = torch.device(device)
        self.family = as_family(family)

    @classmethod
    def from_pretrained(cls, dit_path=None, vae_path=None, text_encoder=None, model_size=None, load_ema=False,
                        lora_path=None, lora_scale=1.0, base_dit_path=None, device=None, dtype=torch.bfloat16,
                        text_encoder_dtype=None, text_encoder_8bit=False, compile=False, fp8=False, family=None,
                        blocks_to_swap=0, cuda_graphs=True):
        """Load every part of a family's model (a name, a Family, default Predict2): `dit_path` in any form
        load_dit reads (Anima: its diffusers folder, single file or our model files), `vae_path` its VAE,
        `text_encoder` its text encoder (Anima: the diffusers folder), None when prompts come as embeddings=.
        fp8=True runs the blocks' projections as float8 matmuls (torchao, H100-class GPU, bf16 dtype).
        blocks_to_swap (N or "all"): the last N blocks' weights stay in pinned host memory and stream to the GPU
        one block ahead (block_swap.py): the same images in less GPU memory. cuda_graphs: on a GPU, replay each
        sampling step's transformer call from a CUDA graph (cuda_graphs.py; not with blocks_to_swap, whose copies
        the host directs)."""
        family = as_family(family)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if vae_path is None:
            raise ValueError(f"Pass vae_path: a diffusers {family.vae_class} folder or its single file (Predict2: "
                             "NVIDIA's tokenizer.pth).")
        from .block_swap import requested, swap_blocks
        swap = requested(blocks_to_swap)
        if swap and fp8:
            raise ValueError("--blocks_to_swap and --fp8 do not combine: swap bf16 blocks, or use --fp8 alone.")
        transformer = load_dit(dit_path, model_size, load_ema, lora_path, lora_scale, base_dit_path, dtype,
                               "cpu" if swap else device, family=family)
        if swap:  # the rest of the model to the GPU, the swapped blocks' weights never
            swap_blocks(transformer, blocks_to_swap, device)
            transformer.to(device)
        transformer = prepare_for_inference(transformer, fp8, compile,
                                            cuda_graphs=cuda_graphs and device.type == "cuda" and not swap)
        vae = load_vae(vae_path, dtype, device, family=family)
        encoder = family.text.load_encoder(text_encoder, device, text_encoder_dtype,
                                           load_in_8bit=text_encoder_8bit) if text_encoder else None
        return cls(transformer, vae, None, encoder, device, family)

    def text_inputs(self, prompts) -> torch.Tensor | dict:
        """Prompts -> the family's text (prompt_text): T5 embeddings, or the adapter's inputs."""
        if self.encoder is None:
            raise ValueError("This pipeline has no text encoder (it was offloaded or never loaded): pass "
                             "embeddings=, or load with text_encoder=.")
        return prompt_text(self.family, self.encoder, prompts, self.device)

    def context(self, text) -> torch.Tensor:
        """The DiT's context [B,512,1024] of text_inputs' result (Anima: its adapter run once; see text_context)."""
        return text_context(self.transformer, text)

    def encode(self, prompts) -> torch.Tensor:
        """Prompts -> contexts [B,512,1024] (fp32): Predict2's zero-padded T5 embeddings exactly as the training
        data; Anima's adapter output."""
        return self.context(self.text_inputs(prompts))

    def offload_text_encoder(self) -> None:
        """Free the text encoder (encode every prompt first). For the lowest peak, encode with encode_prompts_once
        before loading the pipeline at all (the CLI's --offload_text_encoder), so it never meets the DiT."""
        self.encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def default_negative(self, text, cond):
        """The family's negative when none is given: none named (Predict2) is a zero context, NVIDIA's; the empty
        caption (Anima's "") is made from the prompts' own text inputs as caption dropout makes it (no encoder
        needed); any other negative prompt is encoded."""
        prompt = self.family.negative_prompt
        if prompt is None:
            return torch.zeros_like(cond)
        if prompt == "" and not torch.is_tensor(text):
            device = next(iter(text.values())).device
            return self.family.text.drop_captions(text, torch.zeros(batch_size(text), device=device))
        if self.encoder is None:
            raise ValueError(f"the {self.family.name} family's negative prompt {prompt!r} needs its text encoder: "
                             "pass negative_embeddings=, or the prompts' text inputs instead of contexts.")
        return self.text_inputs([prompt])

    def sample_latents(self, embeddings, negative_embeddings=None, seeds=(0,), height=768, width=1360,
                       guidance=None, num_steps=None, sampler=None, distill_steps=None, progress=None, shift=None):
        """Normalised latents [B,16,1,H/8,W/8], one seed per image. `embeddings`: contexts [B,512,1024] or the
        family's text inputs; `negative_embeddings` likewise (batch 1 or B), None for the family's negative.
        guidance, num_steps, sampler and shift (flow_euler's) default to the family's; height and width are any
        multiples of 16."""
        family = self.family
        guidance = family.guidance if guidance is None else guidance
        num_steps = family.num_steps if num_steps is None else num_steps
        shift = family.shift if shift is None else shift
        name = sampler or family.sampler
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height}x{width}.")
        if name not in SAMPLERS:
            raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {name!r}")
        chosen = SAMPLERS[name]
        if distill_steps:
            if not 1 <= distill_steps <= len(flow.DISTILL_SIGMAS):
                raise ValueError(f"distill_steps must be 1 to {len(flow.DISTILL_SIGMAS)}, got {distill_steps}.")
        elif num_steps < chosen.min_steps:
            raise ValueError(f"num_steps must be at least {chosen.min_steps} for the {name} sampler, got {num_steps}.")
        cond = self.context(embeddings).to(self.device)
        negative = self.default_negative(embeddings, cond) if negative_embeddings is None else negative_embeddings
        uncond = self.context(negative).to(self.device).expand(len(cond), -1, -1)
        shape = (1, self.transformer.config.in_channels, 1, height // 8, width // 8)
        noise = edm_noise if distill_steps else chosen.noise
        x = torch.cat([noise(int(s), shape) for s in seeds]).to(self.device)
        padding_mask = torch.zeros(1, 1, height, width, device=self.device)
        if distill_steps:  # NVIDIA's distilled 0.6B mode
            denoise = flow.make_denoiser(self.transformer, cond, None, 0.0, padding_mask)
            return flow.sample_distilled(denoise, x, distill_steps, int(seeds[0]), progress)
        return chosen.run(self.transformer, x, cond, uncond, guidance, num_steps, shift, padding_mask, progress)

    def decode(self, latents) -> list[Image.Image]:
        """Latents -> PIL images."""
        images = decode_latents(self.vae, latents)
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]

    def __call__(self, prompts, negative_prompt=None, seed=0, height=768, width=1360, guidance=None, num_steps=None,
                 sampler=None, distill_steps=None, embeddings=None, negative_embeddings=None, progress=None,
                 shift=None):
        """Generate one image per prompt (image i uses seed + i); settings left None are the family's (a
        negative_prompt of None or "" too). Returns a list of PIL images."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if embeddings is None:
            embeddings = self.text_inputs(prompts)
        if negative_embeddings is None and negative_prompt:
            negative_embeddings = self.text_inputs([negative_prompt])
        seeds = [seed + i for i in range(batch_size(embeddings))]
        latents = self.sample_latents(embeddings, negative_embeddings, seeds, height, width, guidance, num_steps,
                                      sampler, distill_steps, progress, shift)
        return self.decode(latents)


def save_validation_images(accelerator, transformer, vae, embeddings, iteration: int, out_dir, image_size,
                           num_steps: int | None = None, seed: int = 0, family=None, negative=None) -> None:
    """Sample the validation prompts' text (contexts [B,512,1024] or the family's text inputs, e.g. Anima's adapter
    inputs) at image_size (height, width) with the family's sampler and defaults (num_steps None: the family's;
    `negative` None: the family's negative, which for Anima's "" needs the prompts' text inputs, not contexts),
    save them as out_dir/iter_<iteration>_<i>.jpg and log them to the tracker (main process).

    Every process samples: under FSDP each forward needs all of them.
    """
    from .distributed import release_gathered_weights

    was_training = transformer.training
    transformer.eval()
    pipe = CosmosText2Image(transformer, vae, device=accelerator.device, family=family)
    height, width = image_size
    with accelerator.autocast():
        images = pipe(None, embeddings=embeddings, negative_embeddings=negative, height=height, width=width,
                      num_steps=num_steps, seed=seed)
    release_gathered_weights(transformer)
    transformer.train(was_training)
    if not accelerator.is_main_process:
        return
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        image.save(out_dir / f"iter_{iteration:09d}_{i}.jpg", quality=95)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), iteration,
                                      dataformats="NHWC")
