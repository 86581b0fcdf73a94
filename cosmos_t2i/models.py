"""Loading the DiT and the Wan2.1 VAE from every form users hold (weight files and key names: weight_files.py).

See docs/checkpoints.md for the accepted files and the key mapping.
"""

import hashlib
import logging
from pathlib import Path

import torch

from .registry import check_size_matches, transformer_config
from .weight_files import (COMFY_PREFIXES, NVIDIA_TOP_LEVEL, check_keys, diffusers_to_nvidia_key, mmap_safetensors,
                           nvidia_to_diffusers, read_weights, safetensors_header, select_weights)

logger = logging.getLogger(__name__)
ANIMA_MODEL = ("is an Anima model (it holds the text adapter: llm_adapter.* or text_conditioner/): load it with "
               "--family anima.")


def keep_compile_cache() -> None:
    """torch.compile's caches in ~/.cache/cosmos_t2i/torch_compile (unless TORCHINDUCTOR_CACHE_DIR is set), not
    under /tmp, which containers and reboots clear: a later run then waits about 3 s for compilation instead of 12
    (2B inference, H100; benchmarks/bench_compile_warmup.py). Call before anything compiles."""
    import os
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "cosmos_t2i" / "torch_compile"))


def quiet_library_logs() -> None:
    """Silence library chatter that is not actionable for our users (dtype-cast notes, optional kernels)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()


def new_transformer(model_size: str, dtype=torch.float32, device="cpu", **overrides):
    """A randomly initialised DiT of a registry size (for benchmarks, and as the skeleton for bare weights)."""
    from diffusers import CosmosTransformer3DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: a 14B fp32 copy would not fit on a GPU
    try:
        with torch.device(device):
            model = CosmosTransformer3DModel(**{**transformer_config(model_size), **overrides})
    finally:
        torch.set_default_dtype(previous)
    return model


def transformer_weights(path, model_size: str | None = None, load_ema: bool = False, state: dict | None = None,
                        family=None):
    """(model size, {diffusers name: CPU tensor}) from a weight file or a diffusers transformer folder (with an
    Anima pipeline's text_conditioner/ beside it), key- and shape-checked against the family's model. Tensors stay
    memory-mapped: no process holds a copy until it uses one."""
    from .families import PREDICT2

    path, file_name = Path(path), None
    if path.is_dir():
        import json
        from .registry import size_of_config

        folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
        config = json.loads((folder / "config.json").read_text())
        check_size_matches(model_size, config, str(folder / "config.json"))
        model_size = model_size or size_of_config(config)
        weights = {}
        for f in sorted(folder.glob("*.safetensors")):
            weights.update(mmap_safetensors(f))
        for f in sorted((folder.parent / "text_conditioner").glob("*.safetensors")):
            weights.update({"text_conditioner." + k: v for k, v in mmap_safetensors(f).items()})
    else:
        state = read_weights(path) if state is None else state
        comfy = next((p for p in COMFY_PREFIXES if any(k.startswith(p) for k in state)), None)
        if comfy and not any(k.startswith(("net.", "net_ema.")) for k in state):  # ComfyUI's layout of a model file
            state = {k[len(comfy):]: v for k, v in state.items() if k.startswith(comfy)}
        if model_size is None:
            model_size = size_of_state(state)
            if model_size is None:
                raise ValueError(f"{path} is a bare weight file whose shape matches no known size: pass "
                                 "--model_size (0.6B, 2B, 14B or tiny).")
        weights = select_weights(state, load_ema, path)
        if any(".base_layer." in k for k in weights):
            from .lora import merge_peft_state
            weights = merge_peft_state(weights)
        if any(k.startswith(NVIDIA_TOP_LEVEL) for k in weights):  # errors name keys as the file does
            prefix = "net_ema." if load_ema else "net." if any(k.startswith("net.") for k in state) else ""
            file_name = lambda k: prefix + diffusers_to_nvidia_key(k)  # noqa: E731
        weights = nvidia_to_diffusers(weights, path)  # diffusers-named keys pass through unchanged
    skeleton = (family or PREDICT2).new_model(model_size, torch.float32, "meta").state_dict()
    if any(k.startswith("text_conditioner.") for k in set(weights) - set(skeleton)):
        raise ValueError(f"{path} " + ANIMA_MODEL)
    check_keys(skeleton, weights, path, file_name)
    return model_size, weights


def size_of_state(state: dict) -> str | None:
    """The registry size whose width and depth match a state dict (any key layout), or None."""
    from .registry import MODEL_SIZES

    weights = nvidia_to_diffusers(select_weights(state, False, "weights"))
    embed = weights.get("patch_embed.proj.weight")
    if embed is None:
        return None
    depth = len({k.split(".")[1] for k in weights if k.startswith("transformer_blocks.")})
    for name in MODEL_SIZES:
        config = transformer_config(name)
        if config["num_layers"] == depth and \
                config["num_attention_heads"] * config["attention_head_dim"] == embed.shape[0]:
            return name
    return None


def load_transformer(dit_path: str | None, model_size: str | None = None, load_ema: bool = False,
                     dtype=torch.bfloat16, device="cpu", state: dict | None = None):
    """The DiT from a diffusers folder, an NVIDIA/our `.pt`/`.safetensors` file, a hub id, or random (no path).

    `state` is the weight file's contents when the caller has already read it (it is not read again).
    """
    from diffusers import CosmosTransformer3DModel

    if dit_path is None:
        if model_size is None:
            raise ValueError("Pass --dit_path, or --model_size for a randomly initialised model.")
        return new_transformer(model_size, dtype, device)
    path = Path(dit_path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").exists() else path
        if not (folder / "config.json").exists():
            raise FileNotFoundError(f"{path}: not a diffusers transformer folder (no config.json). For a training "
                                    "run directory, pass its model/iter_*.pt file.")
        if load_ema:
            raise ValueError(f"{path}: --load_ema was given but a diffusers folder holds no EMA weights (one set "
                             "only). Drop --load_ema, or export the EMA weights with --load_ema.")
        if (folder.parent / "text_conditioner").is_dir():
            raise ValueError(f"{path} " + ANIMA_MODEL)
        check_folder_files(folder)
        model = CosmosTransformer3DModel.from_pretrained(str(folder), torch_dtype=dtype)
        check_size_matches(model_size, dict(model.config), str(folder / "config.json"))
        return model.to(device)
    if path.suffix in (".pt", ".pth", ".safetensors", ".bin"):
        model_size, weights = transformer_weights(path, model_size, load_ema, state)
        model = new_transformer(model_size, torch.float32, "meta")
        model.load_state_dict(weights, strict=True, assign=True)  # the memory-mapped tensors, no copy yet
        return model.to(device=device, dtype=dtype)
    if path.exists() or "/" not in dit_path:
        raise FileNotFoundError(f"{dit_path}: not a file or folder this loader knows (.pt, .safetensors, or a "
                                "diffusers folder).")
    model = CosmosTransformer3DModel.from_pretrained(dit_path, subfolder="transformer", torch_dtype=dtype)
    check_size_matches(model_size, dict(model.config), dit_path)
    return model.to(device)


def check_folder_files(folder) -> None:
    """Each safetensors file of a diffusers folder is complete (its header against its size): a truncated one is a
    one-sentence error naming it, not an OSError from deep inside from_pretrained."""
    for path in sorted(Path(folder).glob("*.safetensors")):
        safetensors_header(path)


def resolve_dit_path(dit_path: str) -> str:
    """A training run folder (or its checkpoints/ folder) stands for its latest model file; the rest as given."""
    from .lora_formats import DIFFUSERS_FILE, PEFT_FILE

    path = Path(dit_path)
    if path.is_dir() and not (path / "config.json").exists() and not (path / "transformer").is_dir() and not any(
            (path / f).is_file() for f in (DIFFUSERS_FILE, PEFT_FILE)):  # a LoRA folder stays one
        from .checkpoint import resolve_model_file
        return str(resolve_model_file(path))
    return dit_path


def lora_file_state(dit_path: str) -> dict | None:
    """The contents of an adapter-only LoRA file or folder (ours, diffusers', ComfyUI's, diffusion-pipe's, kohya's),
    memory-mapped; None for anything else."""
    from .lora_formats import lora_weights_file
    from .weight_files import is_lora_file

    path = Path(dit_path)
    try:
        path = lora_weights_file(path)
    except FileNotFoundError:
        return None
    if not (path.is_file() and path.suffix in (".pt", ".pth", ".safetensors")):
        return None
    state = read_weights(path)
    return state if is_lora_file(state) else None


def load_dit(dit_path, model_size=None, load_ema=False, lora_path=None, lora_scale=1.0, base_dit_path=None,
             dtype=torch.bfloat16, device="cpu", family=None):
    """The DiT from any accepted form, LoRA adapters merged in, in eval mode without gradients.

    dit_path: a weight file, a diffusers folder, a hub id, a training run folder (its latest model file), or a
    LoRA file, which stands for its recorded base (or `base_dit_path`) with the adapter merged (recursively: the
    base may itself be a LoRA file). `lora_path` is merged on top with `lora_scale`. `family` (families.py, default
    Predict2) decides how a file or folder is read (Anima: the DiT with its text adapter attached).
    """
    from .families import PREDICT2
    from .lora import merge_adapter, read_full_weights, read_lora

    family = family or PREDICT2

    dit_path = resolve_dit_path(dit_path) if dit_path else None
    lora_state = lora_file_state(dit_path) if dit_path else None
    if lora_state is not None:
        meta = lora_state.get("lora_metadata") or {}
        base = base_dit_path or meta.get("base_path")
        if not base or base == "None":
            raise ValueError(f"{dit_path} is a LoRA adapter without a recorded base: pass --base_dit_path.")
        if not Path(base).exists():
            raise FileNotFoundError(f"{dit_path}: its base weights {base} are not there; pass --base_dit_path.")
        recorded = meta.get("base_fingerprint")
        if recorded and fingerprint(base) != recorded:
            logger.warning(
                "%s was trained against a base whose content differs from %s (fingerprint mismatch): the adapter "
                "is applied anyway; pass the original base as --base_dit_path if you have it.", dit_path, base)
        if meta.get("base_dtype") == "fp8":
            logger.warning(
                "%s was trained against its base stored in fp8 (--lora_base_dtype fp8); it is merged into the "
                "full-precision base, whose outputs differ slightly from what training saw.", dit_path)
        if meta.get("family", family.name) != family.name:
            raise ValueError(f"{dit_path} is a LoRA of the {meta['family']} family: load it with --family "
                             f"{meta['family']}.")
        # a run started from another LoRA (--dit_path LORA --base_dit_path BASE) recorded BASE for that LoRA
        model = load_dit(base, model_size or meta.get("model_size"), base_dit_path=meta.get("base_dit_path"),
                         dtype=torch.float32, family=family)
        load_full_weights(model, read_full_weights(dit_path, load_ema), dit_path)
        merge_adapter(model, read_lora(dit_path, load_ema, lora_state)[0], source=dit_path)
    else:
        model = family.load_model(dit_path, model_size, load_ema, torch.float32, "cpu")
    if lora_path:
        load_full_weights(model, read_full_weights(lora_path, load_ema), lora_path)
        merge_adapter(model, read_lora(lora_path)[0], lora_scale, source=lora_path)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load_full_weights(model, full: dict, source) -> None:
    """Tensors a LoRA file carries in full (Anima's text adapter trained with --adapter_lr) replace the base's,
    before the LoRA pairs are merged (a pair on such a module adds to its trained weight)."""
    if not full:
        return
    check_keys({k: v for k, v in model.state_dict().items() if k in full}, full, source)
    model.load_state_dict(full, strict=False)


def fingerprint(path) -> str | None:
    """A cheap content hash of a weight file or folder: size plus the first and last 16 MiB of each file."""
    if path is None or not Path(path).exists():
        return None
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        digest.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            digest.update(fh.read(16 << 20))
            if size > 32 << 20:
                fh.seek(-(16 << 20), 2)
                digest.update(fh.read())
    return digest.hexdigest()


def load_vae(vae_path: str, dtype=torch.bfloat16, device="cpu", family=None):
    """The family's VAE from a diffusers folder (or its parent pipeline folder) or a single file in the original
    Wan layout: Predict2's Wan2.1 VAE (NVIDIA's `tokenizer.pth`), Anima's Qwen-Image VAE (ComfyUI's
    `qwen_image_vae.safetensors`; the same architecture, so the same key mapping)."""
    import diffusers

    from .families import PREDICT2

    kind_wanted = (family or PREDICT2).vae_class
    vae_class = getattr(diffusers, kind_wanted)
    path = Path(vae_path)
    not_a_vae = (f"pass the {kind_wanted} as --vae_path: a diffusers {kind_wanted} folder (a pipeline's vae/) or "
                 "its single file (Predict2: NVIDIA's tokenizer/tokenizer.pth).")
    if path.is_dir():
        import json

        folder = path / "vae" if (path / "vae" / "config.json").exists() else path
        config = folder / "config.json"
        kind = json.loads(config.read_text()).get("_class_name") if config.is_file() else None
        if kind != kind_wanted:
            from .families import FAMILIES
            other = next((f.name for f in FAMILIES.values() if f.vae_class == kind), None)
            hint = f" (that VAE is the {other} family's: pass --family {other} if that is the model)" if other else ""
            raise ValueError(f"{folder} holds {'a ' + kind if kind else 'no config.json'}, not a VAE{hint}: "
                             + not_a_vae)
        check_folder_files(folder)
        vae = vae_class.from_pretrained(str(folder), torch_dtype=dtype)
    elif path.is_file():
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        state = read_weights(path)
        if size_of_state(state) is not None:
            raise ValueError(f"{path} is a DiT weight file, not a VAE: " + not_a_vae)
        state = convert_wan_vae_to_diffusers(state) if not any(k.startswith("encoder.conv_in") for k in state) \
            else state
        vae = vae_class()  # the default config is the released model's
        check_keys(vae.state_dict(), state, path)
        vae.load_state_dict(state)
        vae = vae.to(dtype)
    else:
        raise FileNotFoundError(f"{vae_path}: no VAE here. " + not_a_vae[0].upper() + not_a_vae[1:])
    return vae.to(device).eval().requires_grad_(False)


def latent_stats(vae, device, dtype=torch.float32):
    """Per-channel (mean, std) shaped (1, C, 1, 1, 1) from the VAE config."""
    c = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=dtype, device=device).view(1, c, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=dtype, device=device).view(1, c, 1, 1, 1)
    return mean, std


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1] -> normalised fp32 latents [B,16,1,H/8,W/8] (deterministic mean, as NVIDIA)."""
    mean, std = latent_stats(vae, images.device)
    mu = vae.encode(images.unsqueeze(2).to(vae.dtype)).latent_dist.mean.float()
    return (mu - mean) / std


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B,16,1,h,w] -> images [B,3,H,W] in [-1,1] (fp32)."""
    mean, std = latent_stats(vae, latents.device)
    return vae.decode((latents.float() * std + mean).to(vae.dtype)).sample[:, :, 0].float().clamp(-1, 1)


def training_flops_per_sample(model_size: str, height: int, width: int) -> float:
    """Model FLOPs of one training sample (forward + backward, no recomputation) at an image size.

    Counted by torch's FLOP counter on the meta device (shapes only, milliseconds) for 1- and 2-block models of the
    real width, extrapolated to the real depth: every block is identical.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from .flow import flow_loss

    counts = []
    latent = (1, 16, 1, height // 8, width // 8)
    for layers in (1, 2):
        model = new_transformer(model_size, torch.bfloat16, "meta", num_layers=layers).train()
        with FlopCounterMode(display=False) as counter:
            flow_loss(model, torch.zeros(latent, device="meta"),
                      torch.zeros(1, 512, 1024, device="meta", dtype=torch.bfloat16), torch.ones(1, device="meta"),
                      torch.zeros(latent, device="meta"), torch.ones(1, device="meta"),
                      torch.zeros(1, 1, height, width, device="meta")).backward()
        counts.append(counter.get_total_flops())
    return float(counts[0] + (counts[1] - counts[0]) * (transformer_config(model_size)["num_layers"] - 1))
