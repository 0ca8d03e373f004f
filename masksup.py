r"""MaskSup: Masked Supervised Learning for Semantic Segmentation.

Zunair & Ben Hamza, BMVC 2022, https://arxiv.org/abs/2210.00923 (authors' code: hasibzunair/masksup-segmentation).

One network with shared weights sees every training image twice in the same step: as it is, and with free-form
holes cut into it (50-60 % of the image for the paper's best, "high" masking). Both predictions are supervised by
the same ground truth and pulled towards each other:
    L_total = a1*L_seg(M_p, M_gt) + a2*L_context(M_pm, M_gt) + a3*L_tasksim(M_p, M_pm)
so the network learns short- and long-range context in one training stage, without pre-training. At test time it
is used as it is, on unmasked images.

Implemented (component -> function -> paper place)
    free-form holes, low 1-10 % / high 50-60 %     -> free_form_masks        -> slides "Low vs High"; suppl. Fig. 1
    masks from a folder (NVIDIA irregular masks)  -> FolderMasks            -> the authors' mask set
    holes set to 0 in the [-1, 1] input           -> apply_mask             -> suppl. Sec. 1, preprocessing
    LeViT-UNet-128s / -192 / -384                 -> LeViTUNet, PRESETS     -> suppl. Sec. 1, "Architecture"
    U-Net++ (filters 32-512), small U-Net (3 M)   -> UNetPlusPlus, UNet     -> suppl. Sec. 1 (NYUDv2); slides
    L_seg, L_context (BCE binary, CE multi-class) -> segmentation_loss      -> slides, L_total
    L_tasksim (MSE of the two probability maps)   -> task_similarity_loss   -> slides, L_total
    L_total; a2 = a3 = 0 baseline, a3 = 0 "CB"    -> masksup_loss           -> slides, L_total; "CB", "CB+TS"
    two passes with shared weights, one step      -> train_step             -> suppl. Sec. 3 (Siamese)
    Adam 1e-4 b16 / SGD 0.1 m 0.9 b8, 200 epochs  -> RECIPES, resolve_recipe -> suppl. Sec. 1, "Model Training"
    ImageNet LeViT start                          -> load_levit_weights     -> authors' code
    best weights by mIoU; per-image protocol      -> train, evaluate        -> suppl. Sec. 1; slides tables
    scores on masked inputs (--eval-masked)       -> evaluate               -> suppl. Fig. 4

Usage
    python masksup.py                                      # synthetic shapes (U-Net, 64x64): minutes on 2 CPU cores
    python masksup.py --data pranet --data-root data/POLYPS --levit-weights LeViT-384-9bdaf2e2.pth    # the paper's
    python masksup.py --data nyudv2 --data-root data/nyudv2 --label-base 1     # U-Net++, SGD 0.1, labels 1..40
    torchrun --nproc_per_node=4 masksup.py --data glas --data-root data/glas --compile
    python masksup.py --resume --out runs/masksup-shapes   # continue at the next epoch

Shapes: B batch, C channels, H W height width, K classes (1 logit for binary sets), P patch size,
L = (H/P)*(W/P) patches, N tokens, D key dim, E embedding width. mask (B, H, W) bool, True = hidden (hole).
Choices and deviations: README 'MaskSup' section and `grep -n "CHOICE\|DEVIATION" masksup.py`.
"""

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import re
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
from PIL import Image, UnidentifiedImageError
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from torchvision.utils import save_image
from tqdm import tqdm

from common import (DATASET_NAMES, BinaryStats, ConfusionMatrix, DatasetError, build_dataset, check_labels,
                    denormalize, joint_transform, per_image_micro_jaccard, plan_splits)

SCRIPT = "masksup.py"
ARCHS = ("levit-128s", "levit-192", "levit-384", "unet", "unet++")
MASKINGS = ("high", "low", "patch", "folder")
# CHOICE C2: hole-area bins of the NVIDIA irregular-mask set (fraction of the image area)
HOLE_AREA_BINS = {"low": (0.01, 0.10), "high": (0.50, 0.60), "any": (0.0, 1.0)}
LEVIT_SIZE = 224  # LeViT-UNet's input side: its attention biases are tied to 14x14 / 7x7 / 4x4 token grids


# --- masking (supplement Sec. 1 and Fig. 1; slides "Low vs High masking") ---

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


class FolderMasks:
    """Hole masks read once from a folder of PNG/JPG/BMP files (white = hole, > 127), kept on the device.

    Each file's hole fraction is measured once, at its own resolution (the NVIDIA set defines its bins at
    512 x 512); only the files in the `area` bin of HOLE_AREA_BINS are kept ("high" = the paper's 50-60 %
    "High" masks), then resized (nearest) to size x size. Each call draws one per sample with the passed
    generator. fractions: (N,) of the kept files; counts: files per bin. `track` may wrap the file list (a
    progress bar).
    """

    SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")

    def __init__(self, folder, size, device, area="any", track=None):
        folder = Path(folder)
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in self.SUFFIXES) if folder.is_dir() else []
        if not files:
            raise DatasetError(f"--mask-dir {folder}: no mask images found (expected PNG files, white = hole, "
                               f"e.g. the NVIDIA irregular-mask set)")
        low, high = HOLE_AREA_BINS[area]
        masks, fractions, all_fractions = [], [], []
        for path in track(files) if track is not None else files:
            try:
                with Image.open(path) as image:
                    holes = np.asarray(image.convert("L")) > 127
                    resized = image.convert("L").resize((size, size), Image.NEAREST)
            except (OSError, UnidentifiedImageError) as e:
                raise DatasetError(f"mask {path} cannot be read ({e}); remove or replace it") from None
            fraction = float(holes.mean())
            all_fractions.append(fraction)
            if low <= fraction <= high:
                masks.append(torch.from_numpy(np.asarray(resized) > 127))
                fractions.append(fraction)
        self.counts = {name: sum(lo <= f <= hi for f in all_fractions) for name, (lo, hi) in HOLE_AREA_BINS.items()}
        if not masks:
            raise DatasetError(f"--mask-dir {folder}: none of its {len(files)} masks has a hole fraction in the "
                               f"--mask-area {area} bin [{low:.2f}, {high:.2f}] (measured: {self.counts}); pass "
                               f"another --mask-area or a folder with such masks")
        self.masks = torch.stack(masks).to(device)  # (N, H, W) bool
        self.fractions = torch.tensor(fractions)
        self.device = device

    def __call__(self, batch_size, generator):
        index = torch.randint(len(self.masks), (batch_size,), generator=generator, device=self.device)
        return self.masks[index]  # (B, H, W)


def make_masks(masking, batch_size, height, width, generator, device, patch_size=16, mask_ratio=0.5,
               folder_masks=None):
    """(B, H, W) bool hole masks, True = hole, for `masking`: "high" / "low" free-form holes in that area bin,
    "patch" (patch_size, mask_ratio) or "folder" (drawn from `folder_masks`, a FolderMasks). Randomness from
    `generator` (on `device`)."""
    if masking == "patch":
        return patch_masks(batch_size, height, width, patch_size, mask_ratio, generator, device)
    if masking == "folder":
        return folder_masks(batch_size, generator)
    return free_form_masks(batch_size, height, width, HOLE_AREA_BINS[masking], generator, device)


def apply_mask(images, mask):
    """Masked copy of `images` (B, 3, H, W) in [-1, 1]: hole pixels (mask (B, H, W) True) set to 0 (mid-grey), the
    paper's preprocessing (image * (1 - mask) in [-1, 1])."""
    return images.masked_fill(mask[:, None], 0.0)


# --- not in the paper: patch masks (--masking patch), an option of ours beside the paper's free-form holes ---

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


def upsample_x2(x):
    """Bilinear x2 with align_corners=True (LeViT-UNet's nn.UpsamplingBilinear2d). (B, C, h, w) -> (B, C, 2h, 2w)."""
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


def upsample_stage3(x):
    """The reference's order for the 4 x 4 stage-3 map: two x2 steps (4 -> 8 -> 16), then a resize to 14 x 14, all
    bilinear with align_corners=True. One x4 step differs from it by up to 0.7 on a structured map (tested).
    (B, E3, 4, 4) -> (B, E3, 14, 14)."""
    x = upsample_x2(upsample_x2(x))  # (B, E3, 16, 16)
    return F.interpolate(x, size=(LEVIT_SIZE // 16, LEVIT_SIZE // 16), mode="bilinear", align_corners=True)


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

    def forward(self, images):
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
        f1 = self.tokens_to_map(stage_outputs[0])  # (B, E1, 14, 14)
        f2 = upsample_x2(self.tokens_to_map(stage_outputs[1]))  # (B, E2, 14, 14)
        f3 = upsample_stage3(self.tokens_to_map(stage_outputs[2]))  # (B, E3, 14, 14)
        x = self.decoder1(torch.cat([stem_out, f1, f2, f3], dim=1))  # (B, 512, 28, 28)
        x = self.decoder2(torch.cat([x, skips[2]], dim=1))  # (B, 256, 56, 56)
        x = self.decoder3(torch.cat([x, skips[1]], dim=1))  # (B, 128, 112, 112)
        return self.head_up(self.head(torch.cat([x, skips[0]], dim=1)))  # (B, K, 224, 224)

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


# --- model: U-Net++ (Zhou et al. 2018, "UNet++: A Nested U-Net Architecture", the authors' NYUDv2 network) ---

def vgg_block(in_channels, middle_channels, out_channels):
    """U-Net++'s node: two conv3x3 (with bias) - BN - ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, middle_channels, 3, padding=1), nn.BatchNorm2d(middle_channels),
                         nn.ReLU(inplace=True), nn.Conv2d(middle_channels, out_channels, 3, padding=1),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class UNetPlusPlus(nn.Module):
    """U-Net++ without deep supervision, filters 32-64-128-256-512 (the NestedUNet the authors ran on NYUDv2).

    Node X(i, j) at depth i (1/2^i resolution) and column j: X(i, 0) = node(pool(X(i-1, 0))); for j > 0,
    X(i, j) = node(concat[X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))]), up = bilinear x2 (align_corners=True).
    The head is a 1x1 conv on X(0, 4). (B, C, H, W) -> (B, K, H, W), H and W multiples of 16.
    3 channels in: 9,163,329 parameters with 1 class, 9,164,616 with 40 (tests check them against the layout).
    """

    FILTERS = (32, 64, 128, 256, 512)

    def __init__(self, in_channels=3, num_classes=1):
        super().__init__()
        f = self.FILTERS
        self.nodes = nn.ModuleDict()
        for i in range(5):
            self.nodes[f"{i}_0"] = vgg_block(in_channels if i == 0 else f[i - 1], f[i], f[i])
        for j in range(1, 5):
            for i in range(5 - j):
                self.nodes[f"{i}_{j}"] = vgg_block(f[i] * j + f[i + 1], f[i], f[i])
        self.head = nn.Conv2d(f[0], num_classes, 1)

    def forward(self, images):
        x = {}
        for i in range(5):
            x[i, 0] = self.nodes[f"{i}_0"](images if i == 0 else F.max_pool2d(x[i - 1, 0], 2))
            for j in range(1, i + 1):  # the new diagonal: nodes (i - j, j) need (i - j + 1, j - 1)
                r = i - j
                x[r, j] = self.nodes[f"{r}_{j}"](torch.cat([x[r, k] for k in range(j)] + [upsample_x2(x[r + 1, j - 1])],
                                                           dim=1))  # (B, f[r], H / 2^r, W / 2^r)
        return self.head(x[0, 4])  # (B, K, H, W)

def build_model(arch, num_outputs, unet_width=20, drop_path=None):
    """The network named `arch` (ARCHS) for 3-channel input and `num_outputs` logits (1 for a binary set)."""
    if arch == "unet":
        return UNet(3, num_outputs, unet_width)
    if arch == "unet++":
        return UNetPlusPlus(3, num_outputs)
    return LeViTUNet(arch, 3, num_outputs, drop_path=drop_path)


# --- losses (slides: L_total) ---

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

def train_step(model, optimizer, images, labels, mask, args, runtime):
    """One MaskSup step: the clean and the masked image through the same network (two passes, shared weights),
    L_total, one optimizer step. images (B, 3, H, W) in [-1, 1], labels (B, H, W), mask (B, H, W) bool.
    Returns a (4,) tensor [L_total, L_seg, L_context, L_tasksim] (detached, no host sync)."""
    two_passes = args.alpha2 > 0 or args.alpha3 > 0  # a2 = a3 = 0: the plain supervised baseline, one pass
    # CHOICE C5: two separate passes (not one 2B batch), so BatchNorm sees the clean and the masked batch apart
    with autocast(runtime):  # bf16: tensor-core convolutions and matmuls, half the activation memory
        logits_clean = model(images)  # M_p (B, K, H, W)
        logits_masked = model(apply_mask(images, mask)) if two_passes else None  # M_pm (B, K, H, W)
    total, terms = masksup_loss(logits_clean, logits_masked, labels, args.binary_task,
                                (args.alpha1, args.alpha2, args.alpha3), args.tasksim)  # losses in fp32
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return torch.cat([total.detach()[None], terms])


def to_device(images, labels, args, device):
    """Pinned memory + non_blocking: the copy overlaps the previous step on CUDA; NHWC with --channels-last."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, labels


def item_masks(args, keys, device, folder_masks=None):
    """(len(keys), H, W) bool: one --masking mask per item, drawn from a generator seeded by the item's key, e.g.
    (seed, "mask", epoch, index) in training, (seed, "eval-mask", index) in evaluation (CHOICE C8: an image gets
    the same mask whatever the batch size, the process count, the worker count or a --resume)."""
    masks = [make_masks(args.masking, 1, args.img_size, args.img_size, make_generator(*key, device=device), device,
                        args.patch_size, args.mask_ratio, folder_masks) for key in keys]
    return torch.cat(masks) if masks else torch.zeros(0, args.img_size, args.img_size, dtype=torch.bool, device=device)


def train_one_epoch(model, step_fn, optimizer, loader, args, runtime, epoch, guard, folder_masks=None):
    """One pass over `loader` with a fresh hole mask per sample per epoch, keyed by (seed, epoch, item) so that a
    resumed epoch replays its masks and 2 processes with batch B see the masks 1 process with batch 2B sees.
    Returns the mean loss terms over all ranks' steps."""
    model.train()
    device = runtime.device
    torch.manual_seed(derive_seed(args.seed, "drop-path", epoch, runtime.rank))  # LeViT's stochastic depth
    sums = torch.zeros(5, device=device)  # L_total, L_seg, L_context, L_tasksim, steps
    indices, seen = loader.sampler.indices(), 0  # this rank's items in loader order: each item's mask key
    for images, labels in progress(loader, runtime, f"train epoch {epoch}"):
        images, labels = to_device(images, labels, args, device)
        keys = [(args.seed, "mask", epoch, index) for index in indices[seen:seen + images.shape[0]]]
        seen += images.shape[0]
        mask = item_masks(args, keys, device, folder_masks)  # (B, H, W): a fresh mask per sample per epoch
        losses = step_fn(model, optimizer, images, labels, mask, args, runtime)
        guard.observe(losses[0])
        sums[:4] += losses
        sums[4] += 1
    all_reduce_sum(sums)
    means = (sums[:4] / sums[4].clamp_min(1)).tolist()  # sync point
    return dict(zip(("loss", "seg", "context", "tasksim"), means))


@torch.no_grad()
def evaluate(model, loader, args, runtime, num_classes, folder_masks=None, desc="evaluate"):
    """Standard and paper-protocol metrics on `loader` (this rank's shard, summed over ranks); with --eval-masked
    the same on masked inputs (prefix masked_).

    Standard: dataset-level confusion matrix -> miou (class mean, 255 ignored), per_class_iou, pixel_acc.
    Paper protocol (the paper's "mIoU"): paper_iou = mean over images of the per-image foreground IoU (binary
    sets; sklearn jaccard_score per image) or of the per-image micro Jaccard (multi-class; NYUDv2).
    Binary sets also give dataset-level foreground iou (fg_iou) and dice.
    `model` is the plain module (not DDP): ranks see different shards and must not sync inside forward. A rank
    with an empty shard still joins every all_reduce.
    """
    model.eval()  # BatchNorm running statistics, no drop-path
    device = runtime.device
    prefixes = ["", "masked_"] if args.eval_masked else [""]
    num_classes = 2 if args.binary_task else num_classes
    confusion = {p: ConfusionMatrix(num_classes, device=device) for p in prefixes}
    binary_stats = {p: BinaryStats(device=device) for p in prefixes}
    jaccard = {p: torch.zeros(2, dtype=torch.float64, device=device) for p in prefixes}  # sum, images
    indices = loader.sampler.indices()  # this rank's items, in loader order
    seen = 0
    for images, labels in progress(loader, runtime, desc):
        images, labels = to_device(images, labels, args, device)
        inputs = {"": images}
        if args.eval_masked:
            keys = [(args.seed, "eval-mask", index) for index in indices[seen:seen + images.shape[0]]]
            inputs["masked_"] = apply_mask(images, item_masks(args, keys, device, folder_masks))
        seen += images.shape[0]
        for prefix, batch in inputs.items():
            with autocast(runtime):
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
            total, count = all_reduce_sum(jaccard[prefix]).tolist()  # sync point
            results[f"{prefix}paper_iou"] = total / count if count else float("nan")
    return results


@torch.no_grad()
def save_samples(model, dataset, args, palette, path, runtime, folder_masks=None):
    """PNG grid, one row each: input, masked input, prediction on the input, prediction on the masked input,
    ground truth, for the first --num-samples images of `dataset` with their evaluation masks (CHOICE C8)."""
    model.eval()
    device = runtime.device
    items = [dataset[i] for i in range(min(args.num_samples, len(dataset)))]
    images = torch.stack([image for image, _ in items]).to(device)
    labels = torch.stack([label for _, label in items])
    masked = apply_mask(images, item_masks(args, [(args.seed, "eval-mask", i) for i in range(len(items))], device,
                                           folder_masks))
    rows = [denormalize(images, "symmetric").cpu(), denormalize(masked, "symmetric").cpu()]  # sync point
    for batch in (images, masked):
        with autocast(runtime):
            logits = model(batch).float()
        preds = (logits[:, 0] > 0).long() if args.binary_task else logits.argmax(1)
        rows.append(colorize(preds.cpu(), palette))
    rows.append(colorize(labels, palette))
    save_image(torch.cat(rows), path, nrow=len(items), padding=2, pad_value=1.0)



def colorize(labels, palette):
    """(B, H, W) int64 class ids -> (B, 3, H, W) float in [0, 1]; 255 (ignore) and unknown ids white."""
    table = torch.ones(256, 3)
    table[:len(palette)] = torch.tensor(palette[:256], dtype=torch.float32) / 255
    return table[labels.cpu().clamp(0, 255)].permute(0, 3, 1, 2)


# --- phases: data, recipe, model and optimiser; the training run and --eval-only ---

IMAGE_ONLY_SETS = ("cifar10", "catsdogs")
LEVIT_WEIGHTS = {  # facebookresearch/LeViT ImageNet checkpoints (distilled), https://dl.fbaipublicfiles.com/LeViT/
    "levit-128s": "LeViT-128S-96703c44.pth", "levit-192": "LeViT-192-92712e41.pth",
    "levit-384": "LeViT-384-9bdaf2e2.pth",
}
# CHOICE C10, C11: the recipe per kind of data, chosen once the data is read (resolve_recipe)
RECIPES = {
    # supplement Sec. 1 "Model Training": GLaS / polyps: LeViT-UNet-384, Adam lr 1e-4, batch 16, 200 epochs
    "binary": dict(arch="levit-384", epochs=200, batch_size=16, optimizer="adam", lr=1e-4, unet_width=20),
    # supplement Sec. 1: NYUDv2: U-Net++, SGD lr 0.1 momentum 0.9, batch 8, 200 epochs
    "multiclass": dict(arch="unet++", epochs=200, batch_size=8, optimizer="sgd", lr=0.1, unet_width=20),
    "shapes": dict(arch="unet", epochs=20, batch_size=16, optimizer="adam", lr=1e-3, unet_width=16),
}


def dataset_options(args):
    """The reader options the data flags set (common.build_dataset **options)."""
    if args.data == "folder":  # CHOICE C12: --mask-mode auto reads masks holding only 0 and 255 as binary
        return {"mask_mode": args.mask_mode, **({"num_classes": args.num_classes} if args.num_classes else {})}
    if args.data == "nyudv2":
        return {"label_base": args.label_base}
    if args.data == "pranet" and args.test_split != "test":  # pranet: --test-split names a TestDataset folder
        return {"test_set": args.test_split}
    return {}


def build_split(args, split, part=None):
    """(dataset, info) of one split; 'polyps' joins Kvasir-SEG and CVC-ClinicDB (train) / CVC-ClinicDB (val, test).
    Inputs are resized to --img-size and normalised to [-1, 1] (supplement Sec. 1); no augmentation (CHOICE C6).
    Splits are seeded with --split-seed, not --seed, so every seed trains on the same images."""
    transform = joint_transform(size=None if args.data == "shapes" else args.img_size, normalize="symmetric")
    common = dict(transform=transform, binary=args.binary, download=args.download, limit=args.limit,
                  seed=args.split_seed, **({"part": part} if part else {}),
                  **({"void_id": args.void_id} if args.void_id is not None else {}))
    if args.data == "polyps":
        root = Path(args.data_root or "data")
        parts = [("kvasir", "Kvasir-SEG"), ("cvc", "CVC-ClinicDB")] if split in ("train", "trainval") else \
            [("cvc", "CVC-ClinicDB")]
        built = [build_dataset(name, root / folder, split, **common) for name, folder in parts]
        return ConcatDataset([d for d, _ in built]), built[-1][1]
    return build_dataset(args.data, args.data_root, split, image_size=args.img_size, **common,
                         **dataset_options(args))


def run_splits(args):
    """The splits a run reads: {"train": ..., "select": ..., "test": ...} -> split specs (--train-split, --val-split,
    --test-split; common.plan_splits carves SPLIT:F). --select-on test trains on trainval (all of train) and selects
    on the test split; --eval-only reads the test split only."""
    test = "test" if args.data == "pranet" else args.test_split  # pranet: a TestDataset folder (dataset_options)
    if args.eval_only:
        return {"test": test}
    # DEVIATION (CHOICE C7): select on a validation split carved from train, because selecting on test (the
    # authors' protocol, --select-on test) reports an optimistic test score
    train = args.train_split or ("trainval" if args.select_on == "test" else "train")
    return {"train": train, "select": test if args.select_on == "test" else args.val_split, "test": test}


def checkpoint_flags(args):
    """--eval-only and --resume: the network flags left unset (--arch, --unet-width, --num-classes of a folder set)
    come from the checkpoint's architecture string (e.g. unet-w8-k11), so the user need not repeat them."""
    path = args.checkpoint or Path(args.out) / ("best.pt" if args.eval_only else "last.pt")
    if not (args.eval_only or args.resume) or not Path(path).is_file():
        return
    match = re.fullmatch(r"(.+?)(?:-w(\d+))?-k(\d+)", str(load_checkpoint(path, SCRIPT).get("arch")))
    if match:
        args.arch = args.arch or match[1]
        args.unet_width = args.unet_width or (int(match[2]) if match[2] else None)
        if args.data == "folder" and args.num_classes is None and int(match[3]) > 1:
            args.num_classes = int(match[3])


def load_data(args, runtime):
    """Every split this run reads ({"train", "select", "test"} -> dataset), each label checked, and the recipe
    resolved from the data's kind, before the model exists and before --out is written -> (datasets, info)."""
    datasets, info = {}, None
    checkpoint_flags(args)
    specs = run_splits(args)
    same = args.select_on == "test" and "select" in specs  # selects on the very test split (one carve, not two)
    for role, (split, part) in plan_splits({r: s for r, s in specs.items() if not (same and r == "select")}).items():
        datasets[role], split_info = build_split(args, split, part)
        info = info or split_info
        check_labels(datasets[role], desc=f"checking {specs[role]} labels")
    if same:
        datasets["select"] = datasets["test"]
    resolve_recipe(args, info.binary)
    if "train" in datasets:
        per_rank = -(-len(datasets["train"]) // runtime.world_size)
        if args.img_size == 16 and args.arch not in PRESETS and min(per_rank, args.batch_size) == 1:
            raise UsageError(f"each process trains on batches of one image ({len(datasets['train'])} training images, "
                             f"{runtime.world_size} processes) and at --img-size 16 the U-Net's 1x1 bottleneck gives "
                             f"BatchNorm one value per channel; pass --img-size 32 or more, or more images")
    return datasets, info


def resolve_recipe(args, binary_task):
    """Fill the flags left at None from RECIPES once the data's kind is known (CHOICE C11); -> the recipe name.
    Raises UsageError for a combination that only the data reveals (a LeViT-UNet recipe at another size)."""
    recipe = "shapes" if args.data == "shapes" else ("binary" if binary_task else "multiclass")
    for key, value in RECIPES[recipe].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.drop_path is None:
        args.drop_path = PRESETS[args.arch]["drop_path"] if args.arch in PRESETS else 0.0
    if args.arch in PRESETS and args.img_size != LEVIT_SIZE:
        raise UsageError(f"these data take the {recipe} recipe, --arch {args.arch}, which needs --img-size "
                         f"{LEVIT_SIZE} (got {args.img_size}); pass --arch unet for other sizes")
    if args.levit_weights not in (None, "none") and args.arch not in PRESETS:
        raise UsageError(f"--levit-weights loads a LeViT encoder; --arch {args.arch} has none (pass a levit-* --arch)")
    args.binary_task = binary_task
    args.recipe = recipe
    return recipe


def build_optimizer(args, model):
    """The recipe's optimiser (Adam or SGD with momentum) and the learning-rate schedule (CHOICE C6)."""
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
    gamma = args.lr_gamma if args.lr_schedule == "step" else 1.0  # CHOICE C6: constant unless asked
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, step_size=args.lr_step_size, gamma=gamma)


def load_levit_weights(model, path):
    """Load an ImageNet LeViT checkpoint (facebookresearch/LeViT, key 'model') into a LeViTUNet encoder.

    LeViT keys -> ours: patch_embed.{0,2,4,6} -> stem.{0..3} (the first conv too, unlike the reference code);
    blocks.i -> stages.s.j by the preset's depths; '.c.' -> '.conv.'/'.linear.', '.m.' -> '.block.', 'q.1.' -> 'q.'.
    Classifier heads and the attention_bias_idxs buffers are not loaded (ours are rebuilt by attention_bias_index;
    the file's are checked against them). Returns (number of tensors loaded, list of LeViT keys not loaded).
    CHOICE C13: the reference LeViT-UNet leaves patch_embed.0 (the first conv) random; we load it too.
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
        if name.endswith("attention_bias_idxs"):
            module = model.get_submodule(name.rsplit(".", 1)[0]) if name.startswith("stages.") else None
            if module is not None and value.shape == module.attention_bias_idxs.shape and \
                    not torch.equal(value, module.attention_bias_idxs):
                raise DatasetError(f"--levit-weights {path}: {key} orders the attention offsets differently from this "
                                   f"model; pass an original facebookresearch/LeViT checkpoint")
            skipped.append(key)
        elif name in ours and ours[name].shape == value.shape:
            renamed[name] = value
        else:
            skipped.append(key)
    if not renamed:
        raise DatasetError(f"--levit-weights {path}: no tensor matches a LeViT encoder of this size; pass the "
                           f"facebookresearch/LeViT checkpoint of the same variant as --arch")
    model.load_state_dict(renamed, strict=False)
    return len(renamed), skipped


def architecture(args, num_outputs):
    """The architecture string checkpoints carry (load_checkpoint refuses another)."""
    width = f"-w{args.unet_width}" if args.arch == "unet" else ""
    return f"{args.arch}{width}-k{num_outputs}"


def prepare_model(args, num_outputs, runtime):
    """The network with identical initial weights on every rank, ImageNet LeViT weights where given (CHOICE C13)
    -> (model on the device, pretrained flag)."""
    seed_everything(args.seed)  # identical initial weights on every rank
    model = build_model(args.arch, num_outputs, args.unet_width, args.drop_path)
    pretrained = False
    if args.arch in PRESETS and args.levit_weights not in (None, "none"):
        loaded, skipped = load_levit_weights(model, args.levit_weights)
        pretrained = True
        say(runtime, f"--levit-weights: loaded {loaded} LeViT tensors into the encoder, skipped {len(skipped)} "
                     f"(classifier heads, index buffers)")
    elif args.arch in PRESETS and args.levit_weights is None and runtime.main:
        print(f"warning: {args.arch} starts from random weights; the paper starts from ImageNet LeViT weights: pass "
              f"--levit-weights {LEVIT_WEIGHTS[args.arch]} (https://dl.fbaipublicfiles.com/LeViT/"
              f"{LEVIT_WEIGHTS[args.arch]}), or --levit-weights none to train from scratch without this warning",
              file=sys.stderr, flush=True)
    model = model.to(runtime.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)  # NHWC: the layout fast GPU conv kernels use
    return model, pretrained


def sync_batch_norm(model, enabled, runtime):
    """`enabled` under torchrun on CUDA: BatchNorm over the batches of all ranks (SyncBatchNorm), so 2 processes with
    batch B normalise as 1 with batch 2B; otherwise the model itself (SyncBatchNorm has no CPU kernel)."""
    if enabled and runtime.world_size > 1 and runtime.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def evaluate_checkpoint(model, arch, dataset, info, args, runtime, folder_masks=None):
    """--eval-only: --checkpoint (default --out's best.pt) on the test split -> eval_test.json."""
    out = Path(args.out)
    path = Path(args.checkpoint) if args.checkpoint else out / "best.pt"
    state = load_checkpoint(path, SCRIPT, arch)
    load_state(model, state["model"], path)
    test_loader = make_loader(dataset, args.batch_size, args, runtime, train=False)
    test = evaluate(model, test_loader, args, runtime, info.num_classes, folder_masks, "test")
    result = {"checkpoint": str(path), "test": test}
    if runtime.main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval_test.json", result)
        print(" ".join(f"test_{k}={v:.4f}" for k, v in test.items() if isinstance(v, float)), flush=True)
    return result


def train(model, arch, pretrained, datasets, info, args, runtime, resume_path, folder_masks=None):
    """The MaskSup run: --epochs of train_one_epoch, each followed by evaluate on the selection split, last.pt and
    best.pt (by --select-by on --select-on), samples/epoch_NNN.png; then best.pt on the selection and test splits
    -> results.json."""
    parameters = sum(p.numel() for p in model.parameters())
    palette = info.palette[:2] if args.binary_task else info.palette
    test_loader = make_loader(datasets["test"], args.batch_size, args, runtime, train=False)
    optimizer, scheduler = build_optimizer(args, model)
    start_epoch, best, state = 1, {"score": -math.inf, "epoch": 0}, None
    if resume_path is not None:
        state = load_checkpoint(resume_path, SCRIPT, arch, flag="--resume")
        load_state(model, state["model"], resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
    train_loader = make_loader(datasets["train"], args.batch_size, args, runtime, train=True)
    select_loader = make_loader(datasets["select"], args.batch_size, args, runtime, train=False)
    config = {**vars(args), "parameters": parameters, "pretrained": pretrained, "architecture": arch,
              "world_size": runtime.world_size, "effective_batch_size": args.batch_size * runtime.world_size,
              "train_images": len(datasets["train"]), "num_classes": info.num_classes,
              "mask_files": None if folder_masks is None else {"kept": len(folder_masks.masks),
                                                               "per_bin": folder_masks.counts}}
    out = create_run_dir(args, SCRIPT, config, runtime)
    log = MetricsLog(out, runtime, resume_state=state)
    if runtime.main:
        (out / "samples").mkdir(exist_ok=True)
    train_model = distribute(sync_batch_norm(model, args.sync_bn, runtime), runtime)  # (in place: `model` too)
    step_fn = torch.compile(train_step) if args.compile else train_step  # fuses the step's kernels on GPU
    guard = FiniteGuard()

    for epoch in range(start_epoch, args.epochs + 1):
        started = time.time()
        train_loader.sampler.set_epoch("train", epoch)
        losses = train_one_epoch(train_model, step_fn, optimizer, train_loader, args, runtime, epoch, guard,
                                 folder_masks)
        guard.check("train", epoch)  # a non-finite loss stops here: nothing of this epoch is saved
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        metrics = evaluate(model, select_loader, args, runtime, info.num_classes, folder_masks, args.select_on)
        score = metrics[args.select_by]
        score = -math.inf if math.isnan(score) else score  # e.g. no foreground anywhere yet
        improved = score > best["score"] or best["epoch"] == 0  # so that best.pt always exists
        if improved:
            best = {"score": score, "epoch": epoch}
        log.write({"epoch": epoch, **losses, "lr": lr, **{f"{args.select_on}_{k}": v for k, v in metrics.items()},
                   "time": time.time() - started})
        if runtime.main:  # the record first, then the checkpoint that counts it (a kill between them loses nothing)
            save_checkpoint(out / "last.pt", {"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                                              "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best},
                            SCRIPT, arch, log)
            if improved:
                link_checkpoint(out / "last.pt", out / "best.pt")
            save_samples(model, datasets["select"], args, palette, out / "samples" / f"epoch_{epoch:03d}.png",
                         runtime, folder_masks)
        barrier()  # best.pt is written before any rank reads it

    # final: the selected weights on the selection split and the test split
    state = load_checkpoint(out / "best.pt", SCRIPT, arch)
    load_state(model, state["model"], out / "best.pt")
    results = {"best_epoch": state["best"]["epoch"], f"best_{args.select_on}_{args.select_by}":
               state["best"]["score"], "parameters": parameters, "pretrained": pretrained, "architecture": arch}
    if args.select_on != "test":
        results[args.select_on] = evaluate(model, select_loader, args, runtime, info.num_classes, folder_masks,
                                           args.select_on)
    results["test"] = evaluate(model, test_loader, args, runtime, info.num_classes, folder_masks, "test")
    if runtime.main:
        for split in (args.select_on, "test"):
            print(f"final={split} " + " ".join(f"{k}={v:.4f}" for k, v in results[split].items()
                                              if isinstance(v, float)), flush=True)
        write_json(out / "results.json", results)
    return results


# --- command line ---

def get_args(argv=None):
    parser = ArgumentParser(description="MaskSup: masked supervised learning for semantic segmentation")
    data = parser.add_argument_group("data")
    data.add_argument("--data", default="shapes", choices=[n for n in DATASET_NAMES if n not in IMAGE_ONLY_SETS]
                      + ["polyps"],
                      help="dataset (common.py readers). pranet = the authors' polyp release (TrainDataset 1,450 "
                           "Kvasir + ClinicDB, TestDataset/CVC-ClinicDB 62); polyps = the raw Kvasir-SEG/ and "
                           "CVC-ClinicDB/ releases under one --data-root (its own split, not the paper's)")
    data.add_argument("--data-root", default=None, help="dataset root in its original layout (None: ./data/<name>)")
    data.add_argument("--download", action="store_true", help="let torchvision download the set where it can")
    data.add_argument("--binary", action=argparse.BooleanOptionalAction, default=None,
                      help="treat any non-zero class as foreground (1 logit + BCE); binary sets are binary anyway. "
                           "None: on for shapes (object vs background), off otherwise")
    data.add_argument("--mask-mode", default="auto", choices=("auto", "binary", "ids"),
                      help="--data folder masks: binary = foreground where grey > 127 (0/255 masks, JPEG masks), "
                           "ids = class ids with 255 ignore, auto = binary if every mask holds only 0 and 255")
    data.add_argument("--num-classes", type=int, default=None,
                      help="--data folder with --mask-mode ids: the class count (None: largest id + 1); ids at or "
                           "above it are an error")
    data.add_argument("--label-base", type=int, default=0, choices=(0, 1),
                      help="--data nyudv2: 0 = ids 0..39 with 255 void, 1 = ids 1..40 with 0 void (other releases)")
    data.add_argument("--train-split", default=None,
                      help="split that trains (default train; trainval with --select-on test). SPLIT:F = a seeded "
                           "fraction F of SPLIT (--split-seed); the roles naming SPLIT plainly get the rest")
    data.add_argument("--val-split", default="val", help="split that picks best.pt with --select-on val (or SPLIT:F)")
    data.add_argument("--test-split", default="test",
                      help="split scored as the test result and by --eval-only (or SPLIT:F). --data pranet: the "
                           "TestDataset/<name> folder (test = CVC-ClinicDB, the paper's; PraNet also ships Kvasir, "
                           "CVC-ColonDB, ETIS-LaribPolypDB, CVC-300)")
    data.add_argument("--split-seed", type=int, default=0,
                      help="seed of the readers' seeded splits and of SPLIT:F, kept apart from --seed so that every "
                           "run seed meets the same test images")
    data.add_argument("--void-id", type=int, default=None,
                      help="class-id labels: this id marks unlabelled pixels and becomes 255 (ignore); CamVid's 11 "
                           "is known without it")
    data.add_argument("--img-size", type=int, default=None,
                      help="square input size; paper: 224 (LeViT-UNet needs exactly 224). None: 224, shapes 64")

    masking = parser.add_argument_group("masking")
    masking.add_argument("--masking", default="high", choices=MASKINGS,
                         help="high: free-form holes over 50-60 %% of the image (paper's best); low: 1-10 %%; "
                              "patch: random square patches (--mask-ratio, --patch-size); folder: mask PNGs from "
                              "--mask-dir (white = hole), e.g. the NVIDIA irregular-mask set the paper used")
    masking.add_argument("--mask-dir", default=None, help="folder of mask PNGs for --masking folder")
    masking.add_argument("--mask-area", default="any", choices=("high", "low", "any"),
                         help="--masking folder: only the files whose measured hole fraction lies in the bin "
                              "(high 50-60 %%, low 1-10 %%, the paper's 'High' / 'Low'), or every file")
    masking.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of patches hidden, --masking patch")
    masking.add_argument("--patch-size", type=int, default=16, help="patch side in pixels, --masking patch")

    method = parser.add_argument_group("method (L_total = a1*L_seg + a2*L_context + a3*L_tasksim)")
    method.add_argument("--alpha1", type=float, default=1.0, help="weight of L_seg on the clean image (paper: 1)")
    method.add_argument("--alpha2", type=float, default=1.0,
                        help="weight of L_context on the masked image (paper: 1; 0 with --alpha3 0 = baseline)")
    method.add_argument("--alpha3", type=float, default=1.0,
                        help="weight of L_tasksim between the two predictions (paper: 1; 0 = context branch only)")
    method.add_argument("--tasksim", default="probabilities", choices=("probabilities", "argmax"),
                        help="probabilities: MSE of sigmoid/softmax maps (differentiable); argmax: the authors' "
                             "multi-class code, MSE of argmax maps, which passes no gradient")

    model = parser.add_argument_group("model")
    model.add_argument("--arch", default=None, choices=ARCHS,
                       help="network; paper: levit-384 for GLaS/polyps, unet++ for NYUDv2. None: the recipe's "
                            "(levit-384 binary sets, unet++ multi-class sets, unet shapes)")
    model.add_argument("--unet-width", type=int, default=None,
                       help="--arch unet base width (doubles per level, 5 levels); 20 = 3.07 M params. None: 20, "
                            "shapes 16")
    model.add_argument("--drop-path", type=float, default=None,
                       help="LeViT stochastic depth; None: LeViT's presets, 0 (128s, 192), 0.1 (384)")
    model.add_argument("--levit-weights", default=None, metavar="FILE|none",
                       help="ImageNet LeViT checkpoint of the same variant (facebookresearch/LeViT: "
                            + ", ".join(LEVIT_WEIGHTS.values()) + "); none = random weights, no warning")
    model.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                       help="BatchNorm over the batches of all processes under torchrun on CUDA (SyncBatchNorm: 2 "
                            "processes with batch B normalise as 1 with batch 2B); --no-sync-bn: per process. No "
                            "effect on one process or on the CPU")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=None, help="paper: 200. None: 200, shapes 20")
    optim.add_argument("--batch-size", type=int, default=None,
                       help="per process; paper: 16 GLaS/polyps, 8 NYUDv2. None: the recipe's, shapes 16")
    optim.add_argument("--optimizer", default=None, choices=("adam", "sgd"),
                       help="paper: Adam for GLaS/polyps, SGD momentum 0.9 for NYUDv2. None: the recipe's")
    optim.add_argument("--lr", type=float, default=None, help="paper: 1e-4 Adam, 0.1 SGD. None: those; shapes 1e-3")
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
                            help="split that picks best.pt; val or test (the authors' protocol: train on all of "
                                 "train and select on test; optimistic)")
    evaluation.add_argument("--select-by", default="miou", choices=("miou", "paper_iou"),
                            help="metric that picks best.pt: miou (standard dataset-level mIoU) or paper_iou (the "
                                 "paper's per-image protocol, which the authors selected by)")
    evaluation.add_argument("--num-samples", type=int, default=6, help="images in each samples/ PNG grid")
    add_run_arguments(parser, SCRIPT)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


def check_args(parser, args):
    """Defaults that do not depend on the data, and every refusal the flags alone allow; the recipe (arch,
    optimiser, lr, batch, epochs) is resolved once the data is read (resolve_recipe, CHOICE C11)."""
    shapes = args.data == "shapes"
    if args.binary is None:
        args.binary = shapes  # CHOICE C10: the synthetic default is binary, like the paper's GLaS/polyp tasks
    if args.img_size is None:
        args.img_size = 64 if shapes and args.arch not in PRESETS else LEVIT_SIZE
    if args.arch in PRESETS and args.img_size != LEVIT_SIZE:
        parser.error(f"--arch {args.arch} needs --img-size {LEVIT_SIZE}: LeViT-UNet's attention biases are tied to "
                     f"its 14x14/7x7/4x4 token grids (got {args.img_size}); use --arch unet for other sizes")
    if args.img_size < 16 or args.img_size % 16:
        parser.error(f"--img-size must be a multiple of 16 (the U-Nets halve it 4 times), got {args.img_size}")
    if args.unet_width is not None and args.unet_width < 1:
        parser.error(f"--unet-width must be positive, got {args.unet_width}")
    if args.masking == "folder" and not args.mask_dir:
        parser.error("--masking folder needs --mask-dir DIR (a folder of mask PNGs, white = hole)")
    if args.mask_dir and args.masking != "folder":
        parser.error("--mask-dir is only read with --masking folder")
    if args.mask_area != "any" and args.masking != "folder":
        parser.error("--mask-area picks files of --masking folder; --masking high/low already set the hole area")
    if not 0.0 < args.mask_ratio < 1.0:
        parser.error(f"--mask-ratio must be between 0 and 1 (exclusive), got {args.mask_ratio}")
    if args.masking == "patch" and (args.patch_size < 1 or args.img_size % args.patch_size):
        parser.error(f"--patch-size must divide --img-size ({args.img_size}), got {args.patch_size}")
    for name in ("alpha1", "alpha2", "alpha3"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.alpha1 + args.alpha2 + args.alpha3 == 0:
        parser.error("--alpha1, --alpha2 and --alpha3 are all 0: nothing to train")
    for name in ("epochs", "batch_size", "num_samples", "lr_step_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.drop_path is not None and not 0.0 <= args.drop_path < 1.0:
        parser.error(f"--drop-path must be in [0, 1), got {args.drop_path}")
    if args.levit_weights not in (None, "none"):
        if args.arch is not None and args.arch not in PRESETS:
            parser.error(f"--levit-weights loads a LeViT encoder; --arch {args.arch} has none (pass a levit-* --arch)")
        if not Path(args.levit_weights).is_file():
            parser.error(f"--levit-weights {args.levit_weights}: no such file (a facebookresearch/LeViT .pth, e.g. "
                         f"{LEVIT_WEIGHTS['levit-384']}; or pass none)")
    if args.data != "folder" and (args.mask_mode != "auto" or args.num_classes is not None):
        parser.error("--mask-mode and --num-classes describe --data folder masks; the other readers know theirs")
    if args.num_classes is not None and (args.num_classes < 2 or args.mask_mode == "binary"):
        parser.error(f"--num-classes needs --mask-mode ids and at least 2 classes, got {args.num_classes}")
    if args.label_base and args.data != "nyudv2":
        parser.error("--label-base is read by --data nyudv2 only")
    if args.void_id is not None and not 0 <= args.void_id < 65536:
        parser.error(f"--void-id must be a label value in 0..65535, got {args.void_id}")
    try:
        plan_splits({r: s for r, s in run_splits(args).items() if not (r == "select" and args.select_on == "test")})
    except DatasetError as error:
        parser.error(str(error))
    if args.batch_size == 1 and args.img_size == 16 and args.arch not in PRESETS:
        parser.error("--batch-size 1 with --img-size 16: the U-Net's 1x1 bottleneck would give BatchNorm one value "
                     "per channel; pass --batch-size 2 or more, or --img-size 32 or more")
    check_run_arguments(parser, args, SCRIPT)


def main(args):
    resume_path = check_run_dir(args, SCRIPT)  # nothing is written before the flags and the data are checked
    runtime = setup_runtime(args, amp_on_cpu=True)  # bf16 on a CPU held test mIoU within the seed spread (README)
    try:
        datasets, info = load_data(args, runtime)
        num_outputs = 1 if args.binary_task else info.num_classes  # CHOICE C4: binary sets use one logit
        folder_masks = None
        if args.masking == "folder":
            folder_masks = FolderMasks(args.mask_dir, args.img_size, runtime.device, args.mask_area,
                                       track=lambda files: progress(files, runtime, "reading masks"))
        model, pretrained = prepare_model(args, num_outputs, runtime)
        arch = architecture(args, num_outputs)
        if args.eval_only:
            return evaluate_checkpoint(model, arch, datasets["test"], info, args, runtime, folder_masks)
        return train(model, arch, pretrained, datasets, info, args, runtime, resume_path, folder_masks)
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
