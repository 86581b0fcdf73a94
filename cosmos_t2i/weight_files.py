"""Weight files and key names: reading `.pt`/`.safetensors` files (memory-mapped), picking `net.`/`net_ema.`,
NVIDIA <-> diffusers key names, a strict check against a model's keys, NVIDIA's model file built in memory, and
telling an adapter-only LoRA file from a full model.

See docs/checkpoints.md for the accepted files and the key mapping.
"""

import io
import json
import math
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

# NVIDIA name fragment -> diffusers name fragment, applied in this order (the inverse runs it backwards).
# Checked against diffusers' convert_cosmos_transformer_checkpoint_to_diffusers by the tests.
_RENAMES = [
    ("t_embedder.1", "time_embed.t_embedder"),
    ("t_embedding_norm", "time_embed.norm"),
    ("blocks", "transformer_blocks"),
    ("adaln_modulation_self_attn.1", "norm1.linear_1"),
    ("adaln_modulation_self_attn.2", "norm1.linear_2"),
    ("adaln_modulation_cross_attn.1", "norm2.linear_1"),
    ("adaln_modulation_cross_attn.2", "norm2.linear_2"),
    ("adaln_modulation_mlp.1", "norm3.linear_1"),
    ("adaln_modulation_mlp.2", "norm3.linear_2"),
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
    ("q_proj", "to_q"),
    ("k_proj", "to_k"),
    ("v_proj", "to_v"),
    ("output_proj", "to_out.0"),
    ("q_norm", "norm_q"),
    ("k_norm", "norm_k"),
    ("mlp.layer1", "ff.net.0.proj"),
    ("mlp.layer2", "ff.net.2"),
    ("x_embedder.proj.1", "patch_embed.proj"),
    ("final_layer.adaln_modulation.1", "norm_out.linear_1"),
    ("final_layer.adaln_modulation.2", "norm_out.linear_2"),
    ("final_layer.linear", "proj_out"),
]
# NVIDIA entries that are not weights: RoPE buffers, training counters, TE extra state, the loss log-variance head.
_NON_WEIGHT = re.compile(r"(^|\.)(pos_embedder\.|accum_|logvar)|\._extra_state$")


_DIFFUSERS_TOP = ("transformer_blocks.", "time_embed.", "patch_embed.", "norm_out.", "proj_out.")
NVIDIA_TOP_LEVEL = ("blocks.", "t_embedder.", "t_embedding_norm.", "x_embedder.", "final_layer.")

# Anima's text adapter: `llm_adapter.*` in its single file, the `text_conditioner` child of our DiT (anima.py); the
# rest of its key is AnimaTextConditioner's own, untouched by the DiT renames below.
ADAPTER_FILE, ADAPTER_MODULE = "llm_adapter.", "text_conditioner."


def nvidia_to_diffusers_key(key: str) -> str:
    """`blocks.0.self_attn.q_proj.weight` -> `transformer_blocks.0.attn1.to_q.weight` (diffusers keys unchanged)."""
    if key.startswith(ADAPTER_FILE):
        return ADAPTER_MODULE + key[len(ADAPTER_FILE):]
    if key.startswith(_DIFFUSERS_TOP + (ADAPTER_MODULE,)):
        return key
    for old, new in _RENAMES:
        key = key.replace(old, new)
    return key


def diffusers_to_nvidia_key(key: str) -> str:
    """Inverse of nvidia_to_diffusers_key (NVIDIA keys unchanged)."""
    if key.startswith(ADAPTER_MODULE):
        return ADAPTER_FILE + key[len(ADAPTER_MODULE):]
    if key.startswith(NVIDIA_TOP_LEVEL + (ADAPTER_FILE,)):
        return key
    for old, new in reversed(_RENAMES):
        key = key.replace(new, old)
    return key


def is_non_weight_key(key: str) -> bool:
    """NVIDIA checkpoint entries that hold no model weights and are ignored on load."""
    return bool(_NON_WEIGHT.search(key))


def mmap_safetensors(path) -> dict:
    """A safetensors file as CPU tensors over a private memory map: nothing is read until a tensor is used, and
    every process of a host shares the one copy in the page cache."""
    path = Path(path)
    header, base = safetensors_header(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    out = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, base + start, (end - start,))
        out[name] = flat.view(_SAFETENSORS_DTYPES[entry["dtype"]]).view(entry["shape"])
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def safetensors_header(path) -> tuple[dict, int]:
    """(tensor entries, offset of the data) of a safetensors file, every entry checked against the file's size: a
    truncated or corrupted file is a ValueError naming the file and the first tensor that is not all there."""
    path = Path(path)
    size = path.stat().st_size

    def broken(what):  # kept short: the one-line error shows 400 characters, and the fix is at the end
        return ValueError(f"{path} is a truncated or corrupted safetensors file ({what}); copy or download it again.")

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise broken(f"{size} bytes, shorter than its header")
        header_len = struct.unpack("<Q", head)[0]
        if header_len > size - 8:
            raise broken(f"a {header_len}-byte header in {size} bytes")
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            raise broken("its header is not JSON") from None
    if not isinstance(header, dict):
        raise broken("its header is not a table of tensors")
    header.pop("__metadata__", None)
    cut = []
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            numel, dtype = math.prod(entry["shape"]), entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise broken(f"tensor {name}'s entry is malformed") from None
        if dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}, which this loader does not read; convert the "
                             "file to F32, F16 or BF16.")
        itemsize = _SAFETENSORS_DTYPES[dtype].itemsize
        if not 0 <= start <= end or end - start != numel * itemsize:
            raise broken(f"tensor {name}: {end - start} bytes for {entry['dtype']} {entry['shape']}")
        if 8 + header_len + end > size:
            cut.append((start, name))
    if cut:
        more = f" and {len(cut) - 1} more" if len(cut) > 1 else ""
        raise broken(f"{size} bytes, too few for tensor {min(cut)[1]}{more}")
    return header, 8 + header_len


def read_weights(path) -> dict:
    """A state dict from .pt/.pth (torch.load weights_only=True) or .safetensors, memory-mapped either way.

    NVIDIA files written with Transformer Engine may carry `*._extra_state` entries as `io.BytesIO` objects
    (older versions): that one class is admitted, nothing else, and those entries are dropped.
    """

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    if path.suffix == ".safetensors":
        return mmap_safetensors(path)
    try:
        with torch.serialization.safe_globals([io.BytesIO]):
            # torch's legacy (pre-zip) format cannot be memory-mapped: such a file is read whole
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:  # weights_only refused something that is not a tensor
        found = re.search(r"Unsupported [^\n]*?(?= was not|\. |\n|$)", str(e))  # torch's paragraph names it mid-way
        raise ValueError(f"{path}: torch.load(weights_only=True) refuses it ({found[0] if found else one_sentence(e)})"
                         ". Only plain tensor checkpoints are loaded; convert other files to safetensors first.") from e
    except Exception as e:  # a truncated or damaged archive
        raise ValueError(f"{path} is a truncated or corrupted PyTorch checkpoint ({one_sentence(e)}); copy or "
                         "download it again.") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict) and not any(
            k.startswith("net") for k in state):
        state = state["model"]
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if not (k.endswith("._extra_state") and isinstance(v, io.BytesIO))}
    return state


def one_sentence(error: BaseException) -> str:
    """The first sentence of an exception's message, on one line (torch's load errors run to a paragraph)."""
    return " ".join(str(error).split()).split(". ")[0].removesuffix(".") or type(error).__name__


COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def select_weights(state: dict, load_ema: bool, source) -> dict:
    """Pick `net_ema.*` (with --load_ema) or `net.*` and strip the prefix; bare keys pass through.

    Unlike NVIDIA's loader, --load_ema on a file without EMA weights is an error, not a silent no-op.
    """
    has_net = any(k.startswith("net.") for k in state)
    has_ema = any(k.startswith("net_ema.") for k in state)
    if load_ema and not has_ema:
        raise ValueError(f"{source}: --load_ema was given but the file holds no EMA weights (no 'net_ema.*' keys). "
                         "Drop --load_ema, or train with EMA on.")
    prefix = "net_ema." if load_ema else "net." if has_net else ""
    if not prefix:
        return {k: v for k, v in state.items() if torch.is_tensor(v)}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def nvidia_to_diffusers(state: dict, source="checkpoint") -> dict:
    """Rename NVIDIA keys to diffusers', dropping only NVIDIA's non-weight entries."""
    return {nvidia_to_diffusers_key(k): v for k, v in state.items() if not is_non_weight_key(k)}


def diffusers_to_nvidia(state: dict, prefix: str = "") -> dict:
    """Rename diffusers keys to NVIDIA's, with an optional `net.`/`net_ema.` prefix."""
    return {prefix + diffusers_to_nvidia_key(k): v for k, v in state.items()}


def check_keys(model_state: dict, loaded: dict, source, file_name=None) -> None:
    """Strict key and shape check with a readable list of what is missing, unknown or mis-shaped.

    `file_name` turns a model key into the name the user's file uses (NVIDIA's), so the list can be searched for.
    """
    name = file_name or (lambda k: k)
    missing = sorted(name(k) for k in set(model_state) - set(loaded))
    unexpected = sorted(name(k) for k in set(loaded) - set(model_state))
    wrong = sorted(f"{name(k)} {tuple(loaded[k].shape)} vs {tuple(model_state[k].shape)}" for k in set(loaded) & set(
        model_state) if tuple(loaded[k].shape) != tuple(model_state[k].shape))
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:6]) + (f" (and {len(keys) - 6} more)" if len(keys) > 6 else "")
        parts = [f"missing {len(missing)}: {show(missing)}" if missing else "",
                 f"unexpected {len(unexpected)}: {show(unexpected)}" if unexpected else "",
                 f"wrong shape {len(wrong)} (file vs model): {show(wrong)}" if wrong else ""]
        raise ValueError(f"{source}: weights do not match the model ({'; '.join(p for p in parts if p)}). "
                         "Check --model_size, and that the file is a Cosmos-Predict2 Text2Image DiT.")


def full_model_state(model_state: dict, ema_state: dict | None) -> dict:
    """NVIDIA's post-training model file in memory: `net.*` in bf16 and `net_ema.*` in fp32, NVIDIA key names
    (for small models and tests; training runs build the file from their shards with write_model_file)."""
    out = diffusers_to_nvidia({k: v.to(torch.bfloat16) for k, v in model_state.items()}, "net.")
    if ema_state is not None:
        out.update(diffusers_to_nvidia({k: v.float() for k, v in ema_state.items()}, "net_ema."))
    return out


def is_lora_file(state: dict) -> bool:
    """True for adapter-only LoRA files: ours, and the other tools' (lora_A: diffusers, ComfyUI, diffusion-pipe;
    lora_down: kohya); not for NVIDIA's PEFT-injected model files (their `.base_layer.` weights)."""
    return "lora_metadata" in state or (
        any(".lora_A." in k or ".lora_down." in k for k in state) and not any(".base_layer." in k for k in state))
