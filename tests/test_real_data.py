"""Real data as users hold it (issue 18): datasets in their released layouts with only some splits, folder datasets
of any split names, label files in the formats users have (8/16-bit ids, palette, colour RGB, a void id), and the
class count from the checkpoint or from all splits. Every case runs the command as a user would (a subprocess with
tiny sizes) and checks the exit code, the one `error:` line, and that nothing the user owns changed."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_contract import ENV, ROOT, snapshot

MASKSUP = ["--arch", "unet", "--unet-width", "4", "--img-size", "32", "--batch-size", "2", "--epochs", "1",
           "--workers", "0", "--device", "cpu", "--levit-weights", "none"]
SELECTIVE = ["--img-size", "40", "--num-patches", "16", "--msssim-window", "3", "--arch", "resnet18-unet",
             "--workers", "0", "--pretrain-batch-size", "4", "--batch-size", "4", "--partitions", "1",
             "--pretrain-epochs", "1", "--epochs", "1", "--device", "cpu"]
LMAE = ["--epochs", "1", "--img-size", "32", "--patch-size", "8", "--batch-size", "2", "--arch", "tiny",
        "--workers", "0", "--device", "cpu"]


def run(script, *argv):
    """The command line as a user types it -> (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / f"{script}.py"), *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def one_error(code, err, *words):
    """Exit 2, no traceback, exactly one `error:` line holding `words` -> that line."""
    assert code == 2 and "Traceback" not in err, f"exit {code}: {err[-1500:]}"
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-1500:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"
    return lines[0]


def succeeded(code, err):
    assert code == 0, err[-2500:]


def image(path, rng, size=(48, 64)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)


def label(path, ids, mode="L"):
    """Write class ids (H, W) as an 8-bit grey ("L"), 16-bit ("I;16") or palette ("P") PNG, or colour RGB ("RGB":
    the ids painted with a colour map, as CamVid's and Cityscapes' colour files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = np.asarray(ids)
    if mode == "I;16":
        Image.fromarray(ids.astype(np.uint16)).save(path)
    elif mode == "RGB":
        colours = np.array([[128, 64, 128], [70, 70, 70], [107, 142, 35], [0, 0, 142]] + [[0, 0, 0]] * 252,
                           dtype=np.uint8)
        Image.fromarray(colours[ids]).save(path)
    else:
        picture = Image.fromarray(ids.astype(np.uint8))
        if mode == "P":
            picture = picture.convert("P")
            picture.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
            picture.putdata(list(ids.astype(np.uint8).ravel()))
        picture.save(path)


def ids_map(classes, shift=0, size=(48, 64)):
    """Blocks of the given class ids side by side."""
    ids = np.zeros(size, np.uint8)
    for i, c in enumerate(classes):
        ids[:, (i * size[1]) // len(classes) + shift:] = c
    return ids


def folder_tree(root, splits, classes=(0, 1, 2), per_split=None, mode="L", count=4):
    """<split>/{images,masks}/ of a folder dataset; per_split: {split: class ids} overrides `classes`."""
    rng = np.random.default_rng(0)
    for split in splits:
        for i in range(count):
            image(root / split / "images" / f"{split}{i}.png", rng)
            label(root / split / "masks" / f"{split}{i}.png", ids_map((per_split or {}).get(split, classes), i), mode)
    return root


def camvid_test_only(root, void=True):
    """The SegNet CamVid release with only test/ + testannot/ (ids 0..10, 11 = void)."""
    rng = np.random.default_rng(1)
    for i in range(6):
        image(root / "test" / f"0001TP_{i:06d}.png", rng)
        label(root / "testannot" / f"0001TP_{i:06d}.png", ids_map((0, 3, 10, 11 if void else 5), i))
    return root


# --- datasets that hold only some splits ---

def test_camvid_with_only_its_test_split(tmp_path):
    """CamVid as released with only test/ + testannot/: training names the splits on disk and the carve rule; a run
    carved from test trains; --eval-only scores the test split, its network flags taken from the checkpoint."""
    root = camvid_test_only(tmp_path / "CamVid")
    before = snapshot(root)
    out = tmp_path / "run"
    line = one_error(*run("masksup", "--data", "camvid", "--data-root", root, *MASKSUP, "--out", out)[::2],
                     f"{root / 'train'} not found", "splits on disk are test", "--val-split test:0.1")
    assert not out.exists(), line
    succeeded(*run("masksup", "--data", "camvid", "--data-root", root, *MASKSUP, "--train-split", "test",
                   "--val-split", "test:0.34", "--test-split", "test:0.34", "--out", out)[::2])
    assert json.loads((out / "config.json").read_text())["num_classes"] == 11
    code, _, err = run("masksup", "--data", "camvid", "--data-root", root, "--eval-only", "--out", out,
                       "--img-size", "32", "--workers", "0", "--device", "cpu")
    succeeded(code, err)
    assert "test" in json.loads((out / "eval_test.json").read_text()) and snapshot(root) == before


def test_cvc_clinicdb_three_sequences_choose_the_splits(tmp_path):
    """CVC-ClinicDB frames of three sequences: the seeded split by sequence leaves val and test empty, and the error
    says how to choose or carve them; with the split flags the run trains and tests."""
    rng = np.random.default_rng(2)
    root = tmp_path / "CVC-ClinicDB"
    for frame in (1, 2, 3, 26, 27, 28, 51, 52):  # sequences 1, 2 and 3
        image(root / "Original" / f"{frame}.png", rng)
        label(root / "Ground Truth" / f"{frame}.png", np.where(ids_map((0, 1), frame % 5) > 0, 255, 0))
    out = tmp_path / "run"
    one_error(*run("masksup", "--data", "cvc", "--data-root", root, *MASKSUP, "--out", out)[::2],
              "is empty", "--val-split", "--test-split")
    assert not out.exists()
    succeeded(*run("masksup", "--data", "cvc", "--data-root", root, *MASKSUP, "--train-split", "all",
                   "--val-split", "all:0.25", "--test-split", "all:0.25", "--out", out)[::2])
    config = json.loads((out / "config.json").read_text())
    assert config["train_images"] == 4


def test_partial_label_recipe_with_a_degraded_test_split(tmp_path):
    """README's partial-label recipe when the *test* split was degraded: lmae.py reads deg/test/{images,masks}."""
    source = folder_tree(tmp_path / "mine", ("test",), count=8)
    deg, out = tmp_path / "deg", tmp_path / "run"
    succeeded(*run("lmae", "degrade", "--data", "folder", "--data-root", source, "--split", "test", "--ratio", "0.5",
                   "--patch-size", "8", "--out", deg)[::2])
    one_error(*run("lmae", "--data", "folder", "--data-root", deg, *LMAE, "--out", out)[::2],
              f"{deg / 'train' / 'images'} not found", "splits on disk are test", "--train-split")
    assert not out.exists()
    succeeded(*run("lmae", "--data", "folder", "--data-root", deg, *LMAE, "--train-split", "test",
                   "--val-split", "test:0.25", "--test-split", "test:0.25", "--num-classes", "3", "--out", out)[::2])
    assert json.loads((out / "results.json").read_text())["test"]


# --- the class count: from the checkpoint or from every split, never from one ---

def test_masksup_eval_only_on_folder_data_with_the_training_flags(tmp_path):
    """16-bit id masks; the test split lacks class 2. The class count is read from all splits (3), so --eval-only
    with the very flags of training scores the checkpoint, and so does a folder holding only a test split with
    classes 0 and 1 (the count then comes from the checkpoint)."""
    root = folder_tree(tmp_path / "mine", ("train", "val", "test"), per_split={"test": (0, 1)}, mode="I;16")
    only_test = folder_tree(tmp_path / "only_test", ("test",), classes=(0, 1))
    out = tmp_path / "run"
    flags = ["--data", "folder", "--data-root", root, "--mask-mode", "ids", *MASKSUP, "--out", out]
    succeeded(*run("masksup", *flags)[::2])
    assert json.loads((out / "config.json").read_text())["num_classes"] == 3
    succeeded(*run("masksup", *flags, "--eval-only")[::2])
    (out / "eval_test.json").unlink()
    before = snapshot(only_test)
    succeeded(*run("masksup", "--data", "folder", "--data-root", only_test, "--mask-mode", "ids", "--eval-only",
                   "--out", out, "--img-size", "32", "--workers", "0", "--device", "cpu")[::2])
    assert json.loads((out / "eval_test.json").read_text())["test"] and snapshot(only_test) == before


def test_selective_mim_on_a_users_folder(tmp_path):
    """The test split lacks class 3: the run pre-trains, fine-tunes and tests (no crash after pre-training), and
    --eval-only scores a folder holding only test/ with the checkpoint's network and K. A mask with an id beyond
    --num-classes stops the run before the first pre-training step, with no run directory."""
    root = folder_tree(tmp_path / "mine", ("train", "val", "test"), classes=(0, 1, 2, 3),
                       per_split={"test": (0, 1, 2)}, count=3)
    out = tmp_path / "run"
    succeeded(*run("selective_mim", "--data", "folder", "--data-root", root, *SELECTIVE, "--out", out)[::2])
    assert json.loads((out / "results.json").read_text())["test"]
    only_test = folder_tree(tmp_path / "only_test", ("test",), classes=(0, 1), count=2)
    succeeded(*run("selective_mim", "--data", "folder", "--data-root", only_test, "--eval-only", "--out", out,
                   "--img-size", "40", "--num-patches", "16", "--msssim-window", "3", "--workers", "0",
                   "--device", "cpu")[::2])  # --arch resnet18-unet and K = 4 from the checkpoint
    assert json.loads((out / "eval_test.json").read_text())["test"]
    bad = tmp_path / "bad"
    one_error(*run("selective_mim", "--data", "folder", "--data-root", root, "--num-classes", "3", *SELECTIVE,
                   "--out", bad)[::2], "class ids [3] outside 0..2", "--num-classes 4")
    assert not bad.exists()


# --- label formats ---

@pytest.mark.parametrize("script", ["masksup", "lmae"])
def test_colour_rgb_labels_are_refused_naming_the_file(script, tmp_path):
    root = folder_tree(tmp_path / "mine", ("train", "val", "test"), mode="RGB", count=2)
    before, out = snapshot(root), tmp_path / "run"
    flags = MASKSUP + ["--mask-mode", "ids"] if script == "masksup" else LMAE
    one_error(*run(script, "--data", "folder", "--data-root", root, *flags, "--out", out)[::2],
              "colour-coded RGB", str(root), "single-channel")
    assert not out.exists() and snapshot(root) == before


def test_void_id_is_declared_not_blamed(tmp_path):
    """Masks with CamVid's void id 11 beside ids 0..10: the error says how to declare it; --void-id 11 trains."""
    root = folder_tree(tmp_path / "mine", ("train", "val", "test"), classes=(0, 5, 10, 11), count=2)
    out = tmp_path / "run"
    flags = ["--data", "folder", "--data-root", root, *LMAE, "--num-classes", "11", "--out", out]
    one_error(*run("lmae", *flags)[::2], "class ids [11] outside 0..10", "--void-id 11")
    assert not out.exists()
    succeeded(*run("lmae", *flags, "--void-id", "11")[::2])
    assert json.loads((out / "config.json").read_text())["num_classes"] == 11
    # --eval-only takes the network (--arch tiny --patch-size 8) and K from the checkpoint, not the defaults
    succeeded(*run("lmae", "--data", "folder", "--data-root", root, "--void-id", "11", "--eval-only", "--out", out,
                   "--img-size", "32", "--workers", "0", "--device", "cpu")[::2])
    assert json.loads((out / "eval_test.json").read_text())["test"]


def test_simclr_seg_names_the_pet_splits(tmp_path):
    """simclr_seg.py's split flags: the Pet reader's official test list and a seeded fifth of trainval as val, in
    place of Sec. 3.1's protocol; its in-domain pre-training never sees that test split; synthetic data refuses."""
    import simclr_seg
    from test_contract import make_pets_tree
    root = make_pets_tree(tmp_path)
    args = simclr_seg.get_args(["--data", "pets", "--data-root", str(root), "--train-split", "trainval",
                                "--val-split", "trainval:0.2", "--pretrain-data", "pets"])
    pool = simclr_seg.build_pool(args, simclr_seg.keep_image, image_only=True)
    splits = simclr_seg.split_indices(args, pool)
    names = {role: sorted(pool.names[i] for i in indices) for role, indices in splits.items()}
    test_list = (root / "annotations" / "test.txt").read_text().split()[::4]
    assert names["test"] == sorted(test_list) and len(names["val"]) == 3 and len(names["train"]) == 11
    assert not set(names["train"]) & set(names["val"])
    images, _ = simclr_seg.build_pretrain_images(args)
    assert len(images) == 14 and not {pool.names[i] for i in images.indices} & set(names["test"])
    with pytest.raises(SystemExit):
        simclr_seg.get_args(["--test-split", "test"])
