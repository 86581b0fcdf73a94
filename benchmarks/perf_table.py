"""README's measured-results table, printed from benchmarks/results.jsonl.

    python benchmarks/perf_table.py [--since 2026-11-26] [--until 2026-11-26] [--from_line 62] [--lines 80 82]
                                    [--results benchmarks/results.jsonl]

Every GPU benchmark (bench_train, bench_infer, bench_t5, bench_multi_gpu, bench_compile_warmup) appends its JSON
line to benchmarks/results.jsonl with the device, torch version, date and the command that reproduces it; this
prints one markdown row per line, newest last.
"""

import argparse
import json
from pathlib import Path

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
           ("sample_bit_identical", "sampling output bit-identical: {}")]


def describe(row: dict) -> str:
    if "run" in row:
        return row["run"] + (f", {row['gpus']} GPU(s), batch {row['batch_per_gpu']}/GPU" if "gpus" in row else "")
    parts = [row.get("bench", "?"), row.get("family", ""), row.get("model_size", ""), row.get("mode", ""),
             row.get("variant", ""), row.get("setting", "")]
    if "blocks_to_swap" in row:
        parts.append(f"{row['blocks_to_swap']} blocks swapped, {row['base_dtype']} base, checkpoint {row['checkpoint']}")
    if "batch_size" in row:
        parts.append(f"batch {row['batch_size']}")
    if row.get("grad_accum", 1) > 1:
        parts.append(f"x {row['grad_accum']} accumulated")
    if "compile" in row:
        parts.append("compiled" if row["compile"] else "eager")
    return " ".join(p for p in parts if p)


def result(row: dict) -> str:
    cells = []
    for key, fmt in FIGURES:
        if key in row:
            cells.append(fmt if key == "failed" else fmt.format(row[key]))
    return ", ".join(cells)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).resolve().parent / "results.jsonl"))
    parser.add_argument("--since", default="", help="only rows from this date on (YYYY-MM-DD)")
    parser.add_argument("--until", default="9999", help="only rows up to this date (YYYY-MM-DD)")
    parser.add_argument("--from_line", type=int, default=1,
                        help="only rows from this line of the results file on (1-based): one session's rows of a day")
    parser.add_argument("--lines", nargs="+", type=int, help="only these lines (1-based), in this order, each row "
                                                                  "naming its line")
    args = parser.parse_args()
    lines = Path(args.results).read_text().splitlines()
    numbered = [(n, lines[n - 1]) for n in args.lines] if args.lines else list(enumerate(lines, 1))[args.from_line - 1:]
    print("| what | result | device | torch | date | command |")
    print("|---|---|---|---|---|---|")
    for n, line in numbered:
        row = json.loads(line) if line.strip() else {}
        if row and args.since <= row.get("date", "") <= args.until:
            what = describe(row) + (f" (line {n})" if args.lines else "")
            print(f"| {what} | {result(row)} | {row.get('device', '')} | {row.get('torch', '')} | "
                  f"{row.get('date', '')} | `{row.get('command', '')}` |")


if __name__ == "__main__":
    main()
