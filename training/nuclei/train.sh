#!/usr/bin/env bash
# A nuclei-only model: the starting point of the human-in-the-loop benchmark (benchmarks/hitl.py),
# which needs a model that has never seen phase contrast. dsb2018 only (fluorescence, H&E,
# brightfield nuclei), the generalist's validation split kept out, the generalist's recipe
# otherwise (128-px patches, objects at 17 px), shortened to 30 epochs of 400 patches (about
# 30 min on 2 idle cores). The benchmarked model ran epochs 0-14 of a 50-epoch schedule, then
# --resume --epochs 30: the learning rate of those epochs is the same in both schedules.
# Resumable: rerun with --resume. Usage: training/nuclei/train.sh [--threads 2] [--resume]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
data=${CELLPLUG_DATA:-$repo/../shared/data}
run=${RUN_DIR:-$repo/runs/nuclei}
mkdir -p "$run"
exec cellplug train "$data/dsb2018" \
  --val-list "$repo/training/generalist/val_stems.txt" \
  --out "$run/nuclei.pth" --recipe scratch \
  --epochs 30 --images-per-epoch 400 --patch 128 --diam-mean 17 --batch-size 8 \
  --learning-rate 0.005 --weight-decay 1e-5 --warmup-epochs 5 \
  --sampling sqrt --group-by modality \
  --precision "${PRECISION:-auto}" --seed 0 \
  --eval-every 10 --eval-images 40 \
  --checkpoint-dir "$run/ckpt" --checkpoint-every 5 \
  -q "$@"
