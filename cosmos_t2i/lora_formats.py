"""LoRA files of other tools, both ways: the key layouts of diffusers/PEFT, ComfyUI (and diffusion-pipe) and kohya
sd-scripts. lora.py holds the adapter itself, {diffusers module: {"A", "B", "alpha"}}, scale = alpha / rank.

    ours          net.<NVIDIA module>.lora_A.weight / .lora_B.weight, alpha in lora_metadata; a text adapter trained
                  in full as plain net.llm_adapter.* weights
    diffusers     transformer.<diffusers module>.lora_A.weight, text_conditioner.<adapter module>.lora_A.weight;
                  alpha in the safetensors metadata `lora_adapter_metadata` (a LoraConfig per component, its keys
                  prefixed `transformer.` / `text_conditioner.`), else alpha = rank
    PEFT folder   adapter_model.safetensors + adapter_config.json (diffusion-pipe saves its ComfyUI keys so)
    ComfyUI       diffusion_model.<NVIDIA module>.lora_A.weight / .lora_B.weight [.alpha], the adapter as
                  diffusion_model.llm_adapter.*; whole tensors as <ComfyUI key>.set_weight (ComfyUI copies them in)
    kohya         lora_unet_<NVIDIA module, dots as underscores>.lora_down.weight / .lora_up.weight / .alpha

See docs/anima.md ("LoRA formats") for where each rule was read in the tools' sources.
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from .weight_files import COMFY_PREFIXES, diffusers_to_nvidia_key, nvidia_to_diffusers_key, select_weights

DIFFUSERS_FILE, PEFT_FILE = "pytorch_lora_weights.safetensors", "adapter_model.safetensors"
COMFY_PREFIX, KOHYA_PREFIX, SET_WEIGHT = "diffusion_model.", "lora_unet_", ".set_weight"
CONDITIONER = "text_conditioner."
_PARTS = ((".lora_A.default.weight", "A"), (".lora_B.default.weight", "B"), (".lora_A.weight", "A"),
          (".lora_B.weight", "B"), (".lora_down.weight", "A"), (".lora_up.weight", "B"), (".alpha", "alpha"))

# Every Linear of the DiT and of Anima's adapter, NVIDIA names (a block's relative to it). kohya's names replace every
# dot by an underscore, which cannot be undone by rule (self_attn_q_proj): they are read back by matching these.
_DIT_BLOCK = ([f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "output_proj")]
              + ["mlp.layer1", "mlp.layer2"]
              + [f"adaln_modulation_{m}.{i}" for m in ("self_attn", "cross_attn", "mlp") for i in (1, 2)])
_ADAPTER_BLOCK = ([f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
                  + ["mlp.0", "mlp.2"])
_TOP = ["x_embedder.proj.1", "t_embedder.1.linear_1", "t_embedder.1.linear_2", "final_layer.linear",
        "final_layer.adaln_modulation.1", "final_layer.adaln_modulation.2", "llm_adapter.in_proj",
        "llm_adapter.out_proj"]
_KOHYA_BLOCK = re.compile(r"(llm_adapter_)?blocks_(\d+)_(\w+)")


def _underscored(names) -> dict:
    return {n.replace(".", "_"): n for n in names}


def kohya_name(nvidia_module: str) -> str:
    """sd-scripts' name of a module: `lora_unet_` + its NVIDIA path with dots as underscores."""
    return KOHYA_PREFIX + nvidia_module.replace(".", "_")


def nvidia_of_kohya(name: str, source) -> str:
    """The NVIDIA module name of a kohya `lora_unet_*` name, by matching the known module names."""
    rest, inner = name.removeprefix(KOHYA_PREFIX), None
    block = _KOHYA_BLOCK.fullmatch(rest)
    if block:
        inner = _underscored(_ADAPTER_BLOCK if block[1] else _DIT_BLOCK).get(block[3])
        if inner:
            return f"{'llm_adapter.' if block[1] else ''}blocks.{block[2]}.{inner}"
    elif rest in _underscored(_TOP):
        return _underscored(_TOP)[rest]
    raise ValueError(f"{source}: {name} names no Linear of the Cosmos DiT or Anima's text adapter (kohya names are "
                     "lora_unet_ + the module path with dots as underscores); is it a LoRA of another model?")


def _without_prefix(name: str) -> str:
    """A key without ComfyUI's (`model.diffusion_model.`, `diffusion_model.`) or diffusers' `transformer.` prefix."""
    for prefix in COMFY_PREFIXES + ("transformer.",):
        name = name.removeprefix(prefix)
    return name


def module_name(name: str, key: str, source) -> str:
    """The diffusers module name of a LoRA entry's module part in any layout (`key`: the entry, for errors)."""
    name = _without_prefix(name)
    if name.startswith("lora_te"):
        raise ValueError(f"{source}: {key} adapts the text encoder (kohya's lora_te*), which LoRAs are not applied "
                         "to here: only the DiT and Anima's text adapter are; remove those entries.")
    if name.startswith(KOHYA_PREFIX):
        name = nvidia_of_kohya(name, source)
    return nvidia_to_diffusers_key(name)


def lora_entry(key: str, source) -> tuple[str, str] | None:
    """(diffusers module, "A" | "B" | "alpha") of a LoRA entry in any layout above; None for any other entry."""
    for suffix, part in _PARTS:
        if key.endswith(suffix):
            return module_name(key[:-len(suffix)], key, source), part
    if ".lora_" in key or key.endswith(".dora_scale"):
        raise ValueError(f"{source}: {key} is a LoRA entry of a kind not read here (plain LoRA only: lora_A/lora_B, "
                         "lora_down/lora_up and alpha; no DoRA, LoCon or biases).")
    return None


def full_weights(state: dict, load_ema: bool, source) -> dict:
    """{diffusers key: tensor} of the whole tensors a LoRA file carries beside its pairs, which replace the base's
    (a text adapter trained in full): our plain `net.llm_adapter.*` entries and ComfyUI's `*.set_weight`."""
    out = {}
    for key, value in select_weights(state, load_ema, source).items():
        if lora_entry(key, source) is not None:
            continue
        name = _without_prefix(key)
        if name.endswith(SET_WEIGHT):  # ComfyUI maps `<module>` to its .weight, any other tensor by its own name
            name = name[:-len(SET_WEIGHT)]
            name = name if name.endswith(".bias") else name + ".weight"
        out[nvidia_to_diffusers_key(name.replace(".base_layer.", "."))] = value
    return out


def lora_weights_file(path) -> Path:
    """The weight file of a LoRA file or folder (diffusers' pytorch_lora_weights, PEFT's adapter_model)."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = [path / n for n in (DIFFUSERS_FILE, PEFT_FILE) if (path / n).is_file()]
    if not found:
        raise FileNotFoundError(f"{path}: a LoRA folder holds {DIFFUSERS_FILE} (diffusers) or {PEFT_FILE} (PEFT, "
                                "diffusion-pipe); this one has neither.")
    return found[0]


def peft_configs(file: Path) -> dict:
    """{component: LoraConfig dict} ("transformer", "text_conditioner", or "" unprefixed) from a safetensors file's
    `lora_adapter_metadata` or the adapter_config.json beside a PEFT file; {} when neither says."""
    header = {}
    if file.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(file), "pt") as f:
            header = f.metadata() or {}
    if "lora_adapter_metadata" in header:
        flat = json.loads(header["lora_adapter_metadata"])
    elif file.name == PEFT_FILE and (file.parent / "adapter_config.json").is_file():
        flat = json.loads((file.parent / "adapter_config.json").read_text())
    else:
        return {}
    configs: dict = {}
    for key, value in flat.items():
        component, _, field = key.partition(".") if key.startswith(("transformer.", CONDITIONER)) else ("", "", key)
        configs.setdefault(component, {})[field] = value
    return configs


def config_alpha(configs: dict, module: str, rank: int) -> float:
    """The alpha PEFT gives `module` (diffusers name) under its component's LoraConfig: alpha_pattern, else
    lora_alpha (PEFT's default 8); rsLoRA's scale alpha / sqrt(r) turned into ours, alpha / rank."""
    component = "text_conditioner" if module.startswith(CONDITIONER) else "transformer"
    if component in configs:  # a pipeline's: names relative to the component
        config, names = configs[component], (module.removeprefix(CONDITIONER),)
    elif set(configs) & {"transformer", "text_conditioner"}:  # a pipeline's without this component: diffusers
        return float(rank)                                     # loads it with no config, alpha = rank
    else:  # a model's (diffusers' save_lora_adapter, or diffusion-pipe's PEFT folder in NVIDIA names)
        config, names = configs.get("", {}), (module, diffusers_to_nvidia_key(module))
    pattern = config.get("alpha_pattern") or {}
    key = next((k for k in pattern for n in names if re.match(rf"(.*\.)?({k})$", n)), None)
    alpha = float(pattern[key] if key is not None else config.get("lora_alpha", 8))
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


# ---------------------------------------------------------------- writing
def to_comfyui(adapter: dict, alpha_entries: bool = True, full: dict | None = None) -> dict:
    """ComfyUI's keys: diffusion_model.<NVIDIA module>.lora_A/B.weight with .alpha (Predict2's export), or with the
    scale alpha / rank folded into B and no .alpha (alpha_entries=False: diffusion-pipe's layout, which diffusers'
    Anima loader reads too: it refuses entries without "lora" in their names). `full` tensors (diffusers keys)
    ride as <ComfyUI key>.set_weight."""
    out = {}
    for module, entry in adapter.items():
        name = COMFY_PREFIX + diffusers_to_nvidia_key(module)
        out[f"{name}.lora_A.weight"] = entry["A"].contiguous()
        if alpha_entries:
            out[f"{name}.lora_B.weight"] = entry["B"].contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(entry["alpha"]))
        else:
            out[f"{name}.lora_B.weight"] = (entry["B"].float() * (entry["alpha"] / entry["A"].shape[0])).to(
                entry["B"].dtype).contiguous()
    for key, value in (full or {}).items():
        name = COMFY_PREFIX + diffusers_to_nvidia_key(key)
        out[name.removesuffix(".weight") + SET_WEIGHT] = value.contiguous()
    return out


def to_kohya(adapter: dict) -> dict:
    """sd-scripts' keys: lora_unet_<NVIDIA module with underscores>.lora_down.weight (A), .lora_up.weight (B), .alpha
    (a float32 scalar, as its LoRAModule's buffer)."""
    out = {}
    for module, entry in adapter.items():
        name = kohya_name(diffusers_to_nvidia_key(module))
        out[f"{name}.lora_down.weight"] = entry["A"].contiguous()
        out[f"{name}.lora_up.weight"] = entry["B"].contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(entry["alpha"]))
    return out


def kohya_metadata(adapter: dict, anima: bool) -> dict:
    """The few `ss_*` entries sd-scripts writes that UIs read: the commonest rank and alpha, and for Anima its
    network module (sd-scripts trains no Predict2)."""
    rank, alpha = _commonest(adapter)
    return ({"ss_network_module": "networks.lora_anima"} if anima else {}) | {
        "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}


def _commonest(adapter: dict) -> tuple[int, float]:
    return (Counter(e["A"].shape[0] for e in adapter.values()).most_common(1)[0][0],
            Counter(e["alpha"] for e in adapter.values()).most_common(1)[0][0])


def diffusers_config(adapter: dict, exact: bool = False) -> dict:
    """The LoraConfig of one component's modules (names relative to it): the commonest rank and alpha, the others
    in rank_pattern / alpha_pattern (anchored full names), targets as block-relative suffixes (Predict2's, as before)
    or, `exact`, the modules' full names (PEFT then injects into those alone, and warns of no unloaded target)."""
    rank, alpha = _commonest(adapter)
    targets = sorted(adapter) if exact else sorted(
        {m.split(".", 2)[2] if m.startswith(("transformer_blocks.", "blocks.")) else m for m in adapter})
    config = {"r": rank, "lora_alpha": alpha, "target_modules": targets, "peft_type": "LORA", "bias": "none",
              "init_lora_weights": True, "lora_dropout": 0.0, "use_dora": False, "use_rslora": False}
    ranks = {f"^{re.escape(m)}": e["A"].shape[0] for m, e in adapter.items() if e["A"].shape[0] != rank}
    alphas = {f"^{re.escape(m)}": e["alpha"] for m, e in adapter.items() if e["alpha"] != alpha}
    return config | ({"rank_pattern": ranks} if ranks else {}) | ({"alpha_pattern": alphas} if alphas else {})


def save_diffusers_adapter(adapter: dict, folder, exact_targets: bool = False) -> Path:
    """A folder that diffusers loads: CosmosTransformer3DModel.load_lora_adapter(folder, weight_name=...) for
    Predict2, AnimaModularPipeline.load_lora_weights(folder) for Anima (its adapter's modules under
    text_conditioner.*; exact_targets). Written to a temporary name and renamed, so an interrupted export leaves no
    half file."""
    from safetensors.torch import save

    from .files import atomic_write

    tensors, metadata = {}, {}
    for component in ("transformer", "text_conditioner"):
        part = {m.removeprefix(CONDITIONER): e for m, e in adapter.items() if m.startswith(CONDITIONER) == (
            component == "text_conditioner")}
        if not part:
            continue
        # diffusers keeps pipeline-level adapters under the component prefix, metadata keys included
        metadata.update({f"{component}.{k}": v for k, v in diffusers_config(part, exact_targets).items()})
        for module, entry in part.items():
            tensors[f"{component}.{module}.lora_A.weight"] = entry["A"].contiguous()
            tensors[f"{component}.{module}.lora_B.weight"] = entry["B"].contiguous()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / DIFFUSERS_FILE) as f:
        f.write(save(tensors, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(metadata)}))
    return folder / DIFFUSERS_FILE
