"""docs/selective_mim.png: what selective masking does, on the shared CamVid sample (README picture).

    OMP_NUM_THREADS=1 python experiments/selective/picture.py        # about 3 CPU minutes

Trains through the CLI (both stages, 2 partitions), then draws one row per val image: input, the selectively
masked image (the half of the patches the pre-trained model reconstructs worst, Eq. (1)), its reconstruction,
the downstream prediction of best.pt, the ground truth.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
RUN = ROOT / "runs" / "selective-picture"
FLAGS = ["--data", "camvid", "--data-root", str(SHARED / "CamVid"), "--pretrain-split", "train", "--test-split", "val",
         "--select-by", "last", "--img-size", "96", "--num-patches", "64", "--msssim-window", "3", "--arch",
         "resnet18-unet", "--partitions", "2", "--pretrain-epochs", "15", "--epochs", "15", "--warmup-epochs", "1",
         "--workers", "0", "--device", "cpu", "--seed", "0"]


def main():
    if not (RUN / "results.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "selective_mim.py"), *FLAGS, "--out", str(RUN)], check=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    sys.path.insert(0, str(ROOT))
    import selective_mim as sm  # the method's functions only; the run above went through the CLI

    args = sm.get_args(FLAGS + ["--out", str(RUN), "--stage", "finetune", "--init", "none"])
    splits = sm.build_splits(args, sm.Runtime(torch.device("cpu")))
    reconstruction = sm.build_model(3, args.arch).eval()
    reconstruction.load_state_dict(sm.load_checkpoint(RUN / "pretrained.pt", sm.SCRIPT)["model"])
    segmentation = sm.build_model(splits["num_classes"], args.arch).eval()
    segmentation.load_state_dict(sm.load_checkpoint(RUN / "best.pt", sm.SCRIPT)["model"])
    rows = []
    for index in (0, 3, 6):
        image, label = splits["test"][index]  # (3, H, W) at its canvas, (H, W)
        grid = sm.patch_grid(*image.shape[-2:], args.num_patches)
        _, mask, _ = sm.selective_masks(reconstruction, image[None], grid, args.samples, args.mask_ratio,
                                        torch.Generator().manual_seed(index), ssim_window=args.ssim_window)
        masked = sm.apply_mask(image[None], grid.to_pixels(mask))
        with torch.no_grad():
            rebuilt = reconstruction(masked)
            prediction = segmentation(image[None]).argmax(1)
        palette = splits["info"].palette
        panels = [sm.to_unit(x).clamp(0, 1) for x in (image[None], masked, rebuilt)]
        panels += [sm.colorize(prediction, palette), sm.colorize(label[None], palette)]
        rows.append(torch.cat([F.pad(p, (2, 2, 2, 2), value=1.0) for p in panels], dim=3))
    out = ROOT / "docs" / "selective_mim.png"
    out.parent.mkdir(exist_ok=True)
    torchvision.utils.save_image(torch.cat(rows), out, nrow=1, padding=0)
    print(f"{out}: {out.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
