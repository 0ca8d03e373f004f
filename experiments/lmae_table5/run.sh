#!/usr/bin/env bash
# Table V (Sec. IV-C) end to end on the shared CamVid sample, through the CLIs only (issue 10 item 5):
#   1. degrade 50 % of the 16 px patches of CamVid train (30 images)              lmae.py degrade
#   2. train L-MAE on those degraded labels only (unknown = neither input nor target) lmae.py --data folder
#   3. complete them                                                               lmae.py complete
#   4. train one plain segmentation model (masksup.py --alpha2 0 --alpha3 0: supervised U-Net) three times, on
#      degraded (unknown = ignore), completed and full labels; test = CamVid val (10 images, full labels);
#      best.pt is picked on the training labels of each variant (val = train: no test labels are looked at).
# 3 seeds (degradation, L-MAE and segmentation seed alike). Usage: bash experiments/lmae_table5/run.sh [OUT]
# Environment: LMAE_FLAGS (the L-MAE model), LMAE_EPOCHS (15), SEG_EPOCHS (10), SEG_SIZE (96), SEEDS, PYTHON, CAMVID.
# CPU-sized (about 40 min on one shared thread): the L-MAE log scores at 176 x 240 (completion runs at the native
# 480 x 360), the U-Net sees 96 x 96 images for 10 epochs, so test mIoUs are far below the paper's.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/lmae_table5}
DATA=${CAMVID:-../shared/data/CamVid}
PY=${PYTHON:-.venv/bin/python}
LMAE_EPOCHS=${LMAE_EPOCHS:-15}
SEG_EPOCHS=${SEG_EPOCHS:-10}
SEG_SIZE=${SEG_SIZE:-96}
read -r -a LMAE_MODEL <<< "${LMAE_FLAGS:---head conv --head-width 8 --nearest-prior}"
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
start=$(date +%s)
[ -d "$OUT/test" ] || "$PY" lmae.py degrade --data camvid --data-root "$DATA" --split val --ratio 0.5 \
    --out "$OUT/test" > /dev/null  # only its images/ and truth/ (the full val labels) are used: the test split
for seed in ${SEEDS:-0 1 2}; do
  deg="$OUT/degraded-s$seed"
  [ -d "$deg" ] || "$PY" lmae.py degrade --data camvid --data-root "$DATA" --split train --ratio 0.5 \
      --patch-size 16 --seed "$seed" --out "$deg" > /dev/null
  run="$OUT/lmae-s$seed"
  [ -f "$run/results.json" ] || "$PY" lmae.py --data folder --data-root "$deg" --num-classes 11 --val-split train \
      --test-split train --unknown-first --mask-ratio 0.75 --arch tiny --patch-size 16 --lr 1e-3 --drop-path 0 \
      --batch-size 8 --crop 224 --img-size 224 --eval-size 176x240 --epochs "$LMAE_EPOCHS" --recipe paper \
      --eval-every "$LMAE_EPOCHS" --workers 0 --seed "$seed" "${LMAE_MODEL[@]}" --out "$run" > "$run.log" 2>&1
  completed="$OUT/completed-s$seed"
  [ -f "$completed/summary.json" ] || "$PY" lmae.py complete --fill model --checkpoint "$run/best.pt" \
      --images "$deg/train/images" --labels "$deg/train/masks" --unknown "$deg/train/unknown" \
      --truth "$deg/train/truth" --out "$completed" > "$completed.log" 2>&1
  for variant in degraded completed full; do
    tree="$OUT/labels-$variant-s$seed"
    if [ ! -d "$tree" ]; then  # the folder layout masksup.py --data folder reads, as links
      mkdir -p "$tree/train" "$tree/test"
      ln -s "$(realpath "$deg/train/images")" "$tree/train/images"
      case $variant in
        degraded) ln -s "$(realpath "$deg/train/masks")" "$tree/train/masks" ;;
        completed) ln -s "$(realpath "$completed")" "$tree/train/masks" ;;
        full) ln -s "$(realpath "$deg/train/truth")" "$tree/train/masks" ;;
      esac
      ln -s "$(realpath "$tree/train")" "$tree/val"
      ln -s "$(realpath "$OUT/test/val/images")" "$tree/test/images"
      ln -s "$(realpath "$OUT/test/val/truth")" "$tree/test/masks"
    fi
    seg="$OUT/seg-$variant-s$seed"
    [ -f "$seg/results.json" ] || "$PY" masksup.py --data folder --data-root "$tree" --mask-mode ids --num-classes 11 \
        --alpha2 0 --alpha3 0 --arch unet --unet-width 8 --img-size "$SEG_SIZE" --epochs "$SEG_EPOCHS" --batch-size 8 \
        --lr 1e-3 --workers 0 --seed "$seed" --out "$seg" > "$seg.log" 2>&1
  done
done
echo "wall $(( $(date +%s) - start )) s" | tee "$OUT/wall.txt"
"$PY" experiments/lmae_table5/summarize.py "$OUT" | tee "$OUT/table.md"
