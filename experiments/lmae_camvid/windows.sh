#!/usr/bin/env bash
# Issue 10 item 1: resize+pad (one pass over the whole image) vs --windows (224 x 224 windows at the training size,
# stride 112 px, probabilities averaged) for `lmae.py complete`, inference only, on the checkpoints and 50 % degraded
# CamVid val copies that run.sh made. Lanes conv (--head conv --nearest-prior) and linear (the paper's head), seeds
# 0 1 2. Usage: bash experiments/lmae_camvid/windows.sh [RUNS] [OUT]  (defaults runs/lmae_camvid,
# runs/lmae_camvid_windows); two processes at a time, OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-runs/lmae_camvid}
OUT=${2:-runs/lmae_camvid_windows}
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
one() {  # lane seed mode
  local lane=$1 seed=$2 mode=$3 deg="$RUNS/val-r0.5-s$2/val" done_dir="$OUT/completed-$1-$3-r0.5-s$2"
  [ -f "$done_dir/summary.json" ] || "$PY" lmae.py complete --fill model --checkpoint "$RUNS/$lane-s$seed/best.pt" \
      --images "$deg/images" --labels "$deg/masks" --unknown "$deg/unknown" --truth "$deg/truth" \
      --out "$done_dir" $([ "$mode" = windows ] && echo --windows) > "$done_dir.log" 2>&1
}
start=$(date +%s)
for lane in conv linear; do
  for seed in 0 1 2; do
    one "$lane" "$seed" pad & one "$lane" "$seed" windows & wait
  done
done
echo "wall $(( $(date +%s) - start )) s" | tee "$OUT/wall.txt"
"$PY" - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, statistics, sys
from pathlib import Path
cells, seeds = {}, {}
for path in sorted(Path(sys.argv[1]).glob("completed-*/summary.json")):
    _, lane, mode, _, seed = path.parent.name.split("-")
    values = json.loads(path.read_text())
    cells.setdefault((lane, mode), []).append(values["pa_miou"])
    seeds.setdefault((lane, mode), []).append(seed)
    if mode == "pad" and lane == "conv":  # the nearest fill does not depend on the model or the mode
        cells.setdefault(("nearest known pixel", ""), []).append(values["nearest_pa_miou"])


def fmt(values):
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f} (n={len(values)})"


print("| fill (50 % unknown, CamVid val, 3 seeds) | PA-mIoU | windows minus resize+pad, paired by seed |")
print("| --- | --- | --- |")
for (lane, mode), values in cells.items():
    name = f"L-MAE ({lane}), {'resize+pad' if mode == 'pad' else 'windows'}" if mode else lane
    gap = ""
    if mode == "windows":
        assert seeds[(lane, mode)] == seeds[(lane, "pad")]
        gap = fmt([w - p for w, p in zip(values, cells[(lane, "pad")])])
    print(f"| {name} | {fmt(values)} | {gap} |")
PY
