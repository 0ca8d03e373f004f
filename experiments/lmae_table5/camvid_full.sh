#!/usr/bin/env bash
# Table V (Sec. IV-C) at CamVid-full scale (issue 19 item 4), through the CLIs only. Needs the L-MAE models of the
# filldeg lane of experiments/lmae_camvid_full/run.sh (trained on 50 %-degraded CamVid-full train labels only):
#   LANES=filldeg bash experiments/lmae_camvid_full/run.sh RUNS    (RUNS/filldeg-sN/best.pt, RUNS/train-r0.5-sN)
# Per seed N: complete the degraded train labels with that model (--fill model) and with the nearest known pixel
# (--fill nearest), then train one plain segmentation model (masksup.py --alpha2 0 --alpha3 0: a supervised U-Net)
# on each of four label variants of the 367 train frames: degraded (unknown = ignore), nearest, completed, full.
# Test = CamVid-full val (101 frames, full labels). best.pt is picked on VAL_IMAGES train frames with that variant's
# labels (no test label is looked at). Seeds: degradation, L-MAE and segmentation seed alike.
# Usage: [SEEDS='0 1 2'] [VARIANTS='degraded nearest completed full'] [SEG_EPOCHS=30] [SEG_SIZE=160] \
#        bash experiments/lmae_table5/camvid_full.sh RUNS [OUT]     (OUT default runs/lmae_table5_full)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:?usage: bash experiments/lmae_table5/camvid_full.sh RUNS [OUT] (RUNS: the lmae_camvid_full output)}
OUT=${2:-runs/lmae_table5_full}
DATA=${CAMVID_FULL:-../shared/data/CamVid-full}
PY=${PYTHON:-.venv/bin/python}
SEG_EPOCHS=${SEG_EPOCHS:-30}
SEG_SIZE=${SEG_SIZE:-160}
VAL_IMAGES=${VAL_IMAGES:-40}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
[ -d "$OUT/test" ] || "$PY" lmae.py degrade --data camvid --data-root "$DATA" --split val --ratio 0.5 \
    --out "$OUT/test" > /dev/null  # only its images/ and truth/ (the full val labels) are used: the test split
for seed in ${SEEDS:-0 1 2}; do
  deg="$RUNS/train-r0.5-s$seed" model="$RUNS/filldeg-s$seed/best.pt"
  [ -f "$model" ] || { echo "missing $model: run the filldeg lane first (see the usage)" >&2; exit 2; }
  for fill in model nearest; do
    done_dir="$OUT/$fill-s$seed"
    [ -f "$done_dir/summary.json" ] || "$PY" lmae.py complete --fill "$fill" --checkpoint "$model" \
        --images "$deg/train/images" --labels "$deg/train/masks" --unknown "$deg/train/unknown" \
        --truth "$deg/train/truth" --out "$done_dir" >> "$done_dir.log" 2>&1
  done
  for variant in ${VARIANTS:-degraded nearest completed full}; do
    case $variant in
      degraded) masks="$deg/train/masks" ;; nearest) masks="$OUT/nearest-s$seed" ;;
      completed) masks="$OUT/model-s$seed" ;; full) masks="$deg/train/truth" ;;
    esac
    tree="$OUT/labels-$variant-s$seed"
    if [ ! -d "$tree" ]; then  # the folder layout masksup.py --data folder reads, as links
      mkdir -p "$tree/train" "$tree/test" "$tree/val/images" "$tree/val/masks"
      ln -s "$(realpath "$deg/train/images")" "$tree/train/images"
      ln -s "$(realpath "$masks")" "$tree/train/masks"
      for image in $(ls "$deg/train/images" | head -n "$VAL_IMAGES"); do  # the selection frames: train frames
        ln -s "$(realpath "$deg/train/images/$image")" "$tree/val/images/$image"
        ln -s "$(realpath "$masks/${image%.*}.png")" "$tree/val/masks/${image%.*}.png"
      done
      ln -s "$(realpath "$OUT/test/val/images")" "$tree/test/images"
      ln -s "$(realpath "$OUT/test/val/truth")" "$tree/test/masks"
    fi
    seg="$OUT/seg-$variant-s$seed" start=$(date +%s)
    [ -f "$seg/results.json" ] || { "$PY" masksup.py --data folder --data-root "$tree" --mask-mode ids \
        --num-classes 11 --alpha2 0 --alpha3 0 --arch unet --unet-width 16 --img-size "$SEG_SIZE" \
        --epochs "$SEG_EPOCHS" --batch-size 8 --optimizer adam --lr 1e-3 --workers 0 --seed "$seed" \
        --out "$seg" >> "$seg.log" 2>&1  # appended: a second copy refused by the lock keeps the log
      echo "seg $variant seed $seed: $(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg)" \
          | tee -a "$OUT/wall.txt"; }
  done
done
"$PY" experiments/lmae_table5/summarize.py "$OUT" | tee "$OUT/table.md"
