"""Tests for masksup.py, in the file's order: masking, model, losses, training, resume, DDP, CLI, real samples.
Tiny CPU sizes; LeViT-UNet parameter counts and shapes on the meta device (no memory, no compute)."""
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import masksup
from common import DatasetError

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
TINY = ["--img-size", "32", "--limit", "16", "--batch-size", "8", "--unet-width", "8", "--workers", "0",
        "--device", "cpu"]
# tests/test_contract.py: a synthetic run of the whole pipeline in a few seconds (with --lr 1e30: a non-finite loss)
CONTRACT_TINY = ["--img-size", "32", "--limit", "8", "--batch-size", "4", "--unet-width", "4", "--epochs", "2",
                 "--workers", "0", "--device", "cpu", "--eval-masked"]  # masked evaluation too: sharded under torchrun
# ... and flags that read --data folder from the --data-root the test supplies (class ids 0..2, 255 = ignore)
# ... and one step (8 training images) for the torchrun equivalence test: 2 processes with
# these batches vs 1 with twice them
CONTRACT_ONE_STEP = ["--img-size", "32", "--limit", "8", "--unet-width", "4", "--epochs", "1", "--workers", "0",
                     "--device", "cpu", "--batch-size", "4"]
CONTRACT_FOLDER = ["--data", "folder", "--mask-mode", "ids", "--num-classes", "3", "--arch", "unet", "--img-size",
                   "32", "--unet-width", "4", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--device", "cpu"]
SINGLE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is as fast, and much faster when the CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- masking ---

@pytest.mark.parametrize("name", ["low", "high"])
def test_free_form_hole_area_lands_in_bin(name):
    low, high = masksup.HOLE_AREA_BINS[name]
    H, W = 24, 40  # non-square
    fractions = []
    for seed in range(30):
        generator = torch.Generator().manual_seed(seed)
        mask = masksup.free_form_masks(8, H, W, (low, high), generator, "cpu")
        assert mask.shape == (8, H, W) and mask.dtype == torch.bool
        fractions.append(mask.float().mean(dim=(1, 2)))
    fractions = torch.cat(fractions)  # 240 masks
    assert fractions.min() >= low - 1e-9 and fractions.max() <= high + 1e-9
    # the area is drawn uniformly in the bin: both halves of the bin are used
    middle = (low + high) / 2
    assert (fractions < middle).float().mean() > 0.3 and (fractions > middle).float().mean() > 0.3


def test_free_form_holes_are_strokes_not_noise():
    """Holes form connected strokes/blobs: far fewer hole/kept changes between neighbouring pixels than scattered
    pixels of the same area would give (2 p (1 - p) ~ 0.5 of all neighbour pairs at p = 0.55)."""
    mask = masksup.free_form_masks(16, 64, 64, (0.5, 0.6), torch.Generator().manual_seed(0), "cpu")
    changes = torch.cat([(mask[:, 1:] != mask[:, :-1]).flatten(1), (mask[:, :, 1:] != mask[:, :, :-1]).flatten(1)], 1)
    assert changes.float().mean() < 0.1


def test_free_form_masks_deterministic_per_seed():
    def draw(seed):
        return masksup.free_form_masks(4, 32, 48, (0.5, 0.6), torch.Generator().manual_seed(seed), "cpu")
    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    batch = draw(5)
    assert not torch.equal(batch[0], batch[1])  # a fresh mask per sample


def reference_stroke_distance(vertices, H, W):
    """Slow reference: distance of every pixel to the nearest polyline segment, in float64 Python loops."""
    distance = np.full((H, W), np.inf)
    for stroke in vertices.tolist():
        for (ar, ac), (br, bc) in zip(stroke[:-1], stroke[1:]):
            dr, dc = br - ar, bc - ac
            for r in range(H):
                for c in range(W):
                    t = ((r - ar) * dr + (c - ac) * dc) / (dr * dr + dc * dc + 1e-6)
                    t = min(max(t, 0.0), 1.0)
                    d = math.hypot(r - ar - t * dr, c - ac - t * dc)
                    distance[r, c] = min(distance[r, c], d)
    return distance


def test_free_form_vectorised_matches_loop_reference(monkeypatch):
    """The vectorised rasteriser equals a per-pixel loop: the same distances, and the holes are exactly the
    num_holes pixels of lowest score (distance / (0.5 + wobble))."""
    H, W, B = 12, 16, 2
    captured = {}
    real_interpolate = F.interpolate

    def spy(*args, **kwargs):  # capture the smooth wobble field the generator draws
        out = real_interpolate(*args, **kwargs)
        captured["wobble"] = out.reshape(B, H, W).double().numpy()
        return out
    monkeypatch.setattr(masksup.F, "interpolate", spy)
    mask = masksup.free_form_masks(B, H, W, (0.2, 0.3), torch.Generator().manual_seed(0), "cpu")
    # replay the same random draws to recover the polylines
    g = torch.Generator().manual_seed(0)
    size = torch.tensor([H, W], dtype=torch.float32)
    start = torch.rand(B, 4, 1, 2, generator=g) * size
    angle = torch.rand(B, 4, 5, generator=g) * (2 * math.pi)
    length = (0.1 + 0.3 * torch.rand(B, 4, 5, generator=g)) * max(H, W)
    steps = torch.stack([angle.sin(), angle.cos()], dim=-1) * length[..., None]
    vertices = torch.cat([start, start + steps.cumsum(dim=2)], dim=2)
    vertices = size - (vertices.remainder(2 * size) - size).abs()
    for b in range(B):
        score = reference_stroke_distance(vertices[b].double().numpy(), H, W) / (0.5 + captured["wobble"][b])
        holes = mask[b].numpy()
        count = holes.sum()
        assert 0.2 * H * W - 1 <= count <= 0.3 * H * W + 1
        # every hole scores no higher than every kept pixel (up to float32 rounding of the fast path)
        assert score[holes].max() <= score[~holes].min() + 1e-4


def reference_patch_mask(noise, num_hidden, h, w, P):
    """Slow reference: per sample, hide the patches with the num_hidden smallest noise values."""
    B, L = noise.shape
    mask = torch.zeros(B, h * P, w * P, dtype=torch.bool)
    for b in range(B):
        order = sorted(range(L), key=lambda i: noise[b, i].item())
        for i in order[:num_hidden]:
            r, c = divmod(i, w)
            for y in range(r * P, (r + 1) * P):
                for x in range(c * P, (c + 1) * P):
                    mask[b, y, x] = True
    return mask


def test_patch_masks_exact_count_and_loop_reference():
    B, H, W, P, ratio = 3, 24, 40, 8, 0.4  # L = 3 * 5 = 15 patches, 6 hidden
    mask = masksup.patch_masks(B, H, W, P, ratio, torch.Generator().manual_seed(1), "cpu")
    assert mask.shape == (B, H, W)
    assert (mask.sum(dim=(1, 2)) == 6 * P * P).all()
    noise = torch.rand(B, 15, generator=torch.Generator().manual_seed(1))
    assert torch.equal(mask, reference_patch_mask(noise, 6, H // P, W // P, P))


def test_apply_mask_sets_holes_to_zero_only():
    images = torch.rand(2, 3, 8, 10) * 2 - 1
    mask = torch.zeros(2, 8, 10, dtype=torch.bool)
    mask[0, 2:5, 3:7] = True
    masked = masksup.apply_mask(images, mask)
    assert (masked[0, :, 2:5, 3:7] == 0).all()
    keep = ~mask[:, None].expand_as(images)
    assert torch.equal(masked[keep], images[keep])


def test_folder_masks(tmp_path):
    for i in range(3):
        array = np.zeros((20, 30), dtype=np.uint8)
        array[:, : 10 * (i + 1)] = 255  # white = hole, 1/3, 2/3, 3/3 of the width
        Image.fromarray(array).save(tmp_path / f"{i:05d}.png")
    bank = masksup.FolderMasks(tmp_path, 24, "cpu")
    assert bank.masks.shape == (3, 24, 24)
    fractions = sorted(bank.masks.float().mean(dim=(1, 2)).tolist())
    assert fractions == pytest.approx([1 / 3, 2 / 3, 1.0], abs=0.05)
    drawn = bank(5, torch.Generator().manual_seed(0))
    assert drawn.shape == (5, 24, 24)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no mask images"):
        masksup.FolderMasks(tmp_path / "empty", 24, "cpu")


def write_hole_masks(folder, fractions, size=(40, 50)):
    """One PNG per fraction: the first round(f * W) columns white (hole) on a (H, W) = size canvas."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, fraction in enumerate(fractions):
        array = np.zeros(size, dtype=np.uint8)
        array[:, :round(fraction * size[1])] = 255
        Image.fromarray(array).save(folder / f"{i:05d}.png")


def test_folder_masks_by_measured_area_against_literal_bins(tmp_path):
    """--mask-area high keeps only files whose hole fraction is within 50-60 %, low within 1-10 % (the literal
    NVIDIA bins, not the constant the code reads), any keeps all."""
    write_hole_masks(tmp_path, [0.04, 0.30, 0.54, 0.58, 0.80])
    high = masksup.FolderMasks(tmp_path, 32, "cpu", area="high")
    assert sorted(high.fractions.tolist()) == pytest.approx([0.54, 0.58])
    drawn = high(64, torch.Generator().manual_seed(0)).float().mean(dim=(1, 2))  # what training receives
    assert drawn.min() >= 0.50 - 0.02 and drawn.max() <= 0.60 + 0.02
    low = masksup.FolderMasks(tmp_path, 32, "cpu", area="low")
    assert low.fractions.tolist() == pytest.approx([0.04])
    assert len(masksup.FolderMasks(tmp_path, 32, "cpu", area="any").masks) == 5
    assert high.counts == {"low": 1, "high": 2, "any": 5}
    write_hole_masks(tmp_path / "none_high", [0.2, 0.3])
    with pytest.raises(DatasetError, match="--mask-area high"):
        masksup.FolderMasks(tmp_path / "none_high", 32, "cpu", area="high")


@pytest.mark.parametrize("masking, low, high", [("high", 0.50, 0.60), ("low", 0.01, 0.10)])
def test_produced_hole_areas_match_the_paper_bins(masking, low, high):
    """The masks make_masks hands to training (the --masking flag path) cover the literal bin of the paper."""
    args = masksup.get_args(["--masking", masking, "--img-size", "48"])
    fractions = torch.cat([masksup.make_masks(args.masking, 16, 48, 48, torch.Generator().manual_seed(s), "cpu")
                           .float().mean((1, 2)) for s in range(8)])
    assert fractions.min() >= low - 1e-9 and fractions.max() <= high + 1e-9
    assert fractions.max() - fractions.min() > 0.5 * (high - low)  # spread over the bin, not one value


def test_item_masks_depend_on_the_item_key_only():
    args = masksup.get_args(["--img-size", "32"])
    both = masksup.item_masks(args, [(0, "mask", 1, 3), (0, "mask", 1, 7)], "cpu")
    assert torch.equal(masksup.item_masks(args, [(0, "mask", 1, 7)], "cpu")[0], both[1])  # batch/shard independent
    assert not torch.equal(both[0], both[1])
    assert not torch.equal(masksup.item_masks(args, [(0, "mask", 2, 3)], "cpu")[0], both[0])  # fresh each epoch


# --- model ---

PARAMETERS = {  # (1 class, 40 classes), 3-channel input: the reference LeViT-UNet code's counts
    "levit-128s": (15_894_627, 15_945_210),
    "levit-192": (19_894_150, 19_947_541),
    "levit-384": (52_154_213, 52_216_028),
}
BIAS_PARAMETERS = {"levit-128s": 5_314, "levit-192": 5_333, "levit-384": 10_372}


def count(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", list(PARAMETERS))
def test_levit_unet_parameter_counts(preset):
    with torch.device("meta"):
        assert count(masksup.LeViTUNet(preset, 3, 1)) == PARAMETERS[preset][0]
        assert count(masksup.LeViTUNet(preset, 3, 40)) == PARAMETERS[preset][1]


@pytest.mark.parametrize("preset", list(PARAMETERS))
def test_levit_unet_attention_bias_tables_and_shapes(preset):
    spec = masksup.PRESETS[preset]
    with torch.device("meta"):
        model = masksup.LeViTUNet(preset, 3, 4)
    biases = {name: p.shape for name, p in model.named_parameters() if "attention_biases" in name}
    assert sum(math.prod(s) for s in biases.values()) == BIAS_PARAMETERS[preset]
    heads, E, D = spec["heads"], spec["dims"], spec["key_dim"]
    # stage 1 attention at 14x14 (196 offsets), shrink 14->7 (E1/D heads, 14*14 offsets |2i-j|), stage 2 at 7x7
    # (49), shrink 7->4 (E2/D heads, 49), stage 3 at 4x4 (16)
    assert biases["stages.0.0.block.attention_biases"] == (heads[0], 196)
    assert biases["stages.1.0.attention_biases"] == (E[0] // D, 196)
    assert biases["stages.1.2.block.attention_biases"] == (heads[1], 49)
    assert biases["stages.2.0.attention_biases"] == (E[1] // D, 49)
    assert biases["stages.2.2.block.attention_biases"] == (heads[2], 16)
    assert model.stages[1][0].attention_bias_idxs.shape == (49, 196)
    assert model.stages[2][0].attention_bias_idxs.shape == (16, 49)
    # shapes through the whole network, B = 2 and K = 4, on the meta device (forward hooks on stem and stages)
    stem, tokens = [], []
    for conv in model.stem:
        conv.register_forward_hook(lambda module, inputs, output: stem.append(tuple(output.shape)))
    for stage in model.stages:
        stage.register_forward_hook(lambda module, inputs, output: tokens.append(tuple(output.shape)))
    logits = model(torch.empty(2, 3, 224, 224, device="meta"))
    n = E[0]
    assert logits.shape == (2, 4, 224, 224)
    assert stem == [(2, n // 8, 112, 112), (2, n // 4, 56, 56), (2, n // 2, 28, 28), (2, n, 14, 14)]
    assert tokens == [(2, 196, E[0]), (2, 49, E[1]), (2, 16, E[2])]


@torch.no_grad()
def test_levit_unet_real_forward_keeps_samples_apart():
    """A real forward (B = 2, K = 3): finite logits, and in eval mode changing image 1 leaves image 0's logits
    unchanged, so no reshape mixes the batch (tokens <-> maps, heads, shrink-attention subsampling)."""
    torch.manual_seed(0)
    model = masksup.LeViTUNet("levit-128s", 3, 3).eval()
    images = torch.randn(2, 3, 224, 224)
    logits = model(images)
    assert logits.shape == (2, 3, 224, 224) and torch.isfinite(logits).all()
    images[1] = torch.randn(3, 224, 224)
    changed = model(images)
    assert torch.allclose(changed[0], logits[0], atol=1e-5) and not torch.allclose(changed[1], logits[1])


def test_attention_bias_index_groups_equal_offsets():
    index, num_offsets = masksup.attention_bias_index(7, 14, stride=2)
    assert index.shape == (49, 196) and num_offsets == 14 * 14
    for q in (0, 10, 48):
        for k in (0, 33, 195):
            for q2, k2 in ((5, 100), (q, k)):
                same = (abs(2 * (q // 7) - k // 14), abs(2 * (q % 7) - k % 14)) == \
                       (abs(2 * (q2 // 7) - k2 // 14), abs(2 * (q2 % 7) - k2 % 14))
                assert (index[q, k] == index[q2, k2]).item() == same


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attention = masksup.Attention(dim=16, key_dim=4, num_heads=2, resolution=3).eval()
    with torch.no_grad():
        attention.attention_biases.normal_()
    x = torch.randn(3, 9, 16)
    qkv = attention.qkv(x).view(3, 9, 2, -1)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([4, 4, 8], dim=3))
    bias = torch.zeros(2, 9, 9)
    for i in range(9):
        for j in range(9):
            offset = (abs(i // 3 - j // 3), abs(i % 3 - j % 3))
            bias[:, i, j] = attention.attention_biases[:, attention.attention_bias_idxs[i, j]]
            assert attention.attention_bias_idxs[i, j] == attention.attention_bias_idxs[
                offset[0] * 3 + offset[1], 0]  # one table entry per |offset|
    weights = (q @ k.transpose(-2, -1) * 4 ** -0.5 + bias).softmax(-1)
    expected = attention.proj((weights @ v).transpose(1, 2).reshape(3, 9, 16))
    assert torch.allclose(attention(x), expected, atol=1e-5)


def test_levit_unet_rejects_other_sizes():
    model = masksup.LeViTUNet("levit-128s", 3, 1)
    with pytest.raises(ValueError, match="224x224"):
        model(torch.zeros(1, 3, 64, 64))


def test_unet_shapes_and_size():
    model = masksup.UNet(3, 4, width=8)
    assert model(torch.randn(2, 3, 48, 80)).shape == (2, 4, 48, 80)
    with torch.device("meta"):
        assert count(masksup.UNet(3, 1, width=20)) == 3_067_841  # the slides' "3 M" U-Net


def levit_bias_idxs(resolution, out_resolution, stride):
    """facebookresearch/LeViT's attention_bias_idxs buffer (persistent, so in the released files): offsets
    (|stride*q_row - k_row|, |stride*q_col - k_col|) numbered in first-seen order, (N_q, N_k) long."""
    keys = list(itertools.product(range(resolution), range(resolution)))
    queries = list(itertools.product(range(out_resolution), range(out_resolution)))
    offsets, idxs = {}, []
    for q in queries:
        for k in keys:
            offset = (abs(q[0] * stride - k[0]), abs(q[1] * stride - k[1]))
            offsets.setdefault(offset, len(offsets))
            idxs.append(offsets[offset])
    return torch.LongTensor(idxs).view(len(queries), len(keys))


def levit_128s_state_dict():
    """A LeViT-128S ImageNet checkpoint's key names and shapes (facebookresearch/LeViT, the released
    LeViT-128S-96703c44.pth layout: {"model": state_dict}), random values."""
    state, C, D = {}, (128, 256, 384), 16

    def linear_bn(prefix, a, b):
        state[f"{prefix}.c.weight"] = torch.randn(b, a)
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"{prefix}.bn.{name}"] = torch.randn(b)
        state[f"{prefix}.bn.num_batches_tracked"] = torch.tensor(7)

    for i, (a, b) in enumerate([(3, 16), (16, 32), (32, 64), (64, 128)]):
        state[f"patch_embed.{2 * i}.c.weight"] = torch.randn(b, a, 3, 3)
        for name in ("weight", "bias", "running_mean", "running_var"):
            state[f"patch_embed.{2 * i}.bn.{name}"] = torch.randn(b)
        state[f"patch_embed.{2 * i}.bn.num_batches_tracked"] = torch.tensor(7)
    index = 0
    for stage, (heads, depth, offsets) in enumerate(zip((4, 6, 8), (2, 3, 4), (196, 49, 16))):
        dim = C[stage]
        if stage > 0:
            shrink_heads = C[stage - 1] // D
            linear_bn(f"blocks.{index}.kv", C[stage - 1], shrink_heads * 5 * D)
            linear_bn(f"blocks.{index}.q.1", C[stage - 1], shrink_heads * D)
            linear_bn(f"blocks.{index}.proj.1", shrink_heads * 4 * D, dim)
            state[f"blocks.{index}.attention_biases"] = torch.randn(shrink_heads, 196 if stage == 1 else 49)
            state[f"blocks.{index}.attention_bias_idxs"] = levit_bias_idxs(*((14, 7) if stage == 1 else (7, 4)), 2)
            linear_bn(f"blocks.{index + 1}.m.0", dim, 2 * dim)
            linear_bn(f"blocks.{index + 1}.m.2", 2 * dim, dim)
            index += 2
        for _ in range(depth):
            linear_bn(f"blocks.{index}.m.qkv", dim, heads * 4 * D)
            linear_bn(f"blocks.{index}.m.proj.1", heads * 2 * D, dim)
            state[f"blocks.{index}.m.attention_biases"] = torch.randn(heads, offsets)
            side = math.isqrt(offsets)
            state[f"blocks.{index}.m.attention_bias_idxs"] = levit_bias_idxs(side, side, 1)
            linear_bn(f"blocks.{index + 1}.m.0", dim, 2 * dim)
            linear_bn(f"blocks.{index + 1}.m.2", 2 * dim, dim)
            index += 2
    state["head.bn.weight"], state["head.l.weight"] = torch.randn(384), torch.randn(1000, 384)
    state["head.l.bias"], state["head_dist.l.bias"] = torch.randn(1000), torch.randn(1000)
    state["head_dist.l.weight"] = torch.randn(1000, 384)
    return state


_LEVIT_STATE = {}


def levit_128s_state_dict_cache():
    """The same random released-layout state dict on every call (seeded once)."""
    if not _LEVIT_STATE:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            _LEVIT_STATE.update(levit_128s_state_dict())
    return _LEVIT_STATE


def test_load_levit_weights_maps_every_encoder_tensor(tmp_path):
    levit = levit_128s_state_dict()
    torch.save({"model": levit}, tmp_path / "levit.pth")
    model = masksup.LeViTUNet("levit-128s", 3, 1)
    loaded, skipped = masksup.load_levit_weights(model, tmp_path / "levit.pth")
    encoder = [k for k in model.state_dict() if k.startswith(("stem.", "stages."))]
    assert loaded == len(encoder)  # every encoder tensor, the first conv included
    assert all(k.startswith("head") or k.endswith("attention_bias_idxs") for k in skipped)
    ours = model.state_dict()
    assert torch.equal(ours["stem.0.conv.weight"], levit["patch_embed.0.c.weight"])
    assert torch.equal(ours["stages.1.0.q.linear.weight"], levit["blocks.4.q.1.c.weight"])
    assert torch.equal(ours["stages.2.4.block.proj.1.linear.weight"], levit["blocks.16.m.proj.1.c.weight"])
    assert torch.equal(ours["stages.2.4.block.attention_biases"], levit["blocks.16.m.attention_biases"])
    assert torch.equal(ours["stages.0.1.block.2.bn.running_var"], levit["blocks.1.m.2.bn.running_var"])
    torch.save({"model": {"fc.weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(DatasetError, match="no tensor matches"):
        masksup.load_levit_weights(model, tmp_path / "other.pth")
    # a file whose offset numbering differs from ours would load biases into the wrong offsets: refused
    levit["blocks.0.m.attention_bias_idxs"] = levit["blocks.0.m.attention_bias_idxs"].flip(0)
    torch.save({"model": levit}, tmp_path / "shuffled.pth")
    with pytest.raises(DatasetError, match="orders the attention offsets"):
        masksup.load_levit_weights(model, tmp_path / "shuffled.pth")


def test_levit_weights_flag_warns_once_and_records_pretrained(tmp_path, capsys):
    """No file: one warning naming the released file, pretrained False; a file: loaded, pretrained True; none:
    silent."""
    torch.save({"model": levit_128s_state_dict_cache()}, tmp_path / "LeViT-128S-96703c44.pth")
    runtime = masksup.Runtime(torch.device("cpu"))
    outcomes = {}
    for weights in (None, str(tmp_path / "LeViT-128S-96703c44.pth"), "none"):
        flags = ["--arch", "levit-128s"] + ([] if weights is None else ["--levit-weights", weights])
        args = masksup.get_args(flags)
        args.channels_last = False
        masksup.resolve_recipe(args, True)
        model, pretrained = masksup.prepare_model(args, 1, runtime)
        outcomes[weights] = (pretrained, capsys.readouterr().err)
        loaded = torch.equal(model.stem[1].conv.weight, levit_128s_state_dict_cache()["patch_embed.2.c.weight"])
        assert loaded == (weights not in (None, "none"))  # the file's weights are in the model only when passed
    assert outcomes[None][0] is False and outcomes[None][1].count("warning:") == 1
    assert "LeViT-128S-96703c44.pth" in outcomes[None][1] and "--levit-weights none" in outcomes[None][1]
    assert outcomes[str(tmp_path / "LeViT-128S-96703c44.pth")] == (True, "")
    assert outcomes["none"] == (False, "")


def test_decoder_upsamples_stage3_in_the_reference_order():
    """On a 4 x 4 stage-3 map with real spatial structure, the decoder's input equals the reference order (x2,
    x2 with nn.UpsamplingBilinear2d, then a 14 x 14 resize, align_corners=True); one x4 step would differ."""
    torch.manual_seed(0)
    model = masksup.LeViTUNet("levit-128s", 3, 1).eval()
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    structured = torch.stack([torch.sin(rows * 1.7 + c) * torch.cos(cols * 2.3 - c) + 0.3 * (rows - cols)
                              for c in range(384)])  # (E3, 4, 4)
    tokens = structured.flatten(1).T[None]  # (1, 16, E3), token n = row * 4 + col
    model.stages[2].register_forward_hook(lambda module, inputs, output: tokens)
    captured = {}
    model.decoder1.register_forward_pre_hook(lambda module, inputs: captured.update(x=inputs[0]))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    up = torch.nn.UpsamplingBilinear2d(scale_factor=2)
    reference = F.interpolate(up(up(structured[None])), size=(14, 14), mode="bilinear", align_corners=True)
    assert torch.allclose(captured["x"][:, -384:], reference, atol=1e-5)
    one_step = F.interpolate(F.interpolate(structured[None], scale_factor=4, mode="bilinear", align_corners=True),
                             size=(14, 14), mode="bilinear", align_corners=True)
    assert (one_step - reference).abs().max() > 0.1  # the map is structured enough to tell them apart


def reference_unet_plus_plus_parameters(num_classes):
    """Parameter count of the reference NestedUNet layout (filters 32-64-128-256-512, VGG blocks of two conv3x3 with
    bias + BN, no deep supervision, 1x1 head), written out node by node as (in, middle, out)."""
    n = (32, 64, 128, 256, 512)
    nodes = [(3, n[0], n[0]), (n[0], n[1], n[1]), (n[1], n[2], n[2]), (n[2], n[3], n[3]), (n[3], n[4], n[4]),
             (n[0] + n[1], n[0], n[0]), (n[1] + n[2], n[1], n[1]), (n[2] + n[3], n[2], n[2]), (n[3] + n[4], n[3], n[3]),
             (n[0] * 2 + n[1], n[0], n[0]), (n[1] * 2 + n[2], n[1], n[1]), (n[2] * 2 + n[3], n[2], n[2]),
             (n[0] * 3 + n[1], n[0], n[0]), (n[1] * 3 + n[2], n[1], n[1]), (n[0] * 4 + n[1], n[0], n[0])]
    total = sum(9 * i * m + m + 2 * m + 9 * m * o + o + 2 * o for i, m, o in nodes)
    return total + n[0] * num_classes + num_classes


def test_unet_plus_plus_layout_and_shapes():
    for k in (1, 40):
        with torch.device("meta"):
            assert count(masksup.UNetPlusPlus(3, k)) == reference_unet_plus_plus_parameters(k)
    assert reference_unet_plus_plus_parameters(1) == 9_163_329 and reference_unet_plus_plus_parameters(40) == 9_164_616
    torch.manual_seed(0)
    model = masksup.UNetPlusPlus(3, 4).eval()
    images = torch.randn(2, 3, 32, 48)  # non-square, B > 1, K > 2
    logits = model(images)
    assert logits.shape == (2, 4, 32, 48)
    images[1] = torch.randn(3, 32, 48)
    assert torch.allclose(model(images)[0], logits[0], atol=1e-5)  # samples stay apart


def test_unet_plus_plus_nested_skips_follow_the_formula():
    """X(i, j) = node(concat[X(i, 0), ..., X(i, j-1), up(X(i+1, j-1))]) and X(i, 0) = node(pool(X(i-1, 0))): every
    node's input, caught by a hook, is rebuilt from the caught outputs of the nodes the formula names (a node fed
    up(X(i+1, 0)) from column 0, or from the wrong depth, has the same shapes and fails here)."""
    torch.manual_seed(0)
    model = masksup.UNetPlusPlus(3, 2).eval()
    inputs, outputs = {}, {}
    for name, node in model.nodes.items():
        key = tuple(map(int, name.split("_")))
        node.register_forward_pre_hook(lambda module, args, key=key: inputs.__setitem__(key, args[0].clone()))
        node.register_forward_hook(lambda module, args, out, key=key: outputs.__setitem__(key, out.clone()))
    images = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        model(images)
    assert len(inputs) == 15
    for (i, j), received in inputs.items():
        if j == 0:
            expected = images if i == 0 else F.max_pool2d(outputs[i - 1, 0], 2)
        else:
            below = F.interpolate(outputs[i + 1, j - 1], scale_factor=2, mode="bilinear", align_corners=True)
            expected = torch.cat([outputs[i, k] for k in range(j)] + [below], dim=1)
        assert torch.allclose(received, expected, atol=1e-6), (i, j)


def test_drop_path_is_levits_and_acts_only_in_training():
    args = masksup.get_args(["--arch", "levit-384"])
    masksup.resolve_recipe(args, True)
    with torch.device("meta"):
        model = masksup.build_model(args.arch, 1, args.unet_width, args.drop_path)
    assert {m.drop_path for m in model.modules() if isinstance(m, masksup.Residual)} == {0.1}  # LeViT-384's rate
    residual = masksup.Residual(torch.nn.Identity(), drop_path=0.5).train()
    x = torch.ones(200, 3, 4)
    out = residual(x)  # per sample: x (branch dropped) or x + x / (1 - 0.5) = 3x
    per_sample = out[:, 0, 0]
    assert set(per_sample.tolist()) == {1.0, 3.0} and 0.3 < (per_sample == 1.0).float().mean() < 0.7
    assert torch.equal(residual.eval()(x), 2 * x)  # evaluation: never dropped


# --- losses ---

def test_segmentation_loss_hand_values():
    labels = torch.tensor([[[0, 1], [1, 255]]])  # (1, 2, 2), one ignore pixel
    # binary: logits 0 -> BCE ln 2 everywhere; a huge logit on the ignore pixel must not count
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 50.0]]]])
    assert masksup.segmentation_loss(logits, torch.tensor([[[0, 1], [1, 0]]]).masked_fill(
        torch.tensor([[[False, False], [False, True]]]), 255), binary=True).item() == pytest.approx(math.log(2))
    # binary, logit ln 3 on a foreground pixel: -ln(3/4); on a background pixel: -ln(1/4)
    logits = torch.full((1, 1, 2, 2), math.log(3))
    expected = (-math.log(0.25) - math.log(0.75) - math.log(0.75)) / 3
    assert masksup.segmentation_loss(logits, labels, binary=True).item() == pytest.approx(expected, rel=1e-6)
    # multi-class, uniform logits over K = 4: ln 4
    assert masksup.segmentation_loss(torch.zeros(1, 4, 2, 2), labels, binary=False).item() == pytest.approx(
        math.log(4))


def test_task_similarity_loss_hand_values():
    a = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    assert masksup.task_similarity_loss(a, a.clone(), binary=False).item() == 0.0
    one = a[:, :1].contiguous()  # a strided view may take another sigmoid kernel path than its copy (1 ulp apart)
    assert masksup.task_similarity_loss(one, one.clone(), binary=True).item() == 0.0
    # binary: sigmoid(0) = 0.5 vs sigmoid(40) = 1 -> 0.25 per pixel
    assert masksup.task_similarity_loss(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 40.0), True).item() == \
        pytest.approx(0.25)
    # multi-class K = 2: softmax (0.5, 0.5) vs (1, 0) -> squared errors 0.25, 0.25 -> mean 0.25
    clean = torch.zeros(1, 2, 1, 1)
    masked = torch.tensor([40.0, 0.0]).view(1, 2, 1, 1)
    assert masksup.task_similarity_loss(clean, masked, False).item() == pytest.approx(0.25)
    # the authors' argmax variant: class maps 0 vs 2 -> MSE 4, and no gradient
    clean = torch.tensor([5.0, 0.0, 0.0]).view(1, 3, 1, 1).requires_grad_()
    masked = torch.tensor([0.0, 0.0, 5.0]).view(1, 3, 1, 1).requires_grad_()
    loss = masksup.task_similarity_loss(clean, masked, False, mode="argmax")
    assert loss.item() == 4.0 and not loss.requires_grad


def test_masksup_loss_weights_exactly():
    torch.manual_seed(0)
    clean, masked = torch.randn(2, 3, 4, 6), torch.randn(2, 3, 4, 6)
    labels = torch.randint(0, 3, (2, 4, 6))
    total, terms = masksup.masksup_loss(clean, masked, labels, False, alphas=(0.3, 0.5, 2.0))
    seg = masksup.segmentation_loss(clean, labels, False)
    context = masksup.segmentation_loss(masked, labels, False)
    tasksim = masksup.task_similarity_loss(clean, masked, False)
    assert torch.allclose(terms, torch.stack([seg, context, tasksim]))
    assert total.item() == pytest.approx(0.3 * seg.item() + 0.5 * context.item() + 2.0 * tasksim.item(), rel=1e-6)
    base, base_terms = masksup.masksup_loss(clean, None, labels, False, alphas=(0.3, 0.0, 0.0))
    assert base.item() == pytest.approx(0.3 * seg.item()) and base_terms[1:].abs().sum() == 0


def test_gradient_flows_through_both_passes():
    """L_tasksim alone (a1 = a2 = 0) sends gradient into both predictions; in train_step the masked pass changes
    the weight gradient (it is not detached or skipped)."""
    clean = torch.randn(2, 1, 4, 4, requires_grad=True)
    masked = torch.randn(2, 1, 4, 4, requires_grad=True)
    total, _ = masksup.masksup_loss(clean, masked, torch.randint(0, 2, (2, 4, 4)), True, alphas=(0.0, 0.0, 1.0))
    total.backward()
    assert clean.grad.abs().sum() > 0 and masked.grad.abs().sum() > 0

    images = torch.rand(2, 3, 32, 48) * 2 - 1
    labels = torch.randint(0, 3, (2, 32, 48))
    mask = masksup.patch_masks(2, 32, 48, 8, 0.5, torch.Generator().manual_seed(0), "cpu")

    def head_gradient(alphas):
        torch.manual_seed(0)
        model = masksup.UNet(3, 3, width=4)
        args = masksup.get_args(["--device", "cpu", "--alpha1", str(alphas[0]), "--alpha2", str(alphas[1]),
                                 "--alpha3", str(alphas[2])])
        args.binary_task, args.amp = False, False
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the gradient
        losses = masksup.train_step(model, optimizer, images, labels, mask, args, cpu_runtime())
        assert losses.shape == (4,) and torch.isfinite(losses).all()
        return model.head.weight.grad.clone(), losses

    baseline, baseline_losses = head_gradient((1.0, 0.0, 0.0))
    context, context_losses = head_gradient((1.0, 1.0, 0.0))
    tasksim, _ = head_gradient((0.0, 0.0, 1.0))
    assert baseline_losses[2] == 0 and context_losses[2] > 0  # the masked pass ran only when asked
    assert not torch.allclose(baseline, context) and tasksim.abs().sum() > 0


def test_attention_biases_receive_gradient():
    """The learned relative-position biases are trained through the fused attention kernel (both kinds)."""
    attention = masksup.Attention(dim=16, key_dim=4, num_heads=2, resolution=4)
    shrink = masksup.ShrinkAttention(in_dim=16, out_dim=24, key_dim=4, resolution=4)
    torch.nn.init.ones_(attention.proj[1].bn.weight)  # LeViT starts this branch at 0; open it for the test
    (attention(torch.randn(2, 16, 16)).sum() + shrink(torch.randn(2, 16, 16)).pow(2).sum()).backward()
    assert shrink(torch.randn(2, 16, 16)).shape == (2, 4, 24)
    assert attention.attention_biases.grad.abs().sum() > 0 and shrink.attention_biases.grad.abs().sum() > 0


# --- recipes and loops: tests that fail when MaskSup breaks ---

@pytest.mark.parametrize("data, binary, expected", [
    ("kvasir", True, ("levit-384", "adam", 1e-4, 16, 200)),  # supplement Sec. 1: GLaS / polyps
    ("folder", True, ("levit-384", "adam", 1e-4, 16, 200)),  # a binary folder (0/255 masks) too
    ("nyudv2", False, ("unet++", "sgd", 0.1, 8, 200)),  # supplement Sec. 1: NYUDv2, SGD momentum 0.9
    ("folder", False, ("unet++", "sgd", 0.1, 8, 200)),
    ("shapes", True, ("unet", "adam", 1e-3, 16, 20)),  # CHOICE C10
])
def test_each_recipe_sets_network_optimiser_lr_batch_and_epochs(data, binary, expected):
    args = masksup.get_args(["--data", data])
    masksup.resolve_recipe(args, binary)
    assert (args.arch, args.optimizer, args.lr, args.batch_size, args.epochs) == expected
    optimizer, scheduler = masksup.build_optimizer(args, torch.nn.Linear(2, 2))
    assert type(optimizer) is {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[expected[1]]
    assert optimizer.param_groups[0]["lr"] == expected[2]
    if expected[1] == "sgd":
        assert optimizer.param_groups[0]["momentum"] == 0.9
    for _ in range(70):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == expected[2]  # CHOICE C6: no schedule unless --lr-schedule step
    passed = masksup.get_args(["--data", data, "--lr", "0.5", "--batch-size", "3", "--arch", "unet"])
    masksup.resolve_recipe(passed, binary)
    assert (passed.lr, passed.batch_size, passed.arch) == (0.5, 3, "unet")  # a flag passed wins


def write_folder(root, count=6, size=(40, 32)):
    """--data folder layout with 0/255 masks (the authors' and PraNet's binary format)."""
    for i in range(count):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
            root / "images" / f"{i}.png")
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        mask[4 + i:20, 6:30 - i] = 255
        Image.fromarray(mask).save(root / "masks" / f"{i}.png")


def test_binary_folder_gets_the_binary_recipe_after_the_data_is_read(tmp_path):
    """0/255 masks without --binary: read as foreground (not ignore), one logit + BCE and the GLaS/polyp optimiser."""
    write_folder(tmp_path / "data", count=10)
    out = tmp_path / "run"
    results = masksup.main(masksup.get_args(["--data", "folder", "--data-root", str(tmp_path / "data"), "--arch",
                                             "unet", "--img-size", "32", "--unet-width", "4", "--epochs", "1",
                                             "--workers", "0", "--device", "cpu", "--out", str(out)]))
    config = json.loads((out / "config.json").read_text())
    assert config["binary_task"] and config["recipe"] == "binary" and config["architecture"] == "unet-w4-k1"
    assert (config["optimizer"], config["lr"], config["batch_size"]) == ("adam", 1e-4, 16)
    assert config["pretrained"] is False and results["pretrained"] is False
    assert json.loads((out / "results.json").read_text())["pretrained"] is False
    dataset, _ = masksup.build_split(masksup.get_args(["--data", "folder", "--data-root", str(tmp_path / "data"),
                                                       "--img-size", "32"]), "test")
    assert set(dataset[0][1].unique().tolist()) == {0, 1}  # 255 became foreground, not ignore


def test_data_flags_reach_the_readers(tmp_path):
    """--mask-mode, --label-base and --test-split are passed to common.py's readers (each would be silently ignored
    otherwise): 0/255 masks as ids keep 255 as ignore; NYUDv2 ids 1..40 with 0 void; PraNet's Kvasir test folder."""
    write_folder(tmp_path / "folder", count=4)
    ids = masksup.get_args(["--data", "folder", "--data-root", str(tmp_path / "folder"), "--mask-mode", "ids",
                            "--img-size", "32"])
    assert set(masksup.build_split(ids, "trainval")[0][0][1].unique().tolist()) == {0, 255}
    for folder in ("train_images", "train_labels", "val_images", "val_labels"):
        (tmp_path / "nyu" / folder).mkdir(parents=True)
    for i in range(3):
        for part in ("train", "val"):
            image = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
            image.save(tmp_path / "nyu" / f"{part}_images" / f"{i}.png")
            Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16) % 41).save(
                tmp_path / "nyu" / f"{part}_labels" / f"{i}.png")
    nyu = masksup.get_args(["--data", "nyudv2", "--data-root", str(tmp_path / "nyu"), "--label-base", "1",
                            "--img-size", "16", "--arch", "unet"])
    dataset, info = masksup.build_split(nyu, "test")
    assert info.num_classes == 40 and set(dataset.load(0)[1].ravel().tolist()) == set(range(40)) | {255}
    for name, stems in (("CVC-ClinicDB", ["1", "2"]), ("Kvasir", ["k1", "k2", "k3"])):
        write_folder(tmp_path / "pranet" / "TestDataset" / name, count=len(stems))
        for i, stem in enumerate(stems):
            for sub, new in (("images", "images"), ("masks", "masks")):
                (tmp_path / "pranet" / "TestDataset" / name / sub / f"{i}.png").rename(
                    tmp_path / "pranet" / "TestDataset" / name / new / f"{stem}.png")
    kvasir = masksup.get_args(["--data", "pranet", "--data-root", str(tmp_path / "pranet"), "--test-split", "Kvasir",
                               "--img-size", "32", "--arch", "unet"])
    assert sorted(masksup.build_split(kvasir, "test")[0].names) == ["k1", "k2", "k3"]


def cpu_runtime():
    return masksup.Runtime(torch.device("cpu"))


def eval_args(*flags):
    args = masksup.get_args(TINY + list(flags))
    args.amp, args.channels_last = False, False
    masksup.resolve_recipe(args, True)
    return args


def test_evaluate_scores_masked_images_with_eval_masked():
    """Spy on what the network receives in evaluate: with --eval-masked each batch comes twice, clean and with the
    item's evaluation mask applied (holes 0); without it, clean only."""
    args = eval_args("--eval-masked")
    dataset, _ = masksup.build_split(args, "val")
    loader = masksup.make_loader(dataset, 4, args, cpu_runtime(), train=False)
    model = masksup.UNet(3, 1, width=4)
    received = []
    model.register_forward_pre_hook(lambda module, inputs: received.append(inputs[0].clone()))
    results = masksup.evaluate(model, loader, args, cpu_runtime(), 2)
    clean = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert len(received) == 2 * math.ceil(len(dataset) / 4)
    seen_clean, seen_masked = torch.cat(received[0::2]), torch.cat(received[1::2])
    assert torch.equal(seen_clean, clean)
    keys = [(args.seed, "eval-mask", i) for i in range(len(dataset))]
    expected = masksup.apply_mask(clean, masksup.item_masks(args, keys, "cpu"))
    assert torch.equal(seen_masked, expected) and not torch.equal(seen_masked, clean)
    hole_share = (seen_masked == 0).all(dim=1).float().mean().item()
    assert 0.45 < hole_share < 0.65  # high masking: 50-60 % of the pixels are holes
    assert {"masked_miou", "masked_paper_iou", "masked_fg_iou"} <= set(results)
    received.clear()
    masksup.evaluate(model, loader, eval_args(), cpu_runtime(), 2)
    assert torch.equal(torch.cat(received), clean)  # no --eval-masked: the clean images once


class PredictionFromImage(torch.nn.Module):
    """A stand-in network whose foreground logit is the image's first channel (so a test chooses the predictions)."""

    def forward(self, images):
        return images[:, :1] * 10.0


def test_paper_iou_is_the_per_image_mean_and_fg_iou_the_dataset_level_iou():
    """Image 0: truth 4 pixels, predicted exactly (IoU 1). Image 1: truth 12 pixels, 6 of them predicted (IoU 0.5).
    Paper protocol: mean of per-image IoUs = 0.75; dataset level: (4 + 6) / (4 + 12) = 0.625."""
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, 0, :4] = 1
    labels[1, :3, :] = 1
    predicted = labels.clone()
    predicted[1, 1:3, 1:4] = 0  # drop 6 of image 1's 12 foreground pixels
    images = (predicted.float() * 2 - 1)[:, None].expand(2, 3, 4, 4)
    dataset = [(images[i], labels[i]) for i in range(2)]
    args = eval_args()
    args.img_size = 4
    loader = masksup.make_loader(dataset, 2, args, cpu_runtime(), train=False)
    results = masksup.evaluate(PredictionFromImage(), loader, args, cpu_runtime(), 2)
    assert results["paper_iou"] == pytest.approx(0.75)
    assert results["fg_iou"] == pytest.approx(0.625)
    # background over both images: 16 true pixels, 22 predicted, 16 shared
    assert results["miou"] == pytest.approx((0.625 + 16 / 22) / 2)


def test_evaluate_uses_eval_mode_and_training_uses_train_mode():
    """Spy on every BatchNorm (and the network) at each forward: evaluate runs them in eval mode (running
    statistics) even when called right after training, train_one_epoch in train mode."""
    args = eval_args()
    dataset, _ = masksup.build_split(args, "val")
    model = masksup.UNet(3, 1, width=4)
    modes = []
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm2d, masksup.UNet)):
            module.register_forward_pre_hook(lambda module, inputs: modes.append(module.training))
    model.train()
    masksup.evaluate(model, masksup.make_loader(dataset, 4, args, cpu_runtime(), train=False), args, cpu_runtime(), 2)
    assert modes and not any(modes)
    modes.clear()
    model.eval()
    loader = masksup.make_loader(dataset, 4, args, cpu_runtime(), train=True)
    loader.sampler.set_epoch("train", 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    masksup.train_one_epoch(model, masksup.train_step, optimizer, loader, args, cpu_runtime(), 1, masksup.FiniteGuard())
    assert modes and all(modes)


def test_network_runs_under_autocast_exactly_when_the_runtime_says_amp(tmp_path):
    """train_step, evaluate and save_samples use the run's autocast(runtime): bf16 activations with --amp (CPU
    autocast), float32 without, whatever a stale args.amp says."""
    args = eval_args()
    dataset, _ = masksup.build_split(args, "val")
    info = masksup.build_split(args, "val")[1]
    model = masksup.UNet(3, 1, width=4)
    dtypes = []
    model.head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    images, labels = torch.stack([dataset[i][0] for i in range(2)]), torch.stack([dataset[i][1] for i in range(2)])
    mask = masksup.item_masks(args, [(0, "mask", 1, 0), (0, "mask", 1, 1)], "cpu")
    for amp, expected in ((True, torch.bfloat16), (False, torch.float32)):
        runtime = masksup.Runtime(torch.device("cpu"), amp=amp)
        args.amp = not amp
        dtypes.clear()
        masksup.train_step(model, torch.optim.SGD(model.parameters(), lr=0.0), images, labels, mask, args, runtime)
        masksup.evaluate(model, masksup.make_loader(dataset, 4, args, runtime, train=False), args, runtime, 2)
        masksup.save_samples(model, dataset, args, info.palette[:2], tmp_path / "samples.png", runtime)
        assert len(dtypes) == 2 + -(-len(dataset) // 4) + 2 and set(dtypes) == {expected}, (amp, dtypes)


def test_training_masks_follow_the_image_not_the_batch_or_the_rank():
    """Spy on train_step: each training image gets the same mask with batch 4 on one process as with batch 2 on
    either of two ranks (what makes torchrun with batch B equal one process with batch 2B), and a new one next epoch."""
    args = eval_args()
    dataset, _ = masksup.build_split(args, "train")

    def masks_seen(batch_size, runtime, epoch=1):
        seen = {}

        def spy(model, optimizer, images, labels, mask, run_args, runtime):
            for image, hole in zip(images, mask):
                seen[image.sum().item()] = hole.clone()
            return torch.zeros(4)
        loader = masksup.make_loader(dataset, batch_size, args, runtime, train=True)
        loader.sampler.set_epoch("train", epoch)
        masksup.train_one_epoch(torch.nn.Identity(), spy, None, loader, args, runtime, epoch, masksup.FiniteGuard())
        return seen
    single = masks_seen(4, cpu_runtime())
    ranks = {**masks_seen(2, masksup.Runtime(torch.device("cpu"), 0, 2)),
             **masks_seen(2, masksup.Runtime(torch.device("cpu"), 1, 2))}
    assert len(single) == len(dataset) and set(ranks) == set(single)
    assert all(torch.equal(single[key], ranks[key]) for key in single)
    later = masks_seen(4, cpu_runtime(), epoch=2)
    assert not any(torch.equal(single[key], later[key]) for key in single)


def write_coded_splits(root, counts):
    """--data folder with its own train/, val/ and test/ folders; every image is one flat colour that codes its
    (split, index), so a test reads from the pixels where an image came from."""
    for code, (split, count) in enumerate(counts.items()):
        for folder in ("images", "masks"):
            (root / split / folder).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.full((32, 32, 3), (40 * code + 20, 10 * i + 5, 0), dtype=np.uint8)).save(
                root / split / "images" / f"{i}.png")
            mask = np.zeros((32, 32), dtype=np.uint8)
            mask[8:24, 8 + i:24] = 255
            Image.fromarray(mask).save(root / split / "masks" / f"{i}.png")


def decode_splits(images, names=("train", "val", "test")):
    """(B, 3, H, W) in [-1, 1] from write_coded_splits -> [(split, index)] read from the top-left pixel."""
    red, green = ((images[:, :2, 0, 0] + 1) * 127.5).round().long().T.tolist()
    return [(names[(r - 20) // 40], (g - 5) // 10) for r, g in zip(red, green)]


@pytest.mark.parametrize("select_on", ["val", "test"])
def test_training_sees_only_train_images_and_selection_only_its_split(select_on, tmp_path, monkeypatch):
    """Split membership on the datasets the real run builds: train_step receives every train/ image once per epoch
    and never a val/ or test/ one (no validation image merged into training); evaluate receives val/ each epoch and
    at the end, then test/. --select-on test (the authors' protocol) trains on train/ + val/ and selects on test/."""
    write_coded_splits(tmp_path / "data", {"train": 8, "val": 4, "test": 4})
    args = masksup.get_args(["--data", "folder", "--data-root", str(tmp_path / "data"), "--arch", "unet",
                             "--unet-width", "4", "--img-size", "32", "--batch-size", "4", "--epochs", "2",
                             "--workers", "0", "--device", "cpu", "--select-on", select_on,
                             "--out", str(tmp_path / "run")])
    seen, evaluated = [], []
    real_step, real_evaluate = masksup.train_step, masksup.evaluate

    def spy_step(model, optimizer, images, labels, mask, run_args, runtime):
        seen.extend(decode_splits(images))
        return real_step(model, optimizer, images, labels, mask, run_args, runtime)

    def spy_evaluate(model, loader, *rest, **kwargs):
        evaluated.append(sorted(decode_splits(torch.stack([image for image, _ in loader.dataset.dataset]))))
        return real_evaluate(model, loader, *rest, **kwargs)
    monkeypatch.setattr(masksup, "train_step", spy_step)
    monkeypatch.setattr(masksup, "evaluate", spy_evaluate)
    masksup.main(args)
    train = [("train", i) for i in range(8)] + ([("val", i) for i in range(4)] if select_on == "test" else [])
    select, test = [(select_on, i) for i in range(4)], [("test", i) for i in range(4)]
    assert sorted(seen) == sorted(train * 2)  # each training image once per epoch, nothing else
    assert evaluated == [select, select] + ([select, test] if select_on == "val" else [test])


# --- training, resume, DDP ---

def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_run_learns_and_beats_chance(tmp_path):
    out = tmp_path / "run"
    args = masksup.get_args(["--out", str(out), "--epochs", "4", "--img-size", "32", "--limit", "96",
                             "--batch-size", "8", "--unet-width", "8", "--lr", "3e-3", "--eval-masked",
                             "--device", "cpu", "--select-by", "paper_iou"])
    results = masksup.main(args)
    assert args.binary_task  # shapes default: object vs background, one logit + BCE
    records = read_metrics(out)
    scores = [r["val_paper_iou"] for r in records]  # --select-by paper_iou picks best.pt by the paper's protocol
    assert results["best_val_paper_iou"] == max(scores) and results["best_epoch"] == scores.index(max(scores)) + 1
    assert records[-1]["loss"] < 0.8 * records[0]["loss"]
    for split in ("val", "test"):
        metrics = results[split]
        # chance: "all background" scores pixel_acc = background share b, mIoU = b / 2, foreground IoU 0
        dataset, _ = masksup.build_split(args, split)
        labels = torch.stack([dataset[i][1] for i in range(len(dataset))])
        background = (labels == 0).float().mean().item()
        assert metrics["miou"] > background / 2 + 0.1 and metrics["fg_iou"] > 0.25, (metrics, background)
        for key in ("miou", "paper_iou", "pixel_acc", "dice", "masked_miou", "masked_paper_iou"):
            assert 0.0 <= metrics[key] <= 1.0
    for name in ("config.json", "last.pt", "best.pt", "results.json"):
        assert (out / name).is_file()
    assert sorted(p.name for p in (out / "samples").glob("*.png")) == [f"epoch_{e:03d}.png" for e in range(1, 5)]
    assert json.loads((out / "config.json").read_text())["arch"] == "unet"


def test_baseline_and_binary_paths(tmp_path):
    out = tmp_path / "baseline"
    results = masksup.main(masksup.get_args(TINY + ["--out", str(out), "--epochs", "1", "--binary",
                                                    "--alpha2", "0", "--alpha3", "0"]))
    record = read_metrics(out)[0]
    assert record["context"] == 0.0 and record["tasksim"] == 0.0 and record["loss"] == record["seg"]
    assert {"paper_iou", "fg_iou", "dice", "miou"} <= set(results["test"])
    # --eval-only reloads best.pt and scores it the same
    again = masksup.main(masksup.get_args(TINY + ["--out", str(out), "--binary", "--eval-only"]))
    assert again["test"]["paper_iou"] == pytest.approx(results["test"]["paper_iou"])


def test_folder_masking_and_select_on_test(tmp_path):
    """--masking folder trains and evaluates with the user's masks; --select-on test (the authors' protocol)
    trains on trainval and scores only test."""
    for i in range(3):
        array = np.zeros((16, 16), dtype=np.uint8)
        array[i * 8:(i + 1) * 8] = 255 if i < 2 else 0
        array[:4, :] = 255 if i == 2 else array[:4, :]  # mask 2: 25 % holes, outside the high bin
        Image.fromarray(array).save(tmp_path / f"mask{i}.png")
    out = tmp_path / "run"
    args = masksup.get_args(TINY + ["--epochs", "1", "--masking", "folder", "--mask-dir", str(tmp_path),
                                    "--mask-area", "high", "--select-on", "test", "--eval-masked", "--out", str(out)])
    results = masksup.main(args)
    config = json.loads((out / "config.json").read_text())
    assert config["mask_files"] == {"kept": 2, "per_bin": {"low": 0, "high": 2, "any": 3}}  # --mask-area reached it
    assert set(results) >= {"test", "best_epoch"} and "val" not in results
    assert 0.0 <= results["test"]["masked_paper_iou"] <= 1.0
    assert "test_miou" in read_metrics(out)[0]


def test_resume_is_bit_for_bit(tmp_path):
    flags = TINY + ["--masking", "patch", "--patch-size", "8", "--no-binary"]  # multi-class path
    masksup.main(masksup.get_args(flags + ["--epochs", "2", "--out", str(tmp_path / "straight")]))
    masksup.main(masksup.get_args(flags + ["--epochs", "1", "--out", str(tmp_path / "split")]))
    masksup.main(masksup.get_args(flags + ["--epochs", "2", "--out", str(tmp_path / "split"), "--resume"]))
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    assert straight["epoch"] == split["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, split["model"][key]), key
    losses = [[r["loss"] for r in read_metrics(tmp_path / run)] for run in ("straight", "split")]
    assert losses[0] == losses[1]


# --- CLI ---

def run_cli(*flags, cwd):
    return subprocess.run([sys.executable, str(ROOT / "masksup.py"), *flags], capture_output=True, text=True,
                          timeout=180, cwd=cwd, env=SINGLE_THREAD)


def test_cli_smoke_and_existing_run_directory(tmp_path):
    result = run_cli(*TINY, "--epochs", "1", "--out", "run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch=1 " in result.stdout and "final=test" in result.stdout
    assert (tmp_path / "run" / "results.json").is_file()
    with pytest.raises(masksup.UsageError, match="--resume"):  # never overwrite a run directory
        masksup.main(masksup.get_args(TINY + ["--epochs", "1", "--out", str(tmp_path / "run")]))


@pytest.mark.parametrize("flags, message", [
    (["--arch", "levit-192", "--img-size", "64"], "--img-size 224"),
    (["--masking", "folder"], "--mask-dir"),
    (["--mask-ratio", "1.5", "--masking", "patch"], "--mask-ratio"),
    (["--img-size", "40"], "multiple of 16"),
    (["--alpha1", "0", "--alpha2", "0", "--alpha3", "0"], "nothing to train"),
    (["--alpha3", "-1"], "--alpha3"),
    (["--levit-weights", "missing.pth", "--arch", "levit-128s"], "--levit-weights"),
])
def test_bad_flags_name_the_flag(flags, message, capsys):
    with pytest.raises(SystemExit):
        masksup.get_args(flags)
    assert message in capsys.readouterr().err


def test_bad_data_gives_one_clear_line(tmp_path):
    result = run_cli("--data", "kvasir", "--data-root", str(tmp_path / "nowhere"), "--arch", "unet", "--img-size",
                     "32", "--out", "run", cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and "nowhere" in result.stderr and result.stderr.count("\n") == 1
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match="no mask images"):
        masksup.main(masksup.get_args(TINY + ["--masking", "folder", "--mask-dir", str(tmp_path / "masks"),
                                              "--out", str(tmp_path / "run2")]))


# --- real samples ---

@pytest.mark.skipif(not (SHARED_DATA / "Kvasir-SEG").is_dir(), reason="shared data folder ../shared/data is absent")
def test_real_kvasir_samples(tmp_path):
    out = tmp_path / "kvasir"
    args = masksup.get_args(["--data", "kvasir", "--data-root", str(SHARED_DATA / "Kvasir-SEG"), "--arch", "unet",
                             "--img-size", "32", "--limit", "12", "--batch-size", "6", "--unet-width", "8",
                             "--epochs", "1", "--workers", "0", "--eval-masked", "--out", str(out)])
    results = masksup.main(args)
    assert args.binary_task and json.loads((out / "config.json").read_text())["num_classes"] == 2
    for key in ("miou", "paper_iou", "fg_iou", "dice", "masked_paper_iou"):
        assert 0.0 <= results["test"][key] <= 1.0
    # the polyp setting: Kvasir-SEG + CVC-ClinicDB training images from one --data-root
    polyps = masksup.get_args(["--data", "polyps", "--data-root", str(SHARED_DATA), "--arch", "unet",
                               "--img-size", "32"])
    train_set, info = masksup.build_split(polyps, "train")
    kvasir, _ = masksup.build_split(masksup.get_args(["--data", "kvasir", "--data-root",
                                                      str(SHARED_DATA / "Kvasir-SEG"), "--arch", "unet"]), "train")
    assert info.binary and len(train_set) > len(kvasir)
    image, label = train_set[len(train_set) - 1]  # a CVC-ClinicDB frame (numpy TIFF reader), resized
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) <= {0, 1}
