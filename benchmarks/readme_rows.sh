#!/usr/bin/env bash
# Re-measure the single-GPU rows of docs/performance.md on one GPU: each command appends its JSON line to benchmarks/results.jsonl,
# and the table of today's rows is printed at the end (benchmarks/perf_table.py). Groups run in the order given
# (default: all); each command compiles its model first. The groups are independent, so on a machine of several
# GPUs they can run side by side, one per GPU:
#
#     bash benchmarks/readme_rows.sh                 # train memory infer t5
#     bash benchmarks/readme_rows.sh train           # one group
#     for g in train memory infer t5; do CUDA_VISIBLE_DEVICES=$((i++)) bash benchmarks/readme_rows.sh $g & done; wait
#
# Multi-GPU rows come from benchmarks/bench_multi_gpu.py (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

train() {
    $PY benchmarks/bench_train.py --model_size 2B --mode compile --batch_size 3
    $PY benchmarks/bench_train.py --model_size 2B --mode compile --batch_size 2 --skip_baseline --vae
    # --fp8 at the largest batch an 80 GB card holds, against bf16 at its largest (equal memory)
    $PY benchmarks/bench_train.py --model_size 2B --mode compile_fp8 --batch_size 5 --against compile \
        --against_batch_size 3 --skip_baseline --steps 4
}

memory() {  # the recipes for smaller memory budgets
    $PY benchmarks/bench_train.py --model_size 2B --mode compile_ckpt --batch_size 4 --skip_baseline
    $PY benchmarks/bench_train.py --model_size 2B --mode bf16_lowmem --batch_size 4 --skip_baseline
    $PY benchmarks/bench_train.py --model_size 2B --mode lora_ckpt --batch_size 1 --skip_baseline
}

infer() {
    $PY benchmarks/bench_infer.py --model_size 2B --compile
    $PY benchmarks/bench_infer.py --model_size 2B --repeat 2
    $PY benchmarks/bench_infer.py --model_size 14B --compile --skip_baseline --repeat 2
}

t5() {
    $PY benchmarks/bench_t5.py --batch_size 128 --captions 2048 --compile
    $PY benchmarks/bench_t5.py
}

groups=("$@")
[ ${#groups[@]} -eq 0 ] && groups=(train memory infer t5)
for group in "${groups[@]}"; do
    case "$group" in
        train|memory|infer|t5) echo "== $group" && "$group" ;;
        *) echo "unknown group '$group' (train, memory, infer, t5)" >&2; exit 2 ;;
    esac
done
$PY benchmarks/perf_table.py --since "$(date +%Y-%m-%d)"
