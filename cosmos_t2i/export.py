"""Export checkpoints to other tools' formats.

    python -m cosmos_t2i.export diffusers   --dit_path RUN_OR_FILE [--load_ema] --model_size 2B --output DIR
    python -m cosmos_t2i.export lora-diffusers --lora_path LORA.pt [--load_ema] --output DIR
    python -m cosmos_t2i.export lora-comfyui   --lora_path LORA.pt [--load_ema] --output FILE.safetensors
    python -m cosmos_t2i.export merged      --lora_path LORA.pt [--load_ema] [--base_dit_path BASE] --output FILE.pt

diffusers: a transformer folder (save_pretrained, safetensors) for CosmosTransformer3DModel.from_pretrained.
lora-diffusers: an adapter for `pipe.transformer.load_lora_adapter(DIR, weight_name="pytorch_lora_weights.safetensors")`.
lora-comfyui: ComfyUI's native Cosmos-Predict2 LoRA keys (diffusion_model.<NVIDIA module>.lora_A/B.weight, .alpha).
merged: the LoRA folded into its base, as an NVIDIA-format model file (net.* keys) NVIDIA's inference loads.
"""

import argparse
from pathlib import Path

import torch

from .checkpoint import atomic_save, resolve_model_file
from .lora import read_lora, save_diffusers_adapter, to_comfyui
from .models import diffusers_to_nvidia, quiet_library_logs
from .models import load_dit
from .registry import MODEL_SIZES


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
            adapter, _ = read_lora(lora_file, load_ema=args.load_ema)
            if args.format == "lora-diffusers":
                save_diffusers_adapter(adapter, out)
            else:
                from safetensors.torch import save_file
                out.parent.mkdir(parents=True, exist_ok=True)
                save_file(to_comfyui(adapter), str(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
