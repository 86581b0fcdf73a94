"""The seed's checkpoint layout, atomic writes, keep-last, resume, and the model-file formats (DESIGN.md)."""

import os
import signal
from pathlib import Path

import torch

from .models import diffusers_to_nvidia, nvidia_to_diffusers_key

PARTS = ("model", "optim", "scheduler", "trainer")
LATEST = "latest_checkpoint.txt"


def checkpoint_dir(output_root, project, group, name) -> Path:
    """OUTPUT_ROOT/PROJECT/GROUP/NAME/checkpoints."""
    return Path(output_root) / project / group / name / "checkpoints"


def iter_name(iteration: int) -> str:
    """`iter_000001000.pt`."""
    return f"iter_{iteration:09d}.pt"


def atomic_save(obj, path) -> None:
    """torch.save to a temporary name in the same folder, fsync, then rename: never a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if os.environ.get("COSMOS_T2I_DIE_DURING_SAVE") == path.parent.name:  # fault injection for tests
                f.write(b"partial")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    """Write a small text file atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest_iteration(ckpt_dir) -> int | None:
    """The iteration named in latest_checkpoint.txt, or None for a fresh run."""
    path = Path(ckpt_dir) / LATEST
    if not path.exists():
        return None
    name = path.read_text().strip()
    try:
        return int(name.removeprefix("iter_").removesuffix(".pt"))
    except ValueError:
        raise ValueError(f"{path}: unreadable ({name!r}); expected e.g. iter_000001000.pt.") from None


def save_checkpoint(ckpt_dir, iteration: int, parts: dict, keep_last: int | None = None) -> None:
    """Write model/optim/scheduler/trainer files, then latest_checkpoint.txt, then prune old checkpoints.

    A crash at any point leaves the previous checkpoint complete and still named by latest_checkpoint.txt.
    Parts may be None on non-writing processes' behalf; only given parts are written.
    """
    ckpt_dir = Path(ckpt_dir)
    for part, obj in parts.items():
        atomic_save(obj, ckpt_dir / part / iter_name(iteration))
    atomic_write_text(ckpt_dir / LATEST, iter_name(iteration))
    if keep_last:
        done = sorted(int(p.stem.removeprefix("iter_")) for p in (ckpt_dir / "model").glob("iter_*.pt"))
        for old in done[:-keep_last]:
            for part in PARTS:
                (ckpt_dir / part / iter_name(old)).unlink(missing_ok=True)


def load_part(ckpt_dir, part: str, iteration: int):
    """One checkpoint file, read with weights_only=True."""
    return torch.load(Path(ckpt_dir) / part / iter_name(iteration), map_location="cpu", weights_only=True)


def resolve_model_file(path) -> Path:
    """A model file from itself, a run folder, or its checkpoints/ folder (then the latest iteration)."""
    path = Path(path)
    if path.is_file():
        return path
    for ckpt in (path, path / "checkpoints"):
        if (ckpt / LATEST).exists():
            return ckpt / "model" / iter_name(latest_iteration(ckpt))
    raise FileNotFoundError(f"{path}: neither a model file nor a training run folder (no {LATEST}).")


# ---------------------------------------------------------------- model-file formats
def _model_file(net: dict, ema: dict | None, net_dtype) -> dict:
    """`net.*` in net_dtype and `net_ema.*` in fp32, NVIDIA key names."""
    out = diffusers_to_nvidia({k: v.to(net_dtype) for k, v in net.items()}, "net.")
    if ema is not None:
        out.update(diffusers_to_nvidia({k: v.float() for k, v in ema.items()}, "net_ema."))
    return out


def full_model_state(model_state: dict, ema_state: dict | None) -> dict:
    """NVIDIA's post-training model file: `net.*` in bf16 and `net_ema.*` in fp32, NVIDIA key names."""
    return _model_file(model_state, ema_state, torch.bfloat16)


def lora_model_state(adapter_state: dict, ema_state: dict | None, metadata: dict) -> dict:
    """Adapter-only file: `net.<NVIDIA module>.lora_A.weight` / `lora_B.weight` (fp32), `net_ema.` twins, metadata."""
    return {**_model_file(adapter_state, ema_state, torch.float32), "lora_metadata": metadata}


def ema_from_model_file(state: dict) -> dict:
    """The `net_ema.*` entries of a model file in diffusers names (adapter names without `.default`)."""
    return {nvidia_to_diffusers_key(k[len("net_ema."):]): v for k, v in state.items() if k.startswith("net_ema.")}


def is_lora_file(state: dict) -> bool:
    """True for this project's adapter-only LoRA files (and ComfyUI-style adapter files)."""
    return "lora_metadata" in state or (
        any(".lora_A." in k for k in state) and not any(".base_layer." in k for k in state))


def lora_target_modules(nvidia_names) -> list[str]:
    """NVIDIA module names (q_proj, mlp.layer1, ...) -> diffusers suffixes PEFT matches (to_q, ff.net.0.proj, ...)."""
    return [nvidia_to_diffusers_key(n) for n in nvidia_names]
