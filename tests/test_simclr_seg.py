"""Tests for simclr_seg.py: views, data, splits, model, transfer, losses, loops, runs, the Table 4.1 script, CLI.

Run as a script under torchrun (see test_torchrun_gloo_uses_all_ranks_negatives) it is the 2-process worker.
"""
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also when this file is run on its own
    sys.path.insert(0, str(ROOT))

import simclr_seg  # noqa: E402
from common import BinaryStats, DatasetError, bce_loss, build_dataset, check_labels, dice_loss, focal_loss  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMALL_MODEL = ["--projection-hidden-dim", "32", "--projection-dim", "16", "--decoder-channels", "32", "16", "16", "8",
               "8", "--device", "cpu", "--workers", "0"]
# tests/test_contract.py: the whole pipeline (2 pre-training + 2 fine-tuning epochs) in a few seconds on one thread;
# 64 px so that a training batch of one image still gives BatchNorm 2 x 2 values at layer4 (torchrun --limit 1)
CONTRACT_TINY = ["--img-size", "64", "--synthetic-images", "24", "--batch-size", "8", "--pretrain-batch-size", "8",
                 "--epochs", "2", "--pretrain-epochs", "2", *SMALL_MODEL]
# ... and one step per stage (8 images each) for the torchrun equivalence test: 2 processes with these
# batches vs 1 with twice them
CONTRACT_ONE_STEP = ["--img-size", "64", "--synthetic-images", "24", "--limit", "8", "--epochs", "1",
                     "--pretrain-epochs", "1", *SMALL_MODEL, "--batch-size", "4", "--pretrain-batch-size", "4"]
# ... and the same on a fake Oxford-IIIT Pet tree: the contract test passes its oxford-iiit-pet folder as --data-root
CONTRACT_FOLDER = ["--data", "pets", "--pretrain-data", "pets", "--arch", "resnet18", "--img-size", "64",
                   "--batch-size", "8", "--pretrain-batch-size", "8", "--epochs", "1", "--pretrain-epochs", "1",
                   *SMALL_MODEL]
# Tiny CPU preset of the tests below: ResNet-18 at 32 px, a few dozen synthetic images
TINY = ["--img-size", "32", "--synthetic-images", "48", "--batch-size", "8", "--pretrain-batch-size", "8", *SMALL_MODEL]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain little from a second one, and lose several times over when the
    2 cores are shared with other processes (measured: the training test took 17 s with 1 thread, 118 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(tmp_path, *extra, name="run", base=TINY):
    args = simclr_seg.get_args([*base, "--out", str(tmp_path / name), *extra])
    return args, simclr_seg.main(args)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def runtime():
    return simclr_seg.Runtime(torch.device("cpu"))


def make_pets(root, trimaps):
    """A fake oxford-iiit-pet/ release under root: one 32x32 image per (32, 32) uint8 trimap, all in trainval
    -> the oxford-iiit-pet folder (what --data-root takes)."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    stems = [f"{'Abyssinian' if i % 2 else 'beagle'}_{i}" for i in range(len(trimaps))]
    rng = np.random.default_rng(0)
    for stem, trimap in zip(stems, trimaps):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(base / "images" / f"{stem}.jpg")
        Image.fromarray(trimap).save(base / "annotations" / "trimaps" / f"{stem}.png")
    (base / "annotations" / "trainval.txt").write_text("".join(f"{s} 1 1 1\n" for s in stems))
    (base / "annotations" / "test.txt").write_text("")
    return base


# --- views (Sec. 2.1) ---

def test_two_views_differ_keep_shape_and_are_seeded():
    images, _ = build_dataset("shapes", split="unlabeled", transform=simclr_seg.keep_image, image_only=True,
                              image_size=(40, 56), num_images=4)
    views = simclr_seg.SeededItems(simclr_seg.TwoViews(images, simclr_seg.simclr_augmentation(32)))
    view1, view2 = views[(1, 11)]
    assert view1.shape == view2.shape == (3, 32, 32) and view1.dtype == torch.float32
    assert not torch.equal(view1, view2)
    again1, again2 = views[(1, 11)]
    assert torch.equal(view1, again1) and torch.equal(view2, again2)  # a function of the item seed
    assert not torch.equal(views[(1, 12)][0], view1)  # another seed (epoch), other views
    state = torch.get_rng_state()
    views[(2, 5)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched


def test_views_are_the_same_for_any_worker_count():
    args = simclr_seg.get_args([*TINY, "--limit", "16"])  # 2 batches of 8 images per epoch
    data = simclr_seg.build_pretrain_data(args)
    seen = {}
    for workers in (0, 2):
        args.workers = workers
        loader = simclr_seg.make_loader(data["train"], 8, args, runtime(), train=True)  # persistent workers if > 0
        seen[workers] = []
        for epoch in (1, 2):
            loader.sampler.set_epoch("pretrain", epoch)
            seen[workers] += [torch.cat(views) for views in loader]
    assert len(seen[0]) == 4 and all(torch.equal(a, b) for a, b in zip(seen[0], seen[2]))
    assert not torch.equal(seen[0][0], seen[0][2])  # a new epoch draws new views


def test_augmentation_parameters_are_the_docstring_s():
    """CHOICE C2 on real data: crop 0.08-1 (aspect 3/4-4/3), flip 0.5, jitter (0.8, 0.8, 0.8, 0.2) p 0.8, grey 0.2,
    blur kernel 23 at 224 with sigma 0.1-2 and p 0.5, read from the transform a pets run builds."""
    args = simclr_seg.get_args(["--data", "pets", "--stage", "pretrain"])
    crop, flip, jitter, grey, blur = simclr_seg.pretrain_augmentation(args).transforms[:5]
    assert tuple(crop.size) == (224, 224) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert flip.p == 0.5
    color = jitter.transforms[0]
    assert jitter.p == 0.8 and color.brightness == color.contrast == color.saturation == pytest.approx((0.2, 1.8))
    assert color.hue == pytest.approx((-0.2, 0.2))
    assert type(grey).__name__ == "RandomGrayscale" and grey.p == 0.2
    assert blur.p == 0.5 and tuple(blur.transforms[0].kernel_size) == (23, 23)
    assert blur.transforms[0].sigma == pytest.approx([0.1, 2.0])
    # the pre-training dataset uses exactly this transform
    images = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    two = simclr_seg.TwoViews(images, simclr_seg.pretrain_augmentation(args))
    assert repr(two.augment) == repr(simclr_seg.simclr_augmentation(224, 1.0, 0.5, (0.08, 1.0)))


def test_pretrain_folder_skips_and_counts_unreadable_files(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, folder in enumerate((tmp_path / "a", tmp_path / "a" / "b", tmp_path)):
        Image.new("RGB", (40 + i, 36), (10 * i, 20, 30)).save(folder / f"img{i}.png")
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:len(good.read_bytes()) // 2])  # header intact
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    args = simclr_seg.get_args(["--pretrain-data", "folder", "--pretrain-root", str(tmp_path)])
    images, skipped = simclr_seg.build_pretrain_images(args)
    assert len(images) == 4 and skipped == 2  # the truncated JPEG passes Image.verify() but not a full decode
    assert sorted(tuple(images[i].shape) for i in range(4)) == [(3, 36, 40), (3, 36, 41), (3, 36, 42), (3, 64, 64)]
    assert images[0].dtype == torch.uint8


def test_pretrain_limit_is_a_seeded_class_balanced_draw(tmp_path):
    for name, count in (("cat", 3), ("dog", 9)):
        (tmp_path / name).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8), (i, 0, 0)).save(tmp_path / name / f"{i}.png")
    args = simclr_seg.get_args(["--pretrain-data", "folder", "--pretrain-root", str(tmp_path), "--pretrain-limit",
                                "4"])
    images, _ = simclr_seg.build_pretrain_images(args)
    picked = [images.dataset.image_paths[i] for i in images.indices]
    assert sum("/cat/" in p for p in picked) == 2 and sum("/dog/" in p for p in picked) == 2
    args.pretrain_limit = 8  # only 3 cats: the dogs fill the rest
    images, _ = simclr_seg.build_pretrain_images(args)
    assert sum("/cat/" in images.dataset.image_paths[i] for i in images.indices) == 3 and len(images) == 8
    draws = {tuple(simclr_seg.balanced_draw(["x"] * 20, 5, seed)) for seed in (0, 0, 1)}
    assert len(draws) == 2  # seeded: the same seed the same draw, another seed another one


def test_catsdogs_pretraining_reports_truncated_files_and_balances(tmp_path):
    rng = np.random.default_rng(0)
    for name, count in (("Cat", 5), ("Dog", 5)):
        (tmp_path / "PetImages" / name).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(
                tmp_path / "PetImages" / name / f"{i}.jpg")
    whole = (tmp_path / "PetImages" / "Cat" / "0.jpg").read_bytes()
    (tmp_path / "PetImages" / "Cat" / "0.jpg").write_bytes(whole[:len(whole) // 2])  # truncated, header intact
    args = simclr_seg.get_args(["--pretrain-data", "catsdogs", "--pretrain-root", str(tmp_path)])
    images, skipped = simclr_seg.build_pretrain_images(args)
    assert len(images) == 9 and skipped == 1
    assert all(images[i].shape == (3, 48, 48) for i in range(len(images)))  # every kept file decodes
    args.pretrain_limit = 6
    images, _ = simclr_seg.build_pretrain_images(args)
    assert sum("/Cat/" in p for p in images.image_paths) == 3 and len(images) == 6


# --- Pet splits (Sec. 3.1) ---

def test_pet_splits_test_fixed_no_overlap_sizes():
    n = 3680 + 3669  # Oxford-IIIT Pet: annotations/trainval.txt + annotations/test.txt
    splits = {dev: simclr_seg.pet_splits(n, dev, seed=0) for dev in (0.8, 0.5, 0.2)}
    assert [len(splits[0.8][k]) for k in ("train", "val", "test")] == [5291, 588, 1470]  # the docstring's counts
    assert len(splits[0.5]["train"]) + len(splits[0.5]["val"]) == 3674
    for dev, s in splits.items():
        assert s["test"] == splits[0.8]["test"]
        n_dev = round(dev * n)
        assert len(s["train"]) + len(s["val"]) == n_dev and len(s["val"]) == round(0.1 * n_dev)
        assert len(s["unused"]) == n - 1470 - n_dev
        parts = [set(s[k]) for k in ("train", "val", "test", "unused")]
        assert sum(map(len, parts)) == n and set().union(*parts) == set(range(n))
    dev = lambda s: set(s["train"]) | set(s["val"])  # noqa: E731
    assert dev(splits[0.2]) < dev(splits[0.5]) < dev(splits[0.8])  # nested dev sets (CHOICE C9)
    assert simclr_seg.pet_splits(n, 0.8, seed=1)["test"] != splits[0.8]["test"]


def test_pet_splits_too_small_is_a_clear_error():
    with pytest.raises(DatasetError, match="val split of 4 images is empty"):
        simclr_seg.pet_splits(4, 0.5)


def test_trimap_border_rule_by_hand(tmp_path):
    """CHOICE C8: trimap 1 pet -> 1, 2 background -> 0, 3 border -> --border (foreground by default)."""
    trimap = np.full((32, 32), 2, np.uint8)
    trimap[8:24, 8:24] = 1
    trimap[8, 8:24] = 3
    root = make_pets(tmp_path, [trimap] * 10)
    expected = {"foreground": 1, "background": 0, "ignore": 255}
    for border, value in expected.items():
        flags = ["--data", "pets", "--data-root", str(root), "--img-size", "32"]
        args = simclr_seg.get_args(flags + (["--border", border] if border != "foreground" else []))
        _, label = simclr_seg.build_pool(args, simclr_seg.joint_transform(32))[0]
        truth = torch.zeros(32, 32, dtype=torch.int64)
        truth[8:24, 8:24] = 1
        truth[8, 8:24] = value
        assert torch.equal(label, truth), border


def test_pets_trimap_value_77_is_an_error_before_training(tmp_path):
    trimap = np.full((32, 32), 2, np.uint8)
    bad = trimap.copy()
    bad[0, 0] = 77
    root = make_pets(tmp_path, [trimap] * 9 + [bad])
    args = simclr_seg.get_args(["--data", "pets", "--data-root", str(root), "--img-size", "32", "--stage",
                                "finetune", "--out", str(tmp_path / "r")])
    pool = simclr_seg.build_pool(args, simclr_seg.joint_transform(32))
    with pytest.raises(DatasetError, match=r"class ids \[77\]"):
        check_labels(pool)
    with pytest.raises(DatasetError, match="77"):  # the run refuses it before --out exists
        simclr_seg.main(args)
    assert not (tmp_path / "r").exists()


# --- model ---

def test_projection_head_and_simclr_shapes():
    head = simclr_seg.ProjectionHead(2048, 512, 128)
    assert [tuple(p.shape) for p in head.parameters()] == [(512, 2048), (512,), (128, 512), (128,)]
    assert isinstance(head[1], torch.nn.ReLU)
    model = simclr_seg.SimCLR("resnet18", hidden_dim=64, projection_dim=32)
    assert model(torch.randn(3, 3, 32, 64)).shape == (3, 32)
    assert model.encoder(torch.randn(3, 3, 32, 64)).shape == (3, 512)


@pytest.mark.parametrize("encoder,size", [("resnet50", (32, 64)), ("resnet18", (40, 72))])  # 40, 72: not /32
def test_unet_shapes_non_square(encoder, size):
    model = simclr_seg.SimCLRUNet(encoder, (32, 16, 16, 8, 8))
    features = model.encoder.features(torch.randn(2, 3, *size))
    assert [f.shape[1] for f in features] == list(simclr_seg.ENCODER_CHANNELS[encoder])
    assert model(torch.randn(2, 3, *size)).shape == (2, 1, *size)


# --- weight transfer (Sec. 2.2 step 1) ---

def test_transfer_loads_every_encoder_tensor():
    torch.manual_seed(0)
    pretrained = simclr_seg.SimCLR("resnet18", 64, 32)
    unet = simclr_seg.SimCLRUNet("resnet18", (32, 16, 16, 8, 8))
    decoder_before = {k: v.clone() for k, v in unet.decoder.state_dict().items()}
    count = simclr_seg.transfer_encoder_weights(unet, pretrained.state_dict())
    encoder_state = unet.encoder.state_dict()
    assert count == len(encoder_state) == 120  # ResNet-18: 20 convolutions + 20 BatchNorms x 5 tensors
    for key, value in pretrained.encoder.state_dict().items():
        assert torch.equal(encoder_state[key], value), key
    assert all(torch.equal(v, unet.decoder.state_dict()[k]) for k, v in decoder_before.items())
    import torchvision
    bare = torchvision.models.resnet18(weights=None).state_dict()  # a bare torchvision file (fc.* ignored)
    assert simclr_seg.transfer_encoder_weights(unet, bare) == 120
    assert torch.equal(unet.encoder.conv1.weight, bare["conv1.weight"])


def test_transfer_fails_loudly_on_a_mismatched_checkpoint():
    unet = simclr_seg.SimCLRUNet("resnet18", (32, 16, 16, 8, 8))
    resnet50 = simclr_seg.SimCLR("resnet50", 64, 32).state_dict()
    with pytest.raises(simclr_seg.UsageError, match="of another shape.*same --arch"):
        simclr_seg.transfer_encoder_weights(unet, resnet50)
    partial = {k: v for k, v in simclr_seg.SimCLR("resnet18", 64, 32).state_dict().items() if "layer4" not in k}
    with pytest.raises(simclr_seg.UsageError, match=r"missing \(e.g. layer4"):
        simclr_seg.transfer_encoder_weights(unet, partial)
    with pytest.raises(simclr_seg.UsageError, match="missing"):  # the authors' bug: keys that match nothing
        simclr_seg.transfer_encoder_weights(unet, {"model." + k: v for k, v in partial.items()})


def test_imagenet_init_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(simclr_seg.UsageError, match="ImageNet weights for resnet18 not found.*--download"):
        simclr_seg.load_imagenet_weights("resnet18", "imagenet")
    import torchvision
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    assert "layer4.1.bn2.running_var" in simclr_seg.load_imagenet_weights("resnet18", f"imagenet:{path}")


# --- losses ---

def nt_xent_loop(z1, z2, temperature):
    """Slow reference: Eq. (2.1) with explicit loops over anchors and candidates, float64, differentiable."""
    z = torch.cat([z1, z2]).double()
    z = [row / row.norm() for row in z]
    n, total = len(z), 0.0
    for i in range(n):
        j = (i + n // 2) % n  # row k of z1 pairs with row k of z2
        denominator = sum(torch.exp(z[i] @ z[k] / temperature) for k in range(n) if k != i)
        total = total - torch.log(torch.exp(z[i] @ z[j] / temperature) / denominator)
    return total / n


def test_nt_xent_equals_loop_reference():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    for temperature in (0.1, 0.5):
        expected = nt_xent_loop(z1, z2, temperature).item()
        assert simclr_seg.nt_xent_loss(z1, z2, temperature).item() == pytest.approx(expected, rel=1e-5)
    # normalised: scaling a projection changes nothing
    scaled = simclr_seg.nt_xent_loss(3 * z1, z2 * 0.2, 0.1).item()
    assert scaled == pytest.approx(nt_xent_loop(z1, z2, 0.1).item(), rel=1e-5)


def test_nt_xent_hand_value_and_minimal_when_views_coincide():
    z = torch.eye(3, 8)  # three orthogonal unit projections
    # identical views: positive similarity 1, the 4 negatives 0 -> l = -log(e^2 / (e^2 + 4)) at tau = 0.5
    loss = simclr_seg.nt_xent_loss(z, z.clone(), temperature=0.5)
    assert loss.item() == pytest.approx(math.log(1 + 4 * math.exp(-2)), rel=1e-6)
    torch.manual_seed(1)
    for _ in range(5):
        assert simclr_seg.nt_xent_loss(z, z + 0.3 * torch.randn(3, 8), 0.5) > loss


def test_nt_xent_is_fp32_under_bf16_autocast():
    """CHOICE C3: loss and gradient under CPU bf16 autocast equal the fp32 ones; a bf16 similarity matmul (what
    autocast does to `z @ candidates.T` unless the loss turns it off) misses the gradient by about 1 %."""
    torch.manual_seed(0)
    base = torch.randn(16, 128)
    z1_ref, z2_ref = base.clone().requires_grad_(), (base + 0.05 * torch.randn(16, 128)).requires_grad_()
    reference = simclr_seg.nt_xent_loss(z1_ref, z2_ref, 0.1)  # near cos = 1, tau 0.1: where bf16 hurts most
    reference.backward()
    z1, z2 = z1_ref.detach().clone().requires_grad_(), z2_ref.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = simclr_seg.nt_xent_loss(z1, z2, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(z1.grad, z1_ref.grad, rtol=1e-5, atol=1e-8)
    assert torch.allclose(z2.grad, z2_ref.grad, rtol=1e-5, atol=1e-8)
    # the same loss with the matmul in bf16: a test that compares with fp32 would notice it
    z1_bf, z2_bf = z1_ref.detach().clone().requires_grad_(), z2_ref.detach().clone().requires_grad_()
    z = F.normalize(torch.cat([z1_bf, z2_bf]), dim=1)
    logits = (z.bfloat16() @ z.bfloat16().T).float() / 0.1
    logits = logits.masked_fill(torch.eye(32, dtype=torch.bool), float("-inf"))
    F.cross_entropy(logits, (torch.arange(32) + 16) % 32).backward()
    error = (z1_bf.grad - z1_ref.grad).norm() / z1_ref.grad.norm()
    assert error > 1e-3


def test_segmentation_loss_matches_common_and_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 5, 6)
    labels = torch.randint(0, 2, (2, 5, 6))
    targets = labels.float().unsqueeze(1)
    for kind, reference in (("bce", bce_loss), ("dice", dice_loss), ("focal", focal_loss)):
        ours = simclr_seg.segmentation_loss(logits, labels, kind)
        assert ours.item() == pytest.approx(reference(logits, targets).item(), rel=1e-6)
        ignored = labels.clone()
        ignored[:, 0] = 255  # first rows ignored: the loss equals the loss of the other rows alone
        expected = reference(logits[:, :, 1:], targets[:, :, 1:]).item()
        assert simclr_seg.segmentation_loss(logits, ignored, kind).item() == pytest.approx(expected, rel=1e-6)


def test_lars_step_by_hand():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = simclr_seg.LARS([{"params": [weight]}, {"params": [bias], "lars": False, "weight_decay": 0.0}],
                                lr=0.5, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001)
    weight.grad, bias.grad = torch.tensor([0.6, 0.8]), torch.tensor([2.0])  # gradient norm 1: trust = 0.005
    optimizer.step()
    assert torch.allclose(weight.detach(), torch.tensor([3 - 0.5 * 0.005 * 0.6, 4 - 0.5 * 0.005 * 0.8]))
    assert torch.allclose(bias.detach(), torch.tensor([1 - 0.5 * 2.0]))
    optimizer.step()  # momentum: v = 0.9 v + g
    assert torch.allclose(bias.detach(), torch.tensor([0.0 - 0.5 * (0.9 * 2.0 + 2.0)]))


def test_lars_weight_decay_and_parameter_groups_by_hand():
    """CHOICE C4 through build_optimizer: conv/linear weights decayed and trust-scaled, biases and BN neither."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2), torch.nn.Flatten(),
                                torch.nn.Linear(2, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([3.0, 4.0]).view(2, 1, 1, 1))  # norm 5
        model[0].bias.fill_(0.5)
        model[3].weight.copy_(torch.tensor([[0.0, -2.0]]))  # norm 2
        model[3].bias.fill_(0.25)
    args = simclr_seg.get_args(["--pretrain-optimizer", "lars", "--pretrain-lr", "0.5", "--weight-decay", "0.1",
                                "--warmup-epochs", "0", "--pretrain-epochs", "10"])
    optimizer, scheduler = simclr_seg.build_optimizer("pretrain", model, args, steps_per_epoch=100)
    adapted, excluded = optimizer.param_groups
    assert {id(p) for p in adapted["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in excluded["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[3].bias)}
    assert adapted["lars"] and adapted["weight_decay"] == 0.1
    assert not excluded["lars"] and excluded["weight_decay"] == 0.0
    grads = {model[0].weight: torch.tensor([1.0, 0.0]).view(2, 1, 1, 1), model[0].bias: torch.tensor([1.0, -1.0]),
             model[1].weight: torch.tensor([-1.0, 2.0]), model[1].bias: torch.tensor([0.5, 0.5]),
             model[3].weight: torch.tensor([[1.0, 1.0]]), model[3].bias: torch.tensor([-2.0])}
    before = {p: p.detach().clone() for p in grads}
    for p, g in grads.items():
        p.grad = g.clone()
    optimizer.step()
    # conv: g' = g + 0.1 w = (1.3, 0.4); trust = 0.001 * 5 / |g'|; w <- w - 0.5 * trust * g'
    decayed = torch.tensor([1.3, 0.4])
    expected = torch.tensor([3.0, 4.0]) - 0.5 * 0.001 * 5 / decayed.norm() * decayed
    assert torch.allclose(model[0].weight.detach().flatten(), expected, rtol=1e-6)
    # linear: g' = (1, 1) + 0.1 (0, -2) = (1, 0.8); trust = 0.001 * 2 / |g'|
    decayed = torch.tensor([1.0, 0.8])
    expected = torch.tensor([0.0, -2.0]) - 0.5 * 0.001 * 2 / decayed.norm() * decayed
    assert torch.allclose(model[3].weight.detach().flatten(), expected, rtol=1e-6)
    for p in (model[0].bias, model[1].weight, model[1].bias, model[3].bias):  # plain SGD step: no decay, no trust
        assert torch.allclose(p.detach(), before[p] - 0.5 * grads[p])


def test_warmup_cosine_schedule():
    factors = [simclr_seg.warmup_cosine(step, 2, 10) for step in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == pytest.approx(1.0)
    assert factors[6] == pytest.approx(0.5) and factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


# --- metrics row (Table 4.1) ---

def test_table_row_on_hand_made_predictions():
    labels = torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 255]]])  # (1, 2, 4): 3 foreground, 4 background, 1 ignored
    logits = torch.tensor([[[2.0, -1.0, 1.0, -3.0], [0.5, -2.0, -1.0, 9.0]]])
    # predictions (p > 0.5) on valid pixels: tp 2 (0.5 and 2.0), fn 1, fp 1, tn 3
    stats = BinaryStats().update(logits, labels).compute()
    row = simclr_seg.table_row("baseline", "bce", 0.8, stats, row_id=2)
    assert list(row) == list(simclr_seg.TABLE_COLUMNS)
    assert row["ID"] == 2 and row["Model"] == "baseline" and row["Loss Func"] == "BCE" and row["Dev Split"] == 80
    assert row["IOU"] == pytest.approx(2 / 4) and row["F1"] == pytest.approx(4 / 6)
    assert row["Recall"] == pytest.approx(2 / 3) and row["Accuracy"] == pytest.approx(5 / 7)
    valid = labels != 255
    bce = F.binary_cross_entropy_with_logits(logits[valid], labels[valid].float())
    assert row["BCE"] == pytest.approx(bce.item(), rel=1e-6)
    p, t = torch.sigmoid(logits[valid]), labels[valid].float()
    assert row["Dice"] == pytest.approx(1 - (2 * (p * t).sum() + 1).item() / (p.sum() + t.sum() + 1).item(), rel=1e-6)
    markdown = simclr_seg.markdown_table([row])
    assert markdown.splitlines()[0].startswith("| ID | Model | Loss Func | Dev Split | IOU")
    assert "| 2 | baseline | BCE | 80 | 0.500 | 0.667 |" in markdown


# --- runs on the synthetic set ---

def test_pretrain_loss_falls_and_finetune_beats_chance(tmp_path):
    # pre-training with milder views (crop 0.3-1, colour 0.5, no blur) so that 32 steps visibly learn
    run_main(tmp_path, "--stage", "pretrain", "--pretrain-epochs", "8", "--pretrain-batch-size", "16",
             "--synthetic-images", "64", "--crop-scale", "0.3", "1", "--color-strength", "0.5", "--blur-prob", "0",
             name="pre")
    pretrain = read_metrics(tmp_path / "pre")
    chance = math.log(2 * 16 - 1)  # NT-Xent of uniform similarities: the positive is 1 of 31 candidates
    assert pretrain[0]["negatives"] == 30 and [r["epoch"] for r in pretrain] == list(range(1, 9))
    assert pretrain[-1]["loss"] < chance - 0.1 and pretrain[-1]["loss"] < pretrain[0]["loss"] - 0.5
    args, results = run_main(tmp_path, "--stage", "finetune", "--epochs", "6", "--lr", "3e-3",
                             "--synthetic-images", "96", "--init", f"simclr:{tmp_path / 'pre' / 'pretrain.pt'}",
                             name="fine")
    finetune = read_metrics(tmp_path / "fine")
    assert finetune[-1]["loss"] < finetune[0]["loss"] - 0.2
    # chance: predicting "foreground" everywhere scores IoU = the foreground fraction of the test pixels
    test = results["finetune"]["test"]
    assert test["iou"] > foreground_fraction(args) + 0.1
    assert results["finetune"]["model"] == "SimCLR-shapes" and results["finetune"]["split_sizes"]["test"] == 19
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json",
                 "samples/finetune_epoch_006.png"):
        assert (tmp_path / "fine" / name).exists(), name
    assert (tmp_path / "pre" / "samples" / "pretrain_epoch_008.png").exists()


def foreground_fraction(args):
    pool, _ = build_dataset("shapes", split="all", binary=True, image_size=args.img_size,
                            num_images=args.synthetic_images, seed=args.split_seed)
    test = simclr_seg.pet_splits(len(pool), args.dev_split, seed=args.split_seed)["test"]
    labels = torch.stack([pool[i][1] for i in test])
    return (labels == 1).float().mean().item()


def test_selection_sees_only_validation_indices(tmp_path, monkeypatch):
    """CHOICE C11: every evaluation during training scores the validation indices; the test indices are scored
    once, at the end, with the weights of the lowest validation loss."""
    calls = []
    evaluate = simclr_seg.evaluate

    def spy(model, loader, args, runtime):
        result = evaluate(model, loader, args, runtime)
        calls.append((list(loader.dataset.dataset.indices), result["loss"]))
        return result

    monkeypatch.setattr(simclr_seg, "evaluate", spy)
    _, results = run_main(tmp_path, "--stage", "finetune", "--epochs", "4", "--lr", "1e-2")
    indices = results["finetune"]["split_indices"]
    assert len(calls) == 5 and not set(indices["val"]) & set(indices["test"])
    assert all(seen == indices["val"] for seen, _ in calls[:4]) and calls[4][0] == indices["test"]
    records = read_metrics(tmp_path / "run")
    best_epoch = min(records, key=lambda r: r["val_loss"])["epoch"]
    assert results["finetune"]["best_epoch"] == best_epoch
    assert [r["val_loss"] for r in records] == pytest.approx([loss for _, loss in calls[:4]])
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch


def test_finetune_starts_from_the_pretrained_encoder(tmp_path, monkeypatch):
    """--stage both: the encoder at the first fine-tuning step is OUT/pretrain.pt's, tensor for tensor."""
    seen = {}
    train_one_epoch = simclr_seg.train_one_epoch

    def spy(stage, model, *rest):
        if stage == "finetune" and not seen:
            seen.update({k: v.clone() for k, v in simclr_seg.unwrap(model).encoder.state_dict().items()})
        return train_one_epoch(stage, model, *rest)

    monkeypatch.setattr(simclr_seg, "train_one_epoch", spy)
    run_main(tmp_path, "--pretrain-epochs", "1", "--epochs", "1")
    pretrained = torch.load(tmp_path / "run" / "pretrain.pt", weights_only=True)["model"]
    assert len(seen) == 120
    for key, value in seen.items():
        assert torch.equal(value, pretrained[f"encoder.{key}"]), key


def test_temperature_reaches_the_training_loss(tmp_path, monkeypatch):
    """--temperature is the tau of every pre-training step's NT-Xent (a run that trains with the default 0.1 whatever
    the flag says passes every other test)."""
    seen = []
    nt_xent_loss = simclr_seg.nt_xent_loss

    def spy(z1, z2, temperature=0.1):
        seen.append(temperature)
        return nt_xent_loss(z1, z2, temperature)

    monkeypatch.setattr(simclr_seg, "nt_xent_loss", spy)
    run_main(tmp_path, "--stage", "pretrain", "--pretrain-epochs", "1", "--limit", "16", "--temperature", "0.37")
    assert seen == [0.37, 0.37]  # 16 images, batch 8: two steps


# --- the Table 4.1 grid (experiments/simclr_pets/table41.py, which calls the CLI) ---

def load_table41():
    spec = importlib.util.spec_from_file_location("table41", ROOT / "experiments" / "simclr_pets" / "table41.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table41_commands_parse_and_are_fair(tmp_path, capsys):
    """Every command the grid builds parses with simclr_seg.get_args; each row's fine-tuning starts from its own
    pre-training (or the baseline init) on the same split seed; the flags the grid sets per run are refused."""
    table41 = load_table41()
    args = table41.get_args(["--out", str(tmp_path), "--seeds", "0", "1", "--dev-splits", "0.2", "0.8",
                             "--baseline-init", "imagenet:/x.pth", "--pretrain-init", "imagenet:/y.pth"])
    runs = table41.grid_runs(args)
    assert [(r[0], r[1], r[2], r[3]) for r in runs] == [
        (s, kind, source, dev) for s in (0, 1) for kind, source, dev in
        [("pretrain", "CIFAR", None), ("pretrain", "Pet", None)] +
        [("finetune", source, dev) for source in ("baseline", "CIFAR", "Pet") for dev in (0.2, 0.8)]]
    for seed, kind, source, dev_split, folder, argv in runs:
        parsed = simclr_seg.get_args(argv)
        assert (parsed.seed, parsed.stage, parsed.out, parsed.split_seed) == (seed, kind, str(folder), 0)
        assert (parsed.img_size, parsed.epochs, parsed.pretrain_epochs, parsed.synthetic_images) == (32, 6, 4, 192)
        if kind == "pretrain":
            assert parsed.pretrain_source_size == {"CIFAR": 16, "Pet": 32}[source]  # CHOICE C15
            assert parsed.pretrain_init == "imagenet:/y.pth"
        else:
            pretrained = tmp_path / f"seed{seed}" / f"pretrain-{source}" / "pretrain.pt"
            assert parsed.init == ("imagenet:/x.pth" if source == "baseline" else f"simclr:{pretrained}")
            assert parsed.dev_split == dev_split
    assert table41.row_label("Pet", args) == "Pet (SimCLR from imagenet:/y.pth)"
    pets = table41.get_args(["--data", "pets", "--grid-sources", "Pet=pets", "Med=folder:/x/images"])
    assert pets.sources == {"Pet": ["--pretrain-data", "pets"],
                            "Med": ["--pretrain-data", "folder", "--pretrain-root", "/x/images"]}
    for argv in (["--stage", "finetune"], ["--seed", "3"], ["--init", "none"], ["--dev-split", "0.5"],
                 ["--grid-sources", "baseline=shapes"]):
        with pytest.raises(SystemExit):
            table41.get_args(argv)
        assert argv[0] in capsys.readouterr().err


def test_table41_summary_mean_and_std():
    table41 = load_table41()
    rows = [{"Model": "m", "Loss Func": "BCE", "Dev Split": 80, "Source": "Pet",
             **{c: v for c in table41.METRIC_COLUMNS}} for v in (0.5, 0.7)]
    entry = table41.summarise(rows)[0]
    assert entry["Seeds"] == 2 and entry["IOU"] == pytest.approx(0.6)
    assert entry["IOU std"] == pytest.approx(0.2 / math.sqrt(2))
    assert "| 0 | m | BCE | 80 | 2 | 0.600 ± 0.141 |" in table41.summary_markdown([entry])


def test_table41_runs_the_grid(tmp_path, monkeypatch):
    """A tiny grid through the CLI: one pre-training, two fine-tunings on one test set, the tables, --resume."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    table41 = load_table41()
    argv = ["--out", str(tmp_path / "grid"), "--dev-splits", "0.8", "--grid-sources", "Pet=shapes", *TINY,
            "--synthetic-images", "32", "--pretrain-epochs", "1", "--epochs", "1"]
    results = table41.main(table41.get_args(argv))
    out = tmp_path / "grid"
    assert [(r["Source"], r["Model"], r["Dev Split"]) for r in results["rows"]] == [
        ("baseline", "baseline (init none)", 80), ("Pet", "Pet (SimCLR from none)", 80)]
    fine = json.loads((out / "seed0" / "finetune-Pet-dev80" / "results.json").read_text())["finetune"]
    assert fine["init"] == f"simclr:{out / 'seed0' / 'pretrain-Pet' / 'pretrain.pt'}"
    base = json.loads((out / "seed0" / "finetune-baseline-dev80" / "results.json").read_text())["finetune"]
    assert base["split_indices"]["test"] == fine["split_indices"]["test"] and len(fine["split_indices"]["test"]) == 6
    assert (out / "table4.1.csv").read_text().splitlines()[0] == ",".join(("Seed", "Source") + simclr_seg.TABLE_COLUMNS)
    assert (out / "table4.1.md").read_text().count("\n| ") == 3 and (out / "table4.1-summary.csv").is_file()
    stamp = (out / "seed0" / "finetune-Pet-dev80" / "results.json").stat().st_mtime_ns
    again = table41.main(table41.get_args([*argv, "--resume"]))
    assert again["rows"] == results["rows"]  # read back, nothing trained again
    assert (out / "seed0" / "finetune-Pet-dev80" / "results.json").stat().st_mtime_ns == stamp


# --- CLI ---

def test_bad_flags_name_the_flag(capsys):
    for argv, flag in ((["--dev-split", "0.9"], "--dev-split"), (["--temperature", "0"], "--temperature"),
                       (["--img-size", "16"], "--img-size"), (["--init", "simclr"], "--init"),
                       (["--pretrain-batch-size", "0"], "--pretrain-batch-size"),
                       (["--pretrain-data", "folder"], "--pretrain-root"),
                       (["--init", "none"], "--init"),  # --stage both fine-tunes its own pre-training
                       (["--batch-size", "1", "--img-size", "32"], "--batch-size 1")):
        with pytest.raises(SystemExit) as exit_info:
            simclr_seg.get_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert flag in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_batch_size_one_runs(tmp_path):
    _, results = run_main(tmp_path, "--stage", "finetune", "--epochs", "1", "--batch-size", "1", "--img-size", "64",
                          "--synthetic-images", "12")
    assert 0 <= results["test"]["iou"] <= 1


def test_bad_pretrain_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "r50.pt"
    simclr_seg.save_checkpoint(path, {"model": simclr_seg.SimCLR("resnet50", 64, 32).state_dict()}, "simclr_seg.py",
                               "SimCLR-resnet50")
    with pytest.raises(simclr_seg.UsageError, match="r50.pt does not fit"):
        run_main(tmp_path, "--stage", "finetune", "--init", f"simclr:{path}")
    assert not (tmp_path / "run").exists()  # refused before --out was created
    with pytest.raises(simclr_seg.UsageError, match="--init: no checkpoint"):
        run_main(tmp_path, "--stage", "finetune", "--init", f"simclr:{tmp_path / 'none.pt'}", name="other")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {}}, foreign)
    with pytest.raises(simclr_seg.UsageError, match="--init:.*not simclr_seg.py"):
        run_main(tmp_path, "--stage", "finetune", "--init", f"simclr:{foreign}", name="third")


# --- real samples (../shared/data) ---

@pytest.mark.skipif(not (SHARED_DATA / "oxford-iiit-pet").is_dir(),
                    reason="../shared/data/oxford-iiit-pet (real Pet samples) is absent on this machine")
def test_real_pet_samples(tmp_path):
    args = simclr_seg.get_args(["--data", "pets", "--data-root", str(SHARED_DATA / "oxford-iiit-pet"), "--img-size",
                                "32", "--arch", "resnet18", "--pretrain-data", "pets", "--device", "cpu"])
    pool = simclr_seg.build_pool(args, simclr_seg.joint_transform(32))
    assert len(pool) == 150
    splits = simclr_seg.pet_splits(len(pool), 0.8, seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test", "unused")] == [108, 12, 30, 0]
    image, label = pool[0]
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) <= {0, 1}
    images, skipped = simclr_seg.build_pretrain_images(args)
    assert len(images) == 120 and skipped == 0  # pre-training never sees the 30 test images
    assert not set(images.indices) & set(splits["test"])
    run_main(tmp_path, "--data", "pets", "--data-root", str(SHARED_DATA / "oxford-iiit-pet"), "--stage", "finetune",
             "--epochs", "1", "--limit", "8", "--arch", "resnet18")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["finetune"]["split_sizes"] == {"train": 8, "val": 8, "test": 8} and 0 <= results["test"]["iou"] <= 1
