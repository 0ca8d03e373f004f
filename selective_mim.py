r"""Selective Masking Image Reconstruction: self-supervised pre-training for semantic segmentation.

Wang & Stavness (University of Saskatchewan), "Selective Masking based Self-Supervised Learning for Image Semantic
Segmentation"; the authors' code: https://github.com/yuw422/Selective_Masking_Image_Reconstruction.

A ResNet-34 U-Net learns to reconstruct images with half of their patches hidden, loss (1 - MS-SSIM) + L1 (Eq. 2).
The pre-training set is cut into equal partitions trained one after another: partition 0 with random masks, every
later partition with masks chosen by the model trained so far. That model reconstructs 5 randomly masked copies of
each image, scores every patch with (1 - SSIM) + L1 (Eq. 1), and the half it reconstructs worst is hidden (Fig. 1-2).
The pre-trained weights, all but the last layer, then initialise a segmentation U-Net trained with a Jaccard loss.

Implemented (component -> function -> paper place)
    patch grid, "512 patches" (441 at 256 x 256)          -> patch_grid, grid_bands             -> Sec. 2
    random masks, 50 %, mean-colour fill                   -> random_masks, apply_mask           -> Sec. 2, Fig. 3
    5 randomly masked copies of an image                   -> copy_masks                         -> Fig. 2
    per-patch score (1 - SSIM 3x3) + L1, all at once        -> score_patches                      -> Eq. (1)
    mean over the copies, hide the top 50 %                 -> selective_masks, top_patches       -> Sec. 2.1
    equal strided partitions                                -> partition_indices                  -> Sec. 2, Fig. 1
    U-Net on a ResNet-34 encoder, 3 or K outputs            -> ResNetUNet, PRESETS                -> Sec. 2.2
    copy every pre-trained tensor but the last layer        -> transfer_weights                   -> Sec. 2.2
    reconstruction loss (1 - MS-SSIM 11x11) + L1            -> reconstruction_loss, ms_ssim       -> Eq. (2)
    downstream Jaccard loss; mIoU and class IoU             -> jaccard_loss, evaluate_segmentation -> Sec. 2.4
    partitions in turn, each scored by the previous model   -> pretrain, score_partition, train   -> Sec. 2, Fig. 1
    downstream stage; baselines random / ImageNet / none    -> finetune, --masking, --init        -> Table 2
    self- vs cross-pre-training                             -> --pretrain-data, --pretrain-root   -> Table 7
    flip, colour jitter, random crop (both stages)          -> PretrainImages, train_transform    -> Sec. 2.4

Usage
    python selective_mim.py                                    # synthetic shapes, both stages, a few CPU minutes
    python selective_mim.py --data voc --data-root data/voc    # paper settings: 10 partitions x 1000 epochs
    python selective_mim.py --data voc --stage finetune --pretrained runs/voc/pretrained.pt --seed 1234
    torchrun --nproc_per_node=4 selective_mim.py --data cityscapes --data-root data/cityscapes
    python selective_mim.py --resume --out runs/selective_mim-shapes   # continue where it stopped

Shapes: B batch, S copies per image (--samples), C channels, H W height width, L patches, K classes.
Masks are (B, L) bool, True = hidden; pixel masks (B, H, W) the same.
Choices and deviations: README 'Selective Masking Image Reconstruction' and
`grep -n "CHOICE\|DEVIATION" selective_mim.py`.
"""
import argparse
import functools
import hashlib
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
from torch.distributed.nn.functional import all_reduce as all_reduce_with_grad
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

from common import (DATASET_NAMES, NORMALIZATION, ConfusionMatrix, DatasetError, build_dataset, check_labels,
                    joint_transform, plan_splits, split_names)

SCRIPT = "selective_mim.py"
IMAGENET_FILE = "resnet34-b627a593.pth"  # CHOICE C15: torchvision's ResNet34_Weights.IMAGENET1K_V1


# --- masking (Sec. 2, Fig. 3) ---

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


def random_masks(batch_size, num_patches, mask_ratio, generator=None, device=None, noise=None):
    """(B, L) bool, exactly int(L * mask_ratio) True per row, uniformly at random (Sec. 2; noise + argsort).
    noise (B, L) uniform: the draws to rank (e.g. one generator per image), else drawn from `generator`."""
    num_hidden = int(num_patches * mask_ratio)
    if noise is None:
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


def copy_masks(batch_size, samples, num_patches, mask_ratio, generator=None, device=None, cover_all=False):
    """The S randomly masked copies of each image that are scored (Fig. 2): (B, S, L) bool, int(L * ratio) hidden.

    cover_all (CHOICE C2): a random permutation of the L patches is dealt to the S copies in turn, and patch
    number j of it is hidden in copy j mod S before the rest of each copy is drawn at random, so every patch is
    hidden in at least one copy (needs ceil(L / S) <= int(L * ratio)).
    """
    num_hidden = int(num_patches * mask_ratio)
    noise = torch.rand(batch_size, samples, num_patches, generator=generator, device=device)  # (B, S, L)
    if cover_all:
        if -(-num_patches // samples) > num_hidden:
            raise UsageError(f"--cover-all: {samples} copies hiding {num_hidden} of {num_patches} patches each cannot "
                             f"hide every patch once; raise --samples or --mask-ratio")
        deal = torch.rand(batch_size, num_patches, generator=generator, device=device).argsort(1).argsort(1)  # (B, L)
        forced = (deal[:, None, :] % samples) == torch.arange(samples, device=device)[None, :, None]  # (B, S, L)
        noise = noise.masked_fill(forced, -1.0)  # below every uniform draw: taken first by the argsort
    hidden_ids = noise.argsort(dim=2)[..., :num_hidden]  # (B, S, L * ratio)
    mask = torch.zeros(batch_size, samples, num_patches, dtype=torch.bool, device=device)
    return mask.scatter_(2, hidden_ids, True)


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

    Returns (copied, total): tensor counts. UsageError if anything other than the head failed to match.
    """
    target = model.state_dict()
    copied = {k: v for k, v in pretrained_state.items() if not k.startswith("head.") and k in target
              and v.shape == target[k].shape}
    missing = [k for k in target if not k.startswith("head.") and k not in copied]
    if missing:
        raise UsageError(f"pre-trained weights lack {len(missing)} tensors of the model, e.g. {missing[:3]}; "
                         f"was it pre-trained with the same --arch?")
    model.load_state_dict(copied, strict=False)
    return len(copied), len(target)


def load_imagenet_encoder(model, path):
    """torchvision ImageNet ResNet weights into model.encoder (the fc layer is dropped). Returns the tensor count."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UsageError(f"--imagenet-weights: {path} is not a readable state dict ({type(error).__name__}); pass "
                         f"torchvision's {IMAGENET_FILE}") from None
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.encoder.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"{path} does not match the {type(model.encoder).__name__} encoder (missing "
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


def jaccard_loss(logits, labels, ignore_index=255, smooth=1e-3, over_ranks=False):
    """Multi-class soft Jaccard loss (Sec. 2.4, CHOICE C11): logits (B, K, H, W), labels (B, H, W) -> scalar.

    over_ranks (training under DDP): the per-class sums are all-reduced with their gradients, so the loss is that
    of the global batch, as with one process (a per-rank IoU would differ: the sums pool the batch)."""
    num_classes = logits.shape[1]
    probs = logits.float().softmax(dim=1).flatten(2)  # (B, K, HW)
    labels = labels.flatten(1)  # (B, HW)
    valid = labels != ignore_index
    probs = probs * valid[:, None]
    targets = F.one_hot(labels.masked_fill(~valid, 0), num_classes).transpose(1, 2) * valid[:, None]  # (B, K, HW)
    sums = torch.stack([(probs * targets).sum((0, 2)), (probs + targets).sum((0, 2)), targets.sum((0, 2)).float()])
    if over_ranks:  # every rank then holds the same loss; DDP's mean of the ranks' gradients is its gradient
        sums = all_reduce_with_grad(sums)
    intersection, total, present = sums  # (K,) each
    union = total - intersection
    loss = 1 - (intersection + smooth) / (union + smooth).clamp_min(1e-7)
    return (loss * (present > 0)).mean()  # classes absent from the batch contribute 0


# --- selective masking (Sec. 2.1, Fig. 2) ---

@torch.no_grad()
def selective_masks(model, images, grid, samples=5, mask_ratio=0.5, generator=None, aggregation="all-mean",
                    ssim_window=3, amp=False, cover_all=False, hidden=None):
    """Score every patch with the current model and hide the hardest ones (Fig. 2).

    images (B, 3, H, W) normalised canvases of one size, grid their PatchGrid; the model is used as it is (call
    model.eval() first). All S copies of the batch go through the model in one forward pass. hidden (B, S, L) bool:
    the copies' masks when the caller drew them (score_partition: one generator per image), else copy_masks.
    Returns scores (B, L) float, mask (B, L) bool (the selection) and hide_count (B, L) int (copies hiding a patch).
    """
    batch, num_patches = images.shape[0], grid.num_patches
    copies = images.repeat_interleave(samples, dim=0)  # (B*S, 3, H, W), copies of an image are adjacent
    if hidden is None:
        hidden = copy_masks(batch, samples, num_patches, mask_ratio, generator, images.device, cover_all)  # (B, S, L)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        reconstructions = model(apply_mask(copies, grid.to_pixels(hidden.flatten(0, 1))))  # (B*S, 3, H, W)
    losses = score_patches(to_unit(reconstructions.float()), to_unit(copies.float()), grid, ssim_window)  # (B*S, L)
    losses = losses.view(batch, samples, num_patches)
    # Eq. (1) summed over the copies i: L(n) = sum_i L_i(n); CHOICE C2: all-mean divides by S (the authors' mean).
    if aggregation in ("all-mean", "all-sum"):
        scores = losses.mean(1) if aggregation == "all-mean" else losses.sum(1)  # (B, L)
    else:
        scores = (losses * hidden).sum(1)  # (B, L): only the copies that hid the patch
        if aggregation == "hidden-mean":
            scores = scores / hidden.sum(1).clamp_min(1)
    return scores, top_patches(scores, mask_ratio), hidden.sum(1)


# --- not in the paper: does a selection follow the random hide count? (CHOICE C2) ---

def hide_count_agreement(scores, mask, hide_count):
    """How far a selection follows the random hide count instead of the model's errors (CHOICE C2).

    scores (B, L) float, mask (B, L) bool, hide_count (B, L) int -> three (B,) tensors: overlap = share of the
    selected patches among the same number of most often hidden ones (chance = --mask-ratio; ties by patch index),
    spearman = rank correlation of score and hide count, never = share of patches that no copy hid.
    """
    num_patches = scores.shape[1]
    tie_break = torch.arange(num_patches, device=scores.device) / (2 * num_patches)  # < 1: only orders equal counts
    count_order = hide_count.double() - tie_break  # (B, L)
    num_hidden = int(mask[0].sum())  # sync point
    most_hidden = torch.zeros_like(mask).scatter_(1, count_order.topk(num_hidden, dim=1).indices, True)
    overlap = (mask & most_hidden).sum(1).double() / num_hidden
    a, b = (x.argsort(1).argsort(1).double() for x in (scores.double(), count_order))  # ranks (B, L)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    spearman = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return overlap, spearman, (hide_count == 0).double().mean(1)


# --- loops ---

def forward_loss(model, inputs, targets, loss_fn, runtime):
    """Forward under autocast (--amp), loss in float32: what --compile compiles (with its backward). Adam stays
    outside, so the fresh optimizer of each phase does not recompile the step."""
    with autocast(runtime):
        outputs = model(inputs)
    return loss_fn(outputs.float(), targets)


def train_step(model, optimizer, inputs, targets, loss_fn, runtime, forward=forward_loss):
    """One optimisation step: forward_loss (or its compiled version), backward, Adam."""
    loss = forward(model, inputs, targets, loss_fn, runtime)
    optimizer.zero_grad(set_to_none=True)  # frees the gradients instead of zero-filling them
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(stage, model, loader, optimizer, step_fn, loss_fn, args, runtime, guard, random_grid=None,
                    mask_key=()):
    """One epoch of either stage. pretrain: batches (images, hidden) -> reconstruct the masked images (Eq. 2);
    with random_grid the masks are drawn on the device here (random partitions), each image's from a generator
    keyed by mask_key + (item,), so 2 processes with batch B hide what 1 process with batch 2B hides. finetune:
    batches (images, labels), Jaccard loss. loss_fn is created once per run, so that a compiled train_step is not
    recompiled. Returns (mean loss over the ranks, images seen)."""
    model.train()
    device = runtime.device
    loss_sum, seen = torch.zeros((), device=device), 0
    indices = loader.sampler.indices()  # this rank's items in loader order: each item's mask key
    for images, targets in progress(loader, runtime, f"{stage} batches"):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if stage == "pretrain":
            hidden = targets  # (B, S, S): the partition's selective masks, cropped with the image
            if random_grid is not None:
                L = random_grid.num_patches
                noise = torch.cat([torch.rand(1, L, generator=make_generator(*mask_key, index, device=device),
                                              device=device) for index in indices[seen:seen + images.shape[0]]])
                mask = random_masks(len(noise), L, args.mask_ratio, device=device, noise=noise)  # (B, L)
                hidden = random_grid.to_pixels(mask)  # (B, S, S)
            inputs, targets = apply_mask(images, hidden), images
        else:
            inputs = images
        if args.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        loss = step_fn(model, optimizer, inputs, targets, loss_fn, runtime)
        guard.observe(loss)
        loss_sum += loss * images.shape[0]
        seen += images.shape[0]
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), device=device)]))
    return (totals[0] / totals[1].clamp_min(1)).item(), int(totals[1].item())  # sync point


@torch.no_grad()
def evaluate_reconstruction(model, loader, args, runtime):
    """Mean reconstruction loss (Eq. 2) and MS-SSIM of masked validation canvases (Table 8), summed over ranks.
    Pass the unwrapped model: each rank evaluates its own shard without DDP collectives."""
    model.eval()
    device = runtime.device
    totals = torch.zeros(3, device=device)
    for images, hidden in progress(loader, runtime, "reconstruction val"):
        images, hidden = images.to(device, non_blocking=True), hidden.to(device, non_blocking=True)
        with autocast(runtime):
            outputs = model(apply_mask(images, hidden)).float()
        loss = reconstruction_loss(outputs, images, args.msssim_window)
        similarity = ms_ssim(to_unit(outputs), to_unit(images), args.msssim_window).mean()
        totals += torch.stack([loss * len(images), similarity * len(images), loss.new_tensor(float(len(images)))])
    totals = all_reduce_sum(totals).tolist()  # sync point
    if totals[2] == 0:
        return {"rec_loss": None, "ms_ssim": None}
    return {"rec_loss": totals[0] / totals[2], "ms_ssim": totals[1] / totals[2]}


@torch.no_grad()
def evaluate_segmentation(model, loader, num_classes, args, runtime, split):
    """ConfusionMatrix metrics (mIoU, per-class IoU, pixel and mean accuracy) and chance_miou, summed over ranks.
    A split without one labelled pixel (empty, or all 'ignore') is an error, never a nan result."""
    model.eval()
    device = runtime.device
    confusion = ConfusionMatrix(num_classes, device=device)
    for images, labels in progress(loader, runtime, f"evaluating {split}"):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(runtime):
            logits = model(images)
        confusion.update(logits.argmax(1), labels)
    confusion.all_reduce()
    truth = confusion.matrix.sum(1).double()  # sync point (below)
    if truth.sum() == 0:
        raise DatasetError(f"{args.data}: the {split} split has no labelled pixel (all are 'ignore' or the split is "
                           f"empty), so its mIoU is undefined; check the labels or pass another --test-split")
    metrics = confusion.compute()
    # Chance: predicting the most frequent class everywhere gives IoU = its pixel share for it, 0 for the others.
    metrics["chance_miou"] = float(truth.max() / truth.sum() / (truth > 0).sum())
    return metrics


@torch.no_grad()
def save_pretrain_samples(path, model, base, indices, train_masks, args, runtime, partition):
    """Rows (paper Fig. 3-5): the centre square of each canvas, random mask, selective mask (selective partitions),
    reconstruction of the last masked row."""
    device = runtime.device
    plain = PretrainImages(base, indices, args.img_size, args.num_patches, train_masks, augment=False)
    items = [plain[i] for i in range(len(indices))]
    images = torch.stack([image for image, _ in items]).to(device)
    grid = patch_grid(args.img_size, args.img_size, args.num_patches).to(device)
    random_hidden = grid.to_pixels(random_masks(len(images), grid.num_patches, args.mask_ratio,
                                                make_generator(args.seed, "samples", partition, device=device), device))
    rows, hidden = [images, apply_mask(images, random_hidden)], random_hidden
    if train_masks is not None:
        hidden = torch.stack([h for _, h in items]).to(device)
        rows.append(apply_mask(images, hidden))
    model.eval()
    with autocast(runtime):
        rows.append(model(apply_mask(images, hidden)).float())
    torchvision.utils.save_image(torch.cat([to_unit(r).float().cpu().clamp(0, 1) for r in rows]), path,
                                 nrow=len(rows[0]), padding=2, pad_value=1.0)  # one PNG row per tensor


@torch.no_grad()
def save_finetune_samples(path, model, dataset, info, runtime, count=4):
    """Rows: input, prediction, ground truth (palette colours; ignore = white), the first test canvases."""
    model.eval()
    rows = []
    for index in range(min(count, len(dataset))):
        image, label = dataset[index]
        with autocast(runtime):
            prediction = model(image[None].to(runtime.device)).argmax(1).cpu()
        rows.append(torch.cat([to_unit(image[None]).clamp(0, 1), colorize(prediction, info.palette),
                               colorize(label[None], info.palette)], dim=3))  # side by side, aspect kept
    torchvision.utils.save_image(torch.cat([F.interpolate(r, size=rows[0].shape[-2:]) for r in rows]), path, nrow=1,
                                 padding=2, pad_value=1.0)


def colorize(labels, palette):
    """(B, H, W) int64 class ids -> (B, 3, H, W) float in [0, 1]; 255 (ignore) and unknown ids white."""
    table = torch.ones(256, 3)
    table[:len(palette)] = torch.tensor(palette[:256], dtype=torch.float32) / 255
    return table[labels.cpu().clamp(0, 255)].permute(0, 3, 1, 2)


# --- phases: data, the partitions of pre-training and the downstream stage in one epoch loop ---

def eval_transform(size):
    """Validation/test items at their canvas: shortest side `size`, aspect kept, labels resized with nearest."""
    return v2.Compose([v2.Resize(size, antialias=True), joint_transform()])  # CHOICE C6: authors' SmallestMaxSize


def train_transform(size, augment):
    """Sec. 2.4: random resized crop (scale 0.25-1, a `size` square), flip, colour jitter 0.2 (authors' values);
    without augment the centre square of the canvas."""
    if augment:
        return joint_transform(size, crop_scale=(0.25, 1.0), hflip=True, color_jitter=0.2)
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size), joint_transform()])


class PretrainImages(Dataset):
    """Pre-training view of image-only `base` items `indices`, each on its canvas (CHOICE C6).

    mode "train": (image (3, S, S), hidden (S, S) bool), the canvas and its mask cropped/flipped together (or the
    centre square without augment); `masks` is a list of (L_i,) bool per item (selective partitions) or None (the
    training loop draws random masks on the device). mode "canvas": (image (3, H, W) at the canvas, hidden (H, W)
    bool) for scoring (masks None: nothing hidden) and validation (masks: the item's fixed masks on its grid).
    """

    def __init__(self, base, indices, size, num_patches, masks=None, mode="train", augment=True):
        self.base, self.indices, self.size, self.masks = base, list(map(int, indices)), size, masks
        self.num_patches, self.mode = num_patches, mode
        self.transform = joint_transform(size, crop_scale=(0.25, 1.0), hflip=True, color_jitter=0.2) if augment \
            else v2.Compose([v2.CenterCrop(size), joint_transform()])
        if mode == "canvas":
            self.transform = joint_transform()

    def __len__(self):
        return len(self.indices)

    def canvas(self, index):
        return TF.resize(self.base[self.indices[index]], self.size, antialias=True)  # (3, H, W) uint8, aspect kept

    def __getitem__(self, index):
        image = self.canvas(index)
        height, width = image.shape[-2:]
        if self.masks is None:
            hidden = torch.zeros(height, width, dtype=torch.uint8)
        else:
            hidden = patch_grid(height, width, self.num_patches).to_pixels(self.masks[index][None])[0].to(torch.uint8)
        image, hidden = self.transform(image, tv_tensors.Mask(hidden))
        return image, hidden.bool()


def identity(image):
    return image


def first_fraction(dataset, fraction):
    """The first max(1, int(N * fraction)) items in list order (authors' data_list[:len / 5] for Nassar)."""
    if fraction >= 1.0:
        return dataset
    return Subset(dataset, range(max(1, int(len(dataset) * fraction))))


def build_splits(args, runtime, checkpoint_classes=None):
    """Every dataset split the run uses, labels checked before any step (run contract) -> dict.

    Keys: "pretrain" (image-only base), "train", "val", "test" (labelled, CHOICE C12), "info", "test_split",
    "num_classes": --num-classes, else `checkpoint_classes` (--eval-only, --resume), else the count of ALL labelled
    splits read (a folder's test split may lack a class that train has), never that of one split.
    """
    splits, num_classes = {}, args.num_classes or checkpoint_classes
    if args.stage in ("pretrain", "both") and not args.eval_only:
        splits["pretrain"], _ = build_dataset(args.pretrain_data, args.pretrain_root, args.pretrain_split,
                                              transform=identity, image_only=True, download=args.download,
                                              limit=args.limit, seed=args.split_seed, image_size=args.img_size)
        if len(splits["pretrain"]) < args.partitions:  # never an empty partition: one image each at least
            say(runtime, f"--partitions {args.partitions}: the pre-training split has only {len(splits['pretrain'])} "
                         f"images, so {len(splits['pretrain'])} partitions are used (saved in config.json)")
            args.partitions = len(splits["pretrain"])
    if args.stage in ("finetune", "both") or args.eval_only:
        options = dict(download=args.download, limit=args.limit, seed=args.split_seed, image_size=args.img_size,
                       **({"void_id": args.void_id} if args.void_id is not None else {}))
        if args.data == "cityscapes" and args.split_protocol == "paper":
            options["train_holdout"] = 0.2  # CHOICE C12: train 80 % / val 20 % of official train, test = official val
        if args.data == "folder" and num_classes is not None:
            options["num_classes"] = num_classes  # ids >= K are then a DatasetError naming the mask
        labelled, counts = read_labelled(args, options)
        if args.data == "folder" and num_classes is None and len(set(counts)) > 1:  # each split scanned its own masks
            options["num_classes"] = max(counts)
            labelled, counts = read_labelled(args, options)
        splits.update(labelled)
        for name in ("train", "val", "test"):
            if name in splits:
                split = {"train": args.train_split, "val": args.val_split}.get(name, splits["test_split"])
                say(runtime, f"{args.data}/{split} as {name}: {len(splits[name])} images")
                check_labels(splits[name], desc=f"checking {args.data}/{split} labels")
        splits["num_classes"] = splits["info"].num_classes
    return splits


def read_labelled(args, options):
    """The labelled splits (train, val, test; only test with --eval-only) -> (dict, their class counts)."""
    splits, counts, info = {}, [], None
    splits["test_split"] = args.test_split or ("test" if "test" in split_names(args.data, args.data_root) else "val")
    specs = {"train": args.train_split, "val": args.val_split, "test": splits["test_split"]}
    for name, (split, part) in plan_splits({"test": specs["test"]} if args.eval_only else specs).items():
        transform = train_transform(args.img_size, args.augment) if name == "train" else eval_transform(args.img_size)
        dataset, info = build_dataset(args.data, args.data_root, split, transform=transform, part=part, **options)
        splits[name] = first_fraction(dataset, args.train_fraction) if name != "test" else dataset
        counts.append(info.num_classes)
    splits["info"] = info
    return splits, counts


def score_partition(model, base, indices, args, runtime, partition):
    """Selective masks of the images `indices` with `model` (Sec. 2.1): a list of (L_i,) bool masks in the order
    of `indices`, plus the scoring record. Each image's copies draw from a generator of (seed, partition, image),
    so the masks do not depend on the batch, the worker or the rank; ranks score every world-th image and gather."""
    device, start = runtime.device, time.time()
    dataset = PretrainImages(base, indices, args.img_size, args.num_patches, mode="canvas")
    mine = list(range(runtime.rank, len(indices), runtime.world_size))
    loader = DataLoader(Subset(dataset, mine), batch_size=args.pretrain_batch_size, num_workers=args.workers,
                        collate_fn=list, pin_memory=device.type == "cuda")
    model.eval()
    found, position = [], iter(mine)
    for items in progress(loader, runtime, f"scoring partition {partition}"):
        positions = [next(position) for _ in items]
        by_shape = {}
        for item_position, (image, _) in zip(positions, items):  # canvases of one size go through together
            by_shape.setdefault(tuple(image.shape[-2:]), []).append((item_position, image))
        for (height, width), group in by_shape.items():
            grid = patch_grid(height, width, args.num_patches)
            hidden = torch.cat([copy_masks(1, args.samples, grid.num_patches, args.mask_ratio,
                                           make_generator(args.seed, "score", partition, indices[p]),
                                           cover_all=args.cover_all) for p, _ in group]).to(device)  # (B, S, L)
            images = torch.stack([image for _, image in group]).to(device, non_blocking=True)
            scores, mask, hide_count = selective_masks(model, images, grid.to(device), args.samples, args.mask_ratio,
                                                       aggregation=args.score_aggregation,
                                                       ssim_window=args.ssim_window, amp=runtime.amp, hidden=hidden)
            overlap, spearman, never = hide_count_agreement(scores, mask, hide_count)
            for row, (p, _) in enumerate(group):
                found.append((p, mask[row].cpu(), float(scores[row].mean()), float(overlap[row]),
                              float(spearman[row]), float(never[row])))  # sync point
    if runtime.world_size > 1:
        gathered = [None] * runtime.world_size
        dist.all_gather_object(gathered, found)
        found = [entry for part in gathered for entry in part]
    found.sort(key=lambda entry: entry[0])
    masks = [entry[1] for entry in found]
    seconds = time.time() - start
    mean = lambda column: float(np.mean([entry[column] for entry in found]))  # noqa: E731
    record = {"stage": "score", "partition": partition, "epoch": 1, "images": len(found), "copies": args.samples,
              "aggregation": args.score_aggregation,  # "epoch": 1, logged before its epoch 1
              "hidden_per_image": float(np.mean([m.sum().item() for m in masks])),
              "mean_score": mean(2), "hide_count_overlap": mean(3), "hide_count_spearman": mean(4),
              "never_hidden": mean(5), "time": seconds}
    return masks, record


def fixed_random_masks(base, indices, args):
    """A fixed random mask per validation image on its own canvas grid, drawn from (seed, image): the same in
    every partition that holds the image and after any --resume (the Table 8 reference condition)."""
    masks = []
    for index in indices:
        height, width = TF.get_size(TF.resize(base[index], args.img_size, antialias=True))
        grid = patch_grid(height, width, args.num_patches)
        masks.append(random_masks(1, grid.num_patches, args.mask_ratio, make_generator(args.seed, "val", index))[0])
    return masks


def load_pretrained(path, args, flag="--pretrained"):
    """The reconstruction weights of a pretrained.pt, checked: this script, this --arch, the --init masking."""
    state = load_checkpoint(path, SCRIPT, args.arch, flag=flag)
    if state.get("kind") != "pretrained":
        raise UsageError(f"{flag}: {path} is not a pretrained.pt (it holds a {state.get('stage', 'other')} state); "
                         f"pass the pretrained.pt of a pre-training run")
    if state["masking"] != args.init:
        raise UsageError(f"{flag}: {path} was pre-trained with --masking {state['masking']}, not {args.init}; pass "
                         f"--init {state['masking']} or another --pretrained")
    return state


def build_segmentation_model(args, num_classes, pretrained_model=None):
    """The downstream U-Net: its own seeded initialisation, then every pre-trained tensor but the head (Sec. 2.2),
    or the ImageNet encoder."""
    # CHOICE C16: one downstream seed per run (the paper's 0, 1234, 3741 are three runs of one pre-training).
    torch.manual_seed(derive_seed(args.seed, "init", "finetune"))
    model = build_model(num_classes, args.arch)
    if pretrained_model is not None:
        transfer_weights(pretrained_model, model)
    elif args.init == "imagenet":
        load_imagenet_encoder(model, args.imagenet_weights)
    return model


def sync_batch_norm(model, enabled, runtime):
    """`enabled` under torchrun on CUDA: BatchNorm over the batches of all ranks (SyncBatchNorm), so 2 processes with
    batch B normalise as 1 with batch 2B; otherwise the model itself (SyncBatchNorm has no CPU kernel)."""
    if enabled and runtime.world_size > 1 and runtime.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def warmup_cosine(epochs, warmup_epochs):
    """Per-epoch LR factor: linear 1 % -> 100 % over the warm-up, then cosine down to 1 % (CHOICE C8)."""
    def factor(epoch):
        if epoch < warmup_epochs:
            return 0.01 + 0.99 * epoch / warmup_epochs
        progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def make_optimizer(model, lr, epochs, args):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, fused=True)  # one kernel for all tensors: CPU steps -15 %
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(epochs, min(args.warmup_epochs, epochs - 1)))
    return optimizer, scheduler


@dataclass
class Phase:
    """What the one epoch loop needs of a phase: a pre-training partition or the downstream stage."""
    stage: str  # "pretrain" | "finetune": the metrics.jsonl stage of its epochs
    partition: object  # int (pretrain) or None
    train_set: Dataset
    batch_size: int
    lr: float
    lr_flag: str  # the flag a non-finite loss message names
    epochs: int
    loss_fn: object  # (outputs, targets) -> scalar, one object per run (a compiled train_step is not recompiled)
    validate: object  # (epoch, train loss, lr) -> the epoch's record
    summary: str  # printed when the phase starts
    masks: object = None  # the partition's selective masks {"train": [...], "val": [...]} (checkpointed)
    random_grid: object = None  # PatchGrid of the training crops when train_one_epoch draws random masks


def pretrain(partition, model, base, masks, loss_fn, args, runtime, log):
    """Pre-training partition `partition` (Sec. 2, Fig. 1) -> Phase. A selective partition (not 0, not the random
    baseline) is scored by `model` as it stands, the weights after partition - 1, unless its masks come from a
    --resume checkpoint; the last --pretrain-val-fraction of the partition is its reconstruction validation set."""
    indices = partition_indices(len(base), args.partitions)[partition].tolist()
    num_val = min(int(round(len(indices) * args.pretrain_val_fraction)), len(indices) - 1)
    train_ids, val_ids = indices[:len(indices) - num_val], indices[len(indices) - num_val:]
    selective = args.masking == "selective" and partition > 0
    if selective and masks is None:  # scored by the model of partition - 1 (Sec. 2.1)
        scored, record = score_partition(model, base, indices, args, runtime, partition)
        # DEVIATION: the masks stay exact bool tensors (memory + checkpoint) because the authors' JPEG
        # copies of the masked images blur the hidden patches' edges.
        masks = {"train": scored[:len(train_ids)], "val": scored[len(train_ids):]}
        log.write(record)
    train_set = PretrainImages(base, train_ids, args.img_size, args.num_patches,
                               masks["train"] if selective else None, augment=args.augment)
    val_sets = {"val_random": PretrainImages(base, val_ids, args.img_size, args.num_patches, mode="canvas",
                                             masks=fixed_random_masks(base, val_ids, args))}
    if selective:  # the partition's own masks are the random ones in random partitions
        val_sets["val"] = PretrainImages(base, val_ids, args.img_size, args.num_patches, mode="canvas",
                                         masks=masks["val"])
    val_loaders = {key: make_loader(value, 1, args, runtime, train=False) for key, value in val_sets.items()
                   if len(value)}

    def validate(epoch, loss, lr):
        val = {key: evaluate_reconstruction(model, loader, args, runtime) for key, loader in val_loaders.items()}
        chance = val.get("val_random", {})
        own = val.get("val", chance)
        return {"stage": "pretrain", "partition": partition, "epoch": epoch,
                "masking": "selective" if selective else "random", "rec_loss": loss,
                "val_rec_loss": own.get("rec_loss"), "val_ms_ssim": own.get("ms_ssim"),
                "val_rec_loss_random": chance.get("rec_loss"), "lr": lr}

    random_grid = None if selective else patch_grid(args.img_size, args.img_size, args.num_patches).to(runtime.device)
    summary = (f"pretrain partition {partition}: {len(train_ids)} train / {len(val_ids)} val images, "
               f"{'selective' if selective else 'random'} masks")
    return Phase("pretrain", partition, train_set, args.pretrain_batch_size, args.pretrain_lr, "--pretrain-lr",
                 args.pretrain_epochs, loss_fn, validate, summary, masks, random_grid)


def finetune(model, splits, loss_fn, args, runtime):
    """The downstream stage (Sec. 2.4) -> Phase: train split, Jaccard loss, val mIoU per epoch (picks best.pt)."""
    val_loader = make_loader(splits["val"], 1, args, runtime, train=False)  # CHOICE C6: batch 1

    def validate(epoch, loss, lr):
        val = evaluate_segmentation(model, val_loader, splits["num_classes"], args, runtime, "val")
        return {"stage": "finetune", "epoch": epoch, "loss": loss, "val_miou": val["miou"],
                "val_pixel_acc": val["pixel_acc"], "lr": lr}

    summary = f"finetune: {len(splits['train'])} train / {len(splits['val'])} val images, init {args.init}"
    return Phase("finetune", None, splits["train"], args.batch_size, args.lr, "--lr", args.epochs, loss_fn, validate,
                 summary)


def phases_of(args):
    """The run as phases (stage, partition): the pre-training partitions in turn, then the downstream stage."""
    phases = [("pretrain", p) for p in range(args.partitions)] if args.stage in ("pretrain", "both") else []
    return phases + ([("finetune", None)] if args.stage in ("finetune", "both") else [])


def train(args, runtime, splits, models, state, log, out):
    """Every epoch of every phase, one loop (Fig. 1): partition p is scored by the model after partition p-1,
    trained on its masks, checkpointed; then the downstream U-Net starts from those weights. Per epoch: train ->
    FiniteGuard.check -> evaluate -> log record -> last.pt -> best.pt (downstream, when val mIoU improves)."""
    step_fn = functools.partial(train_step, forward=torch.compile(forward_loss)) if args.compile else train_step
    phases, guard = phases_of(args), FiniteGuard()
    wrapped = {name: distribute(sync_batch_norm(model, args.sync_bn, runtime), runtime)  # (in place: models too)
               for name, model in models.items()}
    reconstruction_fn = functools.partial(reconstruction_loss, window_size=args.msssim_window)  # Eq. (2)
    jaccard_fn = functools.partial(jaccard_loss, over_ranks=runtime.world_size > 1)
    summary = state.get("pretrain_summary") if state else None
    best, best_epoch = (state.get("best"), state.get("best_epoch")) if state else (None, None)
    for index in range(state["phase"] if state else 0, len(phases)):
        stage, partition = phases[index]
        resumed = state if state is not None and state["phase"] == index else None
        name = "reconstruction" if stage == "pretrain" else "segmentation"
        if stage == "finetune" and resumed is None and "reconstruction" in models:  # straight after pre-training
            transfer_weights(models["reconstruction"].state_dict(), models["segmentation"])
        model, ddp_model = models[name], wrapped[name]
        if resumed is not None:
            load_state(model, resumed["model"], "--resume")
        phase = pretrain(partition, model, splits["pretrain"], resumed.get("masks") if resumed else None,
                         reconstruction_fn, args, runtime, log) if stage == "pretrain" else \
            finetune(model, splits, jaccard_fn, args, runtime)
        first = (resumed["epoch"] if resumed else 0) + 1
        if first <= phase.epochs:  # (a finished phase of a resumed run is not repeated)
            train_loader = make_loader(phase.train_set, phase.batch_size, args, runtime, train=True)
            optimizer, scheduler = make_optimizer(ddp_model, phase.lr, phase.epochs, args)  # CHOICE C8: fresh
            if resumed is not None:
                optimizer.load_state_dict(resumed["optimizer"])
                scheduler.load_state_dict(resumed["scheduler"])
            say(runtime, phase.summary)
        for epoch in range(first, phase.epochs + 1):
            train_loader.sampler.set_epoch(f"pretrain{partition}" if stage == "pretrain" else stage, epoch)
            start = time.time()
            loss, seen = train_one_epoch(stage, ddp_model, train_loader, optimizer, step_fn, phase.loss_fn, args,
                                         runtime, guard, phase.random_grid, (args.seed, "masks", partition, epoch))
            guard.check(stage, epoch, phase.lr_flag)
            lr_now = scheduler.get_last_lr()[0]
            scheduler.step()
            record = phase.validate(epoch, loss, lr_now)
            if stage == "pretrain":
                summary = {key: value for key, value in record.items() if key not in ("stage", "epoch", "lr")}
            record.update(images=seen, time=time.time() - start)
            log.write(record)
            improved = stage == "finetune" and (best is None or record["val_miou"] > best or args.select_by == "last")
            if improved:
                best, best_epoch = record["val_miou"], epoch
            if runtime.main:
                save_checkpoint(out / "last.pt", {
                    "phase": index, "stage": stage, "partition": partition, "epoch": epoch,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "masks": phase.masks, "best": best, "best_epoch": best_epoch,
                    "pretrain_summary": summary}, SCRIPT, args.arch, log)
                if improved:
                    link_checkpoint(out / "last.pt", out / "best.pt")
            barrier()
        if stage == "pretrain" and runtime.main:
            save_pretrain_samples(out / "samples" / f"pretrain_partition{partition}_epoch_{phase.epochs:03d}.png",
                                  model, splits["pretrain"], phase.train_set.indices[:8],
                                  phase.masks["train"] if phase.masks else None, args, runtime, partition)
            if partition == args.partitions - 1:
                save_checkpoint(out / "pretrained.pt", {"kind": "pretrained", "model": model.state_dict(),
                                                        "masking": args.masking, "summary": summary},
                                SCRIPT, args.arch)
        barrier()
    return summary, best, best_epoch


def classes_of(state):
    """K of a segmentation checkpoint (its head's output channels), None for a reconstruction one or none."""
    if state is None or state.get("stage") != "finetune":
        return None
    return int(state["model"]["head.weight"].shape[0])


def evaluate_checkpoint(args, runtime, splits, state, path):
    """--eval-only: score the checkpoint `state` (read from `path`) on the test split -> eval_test.json."""
    if state.get("stage") != "finetune":
        raise UsageError(f"--checkpoint {path} holds a reconstruction model, not a segmentation one; pass the best.pt "
                         f"or last.pt of a downstream run")
    model = build_model(splits["num_classes"], args.arch)
    load_state(model, state["model"], path)
    model = model.to(runtime.device, memory_format=torch.channels_last if args.channels_last else torch.preserve_format)
    test = evaluate_segmentation(model, make_loader(splits["test"], 1, args, runtime, train=False),
                                 splits["num_classes"], args, runtime, splits["test_split"])
    result = {"checkpoint": str(path), "test": test}
    if runtime.main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "eval_test.json", result)
    say(runtime, f"test mIoU {test['miou']:.4f} (chance {test['chance_miou']:.4f}) of {path}")
    return result


# --- command line ---

# Table 1: pre-training batch sizes ("smaller than the partition size").
PAPER_PRETRAIN_BATCH = {"voc": 128, "cityscapes": 128, "nassar": 256, "sugarbeets": 64}
# Readers that have an image-only "unlabeled" split (common.py).
UNLABELED_SPLIT_DATASETS = ("shapes", "voc", "cityscapes", "nassar", "sugarbeets", "folder")
# Readers without labels: pre-training data only.
IMAGE_ONLY_DATASETS = ("cifar10", "catsdogs")
# CHOICE C12: the authors' downstream fractions of train and val (Nassar: data_list[:len / 5]).
PAPER_TRAIN_FRACTION = {"nassar": 0.2}


def get_args(argv=None):
    parser = ArgumentParser(description="Selective Masking Image Reconstruction pre-training + downstream "
                                        "segmentation (Wang & Stavness)")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="shapes", choices=DATASET_NAMES,
                      help="downstream dataset (common.py reader); default shapes (synthetic)")
    data.add_argument("--data-root", default=None, help="dataset root in its original layout (default ./data/<name>)")
    data.add_argument("--download", action="store_true", help="let torchvision download the datasets it can")
    data.add_argument("--pretrain-data", default=None, choices=DATASET_NAMES,
                      help="pre-training dataset; default --data (self-pre-training; another name = cross-pre-training,"
                           " Table 7)")
    data.add_argument("--pretrain-root", default=None, help="folder of --pretrain-data (default --data-root when the "
                                                            "two names agree, else ./data/<name>)")
    data.add_argument("--pretrain-split", default=None,
                      help="split used for pre-training; default 'unlabeled' where the reader has it, else 'train' "
                           "(CHOICE C12)")
    data.add_argument("--num-classes", type=int, default=None,
                      help="classes K of --data folder masks (ids 0..K-1, 255 = ignore); default: the checkpoint's "
                           "(--eval-only, --resume), else the largest id over ALL labelled splits + 1")
    data.add_argument("--split-protocol", choices=("paper", "reader"), default="paper",
                      help="paper: the authors' downstream splits (cityscapes: train = first 80 %% of official train, "
                           "val = last 20 %%, test = official val; nassar: --train-fraction 0.2); reader: the "
                           "reader's own train/val/test (CHOICE C12); default paper")
    data.add_argument("--train-split", default="train",
                      help="split that trains (SPLIT:F = a seeded fraction F of SPLIT, --split-seed; the roles naming "
                           "SPLIT plainly get the rest)")
    data.add_argument("--val-split", default="val", help="split that picks best.pt (or SPLIT:F)")
    data.add_argument("--test-split", default=None,
                      help="split reported as the test result and scored by --eval-only (or SPLIT:F; default: the "
                           "protocol's test, or 'val' where the reader has no test)")
    data.add_argument("--void-id", type=int, default=None,
                      help="class-id labels: this id marks unlabelled pixels and becomes 255 (ignore); CamVid's 11 "
                           "is known without it")
    data.add_argument("--train-fraction", type=float, default=None,
                      help="keep the first fraction of the downstream train and val splits in list order, all of "
                           "test (paper: nassar 0.2 = 389 images, the default there; 1.0 elsewhere)")
    data.add_argument("--split-seed", type=int, default=0,
                      help="seed of the readers' seeded train/val/test splits (kvasir, folder, ...), kept apart from "
                           "--seed so that every run seed meets the same test images; default 0")
    data.add_argument("--img-size", type=int, default=None,
                      help="shortest image side in px, the aspect kept; training crops are squares of this side "
                           "(paper 256; shapes 48; CHOICE C6)")
    data.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                      help="random crop, flip and colour jitter in both stages (Sec. 2.4); --no-augment takes the "
                           "centre square (for checks)")

    stages = parser.add_argument_group("stages")
    stages.add_argument("--stage", choices=("pretrain", "finetune", "both"), default="both",
                        help="pretrain: reconstruction only; finetune: downstream only; both (default)")
    stages.add_argument("--init", choices=("selective", "random", "imagenet", "none"), default=None,
                        help="downstream initialisation (Table 2): selective/random = a pre-trained reconstruction "
                             "model (--stage both: the one just trained, the default; --stage finetune: "
                             "--pretrained), imagenet = torchvision ImageNet ResNet-34 encoder, none = random init")
    stages.add_argument("--pretrained", default=None, metavar="PATH",
                        help="pretrained.pt of an earlier pre-training run (--stage finetune --init selective|random)")
    stages.add_argument("--imagenet-weights", default=None, metavar="PATH",
                        help=f"ImageNet ResNet-34 state dict for --init imagenet (default: the torch hub cache, "
                             f"<TORCH_HOME>/hub/checkpoints/{IMAGENET_FILE}); never downloaded")

    masking = parser.add_argument_group("masking (Sec. 2, 2.1)")
    masking.add_argument("--masking", choices=("selective", "random"), default="selective",
                         help="selective: the method; random: the random-masking baseline, one partition (Table 2, "
                              "CHOICE C9)")
    masking.add_argument("--partitions", type=int, default=None,
                         help="equal partitions of the pre-training set (paper 10; shapes 3)")
    masking.add_argument("--samples", type=int, default=5,
                         help="randomly masked copies reconstructed per image to score its patches (paper 5, Fig. 2)")
    masking.add_argument("--mask-ratio", type=float, default=0.5,
                         help="fraction of patches hidden, random and selective (paper 0.5, Sec. 2)")
    masking.add_argument("--num-patches", type=int, default=None,
                         help="nominal patches per image (paper 512 -> 441 at 256 px, CHOICE C1; shapes 64)")
    masking.add_argument("--score-aggregation", choices=("all-mean", "hidden-mean", "hidden-sum", "all-sum"),
                         default="all-mean",
                         help="how a patch's Eq. (1) losses over the copies are combined (CHOICE C2); default "
                              "all-mean (Eq. (1), the authors' code)")
    masking.add_argument("--cover-all", action="store_true",
                         help="draw the copies so that every patch is hidden in at least one (CHOICE C2)")
    masking.add_argument("--ssim-window", type=int, default=3, help="SSIM window of the patch score (paper 3, Eq. 1)")
    masking.add_argument("--msssim-window", type=int, default=None,
                         help="MS-SSIM window of the reconstruction loss (paper 11, Eq. 2; shapes 3, CHOICE C14)")
    masking.add_argument("--pretrain-val-fraction", type=float, default=0.1,
                         help="share of each partition kept for reconstruction validation (authors 0.1, CHOICE C7)")

    pre = parser.add_argument_group("pre-training")
    pre.add_argument("--pretrain-epochs", type=int, default=None,
                     help="pre-training epochs per partition (paper 1000; shapes 2)")
    pre.add_argument("--pretrain-batch-size", type=int, default=None,
                     help="pre-training batch per process (Table 1; shapes 8; CHOICE C13)")
    pre.add_argument("--pretrain-lr", type=float, default=None, help="pre-training Adam learning rate (authors 3e-3)")
    pre.add_argument("--warmup-epochs", type=float, default=None,
                     help="linear warm-up epochs of every partition and of the downstream stage, fractions allowed "
                          "(authors 10; shapes 0; CHOICE C8)")

    down = parser.add_argument_group("downstream segmentation")
    down.add_argument("--arch", choices=sorted(PRESETS), default=None,
                      help="the U-Net of both stages (default resnet34-unet, the paper's, Sec. 2.2; --eval-only and "
                           "--resume: the checkpoint's)")
    down.add_argument("--epochs", type=int, default=None, help="downstream epochs (paper 500; shapes 8)")
    down.add_argument("--batch-size", type=int, default=None, help="downstream batch per process (paper 8)")
    down.add_argument("--lr", type=float, default=None,
                      help="downstream Adam learning rate (authors 3e-3; shapes 1e-3)")
    down.add_argument("--select-by", choices=("best-val", "last"), default="best-val",
                      help="best.pt = the epoch of the highest val mIoU (authors, default) or the last epoch (for "
                           "sets whose only held-out split is the one reported, e.g. the shared CamVid sample)")
    down.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                      help="BatchNorm over the batches of all processes under torchrun on CUDA, both stages "
                           "(SyncBatchNorm: 2 processes with batch B normalise as 1 with batch 2B); --no-sync-bn: "
                           "per process. No effect on one process or on the CPU")
    add_run_arguments(parser, SCRIPT)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Fill the derived defaults (the synthetic preset or the paper's settings) and refuse impossible flags."""
    synthetic = args.data == "shapes"
    args.pretrain_data = args.pretrain_data or args.data
    if args.pretrain_root is None and args.pretrain_data == args.data:
        args.pretrain_root = args.data_root
    # CHOICE C14: the synthetic preset; real data gets the paper's settings.
    defaults = dict(img_size=48, partitions=3, pretrain_epochs=2, pretrain_lr=3e-3, num_patches=64, msssim_window=3,
                    epochs=8, batch_size=8, lr=1e-3, warmup_epochs=0, pretrain_batch_size=8) if synthetic else \
        dict(img_size=256, partitions=10, pretrain_epochs=1000, pretrain_lr=3e-3, num_patches=512, msssim_window=11,
             epochs=500, batch_size=8, lr=3e-3, warmup_epochs=10,
             pretrain_batch_size=PAPER_PRETRAIN_BATCH.get(args.pretrain_data, 64))  # CHOICE C13
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.train_fraction is None:
        args.train_fraction = PAPER_TRAIN_FRACTION.get(args.data, 1.0) if args.split_protocol == "paper" else 1.0
    if args.masking == "random":
        args.partitions = 1  # CHOICE C9
    if args.arch is None and not (args.eval_only or args.resume):  # those two read the checkpoint's (main)
        args.arch = "resnet34-unet"
    if args.init is None:  # --stage finetune without --pretrained: no pre-training (Table 2 "None")
        args.init = args.masking if args.stage != "finetune" or args.pretrained else "none"
    # CHOICE C12: the "unlabeled" split where there is one (as the paper, Sec. 2.3), else "train" (never "test").
    args.pretrain_split = args.pretrain_split or (
        "unlabeled" if args.pretrain_data in UNLABELED_SPLIT_DATASETS else "train")

    positive = "a positive integer"
    for flag, valid, what in [(f, getattr(args, f) >= 1, positive) for f in (
            "img_size", "partitions", "pretrain_epochs", "pretrain_batch_size", "epochs", "batch_size", "samples",
            "num_patches")] + [
            ("img_size", args.img_size > 32, "more than 32 px (the encoder halves it 5 times; a 1 x 1 map cannot be "
                                             "batch-normalised)"),
            ("warmup_epochs", args.warmup_epochs >= 0, "0 or more"),
            ("mask_ratio", 0.0 < args.mask_ratio < 1.0, "between 0 and 1 (exclusive)"),
            ("pretrain_val_fraction", 0.0 <= args.pretrain_val_fraction < 0.5, "in [0, 0.5)"),
            ("train_fraction", 0.0 < args.train_fraction <= 1.0, "in (0, 1]"),
            ("lr", args.lr > 0, "positive"), ("pretrain_lr", args.pretrain_lr > 0, "positive")] + [
            (f, getattr(args, f) >= 1 and getattr(args, f) % 2 == 1, "an odd positive integer") for f in (
                "ssim_window", "msssim_window")]:
        if not valid:
            parser.error(f"--{flag.replace('_', '-')} must be {what}, got {getattr(args, flag)}")
    if (args.msssim_window - 1) * 2 ** (len(MS_SSIM_WEIGHTS) - 1) >= args.img_size:
        parser.error(f"--msssim-window {args.msssim_window} needs images larger than "
                     f"{(args.msssim_window - 1) * 16} px for its 5 scales; raise --img-size or lower --msssim-window")
    grid = patch_grid(args.img_size, args.img_size, args.num_patches)
    if grid.smallest_band < args.ssim_window:
        parser.error(f"--num-patches {args.num_patches} at --img-size {args.img_size} gives {grid.smallest_band}-px "
                     f"patches, smaller than --ssim-window {args.ssim_window}; use fewer patches or larger images")
    if int(grid.num_patches * args.mask_ratio) < 1:
        parser.error(f"--mask-ratio {args.mask_ratio} hides no patch of the {grid.num_patches}-patch grid")
    if args.cover_all and args.samples * args.mask_ratio < 1:
        parser.error(f"--cover-all needs --samples x --mask-ratio >= 1 (every patch hidden once), got "
                     f"{args.samples} x {args.mask_ratio}")
    if args.data in IMAGE_ONLY_DATASETS and args.stage != "pretrain":
        parser.error(f"--data {args.data} has no segmentation labels; use it as --pretrain-data (cross-pre-training) "
                     f"or with --stage pretrain")
    if args.data == "cityscapes" and args.test_split == "test":
        parser.error("--test-split test: the public Cityscapes test labels are all 'ignore', so no mIoU can be "
                     "computed; the paper's protocol tests on official val (the default)")
    if args.stage == "both" and args.init in ("imagenet", "none"):
        parser.error(f"--init {args.init} skips pre-training: use --stage finetune --init {args.init}")
    if args.stage == "both" and args.init != args.masking:
        parser.error(f"--stage both initialises from the model it pre-trains with --masking {args.masking}; "
                     f"drop --init or use --init {args.masking}")
    if args.stage == "finetune" and args.init in ("selective", "random") and not args.eval_only:
        if args.pretrained is None or not os.path.isfile(args.pretrained):
            parser.error(f"--stage finetune --init {args.init} needs --pretrained PATH, the pretrained.pt of a "
                         f"pre-training run (got {args.pretrained})")
    if args.pretrained is not None and args.stage != "finetune":
        parser.error("--pretrained is only read with --stage finetune")
    if args.init == "imagenet" and not args.eval_only:
        args.imagenet_weights = args.imagenet_weights or os.path.join(torch.hub.get_dir(), "checkpoints",
                                                                      IMAGENET_FILE)
        if not os.path.isfile(args.imagenet_weights):
            parser.error(f"--init imagenet: no ImageNet weights at {args.imagenet_weights}; pass --imagenet-weights "
                         f"PATH, or fetch them once with: python -c \"import torchvision; "
                         f"torchvision.models.resnet34(weights='IMAGENET1K_V1')\"")
    if args.num_classes is not None and (args.data != "folder" or args.num_classes < 2):
        parser.error(f"--num-classes describes --data folder masks (at least 2 classes); the other readers know "
                     f"theirs, got --data {args.data} --num-classes {args.num_classes}")
    if args.void_id is not None and not 0 <= args.void_id < 65536:
        parser.error(f"--void-id must be a label value in 0..65535, got {args.void_id}")
    try:
        plan_splits({"train": args.train_split, "val": args.val_split, "test": args.test_split or "test"})
    except DatasetError as error:
        parser.error(str(error))
    if args.eval_only and args.stage == "pretrain":
        parser.error("--eval-only scores a segmentation checkpoint; drop --stage pretrain")
    check_run_arguments(parser, args, SCRIPT)
    args.patch_grid = f"{grid.rows}x{grid.cols}={grid.num_patches}"  # derived (square crops), printed and saved


def main(args):
    resume_path = check_run_dir(args, SCRIPT)  # nothing written yet
    runtime = setup_runtime(args)
    try:
        seed_everything(args.seed)
        path = (Path(args.checkpoint) if args.checkpoint else Path(args.out) / "best.pt") if args.eval_only else \
            resume_path
        flag = "--checkpoint" if args.eval_only else "--resume"
        if path and args.arch is None:  # the network of the checkpoint, unless --arch says otherwise
            args.arch = load_checkpoint(path, SCRIPT, flag=flag).get("arch")
        args.arch = args.arch or "resnet34-unet"
        state = load_checkpoint(path, SCRIPT, args.arch, flag=flag) if path else None
        splits = build_splits(args, runtime, classes_of(state))  # K: --num-classes, the checkpoint's, all splits'

        if args.eval_only:
            return evaluate_checkpoint(args, runtime, splits, state, path)
        models = {}
        if args.stage in ("pretrain", "both"):
            torch.manual_seed(derive_seed(args.seed, "init", "pretrain"))  # identical initial weights on every rank
            models["reconstruction"] = build_model(3, args.arch)
        if args.stage in ("finetune", "both"):
            pretrained = load_pretrained(args.pretrained, args)["model"] if args.stage == "finetune" and \
                args.init in ("selective", "random") else None
            models["segmentation"] = build_segmentation_model(args, splits["num_classes"], pretrained)
        for name, model in models.items():
            model = model.to(runtime.device)
            models[name] = model.to(memory_format=torch.channels_last) if args.channels_last else model
        config = {**vars(args), "world_size": runtime.world_size}
        out = create_run_dir(args, SCRIPT, config, runtime)
        if runtime.main:
            (out / "samples").mkdir(exist_ok=True)
        log = MetricsLog(out, runtime, resume_state=state)
        summary, best, best_epoch = train(args, runtime, splits, models, state, log, out)
        results = {"pretrain": summary, "init": args.init, "masking": args.masking, "patch_grid": args.patch_grid}
        if "segmentation" in models:
            model, info = models["segmentation"], splits["info"]
            load_state(model, load_checkpoint(out / "best.pt", SCRIPT, args.arch)["model"], out / "best.pt")
            test = evaluate_segmentation(model, make_loader(splits["test"], 1, args, runtime, train=False),
                                         splits["num_classes"], args, runtime, splits["test_split"])
            results.update(test=test, test_split=splits["test_split"], best_epoch=best_epoch, best_val_miou=best,
                           class_names=list(info.class_names),
                           per_class_iou={n: v for n, v in zip(info.class_names, test["per_class_iou"])})
            log.write({"stage": "test", "epoch": best_epoch, "miou": test["miou"], "pixel_acc": test["pixel_acc"],
                       "chance_miou": test["chance_miou"]})
            if runtime.main:  # best.pt on the first test images: the picture of the finetune record of best_epoch
                save_finetune_samples(out / "samples" / f"finetune_epoch_{best_epoch:03d}.png", model, splits["test"],
                                      info, runtime)
            say(runtime, f"test mIoU {test['miou']:.4f} (chance {test['chance_miou']:.4f}) on {args.data}/"
                         f"{splits['test_split']}, best val mIoU {best:.4f} at epoch {best_epoch}")
        if runtime.main:
            write_json(out / "results.json", results)
        return results
    finally:
        shutdown(runtime)


# --- plumbing: identical in masksup.py, simclr_seg.py, selective_mim.py, lmae.py ---
# Seeding, device/AMP/DDP, data loaders, checkpoints, run directory, metrics log, non-finite guard, errors. Nothing
# here knows the method (script, architecture, stages are passed in); tests/test_contract.py checks the four copies.

class UsageError(Exception):
    """A user's mistake (a flag, a file, a run folder, a diverging run): one `error: ...` line, exit code 2."""


class HelpFormatter(argparse.HelpFormatter):
    """--help shows each default once: appended unless the help states it or it is None/False."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text.lower() or any(action.default is value for value in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one error style (`error: <message> (see --help)`, exit code 2) and HelpFormatter."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def add_run_arguments(parser, script):  # one meaning in all four scripts (README 'Conventions')
    run = parser.add_argument_group("run")
    add = run.add_argument
    add("--seed", type=int, default=0, help="every data order, augmentation and mask derives from it")
    add("--out", help=f"run directory (default runs/{script[:-3]}-<data>; with --eval-only --checkpoint: its folder)")
    add("--resume", action="store_true", help="continue the run in --out after its last finished epoch")
    add("--eval-only", action="store_true", help="score --checkpoint (default --out's best.pt) -> eval_test.json")
    add("--checkpoint", metavar="PATH", help="the checkpoint --eval-only scores")
    add("--limit", type=int, metavar="N", help="keep the first N images of each split")
    add("--workers", type=int, default=2, help="DataLoader worker processes (0 = the main process)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = CUDA when available")
    add("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on with CUDA, and on a CPU "
        "with AVX512-BF16/AMX where the README's bf16 table shows this method's metric holds)")
    add("--compile", action="store_true", help="torch.compile the training step")
    add("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC convolutions (default: on with CUDA)")
    add("--deterministic", action="store_true", help="bitwise repeatable kernels (slower)")
    return run


def check_run_arguments(parser, args, script):  # refuse combinations that would be ignored; resolve --out
    if args.checkpoint and not args.eval_only:
        parser.error("--checkpoint is only read with --eval-only; to continue a run pass --resume and its --out")
    if args.eval_only and args.resume:
        parser.error("--eval-only and --resume exclude each other; pass one of them")
    if args.workers < 0:
        parser.error(f"--workers must be 0 or more, got {args.workers}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be a positive number of images, got {args.limit}")
    if args.out is None:
        default = os.path.join("runs", f"{script.removesuffix('.py')}-{args.data}")
        args.out = str(Path(args.checkpoint).parent) if args.eval_only and args.checkpoint else default


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def derive_seed(*parts):
    """A stable 62-bit seed from a key like (seed, "masks", stage, epoch, item): every random draw of a run is
    keyed this way, identically in every process and after --resume, so checkpoints need no RNG states."""
    return int(hashlib.sha256(repr(parts).encode()).hexdigest()[:16], 16) >> 2


def make_generator(*parts, device="cpu"):
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp: bool = False
    owns_process_group: bool = False  # shutdown() ends the process group only if setup_runtime started it

    @property
    def main(self):
        return self.rank == 0


def cpu_supports_bf16():
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def setup_runtime(args, amp_on_cpu=False):
    """-> Runtime; resolves args.device/amp/channels_last in place (amp_on_cpu: the --amp default on a bf16 CPU).
    torchrun: one process per GPU (nccl) or CPU slot."""
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; pass --device cpu or auto")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = "cuda" if use_cuda else "cpu"
    if args.amp is None:
        args.amp = use_cuda or (amp_on_cpu and cpu_supports_bf16())
    elif args.amp and not use_cuda and not cpu_supports_bf16():
        raise UsageError("--amp: this CPU has no bf16 support (AVX512-BF16 or AMX); pass --no-amp")
    args.channels_last = use_cuda if args.channels_last is None else args.channels_last
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    owns_process_group = int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized()
    if owns_process_group:
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)  # a few backward kernels have no such variant
    else:
        torch.backends.cudnn.benchmark = use_cuda  # fixed input sizes: cuDNN picks its fastest kernels once
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return Runtime(device, rank, world_size, bool(args.amp), owns_process_group)


def autocast(runtime):  # bf16 with --amp, a no-op context otherwise
    return torch.autocast(runtime.device.type, dtype=torch.bfloat16, enabled=runtime.amp)


def distribute(model, runtime):  # DDP under torchrun: gradients averaged over ranks
    if runtime.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None)


def unwrap(model):  # the bare module inside DDP and torch.compile wrappers: what checkpoints hold
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def all_reduce_sum(tensor):
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shutdown(runtime):
    if runtime.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def say(runtime, message):
    if runtime.main:  # rank 0 prints
        print(message, flush=True)


def progress(iterable, runtime, desc, total=None):  # rank 0: a tqdm bar on a terminal, else a line every 30 s
    if runtime.main and not sys.stderr.isatty():
        return PlainProgress(iterable, desc, total)
    return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, mininterval=1.0,
                disable=not runtime.main)


class PlainProgress:
    """tqdm's iterate/update/close where stderr is no terminal (a log file, a job scheduler): a plain line
    `desc: n/total after T s` at most every 30 s."""

    def __init__(self, iterable, desc, total=None, every=30.0):
        self.iterable, self.desc, self.every, self.count = iterable, desc, every, 0
        self.total = total or getattr(iterable, "__len__", lambda: "?")()
        self.start = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n=1):
        self.count, now = self.count + n, time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(f"{self.desc}: {self.count}/{self.total} after {now - self.start:.0f} s", flush=True)

    def close(self):
        pass


class EpochSampler(Sampler):
    """(index, item_seed) pairs of this rank's share of an epoch, a pure function of (seed, stage, epoch, rank).
    Training: a permutation padded by wrapping so ranks get equal shares, minus a lone last item (BatchNorm never
    sees a batch of one). Evaluation: items rank, rank+world, ... in order, unpadded (a rank may get none)."""

    def __init__(self, num_items, seed, runtime, shuffle, batch_size):
        self.num_items, self.seed, self.shuffle, self.batch_size = num_items, seed, shuffle, batch_size
        self.rank, self.world_size = runtime.rank, runtime.world_size
        self.stage, self.epoch = "", 0

    def set_epoch(self, stage, epoch):
        self.stage, self.epoch = stage, epoch

    def indices(self):
        if not self.shuffle:
            return list(range(self.rank, self.num_items, self.world_size))
        order = torch.randperm(self.num_items, generator=make_generator(self.seed, "order", self.stage, self.epoch))
        per_rank = -(-self.num_items // self.world_size)
        order = order.tolist() * (per_rank * self.world_size // max(self.num_items, 1) + 1)
        mine = order[:per_rank * self.world_size][self.rank::self.world_size]
        if len(mine) > self.batch_size and len(mine) % self.batch_size == 1:
            mine = mine[:-1]
        return mine

    def __iter__(self):
        for index in self.indices():
            yield index, derive_seed(self.seed, "item", self.stage, self.epoch, index)

    def __len__(self):
        return len(self.indices())


class SeededItems(Dataset):
    """dataset[(index, item_seed)] = dataset[index] drawn under item_seed; the caller's RNG states are kept."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, item_seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            seed_everything(item_seed)
            item = self.dataset[index]
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        return item


def make_loader(dataset, batch_size, args, runtime, train):  # call loader.sampler.set_epoch(stage, epoch)
    sampler = EpochSampler(len(dataset), args.seed, runtime, shuffle=train, batch_size=batch_size)
    return DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=sampler, num_workers=args.workers,
                      pin_memory=runtime.device.type == "cuda",  # page-locked memory: asynchronous host-to-GPU copies
                      persistent_workers=args.workers > 0)  # workers (and their open files) live across epochs


def json_safe(value):  # non-finite floats -> None, tensors -> lists, other objects -> str
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (torch.Tensor, np.generic)):
        return json_safe(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if value is None or isinstance(value, (bool, int, str)) else str(value)


def write_json(path, record):  # atomic: a temporary file, then os.replace
    with open(f"{path}.tmp", "w") as handle:
        json.dump(json_safe(record), handle, indent=2, sort_keys=True, allow_nan=False)
    os.replace(f"{path}.tmp", path)


def save_checkpoint(path, state, script, arch, log=None):
    """Atomically write `state` + what load_checkpoint checks + the count of metrics.jsonl records (for --resume)."""
    torch.save({**state, "script": script, "arch": arch, "log_records": None if log is None else log.count},
               f"{path}.tmp")
    os.replace(f"{path}.tmp", path)  # a crash mid-write never leaves a truncated checkpoint under the real name


def link_checkpoint(source, target):
    """target = the same bytes as source (best.pt from last.pt): a hard link, a copy where links are refused."""
    Path(f"{target}.tmp").unlink(missing_ok=True)
    try:
        os.link(source, f"{target}.tmp")
    except OSError:
        shutil.copyfile(source, f"{target}.tmp")
    os.replace(f"{target}.tmp", target)


def load_checkpoint(path, script, arch=None, flag="--checkpoint"):
    """-> the dict save_checkpoint wrote; a UsageError for a missing, truncated, foreign or other-`arch` file."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{flag}: no checkpoint {path}; pass the path of a {script} checkpoint (last.pt or best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:100]
        raise UsageError(f"{flag}: {path} is not a readable checkpoint, perhaps truncated ({reason}); pass a complete "
                         f"{script} checkpoint") from None
    if not isinstance(state, dict) or state.get("script") != script:
        writer = state.get("script", "another program") if isinstance(state, dict) else "another program"
        raise UsageError(f"{flag}: {path} was written by {writer}, not {script}; pass a {script} checkpoint")
    if arch is not None and state.get("arch") != arch:
        theirs, ours = str(state.get("arch")).split("-"), arch.split("-")
        differ = [f"{a} there, {b} here" for a, b in zip(theirs, ours) if a != b] if len(theirs) == len(ours) else []
        raise UsageError(f"{flag}: {path} holds a {state.get('arch')} model but these flags build {arch} "
                         f"({'; '.join(differ) or 'other parts'}); change those flags or pass another checkpoint")
    return state


def load_state(module, state_dict, path):  # a mismatch -> one error line naming the checkpoint
    try:
        unwrap(module).load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError) as error:
        reason = (str(error).strip().splitlines() or [""])[0][:160]
        raise UsageError(f"{path} does not fit this model ({reason}); pass the flags it was trained with") from None


def check_writable(out, flag="--out"):  # make and remove a folder: a test that also holds for root, read-only mounts
    probe = Path(out).absolute()
    while not probe.exists():
        probe = probe.parent
    try:
        (probe / f".write-test-{os.getpid()}").mkdir()
        (probe / f".write-test-{os.getpid()}").rmdir()
    except OSError as error:
        raise UsageError(f"{flag} {out}: cannot write in {probe} ({error.strerror}); pass a folder you can write to")


def check_run_dir(args, script, resume_files=("last.pt",)):
    """Validate --out before anything is written -> the checkpoint to resume from, or None; never overwrites."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder for the run")
    check_writable(out)
    holder = lock_holder(out)
    if holder not in (None, os.getpid()):
        raise UsageError(f"--out {out} is in use by another run (pid {holder}); wait for it or pass another --out")
    try:
        ours = json.loads((out / "config.json").read_text()).get("script") == script
    except (OSError, ValueError, AttributeError):
        ours = False
    filled = out.is_dir() and any(entry.name != ".lock" for entry in out.iterdir())
    if args.eval_only:
        if filled and not ours:
            raise UsageError(f"--out {out} is not empty and not a {script} run; pass another --out for the results")
        return None
    if args.resume:
        if not ours:
            raise UsageError(f"--resume: {out} is not a {script} run (no config.json of {script}); check --out")
        for name in resume_files:
            if (out / name).is_file():
                return out / name
        raise UsageError(f"--resume: {out} has no checkpoint yet ({', '.join(resume_files)}); remove the folder or "
                         f"pass another --out to start afresh")
    if filled:
        what = "already holds a run" if ours else f"is not empty and not a {script} run"
        raise UsageError(f"--out {out} {what}; pass --resume to continue a run, or another --out")
    return None


def lock_holder(out):  # the pid in --out/.lock while that process lives, else None
    try:
        pid = int((Path(out) / ".lock").read_text().split()[0])
        os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except PermissionError:
        return pid  # alive, another user's
    except (OSError, ValueError, IndexError):
        return None
    return pid


def lock_run_dir(out):
    """One writer per run directory: --out/.lock holds the writer's pid, made by an atomic link so that of two runs
    started together one fails; a dead process's lock is taken over with a warning; main_guard removes it."""
    lock, mine, holder = Path(out) / ".lock", Path(out) / f".lock.{os.getpid()}", lock_holder(out)
    if holder == os.getpid():
        return
    if holder is None and lock.exists():
        print(f"warning: {lock} was left by a process that is gone; taking it over", file=sys.stderr, flush=True)
        lock.unlink(missing_ok=True)
    mine.write_text(f"{os.getpid()}\n")
    try:
        os.link(mine, lock)
    except FileExistsError:
        holder = lock_holder(out)
    finally:
        mine.unlink(missing_ok=True)
    if holder is not None and holder != os.getpid():
        raise UsageError(f"--out {out} is in use by another run (pid {holder}); wait for it or pass another --out")


def unlock_run_dir(out):
    if out is not None and lock_holder(out) == os.getpid():
        (Path(out) / ".lock").unlink(missing_ok=True)


def create_run_dir(args, script, config, runtime):
    """After flags and data are checked: print the config, make and lock --out, write config.json (a resume keeps
    it). The folder is checked again under the lock: a run that started at the same moment is refused here."""
    out = Path(args.out)
    say(runtime, "config " + json.dumps(json_safe(config), sort_keys=True))
    if runtime.main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UsageError(f"--out {out}: cannot make the folder ({error.strerror}); pass a folder you can write to")
        lock_run_dir(out)
        check_run_dir(args, script)
        if not (args.resume and (out / "config.json").is_file()):
            write_json(out / "config.json", {"script": script, **config})
    barrier()
    return out


class MetricsLog:
    """metrics.jsonl, one record per epoch, echoed as `key=value`; a resume truncates it to its checkpoint's count."""

    def __init__(self, out, runtime, resume_state=None):
        self.path, self.main = Path(out) / "metrics.jsonl", runtime.main
        lines = self.path.read_text().splitlines(keepends=True) if self.path.is_file() else []
        keep = resume_state.get("log_records") if resume_state is not None else None
        if keep is not None and len(lines) > keep and self.main:
            Path(f"{self.path}.tmp").write_text("".join(lines[:keep]))
            os.replace(f"{self.path}.tmp", self.path)
        self.count = len(lines) if keep is None else min(keep, len(lines))

    def write(self, record):
        record = json_safe(record)
        if self.main:
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                           if not isinstance(v, (list, dict))), flush=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, allow_nan=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        self.count += 1


class FiniteGuard:
    """Notes the first non-finite loss without a host sync; check() at the epoch's end stops before any save."""

    def __init__(self):
        self.steps, self.first_bad = 0, None

    def observe(self, loss):
        self.steps += 1
        bad = ~torch.isfinite(loss.detach().float())
        first = torch.zeros((), dtype=torch.long, device=loss.device) if self.first_bad is None else self.first_bad
        self.first_bad = torch.where(bad & (first == 0), self.steps, first)

    def check(self, stage, epoch, lr_flag="--lr"):
        """Raise UsageError naming stage, epoch and step if a loss was not finite (on any rank); sync point."""
        first_bad = 0 if self.first_bad is None else int(all_reduce_sum(self.first_bad.clone()))
        self.steps, self.first_bad = 0, None
        if first_bad:
            raise UsageError(f"{stage} epoch {epoch} step {first_bad}: the loss is not finite; the run stopped without "
                             f"saving this epoch (last.pt keeps the last good one); lower {lr_flag} for a new run or "
                             f"check the data")


def main_guard(main, get_args):  # a user's mistake -> one `error: ...` line on stderr, exit code 2
    args = None
    try:
        args = get_args()
        main(args)
    except (UsageError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as error:  # a full disk, a folder that became unwritable: the file and the reason, no traceback
        print(f"error: {error.filename or ''}: {error.strerror or error}; check that it is writable and the disk "
              f"has room", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:  # every file is written atomically: nothing half-written is left
        out = getattr(args, "out", None)
        resumable = out is not None and (Path(out) / "last.pt").is_file() and not getattr(args, "eval_only", True)
        print(f"interrupted: continue with --resume --out {out}" if resumable else "interrupted: no finished epoch "
              "to continue from; run the command again", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        unlock_run_dir(getattr(args, "out", None))

# --- end of plumbing ---


if __name__ == "__main__":
    main_guard(main, get_args)
