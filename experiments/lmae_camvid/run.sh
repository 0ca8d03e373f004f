#!/usr/bin/env bash
# L-MAE vs nearest-known-pixel fill on the shared CamVid sample (issue 10 item 4), through the CLIs only.
# Train on CamVid train (30 images, complete labels, native-scale 224 x 224 crops), complete CamVid val (10 images,
# 480 x 360) degraded at 50 % and 70 % of its 16 px patches, 3 seeds (training seed = degradation seed).
# Models: the paper's linear pixel head (tiny preset, 40 epochs) and --head conv --nearest-prior (CHOICE C15, 15
# epochs) with the paper's 1:2:2 mask mix (conv) or random masks (convrandom, what degrade draws). LANES picks
# lanes (default: those three), SEEDS the seeds; LANES='convlong linearlong' SEEDS=0 is the training-length check.
# best.pt = the last epoch (validated only there: no selection on the images that are completed).
# Usage: [LANES=...] bash experiments/lmae_camvid/run.sh [OUT]   (default runs/lmae_camvid); OMP_NUM_THREADS=1,
# one process per lane.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/lmae_camvid}
DATA=${CAMVID:-../shared/data/CamVid}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
COMMON=(--data camvid --data-root "$DATA" --recipe paper --arch tiny --patch-size 16 --lr 1e-3 --drop-path 0
        --batch-size 8 --crop 224 --img-size 224 --eval-size 352x480 --test-split val --workers 0)
lane() {  # name epochs flags...
  local name=$1 epochs=$2; shift 2
  for seed in ${SEEDS:-0 1 2}; do
    local run="$OUT/$name-s$seed"
    [ -f "$run/results.json" ] || "$PY" lmae.py "${COMMON[@]}" --epochs "$epochs" --eval-every "$epochs" \
        --seed "$seed" --out "$run" "$@" > "$OUT/$name-s$seed.log" 2>&1
    for ratio in 0.5 0.7; do
      local deg="$OUT/val-r$ratio-s$seed"
      [ -d "$deg" ] || "$PY" lmae.py degrade --data camvid --data-root "$DATA" --split val --ratio "$ratio" \
          --patch-size 16 --seed "$seed" --out "$deg" > /dev/null 2>&1 || true  # the other lane may write it
      while [ ! -f "$deg/degrade.json" ]; do sleep 2; done
      local done_dir="$OUT/completed-$name-r$ratio-s$seed"
      [ -f "$done_dir/summary.json" ] || "$PY" lmae.py complete --fill model --checkpoint "$run/best.pt" \
          --images "$deg/val/images" --labels "$deg/val/masks" --unknown "$deg/val/unknown" \
          --truth "$deg/val/truth" --out "$done_dir" > "$done_dir.log" 2>&1
    done
  done
}
start=$(date +%s)
LANES=${LANES:-linear conv convrandom}
for name in $LANES; do
  case $name in
    linear) lane linear 40 & ;;                                                # the paper's model (linear head)
    conv) lane conv 15 --head conv --head-width 8 --nearest-prior & ;;          # CHOICE C15, paper's 1:2:2 masks
    convrandom) lane convrandom 15 --head conv --head-width 8 --nearest-prior --masking random & ;;
    convlong) lane convlong 60 --head conv --head-width 8 --nearest-prior --masking random & ;;  # length
    linearlong) lane linearlong 150 & ;;                                                            # lever, SEEDS=0
  esac
done
wait
echo "wall $(( $(date +%s) - start )) s" | tee "$OUT/wall.txt"
"$PY" experiments/lmae_camvid/summarize.py "$OUT" | tee "$OUT/table.md"
