"""Tests for common.py: every reader on a tiny fake copy of its original layout and on the real samples in
../shared/data when present, the joint transforms, the synthetic set, the metrics against hand-computed values and
slow reference loops, and one clear DatasetError for each kind of bad input."""
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import common
from common import (BinaryStats, ConfusionMatrix, DatasetError, bce_loss, build_dataset, denormalize, dice_loss,
                    focal_loss, joint_transform, per_image_foreground_iou, per_image_micro_jaccard)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real samples not present at {SHARED_DATA}")
RNG = np.random.default_rng(0)


# --- helpers that write tiny files in each dataset's layout ---

def write_rgb(path, size=(12, 10), fmt=None):
    """Random RGB image of size (W, H)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def write_label(path, array, mode="L", palette=None):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8), mode=None)
    if mode == "P":
        image = image.convert("L").convert("P")
        image.putpalette(palette or [v for c in common.pascal_palette() for v in c])
        image.putdata(list(np.asarray(array, dtype=np.uint8).ravel()))
    elif mode == "RGB":
        image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    image.save(path)
    return path


def label_map(values, size=(12, 10)):
    """(H, W) label whose pixels cycle through `values`."""
    return np.resize(np.array(values, dtype=np.uint8), size[1] * size[0]).reshape(size[1], size[0])


def raw(dataset, index=0):
    """Untransformed label of item `index` as a numpy array."""
    return dataset.load(index)[1]


# --- readers on fake layouts ---

def test_voc_reads_palette_pngs_and_the_unlabeled_set(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for stem in ("a", "b", "c"):
        write_rgb(voc / "JPEGImages" / f"{stem}.jpg")
        write_label(voc / "SegmentationClass" / f"{stem}.png", label_map([0, 15, 255, 20]), mode="P")
    write_rgb(voc / "JPEGImages" / "unlabelled_only.jpg")
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("a\nb\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("c\n")
    train, info = build_dataset("voc", tmp_path, "train", transform=joint_transform(8))
    assert len(train) == 2 and info.num_classes == 21 and info.class_names[15] == "person"
    assert set(np.unique(raw(train)).tolist()) == {0, 15, 20, 255}  # palette indices, not colours
    image, label = train[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label.dtype == torch.int64
    unlabeled, _ = build_dataset("voc", tmp_path / "VOCdevkit", "unlabeled", transform=joint_transform(8))
    assert len(unlabeled) == 4 and unlabeled[0].shape == (3, 8, 8)
    with pytest.raises(DatasetError, match="VOC2007|--download"):
        build_dataset("voc", tmp_path, "test")


def test_cityscapes_maps_label_ids_to_19_train_ids(tmp_path):
    ids = label_map([7, 8, 26, 0, 33, 4])  # road, sidewalk, car, unlabeled, bicycle, static
    for city, frame in (("aachen", "aachen_000000_000019"), ("bochum", "bochum_000000_000313")):
        write_rgb(tmp_path / "leftImg8bit" / "train" / city / f"{frame}_leftImg8bit.png")
        write_label(tmp_path / "gtFine" / "train" / city / f"{frame}_gtFine_labelIds.png", ids)
    write_rgb(tmp_path / "leftImg8bit" / "train_extra" / "x" / "x_0_leftImg8bit.png")
    train, info = build_dataset("cityscapes", tmp_path, "train")
    assert len(train) == 2 and info.num_classes == 19 and info.class_names[13] == "car"
    assert train.names == sorted(train.names)
    assert set(np.unique(raw(train)).tolist()) == {0, 1, 13, 18, 255}
    unlabeled, _ = build_dataset("cityscapes", tmp_path, "unlabeled")
    assert len(unlabeled) == 3


def write_pets(root, stems, trimap_values=(1, 2, 3)):
    base = root / "oxford-iiit-pet"
    for stem in stems:
        write_rgb(base / "images" / f"{stem}.jpg")
        write_label(base / "annotations" / "trimaps" / f"{stem}.png", label_map(trimap_values))
    (base / "annotations" / "trainval.txt").write_text("".join(f"{s} 1 1 1\n" for s in stems[:-2]))
    (base / "annotations" / "test.txt").write_text("".join(f"{s} 1 1 1\n" for s in stems[-2:]))


def test_pets_trimap_value_outside_1_to_3_is_an_error(tmp_path):
    write_pets(tmp_path, [f"Abyssinian_{i}" for i in range(4)], trimap_values=(1, 2, 77))
    dataset, _ = build_dataset("pets", tmp_path, "all")
    with pytest.raises(DatasetError, match=r"\[77\]"):
        dataset[0]


def test_check_labels_reads_every_pair_through_wrappers(tmp_path):
    """A wrong-size label in the last item of the second part of a ConcatDataset of Subsets is found, and every
    pair is read exactly once."""
    write_pets(tmp_path, [f"Abyssinian_{i}" for i in range(6)])
    dataset, _ = build_dataset("pets", tmp_path, "all")
    calls = []
    load = dataset.load
    dataset.load = lambda index: calls.append(index) or load(index)
    wrapped = torch.utils.data.ConcatDataset([torch.utils.data.Subset(dataset, [0, 1, 2]),
                                              torch.utils.data.Subset(dataset, [3, 4, 5])])
    assert common.check_labels(wrapped) == 6 and sorted(calls) == [0, 1, 2, 3, 4, 5]
    bad = tmp_path / "oxford-iiit-pet" / "annotations" / "trimaps" / "Abyssinian_5.png"
    write_label(bad, label_map((1, 2, 3), size=(7, 5)))
    with pytest.raises(DatasetError, match="Abyssinian_5.png"):
        common.check_labels(wrapped)


@pytest.mark.parametrize("border, expected", [("ignore", {0, 1, 255}), ("foreground", {0, 1}), ("background", {0, 1})])
def test_pets_trimap_border_rule(tmp_path, border, expected):
    write_pets(tmp_path, [f"Abyssinian_{i}" for i in range(12)])
    dataset, info = build_dataset("pets", tmp_path, "all", border=border)
    assert len(dataset) == 12 and info.binary and info.num_classes == 2
    label = raw(dataset)
    assert set(np.unique(label).tolist()) == expected
    trimap = label_map((1, 2, 3))
    border_value = {"ignore": 255, "foreground": 1, "background": 0}[border]
    assert np.array_equal(label, np.select([trimap == 1, trimap == 2], [1, 0], border_value))
    train, _ = build_dataset("pets", tmp_path / "oxford-iiit-pet", "train")
    val, _ = build_dataset("pets", tmp_path, "val")
    test, _ = build_dataset("pets", tmp_path, "test")
    assert len(train) == 9 and len(val) == 1 and len(test) == 2
    assert not set(train.names) & set(val.names) and not set(train.names + val.names) & set(test.names)


def test_cifar10_is_image_only(tmp_path, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = RNG.integers(0, 255, (4, 3 * 32 * 32), dtype=np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": [0, 1, 2, 3]}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, handle)
    # torchvision checks the md5 sums of the real release; these fake batches cannot match them
    monkeypatch.setattr(common.tv_datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(common.tv_datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train, _ = build_dataset("cifar10", tmp_path, "train", transform=joint_transform(16))
    assert len(train) == 20 and train[3].shape == (3, 16, 16)


def test_catsdogs_skips_and_reports_unreadable_files(tmp_path, capsys):
    for i in range(3):
        write_rgb(tmp_path / "PetImages" / "Cat" / f"{i}.jpg", fmt="JPEG")
        write_rgb(tmp_path / "PetImages" / "Dog" / f"{i}.jpg", fmt="JPEG")
    (tmp_path / "PetImages" / "Cat" / "666.jpg").write_bytes(b"")
    (tmp_path / "PetImages" / "Dog" / "11702.jpg").write_bytes(b"not a jpeg at all")
    dataset, _ = build_dataset("catsdogs", tmp_path, "train")
    assert len(dataset) == 6 and len(dataset.skipped) == 2
    assert "skipped 2 unreadable" in capsys.readouterr().err
    assert dataset[0].shape[0] == 3


def test_glas_instance_ids_become_binary(tmp_path):
    for prefix, count in (("train", 10), ("testA", 3), ("testB", 2)):
        for i in range(1, count + 1):
            write_rgb(tmp_path / f"{prefix}_{i}.bmp", fmt="BMP")
            write_label(tmp_path / f"{prefix}_{i}_anno.bmp", label_map([0, 1, 2, 7]))
    sizes = {s: len(build_dataset("glas", tmp_path, s)[0]) for s in ("train", "val", "trainval", "testA", "testB", "test")}
    assert sizes == {"train": 9, "val": 1, "trainval": 10, "testA": 3, "testB": 2, "test": 5}
    dataset, info = build_dataset("glas", tmp_path, "testA")
    assert info.binary and set(np.unique(raw(dataset)).tolist()) == {0, 1}


def write_polyps(root, stems):
    """Kvasir-SEG layout: images/<id>.jpg and RGB masks/<id>.jpg with values near 0 / 255."""
    for stem in stems:
        write_rgb(root / "images" / f"{stem}.jpg")
        noisy = np.where(label_map([0, 1]) == 1, 240, 12).astype(np.uint8)
        write_label(root / "masks" / f"{stem}.jpg", np.stack([noisy] * 3, -1), mode="RGB")


def test_kvasir_thresholds_jpeg_masks_and_splits(tmp_path):
    stems = [f"cju{i:04d}" for i in range(20)]
    write_polyps(tmp_path, stems)
    splits = {s: build_dataset("kvasir", tmp_path, s)[0] for s in ("train", "val", "test", "trainval")}
    assert [len(splits[s]) for s in ("train", "val", "test", "trainval")] == [16, 2, 2, 18]
    assert sorted(splits["train"].names + splits["val"].names + splits["test"].names) == stems
    assert set(np.unique(raw(splits["train"])).tolist()) == {0, 1}
    (tmp_path / "train.txt").write_text("\n".join(stems[:15]))
    (tmp_path / "val.txt").write_text("\n".join(stems[15:]))
    listed, _ = build_dataset("kvasir", tmp_path, "test")  # train.txt + val.txt only: val.txt is the test split
    assert listed.names == stems[15:]


def test_cvc_reads_tiff_and_splits_by_video_sequence(tmp_path):
    frames = list(range(1, 31)) + list(range(68, 79))  # sequence 1 (frames 1-25), 2 (26-30), 4 (68-78)
    for frame in frames:
        write_rgb(tmp_path / "Original" / f"{frame}.tif", fmt="TIFF")
        write_label(tmp_path / "Ground Truth" / f"{frame}.tif", np.where(label_map([0, 1]) == 1, 255, 0))
    dataset, info = build_dataset("cvc", tmp_path, "all")
    assert len(dataset) == len(frames) and info.binary
    assert set(np.unique(raw(dataset)).tolist()) == {0, 1}
    parts = {s: set(build_dataset("cvc", tmp_path, s)[0].names) for s in ("train", "val", "test")
             if _split_non_empty("cvc", tmp_path, s)}
    sequence = {str(f): 1 if f <= 25 else 2 if f <= 50 else 4 for f in frames}
    for part, names in parts.items():  # no sequence is shared between two splits
        for other, other_names in parts.items():
            if part != other:
                assert not {sequence[n] for n in names} & {sequence[n] for n in other_names}
    assert set().union(*parts.values()) == {str(f) for f in frames}


def _split_non_empty(name, root, split):
    try:
        build_dataset(name, root, split)
        return True
    except DatasetError:
        return False


def test_tiff_strip_reader_matches_pillow_on_an_rgb_tiff(tmp_path):
    array = RNG.integers(0, 255, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.tif")
    assert np.array_equal(common._read_tiff_strips(str(tmp_path / "x.tif")), array)


@pytest.mark.parametrize("label_base, stored, expected", [(0, [0, 39, 255], {0, 39, 255}), (1, [0, 1, 40], {255, 0, 39})])
def test_nyudv2_label_bases(tmp_path, label_base, stored, expected):
    for part, count in (("train", 10), ("val", 4)):
        for i in range(count):
            write_rgb(tmp_path / f"{part}_images" / f"{i}.png")
            write_label(tmp_path / f"{part}_labels" / f"{i}.png", label_map(stored))
    sizes = {s: len(build_dataset("nyudv2", tmp_path, s, label_base=label_base)[0]) for s in ("train", "val", "test")}
    assert sizes == {"train": 9, "val": 1, "test": 4}
    dataset, info = build_dataset("nyudv2", tmp_path, "test", label_base=label_base)
    assert info.num_classes == 40 and set(np.unique(raw(dataset)).tolist()) == expected


def test_nassar_reads_ids_or_colours_and_unlabeled_tiles(tmp_path):
    colours = np.array([[0, 0, 0], [0, 255, 0], [255, 0, 0]], dtype=np.uint8)[label_map([0, 1, 2])]
    for part in ("train", "val", "test"):
        write_rgb(tmp_path / "tiled_dataset" / part / "images" / "t0.png")
        write_label(tmp_path / "tiled_dataset" / part / "masks" / "t0.png", colours, mode="RGB")
        write_rgb(tmp_path / "tiled_dataset" / part / "images" / "t1.png")
        write_label(tmp_path / "tiled_dataset" / part / "masks" / "t1.png", label_map([2, 1, 0]))
    for i in range(5):
        write_rgb(tmp_path / "ortho_tiles" / f"tile_{i}.png")
    dataset, info = build_dataset("nassar", tmp_path, "train")
    assert info.class_names == ("soil", "crop", "weed")
    assert np.array_equal(raw(dataset, 0), label_map([0, 1, 2])) and np.array_equal(raw(dataset, 1), label_map([2, 1, 0]))
    assert len(build_dataset("nassar", tmp_path, "unlabeled")[0]) == 5


def test_sugarbeets_colour_masks_and_7_1_2_split(tmp_path):
    colours = np.array([[0, 0, 0], [0, 255, 0], [255, 0, 0]], dtype=np.uint8)[label_map([0, 1, 2])]
    session = tmp_path / "CKA_160523"
    for i in range(10):
        write_rgb(session / "images" / "rgb" / f"frame{i}.png")
        write_label(session / "annotations" / "dlp" / "colorCleaned" / f"frame{i}.png", colours, mode="RGB")
    write_rgb(session / "images" / "rgb" / "unlabelled.png")
    sizes = {s: len(build_dataset("sugarbeets", tmp_path, s)[0]) for s in ("train", "val", "test", "unlabeled")}
    assert sizes == {"train": 7, "val": 1, "test": 2, "unlabeled": 11}
    dataset, _ = build_dataset("sugarbeets", tmp_path, "test")
    assert np.array_equal(raw(dataset), label_map([0, 1, 2]))


def test_camvid_void_is_ignored(tmp_path):
    for part in ("train", "val", "test"):
        write_rgb(tmp_path / part / "0001TP_006690.png")
        write_label(tmp_path / f"{part}annot" / "0001TP_006690.png", label_map([0, 10, 11]))
    dataset, info = build_dataset("camvid", tmp_path, "val")
    assert info.num_classes == 11 and set(np.unique(raw(dataset)).tolist()) == {0, 10, 255}


def test_folder_scans_class_count_and_accepts_split_folders(tmp_path):
    for i in range(10):
        write_rgb(tmp_path / "flat" / "images" / f"img{i}.jpg")
        write_label(tmp_path / "flat" / "masks" / f"img{i}.png", label_map([0, 3, 255]))
    dataset, info = build_dataset("folder", tmp_path / "flat", "train")
    assert info.num_classes == 4 and len(dataset) == 8
    for part in ("train", "val"):
        write_rgb(tmp_path / "split" / part / "images" / "a.png")
        write_label(tmp_path / "split" / part / "masks" / "a.png", np.where(label_map([0, 1]) == 1, 255, 0))
    binary, info = build_dataset("folder", tmp_path / "split", "trainval", mask_mode="binary")
    assert len(binary) == 2 and info.num_classes == 2 and set(np.unique(raw(binary)).tolist()) == {0, 1}
    unlabeled, _ = build_dataset("folder", tmp_path / "flat", "unlabeled", transform=joint_transform(8))
    assert len(unlabeled) == 10 and unlabeled[0].shape == (3, 8, 8)  # images only: no masks needed


def test_datasets_pickle_for_spawned_workers(tmp_path):
    """DataLoader workers started with "spawn" (macOS, Windows) receive the dataset by pickle."""
    write_pets(tmp_path, [f"Bengal_{i}" for i in range(4)])
    for part in ("train", "val", "test"):
        write_rgb(tmp_path / "camvid" / part / "a.png")
        write_label(tmp_path / "camvid" / f"{part}annot" / "a.png", label_map([0, 11]))
    for dataset in (build_dataset("pets", tmp_path, "all")[0], build_dataset("camvid", tmp_path / "camvid", "val")[0],
                    build_dataset("shapes", split="val", image_size=16)[0]):
        copy = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(copy[0][1], dataset[0][1])


# --- the synthetic set ---

def test_shapes_is_deterministic_multiclass_and_has_a_binary_and_image_only_view():
    train, info = build_dataset("shapes", split="train", image_size=(40, 56), num_images=16)
    again, _ = build_dataset("shapes", split="train", image_size=(40, 56), num_images=16)
    image, label = train[5]
    assert image.shape == (3, 40, 56) and label.shape == (40, 56) and info.num_classes == 5
    assert torch.equal(image, again[5][0]) and torch.equal(label, again[5][1])
    assert not torch.equal(image, build_dataset("shapes", split="val", image_size=(40, 56))[0][5][0])
    seen = set()
    for i in range(16):
        seen |= set(train[i][1].unique().tolist())
    assert seen == {0, 1, 2, 3, 4}
    binary, binfo = build_dataset("shapes", split="train", image_size=32, binary=True)
    assert binfo.binary and binfo.num_classes == 2 and set(binary[0][1].unique().tolist()) <= {0, 1}
    pretrain, _ = build_dataset("shapes", split="unlabeled", image_size=32, limit=7)
    assert len(pretrain) == 7 and pretrain[0].shape == (3, 32, 32)


# --- transforms ---

def test_joint_transform_keeps_image_and_label_aligned():
    image = torch.zeros(3, 20, 30, dtype=torch.uint8)
    image[:, :, 15:] = 255  # right half white
    label = torch.zeros(20, 30, dtype=torch.uint8)
    label[:, 15:] = 1  # right half class 1
    crop_and_flip = joint_transform(crop=(24, 36), hflip=True, normalize="unit")
    flipped = 0
    for seed in range(10):
        torch.manual_seed(seed)
        out_image, out_label = crop_and_flip(common.tv_tensors.Image(image), common.tv_tensors.Mask(label))
        assert out_image.shape == (3, 24, 36) and out_label.dtype == torch.int64
        assert torch.all(out_image[0][out_label == 1] == 1) and torch.all(out_image[0][out_label == 0] == 0)
        assert torch.all(out_image[0][out_label == 255] == 0) and (out_label == 255).sum() == 24 * 36 - 20 * 30
        flipped += int(out_label[out_label != 255].view(20, 30)[0, 0] == 1)
    assert 0 < flipped < 10  # the flip happens sometimes, to both
    resized = joint_transform((10, 14), crop_scale=(0.5, 1.0), color_jitter=0.4)
    out_image, out_label = resized(common.tv_tensors.Image(image), common.tv_tensors.Mask(label))
    assert out_image.shape == (3, 10, 14) and set(out_label.unique().tolist()) <= {0, 1}  # nearest: no new ids


def test_normalisations_round_trip():
    image = torch.rand(2, 3, 4, 5)
    for name, (mean, std) in common.NORMALIZATION.items():
        normalised = (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        assert torch.allclose(denormalize(normalised, name), image, atol=1e-6)
    symmetric = joint_transform(normalize="symmetric")(common.tv_tensors.Image(torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 2).repeat(3, 1, 1)))
    assert symmetric.min() == -1 and symmetric.max() == 1


# --- metrics ---

def test_confusion_matrix_against_hand_counts():
    labels = torch.tensor([[[0, 0, 1, 1], [2, 2, 255, 1]]])
    preds = torch.tensor([[[0, 1, 1, 1], [2, 0, 2, 1]]])
    cm = ConfusionMatrix(3).update(preds, labels)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 3, 0], [1, 0, 1]]
    result = cm.compute()
    # IoU class 0: 1 / (2 + 2 - 1) = 1/3; class 1: 3 / (3 + 4 - 3) = 3/4; class 2: 1 / (2 + 1 - 1) = 1/2
    assert result["per_class_iou"] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert result["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert result["pixel_acc"] == pytest.approx(5 / 7)
    region = torch.tensor([[[True, True, False, False], [False, False, False, False]]])
    pa = ConfusionMatrix(3).update(preds, labels, region=region).compute()  # only the two class-0 pixels count
    assert pa["per_class_iou"][0] == pytest.approx(0.5) and np.isnan(pa["per_class_iou"][2])
    assert pa["miou"] == pytest.approx(0.25)  # class 0: 1/2, class 1: 0/1, class 2 absent


def test_confusion_matrix_matches_a_slow_loop():
    generator = torch.Generator().manual_seed(3)
    k = 5
    labels = torch.randint(0, k, (3, 9, 11), generator=generator)
    labels[0, :2] = 255
    preds = torch.randint(0, k, (3, 9, 11), generator=generator)
    region = torch.rand(3, 9, 11, generator=generator) > 0.3
    fast = ConfusionMatrix(k).update(preds, labels, region).compute()
    slow = np.zeros((k, k))
    for b, y, x in np.ndindex(*labels.shape):
        if labels[b, y, x] != 255 and region[b, y, x]:
            slow[labels[b, y, x], preds[b, y, x]] += 1
    ious = [slow[c, c] / (slow[c].sum() + slow[:, c].sum() - slow[c, c]) for c in range(k)]
    assert fast["per_class_iou"] == pytest.approx(ious)
    assert fast["miou"] == pytest.approx(np.mean(ious))
    assert fast["pixel_acc"] == pytest.approx(np.trace(slow) / slow.sum())


def test_binary_stats_against_hand_counts():
    targets = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 255]]])  # (B=2, H=1, W=4)
    logits = torch.tensor([[[3.0, -3.0, 3.0, -3.0]], [[-3.0, -3.0, -3.0, 3.0]]])
    stats = BinaryStats().update(logits, targets).compute()
    # tp 1, fn 1, fp 1, tn 4 (the ignored pixel does not count)
    assert stats["iou"] == pytest.approx(1 / 3) and stats["f1"] == pytest.approx(0.5)
    assert stats["precision"] == pytest.approx(0.5) and stats["recall"] == pytest.approx(0.5)
    assert stats["accuracy"] == pytest.approx(5 / 7)
    valid = targets != 255
    flat_logits, flat_targets = logits[valid], targets[valid].float()
    assert stats["bce"] == pytest.approx(bce_loss(flat_logits, flat_targets).item(), rel=1e-5)
    assert stats["focal_loss"] == pytest.approx(focal_loss(flat_logits, flat_targets).item(), rel=1e-5)
    assert stats["dice_loss"] == pytest.approx(dice_loss(flat_logits, flat_targets).item(), rel=1e-5)
    # per image: image 0 IoU 1/3; image 1 has an empty union -> 0 (sklearn's convention)
    assert stats["per_image_iou"] == pytest.approx((1 / 3 + 0) / 2)


def test_losses_on_hand_made_values():
    logits, targets = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    p = torch.sigmoid(logits)
    expected_bce = -(np.log(0.5) + np.log(1 - p[1].item())) / 2
    assert bce_loss(logits, targets).item() == pytest.approx(expected_bce, rel=1e-6)
    expected_focal = (-np.log(0.5) * 0.5 ** 2 - np.log(1 - p[1].item()) * p[1].item() ** 2) / 2
    assert focal_loss(logits, targets).item() == pytest.approx(expected_focal, rel=1e-6)
    assert dice_loss(logits, targets).item() == pytest.approx(1 - (2 * 0.5 + 1) / (p.sum().item() + 1 + 1), rel=1e-6)
    assert dice_loss(torch.full((4,), 50.0), torch.ones(4)).item() == pytest.approx(0.0, abs=1e-6)


def test_per_image_protocols():
    labels = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]], [[1, 0, 1, 255]]])
    preds = torch.tensor([[[1, 0, 0, 0]], [[0, 0, 0, 0]], [[1, 1, 1, 1]]])
    assert per_image_foreground_iou(preds, labels).tolist() == pytest.approx([0.5, 0.0, 2 / 3])
    multi_labels = torch.tensor([[[0, 1, 2, 2]], [[3, 3, 255, 255]]])
    multi_preds = torch.tensor([[[0, 1, 2, 0]], [[3, 0, 1, 1]]])
    accuracy = torch.tensor([3 / 4, 1 / 2])
    assert per_image_micro_jaccard(multi_preds, multi_labels).tolist() == pytest.approx((accuracy / (2 - accuracy)).tolist())


# --- bad input: one clear message each ---

def test_missing_root_names_the_path_and_download():
    with pytest.raises(DatasetError, match=r"nowhere.*--data-root.*--download"):
        build_dataset("voc", "/nowhere/voc")
    with pytest.raises(DatasetError, match=r"images.*Kvasir-SEG"):
        build_dataset("kvasir", "/tmp")


def test_unknown_dataset_split_and_option():
    with pytest.raises(DatasetError, match="unknown dataset 'vocc'"):
        build_dataset("vocc")
    with pytest.raises(DatasetError, match="no split 'validation'.*train, val"):
        build_dataset("shapes", split="validation")
    with pytest.raises(DatasetError, match="does not take the option"):
        build_dataset("shapes", colour="red")


def test_corrupt_image_names_the_file(tmp_path):
    write_polyps(tmp_path, ["a", "b"])
    (tmp_path / "images" / "a.jpg").write_bytes(b"\xff\xd8 truncated")
    dataset = common.SegmentationFiles([str(tmp_path / "images" / "a.jpg")], [str(tmp_path / "masks" / "a.jpg")],
                                       common._threshold, 2, joint_transform())
    with pytest.raises(DatasetError, match=r"cannot read image file .*a\.jpg.*replace or remove"):
        dataset[0]


def test_label_of_the_wrong_size_and_out_of_range_ids(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", size=(12, 10))
    write_label(tmp_path / "masks" / "a.png", np.zeros((5, 6)))
    wrong_size = common.SegmentationFiles([str(tmp_path / "images" / "a.png")], [str(tmp_path / "masks" / "a.png")],
                                          common._grey, 3, joint_transform())
    with pytest.raises(DatasetError, match=r"label .*a\.png is 6x5 but its image .* is 12x10"):
        wrong_size[0]
    write_label(tmp_path / "masks" / "a.png", label_map([0, 1, 7, 255]))
    out_of_range = common.SegmentationFiles([str(tmp_path / "images" / "a.png")], [str(tmp_path / "masks" / "a.png")],
                                            common._grey, 3, joint_transform())
    with pytest.raises(DatasetError, match=r"class ids \[7\] outside 0..2"):
        out_of_range[0]


def test_empty_split(tmp_path):
    write_pets(tmp_path, [f"Bengal_{i}" for i in range(4)])
    (tmp_path / "oxford-iiit-pet" / "annotations" / "test.txt").write_text("")
    with pytest.raises(DatasetError, match="split 'test' .* is empty"):
        build_dataset("pets", tmp_path, "test")


def test_dataset_error_from_a_worker_keeps_only_our_sentence(tmp_path):
    write_rgb(tmp_path / "images" / "a.png", size=(12, 10))
    write_label(tmp_path / "masks" / "a.png", np.zeros((5, 6)))
    dataset = common.SegmentationFiles([str(tmp_path / "images" / "a.png")], [str(tmp_path / "masks" / "a.png")],
                                       common._grey, 3, joint_transform())
    with pytest.raises(DatasetError) as caught:
        next(iter(DataLoader(dataset, num_workers=1)))
    message = str(caught.value)
    assert message.startswith("label ") and "Traceback" not in message and "\n" not in message


# --- the real samples in ../shared/data ---

@needs_shared
def test_real_kvasir_sample():
    dataset, info = build_dataset("kvasir", SHARED_DATA / "Kvasir-SEG", "trainval", transform=joint_transform(32))
    test, _ = build_dataset("kvasir", SHARED_DATA / "Kvasir-SEG", "test")
    assert len(dataset) + len(test) == 300 and not set(dataset.names) & set(test.names)
    image, label = dataset[0]
    assert image.shape == (3, 32, 32) and set(label.unique().tolist()) <= {0, 1}
    assert 0 < (raw(dataset) == 1).mean() < 1


@needs_shared
def test_real_cvc_sample_reads_the_tiffs_pillow_refuses():
    path = SHARED_DATA / "CVC-ClinicDB" / "Original" / "467.tif"
    with pytest.raises(Exception):
        Image.open(path).load()
    dataset, _ = build_dataset("cvc", SHARED_DATA / "CVC-ClinicDB", "all")
    assert len(dataset) == 23
    image, label = dataset.load(0)
    assert image.shape == (288, 384, 3) and label.shape == (288, 384) and set(np.unique(label).tolist()) == {0, 1}
    assert image.std() > 10  # real content, not a mis-parsed buffer


@needs_shared
def test_real_pets_sample():
    dataset, info = build_dataset("pets", SHARED_DATA / "oxford-iiit-pet", "trainval")
    assert len(dataset) == 150 and info.binary
    assert set(np.unique(raw(dataset)).tolist()) == {0, 1, 255}
    with pytest.raises(DatasetError, match="empty"):  # the shipped test.txt is empty
        build_dataset("pets", SHARED_DATA, "test")


@needs_shared
def test_real_camvid_sample():
    train, info = build_dataset("camvid", SHARED_DATA / "CamVid", "train")
    val, _ = build_dataset("camvid", SHARED_DATA / "CamVid", "val")
    assert (len(train), len(val), info.num_classes) == (30, 10, 11)
    values = set(np.unique(raw(val)).tolist())
    assert values <= set(range(11)) | {255} and len(values) > 5


@needs_shared
def test_real_cityscapes_sample_matches_the_official_train_ids():
    dataset, _ = build_dataset("cityscapes", SHARED_DATA / "cityscapes", "val")
    assert len(dataset) == 1
    folder = SHARED_DATA / "cityscapes" / "gtFine" / "val"
    label_ids = np.asarray(Image.open(next(folder.rglob("*_labelIds.png")))).astype(np.int64)
    official = np.asarray(Image.open(next(folder.rglob("*_labelTrainIds.png")))).astype(np.int64)
    ours = raw(dataset)
    train_id = {c.id: c.train_id if 0 <= c.train_id < 255 else 255 for c in common.tv_datasets.Cityscapes.classes}
    assert np.array_equal(ours, np.vectorize(train_id.get)(label_ids))
    # the fixture's two label files were downscaled separately, so a few boundary pixels disagree
    assert (ours == official).mean() > 0.99


# --- reduction across DDP ranks ---

def _reduce_worker(rank, world_size, init_file, results):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    labels = torch.tensor([[[0, 1, 1, 2]]]) if rank == 0 else torch.tensor([[[2, 2, 0, 255]]])
    preds = torch.tensor([[[0, 1, 0, 2]]]) if rank == 0 else torch.tensor([[[2, 1, 0, 0]]])
    cm = ConfusionMatrix(3).update(preds, labels).all_reduce()
    stats = BinaryStats().update(torch.tensor([[[1.0, -1.0]]]) * (rank + 1), torch.tensor([[[1, rank]]])).all_reduce()
    results[rank] = (cm.matrix.tolist(), stats.sums.tolist())
    dist.destroy_process_group()


def test_all_reduce_sums_over_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp
    results = mp.Manager().dict()
    mp.spawn(_reduce_worker, args=(2, str(tmp_path / "init"), results), nprocs=2)
    both = ConfusionMatrix(3).update(torch.tensor([[[0, 1, 0, 2, 2, 1, 0, 0]]]), torch.tensor([[[0, 1, 1, 2, 2, 2, 0, 255]]]))
    assert results[0][0] == results[1][0] == both.matrix.tolist()
    single = BinaryStats().update(torch.tensor([[[1.0, -1.0]], [[2.0, -2.0]]]), torch.tensor([[[1, 0]], [[1, 1]]]))
    assert results[0][1] == pytest.approx(single.sums.tolist()) and results[1][1] == pytest.approx(single.sums.tolist())


# --- masksup.py: the readers of the paper's data as released (PraNet layout, Kvasir lists, 0/255 folder masks) ---

def write_pranet(root, train_stems, test_sets):
    """PraNet release layout: TrainDataset/{image,mask}/*.png, TestDataset/<set>/{images,masks}/*.png, 0/255 masks."""
    mask = np.where(label_map([0, 1]) == 1, 255, 0)
    for stem in train_stems:
        write_rgb(root / "TrainDataset" / "image" / f"{stem}.png")
        write_label(root / "TrainDataset" / "mask" / f"{stem}.png", mask)
    for name, stems in test_sets.items():
        for stem in stems:
            write_rgb(root / "TestDataset" / name / "images" / f"{stem}.png")
            write_label(root / "TestDataset" / name / "masks" / f"{stem}.png", mask)


def test_pranet_layout_fixed_test_folders_and_carved_val(tmp_path):
    train_stems = [f"t{i:03d}" for i in range(20)]
    write_pranet(tmp_path, train_stems, {"CVC-ClinicDB": ["1", "2", "3"], "Kvasir": ["k1", "k2"]})
    splits = {s: build_dataset("pranet", tmp_path, s)[0] for s in ("train", "val", "trainval", "test")}
    assert [len(splits[s]) for s in ("train", "val", "trainval", "test")] == [18, 2, 20, 3]
    assert not set(splits["train"].names) & set(splits["val"].names)  # val carved from TrainDataset, disjoint
    assert sorted(splits["train"].names + splits["val"].names) == train_stems
    assert sorted(splits["test"].names) == ["1", "2", "3"]  # TestDataset/CVC-ClinicDB, the paper's test set
    kvasir, info = build_dataset("pranet", tmp_path, "test", test_set="Kvasir")
    assert sorted(kvasir.names) == ["k1", "k2"] and info.binary and info.num_classes == 2
    assert set(np.unique(raw(splits["train"])).tolist()) == {0, 1}  # 0/255 masks: 255 is foreground
    with pytest.raises(DatasetError, match="CVC-ClinicDB, Kvasir"):
        build_dataset("pranet", tmp_path, "test", test_set="ETIS")


def test_kvasir_train_and_val_lists_val_is_test(tmp_path):
    """The MediaEval lists (train.txt + val.txt): val.txt is the test split, validation is carved from train.txt,
    and no test id is ever in train or val."""
    stems = [f"cju{i:04d}" for i in range(24)]
    write_polyps(tmp_path, stems)
    (tmp_path / "train.txt").write_text("\n".join(stems[:20]))
    (tmp_path / "val.txt").write_text("\n".join(stems[20:]))
    splits = {s: build_dataset("kvasir", tmp_path, s)[0].names for s in ("train", "val", "trainval", "test")}
    assert splits["test"] == stems[20:]
    assert len(splits["val"]) == 2 and len(splits["train"]) == 18
    assert sorted(splits["train"] + splits["val"]) == sorted(splits["trainval"]) == stems[:20]
    (tmp_path / "test.txt").write_text("\n".join(stems[22:]))  # all three lists: each is used as it is
    assert build_dataset("kvasir", tmp_path, "val")[0].names == stems[20:]
    assert build_dataset("kvasir", tmp_path, "test")[0].names == stems[22:]


def test_folder_auto_mask_mode_reads_0_255_masks_as_binary(tmp_path):
    for i in range(4):
        write_rgb(tmp_path / "binary" / "images" / f"{i}.png")
        write_label(tmp_path / "binary" / "masks" / f"{i}.png", np.where(label_map([0, 1]) == 1, 255, 0))
        write_rgb(tmp_path / "ids" / "images" / f"{i}.png")
        write_label(tmp_path / "ids" / "masks" / f"{i}.png", label_map([0, 1, 2, 255]))
    auto, info = build_dataset("folder", tmp_path / "binary", "trainval", mask_mode="auto")
    assert set(np.unique(raw(auto)).tolist()) == {0, 1} and info.binary
    as_ids, info = build_dataset("folder", tmp_path / "binary", "trainval", mask_mode="ids")
    assert set(np.unique(raw(as_ids)).tolist()) == {0, 255}  # ids mode: 255 is ignore, as documented
    ids, info = build_dataset("folder", tmp_path / "ids", "trainval", mask_mode="auto")
    assert set(np.unique(raw(ids)).tolist()) == {0, 1, 2, 255} and info.num_classes == 3


def test_folder_auto_mask_mode_keeps_binary_when_a_mask_is_all_background(tmp_path):
    """A polyp set with one frame holding no polyp (an all-0 mask): still binary, 255 still foreground. A rule that
    asks every mask to hold both 0 and 255 would read the whole folder as ids, 255 as ignore."""
    for i in range(4):
        write_rgb(tmp_path / "images" / f"{i}.png")
        mask = np.zeros_like(label_map([0, 1])) if i == 2 else np.where(label_map([0, 1]) == 1, 255, 0)
        write_label(tmp_path / "masks" / f"{i}.png", mask)
    auto, info = build_dataset("folder", tmp_path, "trainval", mask_mode="auto")
    assert info.binary and info.num_classes == 2
    assert set(np.unique(raw(auto)).tolist()) == {0, 1}



# --- simclr_seg.py: the catsdogs pre-training reader (full decode, balanced limit, class-folder exports) ---

def write_photo(path, size=64):
    """A noisy RGB JPEG (noise keeps the file large enough that cutting it in half truncates the pixel data)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, format="JPEG")
    return path


def test_catsdogs_skips_a_truncated_jpeg_that_verify_accepts(tmp_path, capsys):
    for i in range(3):
        write_photo(tmp_path / "PetImages" / "Cat" / f"{i}.jpg")
        write_photo(tmp_path / "PetImages" / "Dog" / f"{i}.jpg")
    whole = (tmp_path / "PetImages" / "Dog" / "0.jpg").read_bytes()
    truncated = tmp_path / "PetImages" / "Dog" / "9.jpg"
    truncated.write_bytes(whole[:len(whole) // 2])
    with Image.open(truncated) as image:
        image.verify()  # the header is intact: the old scan counted this file as readable
    dataset, _ = build_dataset("catsdogs", tmp_path, "all")
    assert len(dataset) == 6 and dataset.skipped == [str(truncated)]
    assert "skipped 1 unreadable" in capsys.readouterr().err
    readable, skipped = common.readable_images([str(truncated), str(tmp_path / "PetImages" / "Cat" / "1.jpg")])
    assert skipped == [str(truncated)] and len(readable) == 1
    for i in range(len(dataset)):  # every image the set kept decodes (a DataLoader worker would not die on it)
        assert dataset[i].shape[0] == 3


def test_catsdogs_balanced_limit_is_seeded_and_skips_broken_files(tmp_path):
    for i in range(4):
        write_photo(tmp_path / "Cat" / f"{i}.jpg", size=16)
    for i in range(10):
        write_photo(tmp_path / "Dog" / f"{i}.jpg", size=16)
    (tmp_path / "Dog" / "3.jpg").write_bytes(b"broken")
    dataset, _ = build_dataset("catsdogs", tmp_path, "all", balanced_limit=6, seed=0)
    cats = [p for p in dataset.image_paths if "/Cat/" in p]
    assert len(dataset) == 6 and len(cats) == 3 and str(tmp_path / "Dog" / "3.jpg") not in dataset.image_paths
    again, _ = build_dataset("catsdogs", tmp_path, "all", balanced_limit=6, seed=0)
    other, _ = build_dataset("catsdogs", tmp_path, "all", balanced_limit=6, seed=1)
    assert again.image_paths == dataset.image_paths and other.image_paths != dataset.image_paths
    many, _ = build_dataset("catsdogs", tmp_path, "all", balanced_limit=12, seed=0)  # 4 cats: the dogs fill up
    assert sum("/Cat/" in p for p in many.image_paths) == 4 and len(many) == 12


def test_catsdogs_reads_a_lower_case_class_folder_export(tmp_path):
    """The HuggingFace microsoft/cats_vs_dogs copy saved as cat/*.jpg and dog/*.jpg (README 'Datasets')."""
    write_photo(tmp_path / "cat" / "0.jpg", size=16)
    write_photo(tmp_path / "dog" / "1.jpg", size=16)
    dataset, _ = build_dataset("catsdogs", tmp_path, "all")
    assert len(dataset) == 2
    (tmp_path / "dog" / "1.jpg").unlink()
    (tmp_path / "dog").rmdir()
    with pytest.raises(DatasetError, match="no Dog folder"):
        build_dataset("catsdogs", tmp_path, "all")


# --- selective_mim.py: the paper's downstream protocols (Cityscapes 80/20 + official val, Nassar and Sugarbeets list order) ---

def write_cityscapes(root, split, frames, ids):
    for frame in frames:
        city = frame.split("_")[0]
        write_rgb(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png")
        write_label(root / "gtFine" / split / city / f"{frame}_gtFine_labelIds.png", ids)


def test_cityscapes_holdout_protocol_trains_80_selects_20_tests_on_labelled_val(tmp_path):
    train_frames = [f"{city}_000000_{i:06d}" for city in ("aachen", "bochum") for i in range(5)]  # 10 train frames
    write_cityscapes(tmp_path, "train", train_frames, label_map([7, 8]))
    write_cityscapes(tmp_path, "val", ["frankfurt_000000_000001", "lindau_000000_000002"], label_map([26, 0]))
    write_cityscapes(tmp_path, "test", ["berlin_000000_000003"], label_map([0]))  # public test: all ignore
    names = lambda split: build_dataset("cityscapes", tmp_path, split, train_holdout=0.2)[0].names  # noqa: E731
    assert names("train") == [f"{f}_leftImg8bit" for f in sorted(train_frames)[:8]]  # first 80 % of official train
    assert names("val") == [f"{f}_leftImg8bit" for f in sorted(train_frames)[8:]]  # last 20 %, disjoint
    test, _ = build_dataset("cityscapes", tmp_path, "test", train_holdout=0.2)
    assert test.names == ["frankfurt_000000_000001_leftImg8bit", "lindau_000000_000002_leftImg8bit"]  # official val
    assert set(np.unique(raw(test)).tolist()) == {13, 255}  # labelled: car pixels, not only ignore
    # Without the option the reader keeps the official splits (other methods use them).
    assert len(build_dataset("cityscapes", tmp_path, "train")[0]) == 10
    # The authors' list (data_list/train.txt) sets the order when present.
    listed = list(reversed(sorted(train_frames)))
    (tmp_path / "data_list").mkdir()
    (tmp_path / "data_list" / "train.txt").write_text(
        "".join(f"{f.split('_')[0]}/{f}\n" for f in listed))
    assert names("train") == [f"{f}_leftImg8bit" for f in listed[:8]]


def test_nassar_follows_the_authors_lists_when_present(tmp_path):
    for part in ("train", "val", "test"):
        for stem in ("t0", "t1", "t2"):
            write_rgb(tmp_path / "tiled_dataset" / part / "images" / f"{stem}.png")
            write_label(tmp_path / "tiled_dataset" / part / "masks" / f"{stem}.png", label_map([0, 1, 2]))
    assert build_dataset("nassar", tmp_path, "train")[0].names == ["t0", "t1", "t2"]  # sorted without a list
    (tmp_path / "data_list").mkdir()
    (tmp_path / "data_list" / "train.txt").write_text("t2\nt0\nt1\n")
    assert build_dataset("nassar", tmp_path, "train")[0].names == ["t2", "t0", "t1"]
    assert build_dataset("nassar", tmp_path, "val")[0].names == ["t0", "t1", "t2"]  # no val list: sorted
    (tmp_path / "data_list" / "test.txt").write_text("t9\n")
    with pytest.raises(DatasetError, match="t9"):
        build_dataset("nassar", tmp_path, "test")


def test_sugarbeets_splits_in_the_weeds_list_order(tmp_path):
    colours = np.array([[0, 0, 0], [0, 255, 0], [255, 0, 0]], dtype=np.uint8)[label_map([0, 1, 2])]
    for session in ("CKA_160523", "CKA_weeds"):
        for i in range(6):
            write_rgb(tmp_path / session / "images" / "rgb" / f"{session}_frame{i}.png")
            write_label(tmp_path / session / "annotations" / "dlp" / "colorCleaned" / f"{session}_frame{i}.png",
                        colours, mode="RGB")
    # The authors' list (iMapCleaned paths, interleaving the sessions), 10 of the 12 frames.
    order = [f"{s}_frame{i}" for i in range(5) for s in ("CKA_weeds", "CKA_160523")]
    (tmp_path / "sugarbeets_weeds.txt").write_text(
        "".join(f"/{name.rsplit('_frame', 1)[0]}/annotations/dlp/iMapCleaned/{name}.png\n" for name in order))
    names = {s: build_dataset("sugarbeets", tmp_path, s)[0].names for s in ("train", "val", "test")}
    assert names == {"train": order[:7], "val": order[7:8], "test": order[8:]}  # 70/10/20 by list position
    (tmp_path / "sugarbeets_weeds.txt").write_text("/CKA_x/annotations/dlp/iMapCleaned/missing.png\n")
    with pytest.raises(DatasetError, match="missing"):
        build_dataset("sugarbeets", tmp_path, "train")


# --- label formats, void ids, split folders and the carve rule (issue 18) ---

def test_read_label_formats_void_and_range(tmp_path):
    """8-bit grey, palette and 16-bit single-channel files read to the same ids; an RGB file with equal channels is
    grey; a colour-coded RGB file is refused naming the file; --void-id maps to 255; ids out of range get a hint."""
    ids = label_map([0, 1, 2, 255])
    write_label(tmp_path / "grey.png", ids)
    write_label(tmp_path / "palette.png", ids, mode="P")
    Image.fromarray(ids.astype(np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    write_label(tmp_path / "rgb_grey.png", np.stack([ids] * 3, axis=2), mode="RGB")
    for name in ("grey", "palette", "deep", "rgb_grey"):
        assert np.array_equal(common.read_label(tmp_path / f"{name}.png"), ids), name
    write_label(tmp_path / "colour.png", np.stack([ids, ids // 2, ids], axis=2), mode="RGB")
    with pytest.raises(DatasetError, match=r"label .*colour\.png is a colour-coded RGB image.*single-channel"):
        common.read_label(tmp_path / "colour.png")
    assert set(np.unique(common.read_label(tmp_path / "grey.png", void_id=2)).tolist()) == {0, 1, 255}
    with pytest.raises(DatasetError, match=r"class ids \[2\] outside 0..1 .*--void-id 2, else pass --num-classes 3"):
        common.read_label(tmp_path / "deep.png", num_classes=2)


def test_folder_reads_any_split_folder_and_counts_classes_over_all_splits(tmp_path):
    """A folder dataset holding only test/ reads it; another split name is an error naming the splits on disk and
    the carve rule; the class count comes from every split, not the one read."""
    write_rgb(tmp_path / "test" / "images" / "a.png")
    write_label(tmp_path / "test" / "masks" / "a.png", label_map([0, 1]))
    write_rgb(tmp_path / "extra" / "images" / "b.png")
    write_label(tmp_path / "extra" / "masks" / "b.png", label_map([0, 4]))
    test, info = build_dataset("folder", tmp_path, "test")
    assert len(test) == 1 and info.num_classes == 5
    assert len(build_dataset("folder", tmp_path, "all")[0]) == 2
    with pytest.raises(DatasetError, match=r"train/images not found; the splits on disk are extra, test.*--val-split"):
        build_dataset("folder", tmp_path, "train")


def test_plan_splits_carves_disjoint_seeded_slices(tmp_path):
    plan = common.plan_splits({"train": "test", "val": "test:0.25", "test": "test:0.25"})
    assert plan == {"train": ("test", (0.5, 1.0)), "val": ("test", (0.0, 0.25)), "test": ("test", (0.25, 0.5))}
    assert common.plan_splits({"train": "train", "test": "test"}) == {"train": ("train", None), "test": ("test", None)}
    for bad in ("train:0", "train:1.5", "train:x", ":0.1"):
        with pytest.raises(DatasetError, match="a carved split is SPLIT:F"):
            common.plan_splits({"val": bad})
    for i in range(8):
        write_rgb(tmp_path / "test" / "images" / f"{i}.png")
        write_label(tmp_path / "test" / "masks" / f"{i}.png", label_map([0, 1]))
    names = {role: build_dataset("folder", tmp_path, split, part=part, seed=3)[0].names for role, (split, part)
             in plan.items()}
    assert sorted(sum(names.values(), [])) == [str(i) for i in range(8)] and len(names["val"]) == 2
    again = build_dataset("folder", tmp_path, "test", part=(0.0, 0.25), seed=3)[0].names
    assert again == names["val"]


def test_lookup_readers_refuse_colour_labels_and_read_16_bit(tmp_path):
    write_rgb(tmp_path / "test" / "a.png")
    (tmp_path / "testannot").mkdir()
    Image.fromarray(label_map([0, 11, 3]).astype(np.uint16)).save(tmp_path / "testannot" / "a.png")
    dataset, _ = build_dataset("camvid", tmp_path, "test")
    assert set(np.unique(raw(dataset)).tolist()) == {0, 3, 255}
    write_label(tmp_path / "testannot" / "a.png", np.stack([label_map([0, 1]), label_map([5, 9]),
                                                           label_map([0, 1])], axis=2), mode="RGB")
    with pytest.raises(DatasetError, match="colour-coded RGB"):
        raw(build_dataset("camvid", tmp_path, "test")[0])
