"""Notebook API: load once, generate many times, get PIL images back.

    from cosmos_t2i.pipeline import CosmosText2Image
    pipe = CosmosText2Image.from_pretrained(dit_path="model.pt", model_size="2B", vae_path="tokenizer.pth",
                                            text_encoder="google-t5/t5-11b")
    images = pipe(["a robot arm stacking red cubes"], seed=0)
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import flow
from .attention import use_lean_attention
from .distributed import release_gathered_weights
from .models import decode_latents, load_dit, load_vae

SAMPLERS = ("ab2", "euler")


def prepare_for_inference(transformer, fp8: bool = False, compile: bool = False, lean_attention: bool = True):
    """The lean attention processor (same arithmetic, fewer memory passes when not compiled; lean_attention=False
    keeps diffusers' for comparison), then float8 matmuls (fp8) and per-block torch.compile. Shared with
    benchmarks/profile_infer.py and bench_infer.py."""
    if lean_attention:
        use_lean_attention(transformer)
    if fp8:
        from .fp8 import quantize_for_fp8_inference
        quantize_for_fp8_inference(transformer)
    if compile:
        for block in transformer.transformer_blocks:
            block.compile()
    return transformer


class CosmosText2Image:
    """Transformer + VAE (+ optional T5) with NVIDIA's sampler; call with prompts to get PIL images."""

    def __init__(self, transformer, vae, tokenizer=None, text_encoder=None, device="cpu"):
        self.transformer, self.vae = transformer, vae
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, dit_path=None, vae_path=None, text_encoder=None, model_size=None, load_ema=False,
                        lora_path=None, lora_scale=1.0, base_dit_path=None, device=None, dtype=torch.bfloat16,
                        text_encoder_dtype=None, text_encoder_8bit=False, compile=False, fp8=False):
        """Load every part; `text_encoder=None` means prompts come as embeddings (see `embeddings=`); fp8=True runs
        the blocks' projections as float8 matmuls (torchao, H100-class GPU, bf16 dtype)."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if vae_path is None:
            raise ValueError("Pass vae_path: a diffusers AutoencoderKLWan folder or NVIDIA's tokenizer.pth.")
        transformer = prepare_for_inference(
            load_dit(dit_path, model_size, load_ema, lora_path, lora_scale, base_dit_path, dtype, device), fp8, compile)
        vae = load_vae(vae_path, dtype, device)
        tokenizer = encoder = None
        if text_encoder:
            from .t5 import load_text_encoder
            tokenizer, encoder = load_text_encoder(text_encoder, device, text_encoder_dtype,
                                                   load_in_8bit=text_encoder_8bit)
        return cls(transformer, vae, tokenizer, encoder, device)

    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> zero-padded T5 embeddings [B, 512, 1024] (fp32), exactly as the training data."""
        from .t5 import embed_prompts
        if self.text_encoder is None:
            raise ValueError("This pipeline has no text encoder (it was offloaded or never loaded): pass "
                             "embeddings=, or load with text_encoder=.")
        return embed_prompts(self.tokenizer, self.text_encoder, prompts)

    def offload_text_encoder(self) -> None:
        """Free the T5 (encode every prompt first). For the lowest peak, embed with t5.embed_prompts_once before
        loading the pipeline at all (the CLI's --offload_text_encoder), so the T5 and the DiT never coexist."""
        self.text_encoder = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def sample_latents(self, embeddings, negative_embeddings=None, seeds=(0,), height=768, width=1360,
                       guidance=4.0, num_steps=35, sampler="ab2", distill_steps=None, progress=None):
        """Normalised latents [B,16,1,H/8,W/8] for embeddings [B,512,1024]; one seed per image."""
        if height % 16 or width % 16:
            raise ValueError(f"height and width must be multiples of 16, got {height}x{width}.")
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if distill_steps:
            if not 1 <= distill_steps <= len(flow.DISTILL_SIGMAS):
                raise ValueError(f"distill_steps must be 1 to {len(flow.DISTILL_SIGMAS)}, got {distill_steps}.")
        elif num_steps < (2 if sampler == "euler" else 1):
            raise ValueError(f"num_steps must be at least {2 if sampler == 'euler' else 1} for the {sampler} sampler, "
                             f"got {num_steps}.")
        cond = embeddings.to(self.device)
        uncond = negative_embeddings.to(self.device) if negative_embeddings is not None else torch.zeros_like(cond)
        shape = (1, self.transformer.config.in_channels, 1, height // 8, width // 8)
        x = torch.cat([flow.initial_noise(int(s), shape) for s in seeds]).to(self.device) * flow.SIGMA_MAX
        padding_mask = torch.zeros(1, 1, height, width, device=self.device)
        if distill_steps:
            denoise = flow.make_denoiser(self.transformer, cond, None, 0.0, padding_mask)
            return flow.sample_distilled(denoise, x, distill_steps, int(seeds[0]), progress)
        if sampler == "euler":  # diffusers' Cosmos2TextToImagePipeline, step for step
            denoise = flow.make_denoiser(self.transformer, cond, uncond, guidance, padding_mask,
                                         x0_dtype=self.transformer.dtype)
            return flow.sample_euler(denoise, x, flow.euler_sigmas(num_steps).to(self.device), progress)
        denoise = flow.make_denoiser(self.transformer, cond, uncond, guidance, padding_mask)
        return flow.sample_ab2(denoise, x, flow.karras_sigmas(num_steps), progress)

    def decode(self, latents) -> list[Image.Image]:
        """Latents -> PIL images."""
        images = decode_latents(self.vae, latents)
        pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]

    def __call__(self, prompts, negative_prompt=None, seed=0, height=768, width=1360, guidance=4.0, num_steps=35,
                 sampler="ab2", distill_steps=None, embeddings=None, negative_embeddings=None, progress=None):
        """Generate one image per prompt (image i uses seed + i). Returns a list of PIL images."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if embeddings is None:
            embeddings = self.encode(prompts)
        if negative_embeddings is None and negative_prompt:
            negative_embeddings = self.encode([negative_prompt]).expand(len(embeddings), -1, -1)
        seeds = [seed + i for i in range(len(embeddings))]
        latents = self.sample_latents(embeddings, negative_embeddings, seeds, height, width, guidance, num_steps,
                                      sampler, distill_steps, progress)
        return self.decode(latents)


def save_validation_images(accelerator, transformer, vae, embeddings, iteration: int, out_dir, image_size,
                           num_steps: int = 35, seed: int = 0) -> None:
    """Sample the validation prompts' embeddings at image_size (height, width), save them as
    out_dir/iter_<iteration>_<i>.jpg and log them to the tracker (main process).

    Every process samples: under FSDP each forward needs all of them.
    """
    was_training = transformer.training
    transformer.eval()
    pipe = CosmosText2Image(transformer, vae, device=accelerator.device)
    height, width = image_size
    with accelerator.autocast():
        images = pipe(None, embeddings=embeddings, height=height, width=width, num_steps=num_steps, seed=seed)
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
