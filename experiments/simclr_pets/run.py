"""Table 4.1 on the shared Oxford-IIIT Pet samples, 3 seeds, at a 2-core-CPU scale (calls table41.py's CLI).

    OMP_NUM_THREADS=1 python experiments/simclr_pets/run.py            # ~25 min wall on a shared 2-core CPU

Data: ../shared/data/oxford-iiit-pet (150 images of 3 breeds, all from the official trainval list) and
../shared/data/Kvasir-SEG/images (300 colonoscopy frames) as the out-of-domain pre-training set, the stand-in for the
report's CIFAR-10 (not available here). Both are first copied at a small size (short side 80 px, same layout) into
runs/simclr_pets/data, so that decoding full-size JPEGs every epoch does not dominate the CPU time; the runs then
resize to 64 x 64.

Grid: baseline (random init) / SimCLR on Kvasir (120 images, a seeded draw) / SimCLR on Pet (the 120 Pet images
outside the fixed 30-image test set) x dev 20 / 50 / 80 % x seeds 0, 1, 2; ResNet-18 U-Net, 64 px, SimCLR 10 epochs
(Adam 1e-3, batch 16, the shapes preset's milder views: crop 0.3-1, colour strength 0.5), fine-tuning 8
epochs (Adam 1e-3, batch 16, BCE, best validation loss).
Writes runs/simclr_pets/grid/table4.1.md (mean +- std over seeds) and experiments/simclr_pets/RESULTS.md.
"""
import shutil
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data"
WORK = ROOT / "runs" / "simclr_pets"
SHORT_SIDE = 80


def shrink(source, target, resample):
    with Image.open(source) as image:
        scale = SHORT_SIDE / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        small = image.convert("RGB" if resample != Image.NEAREST else image.mode).resize(size, resample)
    target.parent.mkdir(parents=True, exist_ok=True)
    small.save(target, quality=95) if target.suffix == ".jpg" else small.save(target)


def prepare_data():
    """Small copies in the original layouts (trimaps resized with nearest, so they keep the values 1/2/3)."""
    pets, kvasir = WORK / "data" / "oxford-iiit-pet", WORK / "data" / "kvasir-images"
    if (WORK / "data" / "done").exists():
        return pets, kvasir
    source = SHARED / "oxford-iiit-pet"
    for path in sorted((source / "images").glob("*.jpg")):
        shrink(path, pets / "images" / path.name, Image.BILINEAR)
        shrink(source / "annotations" / "trimaps" / f"{path.stem}.png",
               pets / "annotations" / "trimaps" / f"{path.stem}.png", Image.NEAREST)
    for name in ("trainval.txt", "test.txt", "list.txt"):
        shutil.copy(source / "annotations" / name, pets / "annotations" / name)
    for path in sorted((SHARED / "Kvasir-SEG" / "images").glob("*.jpg")):
        shrink(path, kvasir / path.name, Image.BILINEAR)
    (WORK / "data" / "done").write_text("ok\n")
    return pets, kvasir


def main():
    if not (SHARED / "oxford-iiit-pet").is_dir():
        sys.exit(f"error: {SHARED / 'oxford-iiit-pet'} is absent; this experiment needs the shared Pet samples")
    pets_root, kvasir = prepare_data()
    out = WORK / "grid"
    command = [sys.executable, str(Path(__file__).parent / "table41.py"), "--seeds", "0", "1", "2", "--dev-splits",
               "0.2", "0.5", "0.8", "--grid-sources", "Kvasir=folder:" + str(kvasir), "Pet=pets",
               "--data", "pets", "--data-root", str(pets_root), "--pretrain-limit", "120", "--arch", "resnet18",
               "--img-size", "64", "--pretrain-epochs", "10", "--pretrain-batch-size", "16",
               "--pretrain-optimizer", "adam", "--pretrain-lr", "1e-3", "--crop-scale", "0.3", "1",
               "--color-strength", "0.5", "--epochs", "8", "--batch-size", "16", "--lr", "1e-3", "--workers", "0",
               "--device", "cpu", "--out", str(out)] + (["--resume"] if out.is_dir() else [])
    start = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - start
    table = (out / "table4.1.md").read_text()
    (Path(__file__).parent / "RESULTS.md").write_text(
        f"{table}\nCommand: `OMP_NUM_THREADS=1 python experiments/simclr_pets/run.py` ->\n\n```\n"
        f"{' '.join(command[1:]).replace(str(ROOT) + '/', '')}\n```\n\nWall time of this call: {wall / 60:.1f} min "
        f"(2-core CPU shared with three other agents' jobs, one thread).\n")
    print(f"wall {wall:.0f} s")


if __name__ == "__main__":
    main()
