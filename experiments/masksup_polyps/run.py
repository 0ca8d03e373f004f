"""MaskSup vs its supervised baseline on the shared real polyp samples, through the masksup.py CLI only.

Data (../shared/data): Kvasir-SEG (300 of the release's images) and CVC-ClinicDB (23 frames, video sequences 4
and 23). They are laid out as the authors' PraNet-style release (128 x 128 PNG copies, 0/255 masks), a small-scale
analogue of the paper's polyp setting (train on Kvasir + ClinicDB, test on held-out ClinicDB):
    TrainDataset/{image,mask}      240 Kvasir-SEG images + CVC-ClinicDB sequence 4 (11 frames) = 251
                                   (masksup.py carves a seeded 10 % validation split from it: 226 train / 25 val)
    TestDataset/CVC-ClinicDB       CVC-ClinicDB sequence 23 (12 frames of one polyp; the paper's test set kind)
    TestDataset/Kvasir             the other 60 Kvasir-SEG images (ids drawn with seed 0)
Runs (each 3 seeds): supervised baseline (--alpha2 0 --alpha3 0), context branch (--alpha3 0), full MaskSup with
high (50-60 %) and with low (1-10 %) free-form masks. Every best.pt (selected on val by mIoU) is scored with
--eval-only on both test sets, on clean images and on the same high-masked images (--eval-masked --masking high),
so every variant is scored on identical masked inputs. Small U-Net (width 8, 0.49 M parameters), 64 x 64, Adam 1e-3,
batch 8, 12 epochs: minutes per run on one CPU thread; not the paper's scale (LeViT-UNet-384, 224 x 224, 200 epochs,
ImageNet start, 1,450 training images).

    OMP_NUM_THREADS=1 python experiments/masksup_polyps/run.py [--epochs 30] [--seeds 0 1 2] [--out runs/masksup_polyps]

Writes <out>/<variant>-s<seed>/ (the runs), <out>/summary.json and prints the table (mean +- std over seeds).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from common import load_label, load_rgb  # noqa: E402  (the data readers only, to decode CVC-ClinicDB's TIFFs)

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
VARIANTS = {  # name -> masksup.py flags
    "baseline": ["--alpha2", "0", "--alpha3", "0"],
    "context": ["--alpha3", "0", "--masking", "high"],
    "masksup-high": ["--masking", "high"],
    "masksup-low": ["--masking", "low"],
}
COMMON = ["--data", "pranet", "--arch", "unet", "--unet-width", "8", "--img-size", "64", "--optimizer", "adam",
          "--lr", "1e-3", "--batch-size", "8", "--workers", "0", "--device", "cpu", "--num-samples", "4"]
CVC_SEQUENCE_4, CVC_SEQUENCE_23 = range(68, 79), range(467, 479)
PREPARED_SIZE = 128


def save_resized(image_path, mask_path, image_target, mask_target, size=PREPARED_SIZE):
    """A size x size PNG copy of one image (bilinear) and its mask (0/255 at grey > 127, then nearest)."""
    if mask_target.is_file():
        return
    image_target.parent.mkdir(parents=True, exist_ok=True)
    mask_target.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(load_rgb(str(image_path))).resize((size, size), Image.BILINEAR)
    mask = Image.fromarray(np.where(np.asarray(load_label(str(mask_path))).reshape(
        *load_rgb(str(image_path)).shape[:2], -1)[..., 0] > 127, 255, 0).astype(np.uint8))
    image.save(image_target)
    mask.resize((size, size), Image.NEAREST).save(mask_target)


def build_layout(root):
    """The PraNet-style folder (see the module docstring), images decoded once (common.py's readers, which also
    read CVC-ClinicDB's TIFFs) and stored as 128 x 128 PNGs, so that each epoch does not decode full-size JPEGs."""
    kvasir = sorted(p.stem for p in (SHARED / "Kvasir-SEG" / "images").glob("*.jpg"))
    held_out = set(np.random.default_rng(0).choice(kvasir, 60, replace=False).tolist())
    for stem in kvasir:
        test = stem in held_out
        part = root / "TestDataset" / "Kvasir" if test else root / "TrainDataset"
        save_resized(SHARED / "Kvasir-SEG" / "images" / f"{stem}.jpg", SHARED / "Kvasir-SEG" / "masks" / f"{stem}.jpg",
                     part / ("images" if test else "image") / f"{stem}.png",
                     part / ("masks" if test else "mask") / f"{stem}.png")
    for frames, part, images, masks in ((CVC_SEQUENCE_4, root / "TrainDataset", "image", "mask"),
                                        (CVC_SEQUENCE_23, root / "TestDataset" / "CVC-ClinicDB", "images", "masks")):
        for frame in frames:
            save_resized(SHARED / "CVC-ClinicDB" / "Original" / f"{frame}.tif",
                         SHARED / "CVC-ClinicDB" / "Ground Truth" / f"{frame}.tif",
                         part / images / f"{frame}.png", part / masks / f"{frame}.png")


def masksup(*flags):
    command = [sys.executable, str(ROOT / "masksup.py"), *flags]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(command)}\n{result.stderr[-2000:]}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", default=str(ROOT / "runs" / "masksup_polyps"))
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    build_layout(data)
    summary = {}
    started = time.time()
    for name in args.variants:
        for seed in args.seeds:
            run = out / f"{name}-s{seed}"
            flags = COMMON + VARIANTS[name] + ["--data-root", str(data), "--seed", str(seed)]
            t0 = time.time()
            if not (run / "results.json").is_file():
                masksup(*flags, "--epochs", str(args.epochs), "--out", str(run))
            scores = {"best_epoch": json.loads((run / "results.json").read_text())["best_epoch"],
                      "train_s": round(time.time() - t0, 1)}
            for test_set in ("CVC-ClinicDB", "Kvasir"):
                folder = run / f"eval-{test_set}"
                if not (folder / "eval_test.json").is_file():
                    eval_flags = [f for f in COMMON] + ["--data-root", str(data), "--seed", str(seed)]
                    masksup(*eval_flags, "--test-split", test_set, "--eval-only", "--eval-masked", "--masking", "high",
                            "--checkpoint", str(run / "best.pt"), "--out", str(folder))
                test = json.loads((folder / "eval_test.json").read_text())["test"]
                for metric in ("paper_iou", "miou", "dice", "masked_paper_iou", "masked_miou"):
                    scores[f"{test_set}/{metric}"] = test[metric]
            summary[f"{name}-s{seed}"] = scores
            print(f"{name} seed {seed}: " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                     for k, v in scores.items()), flush=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nwall {time.time() - started:.0f} s; mean +- std over seeds {args.seeds}")
    columns = ["CVC-ClinicDB/paper_iou", "CVC-ClinicDB/masked_paper_iou", "Kvasir/paper_iou", "Kvasir/masked_paper_iou",
               "Kvasir/miou", "Kvasir/dice"]
    print("| variant | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name in args.variants:
        cells = []
        for column in columns:
            values = [summary[f"{name}-s{seed}"][column] for seed in args.seeds]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(values):.1f} ± {100 * spread:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
