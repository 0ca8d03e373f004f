"""Tests for selective_mim.py, in the file's order: masking, model, losses, selective scoring, runs, CLI, real data.

Slow, obvious loop versions of the vectorised code live here as references. Sizes are tiny (CPU, 2 cores).
"""
import json
import math
import os
import socket
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
TINY = ["--img-size", "40", "--num-patches", "16", "--msssim-window", "3", "--model", "resnet18-unet", "--workers", "0",
        "--batch-size", "4", "--finetune-batch-size", "4"]


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
    dataset = sm.PretrainImages(Canvas(grid, mask), [0], 48, grid, mask, augment=True)
    torch.manual_seed(0)
    for _ in range(10):  # random crops, flips and jitter
        image, hidden = dataset[0]
        assert image.shape == (3, 48, 48) and hidden.shape == (48, 48) and hidden.dtype == torch.bool
        white = sm.to_unit(image[None])[0].mean(0) > 0.5
        flat = hidden.float()[None, None]  # pixels 2+ px away from a mask edge (the image's edges are interpolated)
        interior = (F.max_pool2d(flat, 5, 1, 2) == -F.max_pool2d(-flat, 5, 1, 2))[0, 0]
        assert interior.float().mean() > 0.5
        assert torch.equal(hidden[interior], white[interior])
    image, hidden = sm.PretrainImages(Canvas(grid, mask), [0], 48, grid, mask)[0]  # no augmentation: exact
    assert torch.equal(hidden, grid.to_pixels(mask)[0])


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
    with pytest.raises(ValueError, match="same --model"):
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
    for aggregation in ("hidden-mean", "hidden-sum", "all-sum"):
        scores, mask = sm.selective_masks(model, images, grid, samples, ratio, torch.Generator().manual_seed(7),
                                          aggregation)
        for b in range(2):
            total, count = torch.zeros(grid.num_patches), torch.zeros(grid.num_patches)
            for s in range(samples):
                for n in range(grid.num_patches):
                    if aggregation == "all-sum" or copy_masks[b * samples + s, n]:
                        total[n] += losses[b, s, n]
                        count[n] += 1
            expected = total / count.clamp(min=1) if aggregation == "hidden-mean" else total
            assert torch.allclose(scores[b], expected, atol=1e-4), aggregation
            hardest = expected.argsort(descending=True)[:8]  # the selective mask hides the highest scores
            assert set(torch.nonzero(mask[b]).flatten().tolist()) == set(hardest.tolist()), aggregation


def test_scoring_runs_all_copies_in_one_forward_pass_without_gradients():
    model = sm.build_model(3, "resnet18-unet").eval()
    calls = []
    model.register_forward_hook(lambda module, inputs, output: calls.append((inputs[0].shape, torch.is_grad_enabled())))
    grid = sm.patch_grid(40, 40, 16)
    scores, mask = sm.selective_masks(model, torch.randn(4, 3, 40, 40), grid, samples=5)
    assert calls == [(torch.Size([20, 3, 40, 40]), False)]
    assert mask.shape == (4, 16) and torch.all(mask.sum(1) == 8) and scores.shape == (4, 16)


def test_warmup_cosine_schedule():
    factor = sm.warmup_cosine(20, 10)
    assert factor(0) == pytest.approx(0.01) and factor(5) == pytest.approx(0.505)
    assert factor(10) == pytest.approx(1.0) and factor(15) == pytest.approx(0.505) and factor(20) == pytest.approx(0.01)


def test_summarize_seeds_mean_spread_and_lowest_classes():
    runs = [{"seed": 0, "miou": 0.4, "per_class_iou": [0.5, 0.2, float("nan")], "chance_miou": 0.1},
            {"seed": 1, "miou": 0.6, "per_class_iou": [0.7, 0.4, float("nan")], "chance_miou": 0.1}]
    summary = sm.summarize_seeds(runs, ("a", "b", "c"), 2)
    assert summary["test_miou_mean"] == pytest.approx(0.5)
    assert summary["test_miou_std"] == pytest.approx(0.1414214, abs=1e-6)  # sample std of 0.4, 0.6
    assert [c["class"] for c in summary["lowest_classes"]] == ["b", "a"]  # c never appears: left out
    assert summary["lowest_classes"][0]["iou_mean"] == pytest.approx(0.3)
    assert summary["lowest_classes"][0]["iou_std"] == pytest.approx(0.1414214, abs=1e-6)


# --- runs ---

def records(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_two_stage_run_learns(tmp_path):
    out = str(tmp_path / "run")
    results = sm.main(sm.get_args(TINY + ["--out", out, "--img-size", "48", "--limit", "64", "--partitions", "2",
                                          "--epochs", "2", "--finetune-epochs", "8", "--batch-size", "8",
                                          "--finetune-batch-size", "8", "--finetune-lr", "1e-3"]))
    log = records(out)
    first = [r for r in log if r["stage"] == "pretrain" and r["partition"] == 0]
    assert first[-1]["rec_loss"] < first[0]["rec_loss"]  # the reconstruction loss falls
    score = [r for r in log if r["stage"] == "score"]
    assert len(score) == 1 and score[0]["partition"] == 1 and score[0]["hidden_per_image"] == 8
    assert score[0]["images"] == 32
    finetune = results["finetune"]
    # Chance = predicting the majority class (background) everywhere, where an untrained network starts.
    assert finetune["test_miou_mean"] > finetune["chance_miou"] + 0.02
    for name in ("config.json", "metrics.jsonl", "last.pt", "pretrained.pt", "best-seed0.pt", "results.json",
                 "samples/pretrain-partition0.png", "samples/pretrain-partition1.png", "samples/finetune-seed0.png"):
        assert os.path.exists(os.path.join(out, name)), name
    assert len(finetune["lowest_classes"]) == 5 and json.load(open(os.path.join(out, "results.json")))["pretrain"]


RESUME = TINY + ["--limit", "12", "--partitions", "2", "--epochs", "2", "--finetune-epochs", "2"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("straight") / "run")
    sm.main(sm.get_args(RESUME + ["--out", out]))
    return out


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_after, workers", [(1, "0"), (2, "0"), (3, "0"), (5, "0"), (3, "1")],
                         ids=["in-partition0", "between-partitions", "in-selective-partition", "in-finetune",
                              "worker-process"])
def test_resume_is_exact(straight_run, tmp_path, monkeypatch, crash_after, workers):
    """Crash after `crash_after` epochs, resume: the weights equal the straight run's bit for bit. With a worker
    process (persistent) against the straight run's main-process loading: augmentations are seeded per sample."""
    out = str(tmp_path / "run")
    argv = RESUME + ["--out", out, "--workers", workers]
    original, calls = sm.train_one_epoch, []

    def crashing(*args, **kwargs):
        if len(calls) == crash_after:
            raise Crash
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sm, "train_one_epoch", crashing)
    with pytest.raises(Crash):
        sm.main(sm.get_args(argv))
    monkeypatch.setattr(sm, "train_one_epoch", original)
    state = sm.load_checkpoint(os.path.join(out, "last.pt"))
    if crash_after == 3:  # inside the selective partition: its exact masks travel with the checkpoint
        assert (state["stage"], state["partition"], state["epoch"]) == ("pretrain", 1, 1)
        assert state["masks"]["train"].dtype == torch.bool and torch.all(state["masks"]["train"].sum(1) == 8)
    sm.main(sm.get_args(argv + ["--resume"]))
    for name in ("pretrained.pt", "last.pt", "best-seed0.pt"):
        expected, got = (sm.load_checkpoint(os.path.join(d, name))["model"] for d in (straight_run, out))
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)
    assert records(out)[-1]["stage"] == "test"
    assert json.load(open(os.path.join(out, "results.json")))["finetune"]["test_miou_mean"] == \
        json.load(open(os.path.join(straight_run, "results.json")))["finetune"]["test_miou_mean"]


def test_torchrun_two_processes_gloo(tmp_path):
    out = str(tmp_path / "ddp")
    with socket.socket() as probe:  # a free port: other test runs may be using torchrun at the same time
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               str(ROOT / "selective_mim.py"), *TINY, "--limit", "12", "--partitions", "2", "--epochs", "1",
               "--finetune-epochs", "1", "--device", "cpu", "--out", out]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    log = records(out)
    score = [r for r in log if r["stage"] == "score"]
    assert score and score[0]["images"] == 6  # partition 1 of 12 images, scored by both ranks together
    assert result.stdout.count("stage=test") == 1  # only rank 0 prints
    results = json.load(open(os.path.join(out, "results.json")))
    assert math.isfinite(results["finetune"]["test_miou_mean"])


# --- command line and bad input ---

@pytest.mark.parametrize("argv, words", [
    (["--mask-ratio", "1.5"], "--mask-ratio"),
    (["--num-patches", "2000"], "--num-patches"),
    (["--img-size", "64", "--msssim-window", "11"], "--msssim-window"),
    (["--init", "imagenet"], "--stage finetune"),
    (["--stage", "finetune", "--init", "selective"], "--pretrained"),
    (["--stage", "finetune", "--init", "imagenet", "--imagenet-weights", "/nonexistent/r34.pth"], "--imagenet-weights"),
    (["--partitions", "0"], "--partitions"),
    (["--data", "cifar10"], "--pretrain-data"),
])
def test_bad_flags_name_the_flag(argv, words, capsys):
    with pytest.raises(SystemExit):
        sm.get_args(argv)
    assert words in capsys.readouterr().err


def test_existing_run_directory_needs_resume(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="--resume"):
        sm.main(sm.get_args(TINY + ["--out", str(out)]))


def test_cli_bad_data_gives_one_clear_line(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "selective_mim.py"), "--data", "camvid", "--data-root",
                             str(tmp_path / "missing"), "--out", str(tmp_path / "run"), "--workers", "0"],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error: camvid") and "--data-root" in result.stderr


# --- real samples ---

@pytest.mark.skipif(not (SHARED_DATA / "CamVid").is_dir(), reason="shared CamVid samples not present")
def test_real_camvid_samples_both_stages(tmp_path):
    out = str(tmp_path / "camvid")
    results = sm.main(sm.get_args(TINY + ["--data", "camvid", "--data-root", str(SHARED_DATA / "CamVid"),
                                          "--limit", "8", "--partitions", "2", "--epochs", "1",
                                          "--finetune-epochs", "1", "--seeds", "0", "--test-split", "val",
                                          "--out", out]))  # the shared sample has no test folder
    assert len(results["finetune"]["per_class_iou_mean"]) == 11
    assert results["pretrain"]["patch_grid"] == "4x4=16"
