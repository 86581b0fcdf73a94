"""Anima's weight files: the original single file and the diffusers folder, both ways, bit for bit.

Anima (CircleStone Labs with Comfy Org) is the Cosmos-Predict2 DiT (diffusers' `CosmosTransformer3DModel`, 28 blocks
in the base, 36 or 40 in community variants) plus a 6-block text adapter (diffusers' `AnimaTextConditioner`) that turns
Qwen3-0.6B hidden states into the DiT's 1024-wide context, with T5-tokenizer ids as its queries.

    single file    net.<NVIDIA DiT key>              (ComfyUI's native files: model.diffusion_model.<key>)
                   net.llm_adapter.<adapter key>     the adapter, its keys the same as AnimaTextConditioner's
    diffusers      transformer/ (CosmosTransformer3DModel), text_conditioner/ (AnimaTextConditioner), text_encoder/,
                   tokenizer/, t5_tokenizer/, vae/ (AutoencoderKLQwenImage), scheduler/

Sizes are read off the weights: blocks counted, heads from the width and the per-head QK-norm, the adapter's shape from its
tensors. The adapter's keys are split off before any DiT key is renamed: the DiT renames (`blocks.` ->
`transformer_blocks.`, `self_attn` -> `attn1`) would otherwise apply inside the adapter too.
"""

from pathlib import Path

import torch

from .registry import COMMON_CONFIG
from .weight_files import (ADAPTER_FILE, ADAPTER_MODULE, COMFY_PREFIXES, diffusers_to_nvidia_key, is_non_weight_key,
                           nvidia_to_diffusers_key, read_weights, select_weights)

ADAPTER = ADAPTER_FILE  # the adapter's keys in the single file: llm_adapter.*
FILE_PREFIXES = ("net.",) + COMFY_PREFIXES


def split_single_file(state: dict, source="checkpoint") -> tuple[dict, dict]:
    """({diffusers DiT key: tensor}, {AnimaTextConditioner key: tensor}) from an original single-file state dict."""
    prefix = next((p for p in FILE_PREFIXES if any(k.startswith(p) for k in state)), "")
    dit, adapter = {}, {}
    for key, value in state.items():
        if not key.startswith(prefix) or is_non_weight_key(key):
            continue
        key = key[len(prefix):]
        if key.startswith(ADAPTER):
            adapter[key[len(ADAPTER):]] = value
        else:
            dit[nvidia_to_diffusers_key(key)] = value
    if not adapter:
        raise ValueError(f"{source}: no {prefix}{ADAPTER}* keys, so this is not an Anima file (a Cosmos-Predict2 DiT "
                         "has no text adapter).")
    return dit, adapter


def single_file_state(dit_state: dict, adapter_state: dict, prefix: str = "net.") -> dict:
    """The original single file's state dict from diffusers-named DiT and adapter state dicts (split_single_file's
    inverse)."""
    out = {prefix + diffusers_to_nvidia_key(k): v for k, v in dit_state.items()}
    out.update({prefix + ADAPTER + k: v for k, v in adapter_state.items()})
    return out


def dit_config(dit_state: dict) -> dict:
    """The CosmosTransformer3DModel config of diffusers-named DiT weights: blocks counted, heads from the per-head QK-norm."""
    blocks = {int(k.split(".")[1]) for k in dit_state if k.startswith("transformer_blocks.")}
    if not blocks or blocks != set(range(len(blocks))):
        raise ValueError(f"the DiT weights hold blocks {sorted(blocks)[:5]}...; expected 0..N-1.")
    width = dit_state["patch_embed.proj.weight"].shape[0]
    head_dim = dit_state["transformer_blocks.0.attn1.norm_q.weight"].shape[0]  # QK-norm is per head
    return {**COMMON_CONFIG, "num_layers": len(blocks), "num_attention_heads": width // head_dim,
            "attention_head_dim": head_dim, "adaln_lora_dim": dit_state["transformer_blocks.0.norm1.linear_1.weight"].shape[0],
            "text_embed_dim": dit_state["transformer_blocks.0.attn2.to_k.weight"].shape[1]}


def conditioner_config(adapter_state: dict) -> dict:
    """The AnimaTextConditioner config of adapter weights (what diffusers' Anima converter infers)."""
    vocab, target = adapter_state["embed.weight"].shape
    model_dim = adapter_state["blocks.0.self_attn.q_proj.weight"].shape[0]
    head_dim = adapter_state["blocks.0.self_attn.q_norm.weight"].shape[0]
    hidden = adapter_state["blocks.0.mlp.0.weight"].shape[0]
    return {"source_dim": adapter_state["blocks.0.cross_attn.k_proj.weight"].shape[1], "target_dim": target,
            "model_dim": model_dim, "num_layers": 1 + max(int(k.split(".")[1]) for k in adapter_state
                                                          if k.startswith("blocks.")),
            "num_attention_heads": model_dim // head_dim, "mlp_ratio": hidden / model_dim, "target_vocab_size": vocab,
            "use_self_attention": "blocks.0.self_attn.q_proj.weight" in adapter_state}


def attach_text_conditioner(transformer, conditioner):
    """Make the adapter the DiT's `text_conditioner` child, run by the DiT's own forward when `encoder_hidden_states`
    is a dict of its inputs (text_inputs) instead of a context tensor. One module then trains, shards (FSDP gathers
    the adapter with the DiT's root before this hook runs), checkpoints and exports as the DiT does, and a context
    tensor still passes straight through (sampling computes each prompt's context once)."""
    transformer.text_conditioner = conditioner
    transformer.register_forward_pre_hook(_run_text_conditioner, with_kwargs=True)
    return transformer


def _run_text_conditioner(module, args, kwargs):
    def context(text):
        if not isinstance(text, dict):
            return text
        keep_rope_in_fp32(module.text_conditioner)
        return module.text_conditioner(**text)
    if len(args) > 2:  # forward(hidden_states, timestep, encoder_hidden_states, ...)
        return (*args[:2], context(args[2]), *args[3:]), kwargs
    if "encoder_hidden_states" in kwargs:
        kwargs = {**kwargs, "encoder_hidden_states": context(kwargs["encoder_hidden_states"])}
    return args, kwargs


class AttentionWithoutCudnn:
    """An attention processor run with SDPA's cuDNN backend excluded while gradients are recorded. torch's cuDNN
    attention backward (2.11 on) returns NaN query gradients when a mask is passed, the key length is 64 mod 128 and
    a row's logsumexp is very negative (pytorch#196678): the adapter passes masks, its lengths follow the captions,
    and a dropped caption masks every key of its cross-attention. Set on the processors themselves, so the recompute
    of --gradient_checkpointing runs on the same backends as the forward. The adapter is small: the other backends
    cost nothing that shows. Sampling (no gradients) keeps torch's choice, as diffusers' pipeline does."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, attn, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.processor(attn, *args, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            return self.processor(attn, *args, **kwargs)


def train_adapter_without_cudnn_attention(conditioner) -> None:
    """For a text adapter that trains: its attention layers' processors wrapped in AttentionWithoutCudnn."""
    for module in conditioner.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and not isinstance(processor, AttentionWithoutCudnn):
            module.processor = AttentionWithoutCudnn(processor)


def keep_rope_in_fp32(conditioner) -> None:
    """The adapter's RoPE frequencies in fp32, as diffusers' from_pretrained leaves them: `.to(bfloat16)` rounds them,
    which moves the rotation of late tokens by radians. Checked by dtype (no device sync); recomputed when cast."""
    rotary = conditioner.rotary_emb
    if rotary.inv_freq.dtype != torch.float32:
        from diffusers.models.condition_embedders.condition_embedder_anima import AnimaRotaryEmbedding
        head_dim = conditioner.config.model_dim // conditioner.config.num_attention_heads
        rotary.inv_freq = AnimaRotaryEmbedding(head_dim).inv_freq.to(rotary.inv_freq.device)


def text_inputs(qwen_states, qwen_mask, t5_ids, t5_mask) -> dict:
    """The adapter's inputs (padded Qwen3 states zeroed past their mask, as diffusers' pipeline does, and T5 ids)."""
    return {"source_hidden_states": qwen_states * qwen_mask.unsqueeze(-1).to(qwen_states.dtype),
            "source_attention_mask": qwen_mask, "target_input_ids": t5_ids, "target_attention_mask": t5_mask}


def without_padding(text: dict) -> dict:
    """The adapter's inputs cut after the last real position on each side (Qwen's "source_", T5's "target_"; at
    least one position), as diffusers' pipeline pads one prompt: padding changes nothing the adapter computes, but
    its 16-bit attention would round differently and move bf16 images off the reference's."""
    def length(mask):
        used = mask.any(0).nonzero()
        return int(used.max()) + 1 if len(used) else 1
    n, m = length(text["source_attention_mask"]), length(text["target_attention_mask"])
    return {k: v[:, :n] if k.startswith("source_") else v[:, :m] for k, v in text.items()}


@torch.no_grad()
def adapter_context(transformer, text: dict) -> torch.Tensor:
    """The DiT's context [B,512,1024] of the adapter's inputs, for sampling: through the DiT's text_conditioner in
    its dtype, each prompt alone without padding (its context then depends on no other prompt, in any dtype),
    returned in fp32 (lossless)."""
    from torch.distributed.fsdp import FSDPModule

    from .flow import cast_floats
    if isinstance(transformer, FSDPModule):  # FSDP2 shards the adapter with the root: gather (released after use)
        transformer.unshard()
    conditioner = transformer.text_conditioner
    keep_rope_in_fp32(conditioner)
    weight = next(conditioner.parameters())
    text = {k: v.to(weight.device) for k, v in cast_floats(text, weight.dtype).items()}
    return torch.cat([conditioner(**without_padding({k: v[i:i + 1] for k, v in text.items()})).float()
                      for i in range(len(text["target_input_ids"]))])


def new_conditioner(config: dict, dtype=torch.float32, device="cpu"):
    """An AnimaTextConditioner of `config`, random; on the meta device its weights get no memory but the RoPE
    buffer is computed (distributed.materialize_ keeps it)."""
    from accelerate import init_empty_weights
    from diffusers import AnimaTextConditioner

    if torch.device(device).type == "meta":
        with init_empty_weights(include_buffers=False):
            return AnimaTextConditioner(**config).to(dtype)
    with torch.device(device):
        return AnimaTextConditioner(**config).to(dtype)


def new_anima(model_size: str, dtype=torch.float32, device="cpu", **overrides):
    """A random Anima of a registry size: the DiT with its adapter attached (benchmarks, tests, skeletons)."""
    from .models import new_transformer
    from .registry import anima_conditioner_config

    transformer = new_transformer(model_size, dtype, device, **overrides)
    return attach_text_conditioner(transformer, new_conditioner(anima_conditioner_config(model_size), dtype, device))


def _build(cls, config: dict, state: dict, source, dtype):
    """A model of `cls` from its config and a complete state dict (every key used, every key present)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # no memory for weights; buffers computed in __init__ are kept
        model = cls(**config)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: the {cls.__name__} weights do not fit its shape: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}. Is this an Anima file?")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    return model.eval()


def is_anima_folder(path) -> bool:
    return (Path(path) / "text_conditioner" / "config.json").is_file()


def load_anima(path, dtype=torch.bfloat16):
    """The DiT with its adapter attached (attach_text_conditioner), from an original single file (any of its
    prefixes) or a diffusers folder (its transformer/ and text_conditioner/). Sizes come from the weights."""
    path = Path(path)
    if not path.is_dir():
        return _from_single_file(read_weights(path), path, dtype)
    if not is_anima_folder(path):
        raise FileNotFoundError(f"{path}: no text_conditioner/config.json; an Anima diffusers folder holds "
                                "transformer/ and text_conditioner/.")
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    from .models import check_folder_files
    check_folder_files(path / "transformer")
    check_folder_files(path / "text_conditioner")
    transformer = CosmosTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=dtype)
    conditioner = AnimaTextConditioner.from_pretrained(path / "text_conditioner", torch_dtype=dtype)
    return attach_text_conditioner(transformer.eval(), conditioner.eval())


def _from_single_file(state: dict, source, dtype):
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    dit, adapter = split_single_file(state, source)
    return attach_text_conditioner(_build(CosmosTransformer3DModel, dit_config(dit), dit, source, dtype),
                                   _build(AnimaTextConditioner, conditioner_config(adapter), adapter, source, dtype))


def load_anima_model(path, model_size=None, load_ema=False, dtype=torch.bfloat16, device="cpu", state=None):
    """Anima as families.Family.load_model wants it: random at `model_size` without a path; a diffusers folder; a
    single file (the original, ComfyUI's, or a model file of our training runs, whose `net_ema.*` --load_ema picks;
    the adapter's EMA when it trained, else its `net.*` weights)."""
    if path is None:
        if model_size is None:
            raise ValueError("Pass --dit_path, or --model_size for a randomly initialised model.")
        return new_anima(model_size, dtype, device)
    path = Path(path)
    if path.is_dir():
        if load_ema:
            raise ValueError(f"{path}: --load_ema was given but a diffusers folder holds no EMA weights.")
        return load_anima(path, dtype).to(device)
    state = read_weights(path) if state is None else state
    if load_ema:
        weights = select_weights(state, True, path)
        if not any(k.startswith(ADAPTER) for k in weights):
            weights.update({k: v for k, v in select_weights(state, False, path).items() if k.startswith(ADAPTER)})
        state = {"net." + k: v for k, v in weights.items()}
    return _from_single_file(state, path, dtype).to(device)


def save_single_file(transformer, path, prefix: str = "net.") -> None:
    """Write an Anima (the DiT with its adapter attached) in the original single-file form as safetensors,
    atomically (the layout ComfyUI loads)."""
    from safetensors.torch import save

    from .files import atomic_write

    state = {k: v for k, v in transformer.state_dict().items() if not k.startswith(ADAPTER_MODULE)}
    state = single_file_state(state, transformer.text_conditioner.state_dict(), prefix)
    with atomic_write(path) as f:
        f.write(save({k: v.detach().contiguous() for k, v in state.items()}))
