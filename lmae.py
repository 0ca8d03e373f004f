"""L-MAE: Masked Autoencoders are Semantic Segmentation Datasets Augmenter.

Jia, Liu, Xie, Chen, Zhang, Zhao, Yang, arXiv 2211.11242 (v2). No official code exists; this file is written from
the paper (section numbers below are the paper's).

L-MAE completes segmentation labels that have missing pixels. The label, one-hot per class, is stacked with its
image into a "fuse map"; whole fuse-map patches are hidden, an MAE-style ViT encoder sees only the visible patches,
and a ViT decoder, whose hidden positions receive an embedding of the *image* patch there (Image Patch Supplement),
predicts the class of every pixel. It is trained on complete labels by hiding patches; to complete a real dataset
the patches holding unknown pixels are hidden, predicted, and only the unknown pixels are filled in.

Implemented (component -> function -> paper place)
    Stack Fuse (layer / direct / insert concat)      -> stack_fuse                 -> Sec. III-A, Eq. (1), Table III
    patch embedding + fixed sin-cos positions         -> LMAE.encode, sincos_pos_embed -> Sec. III-A, Eqs. (2)-(3)
    mask strategies random / label-first /
      background-first / mixed 1:2:2                  -> training_mask, patch_fractions, rank_patches -> Sec. III-B
    encoder on visible tokens, decoder on all         -> LMAE.encode, LMAE.decode   -> Sec. III-C, Fig. 3
    LMMSA block x + DropPath(MHA(x)), x + DropPath(FFN(x)), ReLU FFN -> LMMSABlock, Attention -> Eqs. (4)-(9)
    Image Patch Supplement (--no-ips: MAE mask token) -> LMAE.decoder_input        -> Sec. III-C, Fig. 5, Fig. 6
    presets EB/DB/ED/DD                               -> PRESETS                    -> Table IV
    class-weighted CE with learnable beta, gamma      -> ClassWeighting, lmae_loss  -> Sec. III-E, Eqs. (10)-(12)
    PA-mIoU (hidden pixels only) and global mIoU      -> evaluate                   -> Sec. IV-B, Table IV
    Adam, weight decay 1e-4, ReduceLROnPlateau(min, patience 5, threshold 1e-3, factor 0.8), VOC crop 448 ->
      resize 224, Cityscapes crop 448, batch 24 / 48, 400 epochs -> main, get_args -> Sec. IV-A
    inference phase: route each image to the checkpoint whose mask ratio fits, hide background-first / unknown
      patches, fill only unknown pixels             -> complete, complete_image   -> Sec. III-D, Fig. 4
    label degradation for the augmentation experiment -> degrade, degrade_label    -> Sec. IV-C

Choices (the paper is silent or contradicts itself; grep "CHOICE C")
    C1  Void pixels (255) are all-zero in the one-hot fuse channels; --fuse direct stores (id + 1) / K in one
        channel (void 0), --fuse insert copies that channel after each of R, G, B.
    C2  Positions: fixed 2-D sin-cos (MAE) by default, computed for any grid so non-square inputs work;
        --pos-embed 1d is the paper's 1-D formula over the row-major patch index, Eqs. (2)-(3).
    C3  Mask strategies rank patches by the fraction of object pixels (label-first: not background, not void) or
        of background pixels (background-first); ties are broken uniformly at random; exactly
        round(mask_ratio * L) patches are hidden in every sample. --mix draws the strategy per sample.
    C4  "Background" is class --background-class (default 0: background in VOC and shapes; sky in CamVid, road in
        Cityscapes, whose 0 is not a background class).
    C5  Heads: head width 64 for 1024/512-wide and 72 for 1440/720-wide stacks (a multiple of 8, so the fused
        attention kernels apply); Table IV's parameter counts do not depend on the head count. MLP ratio 4, patch
        16, qkv bias, pre-norm LayerNorm (eps 1e-6), no class token, MAE's xavier initialisation.
    C6  Stochastic depth rises linearly from 0 to --drop-path over the blocks (0.1 for the paper presets, 0 for
        the small ones); the paper names DropPath but not its rate.
    C7  Eq. (10) (--class-weighting paper): x_i = the proportion of class i among the pixels the loss counts in
        the batch, E and V their mean and population variance over the K classes, xi = 1e-6; beta = exp(log_beta)
        stays positive; beta and gamma start at --beta-init 1 and --gamma-init 1 and are learned without weight
        decay (--freeze-weights keeps them fixed). Evaluated as sigmoid(log beta - gamma * (x_i - E) / (V + xi)),
        the same value without overflow.
    C8  Which pixels the loss counts: those of hidden patches (--loss-region masked, MAE's loss; the region
        PA-mIoU scores and `complete` fills); --loss-region all adds the visible ones. The paper's "global mIoU"
        is read as the mIoU of the completed label (given label on visible patches, prediction on hidden ones),
        which is why it exceeds PA-mIoU in Table IV; the mIoU of the raw prediction everywhere is logged as
        pred_miou. Background stays in the loss: Eq. (12) names the background as ignore index, but
        Background-First exists to strengthen background predictions and both metrics include background
        (Table IV) -> --ignore-background-in-loss.
    C9  Learning rate (not given): Adam 1e-4 for the paper presets, 1e-3 for the tiny synthetic preset.
        ReduceLROnPlateau steps on the epoch's mean training loss ("threshold of loss dropping").
    C10 Validation: every image resized to --eval-size (VOC 224, Cityscapes 1024x2048, other sets --img-size);
        masks drawn with --eval-mask-strategy (default random, as in the Table III/IV ablations) from a generator
        reseeded at every evaluation, so every epoch sees the same masks. best.pt = highest validation PA-mIoU.
    C11 Sets other than VOC and Cityscapes: the whole image resized to --img-size (default 224) for training and
        validation; no flips or colour changes anywhere (the paper names only the crops).
    C12 Completion (`complete`): the image is resized to the checkpoint's --eval-size; routing uses the fraction
        of patches that hold unknown pixels (--route unknown; --route background uses the background+unknown
        pixel fraction, the paper's words), nearest mask ratio wins, ties go to the larger ratio. Hidden patches:
        all patches holding unknown pixels (and, if fewer than the model's ratio, the most-background patches
        next, Sec. III-D) up to L - 1; logits are resized back bilinearly and only unknown pixels are written.
    C13 Degradation (`degrade`): the label's patch grid (partial patches at the right/bottom edge count as
        patches) has round(ratio * patches) patches set to 255, chosen with --strategy (default random: "randomly
        obscuring 50 %", Sec. IV-C).
    C14 Synthetic default (--data shapes): preset "tiny" (4/2 blocks, 192/128 wide), patch 8 at 64 x 64, batch
        16, 40 epochs, Adam 1e-3.

Deviations (grep "DEVIATION")
    - The default loss is plain cross-entropy, Eqs. (11)-(12) with w_i = 1 (--class-weighting none); Eq. (10)'s
      learnable class weights are --class-weighting paper. Read as printed, Eq. (10) divides by the variance of
      the class proportions, so the majority class gets a weight near 0 (background: ~1e-3 on shapes, ~1e-14 at
      VOC's 70 % background share), and learned beta/gamma in a weight-normalised loss drift towards easy
      classes. Measured on shapes (16 images at 32 x 48, 100 Adam steps, masked-patch loss; PA-mIoU): plain CE
      0.54 vs Eq. (10) 0.30 (gamma 1) and 0.34 (gamma 0) at lr 3e-3; 0.36 vs 0.25 (gamma 1) at lr 1e-3. A 64 x 64
      run with Eq. (10) and --loss-region all predicted background on 5 % of the hidden pixels after 4 epochs.

Usage
    python lmae.py                                              # synthetic shapes, a few minutes on 2 CPU cores
    python lmae.py --data voc --data-root data/VOCdevkit --mask-ratio 0.5          # Sec. IV-A settings
    python lmae.py --data cityscapes --data-root data/cityscapes --mask-ratio 0.6
    torchrun --nproc_per_node=4 lmae.py --data voc --data-root data/VOCdevkit --compile --channels-last
    python lmae.py --resume --out runs/lmae-voc                 # continue at the next epoch
    python lmae.py --eval-only --checkpoint runs/lmae-voc/best.pt
    python lmae.py degrade --data camvid --data-root data/CamVid --split val --ratio 0.5 --out degraded
    python lmae.py complete --checkpoint runs/m05/best.pt runs/m07/best.pt --images degraded/images \\
        --labels degraded/labels --unknown degraded/unknown --truth degraded/truth --out completed
  The first word picks the job: none (training), `complete` or `degrade`; `python lmae.py complete -h` lists its flags.

Shapes: B batch, C channels (C_f fuse-map channels), H W height width, P patch size, gh gw = H/P, W/P,
L = gh * gw patches, L_vis visible patches, D embedding width (D_e encoder, D_d decoder), K classes.
mask (B, L) bool, True = hidden; pixel masks (B, H, W) bool, same meaning; labels int64 with 255 = void/unknown.
"""

import argparse
import csv
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

from common import (DATASET_NAMES, NORMALIZATION, ConfusionMatrix, DatasetError, build_dataset, denormalize,
                    joint_transform)

# --- configuration ---

IGNORE = 255  # void in the given labels, unknown in labels to complete
STRATEGIES = ("random", "label-first", "background-first")  # Sec. III-B; index = strategy id
FUSES = ("layer", "direct", "insert")  # Table III: Layer Concat (ours), Directly Concat, Insert Concat
IMAGE_ONLY_SETS = ("cifar10", "catsdogs")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".ppm", ".webp")  # files `complete` reads
GAMMA_INIT = 1.0  # Eq. (10) gamma at the start (CHOICE C7)

# Table IV. Parameter counts measured by tests/test_lmae.py (count_parameters: K = 21 VOC classes, 24 fuse
# channels, patch 16) next to the paper's figure. CHOICE C5: heads of width 64 (1024/512) or 72 (1440/720).
PRESETS = {
    "eb12-db8-ed1024-dd512": dict(encoder_depth=12, decoder_depth=8, encoder_dim=1024, decoder_dim=512,
                                  encoder_heads=16, decoder_heads=8),  # 186.3 M (paper 186 M)
    "eb12-db8-ed1440-dd720": dict(encoder_depth=12, decoder_depth=8, encoder_dim=1440, decoder_dim=720,
                                  encoder_heads=20, decoder_heads=10),  # 363.0 M (paper 362 M)
    "eb8-db6-ed1024-dd512": dict(encoder_depth=8, decoder_depth=6, encoder_dim=1024, decoder_dim=512,
                                 encoder_heads=16, decoder_heads=8),  # 129.7 M (paper 129 M)
    "eb8-db6-ed1440-dd720": dict(encoder_depth=8, decoder_depth=6, encoder_dim=1440, decoder_dim=720,
                                 encoder_heads=20, decoder_heads=10),  # 250.9 M (paper 250 M), main results
    "eb6-db4-ed1024-dd512": dict(encoder_depth=6, decoder_depth=4, encoder_dim=1024, decoder_dim=512,
                                 encoder_heads=16, decoder_heads=8),  # 98.2 M (paper 98 M)
    "eb6-db4-ed1440-dd720": dict(encoder_depth=6, decoder_depth=4, encoder_dim=1440, decoder_dim=720,
                                 encoder_heads=20, decoder_heads=10),  # 188.7 M (paper 188 M)
    "small": dict(encoder_depth=6, decoder_depth=4, encoder_dim=384, decoder_dim=256,
                  encoder_heads=6, decoder_heads=8),  # 17.8 M, not in the paper
    "tiny": dict(encoder_depth=4, decoder_depth=2, encoder_dim=128, decoder_dim=96,
                 encoder_heads=2, decoder_heads=2),  # 2.4 M (1.1 M at K = 5, patch 8); shapes default (C14)
}
PAPER_PRESET = "eb8-db6-ed1440-dd720"  # Table I, Sec. IV-E1: "we choose EB=8, DB=6, ED=1440, DD=720"

# Data-dependent defaults, resolved in get_args (Sec. IV-A for voc and cityscapes; CHOICE C11, C14 otherwise).
DATA_DEFAULTS = {
    "shapes": dict(img_size=(64, 64), crop=None, eval_size=None, patch_size=8, preset="tiny", epochs=40,
                   batch_size=16, lr=1e-3, drop_path=0.0, workers=0),
    "voc": dict(img_size=(224, 224), crop=(448, 448), eval_size=(224, 224), patch_size=16, preset=PAPER_PRESET,
                epochs=400, batch_size=24, lr=1e-4, drop_path=0.1, workers=4),
    "cityscapes": dict(img_size=(448, 448), crop=(448, 448), eval_size=(1024, 2048), patch_size=16,
                       preset=PAPER_PRESET, epochs=400, batch_size=48, lr=1e-4, drop_path=0.1, workers=4),
    "other": dict(img_size=(224, 224), crop=None, eval_size=None, patch_size=16, preset=PAPER_PRESET,
                  epochs=400, batch_size=24, lr=1e-4, drop_path=0.1, workers=4),
}


def parse_size(text):
    """'224' -> (224, 224); '224x320' -> (224, 320) as (H, W)."""
    try:
        parts = [int(p) for p in str(text).lower().replace(",", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected a size like 224 or 224x320 (height x width), got {text!r}")
    return tuple(parts)


def parse_mix(text):
    """'1:2:2' -> (1.0, 2.0, 2.0): weights of random : label-first : background-first."""
    try:
        parts = tuple(float(p) for p in text.split(":"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) < 0 or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative weights a:b:c with a positive sum "
                                         f"(random:label-first:background-first), got {text!r}")
    return parts


def get_args(argv=None):
    """The whole CLI. The first word picks the job: `complete`, `degrade`, or none (training)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "complete":
        return get_complete_args(argv[1:])
    if argv and argv[0] == "degrade":
        return get_degrade_args(argv[1:])

    parser = argparse.ArgumentParser(
        description="L-MAE label completion: train (this command), or `lmae.py complete ...` / "
                    "`lmae.py degrade ...` (see `lmae.py complete -h`, `lmae.py degrade -h`)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="shapes", choices=[n for n in DATASET_NAMES if n not in IMAGE_ONLY_SETS],
                      help="dataset (common.py readers; needs labels). Default: shapes, the synthetic set")
    data.add_argument("--data-root", default=None, help="dataset root in its original layout (default ./data/<name>)")
    data.add_argument("--download", action="store_true", help="let torchvision download the set where it can")
    data.add_argument("--img-size", type=parse_size, default=None,
                      help="training input H or HxW, a multiple of --patch-size; paper: VOC 224 (crop 448 resized), "
                           "Cityscapes 448 (crop). Default: those; other sets 224; shapes 64")
    data.add_argument("--crop", type=parse_size, default=None,
                      help="random crop taken before the resize to --img-size; paper: 448 (VOC, Cityscapes). "
                           "Default: 448 there, none elsewhere")
    data.add_argument("--eval-size", type=parse_size, default=None,
                      help="validation images are resized to this (CHOICE C10). Default: VOC 224, Cityscapes "
                           "1024x2048, otherwise --img-size")
    data.add_argument("--limit", type=int, default=None, help="use only the first N images of each split")
    data.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 4, shapes 0)")
    data.add_argument("--background-class", type=int, default=0,
                      help="class id treated as background by the mask strategies (CHOICE C4; default 0)")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", default=None, choices=tuple(PRESETS),
                       help=f"EB/DB/ED/DD from Table IV (paper's choice {PAPER_PRESET}, the default for real "
                            "data) or small/tiny (tiny: the shapes default)")
    model.add_argument("--patch-size", type=int, default=None,
                       help="patch side P in pixels; Table IV's counts fix P=16 (default; shapes 8)")
    model.add_argument("--fuse", default="layer", choices=FUSES,
                       help="Stack Fuse variant, Table III: layer = one-hot layers + RGB (the paper's, default), "
                            "direct = label as a 4th channel, insert = label copied after each RGB channel")
    model.add_argument("--pos-embed", default="2d", choices=("2d", "1d"),
                       help="fixed sin-cos positions: 2d (MAE, default) or 1d (the paper's Eqs. 2-3), CHOICE C2")
    model.add_argument("--ips", action=argparse.BooleanOptionalAction, default=True,
                       help="Image Patch Supplement (Sec. III-C); --no-ips uses MAE's learned mask token (Fig. 6)")
    model.add_argument("--drop-path", type=float, default=None,
                       help="largest stochastic-depth rate (CHOICE C6; default 0.1, shapes 0)")

    masking = parser.add_argument_group("masking")
    masking.add_argument("--mask-ratio", type=float, default=0.5,
                         help="fraction of patches hidden (paper: 0.5 and 0.6 in Table I, 0.5-0.8 in Table II/Fig. 6)")
    masking.add_argument("--mask-strategy", default="mixed", choices=STRATEGIES + ("mixed",),
                         help="Sec. III-B: random, label-first, background-first, or mixed per sample (default)")
    masking.add_argument("--mix", type=parse_mix, default=(1.0, 2.0, 2.0),
                         help="mixing weights random:label-first:background-first for --mask-strategy mixed "
                              "(paper: 1:2:2)")
    masking.add_argument("--eval-mask-strategy", default="random", choices=STRATEGIES + ("mixed",),
                         help="strategy of the validation masks (CHOICE C10; default random)")

    loss = parser.add_argument_group("loss (Eqs. 10-12)")
    loss.add_argument("--class-weighting", default="none", choices=("paper", "none"),
                      help="paper: Eq. (10) weights from class proportions with learnable beta, gamma; none: "
                           "w_i = 1 in Eqs. (11)-(12), plain CE (default; see DEVIATION in the docstring)")
    loss.add_argument("--freeze-weights", action="store_true",
                      help="keep beta and gamma at their initial values (CHOICE C7)")
    loss.add_argument("--beta-init", type=float, default=1.0, help="initial beta of Eq. (10), > 0 (CHOICE C7)")
    loss.add_argument("--gamma-init", type=float, default=GAMMA_INIT, help="initial gamma of Eq. (10) (CHOICE C7)")
    loss.add_argument("--loss-region", default="masked", choices=("masked", "all"),
                      help="pixels in the loss: those of hidden patches (default, MAE) or all labelled pixels "
                           "(CHOICE C8)")
    loss.add_argument("--ignore-background-in-loss", action=argparse.BooleanOptionalAction, default=False,
                      help="leave background pixels out of the loss, Eq. (12)'s literal reading (CHOICE C8; "
                           "default off)")

    optim = parser.add_argument_group("optimisation (Sec. IV-A)")
    optim.add_argument("--epochs", type=int, default=None, help="paper: 400. Default 400, shapes 40")
    optim.add_argument("--batch-size", type=int, default=None,
                       help="per process; paper: 24 VOC, 48 Cityscapes. Default: those, other sets 24, shapes 16")
    optim.add_argument("--lr", type=float, default=None,
                       help="Adam learning rate; not given in the paper (CHOICE C9): 1e-4, shapes 1e-3")
    optim.add_argument("--weight-decay", type=float, default=1e-4, help="Adam weight decay (paper: 1e-4)")
    optim.add_argument("--plateau-patience", type=int, default=5, help="ReduceLROnPlateau patience (paper: 5)")
    optim.add_argument("--plateau-factor", type=float, default=0.8, help="ReduceLROnPlateau factor (paper: 0.8)")
    optim.add_argument("--plateau-threshold", type=float, default=1e-3,
                       help="ReduceLROnPlateau relative threshold (paper: 0.001)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    run.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                     help="bf16 autocast on CUDA (always off on CPU)")
    run.add_argument("--compile", action="store_true", help="torch.compile the training step")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format for the patch convs")
    run.add_argument("--seed", type=int, default=0, help="seed for weights, data order and masks")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic kernels: bitwise repeatable on one machine, slower")
    run.add_argument("--out", default=None, help="run directory (default runs/lmae-<data>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    run.add_argument("--eval-only", action="store_true", help="only evaluate --checkpoint (or <out>/best.pt)")
    run.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    args = parser.parse_args(argv)
    args.command = "train"

    defaults = DATA_DEFAULTS.get(args.data, DATA_DEFAULTS["other"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_size is None:
        args.eval_size = args.img_size
    if args.out is None:
        args.out = f"runs/lmae-{args.data}"

    for name in ("epochs", "batch_size", "patch_size", "plateau_patience"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("img_size", "eval_size"):
        size = getattr(args, name)
        if size[0] % args.patch_size or size[1] % args.patch_size:
            parser.error(f"--{name.replace('_', '-')} {size[0]}x{size[1]} must be a multiple of --patch-size "
                         f"{args.patch_size} in both sides")
    if not 0.0 < args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    patches = (args.img_size[0] // args.patch_size) * (args.img_size[1] // args.patch_size)
    if not 0 < round(args.mask_ratio * patches) < patches:
        parser.error(f"--mask-ratio {args.mask_ratio} hides {round(args.mask_ratio * patches)} of {patches} patches; "
                     f"at least one must be hidden and one visible (change --mask-ratio or --img-size)")
    if args.lr <= 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.beta_init <= 0:
        parser.error(f"--beta-init must be positive (beta is learned as log beta), got {args.beta_init}")
    if args.weight_decay < 0:
        parser.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0.0 < args.plateau_factor < 1.0:
        parser.error(f"--plateau-factor must be between 0 and 1 (exclusive), got {args.plateau_factor}")
    if not 0.0 <= args.drop_path < 1.0:
        parser.error(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if not 0 <= args.background_class < IGNORE:
        parser.error(f"--background-class must be a class id in 0..254, got {args.background_class}")
    dims = PRESETS[args.preset]
    if dims["encoder_dim"] % 4 or dims["decoder_dim"] % 4:
        parser.error(f"--preset {args.preset}: widths must be multiples of 4 for the sin-cos positions")
    if args.resume and args.eval_only:
        parser.error("--resume and --eval-only exclude each other")
    if args.checkpoint and not args.eval_only:
        parser.error("--checkpoint is read with --eval-only (use --resume to continue training)")
    if args.checkpoint and not Path(args.checkpoint).is_file():
        parser.error(f"--checkpoint {args.checkpoint}: no such file")
    args.num_patches = patches  # derived, printed and saved with the run
    args.num_hidden = round(args.mask_ratio * patches)
    return args


def get_complete_args(argv):
    """`lmae.py complete`: fill the unknown pixels of a folder of labels (Sec. III-D, Fig. 4)."""
    parser = argparse.ArgumentParser(
        prog="lmae.py complete",
        description="Complete labels with trained L-MAE checkpoints (Sec. III-D). Known pixels are copied unchanged; "
                    "inputs are only read.")
    parser.add_argument("--checkpoint", nargs="+", required=True,
                        help="one or more lmae.py checkpoints, ideally trained at different --mask-ratio values; "
                             "each image goes to the one whose ratio fits its unknown share (Fig. 4)")
    parser.add_argument("--images", required=True, help="folder of images (<name>.png/.jpg/...)")
    parser.add_argument("--labels", required=True,
                        help="folder of label PNGs with the images' names: class ids (grey or palette), "
                             "255 = unknown")
    parser.add_argument("--unknown", default=None,
                        help="folder of masks with the labels' names, non-zero = unknown pixel; then 255 outside "
                             "the masks stays void")
    parser.add_argument("--truth", default=None,
                        help="folder of complete labels (same names) to score the completion: PA-mIoU over the "
                             "filled pixels, mIoU over all pixels")
    parser.add_argument("--out", required=True, help="new folder for the completed palette PNGs and report.csv")
    parser.add_argument("--route", default="unknown", choices=("unknown", "background"),
                        help="unknown: share of patches holding unknown pixels (default); background: share of "
                             "background + unknown pixels, the paper's words (CHOICE C12)")
    parser.add_argument("--size", type=parse_size, default=None,
                        help="model input HxW (multiple of the patch size); default: the checkpoint's --eval-size")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True,
                        help="bf16 autocast on CUDA (always off on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tie-breaks between patches")
    args = parser.parse_args(argv)
    args.command = "complete"
    for name in ("images", "labels", "unknown", "truth"):
        folder = getattr(args, name)
        if folder is not None and not Path(folder).is_dir():
            parser.error(f"--{name} {folder}: no such folder")
    for path in args.checkpoint:
        if not Path(path).is_file():
            parser.error(f"--checkpoint {path}: no such file")
    out = Path(args.out).resolve()
    for name in ("images", "labels", "unknown", "truth"):
        folder = getattr(args, name)
        if folder is not None and Path(folder).resolve() in (out, *out.parents):
            parser.error(f"--out {args.out} is (inside) the input folder --{name} {folder}: inputs are never "
                         f"overwritten; choose a new --out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {args.out} already exists and is not empty; choose a new folder")
    return args


def get_degrade_args(argv):
    """`lmae.py degrade`: hide patches of a dataset's labels (Sec. IV-C) so that `complete` can be scored."""
    parser = argparse.ArgumentParser(
        prog="lmae.py degrade",
        description="Write a copy of a dataset split with a fraction of every label's patches set to 255 "
                    "(Sec. IV-C): <out>/images, labels (degraded), unknown (255 = hidden), truth (complete).")
    parser.add_argument("--data", default="shapes", choices=[n for n in DATASET_NAMES if n not in IMAGE_ONLY_SETS],
                        help="dataset (common.py readers); default shapes")
    parser.add_argument("--data-root", default=None, help="dataset root in its original layout")
    parser.add_argument("--download", action="store_true", help="let torchvision download the set where it can")
    parser.add_argument("--split", default="train", help="split to degrade (default train)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--img-size", type=parse_size, default=(64, 64), help="size shapes are drawn at (shapes only)")
    parser.add_argument("--ratio", type=float, default=0.5,
                        help="fraction of each label's patches set to 255 (paper: 50 %%)")
    parser.add_argument("--patch-size", type=int, default=16, help="patch side in pixels (default 16)")
    parser.add_argument("--strategy", default="random", choices=STRATEGIES + ("mixed",),
                        help="which patches are hidden (default random, Sec. IV-C; CHOICE C13)")
    parser.add_argument("--mix", type=parse_mix, default=(1.0, 2.0, 2.0), help="weights for --strategy mixed")
    parser.add_argument("--background-class", type=int, default=0, help="background id for the strategies (C4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hidden patches")
    parser.add_argument("--out", required=True, help="new folder for the degraded copy")
    args = parser.parse_args(argv)
    args.command = "degrade"
    if not 0.0 < args.ratio < 1.0:
        parser.error(f"--ratio must be between 0 and 1 (exclusive), got {args.ratio}")
    if args.patch_size < 1:
        parser.error(f"--patch-size must be >= 1, got {args.patch_size}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        parser.error(f"--out {args.out} already exists and is not empty; choose a new folder")
    if args.data_root is not None and Path(args.data_root).resolve() in (out.resolve(), *out.resolve().parents):
        parser.error(f"--out {args.out} is (inside) --data-root: the dataset is never modified; choose a new --out")
    return args


# --- Stack Fuse (Sec. III-A) ---

def fuse_channels(fuse, num_classes):
    """C_f, the number of fuse-map channels of each Stack Fuse variant."""
    return {"layer": num_classes + 3, "direct": 4, "insert": 6}[fuse]


def stack_fuse(images, labels, num_classes, fuse="layer"):
    """Fuse map of images (B, 3, H, W) float and labels (B, H, W) int64 (255 = void) -> (B, C_f, H, W).

    layer  (Eq. 1): FuseMap = Concat(l_1, ..., l_N, image), l_i the one-hot layer of class i; void all-zero
            (CHOICE C1).
    direct: Concat(image, label) with label = (id + 1) / K, void 0 (Table III "Directly Concat").
    insert: (R, label, G, label, B, label), the label copied after each RGB channel (Table III "Insert Concat").
    """
    void = labels == IGNORE
    if fuse == "layer":
        one_hot = F.one_hot(torch.where(void, num_classes, labels), num_classes + 1)[..., :num_classes]  # (B,H,W,K)
        layers = one_hot.permute(0, 3, 1, 2).to(images.dtype)  # (B, K, H, W)
        return torch.cat([layers, images], dim=1)  # (B, K + 3, H, W)
    level = torch.where(void, 0.0, (labels.to(images.dtype) + 1) / num_classes).unsqueeze(1)  # (B, 1, H, W)
    if fuse == "direct":
        return torch.cat([images, level], dim=1)  # (B, 4, H, W)
    red, green, blue = images.split(1, dim=1)
    return torch.cat([red, level, green, level, blue, level], dim=1)  # (B, 6, H, W)


# --- masking (Sec. III-B) ---

def patch_fractions(labels, patch_size, background_class):
    """labels (B, H, W) int64 -> (object fraction, background fraction) per patch, each (B, L) float in [0, 1].

    Object = neither background nor void; patches are numbered row-major.
    """
    B, H, W = labels.shape
    P = patch_size
    patches = labels.reshape(B, H // P, P, W // P, P)
    background = (patches == background_class).float().mean(dim=(2, 4)).flatten(1)  # (B, L)
    objects = ((patches != background_class) & (patches != IGNORE)).float().mean(dim=(2, 4)).flatten(1)  # (B, L)
    return objects, background


def rank_patches(keys, generator=None):
    """Order of the patches, most preferred first: by keys[0] descending, then keys[1], ...; remaining ties in a
    uniformly random order (CHOICE C3).

    keys: list of (B, L) float tensors. Returns ids (B, L) int64, a permutation of 0..L-1 per sample.
    """
    B, L = keys[0].shape
    noise = torch.rand(B, L, device=keys[0].device, generator=generator)
    order = noise.argsort(dim=1)  # a random permutation: the tie-break
    for key in reversed(keys):  # least significant key first; a stable sort keeps the previous order among ties
        order = order.gather(1, key.gather(1, order).argsort(dim=1, descending=True, stable=True))
    return order


def hide_first(ranked, num_hidden):
    """ranked (B, L) patch ids, most preferred first -> mask (B, L) bool (True = hidden), ids_keep (B, L - n)."""
    mask = torch.zeros(ranked.shape, dtype=torch.bool, device=ranked.device)
    mask.scatter_(1, ranked[:, :num_hidden], True)
    return mask, ranked[:, num_hidden:]


def draw_strategies(batch_size, strategy, mix, device, generator=None):
    """(B,) int64 strategy id per sample (index into STRATEGIES); `mixed` draws with weights `mix` (Sec. III-B)."""
    if strategy != "mixed":
        return torch.full((batch_size,), STRATEGIES.index(strategy), dtype=torch.int64, device=device)
    total = sum(mix)
    first, second = mix[0] / total, (mix[0] + mix[1]) / total  # cumulative weights as Python floats: no host copy
    u = torch.rand(batch_size, device=device, generator=generator)
    return (u >= first).long() + (u >= second).long()


def training_mask(labels, strategy, mix, mask_ratio, patch_size, background_class, generator=None):
    """Hide exactly round(mask_ratio * L) patches of every sample with the chosen strategy (Sec. III-B).

    labels (B, H, W) int64. Returns mask (B, L) bool, True = hidden, and ids_keep (B, L_vis) int64.
    random: every patch alike; label-first: most object pixels first; background-first: most background first.
    """
    B = labels.shape[0]
    objects, background = patch_fractions(labels, patch_size, background_class)  # (B, L) each
    ids = draw_strategies(B, strategy, mix, labels.device, generator)[:, None]  # (B, 1)
    score = torch.where(ids == 1, objects, torch.where(ids == 2, background, torch.zeros_like(objects)))  # (B, L)
    num_hidden = round(mask_ratio * score.shape[1])
    return hide_first(rank_patches([score], generator), num_hidden)


def pixel_mask(mask, patch_size, grid):
    """Patch mask (B, L) bool -> pixel mask (B, H, W) bool, H = gh * P, W = gw * P."""
    gh, gw = grid
    P = patch_size
    B = mask.shape[0]
    return mask.view(B, gh, 1, gw, 1).expand(B, gh, P, gw, P).reshape(B, gh * P, gw * P)


# --- model (Sec. III-C) ---

def sincos_1d(dim, positions, interleave):
    """Fixed sin-cos embedding of positions (N,) float -> (N, dim).

    Eqs. (2)-(3): PE(pos, 2i) = sin(pos / 10000^(2i/dim)), PE(pos, 2i+1) = cos(pos / 10000^(2i/dim)).
    interleave=False puts all sines before all cosines (MAE's layout; same values).
    """
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) * 2 / dim)
    angles = positions.double()[:, None] * omega[None, :]  # (N, dim/2)
    if interleave:
        return torch.stack([angles.sin(), angles.cos()], dim=2).flatten(1).float()  # (N, dim)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()  # (N, dim)


def sincos_pos_embed(dim, grid, kind="2d", device=None):
    """(L, dim) fixed positions for a gh x gw patch grid (any aspect ratio, CHOICE C2).

    2d (MAE): half the channels encode the row, half the column. 1d: the paper's Eqs. (2)-(3) over the
    row-major patch index pos = row * gw + column.
    """
    gh, gw = grid
    if kind == "1d":
        return sincos_1d(dim, torch.arange(gh * gw, device=device), interleave=True)
    rows = torch.arange(gh, device=device).repeat_interleave(gw)  # (L,)
    columns = torch.arange(gw, device=device).repeat(gh)  # (L,)
    return torch.cat([sincos_1d(dim // 2, rows, False), sincos_1d(dim // 2, columns, False)], dim=1)  # (L, dim)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability p (scaled at training)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, device=x.device) >= self.p  # (B, 1, 1)
        return x * keep.to(x.dtype) / (1.0 - self.p)


class Attention(nn.Module):
    """MulAttn: h heads of scaled dot-product attention, Eqs. (6)-(8)."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # W^Q, W^K, W^V of all heads at once, Eq. (6)
        self.proj = nn.Linear(dim, dim)  # W^O, Eq. (8)

    def forward(self, x):  # x (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, D/h)
        # Eq. (7): Z_i = softmax(Q_i K_i^T / sqrt(d_k)) V_i; the fused kernels (flash / memory-efficient on GPU)
        # never build the N x N matrix.
        z = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        return self.proj(z.transpose(1, 2).reshape(B, N, D))  # Eq. (8): concat(Z_1..Z_h) W^O, (B, N, D)


class LMMSABlock(nn.Module):
    """L-MAE Multi-Head Attention block, Eqs. (4)-(5), pre-norm: x + DropPath(MulAttn(LN(x))), then
    x + DropPath(FFN(LN(x))) with FFN(x) = ReLU(x W1 + b1) W2 + b2, Eq. (9), hidden width 4 D."""

    def __init__(self, dim, heads, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.ReLU(), nn.Linear(4 * dim, dim))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):  # (B, N, D)
        x = x + self.drop_path(self.attn(self.norm1(x)))  # Eq. (4)
        return x + self.drop_path(self.ffn(self.norm2(x)))  # Eq. (5)


class ClassWeighting(nn.Module):
    """Eq. (10) class weights w_i from class proportions x_i, with learnable beta (as log beta) and gamma (C7).

    Lives inside LMAE so that the optimizer, DDP and the checkpoints see beta and gamma.
    """

    def __init__(self, learnable=True, beta=1.0, gamma=GAMMA_INIT, xi=1e-6):
        super().__init__()
        self.log_beta = nn.Parameter(torch.tensor(math.log(beta)), requires_grad=learnable)
        self.gamma = nn.Parameter(torch.tensor(float(gamma)), requires_grad=learnable)
        self.xi = xi

    def forward(self, proportions):  # (K,) float, sums to 1 -> (K,) weights in (0, 1)
        standardised = (proportions - proportions.mean()) / (proportions.var(unbiased=False) + self.xi)
        # Eq. (10): w_i = 1 - 1 / (1 + beta * exp(-(x_i - E(x)) / (V(x) + xi))^gamma)
        #               = sigmoid(log beta - gamma * (x_i - E(x)) / (V(x) + xi))
        return torch.sigmoid(self.log_beta - self.gamma * standardised)


class LMAE(nn.Module):
    """Label Masked Autoencoder (Fig. 3): Stack Fuse -> patch embedding + positions -> encoder on visible tokens
    -> Image Patch Supplement (or mask token) -> decoder on all L tokens -> per-pixel class logits."""

    def __init__(self, num_classes, patch_size=16, encoder_depth=8, decoder_depth=6, encoder_dim=1440,
                 decoder_dim=720, encoder_heads=20, decoder_heads=10, fuse="layer", ips=True, pos_embed="2d",
                 drop_path=0.0, learn_class_weights=True, beta_init=1.0, gamma_init=GAMMA_INIT):
        super().__init__()
        self.num_classes, self.patch_size, self.fuse, self.ips, self.pos_embed = (num_classes, patch_size, fuse,
                                                                                   ips, pos_embed)
        P = patch_size
        # A P x P convolution with stride P is the per-patch linear map of Sec. III-A (fast with channels_last).
        self.patch_embed = nn.Conv2d(fuse_channels(fuse, num_classes), encoder_dim, P, stride=P)
        depth = encoder_depth + decoder_depth
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]  # CHOICE C6: 0 -> drop_path
        self.encoder = nn.ModuleList([LMMSABlock(encoder_dim, encoder_heads, rates[i])
                                      for i in range(encoder_depth)])
        self.encoder_norm = nn.LayerNorm(encoder_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(encoder_dim, decoder_dim)
        if ips:  # Sec. III-C: F_di, a patch embedding of the image into the decoder width
            self.image_patch_embed = nn.Conv2d(3, decoder_dim, P, stride=P)
        else:  # MAE's learned mask token (the "w/o IPS" rows of Fig. 6)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder = nn.ModuleList([LMMSABlock(decoder_dim, decoder_heads, rates[encoder_depth + i])
                                      for i in range(decoder_depth)])
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.head = nn.Linear(decoder_dim, P * P * num_classes)  # every token -> K logits for each of its pixels
        self.class_weighting = ClassWeighting(learn_class_weights, beta_init, gamma_init)
        self.initialize()

    def initialize(self):
        """MAE's initialisation: xavier-uniform linear maps (patch convolutions seen as linear), zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if not self.ips:
            nn.init.normal_(self.mask_token, std=0.02)

    def encode(self, fuse_map, ids_keep):
        """fuse_map (B, C_f, H, W), ids_keep (B, L_vis) -> encoded visible tokens (B, L_vis, D_e)."""
        tokens = self.patch_embed(fuse_map)  # (B, D_e, gh, gw)
        grid = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, L, D_e)
        # Eqs. (2)-(3): fixed sin-cos positions, computed for this grid
        tokens = tokens + sincos_pos_embed(tokens.shape[-1], grid, self.pos_embed, tokens.device).to(tokens.dtype)
        visible = tokens.gather(1, ids_keep[..., None].expand(-1, -1, tokens.shape[-1]))  # (B, L_vis, D_e)
        for block in self.encoder:
            visible = block(visible)
        return self.encoder_norm(visible)

    def decoder_input(self, latent, images, ids_keep):
        """Full token sequence for the decoder (B, L, D_d), positions not yet added.

        Visible positions: the encoder output mapped to the decoder width. Hidden positions: with IPS the
        embedding of the image patch at that position (Sec. III-C, Fig. 5), else the mask token.
        """
        visible = self.decoder_embed(latent)  # (B, L_vis, D_d)
        if self.ips:
            tokens = self.image_patch_embed(images).flatten(2).transpose(1, 2).to(visible.dtype)  # (B, L, D_d)
        else:
            B, L = images.shape[0], (images.shape[2] // self.patch_size) * (images.shape[3] // self.patch_size)
            tokens = self.mask_token.to(visible.dtype).expand(B, L, -1)  # (B, L, D_d)
        # "insert these patches into F_e": visible positions take the encoder's tokens, hidden keep the supplement
        return tokens.scatter(1, ids_keep[..., None].expand(-1, -1, visible.shape[-1]), visible)  # (B, L, D_d)

    def decode(self, tokens, grid):
        """tokens (B, L, D_d) -> logits (B, K, H, W) for the gh x gw grid."""
        gh, gw = grid
        P, K = self.patch_size, self.num_classes
        tokens = tokens + sincos_pos_embed(tokens.shape[-1], grid, self.pos_embed, tokens.device).to(tokens.dtype)
        for block in self.decoder:
            tokens = block(tokens)
        logits = self.head(self.decoder_norm(tokens))  # (B, L, P*P*K)
        B = logits.shape[0]
        return logits.view(B, gh, gw, P, P, K).permute(0, 5, 1, 3, 2, 4).reshape(B, K, gh * P, gw * P)

    def forward(self, images, labels, ids_keep):
        """images (B, 3, H, W) normalised, labels (B, H, W) int64 (255 = void/unknown; hidden patches' labels are
        never seen), ids_keep (B, L_vis) visible patch ids -> logits (B, K, H, W)."""
        grid = (images.shape[2] // self.patch_size, images.shape[3] // self.patch_size)
        fuse_map = stack_fuse(images, labels, self.num_classes, self.fuse)  # (B, C_f, H, W), Eq. (1)
        latent = self.encode(fuse_map, ids_keep)  # (B, L_vis, D_e)
        return self.decode(self.decoder_input(latent, images, ids_keep), grid)  # (B, K, H, W)


def build_model(config, num_classes):
    """LMAE from a config dict or Namespace (preset, patch_size, fuse, ips, pos_embed, drop_path, ...)."""
    config = config if isinstance(config, dict) else vars(config)
    return LMAE(num_classes, config["patch_size"], **PRESETS[config["preset"]], fuse=config["fuse"],
                ips=config["ips"], pos_embed=config["pos_embed"], drop_path=config["drop_path"],
                learn_class_weights=config["class_weighting"] == "paper" and not config["freeze_weights"],
                beta_init=config["beta_init"],
                gamma_init=config["gamma_init"])


def count_parameters(preset, num_classes=21, patch_size=16, fuse="layer", ips=True):
    """Parameters of a preset, counted on the meta device (no memory), without Eq. (10)'s beta and gamma."""
    with torch.device("meta"):
        model = LMAE(num_classes, patch_size, **PRESETS[preset], fuse=fuse, ips=ips)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("class_weighting"))


# --- loss (Sec. III-E) ---

def lmae_loss(logits, labels, hidden_pixels, class_weighting, loss_region="all", ignore_background=False,
              background_class=0):
    """Class-weighted cross-entropy, Eqs. (10)-(12).

    logits (B, K, H, W) float, labels (B, H, W) int64 (255 = void), hidden_pixels (B, H, W) bool.
    class_weighting: ClassWeighting module, or None for plain CE (--class-weighting none). Returns a scalar.
    """
    K = logits.shape[1]
    counted = labels != IGNORE  # which pixels count: CHOICE C8
    if loss_region == "masked":
        counted = counted & hidden_pixels
    if ignore_background:
        counted = counted & (labels != background_class)
    targets = torch.where(counted, labels, 0)  # (B, H, W), in range everywhere
    per_pixel = F.cross_entropy(logits.float(), targets, reduction="none")  # -log softmax(x_n)[y_n], Eq. (11)
    if class_weighting is None:  # DEVIATION: the default, w_i = 1 (module docstring, "Deviations")
        weights = torch.ones(K, device=logits.device)
    else:
        counts = torch.zeros(K, device=logits.device).scatter_add_(0, targets.flatten(), counted.flatten().float())
        weights = class_weighting(counts / counts.sum().clamp(min=1.0))  # Eq. (10), x_i = class proportions (C7)
    pixel_weights = weights[targets] * counted  # w_{y_n} * 1{y_n != ignore}, (B, H, W)
    # Eq. (12): l = sum_n w_{y_n} l_n / sum_n w_{y_n}, over the counted pixels
    return (pixel_weights * per_pixel).sum() / pixel_weights.sum().clamp(min=1e-12)


def most_frequent_visible_class(labels, hidden_pixels, num_classes):
    """Baseline completion: per image the most frequent labelled class among visible pixels -> (B,) int64."""
    B = labels.shape[0]
    visible = (labels != IGNORE) & ~hidden_pixels
    ids = torch.where(visible, labels, num_classes).flatten(1)  # (B, H*W), num_classes = not counted
    counts = torch.zeros(B, num_classes + 1, device=labels.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float))  # (B, K + 1) pixels per class
    return counts[:, :num_classes].argmax(dim=1)


# --- loops ---

def autocast(args, device):
    """bf16 autocast on CUDA when --amp; a no-op context elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda")


def train_step(model, optimizer, images, labels, args):
    """One step: draw masks (Sec. III-B), forward, Eqs. (10)-(12), Adam. Returns the loss (0-dim, on device)."""
    net = model.module if isinstance(model, DistributedDataParallel) else model
    mask, ids_keep = training_mask(labels, args.mask_strategy, args.mix, args.mask_ratio, args.patch_size,
                                   args.background_class)  # (B, L), (B, L_vis)
    grid = (labels.shape[1] // args.patch_size, labels.shape[2] // args.patch_size)
    with autocast(args, images.device):
        logits = model(images, labels, ids_keep)  # (B, K, H, W)
    weighting = net.class_weighting if args.class_weighting == "paper" else None
    loss = lmae_loss(logits, labels, pixel_mask(mask, args.patch_size, grid), weighting, args.loss_region,
                     args.ignore_background_in_loss, args.background_class)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(model, optimizer, loader, step, args, device):
    """One pass over the training loader; returns the mean loss over all ranks (float)."""
    model.train()
    total = torch.zeros(2, device=device)  # loss sum, steps
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        total[0] += step(model, optimizer, images, labels, args)
        total[1] += 1
    if dist.is_initialized():
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()  # sync point


@torch.no_grad()
def evaluate(model, loader, args, device, num_classes, rank=0):
    """Validation with masks from a reseeded generator (CHOICE C10).

    Returns, over all ranks: loss; pa_miou, the mIoU of the hidden pixels (PA-mIoU, Sec. IV-B); miou, the mIoU of
    the completed label (given label on visible patches, prediction on hidden ones: what `complete` writes; the
    paper's "global mIoU", CHOICE C8); pred_miou, the mIoU of the raw prediction on every pixel; per-class IoUs;
    baseline_pa_miou, PA-mIoU of filling the hidden pixels with each image's most frequent visible class.
    """
    model.eval()
    generator = torch.Generator(device=device).manual_seed(args.seed + 7919 * rank)
    hidden_matrix = ConfusionMatrix(num_classes, device=device)
    completed_matrix = ConfusionMatrix(num_classes, device=device)
    prediction_matrix = ConfusionMatrix(num_classes, device=device)
    baseline_matrix = ConfusionMatrix(num_classes, device=device)
    total = torch.zeros(2, device=device)  # loss sum, batches
    weighting = model.class_weighting if args.class_weighting == "paper" else None
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        mask, ids_keep = training_mask(labels, args.eval_mask_strategy, args.mix, args.mask_ratio, args.patch_size,
                                       args.background_class, generator)  # (B, L)
        grid = (labels.shape[1] // args.patch_size, labels.shape[2] // args.patch_size)
        hidden = pixel_mask(mask, args.patch_size, grid)  # (B, H, W)
        with autocast(args, device):
            logits = model(images, labels, ids_keep)  # (B, K, H, W)
        total[0] += lmae_loss(logits, labels, hidden, weighting, args.loss_region, args.ignore_background_in_loss,
                              args.background_class)
        total[1] += 1
        preds = logits.argmax(dim=1)  # (B, H, W)
        hidden_matrix.update(preds, labels, region=hidden)  # PA-mIoU: only the hidden (predicted) area
        completed_matrix.update(torch.where(hidden, preds, labels), labels)
        prediction_matrix.update(preds, labels)
        baseline = most_frequent_visible_class(labels, hidden, num_classes)[:, None, None].expand_as(labels)
        baseline_matrix.update(baseline, labels, region=hidden)
    if dist.is_initialized():
        dist.all_reduce(total)
    hidden_scores = hidden_matrix.all_reduce().compute()
    completed_scores = completed_matrix.all_reduce().compute()
    return {
        "loss": (total[0] / total[1].clamp(min=1)).item(),  # sync point
        "pa_miou": hidden_scores["miou"],
        "miou": completed_scores["miou"],
        "pred_miou": prediction_matrix.all_reduce().compute()["miou"],
        "baseline_pa_miou": baseline_matrix.all_reduce().compute()["miou"],
        "pa_pixel_acc": hidden_scores["pixel_acc"],
        "pa_per_class_iou": hidden_scores["per_class_iou"],
        "per_class_iou": completed_scores["per_class_iou"],
    }


def colorize(labels, palette):
    """labels (B, H, W) int64 -> (B, 3, H, W) float in [0, 1]; void/unknown (255) white."""
    table = torch.full((256, 3), 255, dtype=torch.uint8)
    table[:len(palette)] = torch.tensor(palette, dtype=torch.uint8)[:256]
    return table.to(labels.device)[labels].permute(0, 3, 1, 2).float() / 255


@torch.no_grad()
def save_samples(model, images, labels, args, palette, path):
    """PNG grid, one row per image: image | masked fuse map (visible label over the image, hidden patches dark) |
    completed label (prediction in hidden patches, given label elsewhere) | truth."""
    model.eval()
    device = images.device
    generator = torch.Generator(device=device).manual_seed(args.seed)
    mask, ids_keep = training_mask(labels, args.eval_mask_strategy, args.mix, args.mask_ratio, args.patch_size,
                                   args.background_class, generator)
    grid = (labels.shape[1] // args.patch_size, labels.shape[2] // args.patch_size)
    hidden = pixel_mask(mask, args.patch_size, grid)[:, None]  # (B, 1, H, W)
    with autocast(args, device):
        preds = model(images, labels, ids_keep).argmax(dim=1)  # (B, H, W)
    image = denormalize(images.float(), "imagenet")  # (B, 3, H, W) in [0, 1]
    truth = colorize(labels, palette)
    masked_fuse = torch.where(hidden, image * 0.25, 0.5 * image + 0.5 * truth)
    completed = torch.where(hidden, colorize(preds, palette), truth)
    rows = torch.cat([image, masked_fuse, completed, truth], dim=3)  # (B, 3, H, 4W)
    picture = (rows.permute(0, 2, 3, 1).reshape(-1, rows.shape[3], 3) * 255).round().byte().cpu().numpy()
    Image.fromarray(picture).save(path)


# --- plumbing ---

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def setup_distributed(args):
    """-> (rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; nccl on CUDA, gloo on CPU."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    else:
        device = torch.device("cuda" if use_cuda else "cpu")
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 matmuls where autocast is off
        torch.backends.cudnn.allow_tf32 = True
    return rank, world_size, device


def rng_states():
    """RNG states as tensors and plain numbers (loadable with torch.load(weights_only=True))."""
    numpy_state = np.random.get_state()
    states = {"python": random.getstate(), "numpy_keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
              "numpy_rest": [numpy_state[2], numpy_state[3], numpy_state[4]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in states["python"]))
    rest = states["numpy_rest"]
    np.random.set_state(("MT19937", states["numpy_keys"].numpy().astype(np.uint32), rest[0], rest[1], rest[2]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(path, model, optimizer, scheduler, epoch, best, args, info, loader_generator):
    """Model (unwrapped from DDP / torch.compile), optimizer, scheduler, epoch, best PA-mIoU, args, dataset info and
    RNG states; written to a temporary file, then renamed, so a crash never leaves half a checkpoint."""
    net = model.module if isinstance(model, DistributedDataParallel) else model
    state = {
        "model": net.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "epoch": epoch, "best_pa_miou": best, "args": config_of(args),
        "info": {"num_classes": info.num_classes, "class_names": list(info.class_names),
                 "palette": [list(c) for c in info.palette]},
        "rng": rng_states(), "loader_generator": loader_generator.get_state(),
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    """A checkpoint written by save_checkpoint; one clear message when the file is not one."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:
        raise SystemExit(f"error: cannot read checkpoint {path} ({type(error).__name__}); pass a best.pt or "
                         f"last.pt written by lmae.py") from None
    if not isinstance(state, dict) or not {"model", "args", "info"} <= set(state):
        raise SystemExit(f"error: {path} is not an lmae.py checkpoint (no model/args/info); pass a best.pt or "
                         f"last.pt written by lmae.py")
    return state


def config_of(args):
    """args as a JSON-able dict (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def build_loaders(args, rank, world_size):
    """Training and validation loaders (Sec. IV-A crops; CHOICE C10, C11) and the dataset info."""
    shapes = args.data == "shapes"
    crop_only = args.crop is not None and tuple(args.crop) == tuple(args.img_size)  # Cityscapes: crop 448, no resize
    train_transform = joint_transform(size=None if shapes or crop_only else args.img_size, crop=args.crop)
    val_transform = joint_transform(size=None if shapes else args.eval_size)
    common = dict(root=args.data_root, download=args.download, limit=args.limit, seed=args.seed)
    shapes_size = lambda size: {"image_size": size} if shapes else {}  # the size shapes are drawn at
    train_set, info = build_dataset(args.data, split="train", transform=train_transform, **common,
                                    **shapes_size(args.img_size))
    val_set, _ = build_dataset(args.data, split="val", transform=val_transform, **common,
                               **shapes_size(args.eval_size))
    per_rank = len(train_set) // world_size
    if per_rank < 1:
        raise DatasetError(f"{args.data}: {len(train_set)} training images cannot be shared by {world_size} "
                           f"processes; use fewer processes or more images (--limit)")
    sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=True)
    generator = torch.Generator().manual_seed(args.seed + rank)  # worker seeds; saved with the checkpoint
    cuda = args.device_type == "cuda"
    loader_options = dict(num_workers=args.workers, pin_memory=cuda, persistent_workers=args.workers > 0)
    # full batches only (static shapes for torch.compile), unless the split is smaller than one batch
    train_loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, generator=generator,
                              drop_last=per_rank >= args.batch_size, **loader_options)
    val_part = Subset(val_set, range(rank, len(val_set), world_size))  # every image exactly once over the ranks
    eval_batch = max(1, args.batch_size * args.img_size[0] * args.img_size[1]
                     // (args.eval_size[0] * args.eval_size[1]))  # about the same pixels per batch as training
    # its own generator: iterating it never draws from the global RNG, so evaluation leaves the training
    # stream (masks, augmentation) untouched and --resume stays bit-exact
    val_loader = DataLoader(val_part, batch_size=eval_batch, shuffle=False,
                            generator=torch.Generator().manual_seed(args.seed), **loader_options)
    return train_loader, val_loader, sampler, generator, info


def metrics_line(record):
    """`key=value` fields of the scalar entries of a record (lists and dicts are left to the JSON files)."""
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                    if not isinstance(v, (list, dict)))


# --- main: training ---

def main(args):
    if args.command == "complete":
        return complete(args)
    if args.command == "degrade":
        return degrade(args)

    rank, world_size, device = setup_distributed(args)
    args.device_type = device.type
    args.world_size = world_size
    out = Path(args.out)
    if not args.resume and not args.eval_only and (out / "last.pt").exists():
        raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume and not (out / "last.pt").is_file():
        raise SystemExit(f"error: --resume but {out / 'last.pt'} does not exist; check --out")
    if dist.is_initialized():
        dist.barrier()  # every rank has checked --out before rank 0 writes into it

    train_loader, val_loader, sampler, loader_generator, info = build_loaders(args, rank, world_size)
    K = info.num_classes
    if not 0 <= args.background_class < K:
        raise SystemExit(f"error: --background-class {args.background_class} is not a class of {args.data} "
                         f"(0..{K - 1})")

    if args.eval_only:
        path = args.checkpoint or out / "best.pt"
        state = load_checkpoint(path)
        saved = state["args"]
        for key in ("preset", "patch_size", "fuse", "ips", "pos_embed", "mask_ratio", "loss_region",
                    "class_weighting", "ignore_background_in_loss", "background_class"):
            setattr(args, key, saved[key])
        model = build_model(saved, K).to(device)
        model.load_state_dict(state["model"])
        metrics = evaluate(model, val_loader, args, device, K, rank)
        if rank == 0:
            print(f"eval checkpoint={path} {metrics_line(metrics)}")
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps({"checkpoint": str(path), **metrics}, indent=2))
        if dist.is_initialized():
            dist.destroy_process_group()
        return metrics

    seed_everything(args.seed)  # identical initial weights on every rank
    model = build_model(args, K).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    weighting = list(model.class_weighting.parameters())
    others = [p for name, p in model.named_parameters() if not name.startswith("class_weighting")]
    optimizer = torch.optim.Adam([{"params": others}, {"params": weighting, "weight_decay": 0.0}],  # C7
                                 lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(  # Sec. IV-A
        optimizer, mode="min", patience=args.plateau_patience, threshold=args.plateau_threshold,
        factor=args.plateau_factor)
    seed_everything(args.seed + rank)  # a different mask / augmentation stream per rank
    start_epoch, best = 0, -1.0
    if args.resume:
        state = load_checkpoint(out / "last.pt")
        for key in ("preset", "patch_size", "fuse", "ips", "pos_embed", "data"):
            if state["args"][key] != config_of(args)[key]:
                raise SystemExit(f"error: --{key.replace('_', '-')} {getattr(args, key)} differs from the run in "
                                 f"{out} ({state['args'][key]}); resume with the same settings")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best_pa_miou"]
        set_rng_states(state["rng"])
        loader_generator.set_state(state["loader_generator"])
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    step = torch.compile(train_step) if args.compile else train_step
    net = model.module if isinstance(model, DistributedDataParallel) else model

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "samples").mkdir(exist_ok=True)
        config = config_of(args)
        config.update(num_classes=K, class_names=list(info.class_names), train_images=len(train_loader.dataset),
                      val_images=len(val_loader.dataset.dataset), parameters=sum(p.numel() for p in net.parameters()))
        print("config " + json.dumps(config))
        if not args.resume:
            (out / "config.json").write_text(json.dumps(config, indent=2))
    if rank == 0:  # the same six validation images in every samples/ PNG
        sample_images, sample_labels = next(iter(val_loader))
        sample_images, sample_labels = sample_images[:6].to(device), sample_labels[:6].to(device)

    metrics = {}
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        started = time.time()
        train_loss = train_one_epoch(model, optimizer, train_loader, step, args, device)
        metrics = evaluate(net, val_loader, args, device, K, rank)
        scheduler.step(train_loss)  # "threshold of loss dropping" (CHOICE C9)
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
                  "val_loss": metrics["loss"], "pa_miou": metrics["pa_miou"], "miou": metrics["miou"],
                  "pred_miou": metrics["pred_miou"], "baseline_pa_miou": metrics["baseline_pa_miou"],
                  "pa_pixel_acc": metrics["pa_pixel_acc"],
                  "beta": math.exp(net.class_weighting.log_beta.item()), "gamma": net.class_weighting.gamma.item(),
                  "time_s": time.time() - started}  # sync point
        is_best = metrics["pa_miou"] > best
        best = max(best, metrics["pa_miou"])
        if rank == 0:
            print(metrics_line(record), flush=True)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            save_checkpoint(out / "last.pt", model, optimizer, scheduler, epoch, best, args, info, loader_generator)
            if is_best:
                save_checkpoint(out / "best.pt", model, optimizer, scheduler, epoch, best, args, info,
                                loader_generator)
            if is_best or epoch == args.epochs - 1:
                save_samples(net, sample_images, sample_labels, args, info.palette,
                             out / "samples" / f"epoch_{epoch:03d}.png")
    if rank == 0:
        results = {"best_pa_miou": best, "final": metrics, "epochs": args.epochs}
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(f"done best_pa_miou={best:.4f} out={out}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics


# --- label degradation (Sec. IV-C) ---

def degrade_label(label, ratio, patch_size, strategy="random", mix=(1.0, 2.0, 2.0), background_class=0,
                  generator=None):
    """label (H, W) int64 of any size -> (degraded label with round(ratio * patches) patches set to 255,
    hidden pixels (H, W) bool). The patch grid covers the image; edge patches may be partial (CHOICE C13)."""
    H, W = label.shape
    P = patch_size
    gh, gw = math.ceil(H / P), math.ceil(W / P)
    padded = F.pad(label, (0, gw * P - W, 0, gh * P - H), value=IGNORE)[None]  # (1, gh*P, gw*P)
    mask, _ = training_mask(padded, strategy, mix, ratio, P, background_class, generator)
    hidden = pixel_mask(mask, P, (gh, gw))[0, :H, :W]  # (H, W)
    return torch.where(hidden, IGNORE, label), hidden


def save_label_png(path, label, palette):
    """uint8 (H, W) class ids -> palette PNG (indices are the ids; 255 white)."""
    image = Image.fromarray(np.asarray(label, dtype=np.uint8))
    colours = [c for colour in palette[:255] for c in colour]
    image.putpalette(colours + [0] * (765 - len(colours)) + [255, 255, 255])
    image.save(path)


def keep_pixels(image, label):
    """Identity transform: the dataset's own uint8 image (3, H, W) and label (H, W), untouched."""
    return image, label


def degrade(args):
    """Write <out>/images, labels (degraded), unknown (255 = hidden), truth, degrade.json (Sec. IV-C)."""
    options = {"image_size": args.img_size} if args.data == "shapes" else {}
    dataset, info = build_dataset(args.data, args.data_root, args.split, transform=keep_pixels,
                                  download=args.download, limit=args.limit, seed=args.seed, **options)
    out = Path(args.out)
    folders = {name: out / name for name in ("images", "labels", "unknown", "truth")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    hidden_pixels = total_pixels = 0
    for index in range(len(dataset)):
        image, label = dataset[index]  # uint8 (3, H, W), (H, W) class ids with 255 = void
        image, label = image.permute(1, 2, 0).numpy(), label.long()  # (H, W, 3), (H, W) int64
        degraded, hidden = degrade_label(label, args.ratio, args.patch_size, args.strategy, args.mix,
                                         args.background_class, generator)
        name = dataset.names[index].replace("/", "__")
        Image.fromarray(image).save(folders["images"] / f"{name}.png")
        save_label_png(folders["labels"] / f"{name}.png", degraded.numpy(), info.palette)
        save_label_png(folders["truth"] / f"{name}.png", label.numpy(), info.palette)
        Image.fromarray(hidden.numpy().astype(np.uint8) * 255).save(folders["unknown"] / f"{name}.png")
        hidden_pixels += int(hidden.sum())
        total_pixels += hidden.numel()
    summary = {"data": args.data, "split": args.split, "images": len(dataset), "ratio": args.ratio,
               "patch_size": args.patch_size, "strategy": args.strategy, "seed": args.seed,
               "hidden_pixel_fraction": hidden_pixels / max(total_pixels, 1), "num_classes": info.num_classes,
               "class_names": list(info.class_names)}
    (out / "degrade.json").write_text(json.dumps(summary, indent=2))
    print(f"degraded {len(dataset)} labels of {args.data}/{args.split}: {args.ratio:.0%} of the patches, "
          f"{summary['hidden_pixel_fraction']:.1%} of the pixels -> {out}")
    return summary


# --- inference phase: completing a dataset (Sec. III-D, Fig. 4) ---

def files_by_stem(folder):
    return {Path(p).stem: Path(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def read_label_file(path, num_classes, what="label"):
    """Single-channel class-id PNG (grey or palette) -> uint8 (H, W); one DatasetError naming the file."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "1"):
                raise DatasetError(f"{what} {path} has mode {image.mode}; labels must be single-channel class-id "
                                   f"images (grey or palette PNG, 255 = unknown)")
            array = np.array(image.convert("L") if image.mode == "1" else image, dtype=np.uint8)
    except DatasetError:
        raise
    except Exception as error:
        raise DatasetError(f"cannot read {what} {path} ({type(error).__name__}: {error}); replace the file") from None
    if what != "unknown mask":
        bad = (array >= num_classes) & (array != IGNORE)
        if bad.any():
            raise DatasetError(f"{what} {path} has class ids {sorted(np.unique(array[bad]).tolist())[:5]} outside "
                               f"0..{num_classes - 1} (255 = unknown); the checkpoint knows {num_classes} classes")
    return array


def read_image_file(path):
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except Exception as error:
        raise DatasetError(f"cannot read image {path} ({type(error).__name__}: {error}); replace the file") from None


def load_completion_models(paths, device):
    """[(model, saved args, path)] sorted by mask ratio; all checkpoints must agree on the classes."""
    models, info = [], None
    for path in paths:
        state = load_checkpoint(path)
        if info is not None and state["info"]["num_classes"] != info["num_classes"]:
            raise SystemExit(f"error: {path} has {state['info']['num_classes']} classes but {paths[0]} has "
                             f"{info['num_classes']}; all --checkpoint files must be trained on the same classes")
        info = info or state["info"]
        model = build_model(state["args"], state["info"]["num_classes"])
        model.load_state_dict(state["model"])
        models.append((model.to(device).eval(), state["args"], str(path)))
    return sorted(models, key=lambda m: m[1]["mask_ratio"]), info


def model_input_size(config, args):
    """(h, w) a checkpoint is run at: --size, else the size it was validated at (CHOICE C12)."""
    size = tuple(args.size or config["eval_size"])
    P = config["patch_size"]
    if size[0] % P or size[1] % P:
        raise SystemExit(f"error: --size {size[0]}x{size[1]} is not a multiple of the checkpoint's patch size {P}")
    return size


@torch.no_grad()
def complete_image(models, image, label, unknown, args, device, generator):
    """Fill the unknown pixels of one label (Sec. III-D, Fig. 4).

    image uint8 (H, W, 3), label uint8 (H, W), unknown bool (H, W). Returns the completed label uint8 (H, W) (the
    input label with only its unknown pixels replaced) and a report dict.
    """
    H, W = label.shape
    label_t = torch.from_numpy(label).to(device)[None, None].float()  # (1, 1, H, W)
    unknown_t = torch.from_numpy(unknown).to(device)[None, None].float()  # (1, 1, H, W)

    # Fig. 4: route the image to the checkpoint whose mask ratio fits its missing share (CHOICE C12)
    candidates = []
    for model, config, path in models:
        size, P = model_input_size(config, args), config["patch_size"]
        small_unknown = F.interpolate(unknown_t, size=size, mode="nearest")[:, 0].bool()  # (1, h, w)
        small_label = F.interpolate(label_t, size=size, mode="nearest")[:, 0].long()  # (1, h, w)
        small_label = torch.where(small_unknown, IGNORE, small_label)  # unknown pixels: all-zero one-hot
        unknown_share = pixel_mask_fraction(small_unknown, P)  # (1, L) unknown pixels per patch
        background_share = patch_fractions(small_label, P, config["background_class"])[1]  # (1, L)
        if args.route == "unknown":
            share = (unknown_share > 0).float().mean().item()  # sync point (once per image and checkpoint)
        else:
            share = ((small_label == config["background_class"]) | (small_label == IGNORE)).float().mean().item()
        candidates.append(dict(model=model, config=config, path=path, size=size, share=share, label=small_label,
                               unknown_share=unknown_share, background_share=background_share))
    chosen = min(candidates, key=lambda c: (abs(c["config"]["mask_ratio"] - c["share"]), -c["config"]["mask_ratio"]))

    # Sec. III-D: hide every patch holding unknown pixels, then background-first patches up to the model's ratio
    ratio, unknown_share = chosen["config"]["mask_ratio"], chosen["unknown_share"]
    L = unknown_share.shape[1]
    ranked = rank_patches([unknown_share, chosen["background_share"]], generator)  # (1, L)
    num_hidden = min(max(round(ratio * L), int((unknown_share > 0).sum())), L - 1)  # at least one patch visible
    _, ids_keep = hide_first(ranked, num_hidden)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in NORMALIZATION["imagenet"])
    small_image = torch.from_numpy(image).to(device).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    small_image = F.interpolate(small_image, size=chosen["size"], mode="bilinear", antialias=True)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
        logits = chosen["model"]((small_image - mean) / std, chosen["label"], ids_keep)  # (1, K, h, w)
    logits = F.interpolate(logits.float(), size=(H, W), mode="bilinear")  # (1, K, H, W)
    prediction = logits.argmax(dim=1)[0].to(torch.uint8).cpu().numpy()  # (H, W)
    completed = np.where(unknown, prediction, label)  # known pixels are copied, never predicted
    report = {"checkpoint": chosen["path"], "mask_ratio": ratio, "share": round(chosen["share"], 4),
              "hidden_patches": num_hidden, "patches": L, "unknown_pixels": int(unknown.sum()),
              "filled_pixels": int(unknown.sum()), "pixels": H * W}
    return completed, report


def pixel_mask_fraction(pixels, patch_size):
    """(B, H, W) bool -> (B, L) fraction of True pixels per patch."""
    B, H, W = pixels.shape
    P = patch_size
    return pixels.reshape(B, H // P, P, W // P, P).float().mean(dim=(2, 4)).flatten(1)


def complete(args):
    """`lmae.py complete`: write completed palette PNGs, report.csv and summary.json to --out (Sec. III-D)."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    models, info = load_completion_models(args.checkpoint, device)
    K = info["num_classes"]
    images, labels = files_by_stem(args.images), files_by_stem(args.labels)
    unknowns = files_by_stem(args.unknown) if args.unknown else {}
    truths = files_by_stem(args.truth) if args.truth else {}
    if not labels:
        raise DatasetError(f"--labels {args.labels} holds no label images; give a folder of <name>.png labels")
    for stem in labels:
        if stem not in images:
            raise DatasetError(f"label {labels[stem]} has no image named {stem}.* in --images {args.images}; "
                               f"every label needs its image")
        for folder, files, flag in ((args.unknown, unknowns, "--unknown"), (args.truth, truths, "--truth")):
            if folder and stem not in files:
                raise DatasetError(f"{flag} {folder} has no file {stem}.png for label {labels[stem]}")
    without_label = sorted(set(images) - set(labels))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    # with --truth: filled pixels, all pixels, and the filled pixels of the most-frequent-known-class baseline
    scores = [ConfusionMatrix(K, device=device) for _ in range(3)]
    rows = []
    for stem in sorted(labels):
        image = read_image_file(images[stem])
        label = read_label_file(labels[stem], K)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"label {labels[stem]} is {label.shape[1]}x{label.shape[0]} but image {images[stem]} "
                               f"is {image.shape[1]}x{image.shape[0]}; labels must have their image's size")
        unknown = label == IGNORE
        if args.unknown:
            unknown = read_label_file(unknowns[stem], K, "unknown mask") > 0
            if unknown.shape != label.shape:
                raise DatasetError(f"unknown mask {unknowns[stem]} is {unknown.shape[1]}x{unknown.shape[0]} but "
                                   f"label {labels[stem]} is {label.shape[1]}x{label.shape[0]}; sizes must match")
        completed, report = complete_image(models, image, label, unknown, args, device, generator)
        save_label_png(out / f"{stem}.png", completed, info["palette"])
        report = {"name": stem, **report, "fraction_unknown": round(float(unknown.mean()), 6),
                  "fraction_filled": 1.0 if unknown.any() else 0.0}
        if args.truth:
            truth = read_label_file(truths[stem], K, "truth label")
            if truth.shape != label.shape:
                raise DatasetError(f"truth {truths[stem]} is {truth.shape[1]}x{truth.shape[0]} but label "
                                   f"{labels[stem]} is {label.shape[1]}x{label.shape[0]}; sizes must match")
            truth_t = torch.from_numpy(truth).long().to(device)[None]
            completed_t = torch.from_numpy(completed).long().to(device)[None]
            unknown_t = torch.from_numpy(unknown).to(device)[None]
            scores[0].update(completed_t, truth_t, region=unknown_t)
            scores[1].update(completed_t, truth_t)
            given_t = torch.where(unknown_t, IGNORE, torch.from_numpy(label).long().to(device)[None])
            baseline = most_frequent_visible_class(given_t, unknown_t, K)[:, None, None].expand_as(truth_t)
            scores[2].update(baseline, truth_t, region=unknown_t)
            filled = unknown & (truth != IGNORE)
            report["filled_accuracy"] = (round(float((completed[filled] == truth[filled]).mean()), 6)
                                         if filled.any() else "")
        rows.append(report)
    with open(out / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"images": len(rows), "unknown_pixels": sum(r["unknown_pixels"] for r in rows),
               "filled_pixels": sum(r["filled_pixels"] for r in rows), "images_without_label": len(without_label),
               "checkpoints": {path: sum(r["checkpoint"] == path for r in rows) for _, _, path in models}}
    if args.truth:
        filled_scores, all_scores = scores[0].compute(), scores[1].compute()
        summary.update(pa_miou=filled_scores["miou"], pa_pixel_acc=filled_scores["pixel_acc"],
                       miou=all_scores["miou"], pixel_acc=all_scores["pixel_acc"],
                       baseline_pa_miou=scores[2].compute()["miou"], pa_per_class_iou=filled_scores["per_class_iou"])
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if without_label:
        print(f"note: {len(without_label)} images in --images have no label and were skipped "
              f"(first: {images[without_label[0]].name})")
    print("completed " + metrics_line(summary) + f" out={out}")
    return summary


if __name__ == "__main__":
    try:
        main(get_args())
    except DatasetError as e:
        sys.exit(f"error: {e}")
