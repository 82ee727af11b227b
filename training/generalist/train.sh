#!/usr/bin/env bash
# Train the bundled `generalist` model (see docs/models.md). Resumable: rerun with --resume.
# Usage: training/generalist/train.sh [extra cellplug train options, e.g. --resume --threads 2]
# bfloat16 autocast where the CPU has it natively (PRECISION=auto), float32 elsewhere.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
data=${CELLPLUG_DATA:-$repo/../shared/data}
run=${RUN_DIR:-$repo/runs/generalist}
mkdir -p "$run"
exec cellplug train "$data/dsb2018" "$data/usiigaci_phc" \
  --val-list "$here/val_stems.txt" \
  --out "$run/generalist.pth" \
  --epochs 150 --patch 128 --diam-mean 17 --batch-size 8 \
  --learning-rate 0.005 --weight-decay 1e-5 --warmup-epochs 10 \
  --sampling sqrt --group-by modality \
  --precision "${PRECISION:-auto}" --seed 0 \
  --eval-every 10 --eval-images 40 \
  --checkpoint-dir "$run/ckpt" --checkpoint-every 5 \
  -q "$@"
