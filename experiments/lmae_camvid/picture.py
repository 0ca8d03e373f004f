"""docs/lmae.png from the files of experiments/lmae_camvid/picture.sh: per CamVid val image, the input, the degraded
label (unknown pixels white), L-MAE's completion, the nearest-known-pixel fill and the truth.
Usage: python experiments/lmae_camvid/picture.py RUN_DIR [OUT_PNG]"""
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lmae import nearest_known_fill  # noqa: E402  (the baseline fill only; the runs themselves used the CLI)

run = Path(sys.argv[1])
target = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/lmae.png")
names = ["0016E5_07959", "0016E5_08047", "0016E5_08137"]
titles = ["image", "degraded label (50 % unknown)", "L-MAE completion", "nearest known pixel", "truth"]
W, H, TOP = 240, 180, 18
rows = []
for name in names:
    degraded = Image.open(run / "deg/val/masks" / f"{name}.png")
    label = torch.from_numpy(np.array(degraded)).long()[None]
    nearest = nearest_known_fill(label, label != 255)[0].numpy().astype(np.uint8)
    fill = Image.fromarray(nearest, mode="P")
    fill.putpalette(degraded.getpalette())
    panels = [Image.open(run / "deg/val/images" / f"{name}.png"), degraded, Image.open(run / "done" / f"{name}.png"),
              fill, Image.open(run / "deg/val/truth" / f"{name}.png")]
    rows.append([p.convert("RGB").resize((W, H), Image.NEAREST) for p in panels])
canvas = Image.new("RGB", (W * len(titles), TOP + H * len(rows)), "white")
draw = ImageDraw.Draw(canvas)
for column, title in enumerate(titles):
    draw.text((column * W + 4, 3), title, fill="black")
for r, row in enumerate(rows):
    for column, panel in enumerate(row):
        canvas.paste(panel, (column * W, TOP + r * H))
target.parent.mkdir(parents=True, exist_ok=True)
canvas.quantize(256).save(target, optimize=True)
print(f"{target}: {target.stat().st_size // 1024} KB")
