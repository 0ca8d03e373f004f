r"""SimCLR pre-training + U-Net fine-tuning for foreground/background segmentation (Oxford-IIIT Pet).

"Semantic Segmentation of Images using Self-supervised Learning" (anonymous UCL project report; authors' code
RoboRabbit666/simclr-semantic-segmentation), on SimCLR: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for
Contrastive Learning of Visual Representations", ICML 2020, https://proceedings.mlr.press/v119/chen20j.html.

A ResNet-50 with a two-layer MLP projection head is pre-trained without labels: two random augmentations of each
image are pulled together and pushed away from every other image of the batch by the NT-Xent loss (Eq. 2.1). The
encoder is then transferred into a U-Net (ResNet encoder + U-Net decoder, one logit per pixel), which is fine-tuned
with BCE on Pet foreground masks and compared with the same U-Net trained from scratch, for development sets of 80,
50 and 20 % of the data with one fixed 20 % test set (Table 4.1; the grid: experiments/simclr_pets/table41.py).

Implemented (component -> function -> paper place)
    two augmented views (crop, flip, colour, grey, blur) -> simclr_augmentation, TwoViews  -> Sec. 2.1 (1)
    ResNet encoder (torchvision, fc removed)             -> ResNetEncoder                  -> Sec. 2.1 (2)
    projection head Linear-ReLU-Linear, 2048->512->128   -> ProjectionHead, SimCLR         -> Sec. 2.1 (3)
    U-Net decoder on the ResNet feature maps, 1 logit    -> UNetDecoder, SimCLRUNet        -> Sec. 2.2 step (2)
    load the pre-trained encoder, strict by name         -> transfer_encoder_weights       -> Sec. 2.2 step (1)
    NT-Xent on L2-normalised projections, temperature    -> nt_xent_loss                   -> Sec. 2.1 (4), Eq. (2.1)
    negatives from every DDP rank, with gradients        -> gather_with_grad               -> (SimCLR's global batch)
    BCE (Dice, Focal: the authors' code)                 -> segmentation_loss              -> Sec. 2.2 step (3)
    LARS, warm-up + cosine (pre-training optimiser)      -> LARS, warmup_cosine            -> (authors' code, SimCLR)
    pre-training, then fine-tuning, one epoch loop       -> pretrain, finetune, train_one_epoch -> Sec. 2.1-2.2
    keep the weights of the lowest validation loss       -> finetune (--select-by)         -> Sec. 2.2 step (4)
    test IoU, F1, Dice, Focal, BCE, recall, accuracy     -> evaluate, table_row            -> Sec. 2.2 (5), Table 4.1
    fixed 20 % test, dev 80/50/20 %, train/val 90/10     -> pet_splits                     -> Sec. 3.1

Usage
    python simclr_seg.py                                   # synthetic: pre-train, then fine-tune (minutes, CPU)
    python simclr_seg.py --data pets --data-root data/oxford-iiit-pet --pretrain-data cifar10   # ./data/cifar10
    python simclr_seg.py --data pets --stage finetune --dev-split 0.5        # the baseline (random init), 50 % dev
    torchrun --nproc_per_node=4 simclr_seg.py --data pets --compile
    python simclr_seg.py --resume --out runs/simclr_seg-shapes          # continue at the next epoch (or stage)

Shapes: B batch (per rank), W ranks, C channels, H W height width, d projection width, D representation width.
Images (B, 3, H, W) float normalised; labels (B, H, W) int64 in {0, 1, 255 = ignore}; logits (B, 1, H, W).
Choices and deviations: README 'SimCLR pre-training + U-Net fine-tuning' and `grep -n "CHOICE\|DEVIATION" simclr_seg.py`
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
from torch.utils.data import DataLoader, Dataset, Sampler, Subset
from torchvision.transforms import v2
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from common import (NORMALIZATION, BinaryStats, DatasetError, build_dataset, check_labels, denormalize,
                    joint_transform, plan_splits, readable_images)

SCRIPT = "simclr_seg.py"
ENCODER_CHANNELS = {  # widths of the stem (/2) and layers 1-4 (/4 ... /32); parameters our code measures:
    "resnet18": (64, 64, 128, 256, 512),  # SimCLR 11.5 M, U-Net 14.3 M (the synthetic preset, a CPU choice)
    "resnet34": (64, 64, 128, 256, 512),  # SimCLR 21.6 M, U-Net 24.4 M
    "resnet50": (64, 256, 512, 1024, 2048),  # SimCLR 24.6 M, U-Net 32.5 M = smp Unet("resnet50") (authors' model)
}
TABLE_COLUMNS = ("ID", "Model", "Loss Func", "Dev Split", "IOU", "F1", "Dice", "Focal", "BCE", "Recall", "Accuracy")


# --- SimCLR views (Sec. 2.1 step 1) ---

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


class TwoViews(Dataset):
    """Image-only dataset -> two augmented views (view1, view2) of each item.

    Wrapped in the plumbing's SeededItems by make_loader: torchvision's random transforms draw from the torch RNG
    seeded with the item's seed, so the views are a function of (seed, stage, epoch, index) for any --workers.
    """

    def __init__(self, images, augment):
        self.images, self.augment = images, augment

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        return self.augment(image), self.augment(image)


# --- model: ResNet encoder, projection head (Sec. 2.1), U-Net (Sec. 2.2) ---

class ResNetEncoder(nn.Module):
    """torchvision ResNet without avgpool/fc, under torchvision's own names (conv1, bn1, layer1 ... layer4).

    forward(images (B, 3, H, W)) -> h (B, D), the global-average-pooled representation (D = 2048 for ResNet-50);
    features(images) -> [stem (B, 64, H/2, W/2), layer1 /4, layer2 /8, layer3 /16, layer4 /32] for the U-Net.
    """

    def __init__(self, arch="resnet50"):
        super().__init__()
        resnet = getattr(torchvision.models, arch)(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.channels = ENCODER_CHANNELS[arch]

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

    def __init__(self, arch="resnet50", hidden_dim=512, projection_dim=128):
        super().__init__()
        self.encoder = ResNetEncoder(arch)
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

    def __init__(self, arch="resnet50", decoder_channels=(256, 128, 64, 32, 16)):
        super().__init__()
        self.encoder = ResNetEncoder(arch)
        self.decoder = UNetDecoder(self.encoder.channels, decoder_channels)
        self.head = nn.Conv2d(decoder_channels[-1], 1, 3, padding=1)

    def forward(self, images):
        features = self.encoder.features(images)
        return self.head(self.decoder(features, images.shape[-2:]))  # (B, 1, H, W)


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
                         f"{', '.join(problems)}; pass a checkpoint of the same --arch")
    model.encoder.load_state_dict({key: found[key] for key in target}, strict=True)
    return len(target)


# --- losses: NT-Xent (Sec. 2.1, Eq. 2.1), segmentation (Sec. 2.2 step 3) ---

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
    # CHOICE C3: fp32 even under bf16 autocast, which would otherwise run the similarity matmul in bf16 (8 bits of
    # mantissa: near cos = 1 at tau 0.1 that is about 2 % error in the gradient)
    with torch.autocast(z1.device.type, enabled=False):
        # CHOICE C3: L2-normalised projections (the authors' code skips this): dot product = cosine similarity
        z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, d)
        candidates, offset = gather_with_grad(z)  # (2BW, d); this rank's rows start at `offset`
        # Eq. (2.1): l(i, j) = -log( exp(s_ij / tau) / sum_{k != i} exp(s_ik / tau) )
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


# --- pre-training optimiser: LARS, warm-up + cosine (CHOICE C4) ---

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


# --- loops (one epoch loop for both stages) ---

def train_step(model, batch, stage, runtime, loss="bce", temperature=0.1):
    """Forward pass and loss of one batch; the function --compile wraps.

    pretrain: batch = (view1, view2), each (B, 3, H, W) -> NT-Xent of their projections.
    finetune: batch = (images (B, 3, H, W), labels (B, H, W)) -> segmentation loss of the logits (B, 1, H, W).
    """
    with autocast(runtime):
        if stage == "pretrain":
            view1, view2 = batch
            projections = model(torch.cat([view1, view2]))  # (2B, d): one BatchNorm batch for both views (SimCLR)
            z1, z2 = projections.float().chunk(2)  # (B, d) each
            return nt_xent_loss(z1, z2, temperature)
        images, labels = batch
        return segmentation_loss(model(images), labels, loss)


def to_device(batch, runtime, args):
    """Move a batch to the device (non-blocking: overlaps with compute when pinned); images channels-last."""
    moved = []
    for tensor in batch:
        tensor = tensor.to(runtime.device, non_blocking=True)
        if tensor.dim() == 4 and args.channels_last:
            tensor = tensor.contiguous(memory_format=torch.channels_last)  # faster cuDNN convolutions in bf16
        moved.append(tensor)
    return moved


def train_one_epoch(stage, model, loader, optimizer, scheduler, step_fn, guard, epoch, args, runtime):
    """One pass over the loader -> {"loss": mean over steps (all ranks), "lr", "images_per_s"}."""
    model.train()
    loader.sampler.set_epoch(stage, epoch)
    loss_sum = torch.zeros((), device=runtime.device)
    steps, images_seen, start = 0, 0, time.perf_counter()
    for batch in progress(loader, runtime, f"{stage} epoch {epoch}"):
        batch = to_device(batch, runtime, args)
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(model, batch, stage, runtime, args.loss, args.temperature)
        guard.observe(loss)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().float()
        steps += 1
        images_seen += batch[0].shape[0] * runtime.world_size
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(steps), device=runtime.device)]))
    loss_total, step_total = totals.tolist()  # sync point
    return {"loss": loss_total / max(step_total, 1), "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": images_seen / (time.perf_counter() - start)}


@torch.no_grad()
def evaluate(model, loader, args, runtime):
    """Binary metrics of the model on a loader (sums over all ranks) -> BinaryStats.compute() + "loss".

    "loss" is the training loss on these images (bce, dice_loss or focal_loss): the validation loss of Sec. 2.2.
    CHOICE C12: every metric comes from pixel counts and sums over the whole split, not from per-batch averages.
    """
    model.eval()
    stats = BinaryStats(device=runtime.device)
    for batch in progress(loader, runtime, "scoring"):
        images, labels = to_device(batch, runtime, args)
        with autocast(runtime):
            logits = model(images)  # (B, 1, H, W)
        stats.update(logits.float(), labels)
    metrics = stats.all_reduce().compute()  # sync point; every rank joins, also one with an empty shard
    metrics["loss"] = metrics[{"bce": "bce", "dice": "dice_loss", "focal": "focal_loss"}[args.loss]]
    return metrics


def table_row(model_name, loss, dev_split, metrics, row_id=0):
    """Table 4.1 columns: ID, Model, Loss Func, Dev Split (%), IOU, F1, Dice (loss), Focal, BCE, Recall, Accuracy."""
    return {"ID": row_id, "Model": model_name, "Loss Func": loss.upper() if loss == "bce" else loss.capitalize(),
            "Dev Split": round(100 * dev_split), "IOU": metrics["iou"], "F1": metrics["f1"],
            "Dice": metrics["dice_loss"], "Focal": metrics["focal_loss"], "BCE": metrics["bce"],
            "Recall": metrics["recall"], "Accuracy": metrics["accuracy"]}


def markdown_table(rows, columns=TABLE_COLUMNS):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@torch.no_grad()
def save_samples(stage, model, dataset, path, args, runtime, count=8):
    """PNG grid of the first items. pretrain: row 1 view 1, row 2 view 2. finetune: image, prediction, truth
    (grey = ignore)."""
    items = SeededItems(dataset)
    batch = [items[(i, derive_seed(args.seed, "samples", i))] for i in range(min(count, len(dataset)))]
    batch = to_device([torch.stack(column) for column in zip(*batch)], runtime, args)
    if stage == "pretrain":
        rows = [denormalize(batch[0].float(), "imagenet"), denormalize(batch[1].float(), "imagenet")]
    else:
        images, labels = batch
        model.eval()
        with autocast(runtime):
            prediction = (model(images).float() > 0).float().expand(-1, 3, -1, -1)  # (b, 3, H, W): p > 0.5
        truth = torch.where(labels == 255, 0.5, labels.float()).unsqueeze(1).expand(-1, 3, -1, -1)
        rows = [denormalize(images.float(), "imagenet"), prediction, truth]
    grid = make_grid(torch.cat(rows).cpu(), nrow=rows[0].shape[0], padding=2, pad_value=1.0)  # sync point
    save_image(grid, path)


# --- phases: the data of both stages (Sec. 3.1) ---

def keep_image(image):
    """Identity transform for the image-only readers: the raw uint8 image goes to TwoViews (picklable for workers)."""
    return image


def pet_splits(num_images, dev_split, test_fraction=0.2, val_fraction=0.1, seed=0):
    """Sec. 3.1 splits of a set of num_images -> dict of sorted index lists train, val, test, unused (CHOICE C9).

    One seeded permutation: the first round(test_fraction * N) are the test set, whatever dev_split is; the next
    round(dev_split * N) are the dev set (nested across dev fractions), split 90/10 into train and validation.
    On all 7,349 Pet images: test 1,470; dev 80 % 5,879 = 5,291 train + 588 val.
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
                               f"{test_fraction}, val {val_fraction}); use more images (--synthetic-images) or "
                               f"larger fractions")
    return {name: sorted(indices) for name, indices in splits.items()}


def build_pool(args, transform, image_only=False):
    """The labelled set that pet_splits divides: all 7,349 Pet images (trainval + test), or the synthetic pool."""
    if args.data == "pets":
        return build_dataset("pets", args.data_root, split="all", transform=transform, image_only=image_only,
                             binary=True, border=args.border, download=args.download)[0]
    return build_dataset("shapes", split="all", transform=transform, image_only=image_only, binary=True,
                         image_size=args.img_size, num_images=args.synthetic_images, seed=args.split_seed)[0]


def split_indices(args, pool):
    """{train, val, test: pool indices}: pet_splits of the pool (Sec. 3.1), or, with --train-split, --val-split or
    --test-split, the Pet reader's splits (train/val = 90/10 of trainval, test, all; SPLIT:F carved, plan_splits)."""
    if not (args.train_split or args.val_split or args.test_split):
        return pet_splits(len(pool), args.dev_split, args.test_fraction, args.val_fraction, args.split_seed)
    specs = {"train": args.train_split or "train", "val": args.val_split or "val", "test": args.test_split or "test"}
    position = {name: i for i, name in enumerate(pool.names)}
    return {role: sorted(position[name] for name in build_dataset(
        "pets", args.data_root, split, part=part, seed=args.split_seed, transform=keep_image, image_only=True,
        border=args.border)[0].names) for role, (split, part) in plan_splits(specs).items()}


def run_splits(args, pool):
    """split_indices of the pool, then --limit: the first N indices of each split."""
    return {name: indices[:args.limit] if args.limit else indices
            for name, indices in split_indices(args, pool).items()}


def build_finetune_data(args, runtime, names=("train", "val", "test")):
    """-> {"train", "val", "test": Subset of the pool, "indices": the splits' pool indices}; every label checked."""
    pool = build_pool(args, joint_transform(args.img_size))  # CHOICE C10: resize only, ImageNet normalisation
    splits = run_splits(args, pool)
    data = {"indices": {name: splits[name] for name in names}}
    for name in names:
        data[name] = Subset(pool, splits[name])
        check_labels(data[name], desc=f"checking {name} labels")  # a bad trimap stops the run before any step
    if "train" in names and args.img_size < 64 and -(-len(splits["train"]) // runtime.world_size) == 1:
        raise DatasetError(f"the train split holds one image per process, and at --img-size {args.img_size} the "
                           f"ResNet's last BatchNorm would see one value per channel; use more images or "
                           f"--img-size 64")
    return data


class ImageFolderFiles(Dataset):
    """Every image file under a folder (recursively), uint8 tv_tensors.Image items, for --pretrain-data folder.

    common.py's `folder` reader wants an images/ + masks/ pair; pre-training needs images only. Every file is fully
    decoded once when the folder is scanned (common.readable_images): unreadable ones are skipped and counted.
    """

    EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

    def __init__(self, root):
        if not os.path.isdir(root):
            raise DatasetError(f"folder: {root} does not exist; pass --pretrain-root pointing at a folder of images")
        paths = sorted(str(p) for p in Path(root).rglob("*") if p.suffix.lower() in self.EXTENSIONS)
        self.image_paths, self.skipped = readable_images(paths, desc="folder: decoding")
        if not self.image_paths:
            raise DatasetError(f"folder: no readable image files ({', '.join(self.EXTENSIONS)}) under {root}; "
                               f"point --pretrain-root at a folder of images")
        if self.skipped:
            print(f"folder: skipped {len(self.skipped)} unreadable image files of {len(paths)} (e.g. "
                  f"{self.skipped[0]})", file=sys.stderr)
        # the class of an image = its first-level subfolder (a flat folder is one class): --pretrain-limit balances it
        self.classes = [Path(p).relative_to(root).parts[0] if len(Path(p).relative_to(root).parts) > 1 else ""
                        for p in self.image_paths]

    def __len__(self):
        return len(self.image_paths)

    def __getitem__(self, index):
        try:
            with Image.open(self.image_paths[index]) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as error:  # changed on disk since the scan
            raise DatasetError(f"folder: cannot read image {self.image_paths[index]} ({type(error).__name__}); "
                               f"remove or replace the file") from None
        return torchvision.tv_tensors.Image(torch.from_numpy(array.copy()).permute(2, 0, 1))


def balanced_draw(classes, limit, seed):
    """CHOICE C17: a seeded draw of `limit` item indices, round-robin over the classes -> sorted index list.

    classes: one class key per item. Each class is visited in a seeded order; a class that runs out leaves its turns
    to the others, so the draw is as balanced as the classes' sizes allow.
    """
    generator = np.random.default_rng(seed)
    members = {}
    for index, key in enumerate(classes):
        members.setdefault(key, []).append(index)
    queues = [[members[key][i] for i in generator.permutation(len(members[key]))] for key in sorted(members)]
    chosen = []
    while len(chosen) < limit and any(queues):
        for queue in queues:
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return sorted(chosen)


def build_pretrain_images(args):
    """The unlabelled pre-training images (uint8 tv_tensors.Image items), never the fine-tuning test set
    -> (dataset, number of unreadable files skipped)."""
    name, root = args.pretrain_data, args.pretrain_root
    classes = None  # one class key per image, for --pretrain-limit's balanced draw (CHOICE C17)
    if name == "shapes":  # the synthetic set's own unlabelled split: other images than the labelled pool
        images = build_dataset("shapes", split="unlabeled", transform=keep_image, image_only=True,
                               image_size=args.pretrain_source_size, num_images=args.synthetic_images,
                               seed=args.split_seed)[0]
    elif name == "pets":
        if args.data == "pets":  # CHOICE C13: in-domain, the fine-tuning pool minus its fixed test set
            pool = build_pool(args, keep_image, image_only=True)
            test = set(split_indices(args, pool)["test"])
            keep = [i for i in range(len(pool)) if i not in test]
            images, classes = Subset(pool, keep), [pool.names[i].rsplit("_", 1)[0] for i in keep]
        else:
            images = build_dataset("pets", root, split="all", transform=keep_image, image_only=True,
                                   download=args.download)[0]
            classes = [stem.rsplit("_", 1)[0] for stem in images.names]
    elif name == "folder":
        images = ImageFolderFiles(root)
        classes = images.classes
    elif name == "catsdogs":  # common.py decodes every file and draws the balanced subset itself
        options = {} if args.pretrain_limit is None else {"balanced_limit": args.pretrain_limit}
        images = build_dataset("catsdogs", root, split="all", transform=keep_image, image_only=True,
                               seed=args.split_seed, **options)[0]
    else:  # CIFAR-10's 50,000 training images
        images = build_dataset("cifar10", root, split="train", transform=keep_image, image_only=True,
                               download=args.download)[0]
    skipped = len(getattr(images, "skipped", []))
    if args.pretrain_limit is not None and name != "catsdogs":
        classes = classes if classes is not None else [""] * len(images)
        images = Subset(images, balanced_draw(classes, args.pretrain_limit, args.split_seed))
    if args.limit is not None:
        images = Subset(images, range(min(len(images), args.limit)))
    return images, skipped


def pretrain_augmentation(args):
    """The views of this run's pre-training: simclr_augmentation with the run's flags."""
    return simclr_augmentation(args.pretrain_img_size, args.color_strength, args.blur_prob, args.crop_scale)


def build_pretrain_data(args):
    images, skipped = build_pretrain_images(args)
    return {"train": TwoViews(images, pretrain_augmentation(args)), "images": len(images), "skipped": skipped}


# --- phases: models and optimisers ---

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


def initialise_encoder(model, spec, args, runtime, stage, flag):
    """Apply an init spec (none | imagenet[:PATH] | simclr:PATH) to model.encoder; print what was loaded (rank 0)."""
    if spec == "none":
        say(runtime, f"{stage}: encoder from random init (no pre-training)")
        return 0
    if spec.startswith("imagenet"):
        state_dict, source = load_imagenet_weights(args.arch, spec, args.download), f"ImageNet weights ({spec})"
    else:
        path = spec.split(":", 1)[1]
        state_dict, source = load_checkpoint(path, SCRIPT, flag=flag)["model"], path
    count = transfer_encoder_weights(model, state_dict, source)
    say(runtime, f"{stage}: loaded {count}/{count} encoder tensors from {source}")
    return count


def count_parameters(module):
    return sum(p.numel() for p in module.parameters())


def arch_of(stage, args):
    """The architecture string checkpoints carry (load_checkpoint refuses a checkpoint of another one)."""
    if stage == "pretrain":
        return f"SimCLR-{args.arch}-head{args.projection_hidden_dim}x{args.projection_dim}"
    return f"SimCLRUNet-{args.arch}-decoder{'x'.join(map(str, args.decoder_channels))}"


def sync_batch_norm(model, enabled, runtime):
    """`enabled` under torchrun on CUDA: BatchNorm over the batches of all ranks (SyncBatchNorm), so 2 processes with
    batch B normalise as 1 with batch 2B; otherwise the model itself (SyncBatchNorm has no CPU kernel)."""
    if enabled and runtime.world_size > 1 and runtime.device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_model(stage, args, runtime):
    """SimCLR (pretrain) or SimCLRUNet (finetune), initialised from --pretrain-init / --init, on the device."""
    torch.manual_seed(derive_seed(args.seed, "init", stage))  # identical initial weights on every rank and resume
    if stage == "pretrain":
        model = SimCLR(args.arch, args.projection_hidden_dim, args.projection_dim)
        initialise_encoder(model, args.pretrain_init, args, runtime, stage, "--pretrain-init")  # CHOICE C1
    else:
        model = SimCLRUNet(args.arch, args.decoder_channels)
        initialise_encoder(model, args.init, args, runtime, stage, "--init")
    model = model.to(runtime.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def constant_lr(step):
    return 1.0


def build_optimizer(stage, model, args, steps_per_epoch):
    """pretrain: LARS / Adam with warm-up + cosine; finetune: Adam at a constant lr (Sec. 2.2)."""
    if stage == "finetune":
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, constant_lr)
    # CHOICE C4: conv and linear weights get weight decay and the trust ratio; biases and BatchNorm get neither
    adapted = [p for p in model.parameters() if p.ndim > 1]
    excluded = [p for p in model.parameters() if p.ndim <= 1]
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


def finetune_model_name(args):
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


# --- phases: the two stages, pretrain and finetune ---

def train_stage(stage, model, args, runtime, data, out, log, resume_state=None):
    """The epoch loop of either stage in run directory `out`: one metrics.jsonl record and one last.pt per epoch.

    finetune validates every epoch and links best.pt (CHOICE C11). resume_state: this stage's checkpoint to continue
    from (None: from epoch 1). -> (model, wrapped for DDP, best_epoch, last epoch's training loss).
    """
    pretrain = stage == "pretrain"
    batch_size = args.pretrain_batch_size if pretrain else args.batch_size
    train_loader = make_loader(data["train"], batch_size, args, runtime, train=True)
    optimizer, scheduler = build_optimizer(stage, model, args, len(train_loader))
    epochs, lr_flag = (args.pretrain_epochs, "--pretrain-lr") if pretrain else (args.epochs, "--lr")
    start_epoch, best, best_epoch, last_loss = 1, None, None, None
    if resume_state is not None:
        load_state(model, resume_state["model"], out / "last.pt")
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        start_epoch, best, best_epoch = resume_state["epoch"] + 1, resume_state["best"], resume_state["best_epoch"]
        last_loss = resume_state["loss"]
        say(runtime, f"{stage}: resumed at epoch {start_epoch}")
    model = distribute(sync_batch_norm(model, args.sync_bn, runtime), runtime)  # CHOICE C5: BN over the global batch
    step_fn = torch.compile(train_step) if args.compile else train_step
    val_loader = None if pretrain else make_loader(data["val"], args.batch_size, args, runtime, train=False)
    guard = FiniteGuard()
    say(runtime, f"{stage}: {count_parameters(unwrap(model)) / 1e6:.2f} M parameters, {len(train_loader)} steps of "
                 f"{batch_size} x {runtime.world_size} images per epoch" +
        ("" if pretrain else f", splits {({k: len(v) for k, v in data['indices'].items()})}"))
    if runtime.main:
        (out / "samples").mkdir(exist_ok=True)
    for epoch in range(start_epoch, epochs + 1):
        start = time.perf_counter()
        train = train_one_epoch(stage, model, train_loader, optimizer, scheduler, step_fn, guard, epoch, args,
                                runtime)
        guard.check(stage, epoch, lr_flag)  # before anything of this epoch is evaluated or saved
        record = {"stage": stage, "epoch": epoch, "loss": train["loss"], "lr": train["lr"]}
        improved = False
        if pretrain:
            record["negatives"] = 2 * args.pretrain_batch_size * runtime.world_size - 2  # per anchor, all ranks
        else:
            val = evaluate(unwrap(model), val_loader, args, runtime)  # CHOICE C11: selection sees validation only
            record.update(val_loss=val["loss"], val_iou=val["iou"], val_f1=val["f1"], val_accuracy=val["accuracy"])
            value = val["loss"] if args.select_by == "val_loss" else -val["iou"]
            improved = best is None or value < best
            best, best_epoch = (value, epoch) if improved else (best, best_epoch)
        record.update(images_per_s=train["images_per_s"], time_s=time.perf_counter() - start)
        last_loss = train["loss"]
        log.write(record)  # before the checkpoint: a kill between the two drops this record on resume
        state = {"stage": stage, "epoch": epoch, "model": unwrap(model).state_dict(),
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best": best,
                 "best_epoch": best_epoch, "loss": last_loss, "args": json_safe(vars(args))}
        if pretrain:
            state.update(images=data["images"], skipped=data["skipped"])
        if runtime.main:
            save_checkpoint(out / "last.pt", state, SCRIPT, arch_of(stage, args), log)
            if improved:
                link_checkpoint(out / "last.pt", out / "best.pt")
            save_samples(stage, unwrap(model), data["train" if pretrain else "val"],
                         out / "samples" / f"{stage}_epoch_{epoch:03d}.png", args, runtime)
        barrier()  # the other ranks wait until the checkpoint exists
    return model, best_epoch, last_loss


def pretrain(args, runtime, data, out, log, resume_state=None, model=None):
    """Sec. 2.1: SimCLR on the unlabelled images -> results.json's "pretrain" summary; OUT/pretrain.pt = the last
    epoch (CHOICE C7), the encoder fine-tuning starts from."""
    model = model if model is not None else build_model("pretrain", args, runtime)
    _, _, last_loss = train_stage("pretrain", model, args, runtime, data, out, log, resume_state)
    if runtime.main:
        link_checkpoint(out / "last.pt", out / "pretrain.pt")
    barrier()
    return pretrain_summary({"loss": last_loss, "epoch": args.pretrain_epochs, "images": data["images"],
                             "skipped": data["skipped"]}, out)


def finetune(args, runtime, data, out, log, resume_state=None, model=None):
    """Sec. 2.2: the U-Net from --init on the dev split, best.pt by validation, then the test split once
    -> results.json's "finetune" entry (test metrics of best.pt, the Table 4.1 row, the split sizes and indices)."""
    model = model if model is not None else build_model("finetune", args, runtime)
    model, best_epoch, _ = train_stage("finetune", model, args, runtime, data, out, log, resume_state)
    best_state = load_checkpoint(out / "best.pt", SCRIPT, arch_of("finetune", args))
    load_state(model, best_state["model"], out / "best.pt")  # Sec. 2.2 (5): the selected weights meet the test set
    test = evaluate(unwrap(model), make_loader(data["test"], args.batch_size, args, runtime, train=False), args,
                    runtime)
    model_name = finetune_model_name(args)
    results = {"model": model_name, "init": args.init, "dev_split": args.dev_split, "best_epoch": best_epoch,
               "split_sizes": {name: len(indices) for name, indices in data["indices"].items()},
               "split_indices": data["indices"], "test": test,
               "row": table_row(model_name, args.loss, args.dev_split, test)}
    say(runtime, markdown_table([results["row"]]))
    return results


def pretrain_summary(state, out):
    """results.json's "pretrain" entry from a pre-training checkpoint (or the same fields)."""
    return {"final_loss": state["loss"], "epochs": state["epoch"], "checkpoint": str(out / "pretrain.pt"),
            "images": state["images"], "skipped_unreadable": state["skipped"]}


def prepare_run(args, runtime, data_cache=None):
    """Everything that can fail before --out is written: the run folder, every split's labels, the first model.
    -> (resume_state, data by stage, first model)."""
    resume_path = check_run_dir(args, SCRIPT)
    resume_state = load_checkpoint(resume_path, SCRIPT, flag="--resume") if resume_path else None
    stages = ("pretrain", "finetune") if args.stage == "both" else (args.stage,)
    if resume_state is not None and resume_state["stage"] == "finetune":
        stages = ("finetune",)  # pre-training is finished; its pretrain.pt is what fine-tuning started from
    data_cache = {} if data_cache is None else data_cache
    data = {}
    for stage in stages:
        key = (stage, args.pretrain_data, args.pretrain_root, args.pretrain_source_size) if stage == "pretrain" \
            else (stage, args.dev_split)
        if key not in data_cache:
            data_cache[key] = build_pretrain_data(args) if stage == "pretrain" else build_finetune_data(args, runtime)
        data[stage] = data_cache[key]
    if resume_state is not None and arch_of(resume_state["stage"], args) != resume_state.get("arch"):
        raise UsageError(f"--resume: {resume_path} holds a {resume_state.get('arch')} model but these flags build "
                         f"{arch_of(resume_state['stage'], args)}; pass the flags the run was started with")
    model = build_model(stages[0], args, runtime)  # a bad --init or --pretrain-init file fails here
    return resume_state, data, model


def run(args, runtime, data_cache=None):
    """One run (its stages) in --out -> results dict (results.json)."""
    resume_state, data, model = prepare_run(args, runtime, data_cache)
    out = create_run_dir(args, SCRIPT, {"args": vars(args), "world_size": runtime.world_size}, runtime)
    log = MetricsLog(out, runtime, resume_state=resume_state)
    results = {}
    if args.stage == "both" and "pretrain" not in data:  # resumed in fine-tuning: pre-training is in pretrain.pt
        results["pretrain"] = pretrain_summary(load_checkpoint(out / "pretrain.pt", SCRIPT), out)
    for stage in data:  # the first stage gets the model prepare_run built
        state = resume_state if resume_state is not None and resume_state["stage"] == stage else None
        results[stage] = (pretrain if stage == "pretrain" else finetune)(args, runtime, data[stage], out, log, state,
                                                                         model)
        model = None
    if "finetune" in results:
        results["test"] = results["finetune"]["test"]
    if runtime.main:
        write_json(out / "results.json", results)
    barrier()
    return results


# --eval-only reads these from the checkpoint, so the test split is the one the model was trained beside
SPLIT_PROTOCOL = ("img_size", "split_seed", "test_fraction", "val_fraction", "dev_split", "border",
                  "synthetic_images", "limit", "loss", "train_split", "val_split", "test_split")


def evaluate_checkpoint(args, runtime):
    """--eval-only: the fine-tuned --checkpoint (default OUT/best.pt) on the test split -> OUT/eval_test.json."""
    path = Path(args.checkpoint) if args.checkpoint else Path(args.out) / "best.pt"
    saved = load_checkpoint(path, SCRIPT).get("args") or {}
    for name in ("arch", "decoder_channels"):  # the checkpoint's network, unless the command line gives it
        if name in saved and name not in getattr(args, "given", ()):
            setattr(args, name, saved[name])
    state = load_checkpoint(path, SCRIPT, arch_of("finetune", args))
    if saved.get("data", args.data) != args.data:
        raise UsageError(f"--checkpoint {path} was fine-tuned on --data {saved['data']}, not {args.data}; pass "
                         f"--data {saved['data']}")
    named = {"train_split", "val_split", "test_split"} & set(getattr(args, "given", ()))  # the splits typed now
    for name in SPLIT_PROTOCOL + ("init",):  # the test split the model was trained beside, unless one is named
        if name in saved and name not in named:
            setattr(args, name, saved[name])
    say(runtime, f"eval-only: {path}, " + ", ".join(f"{name}={getattr(args, name)}" for name in SPLIT_PROTOCOL))
    data = build_finetune_data(args, runtime, names=("test",))
    model = SimCLRUNet(args.arch, args.decoder_channels).to(runtime.device)
    load_state(model, state["model"], path)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    test = evaluate(model, make_loader(data["test"], args.batch_size, args, runtime, train=False), args, runtime)
    say(runtime, markdown_table([table_row(finetune_model_name(args), args.loss, args.dev_split, test)]))
    result = {"checkpoint": str(path), "test": test}
    if runtime.main:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_json(Path(args.out) / "eval_test.json", result)
    barrier()
    return result


# --- command line ---

def get_args(argv=None):
    parser = ArgumentParser(description="SimCLR pre-training + U-Net fine-tuning (foreground segmentation, "
                                        "Oxford-IIIT Pet)")
    parser.add_argument("--data", default="shapes", choices=("shapes", "pets"),
                        help="fine-tuning set: shapes = synthetic binary set (default), pets = Oxford-IIIT Pet")
    parser.add_argument("--data-root", default=os.path.join("data", "oxford-iiit-pet"),
                        help="--data pets: the oxford-iiit-pet folder itself (images/, annotations/)")
    parser.add_argument("--download", action="store_true",
                        help="let torchvision download Pets, CIFAR-10 and (imagenet init) ImageNet weights")
    parser.add_argument("--stage", default="both", choices=("pretrain", "finetune", "both"),
                        help="pretrain = SimCLR only (Sec. 2.1); finetune = U-Net only (Sec. 2.2); both = pretrain, "
                             "then fine-tune from it, in one run directory")
    parser.add_argument("--arch", default=None, choices=sorted(ENCODER_CHANNELS),
                        help="ResNet encoder of both stages (paper: resnet50; shapes preset: resnet18, a CPU choice)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="fine-tuning image side in px (paper code: 224; shapes preset: 48)")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (Sec. 2.2: 60; shapes: 10)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="fine-tuning batch per process (authors' code: 32; shapes: 16)")
    parser.add_argument("--lr", type=float, default=None, help="fine-tuning Adam lr (Sec. 2.2: 1e-4; shapes: 1e-3)")
    add_run_arguments(parser, SCRIPT)

    pre = parser.add_argument_group("pre-training (Sec. 2.1)")
    pre.add_argument("--pretrain-data", default=None, choices=("shapes", "cifar10", "catsdogs", "pets", "folder"),
                     help="unlabelled images for SimCLR (paper: cifar10, catsdogs = CAT&DOG; pets: with --data pets "
                          "only the images outside the fixed test set; shapes: the synthetic unlabelled split; "
                          "folder: every image under --pretrain-root); default shapes for --data shapes, else cifar10")
    pre.add_argument("--pretrain-root", default=None, help="the pre-training set's own folder (default "
                                                           "./data/cifar10, ./data/catsdogs, ./data/oxford-iiit-pet)")
    pre.add_argument("--pretrain-limit", type=int, default=None, metavar="N",
                     help="a seeded, class-balanced draw of N pre-training images (CHOICE C17; the authors used "
                          "23,410 CAT&DOG images and as many CIFAR-10 ones)")
    pre.add_argument("--pretrain-epochs", type=int, default=None, help="SimCLR epochs (Sec. 3.1: 20; shapes: 6)")
    pre.add_argument("--pretrain-batch-size", type=int, default=None,
                     help="images per process and step, each seen as two views (authors' code: 120; shapes: 32)")
    pre.add_argument("--pretrain-lr", type=float, default=None,
                     help="peak lr (LARS 0.3, authors' code; shapes preset: Adam 1e-3)")
    pre.add_argument("--pretrain-optimizer", default=None, choices=("lars", "adam"),
                     help="LARS (authors' code, SimCLR; the default) or Adam (the shapes preset)")
    pre.add_argument("--weight-decay", type=float, default=1e-6,
                     help="pre-training weight decay of conv and linear weights (authors' code: 1e-6)")
    pre.add_argument("--warmup-epochs", type=float, default=None,
                     help="linear lr warm-up before the cosine decay (default: 10 %% of --pretrain-epochs)")
    pre.add_argument("--pretrain-img-size", type=int, default=None,
                     help="side of the views in px (authors' config: 224; default: --img-size)")
    pre.add_argument("--pretrain-source-size", type=int, default=None,
                     help="--pretrain-data shapes: side of the images before the crop (default: --pretrain-img-size)")
    pre.add_argument("--temperature", type=float, default=0.1, help="NT-Xent temperature tau (authors' config: 0.1)")
    pre.add_argument("--projection-hidden-dim", type=int, default=512, help="projection head hidden width (code: 512)")
    pre.add_argument("--projection-dim", type=int, default=128, help="projection head output width d (code: 128)")
    pre.add_argument("--color-strength", type=float, default=None,
                     help="colour distortion strength s (authors' config: 1.0; shapes preset: 0.5)")
    pre.add_argument("--blur-prob", type=float, default=0.5, help="probability of the Gaussian blur (SimCLR v1: 0.5)")
    pre.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                     help="area range of the random resized crop (SimCLR: 0.08 1; shapes preset: 0.3 1)")
    pre.add_argument("--pretrain-init", default="none",
                     help="encoder before pre-training: none (authors' code, default) | imagenet | imagenet:PATH")
    pre.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=True,
                     help="SyncBatchNorm under torchrun on CUDA, both stages (SimCLR's global BN, CHOICE C5); "
                          "--no-sync-bn: per process")

    fine = parser.add_argument_group("fine-tuning (Sec. 2.2, 3.1)")
    fine.add_argument("--init", default=None,
                      help="--stage finetune: encoder init none (the paper's fully supervised baseline; the default) "
                           "| imagenet | imagenet:PATH | simclr:PATH (a pre-training checkpoint, e.g. OUT/pretrain.pt)"
                           "; --stage both always starts from its own OUT/pretrain.pt")
    fine.add_argument("--decoder-channels", type=int, nargs=5, default=(256, 128, 64, 32, 16), metavar="C",
                      help="U-Net decoder widths, deepest first (smp Unet, the authors' code: 256 128 64 32 16)")
    fine.add_argument("--loss", default="bce", choices=("bce", "dice", "focal"),
                      help="fine-tuning loss (paper: bce, the default; the authors' code also offers dice and focal)")
    fine.add_argument("--select-by", default="val_loss", choices=("val_loss", "val_iou"),
                      help="best.pt: lowest validation loss (report; default) or highest validation IoU (code)")
    fine.add_argument("--dev-split", type=float, default=0.8,
                      help="development fraction of the whole set (Sec. 3.1: 0.8, the default, 0.5, 0.2)")
    fine.add_argument("--test-fraction", type=float, default=0.2, help="fixed test fraction (Sec. 3.1: 0.2)")
    fine.add_argument("--val-fraction", type=float, default=0.1,
                      help="validation fraction of the dev set (Sec. 3.1: 90/10 train/val, so 0.1)")
    fine.add_argument("--train-split", default=None,
                      help="--data pets: the Pet reader's split that trains (train = 90 %% of trainval, val, trainval, "
                           "test, all; SPLIT:F = a seeded fraction F of SPLIT, the roles naming SPLIT plainly get the "
                           "rest) instead of Sec. 3.1's protocol; giving any of the three makes the others train, "
                           "val, test")
    fine.add_argument("--val-split", default=None, help="--data pets: the split that picks best.pt (or SPLIT:F)")
    fine.add_argument("--test-split", default=None,
                      help="--data pets: the split scored as the test result and by --eval-only (or SPLIT:F)")
    fine.add_argument("--split-seed", type=int, default=0,
                      help="seed of the split permutation (the fixed test set) and of --pretrain-limit's draw")
    fine.add_argument("--border", default="foreground", choices=("foreground", "background", "ignore"),
                      help="Pet trimap class 3 (the border) becomes this (CHOICE C8; default foreground)")
    fine.add_argument("--synthetic-images", type=int, default=384,
                      help="images of the synthetic labelled pool and of its unlabelled pre-training set")
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    args.given = sorted({action.dest for action in parser._actions for option in action.option_strings
                         for token in argv if token == option or token.startswith(option + "=")})
    apply_presets(args)
    check_args(parser, args)
    check_run_arguments(parser, args, SCRIPT)
    if args.stage == "both":
        args.init = f"simclr:{os.path.join(args.out, 'pretrain.pt')}"  # CHOICE C7: the last pre-training epoch
    elif args.init is None:
        args.init = "none"
    return args


def apply_presets(args):
    """Data-dependent defaults: the paper's settings for real data, a CPU preset for the synthetic set (CHOICE C14)."""
    synthetic = args.data == "shapes"
    presets = dict(img_size=(48, 224), epochs=(10, 60), batch_size=(16, 32), lr=(1e-3, 1e-4),
                   arch=("resnet18", "resnet50"), pretrain_data=("shapes", "cifar10"), pretrain_epochs=(6, 20),
                   pretrain_batch_size=(32, 120), pretrain_optimizer=("adam", "lars"),
                   crop_scale=((0.3, 1.0), (0.08, 1.0)), color_strength=(0.5, 1.0))
    for name, (shapes_value, paper_value) in presets.items():
        if getattr(args, name) is None:
            setattr(args, name, shapes_value if synthetic else paper_value)
    args.crop_scale = tuple(args.crop_scale)
    args.decoder_channels = tuple(args.decoder_channels)
    if args.pretrain_lr is None:
        args.pretrain_lr = 0.3 if args.pretrain_optimizer == "lars" else 1e-3
    if args.pretrain_img_size is None:
        args.pretrain_img_size = args.img_size
    if args.pretrain_source_size is None:
        args.pretrain_source_size = args.pretrain_img_size
    if args.warmup_epochs is None:
        args.warmup_epochs = 0.1 * args.pretrain_epochs
    if args.pretrain_root is None and args.pretrain_data in ("cifar10", "catsdogs", "pets"):
        folder = {"cifar10": "cifar10", "catsdogs": "catsdogs", "pets": "oxford-iiit-pet"}[args.pretrain_data]
        args.pretrain_root = os.path.join("data", folder)


def check_args(parser, args):
    """Refuse impossible values and combinations that would be ignored: one `error:` line naming the flag."""
    if args.pretrain_source_size < 8:
        parser.error(f"--pretrain-source-size must be at least 8 px, got {args.pretrain_source_size}")
    for flag in ("img_size", "pretrain_img_size"):
        if getattr(args, flag) < 32:
            parser.error(f"--{flag.replace('_', '-')} must be at least 32 px (the ResNet downsamples by 32), "
                         f"got {getattr(args, flag)}")
    for flag in ("epochs", "batch_size", "pretrain_epochs", "pretrain_batch_size", "synthetic_images"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if args.pretrain_limit is not None and args.pretrain_limit < 1:
        parser.error(f"--pretrain-limit must be a positive number of images, got {args.pretrain_limit}")
    if args.batch_size == 1 and args.img_size < 64:
        # layer4 of the ResNet is (img_size / 32)^2 = 1 value per channel: BatchNorm cannot train on one value
        parser.error(f"--batch-size 1 needs --img-size 64 or more (at {args.img_size} px the ResNet's last "
                     f"BatchNorm sees one value per channel); pass --batch-size 2 or a larger --img-size")
    for flag in ("lr", "pretrain_lr", "temperature"):
        if not getattr(args, flag) > 0:
            parser.error(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.weight_decay < 0 or args.warmup_epochs < 0:
        parser.error("--weight-decay and --warmup-epochs must not be negative")
    if not 0 < args.test_fraction < 1:
        parser.error(f"--test-fraction must be between 0 and 1 (exclusive), got {args.test_fraction}")
    if not 0 < args.dev_split <= 1 - args.test_fraction + 1e-9:
        parser.error(f"--dev-split must be in (0, 1 - test fraction = {1 - args.test_fraction:g}], got "
                     f"{args.dev_split}")
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be between 0 and 1 (exclusive), got {args.val_fraction}")
    if args.train_split or args.val_split or args.test_split:
        if args.data != "pets":
            parser.error("--train-split, --val-split and --test-split name splits of --data pets; the synthetic "
                         "pool uses Sec. 3.1's protocol (--dev-split)")
        try:
            plan_splits({"train": args.train_split or "train", "val": args.val_split or "val",
                         "test": args.test_split or "test"})
        except DatasetError as error:
            parser.error(str(error))
    if not 0 < args.crop_scale[0] <= args.crop_scale[1] <= 1:
        parser.error(f"--crop-scale needs 0 < LO <= HI <= 1, got {list(args.crop_scale)}")
    if not 0 <= args.blur_prob <= 1 or args.color_strength < 0:
        parser.error("--blur-prob must be in [0, 1] and --color-strength must not be negative")
    if min(args.decoder_channels) < 1 or min(args.projection_dim, args.projection_hidden_dim) < 1:
        parser.error("--decoder-channels, --projection-dim and --projection-hidden-dim must be positive")
    for flag in ("init", "pretrain_init"):
        spec = getattr(args, flag)
        if spec is None:
            continue
        kind = spec.split(":", 1)[0]
        allowed = ("none", "imagenet", "simclr") if flag == "init" else ("none", "imagenet")
        if kind not in allowed or (kind == "simclr" and ":" not in spec) or (kind == "none" and spec != "none"):
            forms = "none | imagenet | imagenet:PATH" + (" | simclr:PATH (a pre-training checkpoint)"
                                                         if flag == "init" else "")
            parser.error(f"--{flag.replace('_', '-')} must be {forms}, got {spec!r}")
    if args.pretrain_data == "folder" and args.pretrain_root is None and args.stage != "finetune":
        parser.error("--pretrain-data folder needs --pretrain-root DIR (every image under DIR is used)")
    if args.init is not None and args.stage != "finetune":
        parser.error("--init is read by --stage finetune only: --stage both fine-tunes the encoder it "
                     "pre-trains (OUT/pretrain.pt) and --stage pretrain fine-tunes nothing; use --pretrain-init")
    if args.eval_only and args.stage == "pretrain":
        parser.error("--eval-only scores a fine-tuned model: drop --stage pretrain")


def main(args):
    check_run_dir(args, SCRIPT)
    runtime = setup_runtime(args, amp_on_cpu=True)  # bf16 on a CPU held test IoU within the seed spread (README)
    try:
        if args.eval_only:
            return evaluate_checkpoint(args, runtime)
        return run(args, runtime)
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
