"""Selective Masking Image Reconstruction: self-supervised pre-training for semantic segmentation.

Wang & Stavness (University of Saskatchewan), "Selective Masking based Self-Supervised Learning for Image Semantic
Segmentation"; the authors' code: https://github.com/yuw422/Selective_Masking_Image_Reconstruction.

A ResNet-34 U-Net learns to reconstruct images whose patches are partly hidden. The pre-training set is cut into
equal partitions that are trained one after another: partition 0 with random masks, every later partition with
masks chosen by the model trained so far, which hides the patches it reconstructs worst (Fig. 1-2). The
pre-trained weights then initialise a segmentation U-Net trained with a Jaccard loss (Sec. 2.4).

Implemented (component -> function -> paper place)
    patch grid, "512 patches" (authors' step rule)     -> patch_grid              -> Sec. 2
    random masking, 50 % of patches, mean-colour fill  -> random_masks, apply_mask -> Sec. 2, Fig. 3
    per-patch loss (1 - SSIM 3x3) + L1, batched       -> score_patches           -> Sec. 2.1, Eq. (1)
    5 masked copies, aggregate, hide the top 50 %      -> selective_masks, top_patches -> Sec. 2.1, Fig. 2
    partitions, train one after another, scored by the previous model -> partition_indices, pretrain,
                                                          score_partition -> Sec. 2, Fig. 1
    U-Net on a ResNet-34 encoder, 3 or K outputs       -> ResNetUNet, PRESETS     -> Sec. 2.2
    copy every pre-trained tensor but the last layer   -> transfer_weights        -> Sec. 2.2
    reconstruction loss (1 - MS-SSIM 11x11) + L1       -> reconstruction_loss, ms_ssim, ssim_maps -> Sec. 2.4, Eq. (2)
    downstream Jaccard loss, mIoU, class IoU, lowest-k -> jaccard_loss, evaluate, summarize_seeds -> Sec. 2.4,
                                                                                   Tables 2-6
    baselines: random masking / ImageNet / none        -> --masking random, --init imagenet|none -> Table 2
    self- vs cross-pre-training                        -> --pretrain-data          -> Table 7
    three downstream seeds 0, 1234, 3741               -> --seeds                  -> Sec. 2.4
    augmentations: flip, colour jitter, random crop    -> PretrainImages, build_finetune_loaders -> Sec. 2.4

Choices (the paper is silent or vague; grep "CHOICE C")
    C1  Patch grid: step = ceil(side / sqrt(--num-patches)) per axis; a last band shorter than half a step is
        merged into the one before it (authors' get_patch_loc). 256 x 256 -> 21 x 21 = 441 patches, not 512.
    C2  Patch scores are aggregated over the copies in which the patch was hidden, as a mean (--score-aggregation
        hidden-mean): the paper wants "the average patch loss ... the desired masked reconstruction loss". A sum
        over hidden copies (hidden-sum) or over all copies (all-sum: Eq. (1) read literally, and the authors' code)
        mostly ranks patches by how often the random draw hid them. A patch no copy hid scores 0.
    C3  Images are normalised with ImageNet statistics, so hidden pixels take the ImageNet mean colour (the authors
        use Pascal VOC statistics for all four sets). Losses and scores are computed in [0, 1] pixel space (images
        denormalised), data range 1, SSIM constants K1 = 0.01, K2 = 0.03, Gaussian windows with sigma 1.5; the
        authors apply pytorch-msssim with data_range 1 to the normalised tensors.
    C4  MS-SSIM follows pytorch-msssim: valid Gaussian filtering, 2x2 average pooling between the 5 scales, weights
        (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); negative contrast-structure values are floored at 1e-6 (their
        relu) so that the fractional powers keep a finite gradient.
    C5  The reconstruction loss covers the whole image, hidden and visible pixels alike (authors' code).
    C6  Scoring and the selective masks use each image resized to --img-size x --img-size (the "canvas"); training
        applies the random crop, flip and jitter to the canvas and its mask together, so the hidden share of a crop
        varies (paper Fig. 4 caption). Colour jitter changes input and target alike.
    C7  Partitions are strided, partition i = items i, i+P, i+2P ... in dataset order (authors' data_list[i::10]);
        the last --val-fraction (10 %) of each partition is its reconstruction validation set (authors' 90/10).
    C8  Each partition starts a fresh Adam and learning-rate schedule from the previous partition's weights
        (authors: one trainer per partition). Schedule: linear warm-up from 1 % to 100 % over --warmup-epochs,
        then cosine to 1 %, stepped per epoch (authors' LambdaLR).
    C9  The random-masking baseline trains once on the whole pre-training set for --epochs epochs (authors' config),
        the same number of image passes as selective masking.
    C10 Decoder: ours, U-Net style (nearest x2 upsampling, concatenated skip, 2 x conv3x3-BN-ReLU), widths
        256-128-64-32-16 with skips from layer3, layer2, layer1 and the stem, full-resolution output; inputs are
        reflect-padded to a multiple of 32 and cropped back. The authors' pytorch-toolbelt model predicts at 1/4
        resolution and upsamples.
    C11 Jaccard loss as pytorch-toolbelt's JaccardLoss (authors' code): softmax, soft IoU per class over the batch,
        smooth 1e-3, classes absent from the batch contribute 0, mean over all K; ignore pixels left out.
    C12 Pre-training split: "unlabeled" where the reader has it, as in Sec. 2.3 (VOC: all VOC2012 JPEGs;
        Cityscapes: train_extra + trainvaltest, which holds the downstream test images, as in the paper; Nassar,
        Sugarbeets, shapes), else "train", never "test" (--pretrain-split overrides). Downstream: train, val (model
        selection), test (reported; --test-split); evaluation at --img-size x --img-size.
    C13 Pre-training batch sizes of Table 1 (VOC 128, Cityscapes 128, Nassar 256, Sugarbeets 64), 64 elsewhere,
        capped at the partition's training size. Downstream: 500 epochs, batch 8, Adam 3e-3 (authors' configs).
    C14 Synthetic default (--data shapes): 64 x 64, 3 partitions of the 512 unlabeled shapes, 3 epochs each,
        nominal 64 patches (8 x 8 grid of 8 px), MS-SSIM window 3 (an 11 x 11 window over 5 scales needs sides
        > 160 px), batch 8 in both stages, downstream 20 epochs at Adam 1e-3, one seed, no warm-up.
    C15 --init imagenet loads torchvision's ResNet-34 ImageNet weights (resnet34-b627a593.pth) from
        --imagenet-weights or the torch hub cache; the paper used pytorch-toolbelt's copy. Nothing is downloaded.

Deviations (grep "DEVIATION")
    - Selective masks are kept exactly in memory and in the checkpoint; the authors write the masked images as
      JPEGs (which blurs the hidden patches' edges).

Usage
    python selective_mim.py                                   # synthetic shapes, both stages, a few CPU minutes
    python selective_mim.py --data voc --data-root data/voc   # paper settings: 10 partitions x 1000 epochs, ...
    python selective_mim.py --data voc --masking random       # the random-masking baseline (Table 2)
    python selective_mim.py --data voc --stage finetune --init imagenet      # ImageNet baseline
    python selective_mim.py --data nassar --pretrain-data sugarbeets ...     # cross-pre-training (Table 7)
    torchrun --nproc_per_node=4 selective_mim.py --data cityscapes --data-root data/cityscapes
    python selective_mim.py --resume --out runs/selective_mim-shapes         # continue where it stopped

Shapes: B batch, S copies per image (--samples), C channels, H W height width, L patches, K classes.
Masks are (B, L) bool, True = hidden; pixel masks (B, H, W) the same.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Sampler, Subset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from common import ConfusionMatrix, DatasetError, NORMALIZATION, build_dataset, joint_transform

# --- command line ---

# Table 1: pre-training batch sizes ("smaller than the partition size").
PAPER_PRETRAIN_BATCH = {"voc": 128, "cityscapes": 128, "nassar": 256, "sugarbeets": 64}
# Readers that have an image-only "unlabeled" split (common.py).
UNLABELED_SPLIT_DATASETS = ("shapes", "voc", "cityscapes", "nassar", "sugarbeets")
# Readers without labels: pre-training data only.
IMAGE_ONLY_DATASETS = ("cifar10", "catsdogs")
PAPER_SEEDS = [0, 1234, 3741]
IMAGENET_FILE = "resnet34-b627a593.pth"  # CHOICE C15: torchvision's ResNet34_Weights.IMAGENET1K_V1


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Selective Masking Image Reconstruction pre-training + downstream "
                                                 "segmentation (Wang & Stavness)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="shapes", help="downstream dataset (common.py name); default: synthetic shapes")
    data.add_argument("--data-root", default=None, help="dataset root in its original layout (default ./data/<name>)")
    data.add_argument("--download", action="store_true", help="let torchvision download the datasets it can")
    data.add_argument("--pretrain-data", default=None,
                      help="pre-training dataset; default --data (self-pre-training; another name = cross-pre-training,"
                           " Table 7)")
    data.add_argument("--pretrain-data-root", default=None, help="root of --pretrain-data (default --data-root when "
                                                                 "the two names agree, else ./data/<name>)")
    data.add_argument("--pretrain-split", default=None,
                      help="split used for pre-training; default 'unlabeled' where the reader has it, else 'train' "
                           "(CHOICE C12)")
    data.add_argument("--test-split", default=None,
                      help="downstream split reported as the test result (default 'test' where the reader has it, "
                           "else 'val'); model selection always uses 'val'")
    data.add_argument("--img-size", type=int, default=None, help="square side in px (paper 256; shapes 64)")
    data.add_argument("--limit", type=int, default=None, help="first N images of every split (quick runs)")
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0 = main process)")

    stages = parser.add_argument_group("stages")
    stages.add_argument("--stage", choices=["pretrain", "finetune", "all"], default="all",
                        help="pretrain: reconstruction only; finetune: downstream only; all: both (default)")
    stages.add_argument("--init", choices=["selective", "random", "imagenet", "none"], default=None,
                        help="downstream initialisation (Table 2): selective/random = a pre-trained reconstruction "
                             "model (--stage all: the one just trained, the default; --stage finetune: --pretrained), "
                             "imagenet = torchvision ImageNet ResNet-34 encoder, none = random init")
    stages.add_argument("--pretrained", default=None,
                        help="pretrained.pt of an earlier pre-training run (for --stage finetune --init selective|random)")
    stages.add_argument("--imagenet-weights", default=None,
                        help=f"ImageNet ResNet-34 state dict for --init imagenet (default: the torch hub cache, "
                             f"<TORCH_HOME>/hub/checkpoints/{IMAGENET_FILE}); never downloaded")

    masking = parser.add_argument_group("masking (Sec. 2, 2.1)")
    masking.add_argument("--masking", choices=["selective", "random"], default="selective",
                         help="selective: the method; random: the random-masking baseline (Table 2)")
    masking.add_argument("--partitions", type=int, default=None,
                         help="equal partitions of the pre-training set (paper 10; shapes 3)")
    masking.add_argument("--samples", type=int, default=5,
                         help="randomly masked copies reconstructed per image to score its patches (paper 5, Fig. 2)")
    masking.add_argument("--mask-ratio", type=float, default=0.5,
                         help="fraction of patches hidden, random and selective (paper 0.5, Sec. 2)")
    masking.add_argument("--num-patches", type=int, default=None,
                         help="nominal patches per image (paper 512 -> 441 at 256 px, CHOICE C1; shapes 64)")
    masking.add_argument("--score-aggregation", choices=["hidden-mean", "hidden-sum", "all-sum"],
                         default="hidden-mean",
                         help="how a patch's Eq. (1) losses over the copies are combined (CHOICE C2)")
    masking.add_argument("--ssim-window", type=int, default=3, help="SSIM window of the patch score (paper 3, Eq. 1)")
    masking.add_argument("--msssim-window", type=int, default=None,
                         help="MS-SSIM window of the reconstruction loss (paper 11, Eq. 2; shapes 3, CHOICE C14)")
    masking.add_argument("--val-fraction", type=float, default=0.1,
                         help="share of each partition kept for reconstruction validation (authors 0.1, CHOICE C7)")

    train = parser.add_argument_group("training")
    train.add_argument("--model", choices=sorted(PRESETS), default="resnet34-unet", help="network preset (Sec. 2.2)")
    train.add_argument("--epochs", type=int, default=None, help="pre-training epochs per partition (paper 1000)")
    train.add_argument("--batch-size", type=int, default=None, help="pre-training batch per process (Table 1)")
    train.add_argument("--lr", type=float, default=None, help="pre-training Adam learning rate (authors 3e-3)")
    train.add_argument("--finetune-epochs", type=int, default=None, help="downstream epochs (paper 500)")
    train.add_argument("--finetune-batch-size", type=int, default=None, help="downstream batch per process (paper 8)")
    train.add_argument("--finetune-lr", type=float, default=None, help="downstream Adam learning rate (authors 3e-3)")
    train.add_argument("--warmup-epochs", type=int, default=None,
                       help="linear warm-up epochs of both stages (authors 10; shapes 0, CHOICE C8)")
    train.add_argument("--seed", type=int, default=0, help="seed of pre-training (and of the downstream run when "
                                                           "--seeds is not given for shapes)")
    train.add_argument("--seeds", type=int, nargs="+", default=None,
                       help="downstream seeds, mean and spread reported (paper 0 1234 3741; shapes: --seed)")
    train.add_argument("--lowest-k", type=int, default=6, help="report the k lowest class IoUs (Tables 3-6: 6)")

    system = parser.add_argument_group("system")
    system.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    system.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast (CUDA only; off on CPU)")
    system.add_argument("--compile", action="store_true", help="torch.compile the train_step")
    system.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPU)")
    system.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels (slower); bitwise-repeatable runs on one device")
    system.add_argument("--out", default=None, help="run directory (default runs/selective_mim-<data>)")
    system.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    system.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on the test split and exit")
    system.add_argument("--checkpoint", default=None,
                        help="downstream checkpoint for --eval-only (default <out>/best-seed<first seed>.pt)")
    args = parser.parse_args(argv)

    synthetic = args.data == "shapes"
    args.pretrain_data = args.pretrain_data or args.data
    if args.pretrain_data_root is None and args.pretrain_data == args.data:
        args.pretrain_data_root = args.data_root
    # CHOICE C14: the synthetic preset; real data gets the paper's settings.
    defaults = dict(img_size=64, partitions=3, epochs=3, lr=3e-3, num_patches=64, msssim_window=3, finetune_epochs=20,
                    finetune_batch_size=8, finetune_lr=1e-3, warmup_epochs=0) if synthetic else \
        dict(img_size=256, partitions=10, epochs=1000, lr=3e-3, num_patches=512, msssim_window=11,
             finetune_epochs=500, finetune_batch_size=8, finetune_lr=3e-3, warmup_epochs=10)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.batch_size is None:  # CHOICE C13: Table 1, 64 for the datasets it does not list
        args.batch_size = 8 if synthetic else PAPER_PRETRAIN_BATCH.get(args.pretrain_data, 64)
    if args.seeds is None:
        args.seeds = [args.seed] if synthetic else list(PAPER_SEEDS)
    if args.masking == "random":
        args.partitions = 1  # CHOICE C9
    if args.init is None:  # --stage finetune without --pretrained: no pre-training (Table 2 "None")
        args.init = args.masking if args.stage != "finetune" or args.pretrained else "none"
    args.out = args.out or f"runs/selective_mim-{args.data}"
    # CHOICE C12: the "unlabeled" split where there is one (as the paper, Sec. 2.3), else "train" (never "test").
    args.pretrain_split = args.pretrain_split or (
        "unlabeled" if args.pretrain_data in UNLABELED_SPLIT_DATASETS else "train")

    for flag in ("img_size", "partitions", "epochs", "batch_size", "finetune_epochs", "finetune_batch_size",
                 "samples", "num_patches", "lowest_k"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if args.warmup_epochs < 0:
        parser.error(f"--warmup-epochs must be 0 or more, got {args.warmup_epochs}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of images, got {args.limit}")
    if not 0.0 < args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    if not 0.0 <= args.val_fraction < 0.5:
        parser.error(f"--val-fraction must be in [0, 0.5), got {args.val_fraction}")
    if args.lr <= 0 or args.finetune_lr <= 0:
        parser.error("--lr and --finetune-lr must be positive")
    for flag in ("ssim_window", "msssim_window"):
        if getattr(args, flag) < 1 or getattr(args, flag) % 2 == 0:
            parser.error(f"--{flag.replace('_', '-')} must be an odd positive integer, got {getattr(args, flag)}")
    if (args.msssim_window - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) >= args.img_size:
        parser.error(f"--msssim-window {args.msssim_window} needs images larger than "
                     f"{(args.msssim_window - 1) * 16} px for its 5 scales; raise --img-size or lower --msssim-window")
    grid = patch_grid(args.img_size, args.img_size, args.num_patches)
    if grid.smallest_band < args.ssim_window:
        parser.error(f"--num-patches {args.num_patches} at --img-size {args.img_size} gives {grid.smallest_band}-px "
                     f"patches, smaller than --ssim-window {args.ssim_window}; use fewer patches or larger images")
    if int(grid.num_patches * args.mask_ratio) < 1:
        parser.error(f"--mask-ratio {args.mask_ratio} hides no patch of the {grid.num_patches}-patch grid")
    if args.data in IMAGE_ONLY_DATASETS and args.stage != "pretrain":
        parser.error(f"--data {args.data} has no segmentation labels; use it as --pretrain-data (cross-pre-training) "
                     f"or with --stage pretrain")
    if args.stage == "all" and args.init in ("imagenet", "none"):
        parser.error(f"--init {args.init} skips pre-training: use --stage finetune --init {args.init}")
    if args.stage == "all" and args.init != args.masking:
        parser.error(f"--stage all initialises from the model it pre-trains with --masking {args.masking}; "
                     f"drop --init or use --init {args.masking}")
    if args.stage == "finetune" and args.init in ("selective", "random") and not args.eval_only:
        if args.pretrained is None or not os.path.isfile(args.pretrained):
            parser.error(f"--stage finetune --init {args.init} needs --pretrained PATH, the pretrained.pt of a "
                         f"pre-training run (got {args.pretrained})")
    if args.init == "imagenet" and not args.eval_only:
        args.imagenet_weights = args.imagenet_weights or os.path.join(torch.hub.get_dir(), "checkpoints",
                                                                      IMAGENET_FILE)
        if not os.path.isfile(args.imagenet_weights):
            parser.error(f"--init imagenet: no ImageNet weights at {args.imagenet_weights}; pass --imagenet-weights "
                         f"PATH, or fetch them once with: python -c \"import torchvision; "
                         f"torchvision.models.resnet34(weights='IMAGENET1K_V1')\"")
    if args.eval_only:
        args.checkpoint = args.checkpoint or os.path.join(args.out, f"best-seed{args.seeds[0]}.pt")
        if not os.path.isfile(args.checkpoint):
            parser.error(f"--eval-only: checkpoint {args.checkpoint} does not exist; pass --checkpoint PATH")
    args.patch_grid = f"{grid.rows}x{grid.cols}={grid.num_patches}"  # derived, printed and saved with the run
    return args


# --- masking (Sec. 2, 2.1) ---

@dataclass
class PatchGrid:
    """A grid of rectangular patches: row_bands (H,) and col_bands (W,) hold each pixel row's / column's band."""
    row_bands: torch.Tensor
    col_bands: torch.Tensor
    rows: int
    cols: int

    @property
    def num_patches(self):
        return self.rows * self.cols

    @property
    def smallest_band(self):
        return int(min(torch.bincount(self.row_bands).min(), torch.bincount(self.col_bands).min()))

    def to(self, device):
        return PatchGrid(self.row_bands.to(device), self.col_bands.to(device), self.rows, self.cols)

    def to_pixels(self, mask):
        """(B, L) bool patch mask -> (B, H, W) bool pixel mask, by gathering (no loop)."""
        grid = mask.view(-1, self.rows, self.cols)  # (B, rows, cols)
        return grid[:, self.row_bands][:, :, self.col_bands]  # (B, H, W)


def grid_bands(side, num_patches):
    """Band index of each of `side` pixels along one axis (CHOICE C1, the authors' get_patch_loc)."""
    step = math.ceil(side / math.sqrt(num_patches))
    count, remainder = divmod(side, step)
    if remainder >= step / 2:  # a short last band of its own; a shorter one is merged into the band before it
        count += 1
    return (torch.arange(side) // step).clamp(max=count - 1), count


def patch_grid(height, width, num_patches):
    """The paper's "512 patches" grid for an H x W image: 256 x 256 -> 21 x 21 = 441 patches (Sec. 2)."""
    row_bands, rows = grid_bands(height, num_patches)
    col_bands, cols = grid_bands(width, num_patches)
    return PatchGrid(row_bands, col_bands, rows, cols)


def random_masks(batch_size, num_patches, mask_ratio, generator=None, device=None):
    """(B, L) bool, exactly int(L * mask_ratio) True per row, uniformly at random (Sec. 2; noise + argsort)."""
    num_hidden = int(num_patches * mask_ratio)
    noise = torch.rand(batch_size, num_patches, generator=generator, device=device)  # (B, L)
    hidden_ids = noise.argsort(dim=1)[:, :num_hidden]  # (B, L * ratio)
    mask = torch.zeros(batch_size, num_patches, dtype=torch.bool, device=device)
    return mask.scatter_(1, hidden_ids, True)


def top_patches(scores, mask_ratio):
    """(B, L) float scores -> (B, L) bool hiding the int(L * mask_ratio) highest-scoring patches (Sec. 2.1)."""
    num_hidden = int(scores.shape[1] * mask_ratio)
    hidden_ids = scores.topk(num_hidden, dim=1).indices  # (B, L * ratio)
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, hidden_ids, True)


def apply_mask(images, hidden_pixels):
    """Hidden pixels take the dataset mean colour, i.e. 0 after normalisation (Sec. 2; authors' fill).

    images (B, 3, H, W) normalised float, hidden_pixels (B, H, W) bool -> (B, 3, H, W).
    """
    return images.masked_fill(hidden_pixels[:, None], 0.0)


def partition_indices(num_items, partitions):
    """Strided partitions of range(num_items): disjoint, covering, sizes differ by at most 1 (CHOICE C7)."""
    return [torch.arange(p, num_items, partitions) for p in range(partitions)]


# --- model (Sec. 2.2) ---

# Parameters measured by tests/test_selective_mim.py::test_preset_parameter_counts; the paper gives no count.
PRESETS = {
    "resnet34-unet": dict(encoder="resnet34", decoder_channels=(256, 128, 64, 32, 16)),  # 24.44 M (3 outputs)
    "resnet18-unet": dict(encoder="resnet18", decoder_channels=(256, 128, 64, 32, 16)),  # 14.33 M (3 outputs)
}


class DecoderBlock(nn.Module):
    """Nearest x2 upsampling, concatenation with the encoder skip, two conv3x3-BN-ReLU (CHOICE C10)."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2h, 2w)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


class ResNetUNet(nn.Module):
    """U-Net on a torchvision ResNet encoder: (B, 3, H, W) -> (B, out_channels, H, W), any H, W.

    out_channels = 3 (RGB reconstruction) for pre-training, K for the downstream task; `head` is the last layer,
    the only one not copied from the pre-trained model (Sec. 2.2).
    """

    def __init__(self, out_channels, encoder="resnet34", decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        self.encoder = getattr(torchvision.models, encoder)(weights=None)
        del self.encoder.fc, self.encoder.avgpool  # classification head unused
        skip_channels = (256, 128, 64, 64, 0)  # layer3, layer2, layer1, stem, none (ResNet-18/34 widths)
        in_channels = (512,) + tuple(decoder_channels[:-1])
        self.decoder = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in
                                     zip(in_channels, skip_channels, decoder_channels))
        self.head = nn.Conv2d(decoder_channels[-1], out_channels, 3, padding=1)

    def forward(self, images):
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % 32, -width % 32  # the encoder halves the size 5 times
        x = F.pad(images, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else images
        e = self.encoder
        stem = e.relu(e.bn1(e.conv1(x)))  # (B, 64, H/2, W/2)
        layer1 = e.layer1(e.maxpool(stem))  # (B, 64, H/4, W/4)
        layer2 = e.layer2(layer1)  # (B, 128, H/8, W/8)
        layer3 = e.layer3(layer2)  # (B, 256, H/16, W/16)
        x = e.layer4(layer3)  # (B, 512, H/32, W/32)
        for block, skip in zip(self.decoder, (layer3, layer2, layer1, stem, None)):
            x = block(x, skip)
        return self.head(x)[..., :height, :width]  # (B, out_channels, H, W)


def build_model(out_channels, preset):
    return ResNetUNet(out_channels, **PRESETS[preset])


def transfer_weights(pretrained_state, model):
    """Copy every pre-trained tensor whose name and shape match, except the last layer (Sec. 2.2).

    Returns (copied, total): tensor counts. Raises if anything other than the head failed to match.
    """
    target = model.state_dict()
    copied = {k: v for k, v in pretrained_state.items() if not k.startswith("head.") and k in target
              and v.shape == target[k].shape}
    missing = [k for k in target if not k.startswith("head.") and k not in copied]
    if missing:
        raise ValueError(f"pre-trained weights lack {len(missing)} tensors of the model, e.g. {missing[:3]}; "
                         f"was it pre-trained with the same --model?")
    model.load_state_dict(copied, strict=False)
    return len(copied), len(target)


def load_imagenet_encoder(model, path):
    """torchvision ImageNet ResNet weights into model.encoder (the fc layer is dropped). Returns the tensor count."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not match the {type(model.encoder).__name__} encoder (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}); pass the ResNet's own ImageNet weights")
    return len(state)


# --- losses (Eq. 1, Eq. 2, Sec. 2.4) ---

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, the standard 5 scales
IMAGENET_MEAN, IMAGENET_STD = NORMALIZATION["imagenet"]


def to_unit(images):
    """ImageNet-normalised (B, 3, H, W) -> [0, 1] pixel space, differentiable, not clamped (CHOICE C3)."""
    mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return images * std + mean


def gaussian_window(size, sigma=1.5, device=None, dtype=torch.float32):
    """(size,) normalised 1-D Gaussian; the 2-D window is its outer product."""
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    window = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def gaussian_filter(x, window):
    """Valid (unpadded) separable Gaussian filter of every channel: (N, C, H, W) -> (N, C, H-w+1, W-w+1)."""
    channels = x.shape[1]
    x = F.conv2d(x, window.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(x, window.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def ssim_maps(x, y, window_size, data_range=1.0, k1=0.01, k2=0.03):
    """SSIM and contrast-structure maps (Wang et al. 2004) with a Gaussian window (sigma 1.5), valid positions.

    x, y (N, C, H, W) float in [0, data_range] -> ssim, cs, each (N, C, H-w+1, W-w+1).
    """
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    channels = x.shape[1]
    window = gaussian_window(window_size, device=x.device, dtype=x.dtype)
    # One grouped filter for the five local moments instead of five calls.
    moments = gaussian_filter(torch.cat([x, y, x * x, y * y, x * y], dim=1), window)  # (N, 5C, h, w)
    mu_x, mu_y, xx, yy, xy = moments.split(channels, dim=1)
    var_x, var_y, cov = xx - mu_x ** 2, yy - mu_y ** 2, xy - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return ssim, cs


def ms_ssim(x, y, window_size=11, weights=MS_SSIM_WEIGHTS, data_range=1.0):
    """Multi-scale SSIM (Wang et al. 2003), per image: x, y (N, C, H, W) in [0, data_range] -> (N,) (CHOICE C4)."""
    levels = []
    for level in range(len(weights)):
        ssim, cs = ssim_maps(x, y, window_size, data_range)
        if level == len(weights) - 1:
            levels.append(ssim.flatten(2).mean(-1))  # (N, C)
        else:
            levels.append(cs.flatten(2).mean(-1))  # (N, C)
            padding = (x.shape[2] % 2, x.shape[3] % 2)
            x, y = F.avg_pool2d(x, 2, padding=padding), F.avg_pool2d(y, 2, padding=padding)
    levels = torch.stack(levels).clamp_min(1e-6)  # (5, N, C)
    exponents = torch.tensor(weights, device=x.device, dtype=x.dtype).view(-1, 1, 1)
    return (levels ** exponents).prod(0).mean(1)


def reconstruction_loss(reconstructions, images, window_size=11):
    """Eq. (2): L = (1 - MS-SSIM) + L1 over the whole image (CHOICE C5), in [0, 1] pixel space (CHOICE C3).

    reconstructions, images (B, 3, H, W) ImageNet-normalised float -> scalar.
    """
    reconstructions, images = to_unit(reconstructions.float()), to_unit(images.float())
    # Eq. (2): L = (1 - MS-SSIM(z, y)) + L1(z, y)
    return (1 - ms_ssim(reconstructions, images, window_size)).mean() + (reconstructions - images).abs().mean()


def score_patches(reconstructions, images, grid, window_size=3):
    """Eq. (1) for every patch at once: (1 - SSIM) + L1 as if each patch were cropped out and scored alone.

    reconstructions, images (N, 3, H, W) in [0, 1]; grid: the PatchGrid of H x W -> (N, L) float.
    Patch sums come from band-indicator matrices (the grid is separable): sum over a patch = R^T X C. An SSIM
    window belongs to a patch when its first and last rows and columns fall in the same band, exactly the valid
    windows of the cropped patch.
    """
    w = window_size
    rows = F.one_hot(grid.row_bands, grid.rows).to(images.dtype)  # (H, rows)
    cols = F.one_hot(grid.col_bands, grid.cols).to(images.dtype)  # (W, cols)
    l1_map = (reconstructions - images).abs().mean(1)  # (N, H, W)
    l1 = torch.einsum("nhw,hr,wc->nrc", l1_map, rows, cols) / torch.outer(rows.sum(0), cols.sum(0))
    ssim_map = ssim_maps(reconstructions, images, w)[0].mean(1)  # (N, H-w+1, W-w+1)
    window_rows = rows[:-w + 1] * rows[w - 1:] if w > 1 else rows  # (H-w+1, rows): 1 where the window stays in a band
    window_cols = cols[:-w + 1] * cols[w - 1:] if w > 1 else cols
    ssim = torch.einsum("nhw,hr,wc->nrc", ssim_map, window_rows, window_cols) / torch.outer(
        window_rows.sum(0), window_cols.sum(0))
    # Eq. (1): L_i(n) = (1 - SSIM(M_i^n, I^n)) + L1(M_i^n, I^n)
    return ((1 - ssim) + l1).flatten(1)  # (N, L)


def jaccard_loss(logits, labels, ignore_index=255, smooth=1e-3):
    """Multi-class soft Jaccard loss (Sec. 2.4, CHOICE C11): logits (B, K, H, W), labels (B, H, W) -> scalar."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1).flatten(2)  # (B, K, HW)
    labels = labels.flatten(1)  # (B, HW)
    valid = labels != ignore_index
    probs = probs * valid[:, None]
    targets = F.one_hot(labels.masked_fill(~valid, 0), num_classes).transpose(1, 2) * valid[:, None]  # (B, K, HW)
    intersection = (probs * targets).sum((0, 2))  # (K,)
    union = (probs + targets).sum((0, 2)) - intersection
    loss = 1 - (intersection + smooth) / (union + smooth).clamp_min(1e-7)
    return (loss * (targets.sum((0, 2)) > 0)).mean()  # classes absent from the batch contribute 0


# --- selective masking (Sec. 2.1, Fig. 2) ---

@torch.no_grad()
def selective_masks(model, images, grid, samples=5, mask_ratio=0.5, generator=None, aggregation="hidden-mean",
                    ssim_window=3, amp=False):
    """Score every patch with the current model and hide the hardest ones (Fig. 2).

    images (B, 3, H, W) normalised canvas images; the model is used as it is (call model.eval() first). All S
    copies of the batch go through the model in one forward pass. Returns scores (B, L) float and mask (B, L).
    """
    batch, num_patches = images.shape[0], grid.num_patches
    copies = images.repeat_interleave(samples, dim=0)  # (B*S, 3, H, W), copies of an image are adjacent
    copy_masks = random_masks(batch * samples, num_patches, mask_ratio, generator, images.device)  # (B*S, L)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        reconstructions = model(apply_mask(copies, grid.to_pixels(copy_masks)))
    losses = score_patches(to_unit(reconstructions.float()), to_unit(copies), grid, ssim_window)
    losses, copy_masks = losses.view(batch, samples, num_patches), copy_masks.view(batch, samples, num_patches)
    # CHOICE C2: L(n) aggregated over the copies i, sum_i L_i(n) restricted to / averaged over the hidden copies.
    if aggregation == "all-sum":
        scores = losses.sum(1)
    else:
        scores = (losses * copy_masks).sum(1)  # (B, L)
        if aggregation == "hidden-mean":
            scores = scores / copy_masks.sum(1).clamp_min(1)
    return scores, top_patches(scores, mask_ratio)


# --- data ---

def identity(image):
    return image


class PretrainImages(Dataset):
    """Pre-training view of image-only `base` items `indices`: each image resized to the canvas (CHOICE C6).

    Items: (image (3, H, W) ImageNet-normalised, hidden (H, W) bool). `masks` (N, L) bool are the partition's
    selective masks (or fixed validation masks), rendered on the canvas and cropped/flipped with the image when
    `augment`; without masks `hidden` is all False and the training loop draws random masks on the device.
    """

    def __init__(self, base, indices, size, grid, masks=None, augment=False):
        self.base, self.indices, self.size, self.grid, self.masks = base, list(map(int, indices)), size, grid, masks
        # Sec. 2.4: horizontal flip, colour jitter, random crop; jitter 0.2 and crop scale 0.25-1 as the authors.
        self.transform = joint_transform(size, crop_scale=(0.25, 1.0), hflip=True, color_jitter=0.2) if augment \
            else joint_transform()

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, index):
        image = TF.resize(self.base[self.indices[index]], [self.size, self.size], antialias=True)
        if self.masks is None:
            hidden = torch.zeros(self.size, self.size, dtype=torch.uint8)
        else:
            hidden = self.grid.to_pixels(self.masks[index][None])[0].to(torch.uint8)
        image, hidden = self.transform(image, tv_tensors.Mask(hidden))
        return image, hidden.bool()


def build_pretrain_base(args):
    base, _ = build_dataset(args.pretrain_data, args.pretrain_data_root, args.pretrain_split, transform=identity,
                            image_only=True, download=args.download, limit=args.limit, seed=args.seed,
                            image_size=args.img_size)
    return base


def build_finetune_loaders(args, rank, world):
    """Labelled train (augmented), val and test loaders of --data at --img-size (CHOICE C12)."""
    size = args.img_size
    options = dict(download=args.download, limit=args.limit, seed=args.seed, image_size=size)
    train_transform = joint_transform(size, crop_scale=(0.25, 1.0), hflip=True, color_jitter=0.2)  # Sec. 2.4
    train_set, info = build_dataset(args.data, args.data_root, "train", transform=train_transform, **options)
    eval_transform = joint_transform(size)
    val_set, _ = build_dataset(args.data, args.data_root, "val", transform=eval_transform, **options)
    test_split = args.test_split or ("test" if "test" in info.splits else "val")
    test_set, _ = build_dataset(args.data, args.data_root, test_split, transform=eval_transform, **options)
    train_loader = make_loader(train_set, args.finetune_batch_size, args, world, train=True)
    val_loader = make_loader(Subset(val_set, range(rank, len(val_set), world)), args.finetune_batch_size, args, world)
    test_loader = make_loader(Subset(test_set, range(rank, len(test_set), world)), args.finetune_batch_size, args,
                              world)
    return train_loader, val_loader, test_loader, info


class SeededSampler(Sampler):
    """Yields (index, seed) pairs: each training sample's augmentation is seeded by (epoch seed, index).

    So the crops, flips and jitter do not depend on which worker loads a sample, and a resumed run repeats them
    exactly, persistent workers included. `sampler` (RandomSampler with a generator, or DistributedSampler) sets
    the order; set_epoch reseeds both.
    """

    def __init__(self, sampler):
        self.sampler, self.epoch_seed = sampler, 0

    def set_epoch(self, epoch_seed):
        self.epoch_seed = epoch_seed
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch_seed % 2 ** 31)
        else:
            self.sampler.generator.manual_seed(epoch_seed)

    def __iter__(self):
        for index in self.sampler:
            yield index, derive_seed(self.epoch_seed, index)

    def __len__(self):
        return len(self.sampler)


class SeededItems(Dataset):
    """dataset[index] with torch's CPU generator (the one torchvision's transforms draw from) seeded first."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


def make_loader(dataset, batch_size, args, world, train=False):
    """DataLoader. Training loaders shuffle and seed every sample through SeededSampler (call set_epoch)."""
    sampler = None
    if train:
        order = DistributedSampler(dataset, shuffle=True) if world > 1 else \
            RandomSampler(dataset, generator=torch.Generator())
        dataset, sampler = SeededItems(dataset), SeededSampler(order)
    return DataLoader(dataset, batch_size=min(batch_size, len(dataset)) if train else batch_size, sampler=sampler,
                      num_workers=args.workers, pin_memory=args.device == "cuda",  # asynchronous copies to the GPU
                      persistent_workers=args.workers > 0,  # workers survive between epochs
                      drop_last=train and len(dataset) > batch_size * world)


# --- loops ---

def train_step(model, optimizer, inputs, targets, loss_fn, amp):
    """One optimisation step: forward under bf16 autocast (CUDA), loss in float32, backward, Adam."""
    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = model(inputs)
    loss = loss_fn(outputs.float(), targets)
    optimizer.zero_grad(set_to_none=True)  # frees the gradients instead of zero-filling them
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(stage, model, loader, optimizer, step_fn, loss_fn, args, device, grid=None, random_masking=False,
                    generator=None):
    """One epoch of either stage. pretrain: batches (images, hidden) -> reconstruct the masked images (Eq. 2);
    with random_masking the masks are drawn on the device here. finetune: batches (images, labels), Jaccard loss.
    loss_fn(outputs, targets) is created once per run, so that a compiled train_step is not recompiled."""
    model.train()
    amp = args.amp and device.type == "cuda"
    loss_sum, seen = torch.zeros((), device=device), 0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if stage == "pretrain":
            hidden = targets  # (B, H, W): the selective masks of the partition, cropped with the image
            if random_masking:
                mask = random_masks(images.shape[0], grid.num_patches, args.mask_ratio, generator, device)
                hidden = grid.to_pixels(mask)
            inputs, targets = apply_mask(images, hidden), images
        else:
            inputs = images
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        loss = step_fn(model, optimizer, inputs, targets, loss_fn, amp)
        loss_sum += loss * images.shape[0]
        seen += images.shape[0]
    totals = torch.stack([loss_sum, torch.tensor(float(seen), device=device)])
    all_reduce_sum(totals)
    return (totals[0] / totals[1].clamp_min(1)).item(), int(totals[1].item())  # sync point


@torch.no_grad()
def evaluate(stage, model, loader, device, args, num_classes=None):
    """pretrain: mean reconstruction loss (Eq. 2) and MS-SSIM of the masked validation images (Table 8).
    finetune: ConfusionMatrix metrics (mIoU, per-class IoU, pixel accuracy). Pass the unwrapped model: each rank
    evaluates its own shard without DDP collectives, and the totals are summed over the ranks."""
    model.eval()
    amp = args.amp and device.type == "cuda"
    if stage == "pretrain":
        totals = torch.zeros(3, device=device)
        for images, hidden in loader:
            images, hidden = images.to(device, non_blocking=True), hidden.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                outputs = model(apply_mask(images, hidden)).float()
            loss = reconstruction_loss(outputs, images, args.msssim_window)
            similarity = ms_ssim(to_unit(outputs), to_unit(images), args.msssim_window).mean()
            totals += torch.stack([loss * len(images), similarity * len(images), loss.new_tensor(float(len(images)))])
        all_reduce_sum(totals)
        totals = totals.tolist()  # sync point
        return {"rec_loss": totals[0] / max(totals[2], 1), "ms_ssim": totals[1] / max(totals[2], 1)}
    confusion = ConfusionMatrix(num_classes, device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)
        confusion.update(logits.argmax(1), labels)
    metrics = confusion.all_reduce().compute()  # sync point
    truth = confusion.matrix.sum(1).double()
    # Chance: predicting the most frequent class everywhere gives IoU = its pixel share for it, 0 for the others.
    metrics["chance_miou"] = float(truth.max() / truth.sum() / (truth > 0).sum()) if truth.sum() > 0 else float("nan")
    return metrics


def warmup_cosine(epochs, warmup_epochs):
    """Per-epoch LR factor: linear 1 % -> 100 % over the warm-up, then cosine down to 1 % (CHOICE C8)."""
    def factor(epoch):
        if epoch < warmup_epochs:
            return 0.01 + 0.99 * epoch / warmup_epochs
        progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model, lr, epochs, args):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs, min(args.warmup_epochs, epochs - 1)))
    return optimizer, scheduler


# --- plumbing ---

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def derive_seed(*parts):
    """A stable 60-bit seed from any tuple (e.g. (seed, "pretrain", partition, epoch, rank))."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:15], 16)


def all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def setup_distributed(args):
    """-> (rank, world_size, device). torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; nccl on CUDA, gloo on CPU."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA device is available; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, device = 0, torch.device(args.device)
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank = dist.get_rank()
        if args.device == "cuda":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fastest conv algorithms for the fixed input size
    return rank, world, device


def unwrap(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def rng_states():
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, state):
    """Write to a temporary file, then os.replace: a crash never leaves a half-written checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    # weights_only=False: our checkpoints hold RNG states and args; only load checkpoints you wrote.
    return torch.load(path, map_location="cpu", weights_only=False)


class RunLog:
    """Prints `key=value` lines and appends the same records to metrics.jsonl (rank 0 only)."""

    def __init__(self, out, rank):
        self.path, self.rank = os.path.join(out, "metrics.jsonl"), rank

    def __call__(self, record):
        if self.rank != 0:
            return
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def save_samples(path, rows):
    """rows: list of (N, 3, H, W) tensors in [0, 1] -> one PNG grid, one row per tensor."""
    torchvision.utils.save_image(torch.cat([r.float().cpu().clamp(0, 1) for r in rows]), path, nrow=len(rows[0]),
                                 padding=2, pad_value=1.0)


def colorize(labels, palette):
    """(N, H, W) int64 class ids (255 = ignore, white) -> (N, 3, H, W) in [0, 1]."""
    table = torch.tensor(list(palette) + [(255, 255, 255)] * (256 - len(palette)), dtype=torch.float32) / 255
    return table[labels.cpu().clamp(0, 255)].permute(0, 3, 1, 2)


# --- stages ---

def score_partition(model, base, indices, grid, args, partition, rank, world, device):
    """Selective masks (N, L) of the images `indices` with `model`, sharded over ranks and gathered (Sec. 2.1)."""
    count = len(indices)
    shard = list(range(rank, count + (-count % world), world))  # padded so that every rank scores the same number
    dataset = PretrainImages(base, [indices[i % count] for i in shard], args.img_size, grid)
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,  # x samples per forward pass
                        pin_memory=device.type == "cuda")
    generator = torch.Generator(device=device).manual_seed(derive_seed(args.seed, "score", partition, rank))
    model.eval()
    masks, scores = [], []
    for images, _ in loader:
        batch_scores, batch_masks = selective_masks(model, images.to(device, non_blocking=True), grid, args.samples,
                                                    args.mask_ratio, generator, args.score_aggregation,
                                                    args.ssim_window, args.amp and device.type == "cuda")
        masks.append(batch_masks)
        scores.append(batch_scores)
    masks, scores = torch.cat(masks), torch.cat(scores)  # (shard, L)
    if world > 1:
        gathered = [torch.zeros_like(masks, dtype=torch.uint8) for _ in range(world)]
        dist.all_gather(gathered, masks.to(torch.uint8))
        masks = torch.stack(gathered, dim=1).flatten(0, 1).bool()  # back to item order: item k*world + r
    return masks[:count].cpu(), scores.mean().item()  # sync point (mean score of this rank's shard)


def pretrain(args, state, rank, world, device, log, step_fn):
    """Reconstruction pre-training over the partitions (Fig. 1). Writes <out>/pretrained.pt; returns its summary."""
    base = build_pretrain_base(args)
    grid = patch_grid(args.img_size, args.img_size, args.num_patches)
    device_grid = grid.to(device)
    partitions = partition_indices(len(base), args.partitions)
    seed_everything(args.seed)  # identical initial weights on every rank
    model = build_model(3, args.model).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    start_partition, start_epoch, masks = 0, 0, None
    if state is not None:
        unwrap(model).load_state_dict(state["model"])
        start_partition, start_epoch, masks = state["partition"], state["epoch"], state["masks"]
        if start_epoch >= args.epochs:  # that partition had finished: go on with the next one
            start_partition, start_epoch, masks = start_partition + 1, 0, None
    ddp_model = DistributedDataParallel(model) if world > 1 else model
    loss_fn = functools.partial(reconstruction_loss, window_size=args.msssim_window)  # Eq. (2)
    summary = {}
    if rank == 0:
        print(f"pre-training on {args.pretrain_data}/{args.pretrain_split}: {len(base)} images, {args.partitions} "
              f"partition(s) of ~{len(partitions[0])}, patch grid {args.patch_grid} (nominal {args.num_patches})")
    for partition in range(start_partition, args.partitions):
        indices = partitions[partition].tolist()
        num_val = int(round(len(indices) * args.val_fraction))
        train_ids, val_ids = indices[:len(indices) - num_val], indices[len(indices) - num_val:]
        selective = args.masking == "selective" and partition > 0
        if masks is None:  # a new partition: its masks (selective: scored by the model of partition - 1)
            masks = {"train": None, "val": random_masks(len(val_ids), grid.num_patches, args.mask_ratio,
                                                        torch.Generator().manual_seed(derive_seed(args.seed, "val",
                                                                                                  partition)))}
            if selective:
                start = time.time()
                partition_masks, mean_score = score_partition(unwrap(model), base, indices, grid, args, partition,
                                                              rank, world, device)
                # DEVIATION: the masks stay exact bool tensors (memory + checkpoint) because the authors' JPEG copies
                # of the masked images blur the hidden patches' edges.
                masks = {"train": partition_masks[:len(train_ids)], "val": partition_masks[len(train_ids):]}
                seconds = time.time() - start
                log({"stage": "score", "partition": partition, "images": len(indices), "copies": args.samples,
                     "hidden_per_image": int(partition_masks.sum(1).float().mean()), "mean_score": mean_score,
                     "images_per_s": len(indices) / seconds, "time_s": seconds})
        train_set = PretrainImages(base, train_ids, args.img_size, grid, masks["train"], augment=True)
        val_set = PretrainImages(base, val_ids, args.img_size, grid, masks["val"])
        train_loader = make_loader(train_set, args.batch_size, args, world, train=True)
        val_loader = make_loader(Subset(val_set, range(rank, len(val_set), world)), args.batch_size, args, world) \
            if len(val_set) else None
        optimizer, scheduler = make_optimizer(ddp_model, args.lr, args.epochs, args)  # CHOICE C8: fresh per partition
        if state is not None and partition == state["partition"] and start_epoch > 0:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_states(state["rng"])
        generator = torch.Generator(device=device)
        for epoch in range(start_epoch, args.epochs):
            generator.manual_seed(derive_seed(args.seed, "masks", partition, epoch, rank))  # a mask seed per rank
            train_loader.sampler.set_epoch(derive_seed(args.seed, "data", partition, epoch))
            start = time.time()
            loss, seen = train_one_epoch("pretrain", ddp_model, train_loader, optimizer, step_fn, loss_fn, args, device,
                                         device_grid, random_masking=not selective, generator=generator)
            seconds = time.time() - start
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            val = evaluate("pretrain", model, val_loader, device, args) if val_loader is not None else \
                {"rec_loss": float("nan"), "ms_ssim": float("nan")}
            log({"stage": "pretrain", "partition": partition, "masking": "selective" if selective else "random",
                 "epoch": epoch + 1, "rec_loss": loss, "val_rec_loss": val["rec_loss"], "val_ms_ssim": val["ms_ssim"],
                 "lr": lr, "images_per_s": seen / seconds, "time_s": seconds})
            summary = {"partition": partition, "rec_loss": loss, "val_rec_loss": val["rec_loss"],
                       "val_ms_ssim": val["ms_ssim"]}
            if rank == 0:
                save_checkpoint(os.path.join(args.out, "last.pt"), {
                    "stage": "pretrain", "partition": partition, "epoch": epoch + 1, "masks": masks,
                    "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "args": vars(args), "rng": rng_states()})
        if rank == 0:
            save_pretrain_samples(os.path.join(args.out, "samples", f"pretrain-partition{partition}.png"),
                                  unwrap(model), base, train_ids[:8], grid, masks["train"], args, partition, device)
        start_epoch, masks, state = 0, None, None
    summary.update(masking=args.masking, partitions=args.partitions, patch_grid=args.patch_grid)
    if rank == 0:
        save_checkpoint(os.path.join(args.out, "pretrained.pt"), {
            "model": unwrap(model).state_dict(), "masking": args.masking, "preset": args.model, "summary": summary,
            "args": vars(args)})
    if world > 1:
        dist.barrier()
    return summary


@torch.no_grad()
def save_pretrain_samples(path, model, base, indices, grid, train_masks, args, partition, device):
    """Rows (paper Fig. 3-5): original, random mask, selective mask (selective partitions), reconstruction."""
    images = torch.stack([PretrainImages(base, [i], args.img_size, grid)[0][0] for i in indices]).to(device)
    generator = torch.Generator(device=device).manual_seed(derive_seed(args.seed, "samples", partition))
    grid = grid.to(device)
    random_hidden = grid.to_pixels(random_masks(len(images), grid.num_patches, args.mask_ratio, generator, device))
    rows = [images, apply_mask(images, random_hidden)]
    hidden = random_hidden
    if train_masks is not None:  # the first images of the partition are its first training images
        hidden = grid.to_pixels(train_masks[:len(images)].to(device))
        rows.append(apply_mask(images, hidden))
    model.eval()
    rows.append(model(apply_mask(images, hidden)).float())
    save_samples(path, [to_unit(r) for r in rows])


def finetune(args, state, rank, world, device, log, step_fn):
    """Downstream segmentation for every seed in --seeds (Sec. 2.4); returns the per-seed test results."""
    train_loader, val_loader, test_loader, info = build_finetune_loaders(args, rank, world)
    num_classes = info.num_classes
    pretrained = None
    if args.init in ("selective", "random"):
        path = args.pretrained or os.path.join(args.out, "pretrained.pt")
        pretrained = load_checkpoint(path)
        if pretrained["masking"] != args.init:
            sys.exit(f"error: {path} was pre-trained with --masking {pretrained['masking']}, not {args.init}; "
                     f"pass --init {pretrained['masking']} or another --pretrained")
    finished = state["finished"] if state else []
    for seed_index in range(len(finished), len(args.seeds)):
        seed = args.seeds[seed_index]
        seed_everything(seed)  # identical initial weights on every rank; the head's init depends on the seed
        model = build_model(num_classes, args.model)
        if pretrained is not None:
            copied, total = transfer_weights(pretrained["model"], model)
            if rank == 0:
                print(f"seed {seed}: copied {copied} of {total} pre-trained tensors ({args.init} masking); only the "
                      f"last layer (head) starts fresh")
        elif args.init == "imagenet":
            copied = load_imagenet_encoder(model, args.imagenet_weights)
            if rank == 0:
                print(f"seed {seed}: ImageNet encoder, {copied} tensors from {args.imagenet_weights}")
        model = model.to(device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        ddp_model = DistributedDataParallel(model) if world > 1 else model
        optimizer, scheduler = make_optimizer(ddp_model, args.finetune_lr, args.finetune_epochs, args)
        start_epoch, best = 0, -1.0
        if state is not None and state["seed_index"] == seed_index:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            set_rng_states(state["rng"])
            start_epoch, best = state["epoch"], state["best"]
        best_path = os.path.join(args.out, f"best-seed{seed}.pt")
        for epoch in range(start_epoch, args.finetune_epochs):
            train_loader.sampler.set_epoch(derive_seed(seed, "data", epoch))
            start = time.time()
            loss, seen = train_one_epoch("finetune", ddp_model, train_loader, optimizer, step_fn, jaccard_loss, args,
                                         device)
            seconds = time.time() - start
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            val = evaluate("finetune", model, val_loader, device, args, num_classes)
            log({"stage": "finetune", "seed": seed, "epoch": epoch + 1, "loss": loss, "val_miou": val["miou"],
                 "val_pixel_acc": val["pixel_acc"], "lr": lr, "images_per_s": seen / seconds, "time_s": seconds})
            if rank == 0:
                if val["miou"] > best:
                    best = val["miou"]
                    save_checkpoint(best_path, {"model": model.state_dict(), "epoch": epoch + 1, "val_miou": best,
                                                "num_classes": num_classes, "preset": args.model, "seed": seed,
                                                "args": vars(args)})
                save_checkpoint(os.path.join(args.out, "last.pt"), {
                    "stage": "finetune", "seed_index": seed_index, "epoch": epoch + 1, "best": best,
                    "finished": finished, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "args": vars(args), "rng": rng_states()})
        if world > 1:
            dist.barrier()
        model.load_state_dict(load_checkpoint(best_path)["model"])  # the best epoch by val mIoU
        test = evaluate("finetune", model, test_loader, device, args, num_classes)
        finished = finished + [{"seed": seed, "best_val_miou": best, **test}]
        log({"stage": "test", "seed": seed, "miou": test["miou"], "pixel_acc": test["pixel_acc"],
             "chance_miou": test["chance_miou"]})
        if rank == 0:
            save_finetune_samples(os.path.join(args.out, "samples", f"finetune-seed{seed}.png"), model, test_loader,
                                  info, device)
        state = None
    return summarize_seeds(finished, info.class_names, args.lowest_k)


def summarize_seeds(runs, class_names, lowest_k):
    """Mean and spread over the seeds of the test mIoU and class IoUs; the lowest-k classes (Tables 2-6)."""
    mious = np.array([r["miou"] for r in runs])
    per_class = np.array([r["per_class_iou"] for r in runs], dtype=float)  # (seeds, K)
    with warnings.catch_warnings():  # a class absent from the test split is nan in every seed
        warnings.simplefilter("ignore", RuntimeWarning)
        class_mean = np.nanmean(per_class, axis=0)
        class_std = np.nanstd(per_class, axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(class_mean)
    order = [int(i) for i in np.argsort(np.nan_to_num(class_mean, nan=np.inf))][:lowest_k]
    return {
        "seeds": [r["seed"] for r in runs], "runs": runs,
        "test_miou_mean": float(mious.mean()), "test_miou_std": float(mious.std(ddof=1)) if len(runs) > 1 else 0.0,
        "per_class_iou_mean": {name: float(v) for name, v in zip(class_names, class_mean)},
        "lowest_classes": [{"class": class_names[i], "iou_mean": float(class_mean[i]),
                            "iou_std": float(class_std[i])}
                           for i in order],
        "chance_miou": runs[0]["chance_miou"],
    }


@torch.no_grad()
def save_finetune_samples(path, model, loader, info, device, count=8):
    """Rows: input, prediction, ground truth (palette colours; ignore = white)."""
    images, labels = next(iter(loader))
    images, labels = images[:count].to(device), labels[:count]
    model.eval()
    predictions = model(images).argmax(1).cpu()
    save_samples(path, [to_unit(images), colorize(predictions, info.palette), colorize(labels, info.palette)])


def main(args):
    rank, world, device = setup_distributed(args)
    log = RunLog(args.out, rank)
    if args.eval_only:
        checkpoint = load_checkpoint(args.checkpoint)
        _, _, test_loader, info = build_finetune_loaders(args, rank, world)
        model = build_model(info.num_classes, checkpoint.get("preset", args.model))
        model.load_state_dict(checkpoint["model"])
        metrics = evaluate("finetune", model.to(device), test_loader, device, args, info.num_classes)
        if rank == 0:
            print(json.dumps({"checkpoint": args.checkpoint, **metrics}))
        return metrics
    last = os.path.join(args.out, "last.pt")
    state = None
    if args.resume:
        if not os.path.isfile(last):
            sys.exit(f"error: --resume but {last} does not exist; start a new run without --resume or fix --out")
        state = load_checkpoint(last)
    elif os.path.isdir(args.out) and os.listdir(args.out):
        sys.exit(f"error: run directory {args.out} exists; pass --resume to continue it or choose another --out")
    if world > 1:
        dist.barrier()  # every rank has checked the run directory before rank 0 creates it
    if rank == 0:
        os.makedirs(os.path.join(args.out, "samples"), exist_ok=True)
        config = {k: v for k, v in vars(args).items()}
        print("config: " + json.dumps(config))
        with open(os.path.join(args.out, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    step_fn = torch.compile(train_step) if args.compile else train_step
    results = {}
    if args.stage in ("pretrain", "all"):
        if state is None or state["stage"] == "pretrain":
            results["pretrain"] = pretrain(args, state, rank, world, device, log, step_fn)
            state = None
        else:  # resuming in the downstream stage: pre-training had finished
            results["pretrain"] = load_checkpoint(os.path.join(args.out, "pretrained.pt"))["summary"]
    if args.stage in ("finetune", "all"):
        results["finetune"] = finetune(args, state if state and state["stage"] == "finetune" else None, rank, world,
                                       device, log, step_fn)
    if rank == 0:
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        if "finetune" in results:
            r = results["finetune"]
            print(f"test mIoU {r['test_miou_mean']:.4f} +- {r['test_miou_std']:.4f} over seeds {r['seeds']} "
                  f"(chance {r['chance_miou']:.4f}); lowest classes: " +
                  ", ".join(f"{c['class']} {c['iou_mean']:.3f}" for c in r["lowest_classes"]))
    if world > 1:
        dist.destroy_process_group()
    return results


if __name__ == "__main__":
    try:
        main(get_args())
    except DatasetError as e:
        sys.exit(f"error: {e}")
