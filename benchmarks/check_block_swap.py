"""Block swap on a GPU at the real shapes: exactness, step time and peak memory, through the trainer's own
prepare_for_training (LoRA on a random bf16 base, r32 on the attention projections, batch 1).

    python benchmarks/check_block_swap.py --family anima --model_size 2B --height 1024 --width 1024

For each setting (no swap with every block checkpointed; --blocks_to_swap N; all) three training steps on fixed
inputs: the loss and every LoRA gradient against the first setting's (CUDA's attention backward may differ in the last
bit from run to run: the first setting runs twice to show that floor), the median step time and the peak allocated
memory of the step; then a no-grad forward (a sampling step) against the unswapped model's, bit for bit. One JSON
line per setting (results.jsonl with --save).
"""

import argparse
import copy
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cuda_time, report  # noqa: E402

from cosmos_t2i.families import get_family  # noqa: E402
from cosmos_t2i.training import prepare_for_training  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU: a check of the script itself, no figures
TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj",
           "cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.output_proj"]


def inputs(height, width, device):
    g = torch.Generator(device).manual_seed(0)
    return dict(hidden_states=torch.randn(1, 16, 1, height // 8, width // 8, generator=g, device=device,
                                          dtype=torch.bfloat16),
                timestep=torch.rand(1, generator=g, device=device), return_dict=False,
                encoder_hidden_states=torch.randn(1, 512, 1024, generator=g, device=device, dtype=torch.bfloat16),
                padding_mask=torch.zeros(1, 1, height, width, device=device, dtype=torch.bfloat16))


BASE = {}


def build(args, swap, checkpoint_all, base_dtype):
    if not BASE:  # one random base for every setting (a 2B takes a while to initialise on the CPU)
        torch.manual_seed(0)
        BASE["model"] = get_family(args.family).new_model(args.model_size, torch.bfloat16, "cpu")
    model = copy.deepcopy(BASE["model"])
    lora = {"rank": 32, "alpha": 32, "targets": TARGETS, "base_dtype": base_dtype}
    model = prepare_for_training(model, lora, seed=0, gradient_checkpointing=checkpoint_all, compile=args.compile,
                                 device=DEVICE, blocks_to_swap=swap)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # make the adapters matter: B starts at zero
            torch.manual_seed(hash(name) % 2 ** 31)
            p.data.normal_(0, 0.01)
    return model.to(DEVICE)


def measure(args, name, swap, checkpoint_all, base_dtype, reference):
    model = build(args, swap, checkpoint_all, base_dtype)
    x = inputs(args.height, args.width, DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast(DEVICE, torch.bfloat16):
            loss = model(**x)[0].float().pow(2).mean()
        loss.backward()
        return loss

    losses, grads = [], None
    for _ in range(3):
        losses.append(step().item())
        grads = [p.grad.float().clone() for p in params]
        model.zero_grad(set_to_none=True)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    def timed():
        step()
        model.zero_grad(set_to_none=True)
    seconds = cuda_time(timed, warmup=1, repeat=args.repeat) if DEVICE == "cuda" else 0.0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if DEVICE == "cuda" else 0.0
    with torch.no_grad():
        sample = model(**x)[0].float()
    result = {"bench": "block_swap", "family": args.family, "model_size": args.model_size, "setting": name,
              "blocks_to_swap": swap, "checkpoint": "all" if checkpoint_all else "swapped",
              "base_dtype": base_dtype, "compile": args.compile, "size": f"{args.height}x{args.width}",
              "sec_per_step": seconds, "peak_allocated_gb": peak, "losses": losses}
    swap = model.__dict__.get("block_swap")
    if swap is not None:  # the swapped weights' host buffers, page-locked so that copies run asynchronously
        result["host_gb"] = swap.host_bytes() / 2 ** 30
        result["host_pinned"] = all(b.is_pinned() for b in swap.buffers) if DEVICE == "cuda" else None
    if reference is not None:
        result["loss_equal"] = losses == reference["losses"]
        result["grad_max_rel_diff"] = max(((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
                                          for g, r in zip(grads, reference["grads"]))
        result["sample_bit_identical"] = torch.equal(sample, reference["sample"])
        result["sample_max_abs_diff"] = (sample - reference["sample"]).abs().max().item()
        result["vs_first_step_time"] = seconds / reference["seconds"] if reference["seconds"] else None
    del model
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return result, {"losses": losses, "grads": grads, "sample": sample, "seconds": seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="anima")
    parser.add_argument("--model_size", default="2B")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--settings", nargs="+", default=["whole", "whole_again", "swap_half", "swap_all",
                                                          "swap_all_fp8"])
    parser.add_argument("--save", action="store_true", help="append the lines to benchmarks/results.jsonl")
    args = parser.parse_args()
    blocks = len(get_family(args.family).new_model("tiny").transformer_blocks) if args.model_size == "tiny" else \
        {"2B": 28, "14B": 36, "0.6B": 20}[args.model_size]
    table = {"whole": (0, True, "bf16"), "whole_again": (0, True, "bf16"),
             "swap_half": (blocks // 2, False, "bf16"), "swap_all": ("all", True, "bf16"),
             "swap_all_fp8": ("all", True, "fp8"), "whole_fp8": (0, True, "fp8")}
    references = {}  # the first setting of each base dtype is the one the others of that dtype are held to
    for name in args.settings:
        swap, checkpoint_all, base_dtype = table[name]
        result, kept = measure(args, name, swap, checkpoint_all, base_dtype, references.get(base_dtype))
        report(result, save=args.save and torch.cuda.is_available())
        references.setdefault(base_dtype, kept)


if __name__ == "__main__":
    main()
