"""LoRA adapters in every form we read and write: ours (.pt), diffusers (safetensors + PEFT config), ComfyUI.

Internally an adapter is {diffusers module name: (A, B)} plus alpha per module, so scale = alpha / rank.
"""

import json
from pathlib import Path

import torch

from .models import diffusers_to_nvidia_key, nvidia_to_diffusers_key, read_weights

COMFY_PREFIX = "diffusion_model."
DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"


def adapter_from_state(state: dict, alpha=None, use_ema: bool = False, source="adapter") -> dict:
    """{module: {"A", "B", "alpha"}} in diffusers names from any of the three key layouts."""
    if use_ema and not any(k.startswith("net_ema.") for k in state):
        raise ValueError(f"{source}: --load_ema was given but this LoRA file holds no EMA adapter (no 'net_ema.*').")
    prefix = "net_ema." if use_ema else "net."
    modules: dict = {}
    for key, value in state.items():
        if not torch.is_tensor(value):
            continue
        k = key
        for p in (prefix, COMFY_PREFIX, "transformer."):
            if k.startswith(p):
                k = k[len(p):]
                break
        else:
            if key.startswith(("net.", "net_ema.")):
                continue  # the other of net./net_ema.
        if k.endswith(".alpha"):
            modules.setdefault(nvidia_to_diffusers_key(k[:-len(".alpha")]), {})["alpha"] = float(value)
            continue
        for part in ("lora_A", "lora_B"):
            if f".{part}." in k:
                module = nvidia_to_diffusers_key(k.split(f".{part}.")[0])
                modules.setdefault(module, {})[part[-1]] = value
    if not modules:
        raise ValueError(f"{source}: no LoRA weights found (expected keys with lora_A/lora_B).")
    for module, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            raise ValueError(f"{source}: module {module} has only one of lora_A / lora_B.")
        entry.setdefault("alpha", float(alpha) if alpha is not None else float(entry["A"].shape[0]))
    return modules


def read_lora(path, use_ema: bool = False):
    """(adapter, metadata) from our .pt file, a diffusers adapter folder/file, or a ComfyUI safetensors file."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_FILE
    state = read_weights(path)
    metadata = state.get("lora_metadata") or {}
    alpha = metadata.get("alpha")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
        if "lora_adapter_metadata" in header:
            config = {k.removeprefix("transformer."): v for k, v in json.loads(header["lora_adapter_metadata"]).items()}
            alpha, metadata = config.get("lora_alpha"), {"rank": config.get("r"), "alpha": config.get("lora_alpha")}
    return adapter_from_state(state, alpha, use_ema, path), metadata


@torch.no_grad()
def merge_adapter(model, adapter: dict, scale: float = 1.0) -> None:
    """W += scale * (alpha / rank) * B @ A for each adapted module (in place)."""
    modules = dict(model.named_modules())
    missing = sorted(m for m in adapter if m not in modules)
    if missing:
        raise ValueError(f"LoRA modules not in the model: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
                         "Is this adapter for this model size?")
    for name, entry in adapter.items():
        weight = modules[name].weight
        a, b = entry["A"].float().to(weight.device), entry["B"].float().to(weight.device)
        weight.copy_((weight.float() + scale * entry["alpha"] / a.shape[0] * (b @ a)).to(weight.dtype))


def to_comfyui(adapter: dict) -> dict:
    """ComfyUI's Cosmos-Predict2 LoRA keys: diffusion_model.<NVIDIA module>.lora_A/B.weight and .alpha."""
    out = {}
    for module, entry in adapter.items():
        name = COMFY_PREFIX + diffusers_to_nvidia_key(module)
        out[f"{name}.lora_A.weight"] = entry["A"].contiguous()
        out[f"{name}.lora_B.weight"] = entry["B"].contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(entry["alpha"]))
    return out


def save_diffusers_adapter(adapter: dict, folder) -> Path:
    """A folder that CosmosTransformer3DModel.load_lora_adapter(folder, weight_name=...) loads."""
    from safetensors.torch import save_file

    alphas = {e["alpha"] for e in adapter.values()}
    ranks = {e["A"].shape[0] for e in adapter.values()}
    if len(alphas) != 1 or len(ranks) != 1:
        raise ValueError("diffusers export needs one rank and alpha for all modules.")
    rank, alpha = ranks.pop(), alphas.pop()
    targets = sorted({m.split(".", 2)[2] if m.startswith("transformer_blocks.") else m for m in adapter})
    config = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "peft_type": "LORA", "bias": "none",
              "init_lora_weights": True, "lora_dropout": 0.0, "use_dora": False, "use_rslora": False}
    tensors = {}
    for module, entry in adapter.items():
        tensors[f"transformer.{module}.lora_A.weight"] = entry["A"].contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = entry["B"].contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # diffusers keeps pipeline-level adapters under the component prefix, metadata keys included
    prefixed = {f"transformer.{k}": v for k, v in config.items()}
    save_file(tensors, str(folder / DIFFUSERS_FILE), metadata={"format": "pt",
                                                               "lora_adapter_metadata": json.dumps(prefixed)})
    return folder / DIFFUSERS_FILE
