"""Dataset readers (with joint image/label transforms), the built-in synthetic dataset, and metrics.

Shared by masksup.py, simclr_seg.py, selective_mim.py and lmae.py, and nothing else lives here: models, masking,
losses, loops and plumbing belong to the method files (STYLE.md section 6).

Datasets
    `build_dataset(name, root, split, ...) -> (dataset, info)`: each reader reads its dataset's ORIGINAL on-disk
    layout (README "Datasets" lists them). Items are `(image, label)` with image float (3, H, W) after the caller's
    transform and label int64 (H, W), 255 = ignore; image-only sets (for self-supervised pre-training) yield just
    the transformed image. `info` carries the class count, names, palette and ignore index.
    `joint_transform(...)` builds the geometric + photometric pipeline applied to image and label together
    (torchvision.transforms.v2 with tv_tensors.Mask, so labels are resized with nearest and padded with 255).
    `check_labels(dataset)` reads every pair of a split once before training, so a bad file stops the run at once.
    `read_label(path, num_classes, void_id)` reads a class-id label file (8/16-bit grey or palette; colour RGB is
    refused) for every id reader and lmae.py's `complete`. `plan_splits({role: "SPLIT" | "SPLIT:F"})` is the carve
    rule of --train-split/--val-split/--test-split; `build_dataset(..., part=)` takes its slices.

Metrics
    `ConfusionMatrix` (mIoU, per-class IoU, pixel accuracy; an optional pixel region makes it PA-mIoU),
    `BinaryStats` (IoU, F1/Dice, precision, recall, accuracy, BCE/Dice/Focal losses, MaskSup's per-image IoU),
    `per_image_foreground_iou`, `per_image_micro_jaccard`, and the losses `bce_loss`, `dice_loss`, `focal_loss`.
    Accumulators live on the device and `.all_reduce()` sums them over DDP ranks.

Errors
    Every problem with a user's data raises `DatasetError` with one sentence naming the path and the fix.

Shape legend: B batch, H W height width, K classes.
"""
import glob
import math
import os
import struct
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv_datasets
from torchvision import tv_tensors
from torchvision.transforms import v2

IGNORE_INDEX = 255

DATASET_NAMES = ("shapes", "voc", "cityscapes", "pets", "cifar10", "catsdogs", "glas", "kvasir", "cvc", "pranet",
                 "nyudv2", "nassar", "sugarbeets", "camvid", "folder")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".ppm", ".webp")


class DatasetError(ValueError):
    """A problem with the user's data or dataset arguments: one sentence naming the path and the fix."""

    def __init__(self, message):
        # A DataLoader worker re-raises our exception with its whole traceback prepended to the message
        # ("Caught DatasetError in DataLoader worker process 0. Original Traceback ..."): keep only our sentence.
        marker = "DatasetError: "
        message = str(message)
        if marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    class_names: tuple
    palette: list = field(repr=False)
    ignore_index: int = IGNORE_INDEX
    binary: bool = False
    splits: tuple = ()


def pascal_palette(num_colors=256):
    """The PASCAL VOC colour map (bit-interleaved class index); also used for datasets without their own."""
    palette = []
    for index in range(num_colors):
        r = g = b = 0
        c = index
        for shift in range(7, -1, -1):
            r |= ((c >> 0) & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette.append((r, g, b))
    return palette


# --- normalisation and joint transforms ---

NORMALIZATION = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "symmetric": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),  # [0, 1] -> [-1, 1]
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),  # stays in [0, 1]
}


def _pair(size):
    return None if size is None else (size, size) if isinstance(size, int) else tuple(size)


def joint_transform(size=None, *, crop=None, crop_scale=None, hflip=False, color_jitter=0.0, normalize="imagenet"):
    """Image/label pipeline: call as `t(image, label)` (tv_tensors.Image uint8, tv_tensors.Mask) or `t(image)`.

    size: final (H, W) or int (square); labels are resized with nearest. crop: random crop (int or (H, W)) taken
    before the resize, padding the image with 0 and the label with 255 where the image is smaller.
    crop_scale=(lo, hi): RandomResizedCrop(size, scale) instead of crop + resize. hflip: p = 0.5.
    color_jitter=s: ColorJitter(s, s, s, min(s, 0.5)) applied with p = 0.5 to the image only.
    normalize: "imagenet" | "symmetric" ([-1, 1]) | "unit" ([0, 1]).
    Returns image float32 (3, H, W) and label int64 (H, W) as plain tensors.
    """
    if normalize not in NORMALIZATION:
        raise ValueError(f"normalize must be one of {sorted(NORMALIZATION)}, got {normalize!r}")
    size = _pair(size)
    steps = []
    if crop_scale is not None:
        if size is None:
            raise ValueError("crop_scale needs a size for RandomResizedCrop")
        steps.append(v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True))
    else:
        if crop is not None:
            steps.append(v2.RandomCrop(_pair(crop), pad_if_needed=True,
                                       fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}))
        if size is not None:
            steps.append(v2.Resize(size, antialias=True))
    if hflip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if color_jitter > 0:
        s = float(color_jitter)
        steps.append(v2.RandomApply([v2.ColorJitter(s, s, s, min(s, 0.5))], p=0.5))
    mean, std = NORMALIZATION[normalize]
    steps += [
        v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, "others": None}, scale=True),
        v2.Normalize(mean, std),
        v2.ToPureTensor(),
    ]
    return v2.Compose(steps)


def denormalize(images, normalize):
    """(B, 3, H, W) or (3, H, W) normalised images -> the same in [0, 1] (for sample PNGs)."""
    mean, std = NORMALIZATION[normalize]
    shape = (3, 1, 1) if images.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(mean, device=images.device, dtype=images.dtype).view(shape)
    std = torch.tensor(std, device=images.device, dtype=images.dtype).view(shape)
    return (images * std + mean).clamp(0, 1)


# --- image and label files ---

def _read_tiff_strips(path):
    """Uncompressed 8-bit TIFF -> uint8 (H, W) or (H, W, S), parsed with numpy.

    CVC-ClinicDB's RGB frames declare PhotometricInterpretation=1 (MinIsBlack) with 3 samples per pixel, which
    Pillow refuses to open; the pixel data is plain chunky strips, so read StripOffsets/StripByteCounts from the
    first IFD. Returns None for any TIFF this simple reader does not cover (caller falls back to Pillow).
    """
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    endian = "<" if data[:2] == b"II" else ">"
    type_sizes = {1: 1, 3: 2, 4: 4}
    type_codes = {1: "B", 3: "H", 4: "I"}
    (ifd_offset,) = struct.unpack_from(endian + "I", data, 4)
    (num_entries,) = struct.unpack_from(endian + "H", data, ifd_offset)
    tags = {}
    for entry in range(num_entries):
        tag, kind, count, value_offset = struct.unpack_from(endian + "HHII", data, ifd_offset + 2 + 12 * entry)
        if kind not in type_sizes:
            continue
        nbytes = type_sizes[kind] * count
        start = ifd_offset + 2 + 12 * entry + 8 if nbytes <= 4 else value_offset
        tags[tag] = struct.unpack_from(endian + type_codes[kind] * count, data, start)
    width, height = tags.get(256, (0,))[0], tags.get(257, (0,))[0]
    samples = tags.get(277, (1,))[0]
    bits = tags.get(258, (8,))
    if tags.get(259, (1,))[0] != 1 or any(b != 8 for b in bits) or tags.get(284, (1,))[0] != 1 or 273 not in tags:
        return None
    pixels = b"".join(data[o:o + n] for o, n in zip(tags[273], tags[279]))
    if len(pixels) < width * height * samples:
        return None
    array = np.frombuffer(pixels[:width * height * samples], dtype=np.uint8).copy()  # writable for torch
    return array.reshape(height, width, samples) if samples > 1 else array.reshape(height, width)


def _open_array(path, what):
    """Read an image file into a numpy array; any failure becomes one DatasetError naming the file."""
    try:
        if str(path).lower().endswith((".tif", ".tiff")):
            array = _read_tiff_strips(path)
            if array is not None:
                return array
        with Image.open(path) as image:
            image.load()
            if what == "image":
                return np.array(image.convert("RGB"))
            if image.mode in ("P", "L", "1", "I", "I;16", "I;16L", "I;16B", "I;16N"):  # one channel: ids as stored
                return np.array(image)
            return np.array(image.convert("RGB"))
    except FileNotFoundError:
        raise DatasetError(f"{what} file {path} does not exist; check the dataset layout (see README 'Datasets')")
    except DatasetError:
        raise
    except Exception as error:  # PIL raises many types for broken files
        raise DatasetError(f"cannot read {what} file {path} ({type(error).__name__}: {error}); "
                           f"replace or remove the file") from None


def load_rgb(path):
    """uint8 (H, W, 3) from any image file (grey images are replicated)."""
    array = _open_array(path, "image")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def load_label(path):
    """The raw label array: (H, W) for palette / grey PNGs (palette indices, not colours), (H, W, 3) for RGB."""
    return _open_array(path, "label")


def read_label(path, num_classes=None, void_id=None):
    """A class-id label file -> int64 (H, W): 8- or 16-bit grey, or palette PNG (the palette index is the id), read
    alike by training and by lmae.py's `complete`. void_id: that id -> 255 (ignore). num_classes: ids outside
    0..K-1 (255 = ignore) are a DatasetError with a hint. An RGB file whose channels are equal is read as grey;
    a colour-coded RGB label is refused with one sentence saying how to convert it (README 'Datasets')."""
    label = load_label(path)
    if label.ndim == 3:
        if not (np.array_equal(label[:, :, 0], label[:, :, 1]) and np.array_equal(label[:, :, 0], label[:, :, 2])):
            raise DatasetError(f"label {path} is a colour-coded RGB image; labels must hold one class id per pixel "
                               f"in one channel (8/16-bit grey or palette PNG): map each colour to its id and save "
                               f"it single-channel (README 'Datasets' shows how)")
        label = label[:, :, 0]
    label = label.astype(np.int64)
    if void_id is not None:
        label[label == void_id] = IGNORE_INDEX
    if num_classes is not None:
        _check_ids(label, num_classes, path)
    return label


def _check_ids(label, num_classes, path, raw=None):
    """DatasetError naming the ids of `label` outside 0..K-1 (255 = ignore), as stored in `raw` (the file's values
    before a reader's lookup) where given, with how to declare them."""
    bad = (label >= num_classes) & (label != IGNORE_INDEX) | (label < 0)
    if bad.any():
        values = sorted(set(np.unique((raw if raw is not None and raw.shape == label.shape else label)[bad]).tolist()))
        raise DatasetError(f"label {path} has class ids {values[:5]} outside 0..{num_classes - 1} (255 = ignore); if "
                           f"{values[0]} marks unlabelled pixels pass --void-id {values[0]}, else pass --num-classes "
                           f"{values[-1] + 1} (or fix the label)")


def _grey(label):
    return label if label.ndim == 2 else label[:, :, 0]


# Label decoders are module-level functions or small classes (not lambdas) so that datasets pickle into
# DataLoader workers under the "spawn" start method too (macOS, Windows).

class LookupDecoder:
    """Label decoder through a 256-entry table: raw grey/palette value -> class id (16-bit values above the table
    stay as they are, so the range check names them)."""

    def __init__(self, lookup):
        self.lookup = lookup

    def __call__(self, label):
        label = _grey(label).astype(np.int64)
        inside = (label >= 0) & (label < len(self.lookup))
        return np.where(inside, self.lookup[np.where(inside, label, 0)], label)


class ColourDecoder:
    """Label decoder for colour-coded masks: {(r, g, b): class id}; other colours -> `default`."""

    def __init__(self, colours, default=0):
        self.colours, self.default = colours, default

    def __call__(self, label):
        if label.ndim == 2:
            return label
        out = np.full(label.shape[:2], self.default, dtype=np.int64)
        for colour, class_id in self.colours.items():
            out[np.all(label[:, :, :3] == np.array(colour, dtype=label.dtype), axis=2)] = class_id
        return out


def _threshold(label):
    """Binary masks stored as 0/255 (often JPEG with noise): foreground = grey value > 127."""
    return (_grey(label) > 127).astype(np.int64)


def _nonzero(label):
    """Instance-id masks (GLaS): any instance -> foreground."""
    return (_grey(label) > 0).astype(np.int64)


def _to_tv(image, label=None):
    image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
    if label is None:
        return image
    return image, tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(label.astype(np.uint8))))


class SegmentationFiles(Dataset):
    """(image file, label file) pairs -> `transform(image, label)`, with every label checked.

    decode: raw label array -> (H, W) integer class ids (255 = ignore). binary: ids > 0 -> 1.
    """

    def __init__(self, image_paths, label_paths, decode, num_classes, transform, binary=False, names=None,
                 void_id=None):
        self.image_paths, self.label_paths = list(image_paths), list(label_paths)
        self.names = list(names) if names is not None else [_stem(p) for p in self.image_paths]
        self.decode, self.num_classes, self.transform, self.binary = decode, num_classes, transform, binary
        self.void_id = void_id

    def __len__(self):
        return len(self.image_paths)

    def load(self, index):
        """Untransformed (uint8 (H, W, 3), int64 (H, W)) pair, checked; used by __getitem__ and by tools."""
        image = load_rgb(self.image_paths[index])
        path = self.label_paths[index]
        ids = self.decode is _grey or isinstance(self.decode, LookupDecoder)  # class ids, not colours or 0/255
        raw = read_label(path, void_id=self.void_id) if ids else load_label(path)
        label = np.asarray(self.decode(raw), dtype=np.int64)
        if label.shape != image.shape[:2]:
            raise DatasetError(f"label {self.label_paths[index]} is {label.shape[1]}x{label.shape[0]} but its image "
                               f"{self.image_paths[index]} is {image.shape[1]}x{image.shape[0]}; labels must have "
                               f"their image's size (re-export the label at the image's resolution)")
        _check_ids(label, self.num_classes, path, _grey(raw))  # values as stored (a lookup marks unknown ones -1)
        if self.binary:
            label = np.where(label == IGNORE_INDEX, IGNORE_INDEX, (label > 0).astype(np.int64))
        return image, label

    def __getitem__(self, index):
        image, label = self.load(index)
        return self.transform(*_to_tv(image, label))


class ImageFiles(Dataset):
    """Image files (or an in-memory uint8 (N, H, W, 3) array) -> `transform(image)`, for pre-training."""

    def __init__(self, image_paths, transform, array=None, names=None):
        self.image_paths, self.array, self.transform = list(image_paths), array, transform
        self.names = list(names) if names is not None else [_stem(p) for p in self.image_paths]

    def __len__(self):
        return len(self.array) if self.array is not None else len(self.image_paths)

    def __getitem__(self, index):
        image = self.array[index] if self.array is not None else load_rgb(self.image_paths[index])
        return self.transform(_to_tv(image))


def _stem(path):
    return os.path.splitext(os.path.basename(path))[0]


def _images_in(folder, recursive=False):
    pattern = os.path.join(folder, "**", "*") if recursive else os.path.join(folder, "*")
    return sorted(p for p in glob.glob(pattern, recursive=recursive) if p.lower().endswith(IMAGE_EXTENSIONS))


def _require(path, dataset, layout, download_hint=False):
    if not os.path.exists(path):
        hint = " or pass --download to fetch it" if download_hint else ""
        raise DatasetError(f"{dataset}: {path} not found; expected the original layout {layout} under --data-root"
                           f"{hint} (README 'Datasets')")


def _match_by_stem(image_paths, label_folder, dataset, label_suffix=""):
    """Label path for every image, by stem; one error listing the first missing one."""
    labels = {_stem(p): p for p in _images_in(label_folder)}
    pairs = []
    for image_path in image_paths:
        key = _stem(image_path) + label_suffix
        if key not in labels:
            raise DatasetError(f"{dataset}: no label for image {image_path} in {label_folder} (expected a file named "
                               f"{key}.*); every image needs its label with the same name")
        pairs.append(labels[key])
    return pairs


def _seeded_split(items, split, seed, fractions=(0.8, 0.1, 0.1), groups=None):
    """Deterministic train/val/test partition of `items` (optionally keeping each group in one split).

    Groups (e.g. video sequences) are shuffled with `seed`, then train takes groups until it holds
    fractions[0] of the items, val until fractions[0] + fractions[1], test the rest.
    """
    groups = list(range(len(items))) if groups is None else list(groups)
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    counts = {g: 0 for g in unique}
    for g in groups:
        counts[g] += 1
    bounds = np.cumsum(fractions[:2]) * len(items)
    assignment, filled = {}, 0
    for position in order:
        group = unique[position]
        assignment[group] = "train" if filled < bounds[0] else "val" if filled < bounds[1] else "test"
        filled += counts[group]
    if split in ("train", "val", "test"):
        return [item for item, g in zip(items, groups) if assignment[g] == split]
    return list(items)  # "all"


def _carve_val(items, split, seed, val_fraction):
    """Official train list -> seeded "val" (val_fraction of it), "train" (the rest), "trainval" (all)."""
    if split == "trainval":
        return list(items)
    order = np.random.default_rng(seed).permutation(len(items))
    num_val = int(round(len(items) * val_fraction))
    chosen = set(order[:num_val].tolist()) if split == "val" else set(order[num_val:].tolist())
    return [item for i, item in enumerate(items) if i in chosen]


def _read_list(path):
    with open(path) as handle:
        return [line.split()[0] for line in handle if line.strip() and not line.startswith("#")]


# --- readers: each returns a dict describing the split (see build_dataset) ---

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def _voc_root(root):
    """Accept the folder holding VOCdevkit, VOCdevkit itself, or VOCdevkit/VOC2012."""
    root = os.path.abspath(root)
    if os.path.basename(root).startswith("VOC20"):
        root = os.path.dirname(root)
    if os.path.basename(root) == "VOCdevkit":
        root = os.path.dirname(root)
    return root


def _read_voc(root, split, download, seed, options):
    root = _voc_root(root)
    layout = "VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation} (+ VOCdevkit/VOC2007 for test)"
    if split == "unlabeled":  # Selective-masking pre-training: all 17,125 VOC2012 JPEGs
        folder = os.path.join(root, "VOCdevkit", "VOC2012", "JPEGImages")
        if download and not os.path.isdir(folder):
            tv_datasets.VOCSegmentation(root, year="2012", image_set="train", download=True)
        _require(folder, "voc", layout, download_hint=True)
        return {"images": _images_in(folder)}
    year, image_set = ("2007", "test") if split == "test" else ("2012", split)
    if not download:
        _require(os.path.join(root, "VOCdevkit", f"VOC{year}", "ImageSets", "Segmentation", f"{image_set}.txt"),
                 "voc", layout, download_hint=True)
    voc = tv_datasets.VOCSegmentation(root, year=year, image_set=image_set, download=download)
    return {"images": voc.images, "labels": voc.masks, "decode": _grey}


def _read_cityscapes(root, split, download, seed, options):
    """options: train_holdout=h (the selective-masking paper's protocol): "train" = the first 1 - h of official
    train, "val" = its last h, "test" = official val (the public test labels are all 'ignore'). Order: the
    authors' leftImg8bit/train/train.txt when present ("<city>/<frame>" per line), else sorted by path."""
    layout = "leftImg8bit/{train,val,test,train_extra}/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_labelIds.png"
    holdout = options.pop("train_holdout", None)
    if download:
        raise DatasetError("cityscapes cannot be downloaded automatically (it needs a login at cityscapes-dataset.com);"
                           " download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip and pass --data-root")
    if split == "unlabeled":  # train_extra + trainvaltest images, as in the selective-masking paper
        images = []
        for sub in ("train", "val", "test", "train_extra"):
            images += _images_in(os.path.join(root, "leftImg8bit", sub), recursive=True)
        if not images:
            _require(os.path.join(root, "leftImg8bit", "train_extra"), "cityscapes", layout)
        return {"images": images}
    if holdout is not None and not 0.0 < holdout < 1.0:
        raise DatasetError(f"cityscapes: train_holdout must be between 0 and 1, got {holdout}")
    official = split if holdout is None else {"train": "train", "val": "train", "test": "val"}[split]
    _require(os.path.join(root, "leftImg8bit", official), "cityscapes", layout)
    _require(os.path.join(root, "gtFine", official), "cityscapes", layout)
    city = tv_datasets.Cityscapes(root, split=official, mode="fine", target_type="semantic")
    lookup = np.full(256, IGNORE_INDEX, dtype=np.int64)  # labelIds -> the 19 train ids, rest 255
    for c in tv_datasets.Cityscapes.classes:
        if c.id >= 0:
            lookup[c.id] = c.train_id if 0 <= c.train_id < 255 else IGNORE_INDEX
    pairs = sorted(zip(city.images, (t[0] for t in city.targets)))  # torchvision lists folders unsorted
    if holdout is not None and official == "train":
        order_list = os.path.join(root, "data_list", "train.txt")
        if os.path.exists(order_list):  # the authors' list order
            position = {name: i for i, name in enumerate(_read_list(order_list))}
            key = lambda pair: position.get(os.path.relpath(pair[0], os.path.join(root, "leftImg8bit", "train"))  # noqa: E731
                                            .removesuffix("_leftImg8bit.png"), len(position))
            pairs = sorted(pairs, key=key)
        cut = int((1.0 - holdout) * len(pairs))  # authors: data_list[:int(0.8 * count)] / [int(0.8 * count):]
        pairs = pairs[:cut] if split == "train" else pairs[cut:]
    return {"images": [p[0] for p in pairs], "labels": [p[1] for p in pairs], "decode": LookupDecoder(lookup)}


CITYSCAPES_CLASSES = tuple(c.name for c in tv_datasets.Cityscapes.classes if 0 <= c.train_id < 255)
CITYSCAPES_PALETTE = [c.color for c in tv_datasets.Cityscapes.classes if 0 <= c.train_id < 255]


def _pets_border(border):
    if border not in ("ignore", "foreground", "background"):
        raise DatasetError(f"pets: border must be ignore, foreground or background, got {border!r}")
    border_value = {"ignore": IGNORE_INDEX, "foreground": 1, "background": 0}[border]
    lookup = np.full(256, -1, dtype=np.int64)  # any other value is not a trimap value: SegmentationFiles refuses it
    lookup[1], lookup[2], lookup[3] = 1, 0, border_value  # trimap: 1 pet, 2 background, 3 border
    return LookupDecoder(lookup)


def _read_pets(root, split, download, seed, options):
    base = os.path.abspath(root)
    if os.path.basename(base) == "oxford-iiit-pet":  # accept the dataset folder itself
        base = os.path.dirname(base)
    layout = "oxford-iiit-pet/{images/*.jpg, annotations/trimaps/*.png, annotations/{trainval,test}.txt}"
    if not download:
        _require(os.path.join(base, "oxford-iiit-pet", "annotations", "trimaps"), "pets", layout, download_hint=True)
    official = ("trainval", "test") if split == "all" else ("test",) if split == "test" else ("trainval",)
    images, labels = [], []
    for part in official:
        pets = tv_datasets.OxfordIIITPet(base, split=part, target_types="segmentation", download=download)
        images += [str(p) for p in pets._images]
        labels += [str(p) for p in pets._segs]
    if split in ("train", "val"):
        pairs = _carve_val(list(zip(images, labels)), split, seed, options.pop("val_fraction", 0.1))
        images, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    return {"images": images, "labels": labels, "decode": _pets_border(options.pop("border", "ignore"))}


def _read_cifar10(root, split, download, seed, options):
    cifar_root = os.path.dirname(os.path.abspath(root)) if os.path.basename(root) == "cifar-10-batches-py" else root
    if not download:
        _require(os.path.join(cifar_root, "cifar-10-batches-py"), "cifar10", "cifar-10-batches-py/data_batch_*",
                 download_hint=True)
    cifar = tv_datasets.CIFAR10(cifar_root, train=split != "test", download=download)
    return {"array": cifar.data, "names": [f"cifar10_{split}_{i}" for i in range(len(cifar.data))]}


def readable_images(paths, threads=4, desc="decoding images"):
    """Fully decode every image file once -> (readable paths, skipped paths), both in the order given.

    `Image.verify()` only checks a file's header and chunk CRCs: a truncated JPEG passes it and then fails when a
    DataLoader worker decodes it mid-epoch. `Image.load()` decodes every pixel, so such a file is skipped here.
    """
    from concurrent.futures import ThreadPoolExecutor  # JPEG decoding releases the GIL: a few threads read faster

    from tqdm import tqdm

    def decodes(path):
        try:
            with Image.open(path) as image:
                image.load()
            return True
        except Exception:  # PIL raises many types for broken files (OSError, SyntaxError, ValueError, ...)
            return False

    with ThreadPoolExecutor(max_workers=threads) as pool:
        ok = list(tqdm(pool.map(decodes, paths), total=len(paths), desc=desc, leave=False, mininterval=1.0,
                       disable=None if paths else True))
    return [p for p, good in zip(paths, ok) if good], [p for p, good in zip(paths, ok) if not good]


def _class_folders(root, names):
    """{name: folder} for class folders spelled in any case (Cat/Dog in PetImages, cat/dog in an export)."""
    if not os.path.isdir(root):
        return {}
    entries = {entry.lower(): os.path.join(root, entry) for entry in sorted(os.listdir(root))
               if os.path.isdir(os.path.join(root, entry))}
    return {name: entries[name.lower()] for name in names if name.lower() in entries}


def _read_catsdogs(root, split, download, seed, options):
    """Cat and dog images in two class folders -> image-only set; unreadable files are skipped, counted, reported.

    Layouts: the Kaggle/Microsoft release `PetImages/{Cat,Dog}/*.jpg` (25,000 files, a few of them broken), or any
    export with one folder per class, `{cat,dog}/*` in any case, e.g. the HuggingFace copy `microsoft/cats_vs_dogs`
    (23,410 images, the authors' pre-training set) exported as README's simclr_seg section shows. Every file is fully
    decoded when the set is scanned. Option `balanced_limit=N`: a seeded draw of N//2 cats and N - N//2 dogs (a
    class with too few files gives all it has, the other fills the rest), instead of the first N files.
    """
    layout = ("PetImages/{Cat,Dog}/*.jpg (Kaggle/Microsoft release) or {cat,dog}/* (one folder per class, e.g. the "
              "HuggingFace microsoft/cats_vs_dogs copy exported as README's simclr_seg section shows)")
    if download:
        raise DatasetError("catsdogs cannot be downloaded automatically; get kagglecatsanddogs PetImages from the "
                           "Microsoft download page (or export the HuggingFace copy) and pass --data-root")
    base = os.path.join(root, "PetImages") if os.path.isdir(os.path.join(root, "PetImages")) else root
    folders = _class_folders(base, ("Cat", "Dog"))
    for name in ("Cat", "Dog"):
        if name not in folders:
            raise DatasetError(f"catsdogs: no {name} folder under {base}; expected {layout}")
    files = {name: _images_in(folder, recursive=True) for name, folder in folders.items()}
    limit = options.pop("balanced_limit", None)
    if limit is None:
        readable, skipped = readable_images(files["Cat"] + files["Dog"], desc="catsdogs: decoding")
    else:
        if limit < 1:
            raise DatasetError(f"catsdogs: balanced_limit must be a positive number of images, got {limit}")
        generator = np.random.default_rng(seed)
        order = {name: [paths[i] for i in generator.permutation(len(paths))] for name, paths in files.items()}
        skipped = []

        def take(name, count):  # the next `count` files of this class's seeded order that decode
            kept = []
            while len(kept) < count and order[name]:
                batch, order[name] = order[name][:count - len(kept)], order[name][count - len(kept):]
                good, bad = readable_images(batch, desc=f"catsdogs: decoding {name}")
                kept += good
                skipped.extend(bad)
            return kept

        cats = take("Cat", limit // 2)
        dogs = take("Dog", limit - len(cats))
        cats += take("Cat", limit - len(cats) - len(dogs))  # a class short of files: the other fills the rest
        readable = sorted(cats) + sorted(dogs)
    if skipped:
        print(f"catsdogs: skipped {len(skipped)} unreadable image files of {len(readable) + len(skipped)} "
              f"(e.g. {skipped[0]})", file=sys.stderr)
    return {"images": readable, "skipped": skipped}


def _read_glas(root, split, download, seed, options):
    layout = "train_N.bmp + train_N_anno.bmp, testA_N.bmp + testA_N_anno.bmp, testB_... (Warwick QU release)"
    prefixes = {"train": ["train"], "val": ["train"], "trainval": ["train"], "testA": ["testA"], "testB": ["testB"],
                "test": ["testA", "testB"]}[split]
    images = []
    for prefix in prefixes:
        images += sorted(p for p in glob.glob(os.path.join(root, f"{prefix}_*.bmp")) if not p.endswith("_anno.bmp"))
    if not images:
        raise DatasetError(f"glas: no {prefixes[0]}_*.bmp images in {root}; expected the layout {layout}")
    if split in ("train", "val"):
        images = _carve_val(images, split, seed, options.pop("val_fraction", 0.1))
    labels = [p[:-4] + "_anno.bmp" for p in images]
    # GLaS annotations are gland instance ids (0 = background): any instance -> gland
    return {"images": images, "labels": labels, "decode": _nonzero}


def _read_kvasir(root, split, download, seed, options):
    layout = "images/<id>.jpg + masks/<id>.jpg (Kvasir-SEG release), optional train.txt/val.txt/test.txt"
    _require(os.path.join(root, "images"), "kvasir", layout)
    _require(os.path.join(root, "masks"), "kvasir", layout)
    images = _images_in(os.path.join(root, "images"))
    lists = {s: os.path.join(root, f"{s}.txt") for s in ("train", "val", "test")}
    if os.path.exists(lists["train"]) and (os.path.exists(lists["val"]) or os.path.exists(lists["test"])):
        # Split lists shipped with the data win over a seeded split. With train.txt + val.txt only (the widely used
        # MediaEval 880/120 lists) val.txt is the test split and validation is carved from train.txt.
        by_stem = {_stem(p): p for p in images}
        val_fraction = options.pop("val_fraction", 0.1)
        test_list = lists["test"] if os.path.exists(lists["test"]) else lists["val"]
        carve = not (os.path.exists(lists["test"]) and os.path.exists(lists["val"]))
        if split == "test":
            wanted = _read_list(test_list)
        elif carve:  # train / val / trainval from train.txt
            wanted = _carve_val(_read_list(lists["train"]), split, seed, val_fraction)
        else:
            wanted = [s for part in (("train", "val") if split == "trainval" else (split,))
                      for s in _read_list(lists[part])]
        missing = [s for s in wanted if s not in by_stem]
        if missing:
            raise DatasetError(f"kvasir: {len(missing)} ids of the split list are not in {root}/images "
                               f"(first: {missing[0]}); fix the list or the images folder")
        images = [by_stem[s] for s in wanted]
    else:
        parts = ("train", "val") if split == "trainval" else (split,)
        images = [p for part in parts for p in _seeded_split(images, part, seed)]
    return {"images": images, "labels": _match_by_stem(images, os.path.join(root, "masks"), "kvasir"),
            "decode": _threshold}


# CVC-ClinicDB frame -> video sequence (the table in the dataset's README.txt): first frame of sequences 1..29.
CVC_SEQUENCE_STARTS = (1, 26, 51, 68, 79, 104, 127, 152, 178, 200, 206, 228, 253, 278, 298, 318, 343, 364, 384, 409,
                       429, 448, 467, 479, 504, 529, 547, 572, 592)


def _read_cvc(root, split, download, seed, options):
    layout = "Original/<n>.tif + 'Ground Truth'/<n>.tif (CVC-ClinicDB release; PNG copies also accepted)"
    image_dir = next((os.path.join(root, d) for d in ("Original", "original", "images") if
                      os.path.isdir(os.path.join(root, d))), os.path.join(root, "Original"))
    label_dir = next((os.path.join(root, d) for d in ("Ground Truth", "ground truth", "GroundTruth", "masks") if
                      os.path.isdir(os.path.join(root, d))), os.path.join(root, "Ground Truth"))
    _require(image_dir, "cvc", layout)
    _require(label_dir, "cvc", layout)
    images = sorted(_images_in(image_dir), key=lambda p: (len(_stem(p)), _stem(p)))

    def sequence(path):  # frames of one sequence show the same polyp: split by sequence, never by frame
        stem = _stem(path)
        return int(np.searchsorted(CVC_SEQUENCE_STARTS, int(stem), side="right")) if stem.isdigit() else stem

    groups = [sequence(p) for p in images]
    parts = ("train", "val") if split == "trainval" else (split,)
    images = [p for part in parts for p in _seeded_split(images, part, seed, groups=groups)]
    return {"images": images, "labels": _match_by_stem(images, label_dir, "cvc"), "decode": _threshold}


def _read_pranet(root, split, download, seed, options):
    """PraNet's polyp release, the MaskSup authors' datasets/POLYPS: TrainDataset/{image,mask}/*.png (1,450 = Kvasir-SEG
    + CVC-ClinicDB frames) and fixed test folders TestDataset/<set>/{images,masks}/*.png (CVC-ClinicDB: 62 images,
    the set MaskSup reports; also Kvasir, CVC-ColonDB, ETIS-LaribPolypDB, CVC-300). "test" = TestDataset/<test_set>
    (option, default CVC-ClinicDB); "val" = a seeded val_fraction (0.1) of TrainDataset, "train" the rest,
    "trainval" all of it. Masks are 0/255 PNGs: foreground = grey > 127 (the authors' threshold)."""
    layout = "TrainDataset/{image,mask}/*.png + TestDataset/<set>/{images,masks}/*.png (PraNet polyp release)"
    test_set = options.pop("test_set", "CVC-ClinicDB")
    val_fraction = options.pop("val_fraction", 0.1)
    if split == "test":
        folder = os.path.join(root, "TestDataset", test_set)
        if not os.path.isdir(folder):
            found = sorted(os.listdir(os.path.join(root, "TestDataset"))) if os.path.isdir(
                os.path.join(root, "TestDataset")) else []
            raise DatasetError(f"pranet: no test set {folder}; expected {layout} (test sets found: "
                               f"{', '.join(found) or 'none'}); pass another test_set (masksup.py --test-split)")
        _require(os.path.join(folder, "images"), "pranet", layout)
        images = _images_in(os.path.join(folder, "images"))
        return {"images": images, "labels": _match_by_stem(images, os.path.join(folder, "masks"), "pranet"),
                "decode": _threshold}
    _require(os.path.join(root, "TrainDataset", "image"), "pranet", layout)
    images = _carve_val(_images_in(os.path.join(root, "TrainDataset", "image")), split, seed, val_fraction)
    return {"images": images, "labels": _match_by_stem(images, os.path.join(root, "TrainDataset", "mask"), "pranet"),
            "decode": _threshold}


NYU40_CLASSES = ("wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
                 "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor mat",
                 "clothes", "ceiling", "books", "refrigerator", "television", "paper", "towel", "shower curtain",
                 "box", "whiteboard", "person", "night stand", "toilet", "sink", "lamp", "bathtub", "bag",
                 "otherstructure", "otherfurniture", "otherprop")


def _read_nyudv2(root, split, download, seed, options):
    layout = "{train_images,train_labels}/*.png (795) + {val_images,val_labels}/*.png (654, the standard test split)"
    label_base = options.pop("label_base", 0)
    if label_base not in (0, 1):
        raise DatasetError(f"nyudv2: label_base must be 0 (ids 0..39, 255 void) or 1 (ids 1..40, 0 void), got {label_base}")
    part = "val" if split == "test" else "train"
    if part == "val" and not os.path.isdir(os.path.join(root, "val_images")) and os.path.isdir(os.path.join(root, "test_images")):
        part = "test"
    _require(os.path.join(root, f"{part}_images"), "nyudv2", layout)
    images = _images_in(os.path.join(root, f"{part}_images"))
    if split in ("train", "val"):
        images = _carve_val(images, split, seed, options.pop("val_fraction", 0.1))
    lookup = np.arange(256, dtype=np.int64)
    if label_base == 1:  # ids 1..40 -> 0..39, 0 (void) -> 255
        lookup = lookup - 1
        lookup[0] = lookup[255] = IGNORE_INDEX
    return {"images": images, "labels": _match_by_stem(images, os.path.join(root, f"{part}_labels"), "nyudv2"),
            "decode": LookupDecoder(lookup)}


WEED_CLASSES = ("soil", "crop", "weed")
WEED_PALETTE = [(0, 0, 0), (0, 255, 0), (255, 0, 0)]
_weed_colours = ColourDecoder({(0, 255, 0): 1, (255, 0, 0): 2})  # green crop, red weed, anything else soil


def _read_nassar(root, split, download, seed, options):
    """Order: the authors' lists data_list/{train,val,test}.txt (one file stem per line, as in their repository's
    data_list/nassar/) when present, else sorted; selective_mim.py's --train-fraction keeps the first fifth."""
    layout = ("tiled_dataset/{train,val,test}/{images,masks}/*.png (masks: ids 0 soil, 1 crop, 2 weed, or colours "
              "green crop / red weed), ortho_tiles/*.png (unlabeled 256x256 orthomosaic tiles), optional "
              "data_list/{train,val,test}.txt")
    if split == "unlabeled":
        folder = os.path.join(root, "ortho_tiles")
        _require(folder, "nassar", layout)
        return {"images": _images_in(folder, recursive=True)}
    parts = ("train", "val") if split == "trainval" else (split,)
    images, labels = [], []
    for part in parts:
        _require(os.path.join(root, "tiled_dataset", part, "images"), "nassar", layout)
        part_images = _images_in(os.path.join(root, "tiled_dataset", part, "images"))
        order_list = os.path.join(root, "data_list", f"{part}.txt")
        if os.path.exists(order_list):
            by_stem = {_stem(p): p for p in part_images}
            wanted = [_stem(name) for name in _read_list(order_list)]
            missing = [name for name in wanted if name not in by_stem]
            if missing:
                raise DatasetError(f"nassar: {len(missing)} names of {order_list} are not in tiled_dataset/{part}/images "
                                   f"(first: {missing[0]}); fix the list or the folder")
            part_images = [by_stem[name] for name in wanted]
        images += part_images
        labels += _match_by_stem(part_images, os.path.join(root, "tiled_dataset", part, "masks"), "nassar")
    return {"images": images, "labels": labels, "decode": _weed_colours}


def _read_sugarbeets(root, split, download, seed, options):
    layout = ("<session>/images/rgb/*.png + <session>/annotations/dlp/colorCleaned/*.png (Bonn Sugar Beets 2016 "
              "annotation release; colours green crop, red weed), optional sugarbeets_weeds.txt")
    if split == "unlabeled":
        images = sorted(p for p in glob.glob(os.path.join(root, "**", "images", "rgb", "*.png"), recursive=True))
        if not images:
            raise DatasetError(f"sugarbeets: no images/rgb/*.png under {root}; expected {layout}")
        return {"images": images}
    labels = sorted(glob.glob(os.path.join(root, "**", "annotations", "dlp", "colorCleaned", "*.png"), recursive=True))
    if not labels:
        raise DatasetError(f"sugarbeets: no annotations/dlp/colorCleaned/*.png under {root}; expected {layout}")
    weeds_list = os.path.join(root, "sugarbeets_weeds.txt")
    if os.path.exists(weeds_list):
        # The images that contain weeds (757 in the paper's downstream task), in the list's order: the authors'
        # data_list/sugarbeets/sugarbeets_weeds.txt (github.com/yuw422/Selective_Masking_Image_Reconstruction),
        # whose lines name annotations/dlp/iMapCleaned/<stem>.png; matched here by stem.
        by_stem = {_stem(p): p for p in labels}
        wanted = [_stem(s) for s in _read_list(weeds_list)]
        missing = [s for s in wanted if s not in by_stem]
        if missing:
            raise DatasetError(f"sugarbeets: {len(missing)} images of {weeds_list} have no colorCleaned label under "
                               f"{root} (first: {missing[0]}); fix the list or the annotation folders")
        labels = [by_stem[s] for s in wanted]
    # The paper's 7:1:2 train/val/test split, in the list's order (else sorted order; deterministic, no seed).
    n = len(labels)
    cut = {"train": (0, int(0.7 * n)), "val": (int(0.7 * n), int(0.8 * n)), "test": (int(0.8 * n), n),
           "trainval": (0, int(0.8 * n))}[split]
    labels = labels[cut[0]:cut[1]]
    images = [os.path.join(os.path.dirname(p), "..", "..", "..", "images", "rgb", os.path.basename(p)) for p in labels]
    images = [os.path.normpath(p) for p in images]
    return {"images": images, "labels": labels, "decode": _weed_colours}


CAMVID_CLASSES = ("sky", "building", "pole", "road", "pavement", "tree", "signsymbol", "fence", "car", "pedestrian",
                  "bicyclist")
CAMVID_PALETTE = [(128, 128, 128), (128, 0, 0), (192, 192, 128), (128, 64, 128), (60, 40, 222), (128, 128, 0),
                  (192, 128, 128), (64, 64, 128), (64, 0, 128), (64, 64, 0), (0, 128, 192)]


def _read_camvid(root, split, download, seed, options):
    layout = "{train,val,test}/*.png + {trainannot,valannot,testannot}/*.png (SegNet CamVid release, 11 = void)"
    parts = ("train", "val") if split == "trainval" else (split,)
    images, labels = [], []
    for part in parts:
        if not os.path.isdir(os.path.join(root, part)):
            on_disk = tuple(s for s in ("train", "val", "test") if os.path.isdir(os.path.join(root, s + "annot")))
            _missing_split("camvid", os.path.join(root, part), on_disk) if on_disk else _require(
                os.path.join(root, part), "camvid", layout)
        _require(os.path.join(root, part + "annot"), "camvid", layout)
        part_images = _images_in(os.path.join(root, part))
        images += part_images
        labels += _match_by_stem(part_images, os.path.join(root, part + "annot"), "camvid")
    lookup = np.arange(256, dtype=np.int64)
    lookup[11] = IGNORE_INDEX  # "Unlabelled"
    return {"images": images, "labels": labels, "decode": LookupDecoder(lookup)}


def folder_splits(root):
    """The split folders of a folder dataset: names of root/<split>/ holding images/ (sorted); () for the flat one."""
    if not os.path.isdir(root) or os.path.isdir(os.path.join(root, "images")):
        return ()
    return tuple(sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "images"))))


def _read_folder(root, split, download, seed, options):
    """Two layouts: <split>/{images,masks}/ for every split name on disk (train, val, test, or any other; "trainval"
    = train + val), or flat images/ + masks/ cut by a seeded 80/10/10 into train/val/test ("all" = every pair).
    The class count: --num-classes, else the largest id (not 255) in every mask of the folder, all splits, + 1."""
    layout = ("images/<name>.<ext> + masks/<name>.png (class ids, 255 = ignore), or "
              "<split>/{images,masks}/ for your own splits (train, val, test, ...)")
    mask_mode, void_id = options.pop("mask_mode", "ids"), options.pop("void_id", None)
    if split == "unlabeled":  # any folder of images (images/ if present, else the folder itself), for pre-training
        folder = os.path.join(root, "images") if os.path.isdir(os.path.join(root, "images")) else root
        return {"images": _images_in(folder, recursive=True)}
    if mask_mode not in ("ids", "binary", "auto"):
        raise DatasetError(f"folder: mask_mode must be 'ids', 'binary' or 'auto', got {mask_mode!r}")
    on_disk = folder_splits(root)
    if on_disk:
        parts = (split,) if split in on_disk else {"trainval": ("train", "val"), "all": on_disk}.get(split, (split,))
        images, labels = [], []
        for part in parts:
            if part not in on_disk:
                _missing_split("folder", os.path.join(root, part, "images"), on_disk)
            part_images = _images_in(os.path.join(root, part, "images"))
            images += part_images
            labels += _match_by_stem(part_images, os.path.join(root, part, "masks"), "folder")
        every_mask = [p for part in on_disk for p in _images_in(os.path.join(root, part, "masks"))]
    else:
        _require(os.path.join(root, "images"), "folder", layout)
        _require(os.path.join(root, "masks"), "folder", layout)
        parts = ("train", "val") if split == "trainval" else (split,)
        everything = _images_in(os.path.join(root, "images"))
        images = [p for part in parts for p in _seeded_split(everything, part, seed)]
        labels = _match_by_stem(images, os.path.join(root, "masks"), "folder")
        every_mask = _images_in(os.path.join(root, "masks"))
    if mask_mode == "auto":  # masks holding only 0 and 255 (PraNet's, the MaskSup authors'): 255 is foreground
        mask_mode = "binary" if labels and all(set(np.unique(_grey(load_label(path))).tolist()) <= {0, 255}
                                               for path in labels) else "ids"
    if mask_mode == "binary":
        return {"images": images, "labels": labels, "decode": _threshold, "num_classes": 2}
    num_classes = options.pop("num_classes", None)
    if num_classes is None:  # never from one split: a test split may lack a class that train has
        num_classes = _largest_id(tuple(every_mask), void_id) + 1
    return {"images": images, "labels": labels, "decode": _grey, "num_classes": max(num_classes, 2)}


_LARGEST_IDS = {}


def _largest_id(paths, void_id=None):
    """The largest class id (not 255, not void_id) in these mask files; each set is read once per process (while
    no file changes: the key holds every file's modification time)."""
    key = (tuple((path, os.path.getmtime(path)) for path in paths), void_id)
    if key not in _LARGEST_IDS:
        largest = 0
        for path in paths:
            ids = read_label(path, void_id=void_id)
            largest = max(largest, int(ids[ids != IGNORE_INDEX].max(initial=0)))
        _LARGEST_IDS[key] = largest
    return _LARGEST_IDS[key]


def _missing_split(name, path, on_disk):
    raise DatasetError(f"{name}: {path} not found; the splits on disk are {', '.join(on_disk) or 'none'}: name them "
                       f"with --train-split/--val-split/--test-split, or carve one, e.g. --val-split "
                       f"{(on_disk or ('train',))[0]}:0.1 (README 'Datasets')")


# --- the built-in synthetic dataset ---

SHAPE_CLASSES = ("background", "disk", "square", "triangle", "ring", "cross")


class Shapes(Dataset):
    """Deterministic synthetic segmentation set: textured shapes on cluttered noisy backgrounds.

    Every item is drawn from a generator seeded by (seed, split, index), so the set is the same on every machine
    and under any worker count. Classes: background + the first num_classes - 1 of disk, square, triangle, ring,
    cross, each with a random colour and stripe texture (so colour alone does not tell the class), at random
    positions, sizes and rotations, overlapping one another; background: a colour gradient, noise, and clutter
    (thin lines and small blobs of object-like colours that belong to the background).
    """

    def __init__(self, split, image_size, num_images, num_classes, transform, binary, seed, image_only):
        self.split_id = {"train": 0, "val": 1, "test": 2, "unlabeled": 3, "trainval": 0, "all": 0}[split]
        self.height, self.width = _pair(image_size)
        self.num_images, self.num_classes, self.transform = num_images, num_classes, transform
        self.binary, self.seed, self.image_only = binary, seed, image_only
        self.names = [f"shapes_{split}_{i:05d}" for i in range(num_images)]
        self.image_paths = []

    def __len__(self):
        return self.num_images

    def load(self, index):
        """uint8 (H, W, 3) image and int64 (H, W) label for item `index`."""
        rng = np.random.default_rng([self.seed, self.split_id, index])
        h, w = self.height, self.width
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        base = rng.uniform(40, 215, 3)
        slope = rng.uniform(-60, 60, (2, 3))
        image = base + (ys / h - 0.5)[..., None] * slope[0] + (xs / w - 0.5)[..., None] * slope[1]
        image = image + rng.normal(0, 12, (h, w, 3))
        label = np.zeros((h, w), dtype=np.int64)
        side = min(h, w)
        for _ in range(rng.integers(2, 6)):  # clutter: background lines and blobs
            colour = rng.uniform(0, 255, 3)
            if rng.random() < 0.5:
                angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) * side
                dist_line = np.abs((xs - w / 2) * np.sin(angle) - (ys - h / 2) * np.cos(angle) - offset)
                image[dist_line < max(1.0, side / 64)] = colour
            else:
                cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.02, 0.05) * side
                image[(ys - cy) ** 2 + (xs - cx) ** 2 < r ** 2] = colour
        for _ in range(rng.integers(1, 4)):  # objects, later ones occlude earlier ones
            class_id = int(rng.integers(1, self.num_classes))
            cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
            r = rng.uniform(0.12, 0.25) * side
            angle = rng.uniform(0, 2 * np.pi)
            u = (xs - cx) * np.cos(angle) + (ys - cy) * np.sin(angle)
            v = -(xs - cx) * np.sin(angle) + (ys - cy) * np.cos(angle)
            inside = self._shape(SHAPE_CLASSES[class_id], u, v, r)
            colour_a, colour_b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
            period, phase = rng.uniform(0.25, 0.6) * r, rng.uniform(0, np.pi)
            stripes = (np.sin((u * np.cos(phase) + v * np.sin(phase)) / period * np.pi) > 0)[..., None]
            image[inside] = np.where(stripes, colour_a, colour_b)[inside]
            label[inside] = class_id
        image = np.clip(image + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
        if self.binary:
            label = (label > 0).astype(np.int64)
        return image, label

    @staticmethod
    def _shape(kind, u, v, r):
        if kind == "disk":
            return u ** 2 + v ** 2 < r ** 2
        if kind == "square":
            return (np.abs(u) < 0.8 * r) & (np.abs(v) < 0.8 * r)
        if kind == "triangle":  # equilateral, circumradius r: three half-planes
            edges = [np.cos(a) * u + np.sin(a) * v < 0.5 * r for a in (np.pi / 2, np.pi / 2 + 2.094, np.pi / 2 + 4.189)]
            return edges[0] & edges[1] & edges[2]
        if kind == "ring":
            rho = u ** 2 + v ** 2
            return (rho < r ** 2) & (rho > (0.55 * r) ** 2)
        return ((np.abs(u) < r / 3) & (np.abs(v) < r)) | ((np.abs(v) < r / 3) & (np.abs(u) < r))  # cross

    def __getitem__(self, index):
        image, label = self.load(index)
        if self.image_only:
            return self.transform(_to_tv(image))
        return self.transform(*_to_tv(image, label))


# --- build_dataset ---

READERS = {
    "voc": (_read_voc, ("train", "val", "trainval", "test", "unlabeled"), VOC_CLASSES, None, False),
    "cityscapes": (_read_cityscapes, ("train", "val", "test", "unlabeled"), CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, False),
    "pets": (_read_pets, ("train", "val", "trainval", "test", "all"), ("background", "pet"), None, True),
    "cifar10": (_read_cifar10, ("train", "test"), (), None, False),
    "catsdogs": (_read_catsdogs, ("train", "all"), (), None, False),
    "glas": (_read_glas, ("train", "val", "trainval", "testA", "testB", "test"), ("background", "gland"), None, True),
    "kvasir": (_read_kvasir, ("train", "val", "trainval", "test"), ("background", "polyp"), None, True),
    "cvc": (_read_cvc, ("train", "val", "trainval", "test", "all"), ("background", "polyp"), None, True),
    "pranet": (_read_pranet, ("train", "val", "trainval", "test"), ("background", "polyp"), None, True),
    "nyudv2": (_read_nyudv2, ("train", "val", "trainval", "test"), NYU40_CLASSES, None, False),
    "nassar": (_read_nassar, ("train", "val", "trainval", "test", "unlabeled"), WEED_CLASSES, WEED_PALETTE, False),
    "sugarbeets": (_read_sugarbeets, ("train", "val", "trainval", "test", "unlabeled"), WEED_CLASSES, WEED_PALETTE, False),
    "camvid": (_read_camvid, ("train", "val", "trainval", "test"), CAMVID_CLASSES, CAMVID_PALETTE, False),
    "folder": (_read_folder, ("train", "val", "trainval", "test", "all", "unlabeled"), None, None, False),
}
IMAGE_ONLY_DATASETS = ("cifar10", "catsdogs")


def plan_splits(specs):
    """The carve rule (README 'Datasets'): {role: "SPLIT" or "SPLIT:F"} -> {role: (split, part)} for build_dataset.

    "SPLIT:F" is a seeded fraction F of SPLIT: the roles that carve one split take consecutive slices of one seeded
    order of it, in the order given, and a role naming that split plainly gets the rest (part None: all of it), so no
    image is in two roles. A bad fraction is a DatasetError."""
    taken, plan = {}, {}
    for role, spec in specs.items():
        split, colon, fraction = str(spec).partition(":")
        if not colon:
            continue
        try:
            fraction = float(fraction)
        except ValueError:
            fraction = -1.0
        if not split or not 0.0 < fraction < 1.0 or taken.get(split, 0.0) + fraction > 1.0 + 1e-9:
            raise DatasetError(f"split {spec}: a carved split is SPLIT:F, a fraction F between 0 and 1 of a split "
                               f"(e.g. train:0.1), and the roles carve no more than all of it")
        start = taken.get(split, 0.0)
        plan[role], taken[split] = (split, (start, start + fraction)), start + fraction
    for role, spec in specs.items():
        if role not in plan:
            plan[role] = (spec, (taken[spec], 1.0) if spec in taken else None)
    return {role: plan[role] for role in specs}


def split_names(name, root=None):
    """The split names build_dataset accepts for `name`; a folder dataset: also every split folder under `root`."""
    if name == "shapes":
        return ("train", "val", "test", "trainval", "unlabeled", "all")
    splits = READERS[name][1]
    if name == "folder":
        splits += tuple(s for s in folder_splits(root or os.path.join("data", name)) if s not in splits)
    return splits


def build_dataset(name, root=None, split="train", *, transform=None, image_only=False, binary=False, download=False,
                  limit=None, seed=0, image_size=64, part=None, void_id=None, **options):
    """Build split `split` of dataset `name` -> (torch Dataset, DatasetInfo).

    Items: (image float (3, H, W), label int64 (H, W), 255 = ignore) after `transform(image, label)`, or just
    `transform(image)` when image_only (cifar10, catsdogs and split "unlabeled" are always image-only).
    root: the dataset's folder in its original layout (None -> ./data/<name>). binary: ids > 0 -> 1.
    limit: first N items. seed: for seeded splits. image_size: only for "shapes" (the size it is drawn at).
    part=(lo, hi): only that slice of a `seed`-ed order of the split (plan_splits). void_id: that id of class-id
    labels -> 255 (ignore).
    options: shapes num_images, num_classes; pets border; nyudv2 label_base; folder num_classes, mask_mode
    ("ids", "binary" or "auto"); pranet test_set;
    val_fraction for readers that carve "val" out of an official train split.
    """
    if name not in DATASET_NAMES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    transform = transform if transform is not None else joint_transform()
    options = dict(options)
    if name == "shapes":
        splits = split_names(name)
        if split not in splits:
            raise DatasetError(f"shapes has no split {split!r}; choose one of {', '.join(splits)}")
        if part is not None or void_id is not None:
            raise DatasetError("shapes draws its own splits and has no void id; carve splits and declare void ids of "
                               "real data only")
        num_classes = options.pop("num_classes", 5)
        if not 2 <= num_classes <= len(SHAPE_CLASSES):
            raise DatasetError(f"shapes: num_classes must be between 2 and {len(SHAPE_CLASSES)}, got {num_classes}")
        default_count = {"train": 256, "trainval": 320, "all": 384, "unlabeled": 512}.get(split, 64)
        num_images = options.pop("num_images", None) or default_count
        _no_options_left(name, options)
        dataset = Shapes(split, image_size, num_images, num_classes, transform, binary,
                         seed, image_only or split == "unlabeled")
        k = 2 if binary else num_classes
        classes = ("background", "object") if binary else SHAPE_CLASSES[:num_classes]
        info = DatasetInfo("shapes", k, classes, pascal_palette(k), binary=binary or k == 2, splits=splits)
        return _limited(dataset, limit, name, split), info

    reader, _, class_names, palette, is_binary = READERS[name]
    root = root if root is not None else os.path.join("data", name)
    splits = split_names(name, root)
    if name == "folder":
        options["void_id"] = void_id
    if split not in splits:
        raise DatasetError(f"{name} has no split {split!r}; choose one of {', '.join(splits)}")
    if not download and not os.path.isdir(root):
        raise DatasetError(f"{name}: data root {root} does not exist; pass --data-root pointing at the dataset in its "
                           f"original layout (README 'Datasets')" + (" or --download" if name in
                                                                    ("voc", "pets", "cifar10") else ""))
    try:
        found = reader(root, split, download, seed, options)
    except DatasetError:
        raise
    except (RuntimeError, OSError) as error:  # torchvision's layout checks and download failures
        raise DatasetError(f"{name}: cannot read the dataset at {root} ({error}); check the layout in README "
                           f"'Datasets'") from None
    _no_options_left(name, options)
    ids = found.get("decode") is _grey or isinstance(found.get("decode"), LookupDecoder)
    if void_id is not None and "labels" in found and not ids:
        raise DatasetError(f"--void-id {void_id}: {name} labels are not class ids (binary or colour masks); drop it")
    if part is not None:  # plan_splits' slice of one seeded order of the split
        count = len(found.get("images", []))
        keep = sorted(np.random.default_rng(seed).permutation(count)[round(part[0] * count):round(part[1] * count)])
        found.update({key: [found[key][i] for i in keep] for key in ("images", "labels") if key in found})
    num_classes = found.get("num_classes", len(class_names) if class_names else 0)
    names = tuple(class_names) if class_names else tuple(f"class_{i}" for i in range(num_classes))
    info = DatasetInfo(name, 2 if binary else num_classes, ("background", "foreground") if binary else names,
                       palette if palette and not binary else pascal_palette(max(num_classes, 2)),
                       binary=binary or is_binary or num_classes == 2, splits=splits)
    if name in IMAGE_ONLY_DATASETS or split == "unlabeled" or image_only:
        dataset = ImageFiles(found.get("images", []), transform, array=found.get("array"), names=found.get("names"))
        dataset.skipped = found.get("skipped", [])
    else:
        dataset = SegmentationFiles(found["images"], found["labels"], found["decode"], num_classes, transform, binary,
                                    void_id=void_id)
    return _limited(dataset, limit, name, split, root, part), info


def check_labels(dataset, desc="checking labels", threads=4):
    """Read every (image, label) pair of a split once, before training: a corrupt image, a label of another size or a
    class id out of range raises its DatasetError now, not hours later. Subset/ConcatDataset are followed; synthetic
    and image-only sets have no label files to check. Shows a tqdm bar on a terminal. -> number of pairs read."""
    from concurrent.futures import ThreadPoolExecutor  # image decoding releases the GIL: a few threads read faster

    from tqdm import tqdm
    jobs = []

    def collect(part, indices):
        if isinstance(part, torch.utils.data.Subset):
            collect(part.dataset, [part.indices[i] for i in indices])
        elif isinstance(part, torch.utils.data.ConcatDataset):
            start = 0
            for child, stop in zip(part.datasets, part.cumulative_sizes):
                collect(child, [i - start for i in indices if start <= i < stop])
                start = stop
        elif isinstance(part, SegmentationFiles):
            jobs.extend((part, i) for i in indices)
        elif hasattr(part, "dataset"):  # wrappers that keep the dataset as .dataset
            collect(part.dataset, indices)

    collect(dataset, list(range(len(dataset))))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in tqdm(pool.map(lambda job: job[0].load(job[1]), jobs), total=len(jobs), desc=desc, leave=False,
                      disable=None if jobs else True, mininterval=1.0):
            pass
    return len(jobs)


def _no_options_left(name, options):
    if options:
        raise DatasetError(f"{name} does not take the option(s) {', '.join(sorted(options))}")


def _limited(dataset, limit, name, split, root=None, part=None):
    if len(dataset) == 0:
        where = f" at {root}" if root else ""
        split = split if part is None else f"{split}:{part[1] - part[0]:g}"
        raise DatasetError(f"{name}: split {split!r}{where} is empty; check the split lists and the folders, or "
                           f"choose another with --train-split/--val-split/--test-split, or carve one, e.g. "
                           f"--val-split train:0.1 (README 'Datasets')")
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"limit must be a positive number of images, got {limit}")
        if isinstance(dataset, Shapes):
            dataset.num_images = min(dataset.num_images, limit)
            dataset.names = dataset.names[:dataset.num_images]
        else:
            dataset.image_paths = dataset.image_paths[:limit]
            dataset.names = dataset.names[:limit]
            if isinstance(dataset, SegmentationFiles):
                dataset.label_paths = dataset.label_paths[:limit]
            elif dataset.array is not None:
                dataset.array = dataset.array[:limit]
    return dataset


# --- metrics ---

def _all_reduce_sum(tensor):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


class ConfusionMatrix:
    """K x K confusion matrix on the device (rows = truth, columns = prediction).

    update(preds, labels, region=None): preds (B, H, W) int class ids, labels (B, H, W) int64 with ignore_index,
    region (B, H, W) bool: only pixels where region is True count (PA-mIoU when region = the hidden pixels).
    """

    def __init__(self, num_classes, ignore_index=IGNORE_INDEX, device=None):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, preds, labels, region=None):
        k = self.num_classes
        valid = (labels != self.ignore_index) & (labels >= 0) & (labels < k)
        if region is not None:
            valid &= region.to(torch.bool)
        # scatter_add into k*k + 1 bins (the last one collects ignored pixels): no boolean indexing, no host sync
        index = torch.where(valid, labels.to(torch.int64) * k + preds.to(torch.int64).clamp(0, k - 1), k * k).flatten()
        counts = torch.zeros(k * k + 1, dtype=torch.int64, device=index.device)
        counts.scatter_add_(0, index, torch.ones_like(index))
        self.matrix += counts[:-1].view(k, k).to(self.matrix.device)
        return self

    def reset(self):
        self.matrix.zero_()

    def all_reduce(self):
        _all_reduce_sum(self.matrix)
        return self

    def compute(self):
        """-> {miou, per_class_iou (nan where a class has an empty union), pixel_acc, mean_acc}."""
        m = self.matrix.double()
        true_positive = m.diag()
        union = m.sum(0) + m.sum(1) - true_positive
        iou = torch.where(union > 0, true_positive / union.clamp(min=1), torch.full_like(union, float("nan")))
        support = m.sum(1)
        class_acc = torch.where(support > 0, true_positive / support.clamp(min=1), torch.full_like(support, float("nan")))
        total = m.sum()
        return {  # sync point
            "miou": float(torch.nanmean(iou)) if bool((union > 0).any()) else float("nan"),
            "per_class_iou": iou.tolist(),
            "pixel_acc": float(true_positive.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(torch.nanmean(class_acc)) if bool((support > 0).any()) else float("nan"),
        }


def bce_loss(logits, targets):
    """Mean binary cross-entropy on logits; targets float {0, 1} of the same shape."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def dice_loss(logits, targets, eps=1.0):
    """1 - (2 sum(p t) + eps) / (sum(p) + sum(t) + eps), p = sigmoid(logits), over all pixels of the batch."""
    probs = torch.sigmoid(logits.float())
    targets = targets.float()
    return 1 - (2 * (probs * targets).sum() + eps) / (probs.sum() + targets.sum() + eps)


def focal_loss(logits, targets, gamma=2.0, alpha=None):
    """Mean focal loss (Lin et al. 2017): BCE * (1 - p_t)^gamma, optionally alpha-weighted."""
    logits, targets = logits.float(), targets.float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    probs = torch.sigmoid(logits)
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = bce * (1 - p_t) ** gamma
    if alpha is not None:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss.mean()


class BinaryStats:
    """Binary segmentation metrics accumulated over a dataset (foreground = 1, 255 ignored).

    update(logits, targets): logits (B, H, W) or (B, 1, H, W) before the sigmoid; targets (B, H, W) int64.
    compute() -> iou, f1, dice (= f1), precision, recall, accuracy from dataset-level pixel counts at `threshold`;
    bce, focal_loss (pixel means), dice_loss (soft Dice over all pixels); per_image_iou (MaskSup's protocol:
    the mean over images of each image's foreground IoU, 0 for an image whose union is empty, as sklearn does).
    """

    FIELDS = ("tp", "fp", "fn", "tn", "bce", "focal", "soft_intersection", "soft_pred", "soft_true", "pixels",
              "image_iou", "images")

    def __init__(self, device=None, threshold=0.5, gamma=2.0):
        self.threshold, self.gamma = threshold, gamma
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits, targets):
        logits = logits.float().reshape(targets.shape)
        valid = targets != IGNORE_INDEX
        truth = (targets == 1) & valid
        probs = torch.sigmoid(logits)
        pred = (probs > self.threshold) & valid
        t = truth.float()
        bce = F.binary_cross_entropy_with_logits(logits, t, reduction="none") * valid
        p_t = probs * t + (1 - probs) * (1 - t)
        focal = bce * (1 - p_t) ** self.gamma
        dims = tuple(range(1, targets.dim()))
        image_tp = (pred & truth).sum(dims)
        image_union = (pred | truth).sum(dims)
        image_iou = torch.where(image_union > 0, image_tp / image_union.clamp(min=1), torch.zeros_like(image_tp, dtype=torch.float32))
        self.sums += torch.stack([
            (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth & valid).sum(), (~pred & ~truth & valid).sum(),
            bce.sum(), focal.sum(), (probs * t * valid).sum(), (probs * valid).sum(), t.sum(), valid.sum(),
            image_iou.sum(), torch.tensor(targets.shape[0], device=targets.device),
        ]).to(self.sums)
        return self

    def reset(self):
        self.sums.zero_()

    def all_reduce(self):
        _all_reduce_sum(self.sums)
        return self

    def compute(self):
        s = dict(zip(self.FIELDS, self.sums.tolist()))  # sync point

        def ratio(a, b):
            return a / b if b > 0 else float("nan")

        precision, recall = ratio(s["tp"], s["tp"] + s["fp"]), ratio(s["tp"], s["tp"] + s["fn"])
        f1 = ratio(2 * s["tp"], 2 * s["tp"] + s["fp"] + s["fn"])
        return {
            "iou": ratio(s["tp"], s["tp"] + s["fp"] + s["fn"]), "f1": f1, "dice": f1,
            "precision": precision, "recall": recall,
            "accuracy": ratio(s["tp"] + s["tn"], s["pixels"]),
            "bce": ratio(s["bce"], s["pixels"]), "focal_loss": ratio(s["focal"], s["pixels"]),
            "dice_loss": 1 - (2 * s["soft_intersection"] + 1) / (s["soft_pred"] + s["soft_true"] + 1),
            "per_image_iou": ratio(s["image_iou"], s["images"]),
        }


def per_image_foreground_iou(preds, labels, ignore_index=IGNORE_INDEX):
    """(B,) foreground IoU of each image: preds, labels (B, H, W) in {0, 1} (labels may hold ignore_index).

    MaskSup's protocol for binary sets (sklearn jaccard_score per image): 0 where an image's union is empty.
    """
    valid = labels != ignore_index
    pred, truth = (preds == 1) & valid, (labels == 1) & valid
    dims = tuple(range(1, labels.dim()))
    intersection, union = (pred & truth).sum(dims).float(), (pred | truth).sum(dims).float()
    return torch.where(union > 0, intersection / union.clamp(min=1), torch.zeros_like(union))


def per_image_micro_jaccard(preds, labels, ignore_index=IGNORE_INDEX):
    """(B,) micro-averaged multi-class Jaccard of each image (MaskSup's NYUDv2 protocol).

    Over an image's valid pixels every wrong pixel is one false positive and one false negative, so the micro
    Jaccard is correct / (correct + 2 wrong) = acc / (2 - acc). nan for an image without valid pixels.
    """
    valid = labels != ignore_index
    dims = tuple(range(1, labels.dim()))
    correct = ((preds == labels) & valid).sum(dims).float()
    wrong = (valid.sum(dims) - correct).float()
    total = correct + 2 * wrong
    return torch.where(total > 0, correct / total.clamp(min=1), torch.full_like(total, float("nan")))
