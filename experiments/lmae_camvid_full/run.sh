#!/usr/bin/env bash
# Issue 19 item 2: L-MAE vs the nearest-known-pixel fill on CamVid at full size (../shared/data/CamVid-full: the
# official 367 train and 101 val frames, SegNet layout), through the CLIs only. Per lane and seed: train, degrade
# CamVid-full val at 50 % and 70 % of its 16 px patches (degradation seed = training seed), complete it at --scale 1
# with --fill model --truth, so summary.json holds the model's and the nearest fill's PA-mIoU on the same pixels.
# Lanes: fill = `lmae.py --data camvid` with no model flag (the CamVid default, --recipe fill, CHOICE C19); paper =
# the same budget with --recipe paper (the paper's linear head and 1:2:2 masks); filldeg = --recipe fill trained on
# 50 %-degraded train labels only (the Table V setting: --data folder, --unknown-first --mask-ratio 0.75).
# best.pt = the last epoch (validated only there): nothing is selected on the val frames that are completed.
# Lever lanes (item 2): the fill lane with one change, named in LEVER below; a lever that costs more per epoch
# trains fewer epochs so that its run stays within the same 45 min (set from its first epoch's measured speed, one
# thread, fp32; its --epochs comes after EPOCHS and wins).
# Each training run is meant to take at most 45 min on 2 CPU cores (EPOCHS, default 30 = the camvid default).
# Usage: [LANES='fill paper filldeg linear bw1 mixed hw32 p8 full small'] [SEEDS='0 1 2'] [EPOCHS=30] [FLAGS=--no-amp] \
#        bash experiments/lmae_camvid_full/run.sh [OUT]
#        (default runs/lmae_camvid_full); one process per lane, OMP_NUM_THREADS=1 each.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/lmae_camvid_full}
DATA=${CAMVID_FULL:-../shared/data/CamVid-full}
PY=${PYTHON:-.venv/bin/python}
EPOCHS=${EPOCHS:-30}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
RUN=(--epochs "$EPOCHS" --eval-every "$EPOCHS" --workers 0 ${FLAGS:-})  # FLAGS: extra training flags
declare -A LEVER=(  # lane name (no '-') -> the flags it adds to `lmae.py --data camvid` (filldeg: see lane)
  [fill]="" [paper]="--recipe paper" [linear]="--head linear --no-nearest-prior" [bw1]="--boundary-weight 1"
  [mixed]="--masking mixed" [p8]="--patch-size 8" [hw32]="--head-width 32 --epochs 20"
  [full]="--img-size 352x480 --crop 352x480 --epochs 9" [small]="--arch small --epochs 22")
score() {  # name seed (the checkpoint: $OUT/NAME-sSEED/best.pt)
  for ratio in 0.5 0.7; do
    local deg="$OUT/val-r$ratio-s$2"
    [ -d "$deg" ] || "$PY" lmae.py degrade --data camvid --data-root "$DATA" --split val --ratio "$ratio" \
        --patch-size 16 --seed "$2" --out "$deg" > /dev/null 2>&1 || true  # another lane may be writing it
    while [ ! -f "$deg/degrade.json" ]; do sleep 2; done
    local done_dir="$OUT/completed-$1-r$ratio-s$2"
    [ -f "$done_dir/summary.json" ] || "$PY" lmae.py complete --fill model --checkpoint "$OUT/$1-s$2/best.pt" \
        --images "$deg/val/images" --labels "$deg/val/masks" --unknown "$deg/val/unknown" --truth "$deg/val/truth" \
        --out "$done_dir" > "$done_dir.log" 2>&1
  done
}
lane() {  # name
  for seed in ${SEEDS:-0 1 2}; do
    local run="$OUT/$1-s$seed" start
    start=$(date +%s)
    case $1 in
      filldeg)
        local deg="$OUT/train-r0.5-s$seed"
        [ -d "$deg" ] || "$PY" lmae.py degrade --data camvid --data-root "$DATA" --split train --ratio 0.5 \
            --patch-size 16 --seed "$seed" --out "$deg" > /dev/null
        [ -f "$run/results.json" ] || "$PY" lmae.py --data folder --data-root "$deg" --num-classes 11 \
            --val-split train --test-split train --unknown-first --mask-ratio 0.75 --crop 224 --eval-size 352x480 \
            "${RUN[@]}" --seed "$seed" --out "$run" > "$run.log" 2>&1 ;;
      *) [ -f "$run/results.json" ] || "$PY" lmae.py --data camvid --data-root "$DATA" --test-split val "${RUN[@]}" \
             ${LEVER[$1]} --seed "$seed" --out "$run" > "$run.log" 2>&1 ;;
    esac
    echo "$1 seed $seed: training $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg)" \
        | tee -a "$OUT/wall.txt"
    score "$1" "$seed"
  done
}
for name in ${LANES:-fill paper filldeg}; do  # every name checked before anything starts
  [ "$name" = filldeg ] || [ -n "${LEVER[$name]+set}" ] || { echo "error: LANES: no lane $name; use filldeg or" \
      "${!LEVER[*]}" >&2; exit 2; }
done
start=$(date +%s)
for name in ${LANES:-fill paper filldeg}; do
  lane "$name" &
done
wait
echo "wall $(( $(date +%s) - start )) s" | tee -a "$OUT/wall.txt"
"$PY" experiments/lmae_camvid/summarize.py "$OUT" | tee "$OUT/table.md"
