"""Export checkpoints to other tools' formats.

    python -m cosmos_t2i.export diffusers   --dit_path RUN_OR_FILE [--load_ema] --model_size 2B --output DIR
    python -m cosmos_t2i.export lora-diffusers --lora_path LORA [--load_ema] --output DIR
    python -m cosmos_t2i.export lora-comfyui   --lora_path LORA [--load_ema] --output FILE.safetensors
    python -m cosmos_t2i.export lora-kohya     --lora_path LORA [--load_ema] --output FILE.safetensors
    python -m cosmos_t2i.export merged      --lora_path LORA [--load_ema] [--base_dit_path BASE] --output FILE.pt

LORA: our LoRA run, its model file, or any LoRA file or folder these exports write (so they convert between tools).
Anima LoRAs (recorded in the file, or --family anima) export their text adapter's modules too (lora_formats.py).

diffusers: a transformer folder (save_pretrained, safetensors) for CosmosTransformer3DModel.from_pretrained.
lora-diffusers: an adapter for `pipe.transformer.load_lora_adapter(DIR, weight_name="pytorch_lora_weights.safetensors")`
  (Predict2), or for AnimaModularPipeline.load_lora_weights(DIR) (Anima; a text adapter trained in full beside it
  as DIR/text_conditioner/).
lora-comfyui: ComfyUI's LoRA keys (diffusion_model.<NVIDIA module>.lora_A/B.weight; Predict2 with .alpha, Anima with
  alpha / rank folded into B as diffusion-pipe writes them; a text adapter trained in full as .set_weight entries).
lora-kohya: sd-scripts' keys (lora_unet_<NVIDIA module, dots as underscores>.lora_down/lora_up.weight, .alpha).
merged: the LoRA folded into its base, as an NVIDIA-format model file (net.* keys) NVIDIA's inference loads.

Folder exports (diffusers, lora-diffusers) get a model card, README.md: the base model, the run's training settings
(from its config.yaml), rank and alpha, the iteration, how to load it, and --sample_image when given.
"""

import argparse
import os
import re
import shutil
from pathlib import Path

import torch

from .checkpoint import atomic_save, resolve_model_file
from .families import FAMILIES, get_family
from .cli import one_line_errors, run_main
from .files import TEMPORARY, atomic_write, temporary_name
from .lora import merged_weight, read_full_weights, read_lora
from .lora_formats import kohya_metadata, lora_weights_file, save_diffusers_adapter, to_comfyui, to_kohya
from .models import load_dit, lora_file_state, quiet_library_logs, resolve_dit_path
from .registry import MODEL_SIZES
from .weight_files import diffusers_to_nvidia, is_lora_file, read_weights



CARD_SETTINGS = ("model_size", "train_architecture", "lora_rank", "lora_alpha", "lora_target_modules", "dataset_dir",
                 "dataset_name", "image_size", "aspect_buckets", "resolution", "resize_mode", "batch_size",
                 "grad_accum", "lr", "weight_decay", "scheduler", "max_iter", "ema", "ema_rate", "caption_dropout",
                 "weight_dtype", "seed")


def write_model_card(folder: Path, source, kind: str, load_ema: bool, sample_image=None, lora_meta=None,
                     family: str = "predict2") -> Path:
    """README.md for an exported folder: what it is, where it came from, how it was trained, how to load it."""
    import yaml

    source = Path(source)
    run = source.parents[2] if source.parent.name == "model" and source.parent.parent.name == "checkpoints" else None
    config = yaml.safe_load((run / "config.yaml").read_text()) if run and (run / "config.yaml").exists() else {}
    iteration = re.search(r"iter_(\d+)", source.name)
    base = (lora_meta or {}).get("base_path") or config.get("dit_path") or "unknown"
    lines = ["---", "library_name: diffusers", f"base_model: {base}", "tags:", "- cosmos-predict2", "- text-to-image"]
    lines += ["- lora"] if kind == "lora" else []
    anima = family == "anima" or (folder / "text_conditioner").is_dir()
    if anima:
        lines[lines.index("- cosmos-predict2")] = "- anima"
    title = (f"Anima LoRA adapter{' and text adapter' if (folder / 'text_conditioner').is_dir() else ''}"
             if anima and kind == "lora" else "Anima transformer and text adapter" if anima else
             f"Cosmos-Predict2 Text2Image {'LoRA adapter' if kind == 'lora' else 'transformer'}")
    lines += ["---", "", f"# {title}", "",
              f"- exported from `{source}`" + (f" (iteration {int(iteration.group(1))})" if iteration else ""),
              f"- weights: {'EMA' if load_ema else 'training (non-EMA)'}", f"- base model: `{base}`"]
    if lora_meta:
        lines.append(f"- LoRA rank {lora_meta.get('rank')}, alpha {lora_meta.get('alpha')}, modules "
                     f"{', '.join(lora_meta.get('target_modules') or [])}")
    if config:
        lines += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {config[k]} |" for k in CARD_SETTINGS if config.get(k) not in (None, [], "")]
    lines += ["", "## Use", "", "```python"]
    if kind == "lora" and anima:
        lines += [f"pipe = ...  # diffusers' AnimaModularPipeline of the base: {base}",
                  f'pipe.load_lora_weights("{folder.name}")']
        if (folder / "text_conditioner").is_dir():  # the text adapter, trained in full beside the LoRA
            lines += ["from diffusers import AnimaTextConditioner", "pipe.update_components(text_conditioner="
                      f'AnimaTextConditioner.from_pretrained("{folder.name}/text_conditioner"))']
    elif kind == "lora":
        lines += ["from diffusers import CosmosTransformer3DModel",
                  f"transformer = CosmosTransformer3DModel.from_pretrained(...)  # the base: {base}",
                  f'transformer.load_lora_adapter("{folder.name}", weight_name="pytorch_lora_weights.safetensors")']
    elif anima:  # a DiT with a text adapter: Anima's pipeline folders
        lines += ["from diffusers import AnimaTextConditioner, CosmosTransformer3DModel",
                  f'transformer = CosmosTransformer3DModel.from_pretrained("{folder.name}/transformer")',
                  f'text_conditioner = AnimaTextConditioner.from_pretrained("{folder.name}/text_conditioner")']
    else:
        lines += ["from diffusers import CosmosTransformer3DModel",
                  f'transformer = CosmosTransformer3DModel.from_pretrained("{folder.name}")']
    flag = " --family anima" if anima else ""
    model = f"BASE --lora_path {folder.name}" if kind == "lora" else folder.name
    lines += ["```", "", f"or with this repository: `python infer_text2image.py{flag} --dit_path {model} "
              "--vae_path ... --prompt ...`"]
    if sample_image:
        shutil.copy(sample_image, folder / ("sample" + Path(sample_image).suffix))
        lines += ["", "## Sample", "", f"![sample](sample{Path(sample_image).suffix})"]
    with atomic_write(folder / "README.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return folder / "README.md"


def remove_leftovers(folder, name: str | None = None) -> list[Path]:
    """Delete the temporary files (and staging folders) that killed exports left in `folder`: every entry named as
    files.temporary_name names them, or only those of the output `name`; one whose writer still runs on this host is
    kept. Returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        match = TEMPORARY.match(path.name)
        if not match or (name is not None and match.group(1) != name) or process_alive(int(match.group(2))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def process_alive(pid: int) -> bool:
    """Whether a process of this id runs on this host (a temporary file's writer may still be writing it)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_destination(out: Path, folder_export: bool) -> None:
    """Before writing: remove the leftovers of interrupted exports to the same place, and say so."""
    removed = remove_leftovers(out) if folder_export else remove_leftovers(out.parent, out.name)
    if removed:
        print(f"removed {len(removed)} leftover temporary file(s) of an interrupted export: "
              + ", ".join(str(p) for p in removed))


def save_model_folders(model, out: Path) -> None:
    """The model's diffusers folder(s): Predict2's transformer at `out`; a DiT with a text adapter (Anima) as a
    pipeline's transformer/ and text_conditioner/ (what anima.load_anima and diffusers' Anima classes read)."""
    adapter = model._modules.pop("text_conditioner", None)
    if adapter is None:
        save_transformer_folder(model, out)
        return
    try:
        save_transformer_folder(model, out / "transformer")
        save_transformer_folder(adapter, out / "text_conditioner")
    finally:
        model.text_conditioner = adapter


def save_transformer_folder(model, out: Path) -> None:
    """save_pretrained into a staging folder inside `out`, then each file renamed into place: a killed export leaves
    no half-written weight file under its real name, only a staging folder the next export removes."""
    out.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(out / "export")
    model.save_pretrained(staging, safe_serialization=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, out / path.name)
    staging.rmdir()


def lora_family(state: dict, adapter: dict, full: dict, given: str | None, source) -> str:
    """The family of a LoRA: recorded in our files, else --family, else Anima when it touches the text adapter."""
    recorded = (state.get("lora_metadata") or {}).get("family")
    if recorded and given and recorded != given:
        raise SystemExit(f"{source} is a LoRA of the {recorded} family, not {given}: pass --family {recorded}.")
    touches_adapter = any(k.startswith("text_conditioner.") for k in [*adapter, *full])
    return recorded or given or ("anima" if touches_adapter else "predict2")


def fold_pairs_into_full(adapter: dict, full: dict) -> tuple[dict, dict]:
    """A LoRA pair on a module that also trained in full becomes part of that full weight (each tool applies one
    patch per tensor)."""
    full, folded = dict(full), [m for m in adapter if m + ".weight" in full]
    for module in folded:
        full[module + ".weight"] = merged_weight(full[module + ".weight"], adapter[module])
    return {m: e for m, e in adapter.items() if m not in folded}, full


def save_safetensors(tensors: dict, out: Path, metadata=None) -> None:
    """A safetensors file, written to a temporary name and renamed."""
    from safetensors.torch import save

    with atomic_write(out) as f:
        f.write(save(tensors, metadata=metadata))


def save_text_conditioner(full: dict, out: Path, source) -> None:
    """The text adapter trained in full as diffusers' AnimaTextConditioner folder (its config read off the weights)."""
    from diffusers import AnimaTextConditioner

    from .anima import _build, conditioner_config

    if any(not k.startswith("text_conditioner.") for k in full):
        raise ValueError(f"{source} carries full weights outside the text adapter ({sorted(full)[0]}), which a "
                         "diffusers LoRA folder has no place for.")
    state = {k.removeprefix("text_conditioner."): v for k, v in full.items()}
    dtype = next(iter(state.values())).dtype
    save_transformer_folder(_build(AnimaTextConditioner, conditioner_config(state), state, source, dtype), out)


def export_lora(fmt: str, lora_file: Path, out: Path, family: str, adapter: dict, full: dict) -> None:
    """One LoRA export; `full`: the tensors the file carries whole (a text adapter trained with --adapter_lr), which
    travel in the form each tool loads, or are left out with one printed line where the tool has none."""
    anima = family == "anima"
    if full:
        adapter, full = fold_pairs_into_full(adapter, full)
    if fmt == "lora-diffusers":
        save_diffusers_adapter(adapter, out, exact_targets=anima)
        if full:
            save_text_conditioner(full, out / "text_conditioner", lora_file)
    elif fmt == "lora-comfyui":
        save_safetensors(to_comfyui(adapter, alpha_entries=not anima, full=full), out)
        if full:
            print(f"the text adapter trained in full rides in {out} as {len(full)} diffusion_model.llm_adapter.*"
                  ".set_weight entries: ComfyUI applies them, diffusers and diffusion-pipe refuse them (for diffusers "
                  "export lora-diffusers).")
    else:
        save_safetensors(to_kohya(adapter), out, kohya_metadata(adapter, anima))
        if full:
            print(f"kohya's LoRA format has no entry for whole tensors: the text adapter trained in full ({len(full)} "
                  f"tensors) is not in {out}; lora-comfyui and lora-diffusers carry it.")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cosmos_t2i.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["diffusers", "lora-diffusers", "lora-comfyui", "lora-kohya", "merged"])
    parser.add_argument("--dit_path", help="model file or run folder (diffusers export)")
    parser.add_argument("--lora_path", help="LoRA checkpoint (model/iter_*.pt of a LoRA run, or its run folder), or "
                                            "another tool's LoRA file or folder (diffusers, ComfyUI, kohya)")
    parser.add_argument("--base_dit_path", help="base weights when the LoRA's recorded base moved")
    parser.add_argument("--model_size", choices=list(MODEL_SIZES))
    parser.add_argument("--family", choices=list(FAMILIES),
                        help="the model family (default: a LoRA's recorded one, else predict2; anima: a diffusers "
                             "export writes transformer/ and text_conditioner/, a merged one the original single-file "
                             "layout with net.llm_adapter.*, LoRA exports the adapter's modules too)")
    parser.add_argument("--load_ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="merged export: bf16 as NVIDIA's files, or fp32 to keep the merge exact over an fp32 base")
    parser.add_argument("--sample_image", help="an image made with the export, shown in the model card (folders)")
    parser.add_argument("--output", required=True)
    args = one_line_errors(parser).parse_args(argv)
    quiet_library_logs()
    out = Path(args.output)
    if args.format == "diffusers" and not args.dit_path:
        parser.error("diffusers export needs --dit_path")
    if args.format != "diffusers" and not args.lora_path:
        parser.error(f"{args.format} export needs --lora_path")
    clean_destination(out, folder_export=args.format in ("diffusers", "lora-diffusers"))
    if args.format == "diffusers":
        model = load_dit(args.dit_path, args.model_size, args.load_ema, base_dit_path=args.base_dit_path,
                         dtype=torch.bfloat16, family=get_family(args.family or "predict2"))
        save_model_folders(model, out)
        write_model_card(out, resolve_dit_path(args.dit_path), "full", args.load_ema, args.sample_image)
    else:
        lora_file = Path(args.lora_path) if lora_file_state(args.lora_path) is not None else resolve_model_file(
            args.lora_path)  # a LoRA file or folder of any tool, else a run (its latest model file)
        state = read_weights(lora_weights_file(lora_file))
        adapter, meta = read_lora(lora_file, load_ema=args.load_ema, state=state)
        full = read_full_weights(lora_file, args.load_ema) if is_lora_file(state) else {}  # not a model's weights
        family = lora_family(state, adapter, full, args.family, lora_file)
        if args.format == "merged":
            model = load_dit(str(lora_file), args.model_size, args.load_ema, base_dit_path=args.base_dit_path,
                             dtype=torch.float32, family=get_family(family))
            dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
            atomic_save(diffusers_to_nvidia({k: v.to(dtype) for k, v in model.state_dict().items()}, "net."), out)
        else:
            export_lora(args.format, lora_file, out, family, adapter, full)
            if args.format == "lora-diffusers":
                write_model_card(out, lora_file, "lora", args.load_ema, args.sample_image, meta, family)
    print(f"wrote {out}")


if __name__ == "__main__":
    run_main(main, "python -m cosmos_t2i.export")
