"""Export checkpoints to other tools' formats.

    python -m cosmos_t2i.export diffusers   --dit_path RUN_OR_FILE [--load_ema] --model_size 2B --output DIR
    python -m cosmos_t2i.export lora-diffusers --lora_path LORA.pt [--load_ema] --output DIR
    python -m cosmos_t2i.export lora-comfyui   --lora_path LORA.pt [--load_ema] --output FILE.safetensors
    python -m cosmos_t2i.export merged      --lora_path LORA.pt [--load_ema] [--base_dit_path BASE] --output FILE.pt

diffusers: a transformer folder (save_pretrained, safetensors) for CosmosTransformer3DModel.from_pretrained.
lora-diffusers: an adapter for `pipe.transformer.load_lora_adapter(DIR, weight_name="pytorch_lora_weights.safetensors")`.
lora-comfyui: ComfyUI's native Cosmos-Predict2 LoRA keys (diffusion_model.<NVIDIA module>.lora_A/B.weight, .alpha).
merged: the LoRA folded into its base, as an NVIDIA-format model file (net.* keys) NVIDIA's inference loads.

Folder exports (diffusers, lora-diffusers) get a model card, README.md: the base model, the run's training settings
(from its config.yaml), rank and alpha, the iteration, how to load it, and --sample_image when given.
"""

import argparse
import re
import shutil
from pathlib import Path

import torch

from .checkpoint import atomic_save, resolve_model_file
from .lora import read_lora, save_diffusers_adapter, to_comfyui
from .models import load_dit, quiet_library_logs, resolve_dit_path
from .weight_files import diffusers_to_nvidia
from .registry import MODEL_SIZES


CARD_SETTINGS = ("model_size", "train_architecture", "lora_rank", "lora_alpha", "lora_target_modules", "dataset_dir",
                 "dataset_name", "image_size", "aspect_buckets", "resolution", "resize_mode", "batch_size",
                 "grad_accum", "lr", "weight_decay", "scheduler", "max_iter", "ema", "ema_rate", "caption_dropout",
                 "weight_dtype", "seed")


def write_model_card(folder: Path, source, kind: str, load_ema: bool, sample_image=None, lora_meta=None) -> Path:
    """README.md for an exported folder: what it is, where it came from, how it was trained, how to load it."""
    import yaml

    source = Path(source)
    run = source.parents[2] if source.parent.name == "model" and source.parent.parent.name == "checkpoints" else None
    config = yaml.safe_load((run / "config.yaml").read_text()) if run and (run / "config.yaml").exists() else {}
    iteration = re.search(r"iter_(\d+)", source.name)
    base = (lora_meta or {}).get("base_path") or config.get("dit_path") or "unknown"
    lines = ["---", "library_name: diffusers", f"base_model: {base}", "tags:", "- cosmos-predict2", "- text-to-image"]
    lines += ["- lora"] if kind == "lora" else []
    lines += ["---", "", f"# Cosmos-Predict2 Text2Image {'LoRA adapter' if kind == 'lora' else 'transformer'}", "",
              f"- exported from `{source}`" + (f" (iteration {int(iteration.group(1))})" if iteration else ""),
              f"- weights: {'EMA' if load_ema else 'training (non-EMA)'}", f"- base model: `{base}`"]
    if lora_meta:
        lines.append(f"- LoRA rank {lora_meta.get('rank')}, alpha {lora_meta.get('alpha')}, modules "
                     f"{', '.join(lora_meta.get('target_modules') or [])}")
    if config:
        lines += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {config[k]} |" for k in CARD_SETTINGS if config.get(k) not in (None, [], "")]
    lines += ["", "## Use", "", "```python"]
    if kind == "lora":
        lines += ["from diffusers import CosmosTransformer3DModel",
                  f"transformer = CosmosTransformer3DModel.from_pretrained(...)  # the base: {base}",
                  f'transformer.load_lora_adapter("{folder.name}", weight_name="pytorch_lora_weights.safetensors")']
    else:
        lines += ["from diffusers import CosmosTransformer3DModel",
                  f'transformer = CosmosTransformer3DModel.from_pretrained("{folder.name}")']
    lines += ["```", "", "or with this repository: `python infer_text2image.py --dit_path "
              + (f"BASE --lora_path {folder.name}" if kind == "lora" else folder.name) + " --vae_path ... --prompt ...`"]
    if sample_image:
        shutil.copy(sample_image, folder / ("sample" + Path(sample_image).suffix))
        lines += ["", "## Sample", "", f"![sample](sample{Path(sample_image).suffix})"]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    return folder / "README.md"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m cosmos_t2i.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["diffusers", "lora-diffusers", "lora-comfyui", "merged"])
    parser.add_argument("--dit_path", help="model file or run folder (diffusers export)")
    parser.add_argument("--lora_path", help="LoRA checkpoint (model/iter_*.pt of a LoRA run, or its run folder)")
    parser.add_argument("--base_dit_path", help="base weights when the LoRA's recorded base moved")
    parser.add_argument("--model_size", choices=list(MODEL_SIZES))
    parser.add_argument("--load_ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="merged export: bf16 as NVIDIA's files, or fp32 to keep the merge exact over an fp32 base")
    parser.add_argument("--sample_image", help="an image made with the export, shown in the model card (folders)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    quiet_library_logs()
    out = Path(args.output)
    if args.format == "diffusers":
        if not args.dit_path:
            parser.error("diffusers export needs --dit_path")
        model = load_dit(args.dit_path, args.model_size, args.load_ema, base_dit_path=args.base_dit_path,
                         dtype=torch.bfloat16)
        model.save_pretrained(out, safe_serialization=True)
        write_model_card(out, resolve_dit_path(args.dit_path), "full", args.load_ema, args.sample_image)
    else:
        if not args.lora_path:
            parser.error(f"{args.format} export needs --lora_path")
        lora_file = resolve_model_file(args.lora_path)
        if args.format == "merged":
            model = load_dit(str(lora_file), args.model_size, args.load_ema, base_dit_path=args.base_dit_path,
                             dtype=torch.float32)
            dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
            atomic_save(diffusers_to_nvidia({k: v.to(dtype) for k, v in model.state_dict().items()}, "net."), out)
        else:
            adapter, meta = read_lora(lora_file, load_ema=args.load_ema)
            if args.format == "lora-diffusers":
                save_diffusers_adapter(adapter, out)
                write_model_card(out, lora_file, "lora", args.load_ema, args.sample_image, meta)
            else:
                from safetensors.torch import save_file
                out.parent.mkdir(parents=True, exist_ok=True)
                save_file(to_comfyui(adapter), str(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
