"""Tests for selective_mim.py, in the file's order: masking, model, losses, selective scoring, runs, CLI, real data.

Slow, obvious loop versions of the vectorised code live here as references. Sizes are tiny (CPU, 2 cores).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision import tv_tensors

import selective_mim as sm

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# A run small enough for a loaded 2-core CPU: 40 px, 4 x 4 patch grid, ResNet-18 U-Net.
TINY = ["--img-size", "40", "--num-patches", "16", "--msssim-window", "3", "--arch", "resnet18-unet", "--workers", "0",
        "--pretrain-batch-size", "4", "--batch-size", "4"]
# The run contract (tests/test_contract.py): both stages, 2 + 2 pre-training epochs, 2 downstream epochs, seconds.
CONTRACT_TINY = TINY + ["--limit", "12", "--partitions", "2", "--pretrain-epochs", "2", "--epochs", "2"]
# One step per phase for the torchrun equivalence test (2 processes with these batches vs 1 with twice them):
# 2 partitions of 8 images (no reconstruction validation; partition 1 scored by both ranks), 16 downstream images
CONTRACT_ONE_STEP = TINY[:-4] + ["--limit", "16", "--pretrain-val-fraction", "0", "--partitions", "2",
                                 "--pretrain-epochs", "1", "--epochs", "1", "--pretrain-batch-size", "4",
                                 "--batch-size", "8"]
# Reads --data folder from the --data-root the contract test supplies (pre-training on its images folder).
CONTRACT_FOLDER = TINY + ["--data", "folder", "--partitions", "1", "--pretrain-epochs", "1", "--epochs", "1"]


# --- masking ---

def test_grid_256_gives_441_patches_with_a_merged_last_band():
    grid = sm.patch_grid(256, 256, 512)
    assert (grid.rows, grid.cols, grid.num_patches) == (21, 21, 441)
    sizes = torch.bincount(grid.row_bands).tolist()
    assert sizes == [12] * 20 + [16]  # step ceil(256 / sqrt(512)) = 12; the 4-px remainder joins the last band


@pytest.mark.parametrize("height, width, num_patches, rows, cols", [
    (224, 224, 512, 22, 22),  # step 10, 4-px remainder merged
    (256, 512, 512, 21, 22),  # non-square: ~22 bands per axis whatever the aspect
    # By hand: step = ceil(70 / 8) = 9, 70 = 7 * 9 + 7 and 7 >= 4.5 -> a band of its own, 8 bands;
    # step = ceil(40 / 8) = 5, 40 = 8 * 5 -> 8 bands.
    (70, 40, 64, 8, 8),
])
def test_grid_rule_on_other_sizes(height, width, num_patches, rows, cols):
    grid = sm.patch_grid(height, width, num_patches)
    assert (grid.rows, grid.cols) == (rows, cols)
    for bands, count in ((grid.row_bands, grid.rows), (grid.col_bands, grid.cols)):
        assert bands[0] == 0 and bands[-1] == count - 1
        assert torch.all(bands.diff() >= 0) and torch.all(bands.diff() <= 1)  # contiguous bands in order
    if (height, width) == (70, 40):
        assert torch.bincount(grid.row_bands).tolist() == [9] * 7 + [7]


def test_to_pixels_matches_a_loop():
    grid = sm.patch_grid(30, 45, 16)
    mask = torch.rand(3, grid.num_patches) < 0.5
    pixels = grid.to_pixels(mask)
    assert pixels.shape == (3, 30, 45)
    for b in range(3):
        for y in range(30):
            for x in range(45):
                assert pixels[b, y, x] == mask[b, grid.row_bands[y] * grid.cols + grid.col_bands[x]]


def test_random_masks_from_given_noise_are_the_per_image_draws():
    """The training loop ranks one noise row per image (its own generator) in one batched call: the same masks as
    drawing each image alone, so they do not depend on the batch or the rank."""
    generators = [lambda i=i: torch.Generator().manual_seed(100 + i) for i in range(5)]
    noise = torch.cat([torch.rand(1, 16, generator=make()) for make in generators])
    batched = sm.random_masks(5, 16, 0.5, noise=noise)
    alone = torch.cat([sm.random_masks(1, 16, 0.5, make()) for make in generators])
    assert torch.equal(batched, alone) and batched.sum(1).eq(8).all()
    assert not torch.equal(batched, sm.random_masks(5, 16, 0.5, torch.Generator().manual_seed(100)))


def test_random_masks_hide_exactly_half_and_repeat_with_the_seed():
    masks = sm.random_masks(64, 441, 0.5, torch.Generator().manual_seed(3))
    assert masks.dtype == torch.bool and masks.shape == (64, 441)
    assert torch.all(masks.sum(1) == 220)  # int(441 * 0.5), as the authors' int(n * 0.5)
    again = sm.random_masks(64, 441, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(masks, again)
    assert len({tuple(row.tolist()) for row in masks}) == 64  # every sample its own mask
    assert torch.all(sm.random_masks(5, 10, 0.75).sum(1) == 7)


def test_top_patches_hides_the_highest_scores():
    scores = torch.randn(4, 25)
    mask = sm.top_patches(scores, 0.5)
    assert torch.all(mask.sum(1) == 12)
    for b in range(4):
        ranked = sorted(range(25), key=lambda i: -scores[b, i].item())
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == set(ranked[:12])


def test_apply_mask_fills_the_mean_colour():
    images = torch.randn(2, 3, 8, 8)
    hidden = torch.zeros(2, 8, 8, dtype=torch.bool)
    hidden[0, :4] = True
    out = sm.apply_mask(images, hidden)
    assert torch.all(out[0, :, :4] == 0) and torch.equal(out[0, :, 4:], images[0, :, 4:])
    assert torch.equal(out[1], images[1])


@pytest.mark.parametrize("num_items, partitions", [(100, 10), (17, 3), (5, 5), (12330, 10)])
def test_partitions_are_disjoint_equal_and_cover_the_set(num_items, partitions):
    parts = sm.partition_indices(num_items, partitions)
    assert len(parts) == partitions
    flat = torch.cat(parts).tolist()
    assert sorted(flat) == list(range(num_items))  # covering, and no index twice (disjoint)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


class Canvas(torch.utils.data.Dataset):
    """One uint8 image whose patches are white where `mask` hides them and black elsewhere."""

    def __init__(self, grid, mask):
        self.image = (grid.to_pixels(mask[None])[0].to(torch.uint8) * 255).expand(3, -1, -1).clone()

    def __len__(self):
        return 1

    def __getitem__(self, index):
        return tv_tensors.Image(self.image)


def test_pretrain_images_crop_and_flip_the_mask_with_the_image():
    grid = sm.patch_grid(48, 48, 16)
    mask = sm.random_masks(1, 16, 0.5, torch.Generator().manual_seed(1))
    dataset = sm.PretrainImages(Canvas(grid, mask), [0], 48, 16, list(mask), augment=True)
    torch.manual_seed(0)
    for _ in range(10):  # random crops, flips and jitter
        image, hidden = dataset[0]
        assert image.shape == (3, 48, 48) and hidden.shape == (48, 48) and hidden.dtype == torch.bool
        white = sm.to_unit(image[None])[0].mean(0) > 0.5
        flat = hidden.float()[None, None]  # pixels 2+ px away from a mask edge (the image's edges are interpolated)
        interior = (F.max_pool2d(flat, 5, 1, 2) == -F.max_pool2d(-flat, 5, 1, 2))[0, 0]
        assert interior.float().mean() > 0.5
        assert torch.equal(hidden[interior], white[interior])
    image, hidden = sm.PretrainImages(Canvas(grid, mask), [0], 48, 16, list(mask), augment=False)[0]  # exact
    assert torch.equal(hidden, grid.to_pixels(mask)[0])


class Picture(torch.utils.data.Dataset):
    """One random uint8 image of a given size (an image-only base)."""

    def __init__(self, height, width, count=1):
        self.images = [tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8,
                                                      generator=torch.Generator().manual_seed(i))) for i in range(count)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def test_canvas_keeps_the_aspect_and_its_grid_is_not_square():
    """CHOICE C6: shortest side 40, a 60 x 120 image becomes a 40 x 80 canvas with its own grid: sqrt(16) = 4 bands
    per axis (authors' rule), steps ceil(40 / 4) = 10 and ceil(80 / 4) = 20, so 10 x 20 patches."""
    grid = sm.patch_grid(40, 80, 16)
    assert (grid.rows, grid.cols) == (4, 4) and torch.bincount(grid.col_bands).tolist() == [20] * 4
    mask = sm.random_masks(1, grid.num_patches, 0.5, torch.Generator().manual_seed(0))
    image, hidden = sm.PretrainImages(Picture(60, 120), [0], 40, 16, list(mask), mode="canvas")[0]
    assert image.shape == (3, 40, 80) and torch.equal(hidden, grid.to_pixels(mask)[0])
    crop, crop_hidden = sm.PretrainImages(Picture(60, 120), [0], 40, 16, list(mask), augment=True)[0]
    assert crop.shape == (3, 40, 40) and crop_hidden.shape == (40, 40)  # training crops are squares
    # Evaluation keeps the aspect too: a 64 x 128 image and its label come back 40 x 80, not squashed.
    image = tv_tensors.Image(torch.zeros(3, 64, 128, dtype=torch.uint8))
    label = tv_tensors.Mask(torch.zeros(64, 128, dtype=torch.uint8))
    image, label = sm.eval_transform(40)(image, label)
    assert image.shape == (3, 40, 80) and label.shape == (40, 80)


def test_copy_masks_count_seed_and_cover_all():
    masks = sm.copy_masks(64, 5, 441, 0.5, torch.Generator().manual_seed(3))
    assert masks.shape == (64, 5, 441) and torch.all(masks.sum(2) == 220)
    # The same draws as random_masks on the flattened copies (one noise tensor, argsort per copy).
    assert torch.equal(masks.flatten(0, 1), sm.random_masks(320, 441, 0.5, torch.Generator().manual_seed(3)))
    assert (masks.sum(1) == 0).any()  # independent draws leave some patches never hidden (~3 %)
    covered = sm.copy_masks(64, 5, 441, 0.5, torch.Generator().manual_seed(3), cover_all=True)
    assert torch.all(covered.sum(2) == 220) and torch.all(covered.sum(1) >= 1)
    again = sm.copy_masks(64, 5, 441, 0.5, torch.Generator().manual_seed(3), cover_all=True)
    assert torch.equal(covered, again)
    with pytest.raises(sm.UsageError, match="--cover-all"):
        sm.copy_masks(1, 2, 16, 0.25, cover_all=True)  # 2 copies x 4 hidden cannot cover 16 patches


# --- model ---

def test_preset_parameter_counts():
    counts = {name: sum(p.numel() for p in sm.build_model(3, name).parameters()) for name in sm.PRESETS}
    assert counts == {"resnet34-unet": 24_436_659, "resnet18-unet": 14_328_499}  # the numbers in PRESETS' comments


@pytest.mark.parametrize("preset", sorted(sm.PRESETS))
def test_model_shapes_at_non_square_sizes(preset):
    model = sm.build_model(4, preset).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 40, 72)).shape == (2, 4, 40, 72)
        assert model(torch.randn(3, 3, 37, 50)).shape == (3, 4, 37, 50)  # not a multiple of 32: padded, cropped


def test_transfer_weights_copies_everything_but_the_head():
    torch.manual_seed(0)
    pretrained = sm.build_model(3, "resnet18-unet")
    torch.manual_seed(1)
    downstream = sm.build_model(5, "resnet18-unet")
    head_before = downstream.head.weight.clone()
    copied, total = sm.transfer_weights(pretrained.state_dict(), downstream)
    assert total == len(downstream.state_dict()) and copied == total - 2  # head.weight, head.bias
    target = downstream.state_dict()
    for name, tensor in pretrained.state_dict().items():
        if name.startswith("head."):
            continue
        assert torch.equal(target[name], tensor), name
    assert torch.equal(downstream.head.weight, head_before) and downstream.head.weight.shape[0] == 5
    with pytest.raises(sm.UsageError, match="same --arch"):
        sm.transfer_weights(pretrained.state_dict(), sm.build_model(5, "resnet34-unet"))


def test_imagenet_encoder_loads_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = sm.build_model(3, "resnet18-unet")
    count = sm.load_imagenet_encoder(model, str(path))
    assert count == len(reference.state_dict()) - 2  # fc.weight, fc.bias dropped
    assert torch.equal(model.encoder.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, reference.layer4[1].bn2.running_var)


# --- losses ---

def direct_ssim(x, y, window_size, c1=1e-4, c2=9e-4):
    """Textbook SSIM with a Gaussian window (sigma 1.5), valid positions, numpy float64: (C, H, W) -> (ssim, cs)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    g = np.exp(-((np.arange(window_size) - (window_size - 1) / 2) ** 2) / (2 * 1.5 ** 2))
    g2 = np.outer(g, g) / np.outer(g, g).sum()
    wx = np.lib.stride_tricks.sliding_window_view(x, (window_size, window_size), axis=(1, 2))  # (C, h, w, k, k)
    wy = np.lib.stride_tricks.sliding_window_view(y, (window_size, window_size), axis=(1, 2))
    mx, my = (wx * g2).sum((-1, -2)), (wy * g2).sum((-1, -2))
    vx = (wx ** 2 * g2).sum((-1, -2)) - mx ** 2
    vy = (wy ** 2 * g2).sum((-1, -2)) - my ** 2
    cov = (wx * wy * g2).sum((-1, -2)) - mx * my
    cs = (2 * cov + c2) / (vx + vy + c2)
    return (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1) * cs, cs


def direct_ms_ssim(x, y, window_size=11):
    """MS-SSIM written out: 5 scales, 2x2 block means (zero row/column on top/left when a side is odd)."""
    values = []
    for level, weight in enumerate(sm.MS_SSIM_WEIGHTS):
        ssim, cs = direct_ssim(x, y, window_size)
        values.append((ssim if level == 4 else cs).mean(axis=(1, 2)))
        if level < 4:
            x, y = (np.pad(t, ((0, 0), (t.shape[1] % 2, 0), (t.shape[2] % 2, 0))) for t in (x, y))
            x, y = (t[:, :t.shape[1] // 2 * 2, :t.shape[2] // 2 * 2] for t in (x, y))
            x, y = (t.reshape(t.shape[0], t.shape[1] // 2, 2, t.shape[2] // 2, 2).mean((2, 4)) for t in (x, y))
    values = np.maximum(np.stack(values), 1e-6)
    return float(np.prod(values ** np.array(sm.MS_SSIM_WEIGHTS)[:, None], axis=0).mean())


def test_ssim_on_hand_made_images():
    # Constant images a and b: no variance, so cs = 1 and SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    x, y = torch.full((1, 3, 9, 9), 0.2), torch.full((1, 3, 9, 9), 0.6)
    ssim, cs = sm.ssim_maps(x, y, 3)
    assert ssim.shape == (1, 3, 7, 7)
    assert torch.allclose(cs, torch.ones_like(cs))
    assert torch.allclose(ssim, torch.full_like(ssim, 0.2401 / 0.4001), atol=1e-6)
    image = torch.rand(1, 3, 9, 9)
    assert torch.allclose(sm.ssim_maps(image, image, 3)[0], torch.ones(1, 3, 7, 7), atol=1e-5)
    # A 3 x 3 image against its negative, worked through the textbook formula by hand with the Gaussian weights.
    pattern = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    g = torch.exp(-torch.tensor([1.0, 0.0, 1.0]) / (2 * 1.5 ** 2))
    w = torch.outer(g, g) / torch.outer(g, g).sum()
    corner, edge, centre = w[0, 0].item(), w[0, 1].item(), w[1, 1].item()
    mu_x = 4 * edge  # ones on the 4 edge cells
    mu_y = 4 * corner + centre  # the complement
    var_x, var_y = mu_x - mu_x ** 2, mu_y - mu_y ** 2
    cov = 0 - mu_x * mu_y  # x * y = 0 everywhere
    expected = (2 * mu_x * mu_y + 1e-4) / (mu_x ** 2 + mu_y ** 2 + 1e-4) * (2 * cov + 9e-4) / (var_x + var_y + 9e-4)
    got = sm.ssim_maps(pattern.expand(1, 3, 3, 3), (1 - pattern).expand(1, 3, 3, 3), 3)[0]
    assert got.shape == (1, 3, 1, 1)
    assert torch.allclose(got, torch.full_like(got, expected), atol=1e-6)
    assert expected < -0.5  # anti-correlated images: strongly negative SSIM


def test_ms_ssim_equals_a_direct_implementation():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 170, 178, dtype=torch.float64)  # odd sizes at the 2nd and 3rd scale: the padding path
    y = (x + 0.15 * torch.randn_like(x)).clamp(0, 1)
    assert sm.ms_ssim(x, y, 11).item() == pytest.approx(direct_ms_ssim(x[0].numpy(), y[0].numpy()), abs=1e-9)
    assert torch.allclose(sm.ms_ssim(x, x, 11), torch.ones(1, dtype=torch.float64))
    # Constant images: cs = 1 at every scale, so MS-SSIM = luminance term ** 0.1333 (176 = 11 * 16: no padding).
    a, b = torch.full((1, 3, 176, 176), 0.2), torch.full((1, 3, 176, 176), 0.6)
    assert sm.ms_ssim(a, b, 11).item() == pytest.approx((0.2401 / 0.4001) ** 0.1333, rel=1e-5)


def test_reconstruction_loss_values_and_gradient():
    images = torch.randn(2, 3, 40, 40)
    assert sm.reconstruction_loss(images, images, 3).item() == pytest.approx(0.0, abs=1e-5)
    # A constant shift by d in [0, 1] space: L1 = d; the MS-SSIM term is >= 0.
    std = torch.tensor(sm.IMAGENET_STD).view(1, 3, 1, 1)
    shifted = images + 0.1 / std
    unit_l1 = 0.1
    loss = sm.reconstruction_loss(shifted, images, 3).item()
    ms = sm.ms_ssim(sm.to_unit(shifted), sm.to_unit(images), 3).mean().item()
    assert loss == pytest.approx((1 - ms) + unit_l1, abs=1e-5)
    outputs = torch.randn(2, 3, 40, 40, requires_grad=True)
    sm.reconstruction_loss(outputs, images, 3).backward()
    assert torch.isfinite(outputs.grad).all() and outputs.grad.abs().sum() > 0


def test_jaccard_loss_on_hand_made_inputs():
    probs = torch.tensor([[0.8, 0.4, 0.5], [0.2, 0.6, 0.5]])  # (K=2, 3 pixels)
    logits = probs.log().view(1, 2, 1, 3)
    labels = torch.tensor([[[0, 1, 255]]])  # the third pixel is ignored
    # class 0: I = 0.8, U = 0.8 + 0.4 + 1 - 0.8 = 1.4; class 1: I = 0.6, U = 0.2 + 0.6 + 1 - 0.6 = 1.2; smooth 1e-3
    expected = ((1 - 0.801 / 1.401) + (1 - 0.601 / 1.201)) / 2
    assert sm.jaccard_loss(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    # A third class without pixels in the batch contributes 0 but counts in the mean (pytorch-toolbelt).
    logits3 = torch.cat([probs, torch.full((1, 3), 1e-12)]).log().view(1, 3, 1, 3)
    assert sm.jaccard_loss(logits3, labels).item() == pytest.approx(expected * 2 / 3, abs=1e-6)
    perfect = torch.tensor([[10.0, -10.0], [-10.0, 10.0]]).view(1, 2, 1, 2)
    assert sm.jaccard_loss(perfect, torch.tensor([[[0, 1]]])).item() == pytest.approx(0.0, abs=1e-3)


# --- selective scoring ---

def loop_patch_scores(reconstruction, image, grid, window_size=3):
    """Eq. (1) the slow way: crop every patch and score it on its own. (3, H, W) in [0, 1] -> (L,)."""
    scores = []
    row_edges = [int((grid.row_bands == r).nonzero()[0]) for r in range(grid.rows)] + [len(grid.row_bands)]
    col_edges = [int((grid.col_bands == c).nonzero()[0]) for c in range(grid.cols)] + [len(grid.col_bands)]
    for r in range(grid.rows):
        for c in range(grid.cols):
            crop = (slice(None), slice(row_edges[r], row_edges[r + 1]), slice(col_edges[c], col_edges[c + 1]))
            x, y = reconstruction[crop].numpy(), image[crop].numpy()
            ssim = direct_ssim(x, y, window_size)[0].mean()
            scores.append((1 - ssim) + np.abs(x - y).mean())
    return torch.tensor(scores)


def test_score_patches_equals_the_per_patch_loop():
    torch.manual_seed(0)
    grid = sm.patch_grid(29, 43, 16)  # 4 x 4 bands with merged remainders: patches of unequal size
    assert len(set(torch.bincount(grid.row_bands).tolist())) > 1
    images = torch.rand(3, 3, 29, 43, dtype=torch.float64)
    reconstructions = (images + 0.2 * torch.randn_like(images)).clamp(0, 1)
    got = sm.score_patches(reconstructions, images, grid, 3)
    assert got.shape == (3, grid.num_patches)
    for n in range(3):
        assert torch.allclose(got[n], loop_patch_scores(reconstructions[n], images[n], grid), atol=1e-10)


def test_batched_selective_scoring_equals_a_per_image_loop():
    torch.manual_seed(0)
    model = sm.build_model(3, "resnet18-unet").eval()
    grid = sm.patch_grid(40, 48, 16)
    images = torch.randn(2, 3, 40, 48)
    samples, ratio = 5, 0.5
    copy_masks = sm.random_masks(2 * samples, grid.num_patches, ratio, torch.Generator().manual_seed(7))
    losses = torch.zeros(2, samples, grid.num_patches)
    for b in range(2):
        for s in range(samples):  # one image, one copy per forward pass, one patch at a time
            with torch.no_grad():
                reconstruction = model(sm.apply_mask(images[b:b + 1], grid.to_pixels(copy_masks[b * samples + s][None])))
            losses[b, s] = loop_patch_scores(sm.to_unit(reconstruction)[0].double(),
                                             sm.to_unit(images[b:b + 1])[0].double(), grid).float()
    for aggregation in ("all-mean", "hidden-mean", "hidden-sum", "all-sum"):
        scores, mask, hide_count = sm.selective_masks(model, images, grid, samples, ratio, torch.Generator().manual_seed(7),
                                          aggregation)
        for b in range(2):
            total, count = torch.zeros(grid.num_patches), torch.zeros(grid.num_patches)
            for s in range(samples):
                for n in range(grid.num_patches):
                    if aggregation.startswith("all") or copy_masks[b * samples + s, n]:
                        total[n] += losses[b, s, n]
                        count[n] += 1
            expected = total / count.clamp(min=1) if aggregation.endswith("mean") else total
            assert torch.equal(hide_count[b], copy_masks[b * samples:(b + 1) * samples].sum(0))
            assert torch.allclose(scores[b], expected, atol=1e-4), aggregation
            hardest = expected.argsort(descending=True)[:8]  # the selective mask hides the highest scores
            assert set(torch.nonzero(mask[b]).flatten().tolist()) == set(hardest.tolist()), aggregation


def test_scoring_runs_all_copies_in_one_forward_pass_without_gradients():
    model = sm.build_model(3, "resnet18-unet").eval()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append((inputs[0].shape, torch.is_grad_enabled())))
    grid = sm.patch_grid(40, 40, 16)
    scores, mask, _ = sm.selective_masks(model, torch.randn(4, 3, 40, 40), grid, samples=5)
    assert calls == [(torch.Size([20, 3, 40, 40]), False)]
    assert mask.shape == (4, 16) and torch.all(mask.sum(1) == 8) and scores.shape == (4, 16)


def test_warmup_cosine_schedule():
    factor = sm.warmup_cosine(20, 10)
    assert factor(0) == pytest.approx(0.01) and factor(5) == pytest.approx(0.505)
    assert factor(10) == pytest.approx(1.0) and factor(15) == pytest.approx(0.505) and factor(20) == pytest.approx(0.01)


class BadRegion(torch.nn.Module):
    """A stub reconstruction model: returns the true image, except a noisy block in one region."""

    def __init__(self, image, region):
        super().__init__()
        self.image, self.region = image, region

    def forward(self, inputs):
        out = self.image.expand(len(inputs), -1, -1, -1).clone()
        rows, cols = self.region
        out[:, :, rows, cols] = torch.randn(out[:, :, rows, cols].shape, generator=torch.Generator().manual_seed(0))
        return out


@pytest.mark.parametrize("aggregation", ["all-mean", "hidden-mean", "hidden-sum", "all-sum"])
def test_a_region_reconstructed_badly_gets_hidden(aggregation):
    grid = sm.patch_grid(40, 80, 16)  # 4 x 4 patches of 10 x 20
    image = torch.randn(1, 3, 40, 80)
    bad = (slice(0, 20), slice(0, 40))  # the top-left 2 x 2 = 4 patches of 16; hiding half = 8 patches
    scores, mask, _ = sm.selective_masks(BadRegion(image, bad), image, grid, 5, 0.5,
                                         torch.Generator().manual_seed(1), aggregation, cover_all=True)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:2, :2] = True
    assert mask.sum() == 8 and torch.all(mask[0][region.flatten()])  # every bad patch is among the hidden ones


def test_hide_count_agreement_by_hand():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    hide_count = torch.tensor([[5, 4, 0, 1]])
    mask = sm.top_patches(scores, 0.5)  # patches 0 and 1
    overlap, spearman, never = sm.hide_count_agreement(scores, mask, hide_count)
    assert overlap.item() == 1.0 and never.item() == 0.25
    # ranks of scores 3 2 1 0, of counts 3 2 0 1: Spearman = 1 - 6 * 2 / (4 * 15) = 0.8
    assert spearman.item() == pytest.approx(0.8)
    overlap, _, _ = sm.hide_count_agreement(-scores, sm.top_patches(-scores, 0.5), hide_count)
    assert overlap.item() == 0.0


def test_all_ignore_split_is_an_error_not_nan():
    runtime = sm.Runtime(torch.device("cpu"))
    args = sm.get_args(TINY + ["--out", "unused"])
    loader = [(torch.randn(1, 3, 40, 40), torch.full((1, 40, 40), 255))]
    with pytest.raises(sm.DatasetError, match="no labelled pixel"):
        sm.evaluate_segmentation(sm.build_model(5, "resnet18-unet"), loader, 5, args, runtime, "test")
    with pytest.raises(sm.DatasetError, match="no labelled pixel"):  # an empty split too
        sm.evaluate_segmentation(sm.build_model(5, "resnet18-unet"), [], 5, args, runtime, "test")


# --- runs ---

def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def tensor_hash(state):
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def test_two_stage_run_scores_with_the_previous_model_and_transfers_it(tmp_path, monkeypatch):
    """One run, three spies: (1) the model that scores partition 1 hashes equal to the model saved after partition
    0's last epoch (not a fresh one, not a later one); (2) the downstream model at its first step equals
    pretrained.pt in every tensor but the head; (3) the run learns (loss falls) and writes its files."""
    out = str(tmp_path / "run")
    saved, scored, first_step = [], [], []
    original_save, original_score, original_step = sm.save_checkpoint, sm.score_partition, sm.train_step

    def save(path, state, *args, **kwargs):
        if "partition" in state:
            saved.append(((state["stage"], state["partition"], state["epoch"]), tensor_hash(state["model"])))
        return original_save(path, state, *args, **kwargs)

    def score(model, *args, **kwargs):
        scored.append((args[-1], tensor_hash(model.state_dict())))
        return original_score(model, *args, **kwargs)

    def step(model, optimizer, inputs, targets, loss_fn, runtime):
        if getattr(loss_fn, "func", loss_fn) is sm.jaccard_loss and not first_step:
            first_step.append({k: v.clone() for k, v in sm.unwrap(model).state_dict().items()})
        return original_step(model, optimizer, inputs, targets, loss_fn, runtime)

    monkeypatch.setattr(sm, "save_checkpoint", save)
    monkeypatch.setattr(sm, "score_partition", score)
    monkeypatch.setattr(sm, "train_step", step)
    results = sm.main(sm.get_args(CONTRACT_TINY + ["--out", out, "--pretrain-epochs", "3", "--epochs", "3"]))
    after_partition0 = dict(saved)[("pretrain", 0, 3)]
    assert scored == [(1, after_partition0)]
    assert after_partition0 != dict(saved)[("pretrain", 0, 2)]  # the hash tells the epochs apart
    pretrained = sm.load_checkpoint(os.path.join(out, "pretrained.pt"), sm.SCRIPT)["model"]
    assert "encoder.layer1.1.conv1.weight" in pretrained and "encoder.layer1.2.conv1.weight" not in pretrained  # --arch
    assert tensor_hash(pretrained) == dict(saved)[("pretrain", 1, 3)]
    start = first_step[0]
    for key, value in pretrained.items():
        if key.startswith("head."):
            assert value.shape != start[key].shape  # 3 reconstruction channels vs K classes
        else:
            assert torch.equal(value, start[key]), key
    log = records(out)
    first = [r for r in log if r["stage"] == "pretrain" and r["partition"] == 0]
    assert first[-1]["rec_loss"] < first[0]["rec_loss"]
    score_record = [r for r in log if r["stage"] == "score"]
    assert len(score_record) == 1 and score_record[0]["hidden_per_image"] == 8 and score_record[0]["images"] == 6
    for key in ("hide_count_overlap", "hide_count_spearman", "never_hidden"):
        assert 0 <= abs(score_record[0][key]) <= 1
    assert set(results["test"]) >= {"miou", "per_class_iou", "pixel_acc", "chance_miou"}
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "pretrained.pt", "results.json",
                 "samples/pretrain_partition0_epoch_003.png", "samples/pretrain_partition1_epoch_003.png",
                 f"samples/finetune_epoch_{results['best_epoch']:03d}.png"):
        assert os.path.exists(os.path.join(out, name)), name
    # --eval-only scores best.pt on the test split with the same metric names as results.json.
    evaluated = sm.main(sm.get_args(CONTRACT_TINY + ["--out", out, "--eval-only"]))
    stored = json.load(open(os.path.join(out, "eval_test.json")))
    assert stored["checkpoint"] == os.path.join(out, "best.pt") and set(stored["test"]) == set(results["test"])
    assert evaluated["test"]["miou"] == pytest.approx(results["test"]["miou"])


def test_selective_partition_trains_on_its_stored_masks_and_images(tmp_path, monkeypatch):
    """With augmentation off, every input of partition 1 is its own image (one of partition 1's training images)
    with exactly the pixels of its stored selective mask filled with the mean colour (0)."""
    out = str(tmp_path / "run")
    argv = TINY + ["--limit", "12", "--partitions", "2", "--pretrain-epochs", "1", "--stage", "pretrain",
                   "--no-augment", "--out", out]
    batches, original = [], sm.train_step
    monkeypatch.setattr(sm, "train_step", lambda model, optimizer, inputs, targets, *rest: (
        batches.append((inputs.clone(), targets.clone())), original(model, optimizer, inputs, targets, *rest))[1])
    args = sm.get_args(argv)
    sm.main(args)
    state = sm.load_checkpoint(os.path.join(out, "last.pt"), sm.SCRIPT)
    assert (state["stage"], state["partition"]) == ("pretrain", 1)
    base = sm.build_dataset("shapes", None, "unlabeled", transform=sm.identity, image_only=True, limit=12,
                            image_size=40)[0]
    train_ids = sm.partition_indices(12, 2)[1].tolist()[:5]  # 6 images, 10 % (one) held out for validation
    plain = sm.PretrainImages(base, train_ids, 40, 16, augment=False)
    canvases = [plain[i][0] for i in range(len(train_ids))]
    grid = sm.patch_grid(40, 40, 16)
    inputs, targets = batches[-1]  # the last batch belongs to partition 1
    assert len(inputs) == 4
    for image, target in zip(inputs, targets):
        owner = [i for i, canvas in enumerate(canvases) if torch.equal(canvas, target)]
        assert len(owner) == 1  # the target is one of partition 1's own training images
        hidden = grid.to_pixels(state["masks"]["train"][owner[0]][None])[0]
        assert torch.all(image[:, hidden] == 0) and torch.equal(image[:, ~hidden], target[:, ~hidden])
        assert 0 < hidden.float().mean() < 1


RESUME = CONTRACT_TINY


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    sm.main(sm.get_args(RESUME + ["--out", out]))
    yield out
    shutil.rmtree(Path(out).parent)


class Crash(Exception):
    pass


def without_time(log):
    return [{k: v for k, v in r.items() if k != "time"} for r in log]


@pytest.mark.parametrize("crash_at, workers", [("epoch-3", "0"), ("score", "0"), ("epoch-4", "0"), ("epoch-5", "1")],
                         ids=["end-of-partition0", "while-scoring", "in-selective-partition", "in-finetune-worker"])
def test_resume_is_exact(straight_run, tmp_path, monkeypatch, crash_at, workers):
    """Crash, then --resume: the weights, best.pt and the metrics records equal the straight run's. With a worker
    process against the straight run's main-process loading: augmentations are seeded per item."""
    out = str(tmp_path / "run")
    argv = RESUME + ["--out", out, "--workers", workers]
    epochs, score = sm.train_one_epoch, sm.score_partition
    calls = []

    def crashing_epoch(*args, **kwargs):
        calls.append(1)
        if crash_at == f"epoch-{len(calls)}":
            raise Crash
        return epochs(*args, **kwargs)

    def crashing_score(*args, **kwargs):
        if crash_at == "score":
            raise Crash
        return score(*args, **kwargs)

    monkeypatch.setattr(sm, "train_one_epoch", crashing_epoch)
    monkeypatch.setattr(sm, "score_partition", crashing_score)
    with pytest.raises(Crash):
        sm.main(sm.get_args(argv))
    monkeypatch.setattr(sm, "train_one_epoch", epochs)
    monkeypatch.setattr(sm, "score_partition", score)
    if crash_at == "epoch-4":  # inside the selective partition: its exact masks travel with the checkpoint
        state = sm.load_checkpoint(os.path.join(out, "last.pt"), sm.SCRIPT)
        assert (state["stage"], state["partition"], state["epoch"]) == ("pretrain", 1, 1)
        assert all(m.dtype == torch.bool and m.sum() == 8 for m in state["masks"]["train"])
    sm.main(sm.get_args(argv + ["--resume"]))
    for name in ("pretrained.pt", "last.pt", "best.pt"):
        expected, got = (sm.load_checkpoint(os.path.join(d, name), sm.SCRIPT)["model"] for d in (straight_run, out))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    assert without_time(records(out)) == without_time(records(straight_run))
    assert json.load(open(os.path.join(out, "results.json")))["test"] == \
        json.load(open(os.path.join(straight_run, "results.json")))["test"]


def test_scoring_does_not_depend_on_batch_or_rank(monkeypatch):
    """Each image's copies come from its own generator: the masks of a partition are the same scored in one batch
    or one image at a time (so 1 process and torchrun agree)."""
    base = sm.build_dataset("shapes", None, "unlabeled", transform=sm.identity, image_only=True, limit=6,
                            image_size=40)[0]
    torch.manual_seed(0)
    model = sm.build_model(3, "resnet18-unet")
    args = sm.get_args(TINY + ["--out", "unused"])
    runtime = sm.Runtime(torch.device("cpu"))
    together, _ = sm.score_partition(model, base, list(range(6)), args, runtime, 1)
    args.pretrain_batch_size = 1
    alone, record = sm.score_partition(model, base, list(range(6)), args, runtime, 1)
    assert all(torch.equal(a, b) for a, b in zip(together, alone)) and len(alone) == 6
    assert record["aggregation"] == "all-mean"


# --- command line and bad input ---

@pytest.mark.parametrize("argv, words", [
    (["--mask-ratio", "1.5"], "--mask-ratio"),
    (["--num-patches", "2000"], "--num-patches"),
    (["--img-size", "64", "--msssim-window", "11"], "--msssim-window"),
    (["--img-size", "32"], "--img-size"),
    (["--init", "imagenet"], "--stage finetune"),
    (["--stage", "finetune", "--init", "selective"], "--pretrained"),
    (["--stage", "finetune", "--init", "imagenet", "--imagenet-weights", "/nonexistent/r34.pth"], "--imagenet-weights"),
    (["--partitions", "0"], "--partitions"),
    (["--data", "cifar10"], "--pretrain-data"),
    (["--train-fraction", "0"], "--train-fraction"),
    (["--samples", "1", "--cover-all"], "--cover-all"),
    (["--data", "cityscapes", "--test-split", "test"], "official val"),
    (["--num-classes", "3"], "--num-classes"),  # only --data folder masks need it
    (["--ssim-window", "4"], "--ssim-window"),
])
def test_bad_flags_name_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit) as error:
        sm.get_args(argv)
    assert error.value.code == 2 and words in capsys.readouterr().err


def test_defaults_per_dataset():
    assert sm.get_args(["--data", "nassar"]).train_fraction == 0.2  # the authors' first fifth of train and val
    assert sm.get_args(["--data", "nassar", "--split-protocol", "reader"]).train_fraction == 1.0
    assert sm.get_args(["--data", "camvid"]).train_fraction == 1.0
    paper = sm.get_args(["--data", "voc"])
    assert (paper.img_size, paper.partitions, paper.pretrain_epochs, paper.pretrain_batch_size, paper.epochs,
            paper.batch_size, paper.score_aggregation, paper.patch_grid) == (256, 10, 1000, 128, 500, 8, "all-mean",
                                                                             "21x21=441")
    assert sm.get_args(["--masking", "random"]).partitions == 1


def test_more_partitions_than_images_runs_with_one_image_each(tmp_path):
    out = tmp_path / "run"
    sm.main(sm.get_args(TINY + ["--partitions", "10", "--limit", "3", "--pretrain-epochs", "1", "--stage", "pretrain",
                                "--out", str(out)]))
    assert json.loads((out / "config.json").read_text())["partitions"] == 3
    assert [r["partition"] for r in records(out) if r["stage"] == "score"] == [1, 2]


def test_train_fraction_keeps_the_first_items_of_train_and_val(tmp_path):
    args = sm.get_args(TINY + ["--stage", "finetune", "--train-fraction", "0.25", "--limit", "12", "--out", "unused"])
    splits = sm.build_splits(args, sm.Runtime(torch.device("cpu")))
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (3, 3, 12)
    assert list(splits["train"].indices) == [0, 1, 2]


def write_png(path, array):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_paper_protocol_wiring_on_fake_cityscapes_and_nassar_trees(tmp_path):
    """--data cityscapes: train/val are the first 80 % / last 20 % of official train, test is official val with real
    labels; --data nassar: the first fifth of train and val by default, all of test."""
    image, ids = np.zeros((40, 80, 3)), np.full((40, 80), 26)  # labelId 26 = car (train id 13)
    for split, frames in (("train", [f"aachen_000000_{i:06d}" for i in range(10)]), ("val", ["lindau_000000_000001"])):
        for frame in frames:
            write_png(tmp_path / "city" / "leftImg8bit" / split / frame.split("_")[0] / f"{frame}_leftImg8bit.png", image)
            write_png(tmp_path / "city" / "gtFine" / split / frame.split("_")[0] / f"{frame}_gtFine_labelIds.png", ids)
    args = sm.get_args(TINY + ["--data", "cityscapes", "--data-root", str(tmp_path / "city"), "--stage", "finetune",
                               "--out", "unused"])
    splits = sm.build_splits(args, sm.Runtime(torch.device("cpu")))
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"]), splits["test_split"]) == (8, 2, 1, "test")
    assert splits["test"].names == ["lindau_000000_000001_leftImg8bit"]
    test_image, test_label = splits["test"][0]
    assert test_image.shape == (3, 40, 80) and set(test_label.unique().tolist()) == {13}  # aspect kept, labelled
    for part, count in (("train", 10), ("val", 5), ("test", 4)):
        for i in range(count):
            write_png(tmp_path / "nassar" / "tiled_dataset" / part / "images" / f"t{i}.png", image)
            write_png(tmp_path / "nassar" / "tiled_dataset" / part / "masks" / f"t{i}.png", np.zeros((40, 80)))
    args = sm.get_args(TINY + ["--data", "nassar", "--data-root", str(tmp_path / "nassar"), "--stage", "finetune",
                               "--out", "unused"])
    splits = sm.build_splits(args, sm.Runtime(torch.device("cpu")))
    assert (len(splits["train"]), len(splits["val"]), len(splits["test"])) == (2, 1, 4)


def folder_tree(root, largest_ids, size=(40, 48)):
    """--data folder with {train,val,test}/{images,masks}: split -> the largest class id in each of its masks."""
    rng = np.random.default_rng(0)
    for split, ids in largest_ids.items():
        for i, largest in enumerate(ids):
            write_png(root / split / "images" / f"{split}{i}.png", rng.integers(0, 256, (*size, 3)))
            label = rng.integers(0, largest + 1, size)
            label[0, 0] = largest
            write_png(root / split / "masks" / f"{split}{i}.png", label)


def test_num_classes_comes_from_all_splits_the_flag_or_the_checkpoint(tmp_path, monkeypatch):
    """The class count is that of ALL labelled splits (train has class 3, val and test only 0-1 and 0-2), never that
    of the test split alone (which crashed the downstream stage); --num-classes sets it; --eval-only reads only the
    test split and takes K from the checkpoint. --select-by last keeps the last epoch whatever val mIoU says."""
    folder_tree(tmp_path / "data", {"train": [3, 1, 2, 1], "val": [1, 1, 1], "test": [2, 2]})
    flags = TINY + ["--data", "folder", "--data-root", str(tmp_path / "data"), "--stage", "finetune"]
    splits = sm.build_splits(sm.get_args(flags + ["--out", "unused"]), sm.Runtime(torch.device("cpu")))
    assert splits["num_classes"] == 4 and len(splits["info"].class_names) == 4
    assert sm.build_splits(sm.get_args(flags + ["--num-classes", "6", "--out", "unused"]),
                           sm.Runtime(torch.device("cpu")))["num_classes"] == 6
    with pytest.raises(sm.DatasetError, match="train3.png|outside 0..2"):  # ids >= K name the mask
        sm.build_splits(sm.get_args(flags + ["--num-classes", "3", "--out", "unused"]), sm.Runtime(torch.device("cpu")))
    falling, seen = iter([0.9, 0.5, 0.1]), []  # val mIoU falls: best-val would keep epoch 1
    evaluate = sm.evaluate_segmentation
    monkeypatch.setattr(sm, "evaluate_segmentation", lambda *a: seen.append((a[-1], len(a[1].dataset))) or {
        **evaluate(*a), **({"miou": next(falling)} if a[-1] == "val" else {})})
    out = str(tmp_path / "run")
    results = sm.main(sm.get_args(flags + ["--epochs", "3", "--select-by", "last", "--out", out]))
    assert len(results["test"]["per_class_iou"]) == 4 and list(results["per_class_iou"]) == [f"class_{i}" for i in
                                                                                             range(4)]
    assert seen == [("val", 3)] * 3 + [("test", 2)]  # each epoch selects on the 3 val images, never on test
    assert results["best_epoch"] == 3 and sm.classes_of(sm.load_checkpoint(os.path.join(out, "best.pt"),
                                                                            sm.SCRIPT)) == 4
    monkeypatch.setattr(sm, "evaluate_segmentation", evaluate)
    evaluated = sm.main(sm.get_args(flags + ["--eval-only", "--out", out]))  # the test split alone holds 3 classes
    assert len(evaluated["test"]["per_class_iou"]) == 4
    assert evaluated["test"]["miou"] == pytest.approx(results["test"]["miou"])


def test_pretrain_root_is_the_pre_training_folder(tmp_path):
    """--pretrain-data folder --pretrain-root X pre-trains on X's images (cross-pre-training, Table 7), not on
    --data-root; without --pretrain-root the same dataset name reads --data-root."""
    for i in range(3):
        write_png(tmp_path / "other" / "images" / f"o{i}.png", np.full((40, 40, 3), 50 * i))
    args = sm.get_args(TINY + ["--pretrain-data", "folder", "--pretrain-root", str(tmp_path / "other"), "--stage",
                               "pretrain", "--out", "unused"])
    splits = sm.build_splits(args, sm.Runtime(torch.device("cpu")))
    assert len(splits["pretrain"]) == 3 and "train" not in splits
    assert sm.get_args(["--data", "camvid", "--data-root", "x"]).pretrain_root == "x"
    assert sm.get_args(["--data", "camvid", "--data-root", "x", "--pretrain-data", "voc"]).pretrain_root is None


def test_colorize_uses_the_palette_and_paints_ignore_white():
    labels = torch.tensor([[[0, 1], [2, 255]]])
    colours = sm.colorize(labels, [(0, 0, 0), (255, 0, 0), (0, 128, 0)])
    assert colours.shape == (1, 3, 2, 2)
    assert colours[0, :, 0, 1].tolist() == [1.0, 0.0, 0.0] and colours[0, 1, 1, 0].item() == pytest.approx(128 / 255)
    assert colours[0, :, 1, 1].tolist() == [1.0, 1.0, 1.0] and colours[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]


def test_cli_bad_data_gives_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "selective_mim.py"), "--data", "camvid", "--data-root",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--workers", "0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: camvid") and "--data-root" in result.stderr
    assert not (tmp_path / "run").exists()


# --- real samples ---

@pytest.mark.skipif(not (SHARED_DATA / "CamVid").is_dir(), reason="shared CamVid samples not present")
def test_real_camvid_samples_both_stages_at_their_aspect(tmp_path):
    out = str(tmp_path / "camvid")
    results = sm.main(sm.get_args(TINY + ["--data", "camvid", "--data-root", str(SHARED_DATA / "CamVid"),
                                          "--limit", "6", "--partitions", "2", "--pretrain-epochs", "1",
                                          "--epochs", "1", "--test-split", "val", "--out", out]))  # no test folder here
    assert results["test_split"] == "val" and len(results["per_class_iou"]) == 11
    args = sm.get_args(TINY + ["--data", "camvid", "--data-root", str(SHARED_DATA / "CamVid"), "--limit", "2",
                               "--stage", "finetune", "--test-split", "val", "--out", "unused"])
    splits = sm.build_splits(args, sm.Runtime(torch.device("cpu")))
    assert splits["test"][0][0].shape == (3, 40, 53) and splits["train"][0][0].shape == (3, 40, 40)
    score = [r for r in records(out) if r["stage"] == "score"][0]
    grid = sm.patch_grid(40, 53, 16)  # 480 x 360 -> 53 x 40 canvas, aspect kept
    assert score["hidden_per_image"] == int(grid.num_patches * 0.5)
