"""T5 pre-compute benchmark: captions/s of precompute_t5.py's encoder path vs NVIDIA's way, T5-11B shape.

    python benchmarks/bench_t5.py [--batch_size 64] [--captions 1024] [--compile] [--profile]

Ours: cosmos_t2i.t5.encode_prompts (bf16, captions sorted by length, batches padded to their longest, outputs
trimmed). Baseline in the same run: NVIDIA's get_t5_embeddings way (fp32, one caption at a time, padded to 512).
Captions are 10-120 random words; the encoder has random weights at the T5-11B shape. --profile adds the share of
the wall time the GPU spent in kernels and torch.profiler's top kernels over four batches (printed, not saved).
"""

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_infer import t5_11b, word_tokenizer  # noqa: E402
from common import report  # noqa: E402

from cosmos_t2i.t5 import encode_prompts  # noqa: E402

WORDS = ("robot arm red blue cube warehouse light camera slowly moves across the table while a person walks "
         "behind it near shelves of boxes in bright morning sun with soft shadows").split()


def captions(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 120))) for _ in range(n)]


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def profile_encoding(fn):
    from torch.profiler import ProfilerActivity, profile
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    kernels = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e6
    print(f"profile: {wall:.3f} s wall (profiler on), {kernels:.3f} s of GPU kernels ({kernels / wall:.0%} busy)")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=80))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--captions", type=int, default=1024)
    parser.add_argument("--baseline_captions", type=int, default=48)
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder (dynamic shapes)")
    parser.add_argument("--profile", action="store_true", help="print where the GPU time goes")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # NVIDIA's script runs plain fp32
    tokenizer = word_tokenizer()
    encoder = t5_11b("cuda")
    texts = captions(args.captions)
    fast = torch.compile(encoder, dynamic=True) if args.compile else encoder
    encode_prompts(tokenizer, fast, texts[:args.batch_size * 4], batch_size=args.batch_size)  # warm-up
    ours_s = timed(lambda: encode_prompts(tokenizer, fast, texts, batch_size=args.batch_size))
    if args.profile:
        profile_encoding(lambda: encode_prompts(tokenizer, fast, texts[:args.batch_size * 4], batch_size=args.batch_size))

    encoder = encoder.float()

    def nvidia_way():
        for text in texts[:args.baseline_captions]:
            tokens = tokenizer([text], padding="max_length", max_length=512, return_tensors="pt")
            with torch.no_grad():
                hidden = encoder(input_ids=tokens.input_ids.cuda(), attention_mask=tokens.attention_mask.cuda())
            length = int(tokens.attention_mask.sum())
            hidden.last_hidden_state[0, :length].cpu().half().numpy()
    nvidia_way()  # warm-up
    base_s = timed(nvidia_way)
    ours_rate, base_rate = args.captions / ours_s, args.baseline_captions / base_s
    report(dict(bench="t5", encoder="t5-11b shape (random)", batch_size=args.batch_size, compile=args.compile, captions=args.captions,
                captions_per_s=ours_rate, baseline_captions_per_s=base_rate, speedup=ours_rate / base_rate))


if __name__ == "__main__":
    main()
