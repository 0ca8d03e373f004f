"""SimCLR pre-training + U-Net fine-tuning for foreground/background segmentation (Oxford-IIIT Pet).

"Semantic Segmentation of Images using Self-supervised Learning" (anonymous UCL project report; the authors' code is
RoboRabbit666/simclr-semantic-segmentation), built on SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework
for Contrastive Learning of Visual Representations", ICML 2020, https://proceedings.mlr.press/v119/chen20j.html.

A ResNet-50 encoder with a two-layer MLP projection head is pre-trained without labels: two random augmentations of
each image are pulled together and pushed away from every other image of the batch by the NT-Xent loss (Eq. 2.1).
The encoder's weights are then transferred into a U-Net (the ResNet-50 as its encoder, a U-Net decoder on its
feature maps), which is fine-tuned with BCE on Pet foreground masks and compared with the same U-Net trained from
scratch, for development sets of 80, 50 and 20 % of the data (Table 4.1).

Implemented (component -> function -> paper place)
    two augmented views (crop, flip, colour, grey, blur) -> simclr_augmentation, TwoViews -> Sec. 2.1 (1)
    ResNet encoder (torchvision resnet50, fc removed)    -> ResNetEncoder             -> Sec. 2.1 (2)
    projection head Linear-ReLU-Linear, 2048->512->128   -> ProjectionHead            -> Sec. 2.1 (3)
    NT-Xent on L2-normalised projections, temperature    -> nt_xent_loss              -> Sec. 2.1 (4), Eq. (2.1)
    negatives from every DDP rank, with gradients        -> gather_with_grad          -> (SimCLR's global batch)
    load the pre-trained encoder, strict by name         -> transfer_encoder_weights  -> Sec. 2.2 step (1)
    U-Net decoder on the ResNet feature maps, 1 logit    -> UNetDecoder, SimCLRUNet   -> Sec. 2.2 step (2)
    BCE (Dice, Focal: the authors' code) + Adam 1e-4     -> segmentation_loss, build_optimizer -> Sec. 2.2 step (3)
    keep the weights of the lowest validation loss       -> fit (--select-by)         -> Sec. 2.2 step (4)
    test IoU, F1, Dice, Focal, BCE, recall, accuracy     -> evaluate, table_row       -> Sec. 2.2 step (5), Table 4.1
    fixed 20 % test, dev 80/50/20 %, train/val 90/10     -> pet_splits                -> Sec. 3.1
    baseline / CIFAR / Pet x dev 20/50/80 grid           -> run_table41               -> Sec. 3.1-3.2, Table 4.1
    ImageNet-initialised backbone (report: "pre-trained ResNet-50") -> --init / --pretrain-init imagenet

Choices (the paper is silent or vague; grep "CHOICE C")
    C1  Pre-training starts from random weights, as the authors' code does (`pretrained=False`); the report's
        "pre-trained ResNet-50 model as the backbone" is available as --pretrain-init imagenet.
    C2  Augmentation = SimCLR v1's recipe: RandomResizedCrop scale 0.08-1 (aspect 3/4-4/3), horizontal flip,
        colour jitter (0.8 s, 0.8 s, 0.8 s, 0.2 s) with p = 0.8, grayscale p = 0.2, Gaussian blur with an odd kernel
        of about 10 % of the image side (23 at 224) and sigma in [0.1, 2] with p = 0.5; s = 1.0 (authors' config).
        Every item's views are drawn from a generator seeded by (seed, epoch, index).
    C3  NT-Xent on L2-normalised projections (the authors' code forgets the normalisation), temperature 0.1
        (authors' config). Both views of the batch go through the encoder as one batch of 2B, as SimCLR does.
    C4  Pre-training optimiser: LARS, lr 0.3, momentum 0.9, trust coefficient 0.001, weight decay 1e-6, biases and
        BatchNorm excluded from both, batch 120, 20 epochs, 224 px (authors' code and config); schedule: linear
        warm-up for 10 % of the epochs, then cosine decay (SimCLR).
    C5  Under DDP the loss of each rank's anchors uses the projections of all ranks as negatives (gathered with
        gradients) and BatchNorm is synchronised across GPUs (SimCLR's global BN; --no-sync-bn to turn it off).
    C6  U-Net decoder as in segmentation_models_pytorch's Unet (the authors' fine-tuning model): 5 blocks of
        nearest x2 upsampling + skip concatenation + 2 x (conv3x3-BN-ReLU), widths 256-128-64-32-16, skips from the
        stem (/2) and layers 1-3 (/4, /8, /16), layer 4 (/32) as the bottleneck; a 3x3 conv gives one logit.
    C7  The encoder of the last pre-training epoch is transferred; the projection head is dropped.
    C8  Pet trimaps: 1 pet -> 1, 2 background -> 0, 3 border -> foreground (the rule of smp's Pet example, which
        the authors' smp-based code follows); --border background|ignore switches it.
    C9  Pet splits: one seeded permutation (--split-seed) of the whole set; its first 20 % is the test set for every
        dev fraction; the dev set is the next dev_split * N images (so the 20 % dev set lies inside the 50 % one,
        which lies inside the 80 % one); its first 10 % is validation, the rest training; the remainder is unused.
    C10 Fine-tuning images are resized to img_size x img_size (224), labels with nearest; no augmentation (the paper
        describes none); ImageNet normalisation.
    C11 The weights with the lowest validation loss are kept (the report); --select-by val_iou gives the authors'
        code's rule. Validation runs every epoch (the authors' code: every 2).
    C12 Test metrics come from dataset-level pixel counts (IoU, F1, recall, accuracy) and pixel means (BCE, Focal
        with gamma 2) or one soft Dice over all test pixels; the authors' code averaged per-batch scores.
    C13 Pre-training on `pets` while fine-tuning on Pets uses only the images outside the fixed test set, so no test
        image is ever seen, not even without its label; `shapes` pre-trains on the synthetic set's own unlabelled
        split, whose images differ from the labelled pool's.
    C14 --data shapes preset for a 2-core CPU (minutes): ResNet-18 encoder (512->512->128 head), 48 px; pre-training
        with Adam 1e-3 (LARS learns no faster in so few steps; Adam 3e-3 collapses), batch 32, 6 epochs on 384
        unlabelled synthetic images, with milder views (crop 0.3-1, colour strength 0.5: with SimCLR's full views
        72 steps stay at chance, 4.18 -> 4.13 vs ln 63 = 4.14; the milder ones reach 3.57); fine-tuning with Adam
        1e-3, batch 16, 10 epochs on a pool of 384 labelled images (276 train / 31 val / 77 test). ResNet-50, SimCLR's
        views and the paper's settings stay the defaults for real data.
    C15 The table4.1 grid on shapes runs in minutes (32 px, 192 images, 4 pre-training and 6 fine-tuning epochs,
        fine-tuning batch 8). "CIFAR" pre-trains on the synthetic scenes drawn at half the size and enlarged by the
        crop (as CIFAR-10's 32 px images are at 224), "Pet" on the same scenes at full size. The small grid exercises
        the protocol; it cannot answer the paper's question about data similarity.

Usage
    python simclr_seg.py                                   # synthetic: pre-train, then fine-tune (a few minutes, CPU)
    python simclr_seg.py --data pets --data-root data --pretrain-data cifar10 --pretrain-root data/cifar10
    python simclr_seg.py --data pets --data-root data --stage finetune --init none --dev-split 0.5   # baseline
    python simclr_seg.py --data pets --data-root data --stage finetune --init simclr:runs/x/pretrain/last.pt
    python simclr_seg.py --data pets --data-root data --experiment table4.1 --cifar10-root data/cifar10 \
        --catsdogs-root data/catsdogs --limit 23402      # the authors' CIFAR-10 subset; all 7,390 Pet images
    python simclr_seg.py --experiment table4.1             # the same grid in small form on synthetic data
    torchrun --nproc_per_node=4 simclr_seg.py --data pets --data-root data --compile
    python simclr_seg.py --resume --out runs/simclr_seg-shapes          # continue at the next epoch

Shapes: B batch (per rank), W ranks, C channels, H W height width, d projection width, D representation width.
Images (B, 3, H, W) float normalised; labels (B, H, W) int64 in {0, 1, 255 = ignore}; logits (B, 1, H, W).
"""

import argparse
import csv
import functools
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision.transforms import v2
from torchvision.utils import make_grid, save_image

from common import NORMALIZATION, BinaryStats, DatasetError, build_dataset, denormalize, joint_transform

METHOD = "simclr_seg"
ENCODER_CHANNELS = {  # widths of the stem (/2) and layers 1-4 (/4 ... /32); parameters our code measures:
    "resnet18": (64, 64, 128, 256, 512),  # SimCLR 11.5 M, U-Net 14.3 M (the synthetic preset, a CPU choice)
    "resnet34": (64, 64, 128, 256, 512),  # SimCLR 21.6 M, U-Net 24.4 M
    "resnet50": (64, 256, 512, 1024, 2048),  # SimCLR 24.6 M, U-Net 32.5 M = smp Unet("resnet50") (authors' model)
}
TABLE_COLUMNS = ("ID", "Model", "Loss Func", "Dev Split", "IOU", "F1", "Dice", "Focal", "BCE", "Recall", "Accuracy")
PAPER_TABLE41 = {  # Table 4.1 of the report: (model, dev split %) -> test IoU, printed beside the grid's rows
    ("baseline", 20): 0.758, ("baseline", 50): 0.828, ("baseline", 80): 0.906,
    ("CIFAR", 20): 0.754, ("CIFAR", 50): 0.852, ("CIFAR", 80): 0.900,
    ("Pet", 20): 0.759, ("Pet", 50): 0.843, ("Pet", 80): 0.902,
}


class UsageError(ValueError):
    """A user's mistake outside the dataset (run folder, checkpoint, weights file): one sentence with the fix."""


# --- configuration ---

def get_args(argv=None):
    parser = argparse.ArgumentParser(
        description="SimCLR pre-training + U-Net fine-tuning (foreground segmentation, Oxford-IIIT Pet)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", default="shapes", choices=("shapes", "pets"),
                        help="fine-tuning set: shapes = built-in synthetic binary set, pets = Oxford-IIIT Pet")
    parser.add_argument("--data-root", default=None,
                        help="folder holding oxford-iiit-pet/ (default ./data/pets)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download Pets / CIFAR-10, and torchvision ImageNet weights for --init "
                             "imagenet when they are not in the torch hub cache")
    parser.add_argument("--stage", default="both", choices=("pretrain", "finetune", "both"),
                        help="pretrain = SimCLR only (Sec. 2.1); finetune = U-Net only (Sec. 2.2); both = pretrain, "
                             "then fine-tune from it; runs go to OUT/pretrain and OUT/finetune")
    parser.add_argument("--experiment", default=None, choices=("table4.1",),
                        help="run the report's grid: baseline / CIFAR / Pet pre-trained x dev split 20/50/80 "
                             "(Table 4.1), writing OUT/table4.1.md and .csv")
    parser.add_argument("--img-size", type=int, default=None,
                        help="fine-tuning image side in px (paper code: 224; shapes preset: 48)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (Sec. 2.2: 60; shapes: 10)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="fine-tuning batch per process (authors' code: 32; shapes: 16)")
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning Adam lr (Sec. 2.2: 1e-4; shapes: 1e-3)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 0 on shapes, else 6)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast on CUDA (off on a CPU whatever this says)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the train_step function")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="channels-last memory format (default: on for CUDA, off on a CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, data order and augmentations")
    parser.add_argument("--out", default=None, help="run folder (default runs/simclr_seg-<data>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out at the epoch after its last.pt (finished stages are kept)")
    parser.add_argument("--eval-only", action="store_true",
                        help="evaluate the fine-tuned --checkpoint on the test split and print the table row")
    parser.add_argument("--checkpoint", default=None,
                        help="checkpoint for --eval-only (default OUT/finetune/best.pt)")
    parser.add_argument("--limit", type=int, default=None,
                        help="first N images of every set read (pool and pre-training set); --limit 23402 gives the "
                             "authors' CIFAR-10 subset and leaves the 7,390 Pet images whole")
    parser.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels where PyTorch has them (slower); CPU runs are repeatable anyway")

    pre = parser.add_argument_group("pre-training (Sec. 2.1)")
    pre.add_argument("--pretrain-data", default=None, choices=("shapes", "cifar10", "catsdogs", "pets", "folder"),
                     help="unlabelled images for SimCLR (paper: cifar10, catsdogs = CAT&DOG; pets: with --data pets "
                          "only the images outside the fixed test set; shapes: the synthetic unlabelled split; "
                          "folder: every image under --pretrain-root); default shapes for --data shapes, else cifar10")
    pre.add_argument("--pretrain-root", default=None, help="folder of the pre-training set (default ./data/<name>)")
    pre.add_argument("--pretrain-epochs", type=int, default=None, help="SimCLR epochs (Sec. 3.1: 20; shapes: 6)")
    pre.add_argument("--pretrain-batch-size", type=int, default=None,
                     help="images per process and step, each seen as two views (authors' code: 120; shapes: 32)")
    pre.add_argument("--pretrain-lr", type=float, default=None,
                     help="peak lr (LARS 0.3, authors' code; shapes preset: Adam 1e-3)")
    pre.add_argument("--pretrain-optimizer", default=None, choices=("lars", "adam"),
                     help="LARS (authors' code, SimCLR) or Adam (default lars; shapes preset adam)")
    pre.add_argument("--weight-decay", type=float, default=1e-6, help="pre-training weight decay (authors' code)")
    pre.add_argument("--warmup-epochs", type=float, default=None,
                     help="linear lr warm-up before the cosine decay (default 10 %% of --pretrain-epochs)")
    pre.add_argument("--pretrain-img-size", type=int, default=None,
                     help="side of the views in px (authors' config: 224; default --img-size)")
    pre.add_argument("--pretrain-source-size", type=int, default=None,
                     help="--pretrain-data shapes only: side the synthetic images are drawn at before the crop "
                          "(default --pretrain-img-size)")
    pre.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature tau (authors' config)")
    pre.add_argument("--projection-hidden-dim", type=int, default=512, help="projection head hidden width (code)")
    pre.add_argument("--projection-dim", type=int, default=128, help="projection head output width d (code)")
    pre.add_argument("--color-strength", type=float, default=None,
                     help="colour distortion strength s (authors' config: 1.0; shapes preset: 0.5)")
    pre.add_argument("--blur-prob", type=float, default=0.5, help="probability of the Gaussian blur (SimCLR v1)")
    pre.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="area range of the random resized crop (SimCLR: 0.08 1; shapes preset: 0.3 1)")
    pre.add_argument("--pretrain-init", default="none",
                     help="encoder at the start of pre-training: none (authors' code) | imagenet | imagenet:PATH")
    pre.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="SyncBatchNorm while pre-training under DDP on CUDA (SimCLR's global BN)")

    fine = parser.add_argument_group("fine-tuning (Sec. 2.2, 3.1)")
    fine.add_argument("--init", default=None,
                      help="encoder init: none (the paper's fully supervised baseline) | imagenet | imagenet:PATH | "
                           "simclr:PATH (a pre-training checkpoint); default simclr:OUT/pretrain/last.pt with "
                           "--stage both, none with --stage finetune")
    fine.add_argument("--model-name", default=None,
                      help="label in the table row's Model column (default baseline / imagenet / SimCLR-<set>)")
    fine.add_argument("--encoder", default=None, choices=sorted(ENCODER_CHANNELS),
                      help="torchvision ResNet (paper: resnet50; shapes preset: resnet18, a CPU choice)")
    fine.add_argument("--decoder-channels", type=int, nargs=5, default=(256, 128, 64, 32, 16), metavar="C",
                      help="U-Net decoder widths, deepest first (smp Unet, the authors' code)")
    fine.add_argument("--loss", default="bce", choices=("bce", "dice", "focal"),
                      help="fine-tuning loss (paper: BCE; the authors' code also offers Dice and Focal)")
    fine.add_argument("--select-by", default="val_loss", choices=("val_loss", "val_iou"),
                      help="best.pt = lowest validation loss (report) or highest validation IoU (authors' code)")
    fine.add_argument("--dev-split", type=float, default=0.8,
                      help="development fraction of the whole set (Sec. 3.1: 0.8, 0.5, 0.2); the rest minus the "
                           "test set is unused")
    fine.add_argument("--test-fraction", type=float, default=0.2, help="fixed test fraction (Sec. 3.1: 0.2)")
    fine.add_argument("--val-fraction", type=float, default=0.1,
                      help="validation fraction of the dev set (Sec. 3.1: 90/10 train/val)")
    fine.add_argument("--split-seed", type=int, default=0, help="seed of the Pet split permutation (fixed test set)")
    fine.add_argument("--border", default="foreground", choices=("foreground", "background", "ignore"),
                      help="Pet trimap class 3 (the border) becomes this (CHOICE C8)")
    fine.add_argument("--synthetic-images", type=int, default=None,
                      help="--data shapes / --pretrain-data shapes: images in the labelled synthetic pool that "
                           "pet_splits divides, and in the unlabelled synthetic pre-training set (default 384; 192 "
                           "for the table4.1 grid)")

    grid = parser.add_argument_group("experiment grid (Table 4.1)")
    grid.add_argument("--cifar10-root", default=None, help="CIFAR-10 folder for the grid (default ./data/cifar10)")
    grid.add_argument("--catsdogs-root", default=None, help="Kaggle PetImages folder for the grid (./data/catsdogs)")
    grid.add_argument("--dev-splits", type=float, nargs="+", default=(0.2, 0.5, 0.8),
                      help="dev fractions of the grid (Sec. 3.1)")

    args = parser.parse_args(argv)
    synthetic = args.data == "shapes"

    # Data-dependent defaults: the paper's settings for real data, a CPU preset for the synthetic set (CHOICE C14).
    def default(name, shapes_value, paper_value):
        if getattr(args, name) is None:
            setattr(args, name, shapes_value if synthetic else paper_value)

    if synthetic and args.experiment:  # the grid's 11 runs in a few minutes on a CPU (CHOICE C15)
        default("img_size", 32, None)
        default("epochs", 6, None)
        default("batch_size", 8, None)
        default("pretrain_epochs", 4, None)
        default("synthetic_images", 192, None)
    default("synthetic_images", 384, 384)
    default("img_size", 48, 224)
    default("epochs", 10, 60)
    default("batch_size", 16, 32)
    default("lr", 1e-3, 1e-4)
    default("workers", 0, 6)
    default("encoder", "resnet18", "resnet50")
    default("pretrain_data", "shapes", "cifar10")
    default("pretrain_epochs", 6, 20)
    default("pretrain_batch_size", 32, 120)
    default("pretrain_optimizer", "adam", "lars")
    default("crop_scale", (0.3, 1.0), (0.08, 1.0))
    default("color_strength", 0.5, 1.0)
    if args.pretrain_lr is None:
        args.pretrain_lr = 0.3 if args.pretrain_optimizer == "lars" else 1e-3
    if args.pretrain_img_size is None:
        args.pretrain_img_size = args.img_size
    if args.pretrain_source_size is None:
        args.pretrain_source_size = args.pretrain_img_size
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.1 * args.pretrain_epochs
    if args.out is None:
        args.out = os.path.join("runs", f"{METHOD}-{args.data}")
    if args.init is None:
        # CHOICE C7: fine-tuning starts from the encoder of the last pre-training epoch
        args.init = f"simclr:{os.path.join(args.out, 'pretrain', 'last.pt')}" if args.stage == "both" else "none"

    if args.pretrain_source_size < 8:
        parser.error(f"--pretrain-source-size must be at least 8 px, got {args.pretrain_source_size}")
    for flag in ("img_size", "pretrain_img_size"):
        if getattr(args, flag) < 32:
            parser.error(f"--{flag.replace('_', '-')} must be at least 32 px (the ResNet downsamples by 32), "
                         f"got {getattr(args, flag)}")
    for flag in ("epochs", "batch_size", "pretrain_epochs", "pretrain_batch_size", "synthetic_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.pretrain_batch_size < 2:
        parser.error("--pretrain-batch-size must be at least 2: NT-Xent needs other images as negatives")
    for flag in ("lr", "pretrain_lr", "temperature"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.weight_decay < 0 or args.warmup_epochs < 0 or args.workers < 0:
        parser.error("--weight-decay, --warmup-epochs and --workers must not be negative")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of images, got {args.limit}")
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be between 0 and 1 (exclusive), got {args.test_fraction}")
    for value in (args.dev_split, *args.dev_splits):
        if not 0 < value <= 1 - args.test_fraction + 1e-9:
            parser.error(f"--dev-split / --dev-splits must be in (0, 1 - test fraction = {1 - args.test_fraction:g}]"
                         f", got {value}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        parser.error(f"--crop-scale needs 0 < LO <= HI <= 1, got {args.crop_scale}")
    if not 0 <= args.blur_prob <= 1 or args.color_strength < 0:
        parser.error("--blur-prob must be in [0, 1] and --color-strength must not be negative")
    if min(args.decoder_channels) < 1 or min(args.projection_dim, args.projection_hidden_dim) < 1:
        parser.error("--decoder-channels, --projection-dim and --projection-hidden-dim must be positive")
    for flag in ("init", "pretrain_init"):
        kind = getattr(args, flag).split(":", 1)[0]
        allowed = ("none", "imagenet", "simclr") if flag == "init" else ("none", "imagenet")
        if kind not in allowed or (kind == "simclr" and ":" not in getattr(args, flag)):
            forms = "none | imagenet | imagenet:PATH" + (" | simclr:PATH (a pre-training checkpoint)"
                                                         if flag == "init" else "")
            parser.error(f"--{flag.replace('_', '-')} must be {forms}, got {getattr(args, flag)!r}")
    if args.pretrain_data == "folder" and args.pretrain_root is None and args.stage != "finetune":
        parser.error("--pretrain-data folder needs --pretrain-root DIR (every image under DIR is used)")
    if args.eval_only and (args.stage == "pretrain" or args.experiment):
        parser.error("--eval-only evaluates a fine-tuned model: drop --stage pretrain / --experiment")
    if args.eval_only and args.resume:
        parser.error("--eval-only and --resume exclude each other")
    if args.experiment and args.stage != "both":
        parser.error("--experiment table4.1 runs both stages itself: drop --stage")
    return args


# --- data: SimCLR views (Sec. 2.1) and the Pet splits (Sec. 3.1) ---

def simclr_augmentation(size, strength=1.0, blur_prob=0.5, crop_scale=(0.08, 1.0)):
    """SimCLR v1 augmentation (CHOICE C2): tv_tensors.Image uint8 (3, h, w) -> float (3, size, size), normalised."""
    s = strength
    blur_kernel = int(0.1 * size) // 2 * 2 + 1  # odd, about 10 % of the side: 23 at 224 (SimCLR, authors' config)
    mean, std = NORMALIZATION["imagenet"]
    return v2.Compose([
        v2.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=(3 / 4, 4 / 3), antialias=True),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=blur_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
        v2.ToPureTensor(),
    ])


def keep_image(image):
    """Identity transform for the image-only readers: the raw uint8 image goes to TwoViews (picklable for workers)."""
    return image


class TwoViews(Dataset):
    """Image-only dataset -> two augmented views of each item, seeded by (seed, epoch, index).

    Indexed with (epoch, index) pairs from EpochSampler: each item's views depend only on the seed, the epoch and
    the index, whatever --workers is, so a resumed run draws exactly the views the uninterrupted run would have.
    """

    def __init__(self, images, augment, seed):
        self.images, self.augment, self.seed = images, augment, seed

    def __len__(self):
        return len(self.images)

    def __getitem__(self, key):
        epoch, index = key
        image = self.images[index]
        item_seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG: keep the caller's intact
            torch.manual_seed(item_seed)
            return self.augment(image), self.augment(image)


class EpochSampler(Sampler):
    """Wraps a DistributedSampler and yields (epoch, index): persistent workers never see a set_epoch call."""

    def __init__(self, sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self):
        return ((self.epoch, index) for index in self.sampler)

    def __len__(self):
        return len(self.sampler)


class ImageFolderFiles(Dataset):
    """Every image file under a folder (recursively), uint8 tv_tensors.Image items, for --pretrain-data folder.

    common.py's `folder` reader wants an images/ + masks/ pair; pre-training needs images only.
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

    def __init__(self, root):
        if not os.path.isdir(root):
            raise DatasetError(f"folder: {root} does not exist; pass --pretrain-root pointing at a folder of images")
        self.image_paths = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in self.EXTENSIONS)
        if not self.image_paths:
            raise DatasetError(f"folder: no image files ({', '.join(self.EXTENSIONS)}) under {root}; "
                               f"point --pretrain-root at a folder of images")
        self.names = [Path(p).stem for p in self.image_paths]

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index):
        path = self.image_paths[index]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as error:
            raise DatasetError(f"folder: cannot read image {path} ({type(error).__name__}); remove or replace the "
                               f"file") from None
        return torchvision.tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def pet_splits(num_images, dev_split, test_fraction=0.2, val_fraction=0.1, seed=0):
    """Sec. 3.1 splits of a set of num_images -> dict of sorted index lists train, val, test, unused (CHOICE C9).

    One seeded permutation: the first round(test_fraction * N) are the test set, whatever dev_split is; the next
    round(dev_split * N) are the dev set (nested across dev fractions), split 90/10 into train and validation.
    """
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed)).tolist()
    num_test = round(test_fraction * num_images)
    num_dev = min(round(dev_split * num_images), num_images - num_test)
    num_val = round(val_fraction * num_dev)
    dev = order[num_test:num_test + num_dev]
    splits = {"train": dev[num_val:], "val": dev[:num_val], "test": order[:num_test],
              "unused": order[num_test + num_dev:]}
    for name in ("train", "val", "test"):
        if not splits[name]:
            raise DatasetError(f"the {name} split of {num_images} images is empty (dev {dev_split}, test "
                               f"{test_fraction}, val {val_fraction}); use more images (--limit / "
                               f"--synthetic-images) or larger fractions")
    return {name: sorted(indices) for name, indices in splits.items()}


def build_pool(args, transform, image_only=False):
    """The labelled set that pet_splits divides: all 7,390 Pet images, or the synthetic binary pool."""
    if args.data == "pets":
        return build_dataset("pets", args.data_root, split="all", transform=transform, image_only=image_only,
                             binary=True, border=args.border, download=args.download, limit=args.limit)[0]
    return build_dataset("shapes", split="all", transform=transform, image_only=image_only, binary=True,
                         image_size=args.img_size, num_images=args.synthetic_images, seed=args.split_seed,
                         limit=args.limit)[0]


def build_pretrain_images(args):
    """The unlabelled pre-training images (uint8 tv_tensors.Image items); never the fine-tuning test set."""
    name, root = args.pretrain_data, args.pretrain_root
    if name == "shapes":  # the synthetic set's own unlabelled split: other images than the labelled pool
        return build_dataset("shapes", split="unlabeled", transform=keep_image, image_only=True,
                             image_size=args.pretrain_source_size, num_images=args.synthetic_images,
                             seed=args.split_seed, limit=args.limit)[0]
    if name == "pets":
        if args.data == "pets":  # CHOICE C13: in-domain, the fine-tuning pool minus its fixed test set
            pool = build_pool(args, keep_image, image_only=True)
            splits = pet_splits(len(pool), args.dev_split, args.test_fraction, args.val_fraction, args.split_seed)
            test = set(splits["test"])
            return Subset(pool, [i for i in range(len(pool)) if i not in test])
        return build_dataset("pets", root, split="all", transform=keep_image, image_only=True,
                             download=args.download, limit=args.limit)[0]
    if name == "folder":
        images = ImageFolderFiles(root)
        return Subset(images, range(min(len(images), args.limit or len(images))))
    split = "train" if name == "cifar10" else "all"  # CIFAR-10's 50,000 training images; all of CAT&DOG
    return build_dataset(name, root, split=split, transform=keep_image, image_only=True, download=args.download,
                         limit=args.limit)[0]


def build_loaders(args, stage, ctx):
    """-> dict of DataLoaders: pretrain {"train"}; finetune {"train", "val", "test"} (pet_splits)."""
    # pinned host memory lets .to(device, non_blocking=True) overlap the copy with compute; persistent workers skip
    # the start-up of new worker processes every epoch; the generator keeps DataLoader seeds off the global RNG
    loader_options = dict(num_workers=args.workers, pin_memory=ctx.device.type == "cuda",
                          persistent_workers=args.workers > 0,
                          generator=torch.Generator().manual_seed(args.seed + ctx.rank))
    if stage == "pretrain":
        images = build_pretrain_images(args)
        if len(images) < args.pretrain_batch_size * ctx.world_size:
            raise DatasetError(f"the pre-training set has {len(images)} images, fewer than one global batch of "
                               f"{args.pretrain_batch_size * ctx.world_size}; lower --pretrain-batch-size")
        augment = simclr_augmentation(args.pretrain_img_size, args.color_strength, args.blur_prob, args.crop_scale)
        dataset = TwoViews(images, augment, args.seed)
        sampler = EpochSampler(DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed))
        # drop_last: NT-Xent and BatchNorm want full batches, every rank the same number of steps
        return {"train": DataLoader(dataset, args.pretrain_batch_size, sampler=sampler, drop_last=True,
                                    **loader_options)}
    pool = build_pool(args, joint_transform(args.img_size))  # CHOICE C10: resize only, ImageNet normalisation
    splits = pet_splits(len(pool), args.dev_split, args.test_fraction, args.val_fraction, args.split_seed)
    train = Subset(pool, splits["train"])
    sampler = DistributedSampler(train, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed)
    lone_last = len(sampler) % args.batch_size == 1  # BatchNorm cannot train on a last batch of one image
    loaders = {"train": DataLoader(train, args.batch_size, sampler=sampler, drop_last=lone_last, **loader_options)}
    for name in ("val", "test"):  # every rank scores its own share, no padding duplicates; sums are all-reduced
        shard = Subset(pool, splits[name][ctx.rank::ctx.world_size])
        loaders[name] = DataLoader(shard, args.batch_size, shuffle=False, **loader_options)
    loaders["sizes"] = {name: len(indices) for name, indices in splits.items()}
    return loaders


# --- model: encoder, projection head (Sec. 2.1), U-Net (Sec. 2.2) ---

class ResNetEncoder(nn.Module):
    """torchvision ResNet without avgpool/fc, under torchvision's own names (conv1, bn1, layer1 ... layer4).

    forward(images (B, 3, H, W)) -> h (B, D), the global-average-pooled representation (D = 2048 for ResNet-50);
    features(images) -> [stem (B, 64, H/2, W/2), layer1 /4, layer2 /8, layer3 /16, layer4 /32] for the U-Net.
    """

    def __init__(self, name="resnet50"):
        super().__init__()
        resnet = getattr(torchvision.models, name)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.channels = ENCODER_CHANNELS[name]

    def features(self, images):
        stem = self.relu(self.bn1(self.conv1(images)))  # (B, 64, H/2, W/2)
        x1 = self.layer1(self.maxpool(stem))  # (B, C1, H/4, W/4)
        x2 = self.layer2(x1)  # (B, C2, H/8, W/8)
        x3 = self.layer3(x2)  # (B, C3, H/16, W/16)
        x4 = self.layer4(x3)  # (B, D, H/32, W/32)
        return [stem, x1, x2, x3, x4]

    def forward(self, images):
        return self.features(images)[-1].mean(dim=(2, 3))  # (B, D)


class ProjectionHead(nn.Sequential):
    """Sec. 2.1 (3): two-layer MLP with ReLU, h (B, D) -> z (B, d); 2048 -> 512 -> 128 in the authors' code."""

    def __init__(self, in_dim, hidden_dim=512, out_dim=128):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class SimCLR(nn.Module):
    """Encoder + projection head: images (B, 3, H, W) -> projections z (B, d), not yet normalised."""

    def __init__(self, encoder="resnet50", hidden_dim=512, projection_dim=128):
        super().__init__()
        self.encoder = ResNetEncoder(encoder)
        self.projection_head = ProjectionHead(self.encoder.channels[-1], hidden_dim, projection_dim)

    def forward(self, images):
        return self.projection_head(self.encoder(images))


class DecoderBlock(nn.Module):
    """Upsample x2 (nearest) to the skip's size, concatenate the skip, then 2 x conv3x3-BN-ReLU (CHOICE C6)."""

    def __init__(self, in_channels, skip_channels, out_channels):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels + skip_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x, skip=None, size=None):
        x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else size, mode="nearest")
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # (B, C_in + C_skip, h, w)
        return self.convs(x)


class UNetDecoder(nn.Module):
    """Sec. 2.2 (2): U-Net decoder on [stem, layer1, layer2, layer3, layer4]; the last block has no skip."""

    def __init__(self, encoder_channels, decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        skip_channels = list(encoder_channels[:-1][::-1]) + [0]  # layer3, layer2, layer1, stem, none
        in_channels = [encoder_channels[-1]] + list(decoder_channels[:-1])
        self.blocks = nn.ModuleList(DecoderBlock(i, s, o) for i, s, o in
                                    zip(in_channels, skip_channels, decoder_channels))

    def forward(self, features, size):
        x, skips = features[-1], features[-2::-1] + [None]
        for block, skip in zip(self.blocks, skips):
            x = block(x, skip, size)  # (B, C_out, 2h, 2w); the last block reaches the image size (H, W)
        return x


class SimCLRUNet(nn.Module):
    """The fine-tuning model: ResNet encoder + U-Net decoder + 3x3 conv -> one logit per pixel (B, 1, H, W)."""

    def __init__(self, encoder="resnet50", decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        self.encoder = ResNetEncoder(encoder)
        self.decoder = UNetDecoder(self.encoder.channels, decoder_channels)
        self.head = nn.Conv2d(decoder_channels[-1], 1, 3, padding=1)

    def forward(self, images):
        features = self.encoder.features(images)
        return self.head(self.decoder(features, images.shape[-2:]))  # (B, 1, H, W)


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


# --- weights: ImageNet init and the strict transfer (Sec. 2.2 step 1) ---

def load_imagenet_weights(encoder, spec, download=False):
    """torchvision IMAGENET1K_V1 state_dict for `encoder`, from spec "imagenet:PATH" or the torch hub cache.

    Never downloads unless `download` (--download) is set: a missing file raises UsageError naming where to put it.
    """
    weights = torchvision.models.get_model_weights(encoder)["IMAGENET1K_V1"]
    path = Path(spec.split(":", 1)[1]) if ":" in spec else Path(torch.hub.get_dir()) / "checkpoints" / Path(
        weights.url).name
    if not path.is_file():
        if download and ":" not in spec:
            return weights.get_state_dict(progress=True)  # torchvision stores it in the hub cache
        raise UsageError(f"ImageNet weights for {encoder} not found at {path}; download {weights.url} to that path, "
                         f"pass --init imagenet:PATH, or add --download")
    return torch.load(path, map_location="cpu", weights_only=True)


def transfer_encoder_weights(model, state_dict, source="checkpoint"):
    """Copy every encoder tensor (weights and BatchNorm buffers) into model.encoder by name -> number copied.

    state_dict: a SimCLR or SimCLRUNet state_dict (keys "encoder.conv1.weight", ...) or a bare torchvision ResNet
    one ("conv1.weight", ..., "fc.*" ignored). Any encoder tensor missing, surplus or of another shape raises
    UsageError: a silent partial load made the authors' "pre-trained" model equal to their baseline.
    """
    if any(key.startswith("encoder.") for key in state_dict):
        found = {key[len("encoder."):]: value for key, value in state_dict.items() if key.startswith("encoder.")}
    else:
        found = {key: value for key, value in state_dict.items() if not key.startswith("fc.")}
    target = model.encoder.state_dict()
    missing = [key for key in target if key not in found]
    surplus = [key for key in found if key not in target]
    wrong_shape = [key for key in target if key in found and found[key].shape != target[key].shape]
    if missing or surplus or wrong_shape:
        problems = [f"{len(keys)} {what} (e.g. {keys[0]})" for keys, what in
                    ((missing, "missing"), (surplus, "unexpected"), (wrong_shape, "of another shape")) if keys]
        raise UsageError(f"{source} does not fit the {type(model.encoder).__name__} with {len(target)} tensors: "
                         f"{', '.join(problems)}; pass a checkpoint of the same --encoder")
    model.encoder.load_state_dict({key: found[key] for key in target}, strict=True)
    return len(target)


def initialise_encoder(model, spec, args, ctx, stage):
    """Apply --init / --pretrain-init `spec` to model.encoder; print what was loaded (rank 0)."""
    if spec == "none":
        log(ctx, f"{stage}: encoder from random init (no pre-training)")
        return 0
    if spec.startswith("imagenet"):
        state_dict, source = load_imagenet_weights(args.encoder, spec, args.download), f"ImageNet weights ({spec})"
    else:
        path = spec.split(":", 1)[1]
        if not os.path.isfile(path):
            raise UsageError(f"pre-training checkpoint {path} not found; run --stage pretrain first or fix --init")
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state_dict, source = checkpoint.get("model", checkpoint), path
    count = transfer_encoder_weights(model, state_dict, source)
    log(ctx, f"{stage}: loaded {count}/{count} encoder tensors from {source}")
    return count


# --- losses ---

class GatherWithGrad(torch.autograd.Function):
    """all_gather that passes gradients back: forward (n, d) per rank -> (W * n, d) in rank order.

    Every rank's loss uses every rank's projections, so the gradient of a rank's slice is the sum over the ranks'
    losses (all_reduce) of their gradients for it. A plain all_gather would cut those gradients: the bug several
    public SimCLR implementations had to fix.
    """

    @staticmethod
    def forward(ctx, tensor):
        gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


@torch.compiler.disable  # collectives inside an autograd.Function: let --compile break the graph here
def gather_with_grad(tensor):
    """(n, d) -> (W * n, d) across DDP ranks with gradients; the tensor itself without DDP. -> (all, offset)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return GatherWithGrad.apply(tensor), dist.get_rank() * tensor.shape[0]
    return tensor, 0


def nt_xent_loss(z1, z2, temperature=0.1):
    """NT-Xent, Eq. (2.1), over the global batch of all ranks.

    z1, z2: (B, d) float projections of the two views of the same B images (row k of z1 and of z2: a positive pair).
    Returns the mean over this rank's 2B anchors i of l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) ),
    s = cosine similarity, k running over the 2 B W projections of all ranks (the positive and 2BW - 2 negatives).
    The mean of the ranks' losses is Eq. (2.1): L = 1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)], N = B W pairs.
    """
    # CHOICE C3: L2-normalised projections (the authors' code skips this): dot product = cosine similarity
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, d)
    candidates, offset = gather_with_grad(z)  # (2BW, d); this rank's rows start at `offset`
    logits = z @ candidates.T / temperature  # (2B, 2BW)
    n = z.shape[0]
    rows = torch.arange(n, device=z.device)
    self_similarity = torch.zeros_like(logits, dtype=torch.bool)
    self_similarity[rows, offset + rows] = True  # k != i: an anchor is not its own candidate
    logits = logits.masked_fill(self_similarity, float("-inf"))
    positives = offset + (rows + n // 2) % n  # view 1 of image k pairs with view 2 of image k and back
    return F.cross_entropy(logits, positives)


def segmentation_loss(logits, labels, loss="bce", gamma=2.0, eps=1.0):
    """Sec. 2.2 (3): BCE (paper), or soft Dice / Focal (authors' code), over the pixels whose label is not 255.

    logits (B, 1, H, W) or (B, H, W) float; labels (B, H, W) int64 in {0, 1, 255}. Without ignore pixels these equal
    common.py's bce_loss, dice_loss and focal_loss (the metrics of Table 4.1).
    """
    logits = logits.float().reshape(labels.shape)
    valid = (labels != 255).float()
    targets = (labels == 1).float()
    if loss == "dice":  # 1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) over the valid pixels of the batch
        probs = torch.sigmoid(logits) * valid
        return 1 - (2 * (probs * targets).sum() + eps) / (probs.sum() + targets.sum() + eps)
    per_pixel = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    if loss == "focal":  # BCE * (1 - p_t)^gamma (Lin et al. 2017)
        probs = torch.sigmoid(logits)
        p_t = probs * targets + (1 - probs) * (1 - targets)
        per_pixel = per_pixel * (1 - p_t) ** gamma
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratios (You et al. 2017), SimCLR's optimiser (CHOICE C4).

    For a group with lars=True: g <- g + wd * w; g <- g * eta * ||w|| / ||g|| (when both norms are > 0);
    v <- m * v + g; w <- w - lr * v. Groups with lars=False (biases, BatchNorm) take plain SGD with momentum.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=1e-6, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        # torch._foreach_* runs each line for all tensors of the group in a few kernel launches (the per-tensor
        # loop costs ~1,300 small launches per ResNet-50 step)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if group["lars"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                trust = torch.where((param_norms > 0) & (grad_norms > 0),
                                    group["trust_coefficient"] * param_norms / grad_norms, 1.0)
                grads = torch._foreach_mul(grads, list(trust.unbind()))
            for param in params:
                if "momentum_buffer" not in self.state[param]:
                    self.state[param]["momentum_buffer"] = torch.zeros_like(param)
            buffers = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, grads)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])


def warmup_cosine(step, warmup_steps, total_steps):
    """lr factor: linear warm-up to 1 over warmup_steps, then cosine decay to 0 at total_steps (CHOICE C4)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def constant_lr(step):
    return 1.0


def build_optimizer(stage, model, args, steps_per_epoch):
    """pretrain: LARS / Adam with warm-up + cosine; finetune: Adam at a constant lr (Sec. 2.2)."""
    if stage == "finetune":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, constant_lr)
    adapted = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights
    excluded = [p for p in model.parameters() if p.ndim <= 1]  # biases and BatchNorm: no decay, no trust ratio
    if args.pretrain_optimizer == "lars":
        optimizer = LARS([{"params": adapted}, {"params": excluded, "lars": False, "weight_decay": 0.0}],
                         lr=args.pretrain_lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.AdamW([{"params": adapted}, {"params": excluded, "weight_decay": 0.0}],
                                      lr=args.pretrain_lr, weight_decay=args.weight_decay)
    total = args.pretrain_epochs * steps_per_epoch
    schedule = functools.partial(warmup_cosine, warmup_steps=round(args.warmup_epochs * steps_per_epoch),
                                 total_steps=total)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# --- loops (one epoch loop for both stages) ---

def train_step(model, batch, stage, loss="bce", temperature=0.1, amp=False):
    """Forward pass and loss of one batch; the function --compile wraps.

    pretrain: batch = (view1, view2), each (B, 3, H, W) -> NT-Xent of their projections.
    finetune: batch = (images (B, 3, H, W), labels (B, H, W)) -> segmentation loss of the logits (B, 1, H, W).
    """
    device_type = batch[0].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
        if stage == "pretrain":
            view1, view2 = batch
            projections = model(torch.cat([view1, view2]))  # (2B, d): one BatchNorm batch for both views (SimCLR)
            z1, z2 = projections.float().chunk(2)  # (B, d) each
            return nt_xent_loss(z1, z2, temperature)
        images, labels = batch
        return segmentation_loss(model(images), labels, loss)


def to_device(batch, ctx, args):
    """Move a batch to the device (non-blocking: overlaps with compute when pinned); images channels-last."""
    moved = []
    for tensor in batch:
        tensor = tensor.to(ctx.device, non_blocking=True)
        if tensor.dim() == 4 and args.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)  # faster cuDNN convolutions in bf16
        moved.append(tensor)
    return moved


def train_one_epoch(stage, model, loader, optimizer, scheduler, step_fn, epoch, args, ctx):
    """One pass over the loader -> {"loss": mean over steps (all ranks), "lr", "images_per_s"}."""
    model.train()
    loader.sampler.set_epoch(epoch)
    loss_sum = torch.zeros((), device=ctx.device)
    steps, images_seen, start = 0, 0, time.perf_counter()
    amp = args.amp and ctx.device.type == "cuda"
    for batch in loader:
        batch = to_device(batch, ctx, args)
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(model, batch, stage, args.loss, args.temperature, amp)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach()
        steps += 1
        images_seen += batch[0].shape[0] * ctx.world_size
    totals = torch.stack([loss_sum, torch.tensor(float(steps), device=ctx.device)])
    if ctx.world_size > 1:
        dist.all_reduce(totals)
    loss_total, step_total = totals.tolist()  # sync point
    return {"loss": loss_total / max(step_total, 1), "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images_seen / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model, loader, args, ctx):
    """Binary metrics of the model on a loader (sums over all ranks) -> BinaryStats.compute() + "loss".

    "loss" is the training loss on these images (bce, dice_loss or focal_loss): the validation loss of Sec. 2.2.
    CHOICE C12: every metric comes from pixel counts and sums over the whole split, not from per-batch averages.
    """
    model.eval()
    stats = BinaryStats(device=ctx.device)
    amp = args.amp and ctx.device.type == "cuda"
    for batch in loader:
        images, labels = to_device(batch, ctx, args)
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(images)  # (B, 1, H, W)
        stats.update(logits.float(), labels)
    metrics = stats.all_reduce().compute()  # sync point
    metrics["loss"] = metrics[{"bce": "bce", "dice": "dice_loss", "focal": "focal_loss"}[args.loss]]
    return metrics


def table_row(model_name, loss, dev_split, metrics, row_id=0):
    """Table 4.1 columns: ID, Model, Loss Func, Dev Split (%), IOU, F1, Dice (loss), Focal, BCE, Recall, Accuracy."""
    return {"ID": row_id, "Model": model_name, "Loss Func": loss.upper() if loss == "bce" else loss.capitalize(),
            "Dev Split": round(100 * dev_split), "IOU": metrics["iou"], "F1": metrics["f1"],
            "Dice": metrics["dice_loss"], "Focal": metrics["focal_loss"], "BCE": metrics["bce"],
            "Recall": metrics["recall"], "Accuracy": metrics["accuracy"]}


def markdown_table(rows):
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- samples ---

@torch.no_grad()
def save_samples(stage, model, batch, path, args, ctx, count=8):
    """PNG grid. pretrain: row 1 view 1, row 2 view 2. finetune: image, prediction, truth (grey = ignore)."""
    batch = [tensor[:count] for tensor in to_device(batch, ctx, args)]
    if stage == "pretrain":
        rows = [denormalize(batch[0].float(), "imagenet"), denormalize(batch[1].float(), "imagenet")]
    else:
        images, labels = batch
        model.eval()
        prediction = (model(images).float() > 0).float().expand(-1, 3, -1, -1)  # (b, 3, H, W): logit > 0 = p > 0.5
        truth = torch.where(labels == 255, 0.5, labels.float()).unsqueeze(1).expand(-1, 3, -1, -1)
        rows = [denormalize(images.float(), "imagenet"), prediction, truth]
    grid = make_grid(torch.cat(rows).cpu(), nrow=rows[0].shape[0], padding=2, pad_value=1.0)  # sync point
    save_image(grid, path)


# --- plumbing: seeding, devices, DDP, checkpoints, run folders ---

@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False  # main() ends the process group only if setup_distributed started it

    @property
    def main(self):
        return self.rank == 0


def log(ctx, message):
    if ctx.main:
        print(message, flush=True)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup_distributed(args):
    """-> Context. Under torchrun (WORLD_SIZE > 1): one process per GPU with nccl, or gloo on CPUs."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    world_size, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns_process_group = world_size > 1 and not dist.is_initialized()
    if owns_process_group:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)  # nearest-upsampling backward has no such kernel
    else:
        torch.backends.cudnn.benchmark = use_cuda  # picks the fastest convolution kernels for our fixed sizes
    if args.channels_last is None:
        args.channels_last = use_cuda
    return Context(device, rank, world_size, owns_process_group)


def unwrap(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def rng_states():
    numpy_state = np.random.get_state()
    states = {"python": random.getstate(), "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()),
                                                      *numpy_state[2:]), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(states["python"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, scheduler, epoch, best, args, stage):
    """Model (unwrapped), optimizer, scheduler, epoch, best metric, args, RNG states; temp file + os.replace."""
    checkpoint = {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "stage": stage,
                  "args": {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()},
                  "rng": rng_states()}
    temporary = f"{path}.tmp"
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)  # a crash mid-write never leaves a truncated checkpoint


def link_or_copy(source, target):
    """target = the same bytes as source: a hard link (no second write of ~140 MB for a ResNet-18 with Adam),
    a copy where the file system has no links. save_checkpoint's os.replace gives `source` a new file later."""
    temporary = f"{target}.tmp"
    if os.path.exists(temporary):
        os.remove(temporary)
    try:
        os.link(source, temporary)
    except OSError:
        shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def load_checkpoint(path, model, optimizer=None, scheduler=None):
    """Restore what save_checkpoint wrote -> the checkpoint dict (epoch, best, args, ...)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"cannot read checkpoint {path} ({type(error).__name__}); pass another --checkpoint") from None
    unwrap(model).load_state_dict(checkpoint["model"])
    if optimizer is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(checkpoint["scheduler"])
    return checkpoint


def check_run_dir(run_dir, args):
    """Refuse to overwrite a run folder without --resume (all ranks check before rank 0 writes anything)."""
    if run_dir.exists() and any(run_dir.iterdir()) and not args.resume:
        raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it or --out to start another")


def write_json(path, record):
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(record, handle, indent=2)
    os.replace(temporary, path)


# --- the two stages ---

def build_model(stage, args, ctx):
    """SimCLR (pretrain) or SimCLRUNet (finetune), initialised from --pretrain-init / --init, on the device."""
    seed_everything(args.seed)  # identical initial weights on every rank
    if stage == "pretrain":
        model = SimCLR(args.encoder, args.projection_hidden_dim, args.projection_dim)
        initialise_encoder(model, args.pretrain_init, args, ctx, stage)  # CHOICE C1: "none" unless asked
    else:
        model = SimCLRUNet(args.encoder, args.decoder_channels)
        initialise_encoder(model, args.init, args, ctx, stage)
    model = model.to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def fit(stage, args, ctx, run_dir):
    """Train one stage in run_dir with checkpoints, resume, metrics.jsonl and samples -> the final results dict."""
    if args.resume and (run_dir / "results.json").exists():
        log(ctx, f"{stage}: {run_dir} is finished (results.json); kept as it is")
        return json.loads((run_dir / "results.json").read_text())
    loaders = build_loaders(args, stage, ctx)
    model = build_model(stage, args, ctx)
    seed_everything(args.seed + ctx.rank)  # from here on each rank draws its own random numbers
    optimizer, scheduler = build_optimizer(stage, model, args, len(loaders["train"]))
    epochs = args.pretrain_epochs if stage == "pretrain" else args.epochs
    start_epoch, best, record = 0, None, {}
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    if args.resume and last_path.exists():
        checkpoint = load_checkpoint(last_path, model, optimizer, scheduler)
        start_epoch, best = checkpoint["epoch"] + 1, checkpoint["best"]
        set_rng_states(checkpoint["rng"])
        log(ctx, f"{stage}: resumed {last_path} at epoch {start_epoch + 1}")
        if ctx.main and (run_dir / "metrics.jsonl").exists():  # drop records of epochs after the checkpoint
            lines = (run_dir / "metrics.jsonl").read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["epoch"] <= start_epoch]
            (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    if ctx.main:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {**vars(args), "stage": stage, "world_size": ctx.world_size,
                                             "split_sizes": loaders.get("sizes")})
    if stage == "pretrain" and args.sync_bn and ctx.world_size > 1 and ctx.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # CHOICE C5: BN statistics over the global batch
    if ctx.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    step_fn = torch.compile(train_step) if args.compile else train_step
    batch_size = args.pretrain_batch_size if stage == "pretrain" else args.batch_size
    log(ctx, f"{stage}: {count_parameters(unwrap(model)) / 1e6:.2f} M parameters, {len(loaders['train'])} steps of "
             f"{batch_size} x {ctx.world_size} images per epoch" + (f", splits {loaders['sizes']}" if
                                                                     "sizes" in loaders else ""))
    sample_batch = next(iter(loaders["val" if stage == "finetune" else "train"])) if ctx.main else None
    for epoch in range(start_epoch, epochs):
        start = time.perf_counter()
        train = train_one_epoch(stage, model, loaders["train"], optimizer, scheduler, step_fn, epoch, args, ctx)
        record = {"stage": stage, "epoch": epoch + 1, "loss": train["loss"], "lr": train["lr"]}
        if stage == "pretrain":
            record["negatives"] = 2 * args.pretrain_batch_size * ctx.world_size - 2  # per anchor, from all ranks
            value = train["loss"]  # best.pt: lowest pre-training loss, as the authors' code keeps
        else:
            val = evaluate(unwrap(model), loaders["val"], args, ctx)
            record.update(val_loss=val["loss"], val_iou=val["iou"], val_f1=val["f1"], val_accuracy=val["accuracy"])
            value = val["loss"] if args.select_by == "val_loss" else -val["iou"]  # CHOICE C11
        record.update(images_per_s=train["images_per_s"], time_s=time.perf_counter() - start)
        improved = best is None or value < best
        best = value if improved else best
        if ctx.main:
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()),
                  flush=True)
            with open(run_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
            save_checkpoint(last_path, model, optimizer, scheduler, epoch, best, args, stage)
            if improved:
                link_or_copy(last_path, best_path)
            save_samples(stage, unwrap(model), sample_batch, run_dir / "samples" / f"epoch{epoch + 1:03d}.png",
                         args, ctx)
        if ctx.world_size > 1:
            dist.barrier()  # the other ranks wait for the checkpoint before they may read it
    if stage == "pretrain":
        results = {"stage": stage, "final_loss": record.get("loss"),
                   "best_loss": best, "checkpoint": str(last_path)}
    else:
        load_checkpoint(best_path, model)  # Sec. 2.2 (5): the selected weights meet the unseen test set
        test = evaluate(unwrap(model), loaders["test"], args, ctx)
        model_name = finetune_model_name(args)
        results = {"stage": stage, "model": model_name, "dev_split": args.dev_split, "split_sizes": loaders["sizes"],
                   "test": test, "row": table_row(model_name, args.loss, args.dev_split, test)}
        log(ctx, markdown_table([results["row"]]))
    if ctx.main:
        write_json(run_dir / "results.json", results)
    return results


def finetune_model_name(args):
    if args.model_name:
        return args.model_name
    if args.init == "none":
        return "baseline"
    if args.init.startswith("imagenet"):
        return "imagenet"
    path = args.init.split(":", 1)[1]
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)["args"]["pretrain_data"]
    except Exception:
        source = Path(path).stem
    return f"SimCLR-{source}"


def run_eval_only(args, ctx):
    """--eval-only: the fine-tuned --checkpoint on the test split -> printed table row and JSON."""
    path = args.checkpoint or os.path.join(args.out, "finetune", "best.pt")
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path} not found; pass --checkpoint PATH of a fine-tuned model")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("stage") != "finetune":
        raise UsageError(f"{path} is a {saved.get('stage')} checkpoint; --eval-only needs a fine-tuned one")
    # the model and the split protocol come from the checkpoint, so the test set is the one it was trained beside
    protocol = ("encoder", "decoder_channels", "img_size", "split_seed", "test_fraction", "val_fraction", "dev_split",
                "border", "synthetic_images", "limit", "loss", "init", "model_name")
    for name in protocol:
        setattr(args, name, tuple(saved["args"][name]) if name == "decoder_channels" else saved["args"][name])
    log(ctx, f"eval-only: {path}, " + ", ".join(f"{name}={getattr(args, name)}" for name in protocol[:-2]))
    model = SimCLRUNet(args.encoder, args.decoder_channels).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    load_checkpoint(path, model)
    test = evaluate(model, build_loaders(args, "finetune", ctx)["test"], args, ctx)
    row = table_row(finetune_model_name(args), args.loss, args.dev_split, test)
    log(ctx, markdown_table([row]))
    log(ctx, json.dumps(test))
    return test


def run_table41(args, ctx):
    """Table 4.1: pre-train once per source, fine-tune baseline / CIFAR / Pet x dev splits -> .md + .csv."""
    out = Path(args.out)
    if args.data == "shapes":  # CHOICE C15: small synthetic stand-ins for CIFAR-10 and CAT&DOG
        sources = {"CIFAR": dict(pretrain_data="shapes", pretrain_source_size=args.pretrain_img_size // 2),
                   "Pet": dict(pretrain_data="shapes", pretrain_source_size=args.pretrain_img_size)}
    else:
        sources = {"CIFAR": dict(pretrain_data="cifar10", pretrain_root=args.cifar10_root),
                   "Pet": dict(pretrain_data="catsdogs", pretrain_root=args.catsdogs_root)}
    check_run_dir(out, args)
    checkpoints, rows, start = {}, [], time.perf_counter()
    for name, overrides in sources.items():
        run = argparse.Namespace(**{**vars(args), **overrides})
        run_dir = out / f"pretrain-{name}"
        log(ctx, f"== table4.1: pre-training '{name}' on {run.pretrain_data} -> {run_dir}")
        fit("pretrain", run, ctx, prepared(run_dir, ctx))
        checkpoints[name] = run_dir / "last.pt"
    models = [("baseline", "none")] + [(name, f"simclr:{path}") for name, path in checkpoints.items()]
    for model_name, init in models:
        for dev_split in args.dev_splits:
            run = argparse.Namespace(**{**vars(args), "init": init, "dev_split": dev_split, "model_name": model_name})
            run_dir = out / f"finetune-{model_name}-dev{round(100 * dev_split)}"
            log(ctx, f"== table4.1: fine-tuning {model_name}, dev split {dev_split:g} -> {run_dir}")
            results = fit("finetune", run, ctx, prepared(run_dir, ctx))
            rows.append({**results["row"], "ID": len(rows)})
    if ctx.main:
        note = (f"\n\nData: {args.data} (fine-tuning), seed {args.seed}, split seed {args.split_seed}, encoder "
                f"{args.encoder}, {args.img_size} px, {args.pretrain_epochs} pre-training / {args.epochs} fine-tuning "
                f"epochs, {ctx.world_size} process(es) on {ctx.device.type}, {time.perf_counter() - start:.0f} s.\n")
        if args.data == "pets":
            note += "\nThe report's IOU for the same rows: " + ", ".join(
                f"{row['Model']} {row['Dev Split']}: {PAPER_TABLE41[(row['Model'], row['Dev Split'])]:.3f}"
                for row in rows if (row["Model"], row["Dev Split"]) in PAPER_TABLE41) + ".\n"
        (out / "table4.1.md").write_text("# Table 4.1 (our run)\n\n" + markdown_table(rows) + note)
        with open(out / "table4.1.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=TABLE_COLUMNS)
            writer.writeheader()
            writer.writerows({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
        print(markdown_table(rows) + note, flush=True)
    return rows


def prepared(run_dir, ctx):
    """Create run_dir on rank 0 after every rank has checked it; -> run_dir."""
    if ctx.world_size > 1:
        dist.barrier()
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if ctx.world_size > 1:
        dist.barrier()
    return run_dir


# --- main ---

def main(args):
    ctx = setup_distributed(args)
    try:
        log(ctx, "config: " + json.dumps(vars(args), default=str))
        if args.eval_only:
            return run_eval_only(args, ctx)
        if args.experiment == "table4.1":
            return run_table41(args, ctx)
        stages = {"both": ("pretrain", "finetune")}.get(args.stage, (args.stage,))
        run_dirs = {stage: Path(args.out) / stage for stage in stages}
        for run_dir in run_dirs.values():
            check_run_dir(run_dir, args)
        results = {}
        for stage in stages:
            results[stage] = fit(stage, args, ctx, prepared(run_dirs[stage], ctx))
        return results
    finally:
        if ctx.owns_process_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(get_args())
    except (DatasetError, UsageError) as error:
        sys.exit(f"error: {error}")
