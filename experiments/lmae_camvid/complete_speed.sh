#!/usr/bin/env bash
# Issue 18 item 4: `lmae.py complete` throughput and peak memory at 480 x 360 (10 CamVid val frames) and at
# 6000 x 4000 (one CamVid val frame resized, 50 % of its 16 px label patches unknown), with a checkpoint of the
# CamVid default recipe (its weights do not change the speed: one epoch on 4 frames). Each `complete` runs under
# /usr/bin/time -v (wall time, peak resident memory); table.md lists images/s and peak MB.
# Usage: bash experiments/lmae_camvid/complete_speed.sh [OUT] (default runs/lmae_complete_speed); OMP_NUM_THREADS=1.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-runs/lmae_complete_speed}
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-../shared/data/CamVid}
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
[ -f "$OUT/run/best.pt" ] || "$PY" lmae.py --data camvid --data-root "$DATA" --epochs 1 --limit 4 --eval-size 224 \
    --test-split val \
    --workers 0 --out "$OUT/run" > "$OUT/train.log"
[ -d "$OUT/small" ] || "$PY" lmae.py degrade --data camvid --data-root "$DATA" --split val --ratio 0.5 \
    --out "$OUT/small" > "$OUT/degrade.log"
[ -d "$OUT/big" ] || "$PY" - "$OUT/small/val" "$OUT/big" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
small, big = Path(sys.argv[1]), Path(sys.argv[2])
name = sorted(p.stem for p in (small / "truth").glob("*.png"))[0]
image = Image.open(small / "images" / f"{name}.png").resize((6000, 4000), Image.BILINEAR)
truth = Image.open(small / "truth" / f"{name}.png").resize((6000, 4000), Image.NEAREST)
unknown = np.random.default_rng(0).random((250, 375)) < 0.5  # 16 px patches of the 6000 x 4000 grid
unknown = unknown.repeat(16, 0).repeat(16, 1)
label = np.array(truth)
label[unknown] = 255
for folder in ("images", "masks", "unknown", "truth"):
    (big / folder).mkdir(parents=True)
image.save(big / "images" / "big.png")
Image.fromarray(label).save(big / "masks" / "big.png")
Image.fromarray(unknown.astype(np.uint8) * 255).save(big / "unknown" / "big.png")
truth.save(big / "truth" / "big.png")
PY
one() {  # name set fill
  local done_dir="$OUT/done-$1"
  rm -rf "$done_dir"
  /usr/bin/time -v "$PY" lmae.py complete --checkpoint "$OUT/run/best.pt" --images "$OUT/$2/images" \
      --labels "$OUT/$2/masks" --unknown "$OUT/$2/unknown" --truth "$OUT/$2/truth" --fill "$3" \
      --out "$done_dir" > "$OUT/$1.log" 2> "$OUT/$1.time"
}
one small-model small/val model
one small-nearest small/val nearest
one small-auto small/val auto
one big-model big model
one big-nearest big nearest
"$PY" - "$OUT" <<'PY' | tee "$OUT/table.md"
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| input | --fill | images | wall s | images/s | peak MB | tiled |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in ("small-model", "small-nearest", "small-auto", "big-model", "big-nearest"):
    text = (out / f"{name}.time").read_text()
    wall = re.search(r"Elapsed \(wall clock\) time .*: (?:(\d+):)?(\d+):([\d.]+)", text).groups()
    seconds = int(wall[0] or 0) * 3600 + int(wall[1]) * 60 + float(wall[2])
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1)) / 1024
    summary = json.loads((out / f"done-{name}" / "summary.json").read_text())
    size = "480 x 360" if name.startswith("small") else "6000 x 4000"
    print(f"| {size} | {name.split('-')[1]} | {summary['images']} | {seconds:.1f} | {summary['images'] / seconds:.3f} "
          f"| {peak:.0f} | {summary['tiled_images']} |")
PY
