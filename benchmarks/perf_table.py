"""Measured-results tables, printed from benchmarks/results.jsonl.

    python benchmarks/perf_table.py [--since 2026-11-26] [--until 2026-11-26] [--from_line 62]   # one table
    python benchmarks/perf_table.py --lines 80 82          # only these lines, each row naming its line
    python benchmarks/perf_table.py --headline             # README's Performance table
    python benchmarks/perf_table.py --doc docs/performance.md   # write the whole docs/performance.md

Every GPU benchmark in benchmarks/ appends one JSON line to results.jsonl with the device, torch version, date and
the command that reproduces it; a table has one markdown row per line, oldest first. --doc fills the template
benchmarks/performance.md.in: each `<!-- rows A-B ... -->` line in it becomes the table of those results.jsonl
lines, and every line of results.jsonl must be in exactly one such table (a new line needs a place in the template).
The output depends only on the two files, so running it twice gives the same page.
"""

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "performance.md.in"

# (key, format) in the order they appear in a row's result cell; absent keys are skipped
FIGURES = [("sec_per_iter", "{:.3f} s/iter"), ("samples_per_s", "{:.2f} samples/s"), ("mfu", "{:.1%} MFU"),
           ("mfu_per_gpu", "{:.1%} MFU/GPU"), ("peak_gb", "{:.1f} GB peak"), ("gpu_peak_allocated_gb", "{:.1f} GB peak"),
           ("peak_reserved_gb", "{:.1f} GB reserved"), ("gpu_peak_reserved_gb", "{:.1f} GB reserved"),
           ("sec_per_image", "{:.2f} s/image"), ("peak_gb_without_t5", "{:.1f} GB without the T5"),
           ("baseline_sec_per_image", "baseline {:.2f} s/image"), ("baseline_sec_per_iter", "baseline {:.3f} s/iter"),
           ("speedup", "{:.2f}x baseline"), ("speedup_samples_per_s", "{:.2f}x baseline samples/s"),
           ("weak_scaling_vs_1gpu_plain", "weak scaling {:.1%}"), ("first_image_s_cold_cache", "first image {:.1f} s cold"),
           ("first_image_s_warm_cache", "{:.1f} s with the compile cache"),
           ("compile_wait_s_warm_cache", "(compile wait {:.1f} s)"), ("s_per_image_warm_cache", "then {:.2f} s/image"),
           ("max_rel_diff", "max loss diff {:.1e}"), ("same_command_twice_max_rel_diff", "run-to-run {:.1e}"),
           ("within_noise", "within noise: {}"),
           ("fp8_sec_per_image", "--fp8 {:.2f} s/image"), ("fp8_speedup_vs_bf16", "{:.2f}x bf16"),
           ("fp8_psnr_db", "PSNR vs bf16 {:.1f} dB"),
           ("zero_negative_skip_speedup", "{:.2f}x sampling from skipping the zero negative's cross-attention"),
           ("speedup_vs_compile", "{:.2f}x the bf16 compile mode"),
           ("compile_batch_size", "that at batch {}"),
           ("fp8_speedup_samples_per_s", "--fp8 {:.2f}x bf16 samples/s"),
           ("max_rel_diff_window_mean", "20-iteration mean losses within {:.1%}"),
           ("max_rel_diff_per_iteration", "single iterations within {:.0%}"), ("resumed", "resumed: {}"), ("captions_per_s", "{:.0f} captions/s"),
           ("staging_gb", "{:.1f} GB pinned staging"), ("staging_alloc_s", "allocated in {:.1f} s"),
           ("interconnect", "{}"), ("failed", "failed"), ("code", "code: {}"), ("note", "{}"),
           ("sec_per_step", "{:.3f} s/step"), ("peak_allocated_gb", "{:.1f} GB peak"),
           ("baseline_peak_gb", "baseline {:.1f} GB peak"), ("first_image_s", "first image {:.1f} s"),
           ("loss_equal", "losses bit-identical: {}"), ("grad_max_rel_diff", "LoRA gradients within {:.1e}"),
           ("sample_bit_identical", "sampling output bit-identical: {}"), ("host_gb", "{:.1f} GB host"), ("host_pinned", "host memory pinned: {}"),
           ("stop_save_s", "stop save {:.1f} s"), ("stop_to_exit_s", "all processes gone {:.1f} s after the signal"),
           ("checkpoint_complete", "stop checkpoint complete: {}"), ("exit_code", "exit code {}"),
           ("cuda_graphs_speedup", "CUDA graphs {:.3f}x"), ("fp8_cuda_graphs_speedup", "--fp8 with CUDA graphs {:.3f}x"),
           ("cuda_graphs_same_latents", "same latents with graphs: {}"),
           ("fp8_cuda_graphs_same_latents", "with --fp8: {}"),
           ("mean_loss_last_quarter", "last-quarter loss {:.4f}"),
           ("weights_distance_vs_bf16", "weights {:.1%} of bf16's travel from bf16's"),
           ("ema_distance_vs_bf16", "EMA {:.1%}"), ("image_psnr_db_vs_bf16", "images vs bf16's {:.1f} dB"),
           ("image_psnr_db_fp32_training_vs_bf16", "(fp32 training vs bf16: {:.1f} dB)")]

# formats only the headline table uses (it names its keys; the full tables show FIGURES)
EXTRA = {"baseline_samples_per_s": "baseline {:.2f} samples/s",
         "fp8_peak_gb_without_t5": "--fp8 {:.1f} GB without the T5",
         "baseline_captions_per_s": "baseline {:.1f} captions/s"}

# README's Performance table: (results.jsonl line, what it measures, the figures shown in that order)
HEADLINE = [
    (62, "2B full fine-tune step, compiled, batch 3; baseline: eager with diffusers' defaults, batch 1",
     ["samples_per_s", "mfu", "peak_gb", "baseline_samples_per_s", "speedup_samples_per_s"]),
    (65, "2B full fine-tune through the training script, 1 GPU, batch 2",
     ["sec_per_iter", "samples_per_s", "mfu_per_gpu", "gpu_peak_allocated_gb"]),
    (116, "2B full fine-tune step, the same on H100 (AdamW + EMA in one kernel)", ["samples_per_s", "mfu", "peak_gb"]),
    (119, "2B full fine-tune through the training script, the same on H100",
     ["sec_per_iter", "samples_per_s", "mfu_per_gpu", "gpu_peak_allocated_gb"]),
    (55, "2B full fine-tune step, `--fp8`, batch 5, against bf16 at its largest batch (3)",
     ["samples_per_s", "mfu", "peak_reserved_gb", "speedup_vs_compile"]),
    (64, "2B image, 1360x768, 35 steps, compiled: bf16 and `--fp8`, against diffusers' pipeline",
     ["sec_per_image", "fp8_sec_per_image", "baseline_sec_per_image", "speedup", "fp8_psnr_db"]),
    (102, "2B image, the same on H100 (CUDA graphs)",
     ["sec_per_image", "fp8_sec_per_image", "fp8_speedup_vs_bf16", "peak_gb_without_t5", "fp8_peak_gb_without_t5"]),
    (39, "14B image, 1360x768, 35 steps, compiled", ["sec_per_image", "peak_gb_without_t5"]),
    (16, "2B full fine-tune in 24 GB (`--weight_dtype bf16 --no-ema --gradient_checkpointing --compile`), batch 4",
     ["sec_per_iter", "samples_per_s", "gpu_peak_allocated_gb"]),
    (13, "14B LoRA on an fp8 base (`--lora_base_dtype fp8 --gradient_checkpointing --compile`), batch 1",
     ["sec_per_iter", "gpu_peak_allocated_gb", "gpu_peak_reserved_gb"]),
    (97, "14B LoRA on an fp8 base with `--blocks_to_swap 24`, batch 1", ["sec_per_iter", "peak_gb", "peak_reserved_gb"]),
    (2, "2B full fine-tune, FSDP on 2 GPUs, batch 2 per GPU",
     ["sec_per_iter", "samples_per_s", "mfu_per_gpu", "gpu_peak_allocated_gb"]),
    (3, "the same, against one GPU of the same run", ["weak_scaling_vs_1gpu_plain"]),
    (60, "2B full fine-tune, FSDP on 4 GPUs (`fsdp_2b.yaml`), batch 2 per GPU",
     ["sec_per_iter", "samples_per_s", "mfu_per_gpu", "gpu_peak_allocated_gb"]),
    (45, "14B full fine-tune, NVIDIA's recipe, FSDP on 4 GPUs, batch 1 per GPU",
     ["sec_per_iter", "samples_per_s", "mfu_per_gpu", "gpu_peak_allocated_gb"]),
    (82, "Anima LoRA (rank 32), 1024x1024, against diffusers' PEFT LoRA step",
     ["sec_per_iter", "peak_gb", "baseline_sec_per_iter", "baseline_peak_gb", "speedup"]),
    (96, "Anima LoRA with `--blocks_to_swap all`, against diffusers' checkpointed step",
     ["sec_per_iter", "peak_gb", "baseline_sec_per_iter", "baseline_peak_gb"]),
    (94, "Anima image, `--fp8 --compile`, against `AnimaModularPipeline`",
     ["sec_per_image", "peak_gb", "baseline_sec_per_image", "speedup"]),
]


def load(results) -> list:
    """The results file's lines, parsed ({} for a blank line); index n - 1 holds line n."""
    return [json.loads(line) if line.strip() else {} for line in Path(results).read_text().splitlines()]


def describe(row: dict) -> str:
    if "run" in row:
        return row["run"] + (f", {row['gpus']} GPU(s), batch {row['batch_per_gpu']}/GPU" if "gpus" in row else "")
    parts = [row.get("bench", "?"), row.get("family", ""), row.get("model_size", ""), row.get("mode", ""),
             row.get("variant", ""), row.get("setting", "")]
    if "launcher" in row:
        parts.append({"none": "without a launcher", "accelerate": f"under accelerate launch {row.get('accelerate', '')}",
                      }.get(row["launcher"], f"under {row['launcher']}"))
    if "blocks_to_swap" in row:
        parts.append(f"{row['blocks_to_swap']} blocks swapped, {row['base_dtype']} base, checkpoint {row['checkpoint']}")
    if "batch_size" in row:
        parts.append(f"batch {row['batch_size']}")
    if row.get("grad_accum", 1) > 1:
        parts.append(f"x {row['grad_accum']} accumulated")
    if "compile" in row:
        parts.append("compiled" if row["compile"] else "eager")
    return " ".join(p for p in parts if p)


def result(row: dict, keys=None) -> str:
    """The figures of a row: every FIGURES key it has, or exactly `keys` in that order."""
    formats = dict(FIGURES) | EXTRA
    if keys is None:
        keys = [key for key, _ in FIGURES if row.get(key) is not None]
    cells = []
    for key in keys:
        if row.get(key) is None:
            raise KeyError(f"no {key!r} in the row")
        cells.append(formats[key] if key == "failed" else formats[key].format(row[key]))
    return ", ".join(cells)


def table(numbered, name_lines: bool, since="", until="9999") -> list:
    """Markdown table lines for (line number, row) pairs."""
    out = ["| what | result | device | torch | date | command |", "|---|---|---|---|---|---|"]
    for n, row in numbered:
        if row and since <= row.get("date", "") <= until:
            what = describe(row) + (f" (line {n})" if name_lines else "")
            out.append(f"| {what} | {result(row)} | {row.get('device', '')} | {row.get('torch', '')} | "
                       f"{row.get('date', '')} | `{row.get('command', '')}` |")
    return out


def short_device(device: str) -> str:
    return device.replace("NVIDIA ", "").split(" ")[0]


def headline(rows: list) -> list:
    """README's Performance table: each row names its results.jsonl line."""
    out = ["| measured | result | GPU | results.jsonl |", "|---|---|---|---|"]
    for n, what, keys in HEADLINE:
        row = rows[n - 1]
        out.append(f"| {what} | {result(row, keys)} | {short_device(row['device'])} | line {n} |")
    return out


def parse_lines(spec: str) -> list:
    """'1-3 7' -> [1, 2, 3, 7]"""
    lines = []
    for part in spec.split():
        a, _, b = part.partition("-")
        lines.extend(range(int(a), int(b or a) + 1))
    return lines


MARKER = re.compile(r"^<!-- rows ([0-9 -]+) -->$")


def doc(rows: list, template: str, results_name: str) -> str:
    """The whole performance page: the template with each rows marker replaced by its table."""
    out, seen = [], {}
    for text in template.splitlines():
        m = MARKER.match(text.strip())
        if not m:
            out.append(text)
            continue
        numbers = parse_lines(m.group(1))
        for n in numbers:
            if not 1 <= n <= len(rows) or not rows[n - 1]:
                raise SystemExit(f"{TEMPLATE.name}: line {n} is not a result of {results_name}")
            if n in seen:
                raise SystemExit(f"{TEMPLATE.name}: line {n} of {results_name} is in two tables")
            seen[n] = True
        out.extend(table([(n, rows[n - 1]) for n in numbers], name_lines=True))
    missing = [n for n, row in enumerate(rows, 1) if row and n not in seen]
    if missing:
        raise SystemExit(f"lines {' '.join(map(str, missing))} of {results_name} are in no table of "
                         f"{TEMPLATE}: add them to a `<!-- rows ... -->` line, with a sentence on what they measure")
    header = ("<!-- Generated by `python benchmarks/perf_table.py --doc docs/performance.md` from "
              "benchmarks/results.jsonl and benchmarks/performance.md.in: edit those, not this page. -->")
    return header + "\n" + "\n".join(out).rstrip("\n") + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(HERE / "results.jsonl"))
    parser.add_argument("--since", default="", help="only rows from this date on (YYYY-MM-DD)")
    parser.add_argument("--until", default="9999", help="only rows up to this date (YYYY-MM-DD)")
    parser.add_argument("--from_line", type=int, default=1,
                        help="only rows from this line of the results file on (1-based): the rows of one round of benchmarks")
    parser.add_argument("--lines", nargs="+", type=int, help="only these lines (1-based), in this order, each row "
                                                                  "naming its line")
    parser.add_argument("--headline", action="store_true", help="print README's Performance table")
    parser.add_argument("--doc", metavar="PATH", help="write the whole performance page (docs/performance.md) from "
                                                      "the template benchmarks/performance.md.in")
    args = parser.parse_args(argv)
    rows = load(args.results)
    if args.doc:
        Path(args.doc).write_text(doc(rows, TEMPLATE.read_text(), "results.jsonl"))
        return
    if args.headline:
        out = headline(rows)
    elif args.lines:
        out = table([(n, rows[n - 1]) for n in args.lines], True, args.since, args.until)
    else:
        out = table(list(enumerate(rows, 1))[args.from_line - 1:], False, args.since, args.until)
    sys.stdout.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
