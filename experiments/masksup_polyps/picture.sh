#!/usr/bin/env bash
# docs/masksup.png (issue 17 item 9): a short real-data run through the CLI on the shared Kvasir-SEG sample (its
# train.txt ids, seeded 80/10/10 split: 240 train, 30 val, 30 test). U-Net width 8 at 96 x 96, Adam 1e-3, batch 8,
# 10 epochs, high (50-60 %) free-form masks. The picture is the last epoch's samples/ grid of 4 validation images,
# rows: input | masked input | prediction on the input | prediction on the masked input | truth, stored as a
# 128-colour PNG (so it stays under 200 KB).
# Usage: bash experiments/masksup_polyps/picture.sh [RUN_DIR]   (default runs/masksup_picture; minutes on 1 CPU thread)
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/masksup_picture}
DATA=${KVASIR:-../shared/data/Kvasir-SEG}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
"$PY" masksup.py --data kvasir --data-root "$DATA" --arch unet --unet-width 8 --img-size 96 --optimizer adam \
    --lr 1e-3 --batch-size 8 --epochs 10 --masking high --num-samples 4 --workers 0 --device cpu --out "$OUT"
"$PY" -c "import sys; from PIL import Image; Image.open(sys.argv[1]).convert('RGB').quantize(128).save(sys.argv[2], optimize=True)" \
    "$OUT/samples/epoch_010.png" docs/masksup.png
