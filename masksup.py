"""MaskSup: Masked Supervised Learning for Semantic Segmentation.

Zunair & Ben Hamza, BMVC 2022 (arXiv 2210.00923; code hasibzunair/masksup-segmentation).

One network with shared weights sees every training image twice in the same step: as it is and with free-form
holes cut into it. Both predictions are supervised by the same ground truth and pulled towards each other:
    L_total = a1*L_seg(M_p, M_gt) + a2*L_context(M_pm, M_gt) + a3*L_tasksim(M_p, M_pm)
so that the network learns short- and long-range context from the masked copy, in a single training stage.

Implemented (component -> function -> paper place)
    free-form hole masks, "low" 0-10 % / "high" 50-60 % -> free_form_masks      -> slides "Low vs High masking",
                                                                                   supplement Fig. 1
    patch masks (option)                               -> patch_masks
    masks from a folder of PNGs (the paper's source)   -> FolderMasks
    holes set to 0 in the [-1, 1] input                -> apply_mask             -> supplement Sec. 1 preprocessing
    LeViT-UNet-128s / -192 / -384                      -> LeViTUNet, PRESETS     -> supplement Sec. 1 "Architecture"
    small U-Net ("MaskSup (U-Net)", 3 M)               -> UNet                   -> slides, parameter table
    L_seg, L_context (BCE binary / CE multi-class)     -> segmentation_loss      -> slides, L_total
    L_tasksim (MSE between the two probability maps)   -> task_similarity_loss   -> slides, L_total
    L_total                                            -> masksup_loss           -> slides, L_total
    ablations: --alpha2 0 --alpha3 0 = supervised baseline, --alpha3 0 = context branch only (slides "CB", "CB+TS")
    Adam 1e-4 batch 16 (GLaS, polyps) / SGD 0.1 m 0.9 batch 8 (NYUDv2), 200 epochs, best by mIoU -> supplement Sec. 1
    standard mIoU and the paper's protocol (per-image IoU / per-image micro Jaccard) -> evaluate
    evaluation on masked inputs (supplement Fig. 4, slides "heavily masked") -> evaluate(..., --eval-masked)

Choices (the paper is silent; grep "CHOICE C")
    C1  Free-form masks are synthesised: random polylines (4 strokes of 5 segments) rasterised by distance to the
        segments, with a smooth noise field added so the stroke width varies; the pixels nearest the strokes become
        holes, exactly round(area * H * W) of them, area drawn uniformly in the bin. The paper used the NVIDIA
        irregular-mask set (not redistributable; --masking folder --mask-dir reads it).
    C2  Bins: low = [0.01, 0.10], high = [0.50, 0.60] of the image area (the NVIDIA set's 0-10 % and 50-60 % bins;
        its smallest masks cover 1 %).
    C3  L_tasksim is the MSE between probability maps (sigmoid for binary, softmax over K for multi-class),
        averaged over every pixel and channel, ignore pixels included (it needs no label); gradients flow through
        both passes (no stop-gradient), as in the authors' binary code. --tasksim argmax reproduces the authors'
        multi-class code (MSE of argmax maps: it passes no gradient, so MaskSup trains as "context branch" only).
    C4  Binary sets: one logit + BCE; ignore pixels (255) are left out of the mean. Multi-class: K logits + CE with
        ignore 255.
    C5  Two separate forward passes (clean, then masked), as the authors' code does: BatchNorm sees each batch on
        its own and its running statistics are updated by both passes.
    C6  No learning-rate schedule (the supplement names none); --lr-schedule step reproduces the authors' NYUDv2
        code (StepLR 60, 0.1). No data augmentation besides the masking (the authors' code has none).
    C7  Best weights are chosen by the standard mIoU on a validation split carved from train (--select-metric
        paper_iou picks by the paper's per-image score, the authors' criterion); --select-on test is the authors'
        protocol (train on all of train, select on test: optimistic).
    C8  --eval-masked draws its masks from a generator reseeded at every evaluation, so every epoch and every
        checkpoint is scored on the same masked images.
    C9  The U-Net (--arch unet) is a plain 5-level U-Net (two conv-BN-ReLU per level, bilinear upsampling); base
        width 20 gives 3.07 M parameters, the slides' "3 M". The paper names no layout.
    C10 Synthetic default (--data shapes): binary (object vs background, the paper's GLaS/polyp kind of task),
        --arch unet --unet-width 16 (1.96 M) at 64 x 64, Adam 1e-3, batch 16, 20 epochs. Measured: LeViT-UNet-128s
        needs 224 x 224 and one MaskSup step on 2 images took ~20 s on the shared 2-core CPU, so it cannot finish
        in minutes; the 5-class shapes task reached only mIoU 0.22 after 10 epochs (classes 2-4 at 0), while the
        binary task reaches val mIoU 0.80 (chance 0.42) in 20 epochs: 5 m 51 s wall, 3 m 35 s CPU on the shared
        2-core machine (OMP_NUM_THREADS=1). --no-binary gives the 5-class task.
    C11 Other datasets of common.py: a binary set takes the GLaS/polyp recipe (LeViT-UNet-384, Adam 1e-4, batch
        16), a multi-class set the NYUDv2 recipe (U-Net, SGD 0.1, batch 8).

Deviations (grep "DEVIATION")
    - NYUDv2 void (255) is ignored; the authors' code merges it into class 0.
    - NYUDv2 uses our U-Net, not U-Net++ (the supplement's indoor network; the slides report MaskSup (U-Net)).
    - The authors select weights on the test set; we select on a validation split unless --select-on test.

Usage
    python masksup.py                                        # synthetic shapes, a few minutes on a 2-core CPU
    python masksup.py --data kvasir --data-root data/Kvasir-SEG
    python masksup.py --data polyps --data-root data         # Kvasir-SEG/ + CVC-ClinicDB/ train, CVC-ClinicDB test
    python masksup.py --data nyudv2 --data-root data/nyudv2  # U-Net, SGD 0.1
    python masksup.py --data glas --data-root data/glas --alpha2 0 --alpha3 0   # supervised baseline
    torchrun --nproc_per_node=4 masksup.py --data glas --data-root data/glas --compile
    python masksup.py --resume --out runs/masksup-shapes     # continue at the next epoch

Shapes: B batch, C channels, H W height width, K classes (1 logit for binary sets), P patch size,
L = (H/P)*(W/P) patches, N tokens, D key dim, E embedding width. mask (B, H, W) bool, True = hidden (hole).
"""

import argparse
import itertools
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, Subset

from common import (DATASET_NAMES, BinaryStats, ConfusionMatrix, DatasetError, build_dataset, denormalize,
                    joint_transform, per_image_micro_jaccard)

# --- configuration ---

ARCHS = ("levit-128s", "levit-192", "levit-384", "unet")
MASKINGS = ("high", "low", "patch", "folder")
# CHOICE C2: hole-area bins of the NVIDIA irregular-mask set (fraction of the image area)
HOLE_AREA_BINS = {"low": (0.01, 0.10), "high": (0.50, 0.60)}
# Binary foreground/background sets; "polyps" = Kvasir-SEG + CVC-ClinicDB (the paper's polyp setting)
BINARY_SETS = ("glas", "kvasir", "cvc", "polyps", "pets")
IMAGE_ONLY_SETS = ("cifar10", "catsdogs")
LEVIT_SIZE = 224


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="MaskSup: masked supervised learning for semantic segmentation")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="shapes", choices=[n for n in DATASET_NAMES if n not in IMAGE_ONLY_SETS]
                      + ["polyps"],
                      help="dataset (common.py readers); 'polyps' = Kvasir-SEG + CVC-ClinicDB train, CVC-ClinicDB "
                           "val/test, --data-root holding both folders (the paper's polyp setting). Default: shapes")
    data.add_argument("--data-root", default=None, help="dataset root in its original layout (default ./data/<name>)")
    data.add_argument("--download", action="store_true", help="let torchvision download the set where it can")
    data.add_argument("--binary", action=argparse.BooleanOptionalAction, default=None,
                      help="treat any non-zero class as foreground (1 logit + BCE); glas/kvasir/cvc/polyps/pets "
                           "are binary anyway. Default: on for shapes (object vs background), off otherwise")
    data.add_argument("--img-size", type=int, default=None,
                      help="square input size; paper: 224 (LeViT-UNet needs exactly 224). Default: 224, shapes 64")
    data.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    data.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4, shapes 0)")

    masking = parser.add_argument_group("masking")
    masking.add_argument("--masking", default="high", choices=MASKINGS,
                         help="high: free-form holes over 50-60 %% of the image (paper's best); low: 1-10 %%; "
                              "patch: random square patches (--mask-ratio, --patch-size); folder: mask PNGs from "
                              "--mask-dir (white = hole), e.g. the NVIDIA irregular-mask set the paper used")
    masking.add_argument("--mask-dir", default=None, help="folder of mask PNGs for --masking folder")
    masking.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of patches hidden, --masking patch")
    masking.add_argument("--patch-size", type=int, default=16, help="patch side in pixels, --masking patch")

    method = parser.add_argument_group("method (L_total = a1*L_seg + a2*L_context + a3*L_tasksim)")
    method.add_argument("--alpha1", type=float, default=1.0, help="weight of L_seg on the clean image (paper: 1)")
    method.add_argument("--alpha2", type=float, default=1.0,
                        help="weight of L_context on the masked image (paper: 1; 0 with --alpha3 0 = baseline)")
    method.add_argument("--alpha3", type=float, default=1.0,
                        help="weight of L_tasksim between the two predictions (paper: 1; 0 = context branch only)")
    method.add_argument("--tasksim", default="probabilities", choices=("probabilities", "argmax"),
                        help="probabilities: MSE of sigmoid/softmax maps (differentiable, default); argmax: the "
                             "authors' multi-class code, MSE of argmax maps, which passes no gradient")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=None, choices=ARCHS,
                       help="network; paper: levit-384 for GLaS/polyps, U-Net(++) for NYUDv2. "
                            "Default: levit-384 binary sets, unet multi-class sets and shapes")
    model.add_argument("--unet-width", type=int, default=None,
                       help="U-Net base width (doubles per level, 5 levels); 20 = 3.07 M params. Default 20, shapes 16")
    model.add_argument("--drop-path", type=float, default=None,
                       help="LeViT stochastic depth; LeViT's presets: 0 (128s, 192), 0.1 (384)")
    model.add_argument("--levit-weights", default=None,
                       help="local LeViT ImageNet checkpoint (facebookresearch/LeViT .pth) for the encoder")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help="paper: 200. Default 200, shapes 20")
    optim.add_argument("--batch-size", type=int, default=None,
                       help="per process; paper: 16 GLaS/polyps, 8 NYUDv2. Default: the paper's, shapes 16")
    optim.add_argument("--optimizer", default=None, choices=("adam", "sgd"),
                       help="paper: Adam for GLaS/polyps, SGD momentum 0.9 for NYUDv2 (the default per dataset)")
    optim.add_argument("--lr", type=float, default=None, help="paper: 1e-4 Adam, 0.1 SGD. Default: those; shapes 1e-3")
    optim.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (paper: 0.9)")
    optim.add_argument("--weight-decay", type=float, default=0.0,
                       help="paper: none stated (authors' code: 1e-5 Adam, 5e-4 SGD)")
    optim.add_argument("--lr-schedule", default="constant", choices=("constant", "step"),
                       help="constant (paper states none) or step (authors' NYUDv2 code: x0.1 every 60 epochs)")
    optim.add_argument("--lr-step-size", type=int, default=60, help="epochs per step, --lr-schedule step")
    optim.add_argument("--lr-gamma", type=float, default=0.1, help="factor per step, --lr-schedule step")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval-masked", action="store_true",
                            help="also score predictions on masked inputs (the paper's robustness figure)")
    evaluation.add_argument("--select-on", default="val", choices=("val", "test"),
                            help="split that picks best.pt; val (default) or test (the authors' protocol: train on "
                                 "all of train and select on test; optimistic)")
    evaluation.add_argument("--select-metric", default="miou", choices=("miou", "paper_iou"),
                            help="metric that picks best.pt: miou (standard dataset-level mIoU, default) or "
                                 "paper_iou (the paper's per-image protocol, which the authors selected by)")
    evaluation.add_argument("--num-samples", type=int, default=6, help="images in each samples/ PNG grid")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                     help="bf16 autocast on CUDA (always off on CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the training step")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    run.add_argument("--seed", type=int, default=0, help="seed for weights, data order and masks")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels: bitwise repeatable on one machine, slower")
    run.add_argument("--out", default=None, help="run directory (default runs/masksup-<data>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint (or <out>/best.pt)")
    run.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    args = parser.parse_args(argv)

    # Data-dependent defaults. CHOICE C10, C11: synthetic preset / recipe per kind of dataset.
    shapes = args.data == "shapes"
    if args.binary is None:
        args.binary = shapes  # CHOICE C10: the synthetic default is binary, like the paper's GLaS/polyp tasks
    binary_task = args.binary or args.data in BINARY_SETS
    recipe = "shapes" if shapes else ("binary" if binary_task else "multiclass")
    defaults = {
        # supplement Sec. 1: GLaS/polyps LeViT-UNet-384, Adam 1e-4, batch 16; NYUDv2 SGD 0.1 m 0.9, batch 8
        "binary": dict(arch="levit-384", img_size=LEVIT_SIZE, epochs=200, batch_size=16, optimizer="adam", lr=1e-4,
                       workers=4, unet_width=20),
        # DEVIATION: U-Net, not the supplement's U-Net++, because the slides report "MaskSup (U-Net)" (3 M)
        "multiclass": dict(arch="unet", img_size=LEVIT_SIZE, epochs=200, batch_size=8, optimizer="sgd", lr=0.1,
                           workers=4, unet_width=20),
        "shapes": dict(arch="unet", img_size=64, epochs=20, batch_size=16, optimizer="adam", lr=1e-3, workers=0,
                       unet_width=16),
    }[recipe]
    if args.arch in PRESETS and args.img_size is None:
        args.img_size = LEVIT_SIZE  # e.g. shapes drawn at 224 for a LeViT-UNet
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drop_path is None:
        args.drop_path = PRESETS[args.arch]["drop_path"] if args.arch in PRESETS else 0.0
    args.binary_task = binary_task
    if args.out is None:
        args.out = f"runs/masksup-{args.data}"

    if args.arch in PRESETS and args.img_size != LEVIT_SIZE:
        parser.error(f"--arch {args.arch} needs --img-size {LEVIT_SIZE}: LeViT-UNet's attention biases are tied to "
                     f"its 14x14/7x7/4x4 token grids (got {args.img_size}); use --arch unet for other sizes")
    if args.arch == "unet" and (args.img_size < 16 or args.img_size % 16):
        parser.error(f"--img-size must be a multiple of 16 for --arch unet (4 halvings), got {args.img_size}")
    if args.unet_width < 1:
        parser.error(f"--unet-width must be positive, got {args.unet_width}")
    if args.masking == "folder" and not args.mask_dir:
        parser.error("--masking folder needs --mask-dir DIR (a folder of mask PNGs, white = hole)")
    if args.mask_dir and args.masking != "folder":
        parser.error("--mask-dir is only read with --masking folder")
    if not 0.0 < args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    if args.masking == "patch" and (args.patch_size < 1 or args.img_size % args.patch_size):
        parser.error(f"--patch-size must divide --img-size ({args.img_size}), got {args.patch_size}")
    for name in ("alpha1", "alpha2", "alpha3"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.alpha1 + args.alpha2 + args.alpha3 == 0:
        parser.error("--alpha1, --alpha2 and --alpha3 are all 0: nothing to train")
    for name in ("epochs", "batch_size", "img_size", "num_samples", "lr_step_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if not 0.0 <= args.drop_path < 1.0:
        parser.error(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.levit_weights and args.arch not in PRESETS:
        parser.error("--levit-weights needs a LeViT-UNet --arch (levit-128s, levit-192, levit-384)")
    if args.levit_weights and not Path(args.levit_weights).is_file():
        parser.error(f"--levit-weights {args.levit_weights}: no such file (a facebookresearch/LeViT .pth)")
    if args.resume and args.eval_only:
        parser.error("--resume and --eval-only exclude each other")
    if args.checkpoint and not args.eval_only:
        parser.error("--checkpoint is read with --eval-only (use --resume to continue training)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible (use --device cpu)")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        args.amp = False  # bf16 autocast is only used on CUDA
    return args


# --- masking ---

def free_form_masks(batch_size, height, width, area_range, generator, device, num_strokes=4, num_vertices=6):
    """Free-form hole masks (CHOICE C1): thick random strokes whose total area lands exactly in `area_range`.

    Each sample gets `num_strokes` random polylines. Every pixel is scored by its distance to the nearest segment,
    divided by a smooth noise field (irregular stroke width); the round(area * H * W) lowest-scoring pixels become
    holes, area ~ U(area_range) per sample. Vectorised over the batch; all randomness from `generator` (on `device`).
    Returns (B, H, W) bool, True = hole.
    """
    B, H, W, S, V = batch_size, height, width, num_strokes, num_vertices
    size = torch.tensor([H, W], device=device, dtype=torch.float32)
    # random walks: a start point, then V-1 steps of random direction and length 10-40 % of the image side
    start = torch.rand(B, S, 1, 2, generator=generator, device=device) * size  # (B, S, 1, 2) as (row, col)
    angle = torch.rand(B, S, V - 1, generator=generator, device=device) * (2 * math.pi)
    length = (0.1 + 0.3 * torch.rand(B, S, V - 1, generator=generator, device=device)) * max(H, W)
    steps = torch.stack([angle.sin(), angle.cos()], dim=-1) * length[..., None]  # (B, S, V-1, 2)
    vertices = torch.cat([start, start + steps.cumsum(dim=2)], dim=2)  # (B, S, V, 2)
    vertices = size - (vertices.remainder(2 * size) - size).abs()  # walks reflect off the image border
    seg_start = vertices[:, :, :-1].reshape(B, -1, 1, 2)  # (B, G, 1, 2), G = S*(V-1) segments
    seg_vec = vertices[:, :, 1:].reshape(B, -1, 1, 2) - seg_start
    start_r, start_c = seg_start[..., 0], seg_start[..., 1]  # (B, G, 1)
    vec_r, vec_c = seg_vec[..., 0], seg_vec[..., 1]
    pixel_r = torch.arange(H, device=device, dtype=torch.float32).repeat_interleave(W)  # (HW,) row of each pixel
    pixel_c = torch.arange(W, device=device, dtype=torch.float32).repeat(H)  # (HW,) column of each pixel
    # distance from each pixel to each segment: project onto the segment, clamp to its ends
    t = ((pixel_r - start_r) * vec_r + (pixel_c - start_c) * vec_c) / (vec_r ** 2 + vec_c ** 2 + 1e-6)  # (B, G, HW)
    t = t.clamp(0, 1)
    squared = (pixel_r - start_r - t * vec_r) ** 2 + (pixel_c - start_c - t * vec_c) ** 2  # (B, G, HW)
    distance = squared.amin(dim=1).sqrt()  # (B, HW)
    # a smooth random field (coarse noise, bilinear upsampling) scales the distance, so the stroke width varies
    # along the stroke by up to 3x at any hole area
    coarse = torch.rand(B, 1, max(2, H // 16), max(2, W // 16), generator=generator, device=device)
    wobble = F.interpolate(coarse, size=(H, W), mode="bilinear", align_corners=False).reshape(B, H * W)
    score = distance / (0.5 + wobble)  # (B, HW): low = close to a stroke
    low, high = area_range
    area = low + (high - low) * torch.rand(B, generator=generator, device=device)
    num_holes = (area * H * W).round().long().clamp(math.ceil(low * H * W), math.floor(high * H * W))  # (B,)
    # the num_holes lowest scores of each row become holes: argsort, then scatter "rank < num_holes" back
    order = score.argsort(dim=1)  # (B, HW)
    by_rank = torch.arange(H * W, device=device)[None] < num_holes[:, None]  # (B, HW) in rank order
    mask = torch.zeros_like(by_rank).scatter_(1, order, by_rank)
    return mask.view(B, H, W)


def patch_masks(batch_size, height, width, patch_size, mask_ratio, generator, device):
    """Random patch masks: exactly round(mask_ratio * L) of the L = (H/P)*(W/P) patches hidden per sample.

    Returns (B, H, W) bool, True = hidden.
    """
    B, P = batch_size, patch_size
    h, w = height // P, width // P
    L = h * w
    num_hidden = round(mask_ratio * L)
    noise = torch.rand(B, L, generator=generator, device=device)  # (B, L)
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, L): rank of each patch's noise
    patch_mask = rank < num_hidden  # (B, L) True = hidden
    return patch_mask.view(B, h, w).repeat_interleave(P, dim=1).repeat_interleave(P, dim=2)  # (B, H, W)


class FolderMasks:
    """Hole masks read once from a folder of PNG/JPG/BMP files (white = hole, > 127), resized (nearest) to the
    input size and kept on the device; each call draws one per sample with the passed generator."""

    SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

    def __init__(self, folder, size, device):
        from PIL import Image, UnidentifiedImageError
        folder = Path(folder)
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in self.SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DatasetError(f"--mask-dir {folder}: no mask images found (expected PNG files, white = hole, "
                               f"e.g. the NVIDIA irregular-mask set)")
        masks = []
        for path in files:
            try:
                with Image.open(path) as image:
                    image = image.convert("L").resize((size, size), Image.NEAREST)
            except (OSError, UnidentifiedImageError) as e:
                raise DatasetError(f"mask {path} cannot be read ({e}); remove or replace it") from None
            masks.append(torch.from_numpy(np.asarray(image) > 127))
        self.masks = torch.stack(masks).to(device)  # (N, H, W) bool
        self.device = device

    def __call__(self, batch_size, generator):
        index = torch.randint(len(self.masks), (batch_size,), generator=generator, device=self.device)
        return self.masks[index]  # (B, H, W)


def make_masks(args, batch_size, generator, device, folder_masks=None):
    """A fresh (B, H, W) bool hole mask per sample for the strategy chosen by --masking."""
    if args.masking == "patch":
        return patch_masks(batch_size, args.img_size, args.img_size, args.patch_size, args.mask_ratio, generator,
                           device)
    if args.masking == "folder":
        return folder_masks(batch_size, generator)
    return free_form_masks(batch_size, args.img_size, args.img_size, HOLE_AREA_BINS[args.masking], generator, device)


def apply_mask(images, mask):
    """Masked copy of `images` (B, 3, H, W) in [-1, 1]: hole pixels (mask (B, H, W) True) set to 0 (mid-grey), the
    paper's preprocessing (image * (1 - mask) in [-1, 1])."""
    return images.masked_fill(mask[:, None], 0.0)


# --- model: LeViT-UNet (Xu et al. 2021, arXiv 2107.08623, on LeViT, Graham et al. 2021) ---

class ConvBN(nn.Sequential):
    """Conv2d (no bias) + BatchNorm2d: LeViT's Conv2d_BN."""

    def __init__(self, in_channels, out_channels, kernel_size=3, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)


class LinearBN(nn.Module):
    """Linear (no bias) + BatchNorm1d over all tokens: LeViT's Linear_BN. (B, N, C_in) -> (B, N, C_out)."""

    def __init__(self, in_features, out_features, bn_weight_init=1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)
        nn.init.zeros_(self.bn.bias)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).view_as(x)


class Residual(nn.Module):
    """x + block(x), with per-sample stochastic depth (drop-path) in training."""

    def __init__(self, block, drop_path=0.0):
        super().__init__()
        self.block = block
        self.drop_path = drop_path

    def forward(self, x):
        if self.training and self.drop_path > 0:
            keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.drop_path  # (B, 1, 1)
            return x + self.block(x) * keep.to(x.dtype) / (1 - self.drop_path)
        return x + self.block(x)


def mlp(dim, ratio=2):
    """LeViT MLP: Linear_BN(E -> 2E), Hardswish, Linear_BN(2E -> E) with BN weight 0 (the block starts as identity)."""
    return nn.Sequential(LinearBN(dim, dim * ratio), nn.Hardswish(), LinearBN(dim * ratio, dim, bn_weight_init=0.0))


def attention_bias_index(query_grid, key_grid, stride):
    """Index of the offset (|stride*qr - kr|, |stride*qc - kc|) of every query/key pair, numbered in first-seen
    order (LeViT's table layout, so ImageNet weights load): ((Nq, Nk) long, number of distinct offsets).
    One learned bias per head per distinct offset."""
    queries = list(itertools.product(range(query_grid), range(query_grid)))
    keys = list(itertools.product(range(key_grid), range(key_grid)))
    offsets, index = {}, []
    for qr, qc in queries:
        for kr, kc in keys:
            offset = (abs(qr * stride - kr), abs(qc * stride - kc))
            index.append(offsets.setdefault(offset, len(offsets)))
    return torch.tensor(index, dtype=torch.long, device="cpu").view(len(queries), len(keys)), len(offsets)


class Attention(nn.Module):
    """LeViT multi-head attention on an R x R token grid with learned biases indexed by relative offset.

    attn = softmax(q k^T / sqrt(D) + bias[|dr|, |dc|]) per head; value dim 2D; Hardswish then Linear_BN(H*2D -> E)
    (BN weight 0). (B, N, E) -> (B, N, E), N = R*R.
    """

    def __init__(self, dim, key_dim, num_heads, resolution, attn_ratio=2):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = num_heads, key_dim, attn_ratio * key_dim
        self.qkv = LinearBN(dim, num_heads * (2 * key_dim + self.value_dim))
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(num_heads * self.value_dim, dim, bn_weight_init=0.0))
        index, num_offsets = attention_bias_index(resolution, resolution, stride=1)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x):
        B, N, _ = x.shape
        qkv = self.qkv(x).view(B, N, self.num_heads, -1)
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=3)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, N, D|D|2D)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        # fused attention kernel; the default scale is 1/sqrt(D), LeViT's
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, 2D)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class ShrinkAttention(nn.Module):
    """LeViT's shrink attention (AttentionSubsample): queries from the stride-2 subsampled grid, keys/values from
    the full grid; heads = E_in / D, value dim 4D, no residual. (B, R*R, E_in) -> (B, R'*R', E_out), R' = (R-1)//2+1.
    """

    def __init__(self, in_dim, out_dim, key_dim, resolution, stride=2, attn_ratio=4):
        super().__init__()
        self.num_heads = in_dim // key_dim
        self.key_dim, self.value_dim = key_dim, attn_ratio * key_dim
        self.resolution, self.stride = resolution, stride
        self.out_resolution = (resolution - 1) // stride + 1
        self.kv = LinearBN(in_dim, self.num_heads * (key_dim + self.value_dim))
        self.q = LinearBN(in_dim, self.num_heads * key_dim)
        self.proj = nn.Sequential(nn.Hardswish(), LinearBN(self.num_heads * self.value_dim, out_dim))
        index, num_offsets = attention_bias_index(self.out_resolution, resolution, stride)
        self.attention_biases = nn.Parameter(torch.zeros(self.num_heads, num_offsets))
        self.register_buffer("attention_bias_idxs", index, persistent=False)

    def forward(self, x):
        B, N, E = x.shape
        R, S = self.resolution, self.stride
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.value_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, N, D), (B, heads, N, 4D)
        subsampled = x.view(B, R, R, E)[:, ::S, ::S].reshape(B, -1, E)  # (B, N', E_in)
        q = self.q(subsampled).view(B, -1, self.num_heads, self.key_dim).transpose(1, 2)  # (B, heads, N', D)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N', N)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N', 4D)
        return self.proj(x.transpose(1, 2).reshape(B, -1, self.num_heads * self.value_dim))


class DecoderBlock(nn.Module):
    """LeViT-UNet decoder block: bilinear x2 upsampling (align_corners=True) first, then 2 x (conv3x3-BN-ReLU)."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.up = nn.UpsamplingBilinear2d(scale_factor=2)
        self.conv1 = nn.Sequential(ConvBN(in_channels, out_channels), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(ConvBN(out_channels, out_channels), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.conv2(self.conv1(self.up(x)))


# LeViT's specification (dims E per stage, key dim D, heads, depths) and LeViT-UNet's drop-path per variant.
# Parameters measured by our code, 3-channel input, 1-class head (= the reference LeViT-UNet code):
PRESETS = {
    "levit-128s": dict(dims=(128, 256, 384), key_dim=16, heads=(4, 6, 8), depths=(2, 3, 4), drop_path=0.0),
    # 15,894,627 (not in the MaskSup slides)
    "levit-192": dict(dims=(192, 288, 384), key_dim=32, heads=(3, 5, 6), depths=(4, 4, 4), drop_path=0.0),
    # 19,894,150 (slides: "19 M")
    "levit-384": dict(dims=(384, 512, 768), key_dim=32, heads=(6, 9, 12), depths=(4, 4, 4), drop_path=0.1),
    # 52,154,213 (slides: "51 M")
}


class LeViTUNet(nn.Module):
    """LeViT-UNet: a LeViT encoder (CNN stem + three attention stages at 14x14, 7x7, 4x4 tokens) and a U-Net decoder
    with skips from the stem. Input (B, C, 224, 224) -> logits (B, K, 224, 224).

    Stem: four stride-2 conv-BN (Hardswish after the first three), widths n/8, n/4, n/2, n with n = E1:
    112x112, 56x56, 28x28, 14x14 -> 196 tokens. Stage 1: depth x [Residual(attention), Residual(MLP)] at 14x14;
    stages 2 and 3 open with shrink attention + Residual(MLP) (14 -> 7 -> 4). Decoder: concat(stem output, stage
    outputs upsampled to 14x14) -> 512 at 28x28, + stem 28x28 skip -> 256 at 56x56, + 56x56 skip -> 128 at 112x112,
    + 112x112 skip -> conv3x3 head, bilinear x2 -> 224x224.
    """

    def __init__(self, preset="levit-384", in_channels=3, num_classes=1, drop_path=None):
        super().__init__()
        spec = PRESETS[preset]
        dims, key_dim, heads, depths = spec["dims"], spec["key_dim"], spec["heads"], spec["depths"]
        drop_path = spec["drop_path"] if drop_path is None else drop_path
        n = dims[0]
        stem_widths = (in_channels, n // 8, n // 4, n // 2, n)
        self.stem = nn.ModuleList(ConvBN(a, b, stride=2) for a, b in zip(stem_widths[:-1], stem_widths[1:]))
        self.resolutions = [LEVIT_SIZE // 16]  # 14 tokens a side after the stride-16 stem
        for _ in dims[1:]:
            self.resolutions.append((self.resolutions[-1] - 1) // 2 + 1)  # shrink attention: 14 -> 7 -> 4

        stages = []
        for i, (dim, num_heads, depth, resolution) in enumerate(zip(dims, heads, depths, self.resolutions)):
            blocks = []
            if i > 0:  # shrink attention from the previous stage's grid, then an MLP in the new width
                blocks += [ShrinkAttention(dims[i - 1], dim, key_dim, self.resolutions[i - 1]),
                           Residual(mlp(dim), drop_path)]
            for _ in range(depth):
                blocks += [Residual(Attention(dim, key_dim, num_heads, resolution), drop_path),
                           Residual(mlp(dim), drop_path)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)

        self.decoder1 = DecoderBlock(n + sum(dims), 512)
        self.decoder2 = DecoderBlock(512 + n // 2, 256)
        self.decoder3 = DecoderBlock(256 + n // 4, 128)
        self.head = nn.Conv2d(128 + n // 8, num_classes, 3, padding=1)
        self.head_up = nn.UpsamplingBilinear2d(scale_factor=2)

    def tokens_to_map(self, tokens):
        B, N, E = tokens.shape
        side = math.isqrt(N)
        return tokens.transpose(1, 2).reshape(B, E, side, side)  # (B, E, R, R)

    def forward(self, images, return_features=False):
        if images.shape[-2:] != (LEVIT_SIZE, LEVIT_SIZE):
            raise ValueError(f"LeViT-UNet needs {LEVIT_SIZE}x{LEVIT_SIZE} inputs (its attention biases are tied to "
                             f"14x14/7x7/4x4 token grids), got {tuple(images.shape[-2:])}; resize, or use --arch unet")
        skips = []
        x = images
        for i, conv in enumerate(self.stem):
            x = conv(x)
            if i < 3:
                x = F.hardswish(x)
                skips.append(x)  # (B, n/8, 112, 112), (B, n/4, 56, 56), (B, n/2, 28, 28)
        stem_out = x  # (B, n, 14, 14)
        tokens = x.flatten(2).transpose(1, 2)  # (B, 196, n)
        stage_outputs = []
        for stage in self.stages:
            tokens = stage(tokens)  # (B, 196, E1), (B, 49, E2), (B, 16, E3)
            stage_outputs.append(tokens)
        up = dict(mode="bilinear", align_corners=True)
        f1 = self.tokens_to_map(stage_outputs[0])  # (B, E1, 14, 14)
        f2 = F.interpolate(self.tokens_to_map(stage_outputs[1]), scale_factor=2, **up)  # (B, E2, 14, 14)
        f3 = F.interpolate(self.tokens_to_map(stage_outputs[2]), scale_factor=4, **up)  # (B, E3, 16, 16)
        f3 = F.interpolate(f3, size=f1.shape[-2:], **up)  # (B, E3, 14, 14), as the reference code does
        x = self.decoder1(torch.cat([stem_out, f1, f2, f3], dim=1))  # (B, 512, 28, 28)
        x = self.decoder2(torch.cat([x, skips[2]], dim=1))  # (B, 256, 56, 56)
        x = self.decoder3(torch.cat([x, skips[1]], dim=1))  # (B, 128, 112, 112)
        logits = self.head_up(self.head(torch.cat([x, skips[0]], dim=1)))  # (B, K, 224, 224)
        if return_features:
            return logits, dict(stem=[*skips, stem_out], tokens=stage_outputs)
        return logits


def load_levit_weights(model, path):
    """Load an ImageNet LeViT checkpoint (facebookresearch/LeViT, key 'model') into a LeViTUNet encoder.

    LeViT keys -> ours: patch_embed.{0,2,4,6} -> stem.{0..3} (the first conv too, unlike the reference code);
    blocks.i -> stages.s.j by the preset's depths; '.c.' -> '.conv.'/'.linear.', '.m.' -> '.block.', 'q.1.' -> 'q.'.
    Classifier heads are dropped. Returns (number of tensors loaded, list of LeViT keys not loaded).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-PyTorch file: say which and stop
        raise DatasetError(f"--levit-weights {path} cannot be read as a PyTorch checkpoint ({e})") from None
    levit = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else {}
    # global LeViT block index -> (stage, index inside the stage)
    layout = [(s, j) for s, stage in enumerate(model.stages) for j in range(len(stage))]
    ours = model.state_dict()
    renamed, skipped = {}, []
    for key, value in levit.items():
        name = key
        match = re.match(r"patch_embed\.(\d)\.(c|bn)\.(.*)", key)
        if match:
            name = f"stem.{int(match[1]) // 2}.{'conv' if match[2] == 'c' else 'bn'}.{match[3]}"
        match = re.match(r"blocks\.(\d+)\.(.*)", key)
        if match and int(match[1]) < len(layout):
            stage, index = layout[int(match[1])]
            rest = match[2].replace("m.", "block.", 1) if match[2].startswith("m.") else match[2]
            rest = rest.replace("q.1.", "q.", 1) if rest.startswith("q.1.") else rest
            name = f"stages.{stage}.{index}.{rest}".replace(".c.", ".linear.")
        if name in ours and ours[name].shape == value.shape:
            renamed[name] = value
        else:
            skipped.append(key)
    if not renamed:
        raise DatasetError(f"--levit-weights {path}: no tensor matches a LeViT encoder of this size; pass the "
                           f"facebookresearch/LeViT checkpoint of the same variant as --arch")
    model.load_state_dict(renamed, strict=False)
    return len(renamed), skipped


# --- model: U-Net (the slides' "MaskSup (U-Net)") ---

def double_conv(in_channels, out_channels):
    return nn.Sequential(ConvBN(in_channels, out_channels), nn.ReLU(inplace=True),
                         ConvBN(out_channels, out_channels), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Plain 5-level U-Net (CHOICE C9): widths w, 2w, 4w, 8w, 16w; max-pool down, bilinear up + concat skip.
    (B, C, H, W) -> (B, K, H, W), H and W multiples of 16. Width 20, 3 channels in, 1 class: 3,067,841
    parameters."""

    def __init__(self, in_channels=3, num_classes=1, width=20):
        super().__init__()
        widths = [width * 2 ** i for i in range(5)]
        self.down = nn.ModuleList(double_conv(a, b) for a, b in zip([in_channels] + widths[:-1], widths))
        self.up = nn.ModuleList(double_conv(widths[i] + widths[i + 1], widths[i]) for i in reversed(range(4)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, images):
        skips, x = [], images
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)  # (B, w * 2^i, H / 2^i, W / 2^i)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)  # (B, K, H, W)


def build_model(args, num_outputs):
    if args.arch == "unet":
        return UNet(3, num_outputs, args.unet_width)
    return LeViTUNet(args.arch, 3, num_outputs, drop_path=args.drop_path)


# --- losses ---

def segmentation_loss(logits, labels, binary):
    """L_seg / L_context: BCE-with-logits (binary, logits (B, 1, H, W)) or cross-entropy (multi-class, logits
    (B, K, H, W)) against labels (B, H, W) int64; ignore pixels (255) are left out of the mean (CHOICE C4)."""
    logits = logits.float()
    # DEVIATION: 255 (void) is left out, because it has no class; the authors' NYUDv2 code merged it into class 0
    valid = labels != 255  # (B, H, W)
    count = valid.sum().clamp_min(1)
    if binary:
        targets = (labels == 1).float()
        bce = F.binary_cross_entropy_with_logits(logits[:, 0], targets, reduction="none")  # (B, H, W)
        return (bce * valid).sum() / count
    return F.cross_entropy(logits, labels, ignore_index=255, reduction="sum") / count


def task_similarity_loss(logits_clean, logits_masked, binary, mode="probabilities"):
    """L_tasksim(M_p, M_pm): MSE between the predicted maps of the clean and the masked image (CHOICE C3).

    logits_clean, logits_masked: (B, K, H, W) float (K = 1 for binary). Returns a scalar.
    probabilities: sigmoid (binary) / softmax over K maps, differentiable through both passes.
    argmax: the authors' multi-class code, MSE of the argmax class maps (binary: of the thresholded maps); this
    term has no gradient.
    """
    logits_clean, logits_masked = logits_clean.float(), logits_masked.float()
    if mode == "argmax":
        if binary:
            return F.mse_loss((logits_clean > 0).float(), (logits_masked > 0).float())
        return F.mse_loss(logits_clean.argmax(1).float(), logits_masked.argmax(1).float())
    if binary:
        return F.mse_loss(torch.sigmoid(logits_clean), torch.sigmoid(logits_masked))
    return F.mse_loss(logits_clean.softmax(dim=1), logits_masked.softmax(dim=1))


def masksup_loss(logits_clean, logits_masked, labels, binary, alphas=(1.0, 1.0, 1.0), tasksim="probabilities"):
    """L_total and its terms. logits_masked may be None for the supervised baseline (a2 = a3 = 0).
    Returns (total scalar, (3,) tensor of [L_seg, L_context, L_tasksim], detached)."""
    a1, a2, a3 = alphas
    # L_total = a1*L_seg(M_p, M_gt) + a2*L_context(M_pm, M_gt) + a3*L_tasksim(M_p, M_pm)
    seg = segmentation_loss(logits_clean, labels, binary)
    if logits_masked is None:
        zero = seg.new_zeros(())
        return a1 * seg, torch.stack([seg, zero, zero]).detach()
    context = segmentation_loss(logits_masked, labels, binary)
    tasksim = task_similarity_loss(logits_clean, logits_masked, binary, tasksim)
    total = a1 * seg + a2 * context + a3 * tasksim
    return total, torch.stack([seg, context, tasksim]).detach()


# --- loops ---

def train_step(model, optimizer, images, labels, mask, args):
    """One MaskSup step: the clean and the masked image through the same network (two passes, shared weights),
    L_total, one optimizer step. images (B, 3, H, W) in [-1, 1], labels (B, H, W), mask (B, H, W) bool.
    Returns a (4,) tensor [L_total, L_seg, L_context, L_tasksim] (detached, no host sync)."""
    two_passes = args.alpha2 > 0 or args.alpha3 > 0  # a2 = a3 = 0: the plain supervised baseline, one pass
    # CHOICE C5: two separate passes (not one 2B batch), so BatchNorm sees the clean and the masked batch apart
    # bf16 autocast: tensor-core convolutions and matmuls, half the activation memory; losses in fp32
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=args.amp):
        logits_clean = model(images)  # M_p (B, K, H, W)
        logits_masked = model(apply_mask(images, mask)) if two_passes else None  # M_pm (B, K, H, W)
    total, terms = masksup_loss(logits_clean, logits_masked, labels, args.binary_task,
                                (args.alpha1, args.alpha2, args.alpha3), args.tasksim)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return torch.cat([total.detach()[None], terms])


def train_one_epoch(model, step_fn, optimizer, loader, args, device, mask_generator, folder_masks=None):
    """One pass over `loader` with a fresh hole mask per sample per step. Returns mean loss terms (all ranks)."""
    model.train()
    sums = torch.zeros(5, device=device)  # L_total, L_seg, L_context, L_tasksim, steps
    for images, labels in loader:
        # pinned memory + non_blocking: the copy overlaps the previous step on CUDA
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mask = make_masks(args, images.shape[0], mask_generator, device, folder_masks)  # (B, H, W)
        sums[:4] += step_fn(model, optimizer, images, labels, mask, args)
        sums[4] += 1
    if dist.is_initialized():
        dist.all_reduce(sums)
    means = (sums[:4] / sums[4].clamp_min(1)).tolist()  # sync point
    return dict(zip(("loss", "seg", "context", "tasksim"), means))


@torch.no_grad()
def evaluate(model, loader, info, args, device, folder_masks=None):
    """Standard and paper-protocol metrics on `loader`; with --eval-masked the same on masked inputs.

    Standard: dataset-level confusion matrix -> miou (class mean, 255 ignored), per_class_iou, pixel_acc.
    Paper protocol (the paper's "mIoU"): paper_iou = mean over images of the per-image foreground IoU (binary
    sets; sklearn jaccard_score per image) or of the per-image micro Jaccard (multi-class; NYUDv2).
    Binary sets also give dataset-level foreground iou (fg_iou) and dice. Masked variants are prefixed masked_.
    `model` is the plain module (not DDP): ranks see different shards and must not sync inside forward.
    """
    model.eval()
    # CHOICE C8: the evaluation masks come from a generator reseeded here, the same masks at every evaluation
    rank = dist.get_rank() if dist.is_initialized() else 0
    generator = torch.Generator(device=device).manual_seed(args.seed + 999_983 * (rank + 1))
    prefixes = ["", "masked_"] if args.eval_masked else [""]
    num_classes = 2 if args.binary_task else info.num_classes
    confusion = {p: ConfusionMatrix(num_classes, device=device) for p in prefixes}
    binary_stats = {p: BinaryStats(device=device) for p in prefixes}
    jaccard = {p: torch.zeros(2, dtype=torch.float64, device=device) for p in prefixes}  # sum, images
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        inputs = {"": images}
        if args.eval_masked:
            inputs["masked_"] = apply_mask(images, make_masks(args, images.shape[0], generator, device, folder_masks))
        for prefix, batch in inputs.items():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
                logits = model(batch).float()  # (B, K, H, W)
            if args.binary_task:
                preds = (logits[:, 0] > 0).long()  # sigmoid > 0.5
                binary_stats[prefix].update(logits[:, 0], labels)
            else:
                preds = logits.argmax(dim=1)  # (B, H, W)
                scores = per_image_micro_jaccard(preds, labels)  # (B,), nan for an image without valid pixels
                jaccard[prefix] += torch.stack([scores.nansum(), (~scores.isnan()).sum()]).double()
            confusion[prefix].update(preds, labels)
    results = {}
    for prefix in prefixes:
        confusion[prefix].all_reduce()
        standard = confusion[prefix].compute()  # sync point
        results.update({f"{prefix}miou": standard["miou"], f"{prefix}pixel_acc": standard["pixel_acc"],
                        f"{prefix}per_class_iou": standard["per_class_iou"]})
        if args.binary_task:
            stats = binary_stats[prefix].all_reduce().compute()  # sync point
            results.update({f"{prefix}paper_iou": stats["per_image_iou"], f"{prefix}fg_iou": stats["iou"],
                            f"{prefix}dice": stats["dice"]})
        else:
            if dist.is_initialized():
                dist.all_reduce(jaccard[prefix])
            total, count = jaccard[prefix].tolist()  # sync point
            results[f"{prefix}paper_iou"] = total / count if count else float("nan")
    return results


# --- plumbing ---

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):
    """Seed of the data order and the masks of one epoch on one rank: resuming at any epoch replays it exactly."""
    return (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % 2 ** 62


def setup_distributed(args):
    """DDP when launched by torchrun (nccl on CUDA, gloo on CPU). Returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if args.device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    else:
        device = torch.device("cpu")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick the fastest kernels
    return rank, world_size, device


def build_split(args, split):
    """(dataset, info) of one split; 'polyps' joins Kvasir-SEG and CVC-ClinicDB (train) / CVC-ClinicDB (val, test).
    Inputs are resized to --img-size and normalised to [-1, 1] (supplement Sec. 1); no augmentation (CHOICE C6).
    Splits are seeded with 0, not --seed, so every seed trains on the same images."""
    transform = joint_transform(size=None if args.data == "shapes" else args.img_size, normalize="symmetric")
    common = dict(transform=transform, binary=args.binary, download=args.download, limit=args.limit, seed=0)
    if args.data == "polyps":
        root = Path(args.data_root or "data")
        parts = [("kvasir", "Kvasir-SEG"), ("cvc", "CVC-ClinicDB")] if split in ("train", "trainval") else \
            [("cvc", "CVC-ClinicDB")]
        built = [build_dataset(name, root / folder, split, **common) for name, folder in parts]
        return ConcatDataset([d for d, _ in built]), built[-1][1]
    return build_dataset(args.data, args.data_root, split, image_size=args.img_size, **common)


def make_loader(dataset, args, train, rank, world_size, device):
    kwargs = dict(batch_size=args.batch_size, num_workers=args.workers,
                  pin_memory=device.type == "cuda",  # page-locked host memory: faster, asynchronous copies
                  persistent_workers=args.workers > 0)  # keep workers (and their file handles) between epochs
    if not train:
        # every rank scores its own exact shard (no padding duplicates), results summed by all_reduce
        return DataLoader(Subset(dataset, range(rank, len(dataset), world_size)), shuffle=False, **kwargs)
    drop_last = len(dataset) // world_size > args.batch_size  # no 1-image BatchNorm batch at the end
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed)
        return DataLoader(dataset, sampler=sampler, drop_last=drop_last, **kwargs)
    generator = torch.Generator()  # reseeded every epoch (epoch_seed) so --resume replays the order
    return DataLoader(dataset, shuffle=True, generator=generator, drop_last=drop_last, **kwargs)


def build_loaders(args, rank, world_size, device):
    """Train loader plus the evaluation loaders: the selection split (val, or test with --select-on test), and
    test. Returns (train_loader, {split: loader}, info)."""
    # DEVIATION (CHOICE C7): select on a validation split carved from train, because selecting on test (the
    # authors' protocol, --select-on test) reports an optimistic test score
    train_split = "trainval" if args.select_on == "test" else "train"
    train_set, info = build_split(args, train_split)
    loaders = {}
    for split in dict.fromkeys([args.select_on, "test"]):
        if split in info.splits:
            loaders[split] = make_loader(build_split(args, split)[0], args, False, rank, world_size, device)
    return make_loader(train_set, args, True, rank, world_size, device), loaders, info


def unwrap(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def save_checkpoint(path, model, optimizer, scheduler, epoch, best, args):
    """Model (unwrapped), optimizer, scheduler, epoch, best {score, epoch}, args and RNG states; written to a
    temporary file, then os.replace, so a crash never leaves a half-written checkpoint."""
    state = {
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "best": best, "args": vars(args),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    temporary = Path(f"{path}.tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)


def load_checkpoint(path, model, optimizer=None, scheduler=None, restore_rng=False):
    """Load our own checkpoint (trusted: it holds Python/NumPy RNG states, hence weights_only=False)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        unwrap(model).load_state_dict(state["model"])
    except (OSError, RuntimeError, KeyError, EOFError) as e:
        raise DatasetError(f"checkpoint {path} cannot be loaded into this model ({str(e).splitlines()[0]}); pass a "
                           f"masksup.py checkpoint made with the same --arch, --unet-width and dataset") from None
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state


def colorize(labels, palette):
    """(B, H, W) class ids -> (B, 3, H, W) float in [0, 1]; 255 (ignore) white."""
    colours = torch.full((256, 3), 255.0)
    colours[:len(palette)] = torch.tensor(palette, dtype=torch.float32)
    return colours.to(labels.device)[labels.clamp(0, 255)].permute(0, 3, 1, 2) / 255


@torch.no_grad()
def save_samples(model, images, labels, args, info, path, folder_masks=None):
    """PNG grid, one row each: input, masked input, prediction on the input, prediction on the masked input,
    ground truth. The masks come from a fixed seed, so grids of different epochs are comparable."""
    model.eval()
    device = images.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    masked = apply_mask(images, make_masks(args, images.shape[0], generator, device, folder_masks))
    rows = [denormalize(images, "symmetric").cpu(), denormalize(masked, "symmetric").cpu()]  # sync point
    palette = info.palette[:2] if args.binary_task else info.palette
    for batch in (images, masked):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp):
            logits = model(batch).float()
        preds = (logits[:, 0] > 0).long() if args.binary_task else logits.argmax(1)
        rows.append(colorize(preds.cpu(), palette))
    rows.append(colorize(labels.cpu(), palette))
    from torchvision.utils import save_image
    save_image(torch.cat(rows), path, nrow=images.shape[0], padding=2, pad_value=1.0)


def format_line(record):
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if not isinstance(v, list))


def main(args):
    rank, world_size, device = setup_distributed(args)
    is_main = rank == 0
    out = Path(args.out)
    if not (args.resume or args.eval_only) and out.exists() and any(out.iterdir()):
        raise SystemExit(f"error: run directory {out} exists and is not empty; pass --resume to continue it or "
                         f"--out DIR for a new run")
    if args.resume and not (out / "last.pt").is_file():
        raise SystemExit(f"error: --resume: no {out / 'last.pt'} to continue; check --out")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked --out before rank 0 writes into it
    seed_everything(args.seed)  # identical initial weights on every rank

    train_loader, eval_loaders, info = build_loaders(args, rank, world_size, device)
    args.binary_task = info.binary
    args.num_classes = info.num_classes
    num_outputs = 1 if info.binary else info.num_classes  # CHOICE C4: binary sets use one logit
    model = build_model(args, num_outputs)
    if args.levit_weights:
        loaded, skipped = load_levit_weights(model, args.levit_weights)
        if is_main:
            print(f"--levit-weights: loaded {loaded} LeViT tensors into the encoder, skipped {len(skipped)} "
                  f"(classifier heads, shape mismatches)")
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # NHWC: the layout fast GPU conv kernels use
    folder_masks = FolderMasks(args.mask_dir, args.img_size, device) if args.masking == "folder" else None
    parameters = sum(p.numel() for p in model.parameters())

    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    gamma = args.lr_gamma if args.lr_schedule == "step" else 1.0  # CHOICE C6: constant unless asked
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=gamma)

    if args.eval_only:
        checkpoint = Path(args.checkpoint) if args.checkpoint else out / "best.pt"
        if not checkpoint.is_file():
            raise SystemExit(f"error: --eval-only: no checkpoint {checkpoint}; pass --checkpoint PATH")
        load_checkpoint(checkpoint, model)
        results = {split: evaluate(model, loader, info, args, device, folder_masks)
                   for split, loader in eval_loaders.items()}
        if is_main:
            for split, metrics in results.items():
                print(format_line({"split": split, **metrics}))
            out.mkdir(parents=True, exist_ok=True)
            (out / "results-eval.json").write_text(json.dumps({"checkpoint": str(checkpoint), **results}, indent=2))
        return results

    start_epoch, best = 1, {"score": -math.inf, "epoch": 0}
    if args.resume:
        state = load_checkpoint(out / "last.pt", model, optimizer, scheduler, restore_rng=True)
        start_epoch, best = state["epoch"] + 1, state["best"]
    else:
        seed_everything(args.seed + rank)  # a different drop-path stream per rank
    config = {**vars(args), "parameters": parameters, "world_size": world_size,
              "effective_batch_size": args.batch_size * world_size, "train_images": len(train_loader.dataset)}
    if is_main:
        print("config " + json.dumps(config, sort_keys=True))
        (out / "samples").mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    if world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        train_model = model
    step_fn = torch.compile(train_step) if args.compile else train_step  # fuses the step's kernels on GPU
    mask_generator = torch.Generator(device=device)
    select_loader = eval_loaders[args.select_on]
    sample_images, sample_labels = next(iter(DataLoader(select_loader.dataset, batch_size=args.num_samples)))
    sample_images, sample_labels = sample_images.to(device), sample_labels.to(device)

    for epoch in range(start_epoch, args.epochs + 1):
        started = time.time()
        seed = epoch_seed(args.seed, epoch, rank)
        mask_generator.manual_seed(seed)  # a fresh mask per sample per step, replayable on --resume
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        else:
            train_loader.generator.manual_seed(seed)
        losses = train_one_epoch(train_model, step_fn, optimizer, train_loader, args, device, mask_generator,
                                 folder_masks)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = evaluate(model, select_loader, info, args, device, folder_masks)
        score = metrics[args.select_metric]
        score = -math.inf if math.isnan(score) else score  # e.g. no foreground anywhere yet
        improved = score > best["score"] or best["epoch"] == 0  # so that best.pt always exists
        if improved:
            best = {"score": score, "epoch": epoch}
        record = {"epoch": epoch, **losses, "lr": lr,
                  **{f"{args.select_on}_{k}": v for k, v in metrics.items()}, "time": time.time() - started}
        if is_main:
            print(format_line(record), flush=True)
            with open(out / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            save_checkpoint(out / "last.pt", model, optimizer, scheduler, epoch, best, args)
            if improved:
                save_checkpoint(out / "best.pt", model, optimizer, scheduler, epoch, best, args)
            save_samples(model, sample_images, sample_labels, args, info, out / "samples" / f"epoch{epoch:03d}.png",
                         folder_masks)
        if dist.is_initialized():
            dist.barrier()  # best.pt is written before any rank reads it

    # final: the selected weights on every evaluation split
    load_checkpoint(out / "best.pt", model)
    results = {"best_epoch": best["epoch"], f"best_{args.select_on}_{args.select_metric}": best["score"],
               "parameters": parameters}
    for split, loader in eval_loaders.items():
        results[split] = evaluate(model, loader, info, args, device, folder_masks)
    if is_main:
        for split in eval_loaders:
            print(format_line({"final": split, **results[split]}))
        (out / "results.json").write_text(json.dumps(results, indent=2))
    if dist.is_initialized():
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main(get_args())
    except DatasetError as e:
        sys.exit(f"error: {e}")
