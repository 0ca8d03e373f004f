#!/usr/bin/env bash
# docs/lmae.png (issue 17 item 9): a short real-data run through the CLIs on the shared CamVid sample. Train the
# paper's model (tiny preset, linear head) on CamVid train (30 images, 224 x 224 crops, 20 epochs), degrade CamVid val
# (10 images) at 50 % of its 16 px patches, complete it, and draw image | degraded | completion | nearest fill | truth.
# Usage: bash experiments/lmae_camvid/picture.sh [RUN_DIR]   (default runs/lmae_picture; about 5 min on 1 CPU thread)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/lmae_picture}
DATA=${CAMVID:-../shared/data/CamVid}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
"$PY" lmae.py --data camvid --data-root "$DATA" --recipe paper --arch tiny --patch-size 16 --lr 1e-3 --drop-path 0 \
    --batch-size 8 \
    --crop 224 --img-size 224 --eval-size 352x480 --test-split val --workers 0 --epochs 20 --eval-every 20 \
    --out "$OUT/run"
"$PY" lmae.py degrade --data camvid --data-root "$DATA" --split val --ratio 0.5 --patch-size 16 --seed 0 --out "$OUT/deg"
"$PY" lmae.py complete --fill model --checkpoint "$OUT/run/best.pt" --images "$OUT/deg/val/images" \
    --labels "$OUT/deg/val/masks" \
    --unknown "$OUT/deg/val/unknown" --truth "$OUT/deg/val/truth" --out "$OUT/done"
"$PY" experiments/lmae_camvid/picture.py "$OUT" docs/lmae.png
