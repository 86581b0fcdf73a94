"""LoRA adapters: injecting them for training, reading them from any tool's file, merging them, starting a run from
one. Internally an adapter is {diffusers module name: {"A", "B", "alpha"}}, so scale = alpha / rank; the other tools'
key layouts, both ways, are in lora_formats.py.
"""

from pathlib import Path

import torch

from .lora_formats import config_alpha, full_weights, lora_entry, lora_weights_file, peft_configs
from .weight_files import diffusers_to_nvidia_key, nvidia_to_diffusers_key, read_weights, select_weights


def lora_target_modules(nvidia_names) -> list[str]:
    """NVIDIA module names (q_proj, mlp.layer1, ...) -> diffusers suffixes PEFT matches (to_q, ff.net.0.proj, ...)."""
    return [nvidia_to_diffusers_key(n) for n in nvidia_names]


def add_lora(model, rank: int, alpha: float, nvidia_targets, seed: int) -> None:
    """Freeze the model and inject PEFT LoRA adapters (fp32, as NVIDIA trains them) into the named modules.

    The adapters' random init is drawn from `seed` alone, so every process builds the same ones (FSDP does not
    broadcast them).
    """
    from peft import LoraConfig

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=True,
                                     target_modules=lora_target_modules(nvidia_targets)))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def adapter_from_state(state: dict, alpha=None, load_ema: bool = False, source="adapter") -> dict:
    """{module: {"A", "B", "alpha"}} in diffusers names from any layout lora_formats.py reads (ours and NVIDIA's
    `net.`/`net_ema.` and PEFT `lora_A.default`, diffusers', ComfyUI's, diffusion-pipe's, kohya's).

    alpha: a module's `.alpha` entry, else `alpha` (a number, or a function of (module, rank)), else the rank (scale
    1: NVIDIA's, diffusers' and diffusion-pipe's default).
    """
    modules: dict = {}
    for key, value in select_weights(state, load_ema, source).items():
        found = lora_entry(key, source)
        if found is None:
            continue
        module, part = found
        entry = modules.setdefault(module, {})
        if part == "alpha":
            entry["alpha"] = float(value)
        else:
            entry[part] = value
            entry.setdefault("keys", {})[part] = key  # as the file names it, for error messages
    if not modules:
        raise ValueError(f"{source}: no LoRA weights found (expected keys with lora_A/lora_B or lora_down/lora_up).")
    for module, entry in modules.items():
        if "A" not in entry or "B" not in entry:
            raise ValueError(f"{source}: module {module} has only one of lora_A / lora_B.")
        a, b = entry["A"], entry["B"]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{source}: {entry['keys']['A']} {tuple(a.shape)} and {entry['keys']['B']} "
                             f"{tuple(b.shape)} are not a LoRA pair (B's columns must equal A's rows, the rank). "
                             "The file is damaged: export or download it again.")
        if "alpha" not in entry:
            given = alpha(module, a.shape[0]) if callable(alpha) else alpha
            entry["alpha"] = float(given if given is not None else a.shape[0])
    return modules


def merged_weight(weight: torch.Tensor, entry: dict, scale: float = 1.0) -> torch.Tensor:
    """W + scale * (alpha / rank) * B @ A, computed in fp32, in W's dtype."""
    a, b = entry["A"].float().to(weight.device), entry["B"].float().to(weight.device)
    return (weight.float() + scale * entry["alpha"] / a.shape[0] * (b @ a)).to(weight.dtype)


def merge_peft_state(weights: dict) -> dict:
    """Fold a PEFT-injected state dict (NVIDIA's LoRA post-training files: `q_proj.base_layer.weight` with
    `q_proj.lora_A.default.weight`, ...) into plain weights of the same names. NVIDIA stores no alpha: scale 1."""
    lora = {k: v for k, v in weights.items() if ".lora_A." in k or ".lora_B." in k}
    plain = {k.replace(".base_layer.", "."): v for k, v in weights.items()
             if k not in lora and ".lora_embedding" not in k}
    by_nvidia_name = {diffusers_to_nvidia_key(m): e for m, e in adapter_from_state(lora, source="PEFT state").items()}
    for module, entry in by_nvidia_name.items():
        plain[module + ".weight"] = merged_weight(plain[module + ".weight"], entry)
    return plain


def read_lora(path, load_ema: bool = False, state: dict | None = None):
    """(adapter, metadata) from a LoRA file or folder of any tool (lora_formats.py); `state`: the file's contents when
    already read. Alpha comes from the file's `.alpha` entries, our metadata, or diffusers'/PEFT's LoraConfig."""
    file = lora_weights_file(path)
    state = read_weights(file) if state is None else state
    metadata = state.get("lora_metadata") or {}
    alpha = metadata.get("alpha")
    configs = peft_configs(file)
    if configs:
        main = configs.get("transformer") or configs.get("") or next(iter(configs.values()))
        alpha, metadata = (lambda module, rank: config_alpha(configs, module, rank)), {
            "rank": main.get("r"), "alpha": main.get("lora_alpha")}
    return adapter_from_state(state, alpha, load_ema, file), metadata


def read_full_weights(path, load_ema: bool = False) -> dict:
    """{diffusers key: tensor} of what a LoRA file or folder carries in full (a text adapter trained with
    --adapter_lr): its plain or `.set_weight` entries, and a diffusers export's text_conditioner/ folder."""
    from .weight_files import mmap_safetensors

    file = lora_weights_file(path)
    out = full_weights(read_weights(file), load_ema, file)
    if Path(path).is_dir():
        for f in sorted((Path(path) / "text_conditioner").glob("*.safetensors")):
            out.update({"text_conditioner." + k: v for k, v in mmap_safetensors(f).items()})
    return out


@torch.no_grad()
def merge_adapter(model, adapter: dict, scale: float = 1.0, source="the LoRA") -> None:
    """W += scale * (alpha / rank) * B @ A for each adapted module (in place), once the adapter is known to fit."""
    check_adapter_fits(model, adapter, source)
    modules = dict(model.named_modules())
    for name, entry in adapter.items():
        modules[name].weight.copy_(merged_weight(modules[name].weight, entry, scale))


def check_adapter_fits(model, adapter: dict, source) -> None:
    """Raise naming the file, the first key that does not fit, both shapes, and the model size the adapter was made
    for when its width tells (a 2B LoRA on a 14B base, say). Short: the one-line error shows 400 characters."""
    from .registry import size_of_config

    modules = dict(model.named_modules())
    loaded = size_of_config(dict(getattr(model, "config", {}))) or "loaded"
    made_for = adapter_size(adapter)
    fix = "use it with the base it was trained on (--dit_path/--base_dit_path)."
    if made_for and made_for != loaded:
        fix = f"this LoRA is for the {made_for} model; use it with a {made_for} --dit_path/--base_dit_path."
    for name in sorted(adapter, key=_block_order):
        entry, module = adapter[name], modules.get(name)
        keys = entry.get("keys", {"A": f"{name}.lora_A", "B": f"{name}.lora_B"})
        if not isinstance(getattr(module, "weight", None), torch.Tensor):
            raise ValueError(f"{source}: {keys['A']} adapts {name}, which the {loaded} model does not have: {fix}")
        out_features, in_features = module.weight.shape
        a, b = tuple(entry["A"].shape), tuple(entry["B"].shape)
        if a[1] != in_features:
            raise ValueError(f"{source}: {keys['A']} is {a} but the {loaded} model's {name} needs "
                             f"({a[0]}, {in_features}): {fix}")
        if b[0] != out_features:
            raise ValueError(f"{source}: {keys['B']} is {b} but the {loaded} model's {name} needs "
                             f"({out_features}, {b[1]}): {fix}")


def adapter_size(adapter: dict) -> str | None:
    """The registry size whose width matches the adapter's self-attention inputs, or None."""
    from .registry import MODEL_SIZES, transformer_config

    widths = {e["A"].shape[1] for m, e in adapter.items() if m.endswith("attn1.to_q")}
    for name in MODEL_SIZES:
        config = transformer_config(name)
        if widths == {config["num_attention_heads"] * config["attention_head_dim"]}:
            return name
    return None


def _block_order(name: str):
    """transformer_blocks.2 before transformer_blocks.10, so the first misfit reported is the first in the model."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


@torch.no_grad()
def load_adapter_into_peft_(model, adapter: dict, source) -> None:
    """Start a LoRA run from a LoRA file: copy `adapter` (as read_lora returns it) into the PEFT layers add_lora
    injected, in fp32. B is rescaled by (file's alpha / rank) / (run's alpha / rank), so the run's scale * B @ A is
    the file's; training then goes on at the run's --lora_alpha. Every adapted module must be in the file and the
    reverse, at the run's rank: a one-line error names the file, the entry and the flag to change otherwise."""
    from peft.tuners.lora import LoraLayer

    layers = {name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", ""): m
              for name, m in model.named_modules() if isinstance(m, LoraLayer)}
    for name in sorted(adapter, key=_block_order):
        entry, layer = adapter[name], layers.get(name)
        key = entry.get("keys", {}).get("A", f"{name}.lora_A")
        if layer is None:
            raise ValueError(f"{source}: {key} adapts {diffusers_to_nvidia_key(name)}, which this run does not adapt: "
                             "add it to --lora_target_modules (NVIDIA module names).")
        a, b = entry["A"], entry["B"]
        rank, down, up = layer.r["default"], layer.lora_A["default"].weight, layer.lora_B["default"].weight
        if a.shape[0] != rank:
            raise ValueError(f"{source}: {key} is rank {a.shape[0]}, this run's LoRA rank {rank}: pass --lora_rank "
                             f"{a.shape[0]}.")
        if a.shape != down.shape or b.shape != up.shape:
            raise ValueError(f"{source}: {key} {tuple(a.shape)} and its B {tuple(b.shape)} do not fit {name} "
                             f"({tuple(down.shape)}, {tuple(up.shape)}): is it a LoRA of this model?")
        down.copy_(a.float())
        up.copy_(b.float() * ((entry["alpha"] / a.shape[0]) / layer.scaling["default"]))
    missing = sorted(set(layers) - set(adapter), key=_block_order)
    if missing:
        raise ValueError(f"{source} holds no LoRA for {diffusers_to_nvidia_key(missing[0])} (and {len(missing) - 1} "
                         "more modules this run adapts): pass --lora_target_modules naming the file's modules only.")


class Float8StorageLinear(torch.nn.Linear):
    """A frozen Linear whose weight is stored as float8_e5m2 times one fp32 scale, and computed in the input's
    dtype: half the memory of bf16 for a LoRA's base. (e5m2 rather than e4m3: others report e4m3 storage degrades
    Cosmos; with a per-tensor scale the largest weight sits at the top of e5m2's range, so none underflows.)"""

    E5M2_MAX = 57344.0

    @classmethod
    def convert_(cls, linear: torch.nn.Linear) -> None:
        with torch.no_grad():
            weight = linear.weight.float()
            scale = (weight.abs().amax() / cls.E5M2_MAX).clamp_min(1e-12)
            linear.weight = torch.nn.Parameter((weight / scale).to(torch.float8_e5m2), requires_grad=False)
        linear.register_buffer("weight_scale", scale, persistent=False)  # not part of any checkpoint
        linear.__class__ = cls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)
        return torch.nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def store_frozen_linears_in_fp8_(blocks, device=None) -> int:
    """Every frozen Linear in `blocks` (the model's transformer_blocks, or one block; LoRA base layers included) to
    Float8StorageLinear; returns how many parameters moved to 1-byte storage. Call after the adapters are added
    (they stay fp32).

    With `device`, each layer moves there before it is converted: load the model on the CPU and only one layer at a
    time is ever on the GPU in bf16 (a 14B base in bf16 would not fit the 24 GB card this is for).
    """
    moved = 0
    for module in blocks.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad:
            moved += module.weight.numel()
            Float8StorageLinear.convert_(module.to(device) if device is not None else module)
    return moved
