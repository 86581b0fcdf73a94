"""Anima's weight files: the original single file and the diffusers folder, both ways, bit for bit.

Anima (CircleStone Labs with Comfy Org) is the Cosmos-Predict2 DiT (diffusers' `CosmosTransformer3DModel`, 28 blocks
in the base, 36 or 40 in community variants) plus a 6-block text adapter (diffusers' `AnimaTextConditioner`) that turns
Qwen3-0.6B hidden states into the DiT's 1024-wide context, with T5-tokenizer ids as its queries.

    single file    net.<NVIDIA DiT key>              (ComfyUI's native files: model.diffusion_model.<key>)
                   net.llm_adapter.<adapter key>     the adapter, its keys the same as AnimaTextConditioner's
    diffusers      transformer/ (CosmosTransformer3DModel), text_conditioner/ (AnimaTextConditioner), text_encoder/,
                   tokenizer/, t5_tokenizer/, vae/ (AutoencoderKLQwenImage), scheduler/

Sizes are read off the weights: blocks counted, heads from the width (128 per head), the adapter's shape from its
tensors. The adapter's keys are split off before any DiT key is renamed: the DiT renames (`blocks.` ->
`transformer_blocks.`, `self_attn` -> `attn1`) would otherwise apply inside the adapter too.
"""

from pathlib import Path

import torch

from .registry import COMMON_CONFIG
from .weight_files import diffusers_to_nvidia_key, is_non_weight_key, nvidia_to_diffusers_key, read_weights

ADAPTER = "llm_adapter."
FILE_PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.")
HEAD_DIM = 128


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
    """The CosmosTransformer3DModel config of diffusers-named DiT weights: blocks counted, width / 128 heads."""
    blocks = {int(k.split(".")[1]) for k in dit_state if k.startswith("transformer_blocks.")}
    if not blocks or blocks != set(range(len(blocks))):
        raise ValueError(f"the DiT weights hold blocks {sorted(blocks)[:5]}...; expected 0..N-1.")
    width = dit_state["patch_embed.proj.weight"].shape[0]
    return {**COMMON_CONFIG, "num_layers": len(blocks), "num_attention_heads": width // HEAD_DIM,
            "attention_head_dim": HEAD_DIM, "adaln_lora_dim": dit_state["transformer_blocks.0.norm1.linear_1.weight"].shape[0],
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


def load_anima(path, dtype=torch.bfloat16):
    """(CosmosTransformer3DModel, AnimaTextConditioner) from an original single file or a diffusers folder (its
    transformer/ and text_conditioner/)."""
    from diffusers import AnimaTextConditioner, CosmosTransformer3DModel

    path = Path(path)
    if path.is_dir():
        if not (path / "text_conditioner" / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no text_conditioner/config.json; an Anima diffusers folder holds "
                                    "transformer/ and text_conditioner/.")
        return (CosmosTransformer3DModel.from_pretrained(path / "transformer", torch_dtype=dtype).eval(),
                AnimaTextConditioner.from_pretrained(path / "text_conditioner", torch_dtype=dtype).eval())
    dit, adapter = split_single_file(read_weights(path), path)
    return (_build(CosmosTransformer3DModel, dit_config(dit), dit, path, dtype),
            _build(AnimaTextConditioner, conditioner_config(adapter), adapter, path, dtype))


def save_single_file(transformer, conditioner, path, prefix: str = "net.") -> None:
    """Write the original single-file form as safetensors, atomically (the layout ComfyUI loads)."""
    from safetensors.torch import save

    from .files import atomic_write

    state = single_file_state(transformer.state_dict(), conditioner.state_dict(), prefix)
    with atomic_write(path) as f:
        f.write(save({k: v.detach().contiguous() for k, v in state.items()}))
