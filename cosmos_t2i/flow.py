"""Rectified flow in EDM notation: NVIDIA's training objective and its samplers (docs/training.md, docs/sampling.md)."""

import hashlib
import math

import numpy as np
import torch

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0
DISTILL_SIGMAS = [80.0, 3.6, 1.5574, 0.684]


# ---------------------------------------------------------------- training
def sample_seed(seed: int, iteration: int, index: int) -> int:
    """A 63-bit seed from (run seed, iteration, global sample index): the same on 1 or N processes."""
    digest = hashlib.blake2b(f"{seed}/{iteration}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def draw_training_randomness(seed: int, iteration: int, sample_ids, latent_shape, caption_dropout: float):
    """Per-sample sigma (log sigma ~ N(0,1)), fp32 noise and caption keep-flags, drawn on the CPU.

    Each sample has its own generator seeded by (seed, iteration, global index), so the numbers depend neither
    on the number of processes nor on where a run was resumed, nor on the device.
    """
    sigmas, noises, keep = [], [], []
    for index in sample_ids:
        g = torch.Generator().manual_seed(sample_seed(seed, iteration, int(index)))
        sigmas.append(torch.randn((), generator=g).exp())
        keep.append((torch.rand((), generator=g) >= caption_dropout).float())
        noises.append(torch.randn(latent_shape, generator=g))
    return torch.stack(sigmas), torch.stack(noises), torch.stack(keep)


def flow_loss(transformer, latents, text_embeddings, sigma, noise, keep_text, padding_mask, loss_scale=10.0,
              drop_captions=None, shift=1.0):
    """Velocity MSE x loss_scale. x_t = (1-t) x0 + t eps with t = sigma/(1+sigma); target v = eps - x0.

    Equals NVIDIA's (1+sigma)^2/sigma^2-weighted x0 loss (docs/training.md); with loss_scale 1 it is the model
    author's Anima objective (t = sigmoid(N(0,1)) is the same draw). Latents, noise and loss in fp32.
    `drop_captions(text, keep)` is the family's caption dropout (default: NVIDIA's, zeroed embeddings); the text is
    a context tensor or, for Anima, its adapter's inputs (then the DiT's forward runs the adapter). `shift` moves t
    towards noise as t' = s t / (1 + (s - 1) t) (SD3's; diffusion-pipe's optional shift; 1: none, NVIDIA's).
    """
    t = (sigma / (1 + sigma)).float()
    if shift != 1.0:
        t = shift_time(t, shift)
    tb = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tb) * latents + tb * noise
    if drop_captions is None:
        from .t5 import drop_captions
    context = drop_captions(text_embeddings, keep_text)
    dtype = _param_dtype(transformer)
    prediction = run_transformer(transformer, x_t.to(dtype), t.to(dtype), cast_floats(context, dtype),
                                 padding_mask.to(dtype))
    return ((prediction.float() - (noise - latents)) ** 2).mean() * loss_scale


def cast_floats(text, dtype):
    """A context tensor, or each floating tensor of a dict of adapter inputs, in `dtype` (ids and masks kept)."""
    if torch.is_tensor(text):
        return text.to(dtype)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in text.items()}


def run_transformer(transformer, x, timestep, context, padding_mask):
    """The DiT forward with a padding mask per sample.

    diffusers broadcasts one [1,1,H,W] mask over the batch; given one mask per sample (padded aspect buckets),
    each sample's own mask, resized as diffusers does (nearest), replaces the mask channel. Callers pass a single
    mask when all are equal: deciding that here, on GPU tensors, would stall the host at every forward.
    """
    call = dict(hidden_states=x, timestep=timestep, encoder_hidden_states=context, padding_mask=padding_mask[:1],
                return_dict=False)
    if padding_mask.shape[0] == 1:
        return transformer(**call)[0]
    mask = torch.nn.functional.interpolate(padding_mask, size=x.shape[-2:], mode="nearest").unsqueeze(2)

    def own_masks(module, args):
        hidden = args[0].clone()
        hidden[:, -1:] = mask.to(hidden.dtype)
        return (hidden,)

    handle = getattr(transformer, "module", transformer).patch_embed.register_forward_pre_hook(own_masks)
    try:
        return transformer(**call)[0]
    finally:
        handle.remove()


def _param_dtype(module):
    return next(p.dtype for p in module.parameters())


# ---------------------------------------------------------------- sampling
def karras_sigmas(num_steps: int, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX, rho=RHO) -> np.ndarray:
    """num_steps + 1 sigmas from sigma_max to sigma_min on the Karras rho=7 schedule, float64."""
    ramp = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + ramp * (b - a)) ** rho


def initial_noise(seed: int, shape) -> torch.Tensor:
    """N(0,1) from numpy RandomState(seed), as NVIDIA's arch_invariant_rand: the same on every GPU."""
    return torch.from_numpy(np.random.RandomState(seed).standard_normal(shape).astype(np.float32))


def transformer_call(transformer):
    """(tag, x, timestep, context, padding_mask) -> the DiT's output: run_transformer, replayed from a CUDA graph
    when the transformer was prepared for it (cuda_graphs.py; the tag names what else the call depends on)."""
    from .cuda_graphs import replayed

    replay = replayed(transformer)

    def forward(*inputs):
        return run_transformer(transformer, *inputs)

    def call(tag, *inputs):
        return replay(tag, forward, *inputs) if replay else forward(*inputs)

    return call


def make_denoiser(transformer, cond, uncond, guidance: float, padding_mask, dtype=None, x0_dtype=None):
    """x0(x, sigma) with guidance x0 = c + g (c - u); cond and uncond run as one batched forward.

    `x0_dtype` casts each branch's x0 before guidance (diffusers' pipeline casts to the model dtype).
    """
    from .attention import lean_processors, zero_context_rows

    dtype = dtype or _param_dtype(transformer)
    use_cfg = guidance != 0 and uncond is not None
    context = torch.cat([cond, uncond]) if use_cfg else cond
    context = context.to(dtype)
    # NVIDIA's default negative is a zero embedding: its cross-attention output is zero and need not be computed
    zero_uncond = lean_processors(transformer) if use_cfg and not uncond.any() else []
    call = transformer_call(transformer)

    def denoise(x, sigma):
        # a number is filled in on the device: copied from the host, it would make the host wait for the last step
        t = (sigma / (1 + sigma)).to(x.device, torch.float32) if torch.is_tensor(sigma) else \
            torch.full((), sigma / (1 + sigma), dtype=torch.float32, device=x.device)
        batch = torch.cat([x, x]) if use_cfg else x
        model_in = ((1 - t) * batch).to(dtype)
        timestep = t.to(dtype).expand(batch.shape[0])
        with torch.no_grad(), zero_context_rows(zero_uncond, len(cond)):
            out = call(("x0", len(cond) if zero_uncond else None), model_in, timestep, context,
                       padding_mask.to(dtype))
        x0 = (1 - t) * batch - t * out.float()
        if x0_dtype is not None:
            x0 = x0.to(x0_dtype)
        if not use_cfg:
            return x0
        c, u = x0.chunk(2)
        return c + guidance * (c - u)

    return denoise


def sample_ab2(denoise, x, sigmas, progress=None) -> torch.Tensor:
    """NVIDIA's RectifiedFlowAB2: Euler first step, then 2nd-order multistep in log-sigma; final clean pass.

    State in fp32, each step's arithmetic in float64 (docs/sampling.md). Returns x0 at sigma_min.
    """
    x0_prev = None
    for i in range(len(sigmas) - 1):
        s, r = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoise(x, s).double()
        if x0_prev is None:
            x = ((1 - r / s) * x0 + (r / s) * x.double()).float()
        else:
            p = float(sigmas[i - 1])
            h = math.log(s / r)
            c2 = math.log(s / p) / h
            phi1 = math.expm1(-h) / -h
            phi2 = (phi1 - 1) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            x = (math.exp(-h) * x.double() + h * (b1 * x0 + b2 * x0_prev)).float()
        x0_prev = x0
        if progress is not None:
            progress()
    return denoise(x, float(sigmas[-1])).float()


def euler_sigmas(num_steps: int) -> torch.Tensor:
    """diffusers' Cosmos2 schedule: FlowMatchEuler with Karras sigmas (fp32), last step a no-op at sigma_min."""
    sigmas = torch.from_numpy(karras_sigmas(num_steps - 1)).float() if num_steps > 1 else torch.tensor([SIGMA_MAX])
    return torch.cat([sigmas, sigmas[-1:]])


def sample_euler(denoise, x, sigmas, progress=None) -> torch.Tensor:
    """Euler on eps = (x - x0)/sigma over `sigmas` (num_steps + 1 values), no final clean pass."""
    for i in range(len(sigmas) - 1):
        s, r = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, s)
        eps = (x - x0) / s
        x = (x.float() + (r - s) * eps).float()
        if progress is not None:
            progress()
    return x


def sample_distilled(denoise, x, steps: int, seed: int, progress=None) -> torch.Tensor:
    """NVIDIA's distilled 0.6B mode: x0 at sigmas [80, 3.6, 1.5574, 0.684][:steps], re-noised between, no CFG."""
    sigmas = DISTILL_SIGMAS[:steps] + [0.0]
    rng = np.random.RandomState(seed + 1)
    for i in range(steps):
        x0 = denoise(x, sigmas[i])
        nxt = sigmas[i + 1]
        noise = torch.from_numpy(rng.standard_normal(tuple(x.shape)).astype(np.float32)).to(x.device)
        x = x0 + nxt * noise if nxt > 0 else x0
        if progress is not None:
            progress()
    return x


# ---------------------------------------------------------------- flow-matching Euler (Anima's sampler)
# diffusers' AnimaModularPipeline, step for step: FlowMatchEulerDiscreteScheduler over sigmas linspace(1, 1/N, N)
# with a static shift, the model called at timestep sigma, classifier-free guidance v = u + g (c - u), Euler steps.
NUM_TRAIN_TIMESTEPS = 1000  # the scheduler's timesteps are sigma * 1000; the pipeline divides them back


def shift_time(t, shift: float):
    """SD3's timestep shift t' = s t / (1 + (s - 1) t), towards noise for s > 1 (tensors or numpy arrays)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_match_sigmas(num_steps: int, shift: float) -> torch.Tensor:
    """num_steps + 1 fp32 sigmas from 1 to 0: linspace(1, 1/N, N) (float64, cast to float32), shifted in float32 as
    shift * s / (1 + (shift - 1) * s), a final 0 appended: FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=...)
    bit for bit."""
    shift = float(shift)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    sigmas = shift_time(sigmas, shift)  # numpy keeps float32 (a Python float does not promote)
    return torch.cat([torch.from_numpy(sigmas).to(torch.float32), torch.zeros(1)])


def make_velocity_denoiser(transformer, cond, uncond, guidance: float, padding_mask, dtype=None):
    """v(x, sigma) as the Anima pipeline computes it: the DiT on x in the model dtype at timestep sigma (the
    scheduler's sigma * 1000 in the model dtype, divided by 1000), guided v = u + g (c - u) in the model dtype.

    cond and uncond are context tensors [B, 512, 1024] (run as one batched forward); guidance 1 or no uncond runs the
    conditional branch alone, as diffusers' guider does.
    """
    dtype = dtype or _param_dtype(transformer)
    use_cfg = uncond is not None and not math.isclose(guidance, 1.0)
    context = (torch.cat([cond, uncond]) if use_cfg else cond).to(dtype)
    padding_mask = padding_mask.to(dtype)
    call = transformer_call(transformer)

    def velocity(x, sigma):
        batch = torch.cat([x, x]) if use_cfg else x
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        timestep = (sigma * NUM_TRAIN_TIMESTEPS).expand(batch.shape[0]).to(dtype) / NUM_TRAIN_TIMESTEPS
        with torch.no_grad():
            v = call("velocity", batch.to(dtype), timestep, context, padding_mask)
        if not use_cfg:
            return v
        c, u = v.chunk(2)
        return u + guidance * (c - u)

    return velocity


def sample_flow_euler(velocity, x, sigmas, progress=None) -> torch.Tensor:
    """Euler over `sigmas` (num_steps + 1 values, last 0): x <- x + (s_next - s) v, as FlowMatchEulerDiscreteScheduler
    steps: x in fp32 for the update, then stored in the velocity's dtype (bf16 latents between steps for a bf16
    model, as diffusers keeps them). Returns the latents at sigma 0."""
    for i in range(len(sigmas) - 1):
        v = velocity(x, sigmas[i])
        x = (x.to(torch.float32) + (sigmas[i + 1] - sigmas[i]) * v).to(v.dtype)
        if progress is not None:
            progress()
    return x
