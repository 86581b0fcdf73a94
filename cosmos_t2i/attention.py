"""A leaner attention processor for the Cosmos transformer in eager inference.

diffusers' CosmosAttnProcessor2_0 spends more GPU time on memory traffic than on attention itself when not
compiled: its RMSNorm on q/k runs as five kernels through fp32 copies, its RoPE as eight (casting x and the rotated
x to fp32 separately), and it copies k and v once more for grouped-query attention that Cosmos-Predict2 does not
use. This processor computes the same arithmetic with fewer passes: torch's fused RMSNorm, and RoPE as two
multiply-adds per half written straight into the output's dtype (products and sums in fp32 as in diffusers, one
rounding at the end). Under torch.compile the two are fused alike; the processor is for the eager path.
"""

import contextlib

import torch
import torch.nn.functional as F


def rope_half_split(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Cosmos RoPE on x [B, S, H, D] (pairs are (i, i + D/2)); cos/sin [S, D] in fp32 with equal halves, as
    diffusers' CosmosRotaryPosEmbed returns them. Returns x's dtype, computed in fp32."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None, :half], sin[:, None, :half]  # [S, 1, D/2], broadcast over batch and heads
    x1, x2 = x[..., :half], x[..., half:]
    if torch.compiler.is_compiling():  # inductor fuses this into one kernel; out= into views would break the graph
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
    out = torch.empty_like(x)
    torch.addcmul(x1 * cos, x2, -sin, out=out[..., :half])  # x1 cos - x2 sin
    torch.addcmul(x2 * cos, x1, sin, out=out[..., half:])   # x2 cos + x1 sin
    return out


class LeanCosmosAttnProcessor:
    """Drop-in for diffusers' CosmosAttnProcessor2_0 (self- and cross-attention of Cosmos-Predict2).

    `context_rows` (set by zero_context_rows): in cross-attention, the batch rows from this index on have an
    all-zero text context. Their output is then exactly zero (no q/k/v/out biases, and the RMS norm of a zero key is
    zero, so every value is zero), so only the rows before it are computed: the unconditional half of a guided step
    with NVIDIA's default zero negative embedding.
    """

    context_rows = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        rows = self.context_rows
        if (encoder_hidden_states is not None and rows is not None and rows < hidden_states.shape[0]
                and attention_mask is None and all(m.bias is None for m in (attn.to_k, attn.to_v, attn.to_out[0]))):
            out = self.attend(attn, hidden_states[:rows], encoder_hidden_states[:rows])
            return torch.cat([out, out.new_zeros((hidden_states.shape[0] - rows, *out.shape[1:]))])
        return self.attend(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)

    @staticmethod
    def attend(attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = attn.to_q(hidden_states).unflatten(2, (attn.heads, -1))  # [B, S, H, D]
        k = attn.to_k(context).unflatten(2, (attn.heads, -1))
        v = attn.to_v(context).unflatten(2, (attn.heads, -1))
        q = F.rms_norm(q, (q.shape[-1],), attn.norm_q.weight, attn.norm_q.eps)
        k = F.rms_norm(k, (k.shape[-1],), attn.norm_k.weight, attn.norm_k.eps)
        if image_rotary_emb is not None:
            cos, sin = (t.to(q.device) for t in image_rotary_emb)
            q, k = rope_half_split(q, cos, sin), rope_half_split(k, cos, sin)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=attention_mask)
        out = out.transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


def use_lean_attention(transformer) -> int:
    """Swap diffusers' CosmosAttnProcessor2_0 for LeanCosmosAttnProcessor in every attention layer (inference);
    returns how many were swapped. Other processors (e.g. Cosmos 2.5's) are left alone."""
    from diffusers.models.transformers.transformer_cosmos import CosmosAttnProcessor2_0

    swapped = 0
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), CosmosAttnProcessor2_0):
            module.set_processor(LeanCosmosAttnProcessor())
            swapped += 1
    return swapped


def lean_processors(transformer) -> list:
    return [m.processor for m in transformer.modules()
            if isinstance(getattr(m, "processor", None), LeanCosmosAttnProcessor)]


@contextlib.contextmanager
def zero_context_rows(processors, first: int):
    """Within the block, these lean processors' cross-attention takes the batch rows from `first` on as having an
    all-zero text context (see LeanCosmosAttnProcessor); the caller guarantees it."""
    for processor in processors:
        processor.context_rows = first
    try:
        yield
    finally:
        for processor in processors:
            processor.context_rows = None
