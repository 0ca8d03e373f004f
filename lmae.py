r"""L-MAE: Masked Autoencoders are Semantic Segmentation Datasets Augmenter.

Jia, Liu, Xie, Chen, Zhang, Zhao, Yang, arXiv 2211.11242 (v2), https://arxiv.org/abs/2211.11242. No official code.

L-MAE completes segmentation labels that have missing pixels. The label, one-hot per class, is stacked with its image
into a fuse map (Stack Fuse) and whole fuse-map patches are hidden. An MAE-style ViT encoder sees only the visible
patches; a ViT decoder, whose hidden positions receive an embedding of the image patch there (Image Patch
Supplement), predicts the class of every pixel. It trains by hiding patches of the labels it has; to complete a
dataset, the patches holding unknown pixels are hidden and predicted, and only the unknown pixels are written.

Implemented (component -> function -> paper place)
    Stack Fuse: layer / direct / insert concat      -> stack_fuse                     -> Sec. III-A, Eq. (1), Table III
    masks random / label-first / background-first, mixed 1:2:2 -> training_mask, rank_patches -> Sec. III-B
    patch embedding, fixed sin-cos positions         -> LMAE.encode, sincos_pos_embed  -> Sec. III-A, Eqs. (2)-(3)
    LMMSA block: attention, ReLU FFN, DropPath       -> LMMSABlock, Attention          -> Sec. III-C, Eqs. (4)-(9)
    encoder on visible tokens, decoder on all L      -> LMAE.encode, LMAE.decode       -> Sec. III-C, Fig. 3
    Image Patch Supplement (--no-ips: mask token)    -> LMAE.decoder_input             -> Sec. III-C, Figs. 5-6
    presets EB/DB/ED/DD                              -> PRESETS, count_parameters      -> Table IV
    class-weighted CE, learnable beta and gamma      -> ClassWeighting, lmae_loss      -> Sec. III-E, Eqs. (10)-(12)
    Adam, ReduceLROnPlateau, crops, batch sizes      -> train_step, train, get_args    -> Sec. IV-A
    PA-mIoU (hidden pixels) and global mIoU          -> evaluate                       -> Sec. IV-B, Table IV
    completion, routing by mask ratio                -> complete, plan_hidden, complete_batch -> Sec. III-D, Fig. 4
    label degradation (augmentation experiment)      -> degrade, degrade_label         -> Sec. IV-C
    not in the paper: conv head + nearest prior      -> LMAEWithConvHead, ConvHead     -> CHOICE C15
    not in the paper: model-free fills (baselines)   -> nearest_known_fill, most_frequent_known_class
    not in the paper: boundary-weighted loss, recipes -> boundary_weights, RECIPES    -> CHOICE C18, C19
    not in the paper: self-check, --fill, tiles      -> self_check, complete_tiled      -> CHOICE C17

Usage
    python lmae.py                                  # synthetic shapes, --recipe fill (C19), ~2 min on 2 CPU cores
    python lmae.py --data voc --data-root data/VOCdevkit --mask-ratio 0.5                   # Sec. IV-A settings
    torchrun --nproc_per_node=4 lmae.py --data voc --data-root data/VOCdevkit --compile --channels-last
    python lmae.py --resume --out runs/lmae-voc                     # continue at the next epoch
    python lmae.py degrade --data camvid --data-root data/CamVid --ratio 0.5 --out deg      # partial labels, then
    python lmae.py complete --checkpoint runs/x/best.pt --images deg/train/images --labels deg/train/masks --out done

Shapes: B batch, C_f fuse-map channels, H W height width, P patch size, gh gw = H/P, W/P, L = gh * gw patches,
L_vis visible patches, D embedding width (D_e encoder, D_d decoder), K classes. mask (B, L) bool, True = hidden;
pixel masks (B, H, W) bool, same meaning; labels (B, H, W) int64 with 255 = void / unknown.
Choices and deviations: README 'L-MAE' (Choices, Deviations) and `grep -n "CHOICE\|DEVIATION" lmae.py`.
"""

import argparse
import csv
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
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from common import (DATASET_NAMES, IMAGE_EXTENSIONS, NORMALIZATION, ConfusionMatrix, DatasetError, build_dataset,
                    check_labels, denormalize, joint_transform, load_rgb, plan_splits, read_label)

SCRIPT = "lmae.py"
IGNORE = 255  # void in the given labels, unknown in labels to complete
STRATEGIES = ("random", "label-first", "background-first")  # Sec. III-B; index = strategy id
FUSES = ("layer", "direct", "insert")  # Table III: Layer Concat (the paper's), Directly Concat, Insert Concat
GAMMA_INIT = 1.0  # Eq. (10) gamma at the start (CHOICE C7)


# --- Stack Fuse (Sec. III-A, Eq. 1) ---
def one_hot_layers(labels, num_classes, dtype):
    """labels (B, H, W) int64 (255 = void) -> (B, K, H, W) one-hot layers, void all-zero (CHOICE C1)."""
    void = labels == IGNORE
    one_hot = F.one_hot(torch.where(void, num_classes, labels), num_classes + 1)[..., :num_classes]  # (B, H, W, K)
    return one_hot.permute(0, 3, 1, 2).to(dtype)


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
        return torch.cat([one_hot_layers(labels, num_classes, images.dtype), images], dim=1)  # (B, K + 3, H, W)
    level = torch.where(void, 0.0, (labels.to(images.dtype) + 1) / num_classes).unsqueeze(1)  # (B, 1, H, W)
    if fuse == "direct":
        return torch.cat([images, level], dim=1)  # (B, 4, H, W)
    red, green, blue = images.split(1, dim=1)
    return torch.cat([red, level, green, level, blue, level], dim=1)  # (B, 6, H, W)


# --- masking (Sec. III-B) ---

def pixel_fraction(pixels, patch_size):
    """(B, H, W) bool -> (B, L) fraction of True pixels per patch; patches are numbered row-major."""
    B, H, W = pixels.shape
    P = patch_size
    return pixels.reshape(B, H // P, P, W // P, P).float().mean(dim=(2, 4)).flatten(1)


def patch_fractions(labels, patch_size, background_class):
    """labels (B, H, W) int64 -> (object fraction, background fraction) per patch, each (B, L) float in [0, 1].
    Object = neither background nor void."""
    background = pixel_fraction(labels == background_class, patch_size)  # (B, L)
    return pixel_fraction((labels != background_class) & (labels != IGNORE), patch_size), background


def rank_patches(keys, generator=None, noise=None):
    """Order of the patches, most preferred first: by keys[0] descending, then keys[1], ...; remaining ties in a
    uniformly random order (CHOICE C3).

    keys: list of (B, L) float tensors; noise (B, L) uniform draws of the tie-break (drawn from `generator` when
    None). Returns ids (B, L) int64, a permutation of 0..L-1 per sample.
    """
    B, L = keys[0].shape
    if noise is None:
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


def draw_strategies(batch_size, strategy, mix, device, generator=None, u=None):
    """(B,) int64 strategy id per sample (index into STRATEGIES); `mixed` draws with weights `mix` (Sec. III-B)
    from u (B,) uniform (drawn from `generator` when None)."""
    if strategy != "mixed":
        return torch.full((batch_size,), STRATEGIES.index(strategy), dtype=torch.int64, device=device)
    total = sum(mix)
    first, second = mix[0] / total, (mix[0] + mix[1]) / total  # cumulative weights as Python floats: no host copy
    if u is None:
        u = torch.rand(batch_size, device=device, generator=generator)
    return (u >= first).long() + (u >= second).long()


def training_mask(labels, strategy, mix, mask_ratio, patch_size, background_class, generator=None,
                  unknown_first=False, uniforms=None):
    """Hide exactly round(mask_ratio * L) patches of every sample with the chosen strategy (Sec. III-B).

    labels (B, H, W) int64. Returns mask (B, L) bool, True = hidden, and ids_keep (B, L_vis) int64.
    random: every patch alike; label-first: most object pixels first; background-first: most background first.
    unknown_first: patches with more unknown (255) pixels go before all others (CHOICE C3).
    uniforms (B, 1 + L): each sample's own draws (strategy, then tie-break; item_uniforms), else from `generator`.
    """
    B = labels.shape[0]
    objects, background = patch_fractions(labels, patch_size, background_class)  # (B, L) each
    u, noise = (None, None) if uniforms is None else (uniforms[:, 0], uniforms[:, 1:])
    ids = draw_strategies(B, strategy, mix, labels.device, generator, u)[:, None]  # (B, 1)
    score = torch.where(ids == 1, objects, torch.where(ids == 2, background, torch.zeros_like(objects)))  # (B, L)
    keys = [(1 - objects - background).clamp(min=0), score] if unknown_first else [score]
    num_hidden = round(mask_ratio * score.shape[1])
    return hide_first(rank_patches(keys, generator, noise), num_hidden)


def pixel_mask(mask, patch_size, grid):
    """Patch mask (B, L) bool -> pixel mask (B, H, W) bool, H = gh * P, W = gw * P."""
    gh, gw = grid
    P = patch_size
    B = mask.shape[0]
    return mask.view(B, gh, 1, gw, 1).expand(B, gh, P, gw, P).reshape(B, gh * P, gw * P)


def hidden_of(ids_keep, num_patches):
    """ids_keep (B, L_vis) -> mask (B, L) bool, True = hidden."""
    mask = torch.ones(ids_keep.shape[0], num_patches, dtype=torch.bool, device=ids_keep.device)
    return mask.scatter(1, ids_keep, False)


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


def xavier_init(root):
    """MAE's initialisation: xavier-uniform linear maps (patch convolutions seen as linear), zero biases."""
    for module in root.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class LMAE(nn.Module):
    """Label Masked Autoencoder (Fig. 3): Stack Fuse -> patch embedding + positions -> encoder on visible tokens
    -> Image Patch Supplement (or mask token) -> decoder on all L tokens -> per-pixel class logits.

    The paper's ablation switches: fuse (Table III), ips (Fig. 6), pos_embed (CHOICE C2), drop_path (C6) and the
    Eq. (10) class_weighting module (a ClassWeighting; default: learnable beta = gamma = 1).
    """

    def __init__(self, num_classes, patch_size=16, encoder_depth=8, decoder_depth=6, encoder_dim=1440,
                 decoder_dim=720, encoder_heads=20, decoder_heads=10, fuse="layer", ips=True, pos_embed="2d",
                 drop_path=0.0, class_weighting=None):
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
        # Eq. (10)'s beta and gamma live in the model, so that the optimizer, DDP and the checkpoints see them
        self.class_weighting = ClassWeighting() if class_weighting is None else class_weighting
        xavier_init(self)
        if not ips:
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


# Table IV. Parameter counts measured by tests/test_lmae.py (count_parameters: K = 21 VOC classes, 24 fuse
# channels, patch 16) next to the paper's figure. CHOICE C5: heads of width 64 (1024/512) or 72 (1440/720).
PRESETS = {name: dict(zip(("encoder_depth", "decoder_depth", "encoder_dim", "decoder_dim", "encoder_heads",
                            "decoder_heads"), sizes)) for name, sizes in {
    "eb12-db8-ed1024-dd512": (12, 8, 1024, 512, 16, 8),  # 186.3 M (paper 186 M)
    "eb12-db8-ed1440-dd720": (12, 8, 1440, 720, 20, 10),  # 363.0 M (paper 362 M)
    "eb8-db6-ed1024-dd512": (8, 6, 1024, 512, 16, 8),  # 129.7 M (paper 129 M)
    "eb8-db6-ed1440-dd720": (8, 6, 1440, 720, 20, 10),  # 250.9 M (paper 250 M), main results
    "eb6-db4-ed1024-dd512": (6, 4, 1024, 512, 16, 8),  # 98.2 M (paper 98 M)
    "eb6-db4-ed1440-dd720": (6, 4, 1440, 720, 20, 10),  # 188.7 M (paper 188 M)
    "small": (6, 4, 384, 256, 6, 8),  # 17.8 M, not in the paper
    "tiny": (4, 2, 128, 96, 2, 2),  # 2.4 M (1.1 M at K = 5, patch 8); shapes default (C14)
}.items()}
PAPER_PRESET = "eb8-db6-ed1440-dd720"  # Table I, Sec. IV-E1: "we choose EB=8, DB=6, ED=1440, DD=720"


def count_parameters(preset, num_classes=21, patch_size=16, fuse="layer", ips=True):
    """Parameters of a preset, counted on the meta device (no memory), without Eq. (10)'s beta and gamma."""
    with torch.device("meta"):
        model = LMAE(num_classes, patch_size, **PRESETS[preset], fuse=fuse, ips=ips)
    return sum(p.numel() for name, p in model.named_parameters() if not name.startswith("class_weighting"))


# --- loss (Sec. III-E) ---

def lmae_loss(logits, labels, hidden_pixels, class_weighting, loss_region="all", ignore_background=False,
              background_class=0, pixel_weights=None, over_ranks=False):
    """Class-weighted cross-entropy, Eqs. (10)-(12).

    logits (B, K, H, W) float, labels (B, H, W) int64 (255 = void), hidden_pixels (B, H, W) bool.
    class_weighting: ClassWeighting module, or None for plain CE (--class-weighting none). pixel_weights (B, H, W)
    float or None: a further weight per pixel (boundary_weights, not in the paper). over_ranks (training under DDP):
    Eq. (12)'s denominator is the mean over the ranks, so that DDP's mean of the ranks' gradients is the gradient of
    the loss over the global batch even when the ranks' weight sums differ. Returns a scalar.
    """
    K = logits.shape[1]
    counted = labels != IGNORE  # which pixels count: CHOICE C8
    if loss_region == "masked":
        counted = counted & hidden_pixels
    if ignore_background:
        counted = counted & (labels != background_class)
    targets = torch.where(counted, labels, 0)  # (B, H, W), in range everywhere
    per_pixel = F.cross_entropy(logits.float(), targets, reduction="none")  # -log softmax(x_n)[y_n], Eq. (11)
    if class_weighting is None:  # DEVIATION: the default, w_i = 1 (README, Deviations)
        weights = torch.ones(K, device=logits.device)
    else:
        counts = torch.zeros(K, device=logits.device).scatter_add_(0, targets.flatten(), counted.flatten().float())
        weights = class_weighting(counts / counts.sum().clamp(min=1.0))  # Eq. (10), x_i = class proportions (C7)
    extra = 1.0 if pixel_weights is None else pixel_weights
    pixel_weights = weights[targets] * counted * extra  # w_{y_n} * 1{y_n != ignore}, (B, H, W)
    # Eq. (12): l = sum_n w_{y_n} l_n / sum_n w_{y_n}, over the counted pixels
    denominator = pixel_weights.sum()
    if over_ranks:  # the value of the global denominator, the gradient of the local one
        denominator = denominator + (all_reduce_sum(denominator.detach().clone()) / dist.get_world_size()
                                     - denominator.detach())
    return (pixel_weights * per_pixel).sum() / denominator.clamp(min=1e-12)


# --- not in the paper: model-free fills (the baselines every score is compared with) ---

def most_frequent_known_class(labels, known, num_classes, chunk=2 ** 22):
    """Baseline completion: per image the most frequent class among its known pixels -> (B,) int64.

    labels (B, H, W) int (uint8 or int64), known (B, H, W) bool (labelled and visible). Ties go to the lowest id.
    Counted in chunks of `chunk` pixels per image (bounded memory at any size).
    """
    B = labels.shape[0]
    ids = torch.where(known & (labels != IGNORE), labels, num_classes).flatten(1)  # (B, H*W), K = not counted
    counts = torch.zeros(B, num_classes + 1, dtype=torch.int64, device=labels.device)
    for start in range(0, ids.shape[1], chunk):
        part = ids[:, start:start + chunk].long()
        counts.scatter_add_(1, part, torch.ones_like(part))  # (B, K + 1) pixels per class
    return counts[:, :num_classes].argmax(dim=1)


@torch.no_grad()
def nearest_known_fill(labels, known, chunk=2 ** 22, block=32):
    """Baseline completion: every pixel takes the class of its nearest known pixel (exact Euclidean distance).

    labels (B, H, W) int (255 = void), known (B, H, W) bool -> (B, H, W) of labels' dtype; known pixels keep their
    class, an image without any known pixel gets class 0. Two passes of the exact distance transform, in strips of
    `block` columns so that memory stays bounded at any image size: the nearest known row of every column (int32),
    then per pixel the column x' minimising (x - x')^2 + dy(x')^2. Only columns within dy(x) of x can win (its own
    column is that close), so each strip searches its columns +- the strip's largest dy, in chunks of rows
    (B x rows x strip x window values at a time); ties go to the lowest x', as a search of every column would.
    """
    B, H, W = labels.shape
    known = known & (labels != IGNORE)
    rows = torch.arange(H, device=labels.device, dtype=torch.int32).view(1, H, 1)
    far = 4 * (H + W)  # a row index no known pixel has
    nearest_row = torch.empty(B, H, W, dtype=torch.int32, device=labels.device)  # nearest known row in the column
    for c0 in range(0, W, block):
        strip = known[:, :, c0:c0 + block]
        above = torch.where(strip, rows, -far).cummax(dim=1).values  # nearest known row at or above
        below = torch.where(strip, rows, H + far).flip(1).cummin(dim=1).values.flip(1)  # at or below
        nearest_row[:, :, c0:c0 + block] = torch.where(rows - above <= below - rows, above, below)
    flat = labels.flatten(1)  # (B, H*W)
    filled = torch.empty_like(labels)
    for c0 in range(0, W, block):
        c1 = min(W, c0 + block)
        reach = int((nearest_row[:, :, c0:c1] - rows).abs().max())  # no candidate column lies farther than this
        lo, hi = max(0, c0 - reach), min(W, c1 + reach)
        x = torch.arange(c0, c1, device=labels.device, dtype=torch.float32)
        candidates = torch.arange(lo, hi, device=labels.device, dtype=torch.float32)
        dx2 = (x[:, None] - candidates[None, :]) ** 2  # (strip, window) over (x, x')
        step = max(1, chunk // max(B * (c1 - c0) * (hi - lo), 1))
        for r0 in range(0, H, step):
            near = nearest_row[:, r0:r0 + step, lo:hi]  # (B, h, window)
            dy2 = (near - rows[:, r0:r0 + step]).float() ** 2  # huge in columns without a known pixel
            best = (dx2[None, None] + dy2[:, :, None, :]).argmin(dim=-1)  # (B, h, strip): best x' - lo per pixel
            row = near.gather(2, best).long().clamp(0, H - 1)  # (B, h, strip): its known row
            filled[:, r0:r0 + step, c0:c1] = flat.gather(1, (row * W + best + lo).flatten(1)).view(B, -1, c1 - c0)
    any_known = known.flatten(1).any(dim=1)[:, None, None]  # (B, 1, 1)
    return torch.where(any_known, filled, 0)


def boundary_weights(labels, weight, radius=2):
    """CHOICE C18 (not in the paper): labels (B, H, W) int64 -> (B, H, W) float loss weights, `weight` on pixels
    within `radius` px (Chebyshev) of a change of label (void counts as a label), 1 elsewhere: the pixels where a
    nearest fill errs get more of the gradient."""
    values = labels[:, None].float()  # (B, 1, H, W)
    high = F.max_pool2d(values, 2 * radius + 1, 1, radius)
    low = -F.max_pool2d(-values, 2 * radius + 1, 1, radius)
    return torch.where((high != low)[:, 0], float(weight), 1.0)  # (B, H, W)


# --- not in the paper: a convolutional head with the nearest-known-pixel prior (--head conv, CHOICE C15) ---

HEADS = ("linear", "conv")  # --head: linear = LMAE's own per-token head (the paper's), conv = LMAEWithConvHead
PRIOR_SCALE = 4.0  # --nearest-prior: initial logit given to the nearest-known-pixel class (CHOICE C15)


class ConvHead(nn.Module):
    """CHOICE C15: four 3x3 convolutions with dilation 1, 2, 4, 8 (receptive field 31 px) and a 1x1 output, plus
    a 1x1 skip from the inputs (a linear path: the visible labels or the nearest fill can be copied at once)."""

    def __init__(self, in_channels, num_classes, width):
        super().__init__()
        layers, channels = [], in_channels
        for dilation in (1, 2, 4, 8):
            layers += [nn.Conv2d(channels, width, 3, padding=dilation, dilation=dilation), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(width, num_classes, 1)
        self.skip = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x):  # (B, C_in, H, W) -> (B, K, H, W)
        return self.out(self.body(x)) + self.skip(x)


class LMAEWithConvHead(nn.Module):
    """The paper's LMAE (self.lmae) plus a correction of its logits by a ConvHead (self.refine) that sees the
    logits, the image and the visible labels (hidden pixels blank), and with nearest_prior the nearest-known-pixel
    fill too, so that pixels inside a hidden patch can follow image edges and neighbouring labels (CHOICE C15).
    The correction starts at zero; with nearest_prior its 1x1 skip starts at PRIOR_SCALE x the fill's one-hot, so
    an untrained model reproduces that fill. It never sees a hidden label."""

    def __init__(self, lmae, width=32, nearest_prior=False):
        super().__init__()
        K = lmae.num_classes
        self.lmae, self.nearest_prior = lmae, nearest_prior
        self.refine = ConvHead(K * (3 if nearest_prior else 2) + 3, K, width)
        xavier_init(self.refine)  # LMAE's initialisation, then the correction's start
        nn.init.zeros_(self.refine.out.weight)
        nn.init.zeros_(self.refine.skip.weight)
        if nearest_prior:
            self.refine.skip.weight.data[:, -K:, 0, 0] = PRIOR_SCALE * torch.eye(K)
        self.register_load_state_dict_pre_hook(remap_old_conv_head_keys)

    @property
    def class_weighting(self):  # Eq. (10)'s beta and gamma, where the loops look for them
        return self.lmae.class_weighting

    def forward(self, images, labels, ids_keep):  # as LMAE.forward: -> logits (B, K, H, W)
        logits = self.lmae(images, labels, ids_keep)  # (B, K, H, W)
        P, K = self.lmae.patch_size, self.lmae.num_classes
        grid = (images.shape[2] // P, images.shape[3] // P)
        hidden = pixel_mask(hidden_of(ids_keep, grid[0] * grid[1]), P, grid)  # (B, H, W)
        visible_labels = torch.where(hidden, IGNORE, labels)  # the head never sees a hidden label
        parts = [logits, images.to(logits.dtype), one_hot_layers(visible_labels, K, logits.dtype)]
        if self.nearest_prior:
            fill = nearest_known_fill(visible_labels, visible_labels != IGNORE)  # (B, H, W)
            parts.append(one_hot_layers(fill, K, logits.dtype))
        return logits + self.refine(torch.cat(parts, dim=1))  # (B, K, H, W)


def remap_old_conv_head_keys(module, state_dict, prefix, *_):
    """Checkpoints written while the conv head lived inside LMAE hold the paper's weights at the top level
    (`patch_embed.weight`, ...); they now live under `lmae.` (the head's own weights stay under `refine.`)."""
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith((prefix + "lmae.",
                                                                                    prefix + "refine."))]:
        state_dict[prefix + "lmae." + key[len(prefix):]] = state_dict.pop(key)


# --- loops ---

def item_uniforms(key, items, labels, patch_size):
    """(len(items), 1 + L) uniform draws for the batch `labels` (B, H, W), L its patch count; row i from a generator
    seeded by key + (items[i],), e.g. (seed, "masks", epoch, index): an image gets the same mask whatever the batch
    size, the process count or the worker count, so 2 processes with batch B train on the masks of 1 process with
    batch 2B."""
    num_patches = (labels.shape[1] // patch_size) * (labels.shape[2] // patch_size)
    return torch.cat([torch.rand(1, 1 + num_patches, generator=make_generator(*key, item, device=labels.device),
                                 device=labels.device) for item in items])


def draw_mask(labels, strategy, args, generator=None, uniforms=None):
    """The masks of one batch, the one sequence training, evaluation and the sample grids use (Sec. III-B).

    labels (B, H, W) int64 -> mask (B, L) bool (True = hidden), ids_keep (B, L_vis) int64, hidden pixels (B, H, W).
    uniforms (B, 1 + L) from item_uniforms: per-item draws; otherwise one generator for the batch.
    """
    mask, ids_keep = training_mask(labels, strategy, args.mix, args.mask_ratio, args.patch_size,
                                   args.background_class, generator, args.unknown_first, uniforms)
    grid = (labels.shape[1] // args.patch_size, labels.shape[2] // args.patch_size)
    return mask, ids_keep, pixel_mask(mask, args.patch_size, grid)


def masked_batches(loader, key, args, runtime, desc):
    """The loader's batches on the device (images channels_last with --channels-last: faster convolutions on GPU),
    each with its items' mask draws item_uniforms(key, ...) (B, 1 + L)."""
    indices, seen = loader.sampler.indices(), 0  # this rank's items in loader order: each item's mask key
    for images, labels in progress(loader, runtime, desc):
        images, labels = images.to(runtime.device, non_blocking=True), labels.to(runtime.device, non_blocking=True)
        images = images.contiguous(memory_format=torch.channels_last) if args.channels_last else images
        yield images, labels, item_uniforms(key, indices[seen:seen + len(images)], labels, args.patch_size)
        seen += len(images)


def train_step(model, optimizer, images, labels, args, runtime, generator=None, uniforms=None):
    """One step: draw masks (Sec. III-B; per-item draws `uniforms` or `generator`), forward, Eqs. (10)-(12), Adam.
    Returns the loss (0-dim, on device)."""
    _, ids_keep, hidden = draw_mask(labels, args.masking, args, generator, uniforms)  # (B, L_vis), (B, H, W)
    with autocast(runtime):
        logits = model(images, labels, ids_keep)  # (B, K, H, W)
    weighting = unwrap(model).class_weighting if args.class_weighting == "paper" else None
    extra = boundary_weights(labels, args.boundary_weight) if args.boundary_weight != 1.0 else None  # CHOICE C18
    loss = lmae_loss(logits, labels, hidden, weighting, args.loss_region, args.ignore_background_in_loss,
                     args.background_class, extra, over_ranks=runtime.world_size > 1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_one_epoch(model, optimizer, loader, step, args, runtime, guard, epoch):
    """One pass over the training loader; returns the mean loss over all ranks (float).

    Each image's mask draws from a generator keyed by (seed, epoch, item) (item_uniforms), stochastic depth from
    one keyed by (seed, epoch, rank): a resumed epoch replays both.
    """
    model.train()
    torch.manual_seed(derive_seed(args.seed, "drop-path", epoch, runtime.rank))  # DropPath's global RNG
    total = torch.zeros(2, device=runtime.device)  # loss sum, steps
    key = (args.seed, "masks", epoch)
    for images, labels, uniforms in masked_batches(loader, key, args, runtime, f"epoch {epoch}"):
        loss = step(model, optimizer, images, labels, args, runtime, None, uniforms)
        guard.observe(loss)
        total[0] += loss
        total[1] += 1
    all_reduce_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()  # sync point


@torch.no_grad()
def evaluate(model, loader, args, runtime, num_classes):
    """Validation with masks keyed by (seed, item): the same masks every epoch (CHOICE C10), and for any process
    count.

    Returns, over all ranks: loss; pa_miou, the mIoU of the hidden pixels (PA-mIoU, Sec. IV-B); miou, the mIoU of
    the completed label (given label on visible patches, prediction on hidden ones: what `complete` writes; the
    paper's "global mIoU", CHOICE C8); pred_miou, the mIoU of the raw prediction on every pixel; the same PA-mIoU
    for two fills without a model, nearest_pa_miou (each hidden pixel takes its nearest known pixel's class) and
    frequent_pa_miou (each image's most frequent known class); blank_pa_miou, the model with every visible label
    blanked (the label-context control: how much the visible labels help); pixel accuracies and per-class IoUs.
    """
    model.eval()
    device = runtime.device
    names = ("model", "completed", "prediction", "nearest", "frequent", "blank")
    matrices = {name: ConfusionMatrix(num_classes, device=device) for name in names}
    total = torch.zeros(2, device=device)  # loss sum, batches
    weighting = model.class_weighting if args.class_weighting == "paper" else None
    for images, labels, uniforms in masked_batches(loader, (args.seed, "eval-masks"), args, runtime, "evaluating"):
        _, ids_keep, hidden = draw_mask(labels, args.eval_masking, args, None, uniforms)  # (B, L_vis), (B, H, W)
        with autocast(runtime):
            logits = model(images, labels, ids_keep)  # (B, K, H, W)
            blank_logits = model(images, torch.full_like(labels, IGNORE), ids_keep)  # no visible label at all
        total[0] += lmae_loss(logits, labels, hidden, weighting, args.loss_region, args.ignore_background_in_loss,
                              args.background_class)
        total[1] += 1
        preds = logits.argmax(dim=1)  # (B, H, W)
        known = ~hidden & (labels != IGNORE)
        matrices["model"].update(preds, labels, region=hidden)  # PA-mIoU: only the hidden (predicted) area
        matrices["completed"].update(torch.where(hidden, preds, labels), labels)
        matrices["prediction"].update(preds, labels)
        matrices["nearest"].update(nearest_known_fill(labels, known), labels, region=hidden)
        frequent = most_frequent_known_class(labels, known, num_classes)[:, None, None].expand_as(labels)
        matrices["frequent"].update(frequent, labels, region=hidden)
        matrices["blank"].update(blank_logits.argmax(dim=1), labels, region=hidden)
    all_reduce_sum(total)
    scores = {name: matrix.all_reduce().compute() for name, matrix in matrices.items()}
    return {"loss": (total[0] / total[1].clamp(min=1)).item(),  # sync point
            "pa_miou": scores["model"]["miou"], "miou": scores["completed"]["miou"],
            "pred_miou": scores["prediction"]["miou"], "nearest_pa_miou": scores["nearest"]["miou"],
            "frequent_pa_miou": scores["frequent"]["miou"], "blank_pa_miou": scores["blank"]["miou"],
            "pa_pixel_acc": scores["model"]["pixel_acc"], "nearest_pa_pixel_acc": scores["nearest"]["pixel_acc"],
            "frequent_pa_pixel_acc": scores["frequent"]["pixel_acc"],
            "pa_per_class_iou": scores["model"]["per_class_iou"], "per_class_iou": scores["completed"]["per_class_iou"]}


def colorize(labels, palette):
    """(B, H, W) int64 class ids -> (B, 3, H, W) float in [0, 1]; 255 (ignore) and unknown ids white."""
    table = torch.ones(256, 3)
    table[:len(palette)] = torch.tensor(palette[:256], dtype=torch.float32) / 255
    return table[labels.cpu().clamp(0, 255)].permute(0, 3, 1, 2)


@torch.no_grad()
def save_samples(model, dataset, args, runtime, palette, path):
    """PNG grid of the first 6 images of `dataset`, one row per image: image | masked fuse map (visible label over
    the image, hidden patches dark) | completed label (prediction in hidden patches, given label elsewhere) | truth."""
    model.eval()
    pairs = [dataset[i] for i in range(min(6, len(dataset)))]
    images, labels = (torch.stack(t).to(runtime.device) for t in zip(*pairs))  # (B, 3, H, W), (B, H, W)
    path.parent.mkdir(exist_ok=True)
    generator = make_generator(args.seed, "eval-masks", "samples", device=images.device)
    _, ids_keep, hidden = draw_mask(labels, args.eval_masking, args, generator)
    with autocast(runtime):
        preds = model(images, labels, ids_keep).argmax(dim=1)  # (B, H, W)
    hidden = hidden[:, None].cpu()  # (B, 1, H, W)
    image = denormalize(images.float(), "imagenet").cpu()  # (B, 3, H, W) in [0, 1]
    truth = colorize(labels, palette)
    masked_fuse = torch.where(hidden, image * 0.25, 0.5 * image + 0.5 * truth)
    completed = torch.where(hidden, colorize(preds, palette), truth)
    rows = torch.cat([image, masked_fuse, completed, truth], dim=3)  # (B, 3, H, 4W)
    picture = (rows.permute(0, 2, 3, 1).reshape(-1, rows.shape[3], 3) * 255).round().byte().numpy()
    Image.fromarray(picture).save(path)


# --- phases: label degradation (Sec. IV-C) ---

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
    """Write <out>/<split>/images, masks (degraded, 255 = unknown), unknown (255 = hidden), truth, and
    <out>/degrade.json (Sec. IV-C). `--data folder --data-root <out>` reads the degraded masks directly."""
    check_writable(args.out)
    runtime = Runtime(torch.device("cpu"))
    options = {"image_size": args.img_size} if args.data == "shapes" else {}
    datasets = {}
    for split in args.split:  # every label is read and checked before anything is written
        datasets[split] = build_dataset(args.data, args.data_root, split, transform=keep_pixels,
                                        download=args.download, limit=args.limit, seed=args.seed, **options)
        check_labels(datasets[split][0], desc=f"checking {split} labels")
    out = Path(args.out)
    summary = {"data": args.data, "ratio": args.ratio, "patch_size": args.patch_size, "strategy": args.strategy,
               "seed": args.seed, "splits": {}}
    for split, (dataset, info) in datasets.items():
        folders = {name: out / split / name for name in ("images", "masks", "unknown", "truth")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        generator = make_generator(args.seed, "degrade", split)
        hidden_pixels = total_pixels = 0
        for index in progress(range(len(dataset)), runtime, f"degrading {split}"):
            image, label = dataset[index]  # uint8 (3, H, W), (H, W) class ids with 255 = void
            image, label = image.permute(1, 2, 0).numpy(), label.long()  # (H, W, 3), (H, W) int64
            degraded, hidden = degrade_label(label, args.ratio, args.patch_size, args.strategy, args.mix,
                                             args.background_class, generator)
            name = dataset.names[index].replace("/", "__")
            Image.fromarray(image).save(folders["images"] / f"{name}.png")
            save_label_png(folders["masks"] / f"{name}.png", degraded.numpy(), info.palette)
            save_label_png(folders["truth"] / f"{name}.png", label.numpy(), info.palette)
            Image.fromarray(hidden.numpy().astype(np.uint8) * 255).save(folders["unknown"] / f"{name}.png")
            hidden_pixels += int(hidden.sum())
            total_pixels += hidden.numel()
        summary["splits"][split] = {"images": len(dataset), "hidden_pixel_fraction": hidden_pixels / total_pixels}
        summary.update(num_classes=info.num_classes, class_names=list(info.class_names))
        say(runtime, f"degraded {len(dataset)} labels of {args.data}/{split}: {args.ratio:.0%} of the patches, "
                     f"{hidden_pixels / total_pixels:.1%} of the pixels -> {out / split}")
    write_json(out / "degrade.json", summary)
    return summary


# --- phases: completing a dataset (Sec. III-D, Fig. 4) ---

RATIO_WARNING = 0.15  # `complete` warns when the hidden share exceeds the checkpoint's ratio by more than this


def files_by_stem(folder):
    return {Path(p).stem: Path(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS}


def read_file(path, what, convert):
    """convert(PIL image) of one file; any failure -> one DatasetError naming the file."""
    try:
        with Image.open(path) as image:
            return convert(image)
    except Exception as error:
        raise DatasetError(f"cannot read {what} {path} ({type(error).__name__}: {error}); replace the file") from None


def load_completion_models(paths, device):
    """[(model, saved config, path)] sorted by mask ratio, and the dataset info; all must share the classes."""
    models, info = [], None
    for path in paths:
        state = load_checkpoint(path, SCRIPT)
        if info is not None and state["info"]["num_classes"] != info["num_classes"]:
            raise UsageError(f"--checkpoint {path} has {state['info']['num_classes']} classes but {paths[0]} has "
                             f"{info['num_classes']}; all --checkpoint files must be trained on the same classes")
        info = info or state["info"]
        model = build_model(state["config"], state["info"]["num_classes"])
        load_state(model, state["model"], path)
        models.append((model.to(device).eval(), state["config"], str(path)))
    return sorted(models, key=lambda m: m[1]["mask_ratio"]), info


def to_model_grid(labels, unknown, scale, patch_size):
    """labels (B, H, W) int (uint8 or int64), unknown (B, H, W) bool -> both at the model's grid (B, H_p, W_p),
    labels in their dtype, and the sizes (h, w), (H_p, W_p). CHOICE C12: resized by `scale` (aspect kept), padded
    to a multiple of P. Labels are resized with nearest, unknown pixels set to 255; a model pixel is unknown when any
    native pixel it covers is (area resize > 0), so every unknown pixel lands in a hidden patch. Padding is void."""
    H, W = labels.shape[1:]
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    padded = (math.ceil(size[0] / patch_size) * patch_size, math.ceil(size[1] / patch_size) * patch_size)
    pad = (0, padded[1] - size[1], 0, padded[0] - size[0])
    if size == (H, W):  # --scale 1: no resize
        small_unknown, small_labels = unknown, labels
    else:
        small_unknown = F.interpolate(unknown[:, None].float(), size=size, mode="area")[:, 0] > 0  # (B, h, w)
        small_labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].to(labels.dtype)
    small_labels = torch.where(small_unknown, IGNORE, small_labels)
    return F.pad(small_labels, pad, value=IGNORE), F.pad(small_unknown, pad, value=False), size, padded


def plan_hidden(labels, unknown, config, args):
    """How many patches to hide and the routing share of one image at a checkpoint's grid (Sec. III-D, Fig. 4).

    labels, unknown (1, H_p, W_p) at the model grid -> dict(num_hidden, share, patches, keys for rank_patches).
    """
    P, ratio = config["patch_size"], config["mask_ratio"]
    holds_unknown = pixel_fraction(unknown, P) > 0  # (1, L)
    background = patch_fractions(labels, P, config["background_class"])[1]  # (1, L)
    L = holds_unknown.shape[1]
    n_unknown = int(holds_unknown.sum())
    if args.missing == "background":  # Sec. III-D: the most-background patches next, up to the model's ratio
        n_background = int(((background > 0) & ~holds_unknown).sum())
        num_hidden = max(n_unknown, min(round(ratio * L), n_unknown + n_background))
    else:  # exactly the patches holding unknown pixels
        num_hidden = n_unknown
    if args.route == "background":
        share = float(((labels == config["background_class"]) | unknown).float().mean())
    else:
        share = n_unknown / L
    return dict(num_hidden=min(num_hidden, L - 1), share=share, patches=L, keys=[holds_unknown.float(), background])


def route(models, label, unknown, args, device, only=None):
    """Fig. 4: plan one image (label uint8 (H, W), unknown bool (H, W)) at every checkpoint's grid (or only at
    checkpoint `only`'s) and pick the checkpoint whose mask ratio is nearest the image's share; ties go to the
    larger ratio. The plan: plan_hidden's dict, checkpoint, shape, tiled (the scaled size exceeds --max-pixels:
    the image runs alone, in tiles, complete_tiled)."""
    plans = []
    for index in range(len(models)) if only is None else [only]:
        config = models[index][1]
        grid_labels, grid_unknown, size, _ = to_model_grid(torch.from_numpy(label)[None].to(device),
                                                           torch.from_numpy(unknown)[None].to(device), args.scale,
                                                           config["patch_size"])
        plans.append(dict(plan_hidden(grid_labels, grid_unknown, config, args), checkpoint=index, shape=label.shape,
                          tiled=0 < args.max_pixels < size[0] * size[1]))
    return min(plans, key=lambda p: (abs(models[p["checkpoint"]][1]["mask_ratio"] - p["share"]),
                                     -models[p["checkpoint"]][1]["mask_ratio"]))


def window_starts(length, window, patch_size):
    """CHOICE C16: offsets of windows of `window` pixels covering `length` (both multiples of P), stride half a
    window rounded down to a multiple of P, the last window flush with the end; one window when it fits."""
    if length <= window:
        return [0]
    stride = max(patch_size, window // 2 // patch_size * patch_size)
    return sorted(set(range(0, length - window, stride)) | {length - window})


def window_logits(model, config, images, labels, mask, runtime):
    """Sliding-window forward (CHOICE C16): probabilities averaged over the windows covering each pixel.

    images (B, 3, H_p, W_p) normalised, labels (B, H_p, W_p) int64, mask (B, L) bool on the global grid ->
    probabilities (B, K, H_p, W_p). Each window hides exactly the global hidden patches inside it; windows with the
    same visible count form one batch.
    """
    B, _, Hp, Wp = images.shape
    P = config["patch_size"]
    wh, ww = min(config["img_size"][0], Hp), min(config["img_size"][1], Wp)
    boxes = [(top, left) for top in window_starts(Hp, wh, P) for left in window_starts(Wp, ww, P)]
    grid_mask = mask.view(B, Hp // P, Wp // P)  # (B, gh, gw)
    window_images = torch.stack([images[:, :, t:t + wh, l:l + ww] for t, l in boxes], 1).flatten(0, 1)  # (B N, 3, h, w)
    window_labels = torch.stack([labels[:, t:t + wh, l:l + ww] for t, l in boxes], 1).flatten(0, 1)  # (B N, h, w)
    window_mask = torch.stack([grid_mask[:, t // P:(t + wh) // P, l // P:(l + ww) // P] for t, l in boxes],
                              1).flatten(0, 1).flatten(1)  # (B N, l)
    # a window whose patches are all hidden keeps its first patch visible: its labels there are unknown (255) or,
    # with --missing background, known background, so nothing beyond the given labels is revealed
    window_mask[window_mask.all(1), 0] = False
    probabilities = None
    visible = (~window_mask).sum(1)  # (B N,)
    for count in visible.unique().tolist():
        rows = (visible == count).nonzero()[:, 0]  # windows with `count` visible patches
        ids_keep = (~window_mask[rows]).nonzero()[:, 1].view(len(rows), count)  # (n, count), ascending
        with autocast(runtime):
            logits = model(window_images[rows], window_labels[rows], ids_keep).float()  # (n, K, h, w)
        if probabilities is None:
            probabilities = logits.new_zeros(len(boxes) * B, logits.shape[1], wh, ww)
        probabilities[rows] = logits.softmax(1)
    probabilities = probabilities.view(B, len(boxes), -1, wh, ww)
    total = images.new_zeros(B, probabilities.shape[2], Hp, Wp)
    count = images.new_zeros(1, 1, Hp, Wp)
    for n, (t, l) in enumerate(boxes):
        total[:, :, t:t + wh, l:l + ww] += probabilities[:, n]
        count[:, :, t:t + wh, l:l + ww] += 1
    return total / count  # (B, K, H_p, W_p)


@torch.no_grad()
def complete_batch(model, config, images, labels, unknown, keys, num_hidden, args, runtime, generator):
    """Fill one batch of same-size images with one checkpoint (Sec. III-D).

    images uint8 (B, H, W, 3), labels uint8 (B, H, W) (255 = unknown/void), unknown bool (B, H, W), keys: the
    rank_patches keys (B, L) at the model grid -> prediction uint8 (B, H, W), hidden pixels bool (B, H, W).
    """
    B, H, W = labels.shape
    P = config["patch_size"]
    model_labels, _, size, padded = to_model_grid(labels.long(), unknown, args.scale, P)  # (B, H_p, W_p)
    mask, ids_keep = hide_first(rank_patches(keys, generator), num_hidden)  # unknown patches first, then background
    mean, std = (torch.tensor(v, device=images.device).view(1, 3, 1, 1) for v in NORMALIZATION["imagenet"])
    small = images.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W)
    if size != (H, W):
        small = F.interpolate(small, size=size, mode="bilinear", antialias=True)
    small = F.pad((small - mean) / std, (0, padded[1] - size[1], 0, padded[0] - size[0]))  # (B, 3, H_p, W_p)
    if args.windows:
        logits = window_logits(model, config, small, model_labels, mask, runtime)[:, :, :size[0], :size[1]]
    else:
        with autocast(runtime):
            logits = model(small, model_labels, ids_keep)[:, :, :size[0], :size[1]].float()  # (B, K, h, w)
    hidden = pixel_mask(mask, P, (padded[0] // P, padded[1] // P))[:, None, :size[0], :size[1]].float()
    if size != (H, W):
        logits = F.interpolate(logits, size=(H, W), mode="bilinear")  # (B, K, H, W)
        hidden = F.interpolate(hidden, size=(H, W), mode="nearest")
    return logits.argmax(dim=1).to(torch.uint8), hidden[:, 0].bool()


@torch.no_grad()
def complete_tiled(model, config, image, label, unknown, args, runtime, generator):
    """An image over --max-pixels (CHOICE C17): complete_batch on tiles of at most --max-pixels model pixels, cut
    on the patch grid (at --scale 1 exactly `degrade`'s grid), each planned on its own; memory stays bounded.

    image uint8 (1, H, W, 3), label uint8 (1, H, W), unknown bool (1, H, W) -> prediction uint8 (1, H, W) (the
    label where nothing was hidden), hidden bool (1, H, W), the number of tiles run.
    """
    P = config["patch_size"]
    side = max(P, math.isqrt(args.max_pixels) // P * P)  # tile side at the model grid
    tile = max(1, round(side / args.scale))  # ... and at the native size
    prediction, hidden, count = label.clone(), torch.zeros_like(unknown), 0
    for top in range(0, label.shape[1], tile):
        for left in range(0, label.shape[2], tile):
            part = (slice(None), slice(top, top + tile), slice(left, left + tile))
            plan = plan_hidden(*to_model_grid(label[part], unknown[part], args.scale, P)[:2], config, args)
            if plan["num_hidden"] > 0:
                prediction[part], hidden[part] = complete_batch(model, config, image[part], label[part], unknown[part],
                                                                plan["keys"], plan["num_hidden"], args, runtime,
                                                                generator)
                count += 1
    return prediction, hidden, count


def completion_inputs(args, num_classes):
    """The input files by name (every label must have its image, --unknown mask and --truth label) and
    read_pair(stem) -> label uint8 (H, W), unknown bool (H, W), each checked against its image's size."""
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

    def read_pair(stem):  # labels are read as training reads them (common.read_label; --void-id -> 255)
        size = read_file(images[stem], "image", lambda image: image.size[::-1])  # (H, W) from the header alone
        label = read_label(labels[stem], num_classes, args.void_id).astype(np.uint8)
        unknown = (read_file(unknowns[stem], "unknown mask", lambda image: np.array(image.convert("L")) > 0)
                   if args.unknown else label == IGNORE)  # --unknown masks: any single-channel image, non-zero
        for array, path in ((label, labels[stem]), (unknown, unknowns.get(stem))):
            if array.shape != size:
                raise DatasetError(f"{path} is {array.shape[1]}x{array.shape[0]} but image {images[stem]} is "
                                   f"{size[1]}x{size[0]}; labels and masks must have their image's size")
        return label, unknown

    return images, labels, truths, read_pair


def completion_batches(models, plans, images, read, fill, args, runtime, generator):
    """Fill every planned image; yields (stems, checkpoint index, labels uint8 (B, H, W), unknown bool (B, H, W),
    prediction uint8 (B, H, W), hidden bool (B, H, W), tiles) per batch. read(stem) -> label, unknown. Images of
    one size, checkpoint and hidden count form a batch; an image over --max-pixels runs alone, in tiles.
    fill: model (the checkpoints) or nearest (nearest_known_fill, no model)."""
    device = runtime.device
    groups = {}
    for stem, plan in plans.items():
        key = (plan["shape"], plan["checkpoint"], plan["num_hidden"], stem if plan["tiled"] else "")
        groups.setdefault(key, []).append(stem)
    for (_, index, num_hidden, _), stems in groups.items():
        model, config, _ = models[index]
        for start in range(0, len(stems), args.batch_size):
            batch = stems[start:start + args.batch_size]
            label_t, unknown_t = (torch.from_numpy(np.stack(arrays)).to(device)  # (B, H, W) uint8, bool
                                  for arrays in zip(*[read(stem) for stem in batch]))
            tiles = 0
            if fill == "nearest":
                prediction, hidden = nearest_known_fill(label_t, ~unknown_t), unknown_t
            else:
                image_t = torch.from_numpy(np.stack([load_rgb(images[s]) for s in batch])).to(device)  # (B, H, W, 3)
                if plans[batch[0]]["tiled"]:
                    prediction, hidden, tiles = complete_tiled(model, config, image_t, label_t, unknown_t, args,
                                                               runtime, generator)
                else:
                    keys = [torch.cat([plans[s]["keys"][k] for s in batch]) for k in range(2)]  # (B, L) each
                    prediction, hidden = complete_batch(model, config, image_t, label_t, unknown_t, keys, num_hidden,
                                                        args, runtime, generator)
            yield batch, index, label_t, unknown_t, prediction, hidden, tiles


def say_done(done, total, what, detail):
    """One plain line per image when stdout is not a terminal (a log file, a scheduler); tqdm's bar otherwise."""
    if not sys.stdout.isatty():
        print(f"{what} {done}/{total}: {detail}", flush=True)


# --- phases: the self-check of `complete` (not in the paper, CHOICE C17) ---

def check_pixels(label, unknown, config, args, stem):
    """The known pixels the self-check hides: the pixels of ceil(--check-share x the patches, at the
    checkpoint's grid, that hold a labelled pixel and no unknown one), drawn with a generator keyed by (seed, name).
    label uint8 (H, W), unknown bool (H, W) numpy -> (H, W) bool numpy."""
    H, W = label.shape
    P = config["patch_size"]
    label_t, unknown_t = torch.from_numpy(label)[None], torch.from_numpy(unknown)[None]
    grid_labels, grid_unknown, size, padded = to_model_grid(label_t, unknown_t, args.scale, P)  # (1, H_p, W_p)
    candidates = (pixel_fraction(grid_labels != IGNORE, P) > 0) & (pixel_fraction(grid_unknown, P) == 0)  # (1, L)
    ranked = rank_patches([candidates.float()], make_generator(args.seed, "self-check", stem))
    chosen, _ = hide_first(ranked, math.ceil(args.check_share * int(candidates.sum())))  # (1, L)
    pixels = pixel_mask(chosen, P, (padded[0] // P, padded[1] // P))[:, :size[0], :size[1]]  # (1, h, w)
    if size != (H, W):
        pixels = F.interpolate(pixels[:, None].float(), size=(H, W), mode="nearest")[:, 0] > 0  # (1, H, W)
    return (pixels & ~unknown_t & (label_t != IGNORE))[0].numpy()


def score_rows(matrix, prediction, truth, region=None, rows=256):
    """matrix.update on (B, H, W) tensors `rows` rows at a time: a few copies of a band, not of a huge image."""
    for top in range(0, truth.shape[1], rows):
        band = slice(top, top + rows)
        matrix.update(prediction[:, band], truth[:, band], None if region is None else region[:, band])
    return matrix


def bootstrap_miou(counts, seed, draws=1000):
    """counts (N images, F fills, 3, K): true positives, false positives, false negatives -> per fill the mIoU
    (classes with a non-empty union) and its 95 % interval over `draws` resamples of the images, and the same for
    fill 0 minus fill 1."""
    N = counts.shape[0]
    picks = torch.randint(0, N, (draws, N), generator=make_generator(seed, "bootstrap"))
    ones = torch.ones(draws, N, dtype=torch.float64)
    weights = torch.zeros(draws, N, dtype=torch.float64).scatter_add_(1, picks, ones)  # (draws, N) times drawn
    totals = torch.cat([counts.sum(0, keepdim=True).double(), (weights @ counts.flatten(1).double()).view(
        draws, *counts.shape[1:])])  # (1 + draws, F, 3, K): the point estimate, then the resamples
    union = totals.sum(2)  # tp + fp + fn
    iou = torch.where(union > 0, totals[:, :, 0] / union.clamp(min=1), float("nan"))  # (1 + draws, F, K)
    miou = iou.nanmean(2)  # (1 + draws, F)
    interval = lambda values: [float(values[1:].nanquantile(0.025)), float(values[1:].nanquantile(0.975))]
    result = [{"pa_miou": float(miou[0, f]), "interval": interval(miou[:, f])} for f in range(counts.shape[1])]
    difference = miou[:, 0] - miou[:, 1]
    return result, {"difference": float(difference[0]), "interval": interval(difference)}


def self_check(models, plans, images, read_pair, num_classes, args, runtime):
    """`complete --self-check` (CHOICE C17): hide check_pixels of every image on top of its unknown pixels, fill
    them with the checkpoints (each image's own, as routed) and with the nearest known pixel, and score both on the
    hidden known labels: PA-mIoU with 95 % bootstrap intervals over images. The winner is `model` only when its
    PA-mIoU is higher. Nothing is written."""
    device, checked, check_plans = runtime.device, {}, {}
    for stem in progress(sorted(plans), runtime, "self-check: planning"):
        label, unknown = read_pair(stem)
        index = plans[stem]["checkpoint"]
        checked[stem] = check_pixels(label, unknown, models[index][1], args, stem)
        check_plans[stem] = route(models, label, unknown | checked[stem], args, device, only=index)

    def read(stem):  # the given label, with the checked pixels unknown too
        label, unknown = read_pair(stem)
        return label, unknown | checked[stem]

    counts = {stem: [] for stem in checked}
    generator = make_generator(args.seed, "self-check", "ties", device=device)
    for fill in ("model", "nearest"):
        done = 0
        for batch, _, label_t, _, prediction, _, _ in completion_batches(models, check_plans, images, read, fill, args,
                                                                      runtime, generator):
            for i, stem in enumerate(batch):  # label_t holds the given labels: the truth of the checked pixels
                region = torch.from_numpy(checked[stem]).to(device)[None]  # (1, H, W)
                matrix = score_rows(ConfusionMatrix(num_classes, device=device), prediction[i, None], label_t[i, None],
                                    region).matrix.cpu()  # (K, K)
                tp = matrix.diag()
                counts[stem].append(torch.stack([tp, matrix.sum(0) - tp, matrix.sum(1) - tp]))  # (3, K)
                done += 1
                say_done(done, len(checked), f"self-check ({fill} fill)", stem)
    stacked = torch.stack([torch.stack(counts[stem]) for stem in sorted(counts)])  # (N, 2, 3, K)
    (model, nearest), difference = bootstrap_miou(stacked, args.seed)
    pixels = int(sum(hide.sum() for hide in checked.values()))
    winner = "model" if model["pa_miou"] > nearest["pa_miou"] else "nearest"  # NaN (no checked pixel): nearest
    return {"share": args.check_share, "images": len(checked), "checked_pixels": pixels,
            "model_pa_miou": model["pa_miou"], "model_interval": model["interval"],
            "nearest_pa_miou": nearest["pa_miou"], "nearest_interval": nearest["interval"],
            "model_minus_nearest": difference["difference"], "difference_interval": difference["interval"],
            "winner": winner}


def completion_summary(args, rows, models, scores, without_label):
    """report.csv (one row per image) and the summary dict of a `complete` run (with --truth: its scores)."""
    with open(Path(args.out) / "report.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"images": len(rows), "missing": args.missing, "scale": args.scale, "windows": args.windows,
               **{key: sum(r[key] for r in rows) for key in ("unknown_pixels", "written_pixels", "changed_pixels")},
               "hidden_share": sum(r["hidden_share"] for r in rows) / len(rows),
               "images_without_label": len(without_label), "max_pixels": args.max_pixels,
               "tiled_images": sum(r["tiles"] > 0 for r in rows),
               "checkpoints": {path: sum(r["checkpoint"] == path for r in rows) for _, _, path in models}}
    for _, config, path in models:
        over = [r for r in rows if r["checkpoint"] == path and r["hidden_share"] > config["mask_ratio"] + RATIO_WARNING]
        if over:
            print(f"warning: {len(over)} images routed to {path} hid {max(r['hidden_share'] for r in over):.0%} of "
                  f"their patches, far above the ratio {config['mask_ratio']} it was trained at; train a checkpoint "
                  f"at a higher --mask-ratio for them", file=sys.stderr)
    if args.truth:  # pa_: over the unknown pixels; miou, pixel_acc: the completed label over all pixels
        result = {name: matrix.compute() for name, matrix in scores.items()}
        for name, prefix in (("model", "pa_"), ("completed", ""), ("nearest", "nearest_pa_"),
                             ("frequent", "frequent_pa_")):
            summary.update({prefix + "miou": result[name]["miou"], prefix + "pixel_acc": result[name]["pixel_acc"]})
        summary["pa_per_class_iou"] = result["model"]["per_class_iou"]
    return summary


def complete(args):
    """`lmae.py complete`: write completed palette PNGs, report.csv and summary.json to --out (Sec. III-D)."""
    check_writable(args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible; pass --device cpu or auto")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    args.amp = device.type == "cuda" if args.amp is None else args.amp
    if args.amp and device.type == "cpu" and not cpu_supports_bf16():
        raise UsageError("--amp: this CPU has no bf16 support (AVX512-BF16 or AMX); pass --no-amp")
    runtime = Runtime(device, amp=bool(args.amp))
    models, info = load_completion_models(args.checkpoint, device)
    K = info["num_classes"]
    images, labels, truths, read_pair = completion_inputs(args, K)
    without_label = sorted(set(images) - set(labels))
    # plan: every label is read and checked, routed to a checkpoint, and given its hidden count (nothing written)
    plans = {stem: route(models, *read_pair(stem), args, device) for stem in progress(sorted(labels), runtime,
                                                                                       "planning")}
    check = self_check(models, plans, images, read_pair, K, args, runtime) if args.self_check else None
    fill = check["winner"] if args.fill == "auto" else args.fill
    if check:
        print(f"self-check on {check['checked_pixels']} known pixels ({args.check_share:.0%} of the known patches) of "
              f"{check['images']} images: model PA-mIoU {check['model_pa_miou']:.4f} "
              f"[{check['model_interval'][0]:.4f}, {check['model_interval'][1]:.4f}], nearest fill "
              f"{check['nearest_pa_miou']:.4f} [{check['nearest_interval'][0]:.4f}, "
              f"{check['nearest_interval'][1]:.4f}] (95 % bootstrap over images) -> fill={fill}", flush=True)
    out = Path(args.out)
    created = [folder for folder in (out, *out.parents) if not folder.exists()]
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        rows, scores = write_completion(models, plans, images, truths, read_pair, fill, info, args, runtime, written)
        summary = completion_summary(args, rows, models, scores, without_label)
    except BaseException:  # a failure or Ctrl-C leaves no half-filled --out behind (nothing the user had is touched)
        for path in written:
            path.unlink(missing_ok=True)
        for folder in created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    summary.update(fill=fill, fill_choice=args.fill, **({"self_check": check} if check else {}))
    write_json(out / "summary.json", summary)
    if without_label:
        print(f"note: {len(without_label)} images in --images have no label and were skipped "
              f"(first: {images[without_label[0]].name})")
    print("completed " + " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in summary.items() if not isinstance(v, (list, dict))) + f" out={out}")
    return summary


def write_completion(models, plans, images, truths, read_pair, fill, info, args, runtime, written):
    """The writing pass of `complete`: one palette PNG per label (paths appended to `written`); with --truth the
    scores of this fill, the nearest fill and the most-frequent fill. -> report rows, {name: ConfusionMatrix}."""
    out, device, K = Path(args.out), runtime.device, info["num_classes"]
    scores = {name: ConfusionMatrix(K, device=device) for name in ("model", "completed", "nearest", "frequent")}
    generator = torch.Generator(device=device).manual_seed(args.seed)
    rows, started = [], time.time()
    bar = progress(total=len(plans), iterable=None, runtime=runtime, desc="completing")
    for batch, index, label_t, unknown_t, prediction, hidden, tiles in completion_batches(
            models, plans, images, read_pair, fill, args, runtime, generator):
        _, config, path = models[index]
        writable = unknown_t.clone()
        if args.missing == "background" and fill == "model":  # Sec. III-D: background of hidden patches may be missing
            writable |= hidden & (label_t == config["background_class"])
        completed = torch.where(writable, prediction, label_t)  # known pixels are copied, never predicted
        if args.truth:
            truth_t = torch.from_numpy(np.stack([read_label(truths[s], K, args.void_id).astype(np.uint8)
                                                 for s in batch]))
            if truth_t.shape != label_t.shape:
                raise DatasetError(f"--truth {args.truth}: a truth label's size differs from its label in "
                                   f"{', '.join(batch)}; sizes must match")
            truth_t = truth_t.to(device)
            known = ~unknown_t & (label_t != IGNORE)
            nearest = prediction if fill == "nearest" else nearest_known_fill(label_t, known)
            frequent = most_frequent_known_class(label_t, known, K)[:, None, None].expand_as(label_t)
            score_rows(scores["model"], completed, truth_t, unknown_t)
            score_rows(scores["completed"], completed, truth_t)
            score_rows(scores["nearest"], nearest, truth_t, unknown_t)
            score_rows(scores["frequent"], frequent, truth_t, unknown_t)
        for i, stem in enumerate(batch):
            written.append(out / f"{stem}.png")
            save_label_png(written[-1], completed[i].cpu().numpy(), info["palette"])
            plan = plans[stem]
            row = {"name": stem, "checkpoint": path, "mask_ratio": config["mask_ratio"], "scale": args.scale,
                   "fill": fill, "tiles": tiles, "share": round(plan["share"], 4), "patches": plan["patches"],
                   "hidden_patches": plan["num_hidden"], "hidden_share": round(plan["num_hidden"] / plan["patches"], 4),
                   "unknown_pixels": int(unknown_t[i].sum()), "written_pixels": int(writable[i].sum()),
                   "changed_pixels": int((completed[i] != label_t[i]).sum()), "pixels": label_t[i].numel()}
            if args.truth:  # sync points: per-image accuracies of the completion and the nearest fill
                scored = unknown_t[i] & (truth_t[i] != IGNORE)
                count = max(int(scored.sum()), 1)
                row["filled_accuracy"] = round(int((completed[i] == truth_t[i])[scored].sum()) / count, 6)
                row["nearest_accuracy"] = round(int((nearest[i] == truth_t[i])[scored].sum()) / count, 6)
            rows.append(row)
            say_done(len(rows), len(plans), "complete", f"{stem} {label_t.shape[2]}x{label_t.shape[1]} fill={fill} "
                                                        f"tiles={tiles} {time.time() - started:.1f} s")
        bar.update(len(batch))
    bar.close()
    return sorted(rows, key=lambda r: r["name"]), scores


# --- phases: training (Sec. IV-A) ---

def config_of(args):
    """args as a JSON-able dict (what checkpoints and config.json hold; complete rebuilds the model from it)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}


def arch_of(config):
    """The preset name of a config; checkpoints written before --preset was renamed --arch carry `preset`."""
    return config["arch"] if "arch" in config else config["preset"]


def build_model(config, num_classes):
    """The network of a config dict or Namespace (arch, patch_size, fuse, ips, pos_embed, drop_path, class
    weighting, head): the paper's LMAE, wrapped in LMAEWithConvHead with --head conv."""
    config = config if isinstance(config, dict) else vars(config)
    weighting = ClassWeighting(config["class_weighting"] == "paper" and not config["freeze_weights"],
                               config["beta_init"], config["gamma_init"])
    model = LMAE(num_classes, config["patch_size"], **PRESETS[arch_of(config)], fuse=config["fuse"],
                 ips=config["ips"], pos_embed=config["pos_embed"], drop_path=config["drop_path"],
                 class_weighting=weighting)
    if config.get("head", "linear") == "conv":
        return LMAEWithConvHead(model, config.get("head_width", 32), config.get("nearest_prior", False))
    return model


def architecture(config, num_classes):
    """The architecture string checkpoints carry: what must match to load the weights."""
    config = config if isinstance(config, dict) else vars(config)
    head = config["head"] + (f"{config['head_width']}" if config["head"] == "conv" else "")
    return (f"lmae-{arch_of(config)}-p{config['patch_size']}-{config['fuse']}-{'ips' if config['ips'] else 'token'}"
            f"-pos{config['pos_embed']}-{head}{'-nearest' if config['nearest_prior'] else ''}-k{num_classes}")


def build_splits(args, splits):
    """{split: dataset} for the named splits ("train" with the training transform, the others resized to
    --eval-size; CHOICE C10, C11) and the dataset info. Every label of every split is checked first."""
    shapes = args.data == "shapes"
    crop_only = args.crop is not None and tuple(args.crop) == tuple(args.img_size)  # Cityscapes: crop 448, no resize
    options = dict(root=args.data_root, download=args.download, limit=args.limit, seed=args.split_seed,
                   **({"void_id": args.void_id} if args.void_id is not None else {}))
    if args.data == "folder" and args.num_classes is not None:
        options["num_classes"] = args.num_classes
    datasets, info = {}, None
    for role, (split, part) in plan_splits(splits).items():
        train = role == "train"
        transform = joint_transform(size=None if shapes or (train and crop_only) else
                                    (args.img_size if train else args.eval_size), crop=args.crop if train else None)
        size = {"image_size": args.img_size if train else args.eval_size} if shapes else {}
        datasets[role], split_info = build_dataset(args.data, split=split, transform=transform, part=part, **options,
                                                   **size)
        if info is not None and split_info.num_classes != info.num_classes:
            raise DatasetError(f"{args.data}: split {split} has {split_info.num_classes} classes but another split "
                               f"has {info.num_classes}; pass --num-classes")
        info = split_info
        check_labels(datasets[role], desc=f"checking {split} labels")
    if not 0 <= args.background_class < info.num_classes:
        raise UsageError(f"--background-class {args.background_class} is not a class of {args.data} "
                         f"(0..{info.num_classes - 1})")
    return datasets, info


def train(args, runtime, resume_path):
    """Training (Sec. IV-A), then the test split scored with best.pt; or, with --eval-only, only that score."""
    device, out = runtime.device, Path(args.out)
    splits = {"test": args.test_split} if args.eval_only else {"train": args.train_split, "val": args.val_split,
                                                                "test": args.test_split}
    path = (Path(args.checkpoint) if args.checkpoint else out / "best.pt") if args.eval_only else resume_path
    if path is not None and path.is_file():  # the checkpoint's network and K, unless the command line gives them
        saved = load_checkpoint(path, SCRIPT)
        for key in ("arch", "patch_size", "fuse", "ips", "pos_embed", "head", "head_width", "nearest_prior"):
            if key not in getattr(args, "given", ()) and (key in saved["config"] or key == "arch"):
                setattr(args, key, arch_of(saved["config"]) if key == "arch" else saved["config"][key])
        if args.data == "folder" and args.num_classes is None:
            args.num_classes = saved["info"]["num_classes"]
    datasets, info = build_splits(args, splits)
    K = info.num_classes
    eval_batch = max(1, args.batch_size * args.img_size[0] * args.img_size[1]
                     // (args.eval_size[0] * args.eval_size[1]))  # about the same pixels per batch as training
    loaders = {role: make_loader(dataset, args.batch_size if role == "train" else eval_batch, args, runtime,
                                 train=role == "train") for role, dataset in datasets.items()}
    seed_everything(args.seed)  # identical initial weights on every rank
    model = build_model(args, K).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    arch = architecture(args, K)

    if args.eval_only:
        load_state(model, load_checkpoint(path, SCRIPT, arch)["model"], path)
        metrics = evaluate(model, loaders["test"], args, runtime, K)
        results = {"checkpoint": str(path), "test_split": args.test_split, "test": metrics}
        if runtime.main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(out / "eval_test.json", results)
        say(runtime, f"eval checkpoint={path} split={args.test_split} pa_miou={metrics['pa_miou']:.4f} "
                     f"nearest_pa_miou={metrics['nearest_pa_miou']:.4f}")
        return results

    weighting = list(model.class_weighting.parameters())
    others = [p for p in model.parameters() if all(p is not w for w in weighting)]
    optimizer = torch.optim.Adam([{"params": others}, {"params": weighting, "weight_decay": 0.0}],  # C7
                                 lr=args.lr, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(  # Sec. IV-A
        optimizer, mode="min", patience=args.plateau_patience, threshold=args.plateau_threshold,
        factor=args.plateau_factor)
    start_epoch, best, state = 1, None, None
    if resume_path is not None:
        state = load_checkpoint(resume_path, SCRIPT, arch, flag="--resume")
        load_state(model, state["model"], resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = state["epoch"] + 1, state["best"]
    config = {**config_of(args), "num_classes": K, "class_names": list(info.class_names), "architecture": arch,
              "world_size": runtime.world_size, "parameters": sum(p.numel() for p in model.parameters()),
              **{f"{role}_images": len(dataset) for role, dataset in datasets.items()}}
    out = create_run_dir(args, SCRIPT, config, runtime)
    log = MetricsLog(out, runtime, resume_state=state)
    net, model = model, distribute(model, runtime)
    step = torch.compile(train_step) if args.compile else train_step  # one compiled graph per step
    guard = FiniteGuard()
    info_state = {"num_classes": K, "class_names": list(info.class_names), "palette": [list(c) for c in info.palette]}
    for epoch in range(start_epoch, args.epochs + 1):
        loaders["train"].sampler.set_epoch("train", epoch)
        started = time.time()
        train_loss = train_one_epoch(model, optimizer, loaders["train"], step, args, runtime, guard, epoch)
        guard.check("train", epoch)  # before anything is evaluated or saved
        validated = epoch % args.eval_every == 0 or epoch == args.epochs
        metrics = evaluate(net, loaders["val"], args, runtime, K) if validated else {}
        scheduler.step(train_loss)  # "threshold of loss dropping" (CHOICE C9)
        improved = validated and (best is None or metrics["pa_miou"] > best)
        best = metrics["pa_miou"] if improved else best
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "train_loss": train_loss,
                  **{("val_loss" if k == "loss" else k): v for k, v in metrics.items() if not isinstance(v, list)},
                  "beta": math.exp(net.class_weighting.log_beta.item()), "gamma": net.class_weighting.gamma.item(),
                  "time": time.time() - started}  # sync point
        log.write(record)  # before the checkpoint: a kill between the two loses nothing (the count drops it)
        if runtime.main:
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "best": best, "config": config_of(args),
                     "info": info_state}
            save_checkpoint(out / "last.pt", state, SCRIPT, arch, log)
            if improved:
                link_checkpoint(out / "last.pt", out / "best.pt")
                save_samples(net, datasets["val"], args, runtime, info.palette,
                             out / "samples" / f"epoch_{epoch:03d}.png")
        barrier()

    best_state = load_checkpoint(out / "best.pt", SCRIPT, arch)
    load_state(net, best_state["model"], out / "best.pt")
    test = evaluate(net, loaders["test"], args, runtime, K)
    results = {"test": test, "test_split": args.test_split, "best_epoch": best_state["epoch"],
               "best_val_pa_miou": best_state["best"], "epochs": args.epochs}
    if runtime.main:
        write_json(out / "results.json", results)
    say(runtime, f"done best_epoch={best_state['epoch']} test_pa_miou={test['pa_miou']:.4f} "
                 f"test_nearest_pa_miou={test['nearest_pa_miou']:.4f} out={out}")
    return results


# --- command line ---

LABELLED_SETS = [n for n in DATASET_NAMES if n not in ("cifar10", "catsdogs")]  # the image-only sets have no labels
MASKINGS = STRATEGIES + ("mixed",)
FRACTION = "between 0 and 1 (exclusive)"
# Recipes (--recipe): paper = the paper's model and masks; fill = ours, not in the paper (CHOICE C19): the conv head
# with the nearest-known-pixel prior (C15), random masks (what `degrade` draws), boundary-weighted loss (C18).
RECIPES = {
    "paper": dict(head="linear", head_width=32, nearest_prior=False, masking="mixed", boundary_weight=1.0),
    "fill": dict(head="conv", head_width=16, nearest_prior=True, masking="random", boundary_weight=5.0),
}
# Data-dependent defaults, resolved in get_args (Sec. IV-A for voc and cityscapes; CHOICE C11, C14 otherwise).
DATA_DEFAULTS = {
    "shapes": dict(img_size=(64, 64), crop=None, eval_size=None, patch_size=8, arch="tiny", epochs=30,
                   batch_size=16, lr=1e-3, drop_path=0.0, recipe="fill", eval_every=5),
    "voc": dict(img_size=(224, 224), crop=(448, 448), eval_size=(224, 224), patch_size=16, arch=PAPER_PRESET,
                epochs=400, batch_size=24, lr=1e-4, drop_path=0.1, recipe="paper", eval_every=1),
    "cityscapes": dict(img_size=(448, 448), crop=(448, 448), eval_size=(1024, 2048), patch_size=16,
                       arch=PAPER_PRESET, epochs=400, batch_size=48, lr=1e-4, drop_path=0.1, recipe="paper",
                       eval_every=1),
    # sets the paper did not use: sized for 2 CPU cores (CHOICE C19): CamVid's 367 train frames in about 45 min
    "camvid": dict(img_size=(224, 224), crop=(224, 224), eval_size=(352, 480), patch_size=16, arch="tiny",
                   epochs=30, batch_size=8, lr=1e-3, drop_path=0.0, recipe="fill", eval_every=5),
    "other": dict(img_size=(224, 224), crop=None, eval_size=None, patch_size=16, arch="tiny",
                  epochs=30, batch_size=8, lr=1e-3, drop_path=0.0, recipe="fill", eval_every=5),
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


def add_dataset_arguments(add):  # training and `degrade`
    add("--data", default="shapes", choices=LABELLED_SETS,
        help="dataset (common.py readers; needs labels, 255 = unknown/void). Default: shapes, the synthetic set; "
             "folder reads <root>/{train,val,test}/{images,masks} (what degrade writes)")
    add("--data-root", default=None, help="dataset root in its original layout (default ./data/<name>)")
    add("--download", action="store_true", help="let torchvision download the set where it can")


def check_ranges(parser, args, checks):
    """parser.error for the first (dest, valid, what) that is not valid: `--flag must be what, got value`."""
    for name, valid, what in checks:
        if not valid:
            parser.error(f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}")


def get_args(argv=None):
    """The whole CLI. The first word picks the job: `complete`, `degrade`, or none (training)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "complete":
        return get_complete_args(argv[1:])
    if argv and argv[0] == "degrade":
        return get_degrade_args(argv[1:])

    parser = ArgumentParser(description="L-MAE label completion: train (this command), or `lmae.py complete ...` / "
                                        "`lmae.py degrade ...` (see `lmae.py complete -h`, `lmae.py degrade -h`)")
    add = parser.add_argument_group("data").add_argument
    add_dataset_arguments(add)
    add("--num-classes", type=int, default=None, help="--data folder only: the number of classes K (default: largest "
        "id in the masks + 1; give it for partial labels, whose masks may miss a class)")
    add("--train-split", default="train", help="split that trains (SPLIT:F = a seeded fraction F of SPLIT, "
        "--split-seed; the roles naming SPLIT plainly get the rest), e.g. the split degrade wrote")
    add("--val-split", default="val", help="split that picks best.pt (default val; or SPLIT:F; `train` validates on "
        "the training labels with fresh masks, for a set that only has partial labels)")
    add("--test-split", default="test", help="split scored at the end and by --eval-only (default test; or SPLIT:F)")
    add("--split-seed", type=int, default=0, help="seed of the readers' seeded splits and of SPLIT:F, apart from "
        "--seed so that every run seed meets the same test images")
    add("--void-id", type=int, default=None, help="class-id labels: this id marks unlabelled pixels and becomes 255 "
        "(ignore); CamVid's 11 is known without it")
    add("--img-size", type=parse_size, default=None, help="training input H or HxW, a multiple of --patch-size; "
        "paper: VOC 224 (crop 448 resized), Cityscapes 448 (crop). Default: those; other sets 224; shapes 64")
    add("--crop", type=parse_size, default=None, help="random crop taken before the resize to --img-size (equal to "
        "--img-size: crop only); paper: 448 (VOC, Cityscapes). Default: 448 there, 224 for camvid, none elsewhere")
    add("--eval-size", type=parse_size, default=None, help="validation images are resized to this (CHOICE C10). "
        "Default: VOC 224, Cityscapes 1024x2048, CamVid 352x480, otherwise --img-size")
    add("--background-class", type=int, default=0, help="class id the mask strategies treat as background (CHOICE C4)")

    add = parser.add_argument_group("model").add_argument
    add("--arch", default=None, choices=tuple(PRESETS), help=f"network EB/DB/ED/DD from Table IV (paper's choice "
        f"{PAPER_PRESET}, the voc and cityscapes default) or small/tiny (tiny: the default elsewhere, C14, C19)")
    add("--patch-size", type=int, help="patch side P in pixels; Table IV's counts fix P=16 (default; shapes 8)")
    add("--fuse", default="layer", choices=FUSES, help="Stack Fuse variant, Table III: layer = one-hot layers + RGB "
        "(the paper's, default), direct = label as a 4th channel, insert = label copied after each RGB channel")
    add("--pos-embed", default="2d", choices=("2d", "1d"),
        help="fixed sin-cos positions: 2d (MAE, default) or 1d (the paper's Eqs. 2-3), CHOICE C2")
    add("--ips", action=argparse.BooleanOptionalAction, default=True,
        help="Image Patch Supplement (Sec. III-C, default on); --no-ips uses MAE's learned mask token (Fig. 6)")
    add("--drop-path", type=float, help="top stochastic-depth rate (CHOICE C6; default 0.1 voc, cityscapes, else 0)")
    add("--recipe", default=None, choices=tuple(RECIPES), help="defaults of --head, --head-width, --nearest-prior, "
        "--masking, --boundary-weight. paper: the paper's (linear head, mixed 1:2:2 masks, plain loss); fill: ours, "
        "not in the paper (conv head width 16 + nearest prior, random masks, boundary weight 5; CHOICE C19). "
        "Default: paper for voc and cityscapes, fill otherwise")
    add("--head", choices=HEADS, help="linear (the paper's per-token map) or conv (CHOICE C15); default --recipe's")
    add("--head-width", type=int, help="channels of --head conv (default: --recipe's)")
    add("--nearest-prior", action=argparse.BooleanOptionalAction,
        help="--head conv also sees the nearest-known-pixel fill (CHOICE C15). Default: --recipe's")

    add = parser.add_argument_group("masking").add_argument
    add("--mask-ratio", type=float, default=0.5,
        help="fraction of patches hidden (paper: 0.5 and 0.6 in Table I, 0.5-0.8 in Table II/Fig. 6)")
    add("--masking", choices=MASKINGS, help="Sec. III-B; mixed: drawn per sample (the paper's). Default: --recipe's")
    add("--mix", type=parse_mix, default=(1.0, 2.0, 2.0),
        help="weights random:label-first:background-first of --masking mixed (paper: 1:2:2, the default)")
    add("--eval-masking", default="random", choices=MASKINGS, help="strategy of the validation masks (CHOICE C10)")
    add("--unknown-first", action=argparse.BooleanOptionalAction, default=False, help="hide the patches with the "
        "most unknown (255) pixels first, as complete does (CHOICE C3; for partial labels; default off)")

    add = parser.add_argument_group("loss (Eqs. 10-12)").add_argument
    add("--class-weighting", default="none", choices=("paper", "none"), help="paper: Eq. (10) weights from class "
        "proportions with learnable beta, gamma; none: w_i = 1, plain CE (default; see the README's Deviations)")
    add("--freeze-weights", action="store_true", help="keep beta and gamma at their initial values (CHOICE C7)")
    add("--beta-init", type=float, default=1.0, help="initial beta of Eq. (10), > 0 (CHOICE C7)")
    add("--gamma-init", type=float, default=GAMMA_INIT, help="initial gamma of Eq. (10) (CHOICE C7)")
    add("--loss-region", default="masked", choices=("masked", "all"), help="pixels in the loss: those of hidden "
        "patches (default, MAE) or all labelled pixels (CHOICE C8)")
    add("--boundary-weight", type=float, default=None, help="loss weight of pixels within 2 px of a label boundary, "
        "1 elsewhere (CHOICE C18, not in the paper; 1 = plain). Default: --recipe's")
    add("--ignore-background-in-loss", action=argparse.BooleanOptionalAction, default=False,
        help="leave background pixels out of the loss, Eq. (12)'s literal reading (CHOICE C8; default off)")

    add = parser.add_argument_group("optimisation (Sec. IV-A)").add_argument
    add("--epochs", type=int, help="paper: 400 (the voc and cityscapes default); 30 for other sets, shapes (C14, C19)")
    add("--batch-size", type=int, help="per process; paper: 24 VOC, 48 Cityscapes. Default: those; others 8, shapes 16")
    add("--lr", type=float, default=None, help="Adam learning rate; not in the paper (CHOICE C9): 1e-4 for voc and "
        "cityscapes, 1e-3 elsewhere")
    add("--weight-decay", type=float, default=1e-4, help="Adam weight decay (paper: 1e-4)")
    add("--plateau-patience", type=int, default=5, help="ReduceLROnPlateau patience (paper: 5)")
    add("--plateau-factor", type=float, default=0.8, help="ReduceLROnPlateau factor (paper: 0.8)")
    add("--plateau-threshold", type=float, default=1e-3, help="ReduceLROnPlateau relative threshold (paper: 0.001)")
    add("--eval-every", type=int, default=None, help="validate every N epochs and at the last; best.pt is picked "
        "among those. Default 1; 5 for sets the paper did not use")
    add_run_arguments(parser, SCRIPT)
    args = parser.parse_args(argv)
    args.command = "train"
    args.given = sorted({action.dest for action in parser._actions for option in action.option_strings
                         for token in argv if token == option or token.startswith(option + "=")})
    return check_args(parser, args)


def check_args(parser, args):
    """Resolve the data-dependent defaults and derived values of a training run; refuse impossible flags."""
    defaults = DATA_DEFAULTS.get(args.data, DATA_DEFAULTS["other"])
    args.recipe = args.recipe or defaults["recipe"]
    for key, value in {**defaults, **RECIPES[args.recipe]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.eval_size = args.eval_size or args.img_size
    check_ranges(parser, args, [(name, getattr(args, name) >= 1, ">= 1") for name in (
        "epochs", "batch_size", "patch_size", "plateau_patience", "head_width", "eval_every")] + [
        ("mask_ratio", 0.0 < args.mask_ratio < 1.0, FRACTION), ("lr", args.lr > 0, "positive"),
        ("beta_init", args.beta_init > 0, "positive (beta is learned as log beta)"),
        ("boundary_weight", args.boundary_weight > 0, "positive"), ("weight_decay", args.weight_decay >= 0, ">= 0"),
        ("plateau_factor", 0.0 < args.plateau_factor < 1.0, FRACTION),
        ("drop_path", 0.0 <= args.drop_path < 1.0, "in [0, 1)"),
        ("background_class", 0 <= args.background_class < IGNORE, "a class id in 0..254"),
        ("void_id", args.void_id is None or 0 <= args.void_id < 65536, "a label value in 0..65535")])
    for name in ("img_size", "eval_size"):
        size = getattr(args, name)
        if size[0] % args.patch_size or size[1] % args.patch_size:
            parser.error(f"--{name.replace('_', '-')} {size[0]}x{size[1]} must be a multiple of --patch-size "
                         f"{args.patch_size} in both sides")
    patches = (args.img_size[0] // args.patch_size) * (args.img_size[1] // args.patch_size)
    eval_patches = (args.eval_size[0] // args.patch_size) * (args.eval_size[1] // args.patch_size)
    for count, flag in ((patches, "--img-size"), (eval_patches, "--eval-size")):
        if not 0 < round(args.mask_ratio * count) < count:
            parser.error(f"--mask-ratio {args.mask_ratio} hides {round(args.mask_ratio * count)} of {count} patches "
                         f"at {flag}; at least one must be hidden and one visible (change --mask-ratio or {flag})")
    try:
        plan_splits({"train": args.train_split, "val": args.val_split, "test": args.test_split})
    except DatasetError as error:
        parser.error(str(error))
    if args.num_classes is not None and (args.data != "folder" or not 2 <= args.num_classes < IGNORE):
        parser.error(f"--num-classes is read with --data folder only and must be in 2..254, got {args.num_classes}")
    if args.nearest_prior and args.head != "conv":
        parser.error("--nearest-prior feeds the conv head; pass it with --head conv")
    if PRESETS[args.arch]["encoder_dim"] % 4 or PRESETS[args.arch]["decoder_dim"] % 4:
        parser.error(f"--arch {args.arch}: widths must be multiples of 4 for the sin-cos positions")
    check_run_arguments(parser, args, SCRIPT)
    args.num_patches = patches  # derived, printed and saved with the run
    args.num_hidden = round(args.mask_ratio * patches)
    return args


def get_complete_args(argv):
    """`lmae.py complete`: fill the unknown pixels of a folder of labels (Sec. III-D, Fig. 4)."""
    parser = ArgumentParser(prog="lmae.py complete", description="Complete labels with trained L-MAE checkpoints "
                            "(Sec. III-D). Known pixels are copied unchanged; inputs are only read.")
    add = parser.add_argument
    add("--checkpoint", nargs="+", required=True, help="one or more lmae.py checkpoints, ideally trained at different "
        "--mask-ratio values; each image goes to the one whose ratio fits its unknown share (Fig. 4)")
    add("--images", required=True, help="folder of images (<name>.png/.jpg/...)")
    add("--labels", required=True, help="folder of labels named as the images: class ids (grey/palette), 255 = unknown")
    add("--unknown", help="folder of masks named as the labels, non-zero = unknown; 255 outside them stays void")
    add("--truth", help="folder of complete labels (same names) to score the completion and the two baselines: "
        "PA-mIoU over the unknown pixels, mIoU over all pixels")
    add("--out", required=True, help="new folder for the completed palette PNGs and report.csv")
    add("--void-id", type=int, help="a class id of --labels and --truth marking unlabelled pixels (e.g. CamVid's 11): "
        "read as 255, i.e. unknown and filled, or with --unknown masks void and written as 255 (default none)")
    add("--missing", default="unknown", choices=("unknown", "background"), help="unknown: only unknown pixels are "
        "missing (default); background: background pixels may be missing too, the most-background patches are "
        "hidden up to the model's ratio and their background pixels may be overwritten (Sec. III-D)")
    add("--route", choices=("unknown", "background"), help="which share picks the checkpoint (CHOICE C12): unknown = "
        "patches holding unknown pixels, background = background + unknown pixels (Fig. 4). Default: --missing's")
    add("--scale", type=float, default=1.0, help="images are resized by this factor (aspect kept) and padded to a "
        "multiple of the patch size (CHOICE C12; default 1: the grid of `degrade --patch-size P`)")
    add("--windows", action=argparse.BooleanOptionalAction, default=False, help="cut the scaled, padded image into "
        "windows of the checkpoint's training --img-size (stride half a window, a multiple of P: one global patch "
        "grid) and average their probabilities (CHOICE C16); default off: the whole image in one pass")
    add("--max-pixels", type=int, default=2 ** 20, help="an image whose scaled size exceeds this runs alone, in tiles "
        "of at most this many pixels on the same patch grid: bounded memory (CHOICE C17; default 1048576; 0 = never)")
    add("--fill", default="auto", choices=("auto", "model", "nearest"), help="what writes the unknown pixels: model "
        "(the checkpoints), nearest (each unknown pixel's nearest known pixel's class, no model) or auto (default): "
        "the winner of --self-check, which auto runs")
    add("--self-check", action=argparse.BooleanOptionalAction, help="before writing, hide --check-share of the known "
        "patches, fill them with the checkpoints and with the nearest fill, report both PA-mIoU with 95 %% bootstrap "
        "intervals over images (CHOICE C17; needs no ground truth). Default: on with --fill auto, else off")
    add("--check-share", type=float, default=0.1, help="share of each image's known patches the self-check hides")
    add("--batch-size", type=int, default=8, help="images of one size per forward pass")
    add("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    add("--amp", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on with CUDA, off on a CPU)")
    add("--seed", type=int, default=0, help="seed of the random tie-breaks between patches")
    args = parser.parse_args(argv)
    args.command = "complete"
    args.route = args.route or args.missing
    if args.self_check is None:
        args.self_check = args.fill == "auto"
    if args.fill == "auto" and not args.self_check:
        parser.error("--fill auto picks the winner of the self-check; drop --no-self-check or pass --fill model or "
                     "--fill nearest")
    check_ranges(parser, args, [
        ("check_share", 0.0 < args.check_share < 1.0, FRACTION),
        ("max_pixels", args.max_pixels >= 0, ">= 0 (0 = never tile)"),
        ("void_id", args.void_id is None or 0 <= args.void_id < 65536, "a label value in 0..65535"),
        ("scale", 0.0 < args.scale <= 8.0, "in (0, 8]"), ("batch_size", args.batch_size >= 1, ">= 1")])
    folders = {f"--{name}": getattr(args, name) for name in ("images", "labels", "unknown", "truth")}
    for flag, folder in folders.items():
        if folder is not None and not Path(folder).is_dir():
            parser.error(f"{flag} {folder}: no such folder")
    for path in args.checkpoint:
        if not Path(path).is_file():
            parser.error(f"--checkpoint {path}: no such file")
    check_new_folder(parser, args.out, folders)
    return args


def get_degrade_args(argv):
    """`lmae.py degrade`: hide patches of a dataset's labels (Sec. IV-C) so that `complete` can be scored."""
    parser = ArgumentParser(prog="lmae.py degrade", description="Write a copy of dataset splits with a fraction of "
                            "every label's patches set to 255 (Sec. IV-C): <out>/<split>/images, masks (degraded: "
                            "`--data folder` reads them), unknown (255 = hidden), truth (complete).")
    add = parser.add_argument
    add_dataset_arguments(add)
    add("--split", nargs="+", default=["train"], help="split(s) to degrade (default train)")
    add("--limit", type=int, help="only the first N images of each split")
    add("--img-size", type=parse_size, default=(64, 64), help="size shapes are drawn at (shapes only)")
    add("--ratio", type=float, default=0.5, help="share of each label's patches set to 255 (paper: 50 %%, the default)")
    add("--patch-size", type=int, default=16, help="patch side in pixels (default 16); the model's patch size / "
        "complete's --scale, so that both grids are the same (CHOICE C13)")
    add("--strategy", default="random", choices=MASKINGS, help="which patches are hidden (Sec. IV-C; CHOICE C13)")
    add("--mix", type=parse_mix, default=(1.0, 2.0, 2.0), help="weights for --strategy mixed (default 1:2:2)")
    add("--background-class", type=int, default=0, help="background id for the strategies (C4)")
    add("--seed", type=int, default=0, help="seed of the hidden patches")
    add("--out", required=True, help="new folder for the degraded copy")
    args = parser.parse_args(argv)
    args.command = "degrade"
    check_ranges(parser, args, [("ratio", 0.0 < args.ratio < 1.0, FRACTION),
                                ("patch_size", args.patch_size >= 1, ">= 1"),
                                ("limit", args.limit is None or args.limit >= 1, ">= 1")])
    check_new_folder(parser, args.out, {"--data-root": args.data_root})
    return args


def check_new_folder(parser, out, inputs):
    """--out of `complete` and `degrade`: a new or empty folder, not inside any input folder ({flag: folder})."""
    target = Path(out).resolve()
    for flag, folder in inputs.items():
        if folder is not None and Path(folder).resolve() in (target, *target.parents):
            parser.error(f"--out {out} is (inside) the input folder {flag} {folder}: inputs are never modified; "
                         f"choose a new --out")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        parser.error(f"--out {out} already exists and is not empty; choose a new folder")


def main(args):
    if args.command == "complete":
        return complete(args)
    if args.command == "degrade":
        return degrade(args)
    resume_path = check_run_dir(args, SCRIPT)  # nothing is written before flags, run folder and data are checked
    runtime = setup_runtime(args, amp_on_cpu=True)  # bf16 on a CPU held PA-mIoU within the seed spread (README)
    try:
        return train(args, runtime, resume_path)
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
