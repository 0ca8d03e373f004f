"""Tests for simclr_seg.py, in the file's order: views, splits, model, transfer, losses, loops, runs, CLI.

Run as a script under torchrun (see test_torchrun_gloo_uses_all_ranks_negatives) it is the 2-process worker.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the torchrun worker runs without conftest.py
    sys.path.insert(0, str(ROOT))

import simclr_seg  # noqa: E402
from common import BinaryStats, bce_loss, build_dataset, dice_loss, focal_loss  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Tiny CPU preset: ResNet-18 at 32 px, a few dozen synthetic images, 1-3 epochs.
TINY = ["--img-size", "32", "--synthetic-images", "48", "--batch-size", "8", "--pretrain-batch-size", "8",
        "--projection-hidden-dim", "64", "--projection-dim", "32", "--decoder-channels", "64", "32", "16", "16", "8",
        "--limit", "48", "--device", "cpu", "--workers", "0"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tiny models gain little from a second one, and lose several times over when the
    2 cores are shared with other processes (measured: the training test took 17 s with 1 thread, 118 s with 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_main(tmp_path, *extra, name="run"):
    args = simclr_seg.get_args([*TINY, "--out", str(tmp_path / name), *extra])
    return args, simclr_seg.main(args)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- views (Sec. 2.1) ---

def test_two_views_differ_keep_shape_and_are_seeded():
    images, _ = build_dataset("shapes", split="unlabeled", transform=simclr_seg.keep_image, image_only=True,
                              image_size=(40, 56), num_images=4)
    views = simclr_seg.TwoViews(images, simclr_seg.simclr_augmentation(32), seed=3)
    view1, view2 = views[(0, 1)]
    assert view1.shape == view2.shape == (3, 32, 32) and view1.dtype == torch.float32
    assert not torch.equal(view1, view2)
    again1, again2 = views[(0, 1)]
    assert torch.equal(view1, again1) and torch.equal(view2, again2)  # seeded by (seed, epoch, index)
    assert not torch.equal(views[(1, 1)][0], view1)  # another epoch, other views
    state = torch.get_rng_state()
    views[(0, 2)]
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched


def test_views_are_the_same_for_any_worker_count():
    args = simclr_seg.get_args([*TINY, "--limit", "16"])  # 2 batches of 8 images per epoch
    ctx = simclr_seg.Context(torch.device("cpu"))
    seen = {}
    for workers in (0, 2):
        args.workers = workers
        loader = simclr_seg.build_loaders(args, "pretrain", ctx)["train"]  # persistent workers when > 0
        seen[workers] = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            seen[workers] += [torch.cat(views) for views in loader]
    assert len(seen[0]) == 4 and all(torch.equal(a, b) for a, b in zip(seen[0], seen[2]))
    assert not torch.equal(seen[0][0], seen[0][2])  # a new epoch draws new views


def test_blur_kernel_is_odd_ten_percent():
    blur = [t for t in simclr_seg.simclr_augmentation(224).transforms if "RandomApply" in type(t).__name__][-1]
    assert tuple(blur.transforms[0].kernel_size) == (23, 23) and blur.p == 0.5


def test_pretrain_folder_reads_every_image_and_names_a_corrupt_one(tmp_path):
    from PIL import Image
    (tmp_path / "a" / "b").mkdir(parents=True)
    for i, folder in enumerate((tmp_path / "a", tmp_path / "a" / "b", tmp_path)):
        Image.new("RGB", (40 + i, 36), (10 * i, 20, 30)).save(folder / f"img{i}.png")
    args = simclr_seg.get_args(["--pretrain-data", "folder", "--pretrain-root", str(tmp_path)])
    images = simclr_seg.build_pretrain_images(args)
    assert sorted(tuple(images[i].shape) for i in range(3)) == [(3, 36, 40), (3, 36, 41), (3, 36, 42)]
    assert len(images) == 3 and images[0].dtype == torch.uint8
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    images = simclr_seg.build_pretrain_images(args)
    with pytest.raises(simclr_seg.DatasetError, match="broken.jpg"):
        [images[i] for i in range(len(images))]


# --- Pet splits (Sec. 3.1) ---

def test_pet_splits_test_fixed_no_overlap_sizes():
    n = 7390  # the Oxford-IIIT Pet set
    splits = {dev: simclr_seg.pet_splits(n, dev, seed=0) for dev in (0.8, 0.5, 0.2)}
    for dev, s in splits.items():
        assert s["test"] == splits[0.8]["test"] and len(s["test"]) == 1478
        n_dev = round(dev * n)
        assert len(s["train"]) + len(s["val"]) == n_dev and len(s["val"]) == round(0.1 * n_dev)
        assert len(s["unused"]) == n - 1478 - n_dev
        parts = [set(s[k]) for k in ("train", "val", "test", "unused")]
        assert sum(map(len, parts)) == n and set().union(*parts) == set(range(n))
    dev = lambda s: set(s["train"]) | set(s["val"])  # noqa: E731
    assert dev(splits[0.2]) < dev(splits[0.5]) < dev(splits[0.8])  # nested dev sets (CHOICE C9)
    assert simclr_seg.pet_splits(n, 0.8, seed=1)["test"] != splits[0.8]["test"]


def test_pet_splits_too_small_is_a_clear_error():
    with pytest.raises(simclr_seg.DatasetError, match="val split of 4 images is empty"):
        simclr_seg.pet_splits(4, 0.5)


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
    with pytest.raises(simclr_seg.UsageError, match="of another shape.*same --encoder"):
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
             "--synthetic-images", "64", "--limit", "64", "--crop-scale", "0.3", "1", "--color-strength", "0.5",
             "--blur-prob", "0")
    pretrain = read_metrics(tmp_path / "run" / "pretrain")
    chance = math.log(2 * 16 - 1)  # NT-Xent of uniform similarities: the positive is 1 of 31 candidates
    assert pretrain[0]["negatives"] == 30
    assert pretrain[-1]["loss"] < chance - 0.15 and pretrain[-1]["loss"] < pretrain[0]["loss"] - 0.3
    args, results = run_main(tmp_path, "--stage", "finetune", "--epochs", "6", "--lr", "3e-3",
                             "--synthetic-images", "96", "--limit", "96",
                             "--init", f"simclr:{tmp_path / 'run' / 'pretrain' / 'last.pt'}", name="run")
    finetune = read_metrics(tmp_path / "run" / "finetune")
    assert finetune[-1]["loss"] < finetune[0]["loss"] - 0.2
    # chance: predicting "foreground" everywhere scores IoU = the foreground fraction of the test pixels
    test = results["finetune"]["test"]
    assert test["iou"] > foreground_fraction(args) + 0.1
    assert results["finetune"]["model"] == "SimCLR-shapes" and results["finetune"]["split_sizes"]["test"] == 19
    run_dir = tmp_path / "run" / "finetune"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "results.json", "samples/epoch006.png"):
        assert (run_dir / name).exists(), name
    assert (tmp_path / "run" / "pretrain" / "samples" / "epoch008.png").exists()


def foreground_fraction(args):
    pool, _ = build_dataset("shapes", split="all", binary=True, image_size=args.img_size,
                            num_images=args.synthetic_images, seed=args.split_seed, limit=args.limit)
    test = simclr_seg.pet_splits(len(pool), args.dev_split, seed=args.split_seed)["test"]
    labels = torch.stack([pool[i][1] for i in test])
    return (labels == 1).float().mean().item()


class Crash(Exception):
    pass


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    common = ["--pretrain-epochs", "2", "--epochs", "2", "--pretrain-optimizer", "lars", "--pretrain-lr", "0.3"]
    run_main(tmp_path, *common, name="straight")
    original = simclr_seg.train_one_epoch
    calls = {"n": 0, "crash_at": 2}

    def crashing(*a, **k):  # a crash after the checkpoint of the previous epoch was written
        calls["n"] += 1
        if calls["n"] == calls["crash_at"]:
            raise Crash
        return original(*a, **k)

    monkeypatch.setattr(simclr_seg, "train_one_epoch", crashing)
    with pytest.raises(Crash):  # stops in pre-training epoch 2
        run_main(tmp_path, *common, name="resumed")
    calls.update(n=0, crash_at=3)
    with pytest.raises(Crash):  # resumes pre-training epoch 2, fine-tunes epoch 1, stops in fine-tuning epoch 2
        run_main(tmp_path, *common, "--resume", name="resumed")
    run_main(tmp_path, *common, "--resume", name="resumed")
    for stage in ("pretrain", "finetune"):
        a = torch.load(tmp_path / "straight" / stage / "last.pt", weights_only=True)
        b = torch.load(tmp_path / "resumed" / stage / "last.pt", weights_only=True)
        assert a["epoch"] == b["epoch"] == 1
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (stage, key)
        assert read_metrics(tmp_path / "straight" / stage) == [
            {**r, "images_per_s": s["images_per_s"], "time_s": s["time_s"]}
            for r, s in zip(read_metrics(tmp_path / "resumed" / stage), read_metrics(tmp_path / "straight" / stage))]
    with pytest.raises(simclr_seg.UsageError, match="--resume"):  # never overwritten without --resume
        run_main(tmp_path, *common, name="straight")


def test_table41_grid_small(tmp_path):
    args, rows = run_main(tmp_path, "--experiment", "table4.1", "--pretrain-epochs", "1", "--epochs", "1",
                          "--dev-splits", "0.2", "0.8", "--synthetic-images", "40", "--limit", "40")
    assert [(r["Model"], r["Dev Split"]) for r in rows] == [
        ("baseline", 20), ("baseline", 80), ("CIFAR", 20), ("CIFAR", 80), ("Pet", 20), ("Pet", 80)]
    out = tmp_path / "run"
    assert (out / "table4.1.csv").read_text().splitlines()[0] == ",".join(simclr_seg.TABLE_COLUMNS)
    assert (out / "table4.1.md").read_text().count("\n| ") == 7
    cifar = json.loads((out / "pretrain-CIFAR" / "config.json").read_text())
    assert cifar["pretrain_source_size"] == 16 and cifar["pretrain_data"] == "shapes"
    pet = json.loads((out / "pretrain-Pet" / "config.json").read_text())
    assert pet["pretrain_source_size"] == 32
    test_sets = {json.dumps(json.loads((d / "results.json").read_text())["split_sizes"]["test"])
                 for d in out.glob("finetune-*")}
    assert len(test_sets) == 1  # the same test size everywhere (the indices are the tested pet_splits)


# --- CLI ---

def test_bad_flags_name_the_flag(capsys):
    for argv, flag in ((["--dev-split", "0.9"], "--dev-split"), (["--temperature", "0"], "--temperature"),
                       (["--img-size", "16"], "--img-size"), (["--init", "simclr"], "--init"),
                       (["--pretrain-batch-size", "1"], "--pretrain-batch-size"),
                       (["--pretrain-data", "folder"], "--pretrain-root")):
        with pytest.raises(SystemExit):
            simclr_seg.get_args(argv)
        assert flag in capsys.readouterr().err


def test_cli_run_eval_only_and_bad_data(tmp_path):
    out = tmp_path / "cli"
    command = [sys.executable, str(ROOT / "simclr_seg.py"), *TINY, "--stage", "finetune", "--epochs", "1",
               "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "| 0 | baseline | BCE | 80 |" in done.stdout
    results = json.loads((out / "finetune" / "results.json").read_text())
    args = simclr_seg.get_args([*TINY, "--stage", "finetune", "--out", str(out), "--eval-only"])
    assert simclr_seg.main(args)["iou"] == pytest.approx(results["test"]["iou"], abs=1e-6)
    bad = subprocess.run([sys.executable, str(ROOT / "simclr_seg.py"), "--data", "pets", "--data-root",
                          str(tmp_path / "nowhere"), "--stage", "finetune", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()] and "nowhere" in bad.stderr


def test_bad_pretrain_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "r50.pt"
    torch.save({"model": simclr_seg.SimCLR("resnet50", 64, 32).state_dict()}, path)
    with pytest.raises(simclr_seg.UsageError, match="r50.pt does not fit"):
        run_main(tmp_path, "--stage", "finetune", "--init", f"simclr:{path}")
    with pytest.raises(simclr_seg.UsageError, match="not found"):
        run_main(tmp_path, "--stage", "finetune", "--init", f"simclr:{tmp_path / 'none.pt'}", name="other")


# --- DDP: 2 processes, gloo ---

def distributed_worker(out):
    """Runs under torchrun: the gathered NT-Xent equals the single-process loss of the whole batch, with the same
    gradients; then a real 2-process pre-training run."""
    import torch.distributed as dist
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    z1_all, z2_all = torch.randn(world * 3, 16), torch.randn(world * 3, 16)  # the same global batch on every rank
    z1 = z1_all[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    z2 = z2_all[rank * 3:(rank + 1) * 3].clone().requires_grad_()
    loss = simclr_seg.nt_xent_loss(z1, z2, 0.2)
    loss.backward()
    # one process over the concatenated batch, by the loop reference (no collective inside)
    full1, full2 = z1_all.clone().requires_grad_(), z2_all.clone().requires_grad_()
    full_loss = nt_xent_loop(full1, full2, 0.2)
    full_loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    result = {"rank": rank, "loss": loss.item(), "mean_loss": mean_loss.item() / world, "full_loss": full_loss.item(),
              # DDP averages gradients over ranks: world x the full-batch gradient of this rank's rows
              "grad_error": max((z1.grad - world * full1.grad[rank * 3:(rank + 1) * 3]).abs().max().item(),
                                (z2.grad - world * full2.grad[rank * 3:(rank + 1) * 3]).abs().max().item()),
              "local_loss": nt_xent_loop(z1.detach(), z2.detach(), 0.2).item()}
    args = simclr_seg.get_args([*TINY, "--pretrain-epochs", "1", "--epochs", "1", "--out", str(out / "run")])
    simclr_seg.main(args)  # reuses this process group (a second init_process_group under torchrun can hang)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_torchrun_gloo_uses_all_ranks_negatives(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).resolve()), str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["mean_loss"] == pytest.approx(result["full_loss"], rel=1e-5)  # Eq. (2.1) on all 2x3 pairs
        assert result["grad_error"] < 1e-5
        assert abs(result["loss"] - result["local_loss"]) > 1e-3  # not the loss of this rank's batch alone
    metrics = read_metrics(tmp_path / "run" / "pretrain")
    assert len(metrics) == 1 and metrics[0]["negatives"] == 2 * 8 * 2 - 2 and math.isfinite(metrics[0]["loss"])
    config = json.loads((tmp_path / "run" / "pretrain" / "config.json").read_text())
    assert config["world_size"] == 2 and (tmp_path / "run" / "pretrain" / "last.pt").exists()
    # the fine-tuning metrics summed over the two ranks' shards equal one process scoring the whole test split
    results = json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())
    args = simclr_seg.get_args([*TINY, "--eval-only", "--out", str(tmp_path / "run")])
    single = simclr_seg.main(args)
    for key in ("iou", "bce", "dice_loss", "accuracy"):
        assert single[key] == pytest.approx(results["test"][key], rel=1e-5), key


# --- real samples (../shared/data) ---

@pytest.mark.skipif(not (SHARED_DATA / "oxford-iiit-pet").is_dir(),
                    reason="../shared/data/oxford-iiit-pet (real Pet samples) is absent on this machine")
def test_real_pet_samples(tmp_path):
    args = simclr_seg.get_args(["--data", "pets", "--data-root", str(SHARED_DATA), "--img-size", "32",
                                "--encoder", "resnet18", "--pretrain-data", "pets", "--device", "cpu"])
    pool = simclr_seg.build_pool(args, simclr_seg.joint_transform(32))
    assert len(pool) == 150
    splits = simclr_seg.pet_splits(len(pool), 0.8, seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test", "unused")] == [108, 12, 30, 0]
    image, label = pool[0]
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) <= {0, 1}
    assert len(simclr_seg.build_pretrain_images(args)) == 120  # pre-training never sees the 30 test images
    run_main(tmp_path, "--data", "pets", "--data-root", str(SHARED_DATA), "--stage", "finetune", "--epochs", "1",
             "--limit", "40", "--encoder", "resnet18")
    results = json.loads((tmp_path / "run" / "finetune" / "results.json").read_text())
    assert results["split_sizes"]["test"] == 8 and 0 <= results["test"]["iou"] <= 1


if __name__ == "__main__":  # the torchrun worker of test_torchrun_gloo_uses_all_ranks_negatives
    torch.set_num_threads(1)
    distributed_worker(Path(sys.argv[1]))
