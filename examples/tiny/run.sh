#!/usr/bin/env bash
# The whole workflow on the embedded tiny example, on a CPU in about a minute:
# build assets -> pre-compute T5 embeddings -> train a few iterations -> generate an image from the result.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
A=examples/tiny/assets
$PY examples/tiny/make_assets.py --output_dir $A
$PY precompute_t5.py --dataset_path $A/dataset --text_encoder $A/models/text_encoder
$PY -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_text2image.py --config examples/tiny/train.yaml
$PY infer_text2image.py --dit_path checkpoints/posttraining/text2image/tiny --load_ema \
    --vae_path $A/models/vae --text_encoder $A/models/text_encoder --height 64 --width 64 --dtype fp32 \
    --prompt "a red circle on a blue background" --save_path output/tiny/red_circle.jpg
echo "done: output/tiny/red_circle.jpg (and checkpoints/posttraining/text2image/tiny)"
