"""Where an inference step's GPU time goes: the sampler's batched cond+uncond forward, profiled.

    python benchmarks/profile_infer.py [--model_size 2B] [--compile] [--fp8] [--attention diffusers] [--out DIR]

Builds the transformer as CosmosText2Image.from_pretrained does (random weights at the real shape, bf16, the lean
attention processor unless --attention diffusers), times the denoiser at 1360x768, then profiles three calls of it
back to back: prints GPU milliseconds per call by kernel kind, where the GPU waited for the host
(benchmarks/trace_gaps.py) and the op table; the trace is kept in --out. Prints, does not append to results.jsonl.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from trace_gaps import gaps  # noqa: E402

from cosmos_t2i import flow  # noqa: E402
from cosmos_t2i.models import new_transformer  # noqa: E402
from cosmos_t2i.monitor import finish_profile, start_profile  # noqa: E402
from cosmos_t2i.pipeline import prepare_for_inference  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="2B")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--cuda_graphs", action="store_true", help="replay each call from a CUDA graph")
    parser.add_argument("--attention", choices=["lean", "diffusers"], default="lean")
    parser.add_argument("--out", default="/tmp/cosmos_profile_infer", help="folder for the trace and the op table")
    args = parser.parse_args()
    transformer = new_transformer(args.model_size, torch.bfloat16, "cuda").eval().requires_grad_(False)
    prepare_for_inference(transformer, args.fp8, args.compile, lean_attention=args.attention == "lean",
                          cuda_graphs=args.cuda_graphs)
    cond = torch.randn(1, 512, 1024, device="cuda")
    denoise = flow.make_denoiser(transformer, cond, torch.zeros_like(cond), 4.0,
                                 torch.zeros(1, 1, 768, 1360, device="cuda"))
    x = torch.randn(1, 16, 1, 96, 170, device="cuda")
    for _ in range(3):
        denoise(x, 10.0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        denoise(x, 10.0)
    torch.cuda.synchronize()
    print(f"{args.model_size} forward (cond+uncond batched, 1360x768): {(time.perf_counter() - start) / 5 * 1e3:.1f} ms"
          f"; {torch.cuda.get_device_name()}, torch {torch.__version__}")
    profile = start_profile()
    for _ in range(3):
        denoise(x, 10.0)
    out = Path(args.out)
    summary = finish_profile(profile, 3, out, 0)
    print("GPU ms per call by kernel kind:", json.dumps({k: round(v, 2) for k, v in summary["kernels_ms"].items()}))
    print("where the GPU waited (3 calls):", json.dumps(gaps(out / "trace_rank0.json"), indent=1))
    print((out / "ops_rank0.txt").read_text())

if __name__ == "__main__":
    main()
