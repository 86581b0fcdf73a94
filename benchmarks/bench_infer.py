"""Inference benchmark: seconds per 1360x768 image, 35 steps, guidance on, at the real shapes (random weights).

    python benchmarks/bench_infer.py --model_size 2B [--compile]

Ours: CosmosText2Image (NVIDIA's AB2 sampler, cond+uncond batched in one forward, bf16, the lean attention
processor and CUDA-graph replay that from_pretrained installs; also timed without graphs) with T5 encoding and
VAE decode included and reported separately; its sampling is timed again with a non-zero negative embedding, which
makes cross-attention run for the unconditional rows (the default zero negative skips it). Baseline in the same
run: diffusers' Cosmos2TextToImagePipeline (eager, two forwards per step) on the same transformer and VAE, fed
the same prompt embeddings (its T5 time is the same and is added). T5: the T5-11B encoder shape (24 layers, d_model 1024, d_ff 65536, 128 heads).
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cuda_time, peak_gb, report, reset_peak  # noqa: E402

from cosmos_t2i.models import new_transformer  # noqa: E402
from cosmos_t2i.pipeline import CosmosText2Image, prepare_for_inference  # noqa: E402

PROMPT = ("A robotic arm in a bright warehouse picks up a red cube from a conveyor belt and places it on a "
          "stack of blue boxes, while a forklift passes in the background under cool fluorescent light.")


def t5_11b(device):
    from transformers import T5Config, T5EncoderModel
    config = T5Config(vocab_size=32128, d_model=1024, d_kv=128, d_ff=65536, num_layers=24, num_heads=128,
                      feed_forward_proj="relu")
    with torch.device(device):
        return T5EncoderModel(config).to(torch.bfloat16).eval()


def word_tokenizer():
    """A stand-in tokenizer (no network): one id per word, T5's ids for pad and </s>."""
    class Tokenizer:
        def __call__(self, texts, padding=None, truncation=True, max_length=512, return_tensors=None, **_):
            ids = [[3 + hash(w) % 32000 for w in t.split()][:max_length - 1] + [1] for t in texts]
            if return_tensors is None:
                return {"input_ids": ids}
            length = max_length if padding == "max_length" else max(len(i) for i in ids)
            input_ids = torch.tensor([i + [0] * (length - len(i)) for i in ids])
            from types import SimpleNamespace
            return SimpleNamespace(input_ids=input_ids, attention_mask=(input_ids != 0).long())
    return Tokenizer()


class StandInSafetyChecker(torch.nn.Module):
    device = torch.device("cuda")

    def check_text_safety(self, prompt):
        return True

    def check_video_safety(self, video):
        return video


def psnr(a, b) -> float:
    """PSNR in dB between two PIL images of the same size (8-bit)."""
    import numpy as np
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(10 * np.log10(255 ** 2 / max((diff ** 2).mean(), 1e-12)))


def without_cuda_graphs(pipe, embedding, latents, sample_s, repeat) -> dict:
    """Sampling time without CUDA-graph replay (--no-cuda_graphs), and whether graphs changed the latents."""
    replay, pipe.transformer.graph_replay = pipe.transformer.graph_replay, None
    plain = pipe.sample_latents(embedding, seeds=[0])
    plain_s = cuda_time(lambda: pipe.sample_latents(embedding, seeds=[0]), 1, repeat)
    pipe.transformer.graph_replay = replay
    return dict(no_cuda_graphs_sampling_s=plain_s, cuda_graphs_speedup=plain_s / sample_s,
                cuda_graphs_same_latents=bool(torch.equal(plain, latents)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_size", default="2B")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip_baseline", action="store_true")
    parser.add_argument("--fp8", action="store_true",
                        help="then quantize the same transformer as infer_text2image.py --fp8 does and time it again; "
                             "PSNR of its image against the bf16 one (same seed)")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan, Cosmos2TextToImagePipeline, FlowMatchEulerDiscreteScheduler

    transformer = new_transformer(args.model_size, torch.bfloat16, "cuda").eval().requires_grad_(False)
    prepare_for_inference(transformer)  # as CosmosText2Image.from_pretrained does (compiled below, after the T5)
    vae = AutoencoderKLWan().to("cuda", torch.bfloat16).eval().requires_grad_(False)
    pipe = CosmosText2Image(transformer, vae, word_tokenizer(), t5_11b("cuda"), "cuda")
    out = dict(bench="infer", model_size=args.model_size, size="1360x768", steps=35, guidance=4.0,
               compile=args.compile)

    reset_peak()
    t5_s = cuda_time(lambda: pipe.encode([PROMPT]), 1, args.repeat)
    embedding = pipe.encode([PROMPT])
    out["t5_peak_gb"] = peak_gb()
    pipe.offload_text_encoder()
    gc.collect()
    torch.cuda.empty_cache()
    prepare_for_inference(transformer, compile=args.compile, cuda_graphs=True)  # from_pretrained's default
    if args.compile:
        start = time.perf_counter()
        pipe.sample_latents(embedding, seeds=[0], num_steps=2)
        torch.cuda.synchronize()
        out["compile_s"] = time.perf_counter() - start
    reset_peak()
    latents = pipe.sample_latents(embedding, seeds=[0])
    sample_s = cuda_time(lambda: pipe.sample_latents(embedding, seeds=[0]), 1, args.repeat)
    decode_s = cuda_time(lambda: pipe.decode(latents), 1, args.repeat)
    out.update(t5_s=t5_s, sampling_s=sample_s, vae_decode_s=decode_s, sec_per_image=t5_s + sample_s + decode_s,
               peak_gb_without_t5=peak_gb())
    # the same sampling with a negative embedding that is not zero (1e-3 everywhere): cross-attention then runs for
    # the unconditional rows too; the ratio is what skipping it saves with the default zero negative
    nonzero = torch.full_like(embedding, 1e-3)
    full_s = cuda_time(lambda: pipe.sample_latents(embedding, nonzero, seeds=[0]), 1, args.repeat)
    out.update(sampling_s_nonzero_negative=full_s, zero_negative_skip_speedup=full_s / sample_s)
    out.update(without_cuda_graphs(pipe, embedding, latents, sample_s, args.repeat))
    if args.fp8:
        bf16_image = pipe.decode(latents)[0]
        torch._dynamo.reset()  # the blocks' weights become float8 tensors: compile them afresh
        prepare_for_inference(transformer, fp8=True, compile=args.compile, cuda_graphs=True)
        reset_peak()
        fp8_latents = pipe.sample_latents(embedding, seeds=[0])
        fp8_sample_s = cuda_time(lambda: pipe.sample_latents(embedding, seeds=[0]), 1, args.repeat)
        out.update(fp8_sampling_s=fp8_sample_s, fp8_sec_per_image=t5_s + fp8_sample_s + decode_s,
                   fp8_peak_gb_without_t5=peak_gb(), fp8_speedup_vs_bf16=sample_s / fp8_sample_s,
                   fp8_psnr_db=psnr(bf16_image, pipe.decode(fp8_latents)[0]),
                   fp8_latent_rel_err=((fp8_latents - latents).norm() / latents.norm()).item())
        # after the peak is read: a run without graphs beside the graph's reserved pool would add to it
        out.update({f"fp8_{k}": v for k, v in without_cuda_graphs(pipe, embedding, fp8_latents, fp8_sample_s,
                                                                    args.repeat).items()})

    if not args.skip_baseline:
        pipe = transformer = None
        gc.collect()
        torch.cuda.empty_cache()
        transformer = new_transformer(args.model_size, torch.bfloat16, "cuda").eval().requires_grad_(False)
        reference = Cosmos2TextToImagePipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                               scheduler=FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True),
                                               safety_checker=StandInSafetyChecker())
        reference.set_progress_bar_config(disable=True)
        cond = embedding.to("cuda", torch.bfloat16)
        reset_peak()
        baseline_s = cuda_time(lambda: reference(prompt_embeds=cond, negative_prompt_embeds=torch.zeros_like(cond),
                                                 height=768, width=1360, num_inference_steps=35, guidance_scale=4.0,
                                                 output_type="pil"), 1, args.repeat)
        out.update(baseline_pipeline_s=baseline_s, baseline_sec_per_image=baseline_s + t5_s,
                   baseline_peak_gb_without_t5=peak_gb())
        out["speedup"] = out["baseline_sec_per_image"] / out["sec_per_image"]
    report(out)


if __name__ == "__main__":
    main()
