"""The run contract (README 'Conventions'), checked on all four scripts with tiny synthetic runs.

Each method's test module defines CONTRACT_TINY (argv of a seconds-long synthetic run of the whole pipeline, without
--out) and CONTRACT_FOLDER (argv that makes the script read a --data-root this test fills: `--data folder`, or
`--data pets` for simclr_seg). Every user mistake must end in one `error:` line on stderr, exit code 2, no traceback,
and nothing written or overwritten; an interrupted run resumed with --resume must equal the uninterrupted one.
"""
import ast
import importlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("masksup", "simclr_seg", "selective_mim", "lmae")
TWO_STAGE = ("simclr_seg", "selective_mim")
BEGIN = "# --- plumbing: identical in masksup.py, simclr_seg.py, selective_mim.py, lmae.py ---"
END = "# --- end of plumbing ---"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def method(name):
    return importlib.import_module(name)


def tiny(name):
    return list(importlib.import_module(f"test_{name}").CONTRACT_TINY)


def folder_flags(name):
    return list(importlib.import_module(f"test_{name}").CONTRACT_FOLDER)


def block_of(name):
    text = (ROOT / f"{name}.py").read_text()
    assert text.count(BEGIN) == 1 and text.count(END) == 1, f"{name}.py must hold the plumbing block exactly once"
    return text[text.index(BEGIN):text.index(END) + len(END)]


# --- one plumbing block ---

def test_plumbing_blocks_are_byte_identical():
    blocks = {name: block_of(name) for name in SCRIPTS}
    reference = blocks["masksup"]
    for name, block in blocks.items():
        assert block == reference, f"{name}.py's plumbing block differs from masksup.py's (diff the two files)"
    assert len(reference.splitlines()) > 100


@pytest.mark.parametrize("name", SCRIPTS)
def test_no_plumbing_name_is_defined_twice(name):
    """An old copy of a plumbing function left elsewhere in the file would silently shadow (or be shadowed by) the
    block's version."""
    text = (ROOT / f"{name}.py").read_text()
    block = block_of(name)
    block_names = {node.name for node in ast.parse(block.replace(END, "")).body
                   if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    rest = text.replace(block, "")
    rest_names = [node.name for node in ast.parse(rest).body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assert not block_names & set(rest_names), f"{name}.py redefines {sorted(block_names & set(rest_names))}"
    assert len(rest_names) == len(set(rest_names)), f"{name}.py defines a name twice"


# --- the block's parts, one by one (the copies are identical, so masksup's copy stands for all four) ---

def test_finite_guard_stops_on_inf_and_nan_and_names_the_first_bad_step():
    m = method("masksup")
    for bad in (float("inf"), float("-inf"), float("nan")):
        guard = m.FiniteGuard()
        for loss in (1.0, 2.0, bad, 3.0, bad):
            guard.observe(torch.tensor(loss))
        with pytest.raises(m.UsageError, match=r"pretrain epoch 4 step 3: the loss is not finite.*--pretrain-lr"):
            guard.check("pretrain", 4, "--pretrain-lr")
        guard.observe(torch.tensor(1.0))
        guard.check("pretrain", 5)  # a new epoch starts clean
    m.FiniteGuard().check("finetune", 1)  # an epoch without steps


def test_epoch_sampler_orders_are_keyed_by_seed_stage_and_epoch():
    m = method("masksup")
    solo = m.Runtime(torch.device("cpu"))

    def order(seed=0, stage="pretrain", epoch=1, runtime=solo, shuffle=True, items=10, batch=4):
        sampler = m.EpochSampler(items, seed, runtime, shuffle=shuffle, batch_size=batch)
        sampler.set_epoch(stage, epoch)
        return list(sampler)

    first = order()
    assert first == order() and sorted(i for i, _ in first) == list(range(10))
    for other in (order(epoch=2), order(stage="finetune"), order(seed=1)):
        assert [i for i, _ in other] != [i for i, _ in first]
    assert len({s for _, s in first}) == 10 and {s for _, s in first} != {s for _, s in order(epoch=2)}
    ranks = [order(runtime=m.Runtime(torch.device("cpu"), rank, 2), items=9, batch=5) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 5 and {i for r in ranks for i, _ in r} == set(range(9))
    assert [i for i, _ in order(shuffle=False, runtime=m.Runtime(torch.device("cpu"), 1, 2), items=5)] == [1, 3]
    assert len(order(items=9, batch=4)) == 8  # a lone last item is dropped (BatchNorm never sees a batch of one)


def test_seeded_items_draw_from_the_item_seed_and_keep_the_callers_state():
    m = method("masksup")

    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, index):
            return (index, random.random(), float(np.random.rand()), float(torch.rand(())))

    items = m.SeededItems(Draws())
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    assert items[(1, 11)] == items[(1, 11)]
    assert all(a != b for a, b in zip(items[(1, 11)][1:], items[(1, 12)][1:]))
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.get_rng_state(), states[2])


# --- one meaning per shared flag (README Conventions table) ---

SHARED_FLAGS = ("--data", "--data-root", "--epochs", "--batch-size", "--lr", "--seed", "--out", "--resume",
                "--eval-only", "--checkpoint", "--limit", "--workers", "--device", "--amp", "--compile",
                "--channels-last", "--deterministic")
TWO_STAGE_FLAGS = ("--stage", "--pretrain-epochs", "--pretrain-batch-size", "--pretrain-lr")


def help_text(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        method(name).get_args(["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_readme_conventions_table_lists_the_shared_flags():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Conventions"):]
    section = section[:section.index("\n## ", 3)]
    for flag in SHARED_FLAGS + TWO_STAGE_FLAGS:
        assert f"`{flag}" in section, f"README Conventions does not list {flag}"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_has_every_convention_flag(name, capsys):
    text = help_text(name, capsys)
    flags = SHARED_FLAGS + (TWO_STAGE_FLAGS if name in TWO_STAGE else ())
    for flag in flags:
        assert re.search(rf"(^|\s){re.escape(flag)}[\s,=]", text, re.M), f"{name}.py --help lacks {flag}"
    if name in TWO_STAGE:
        assert re.search(r"\{pretrain,finetune,both\}", text), f"{name}.py --stage must offer pretrain|finetune|both"
    # each default shown once: argparse's own "(default: ...)" and a hand-written one would both appear
    entries = re.split(r"\n\s{2}(?=-)", text)
    for entry in entries:
        assert entry.count("(default") <= 1, f"{name}.py --help shows a default twice: {entry.strip()[:80]}"


# --- running the CLI ---

def run_in_process(name, argv, capsys):
    """main_guard(main, get_args(argv)) as the command line would run it -> (exit code, stderr)."""
    module = method(name)
    capsys.readouterr()
    try:
        module.main_guard(module.main, lambda: module.get_args(argv))
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 2
    return code, capsys.readouterr().err


def assert_one_error_line(code, err, *words):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, f"exit code {code}, stderr: {err[-800:]}"
    assert "Traceback" not in err, err[-2000:]
    error_lines = [line for line in lines if line.startswith("error: ")]
    assert len(error_lines) == 1, f"expected one 'error:' line, got: {err[-800:]}"
    for word in words:
        assert word in error_lines[0], f"{word!r} not in {error_lines[0]!r}"


def snapshot(folder):
    folder = Path(folder)
    if not folder.exists():
        return None
    if folder.is_file():
        return folder.read_bytes()
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder_tree(root, bad=None):
    """{train,val,test}/{images,masks}: 6/2/2 RGB 64x48 images with 3-class masks. bad: 'size' puts a mask of the
    wrong size in the test split."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("val", 2), ("test", 2)):
        for i in range(count):
            image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
            mask = np.zeros((48, 64), np.uint8)
            mask[10:30, 10 + i:40 + i] = 1
            mask[30:44, 40:60] = 2
            if bad == "size" and split == "test" and i == 1:
                mask = np.zeros((40, 40), np.uint8)
            write_png(root / split / "images" / f"{split}{i}.png", image)
            write_png(root / split / "masks" / f"{split}{i}.png", mask)
    return root


def make_pets_tree(root, bad=None):
    """A fake Oxford-IIIT Pet release with 20 images; bad: 'id' writes trimap value 77 into the last image."""
    base = root / "oxford-iiit-pet"
    rng = np.random.default_rng(0)
    stems = [f"{'Abyssinian' if i % 2 else 'beagle'}_{i}" for i in range(20)]
    for i, stem in enumerate(stems):
        image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        (base / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(base / "images" / f"{stem}.jpg")
        trimap = np.full((48, 64), 2, np.uint8)
        trimap[10:38, 12:50] = 1
        trimap[9, 12:50] = 3
        if bad == "id" and i == len(stems) - 1:
            trimap[0, 0] = 77
        write_png(base / "annotations" / "trimaps" / f"{stem}.png", trimap)
    (base / "annotations" / "trainval.txt").write_text("".join(f"{s} 1 1 1\n" for s in stems[:14]))
    (base / "annotations" / "test.txt").write_text("".join(f"{s} 1 1 1\n" for s in stems[14:]))
    return base


def data_root_with(name, tmp_path, bad):
    if name == "simclr_seg":
        return make_pets_tree(tmp_path / "pets", bad="id" if bad else None)
    return make_folder_tree(tmp_path / "folder", bad="size" if bad else None)


# --- every FAIL cell of issue 9's reliability table ---

@pytest.mark.parametrize("name", SCRIPTS)
def test_out_is_an_existing_file(name, tmp_path, capsys):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    code, err = run_in_process(name, tiny(name) + ["--out", str(target)], capsys)
    assert_one_error_line(code, err, str(target))
    assert target.read_text() == "mine"


@pytest.mark.parametrize("name", SCRIPTS)
def test_non_empty_folder_that_is_not_a_run(name, tmp_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text('{"mine": true}')
    (folder / "notes.txt").write_text("keep")
    before = snapshot(folder)
    for extra in ([], ["--resume"], ["--eval-only"]):
        code, err = run_in_process(name, tiny(name) + ["--out", str(folder)] + extra, capsys)
        assert_one_error_line(code, err, str(folder))
        assert snapshot(folder) == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_without_checkpoint(name, tmp_path, capsys):
    for out in (tmp_path / "absent", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        code, err = run_in_process(name, tiny(name) + ["--out", str(out), "--resume"], capsys)
        assert_one_error_line(code, err, "--resume")
    assert not (tmp_path / "absent").exists() and not any((tmp_path / "empty").iterdir())


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkpoint_without_eval_only(name, tmp_path, capsys):
    code, err = run_in_process(name, tiny(name) + ["--out", str(tmp_path / "r"), "--checkpoint", "x.pt"], capsys)
    assert_one_error_line(code, err, "--checkpoint")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_flag_value_is_one_line(name, capsys):
    code, err = run_in_process(name, ["--epochs", "many"], capsys)
    assert_one_error_line(code, err, "--epochs")


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("data_error", ["label", "missing"])
def test_data_errors_before_anything_is_written(name, data_error, tmp_path, capsys):
    """A bad label in the test split (wrong size; pets: trimap id 77), or a missing data root, stops the run before
    --out exists (so nothing has to be cleaned up, and a corrected run can use the same --out)."""
    root = data_root_with(name, tmp_path, bad=True) if data_error == "label" else tmp_path / "nowhere"
    out = tmp_path / "run"
    code, err = run_in_process(name, folder_flags(name) + ["--data-root", str(root), "--out", str(out)], capsys)
    assert_one_error_line(code, err)
    assert not out.exists(), f"{name}.py wrote {sorted(p.name for p in out.iterdir())} before refusing the data"


@pytest.mark.parametrize("name", SCRIPTS)
def test_real_folder_layout_runs(name, tmp_path, capsys):
    """The same tree without the bad label trains and writes results (the error above came from the label)."""
    root = data_root_with(name, tmp_path, bad=False)
    code, err = run_in_process(name, folder_flags(name) + ["--data-root", str(root), "--out", str(tmp_path / "r")],
                               capsys)
    assert code == 0, err[-2000:]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["test"]


# --- runs that diverge, and what they leave behind ---

LR_FLAGS = {name: ["--lr"] + (["--pretrain-lr"] if name in TWO_STAGE else []) for name in SCRIPTS}


@pytest.mark.parametrize("name, flag", [(n, f) for n in SCRIPTS for f in LR_FLAGS[n]])
def test_non_finite_loss_stops_the_run(name, flag, tmp_path, capsys):
    out = tmp_path / "r"
    code, err = run_in_process(name, tiny(name) + ["--out", str(out), flag, "1e30"], capsys)
    assert_one_error_line(code, err, "not finite", "epoch", "step")
    for line in (out / "metrics.jsonl").read_text().splitlines() if (out / "metrics.jsonl").exists() else []:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds a bare {c}"))
    for checkpoint in out.rglob("*.pt"):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        for key, tensor in state["model"].items():
            if tensor.is_floating_point():
                assert torch.isfinite(tensor).all(), f"{checkpoint.name} holds non-finite {key}"
    assert not (out / "results.json").exists()


# --- checkpoints: our own, whole, of this script ---

@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    """One finished tiny run per script (subprocess, as a user runs it), shared by the tests below."""
    runs = {}
    for name in SCRIPTS:
        out = tmp_path_factory.mktemp(name) / "run"
        result = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *tiny(name), "--out", str(out),
                                 "--deterministic", "--workers", "0"], capture_output=True, text=True, cwd=ROOT,
                                env=ENV, timeout=600)
        runs[name] = (out, result)
    yield runs
    for out, _ in runs.values():
        shutil.rmtree(out.parent)


def finished(finished_runs, name):
    out, result = finished_runs[name]
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("name", SCRIPTS)
def test_run_directory_contents(name, finished_runs):
    out = finished(finished_runs, name)
    config = json.loads((out / "config.json").read_text())
    assert config["script"] == f"{name}.py"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records and all("epoch" in r for r in records)
    assert min(r["epoch"] for r in records) == 1, "epochs count from 1"
    if name in TWO_STAGE:
        assert {r.get("stage") for r in records} >= {"pretrain", "finetune"}
    results = json.loads((out / "results.json").read_text())
    assert isinstance(results["test"], dict) and results["test"]
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()


@pytest.mark.parametrize("name", SCRIPTS)
def test_eval_only_writes_eval_test_json(name, finished_runs, tmp_path, capsys):
    out = finished(finished_runs, name)
    results = json.loads((out / "results.json").read_text())
    target = tmp_path / "eval"
    code, err = run_in_process(name, tiny(name) + ["--eval-only", "--checkpoint", str(out / "best.pt"),
                                                   "--out", str(target), "--workers", "0"], capsys)
    assert code == 0, err[-2000:]
    evaluation = json.loads((target / "eval_test.json").read_text())
    assert set(evaluation["test"]) == set(results["test"]), "eval_test.json must use results.json's metric names"
    for key, value in results["test"].items():
        if isinstance(value, float):
            assert evaluation["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("name", SCRIPTS)
def test_foreign_and_truncated_checkpoints(name, finished_runs, tmp_path, capsys):
    out = finished(finished_runs, name)
    other = SCRIPTS[(SCRIPTS.index(name) + 1) % len(SCRIPTS)]
    foreign = finished(finished_runs, other) / "best.pt"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes((out / "best.pt").read_bytes()[:4096])
    not_torch = tmp_path / "notes.pt"
    not_torch.write_text("not a checkpoint")
    for checkpoint, word in ((foreign, f"{other}.py"), (truncated, "truncated"), (not_torch, str(not_torch)),
                             (tmp_path / "absent.pt", "absent.pt")):
        code, err = run_in_process(name, tiny(name) + ["--eval-only", "--checkpoint", str(checkpoint),
                                                       "--out", str(tmp_path / "eval")], capsys)
        assert_one_error_line(code, err, word)
    assert not (tmp_path / "eval" / "eval_test.json").exists()


@pytest.mark.parametrize("name", SCRIPTS)
def test_existing_run_needs_resume(name, finished_runs, capsys):
    out = finished(finished_runs, name)
    before = snapshot(out)
    code, err = run_in_process(name, tiny(name) + ["--out", str(out)], capsys)
    assert_one_error_line(code, err, "--resume")
    assert snapshot(out) == before


# --- SIGKILL, then --resume: nothing lost, nothing doubled ---

KILLER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import {name} as m
mode, target = {mode!r}, {target}
if mode == "after-record":
    write = m.MetricsLog.write
    def killing_write(self, record):
        write(self, record)
        if self.count == target:
            os.kill(os.getpid(), signal.SIGKILL)
    m.MetricsLog.write = killing_write
else:
    observe = m.FiniteGuard.observe
    calls = [0]
    def killing_observe(self, loss):
        observe(self, loss)
        calls[0] += 1
        if mode == "count":
            open({count_file!r}, "w").write(str(calls[0]))
        elif calls[0] == target:
            os.kill(os.getpid(), signal.SIGKILL)
    m.FiniteGuard.observe = killing_observe
sys.argv = [{name!r} + ".py"] + {argv!r}
m.main_guard(m.main, m.get_args)
"""

TIME_KEYS = re.compile(r"(^|_)(time|seconds|wall|images_per_s|elapsed)($|_)")


def run_killer(name, argv, mode, target, count_file=""):
    code = KILLER.format(root=str(ROOT), name=name, mode=mode, target=target, argv=argv, count_file=str(count_file))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV,
                          timeout=600)


def records_of(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not TIME_KEYS.search(k)} for r in records]


def models_of(out):
    states = {}
    for path in sorted(out.glob("*.pt")):
        state = torch.load(path, map_location="cpu", weights_only=True)
        states[path.name] = state["model"]
    return states


@pytest.mark.parametrize("name", SCRIPTS)
def test_sigkill_then_resume_equals_the_uninterrupted_run(name, tmp_path):
    argv = tiny(name) + ["--deterministic", "--workers", "0"]
    straight = tmp_path / "straight"
    count_file = tmp_path / "steps"
    result = run_killer(name, argv + ["--out", str(straight)], "count", 0, count_file)
    assert result.returncode == 0, result.stderr[-3000:]
    total_steps = int(count_file.read_text())
    total_records = len(records_of(straight))
    assert total_records >= 2 and total_steps >= 3
    # killed between a record and its checkpoint (the last record of a 2-record run: its epoch must be redone and
    # the orphan record dropped), and in the middle of an epoch
    cases = [("after-record", total_records - 1 if total_records > 2 else total_records),
             ("mid-epoch", total_steps // 2 + 1)]
    outs = [tmp_path / f"{mode}-{target}" for mode, target in cases]
    # the two cases run side by side (one thread each), then the two resumes
    killers = [subprocess.Popen([sys.executable, "-c", KILLER.format(root=str(ROOT), name=name, mode=mode,
                                                                     target=target, argv=argv + ["--out", str(out)],
                                                                     count_file="")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
               for (mode, target), out in zip(cases, outs)]
    for case, killer in zip(cases, killers):
        _, err = killer.communicate(timeout=600)
        assert killer.returncode == -signal.SIGKILL, (case, err[-2000:])
    resumes = [subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), *argv, "--out", str(out), "--resume"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
               for out in outs]
    for case, resumed, out in zip(cases, resumes, outs):
        _, err = resumed.communicate(timeout=600)
        assert resumed.returncode == 0, (case, err[-3000:])
        assert records_of(out) == records_of(straight), case
        expected, got = models_of(straight), models_of(out)
        assert set(got) == set(expected), case
        for file in expected:
            for key in expected[file]:
                assert torch.equal(expected[file][key], got[file][key]), (case, file, key)


# --- torchrun: 2 gloo processes, one with an empty evaluation shard ---

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("name", SCRIPTS)
def test_torchrun_empty_shard_and_sharded_metrics(name, tmp_path, capsys):
    """2 CPU processes with --limit 1: rank 1's evaluation shard is empty; the run must finish, record world_size 2,
    print every line once (rank 0 only), and its summed test metrics must equal a single-process evaluation of the
    same best.pt (every item counted exactly once)."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(ROOT / f"{name}.py"), *tiny(name), "--limit", "1", "--out", str(out), "--workers", "0"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}.py under torchrun did not finish in 300 s (a rank waiting for a collective?)")
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines and len(lines) == len(set(lines)), "a line printed twice: only rank 0 prints"
    results = json.loads((out / "results.json").read_text())
    code, err = run_in_process(name, tiny(name) + ["--limit", "1", "--eval-only", "--out", str(out),
                                                   "--workers", "0"], capsys)
    assert code == 0, err[-2000:]
    evaluation = json.loads((out / "eval_test.json").read_text())
    for key, value in results["test"].items():
        if isinstance(value, float):
            assert evaluation["test"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


# --- torchrun: 2 gloo processes with batch B take the step of 1 process with batch 2B ---

ONE_STEP_DRIVER = """
import os, shutil, sys
import torch
import torch.distributed as dist
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm

# float64 everywhere the scripts do not cast on purpose: float32 rounding, amplified through a freshly initialised
# network, is ~5e-3 of the gradient, the size of the effects this test must see
torch.set_default_dtype(torch.float64)
torch.nn.modules.module.register_module_forward_pre_hook(
    lambda module, args: tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args))


def global_batch_norm(self, x):
    # BatchNorm over the batch of all ranks, what SyncBatchNorm does on CUDA (it refuses CPU tensors); the same
    # formula with one process
    if not self.training:
        return native_batch_norm(self, x)
    dims = [0] + list(range(2, x.dim()))
    C = x.shape[1]
    shape = [1, C] + [1] * (x.dim() - 2)
    sums = torch.cat([x.sum(dims), x.new_tensor([x.numel() / C])])
    sums = all_reduce(sums) if dist.is_initialized() else sums  # sums the gradients back as well
    n = sums[-1]
    mean = sums[:C] / n
    squares = ((x - mean.view(shape)) ** 2).sum(dims)
    var = (all_reduce(squares) if dist.is_initialized() else squares) / n
    with torch.no_grad():
        self.num_batches_tracked += 1
        self.running_mean.lerp_(mean.detach(), self.momentum)
        self.running_var.lerp_(var.detach() * n / (n - 1), self.momentum)
    y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
    return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


native_batch_norm = _BatchNorm.forward
_BatchNorm.forward = global_batch_norm
sys.path.insert(0, {root!r})
import {name} as m

save, saved = m.save_checkpoint, [0]


def keeping_save(path, *args, **kwargs):  # every checkpoint as written, e.g. last.pt after each stage's one step
    save(path, *args, **kwargs)
    saved[0] += 1
    shutil.copy(path, os.path.join(os.path.dirname(path), f"step{{saved[0]}}-{{os.path.basename(path)}}"))


m.save_checkpoint = keeping_save
sys.argv = [{name!r} + ".py"] + sys.argv[1:]
m.main_guard(m.main, m.get_args)
"""


def float_tensors(tree, prefix=""):
    found = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            found.update(float_tensors(value, f"{prefix}{key}."))
        elif torch.is_tensor(value) and value.is_floating_point():
            found[f"{prefix}{key}"] = value
    return found


def relative_difference(a, b):
    """||a - b|| / ||a|| over every tensor of two dicts with the same keys and shapes."""
    assert a.keys() == b.keys()
    num = sum(float(((a[k] - b[k]).double() ** 2).sum()) for k in a)
    den = sum(float((a[k].double() ** 2).sum()) for k in a)
    return (num / max(den, 1e-300)) ** 0.5


@pytest.mark.parametrize("name", SCRIPTS)
def test_torchrun_two_processes_take_the_step_of_one_with_twice_the_batch(name, tmp_path):
    """Stated tolerance: Adam's moments after the first step (exp_avg = (1 - beta1) g, exp_avg_sq = (1 - beta2) g^2:
    the averaged gradient of the step) and the BatchNorm running statistics of every stage agree within 1e-5
    relative between 2 gloo processes with batch 4 and 1 process with batch 8, in float64 with BatchNorm over the
    global batch (the stand-in for SyncBatchNorm above). Measured: 1e-15 (masksup, lmae, selective_mim pre-training)
    to 1e-6 (simclr_seg fine-tuning). It fails for masks or augmentation drawn per rank instead of per item (lmae's
    old rank-keyed masks: 0.15), a loss pooled per rank (selective_mim's Jaccard without over_ranks), an item seen
    twice or not at all, or gradients left un-averaged. The weights themselves are not compared: Adam's first update
    is lr * g / (|g| + eps), so a parameter whose true gradient is 0 (a conv bias before a BatchNorm) moves by up to
    lr on rounding noise. Per-rank BatchNorm, the default, is measured in the README."""
    driver = tmp_path / "driver.py"
    driver.write_text(ONE_STEP_DRIVER.format(root=str(ROOT), name=name))
    two_argv = list(importlib.import_module(f"test_{name}").CONTRACT_ONE_STEP)  # with the batch of each process
    one_argv = [str(2 * int(value)) if flag in ("--batch-size", "--pretrain-batch-size") else value
                for flag, value in zip([None] + two_argv, two_argv)]
    assert one_argv != two_argv
    one, two = tmp_path / "one", tmp_path / "two"
    # 1 process with batch 2B next to the 2 workers torchrun would start with batch B (the environment torchrun
    # gives them, without torchrun's own process: the test above runs torchrun), all three at once
    port = free_port()
    runs = [subprocess.Popen([sys.executable, str(driver), *one_argv, "--out", str(one)], cwd=ROOT, env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    runs += [subprocess.Popen([sys.executable, str(driver), *two_argv, "--out", str(two)], cwd=ROOT,
                              env={**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    try:
        outputs = [run.communicate(timeout=300) for run in runs]
    except subprocess.TimeoutExpired:
        for run in runs:
            run.kill()
        pytest.fail(f"{name}.py: the 1- and 2-process runs did not finish in 300 s")
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err[-3000:]
    steps = sorted(path.name for path in one.glob("step*-*.pt"))
    assert steps == sorted(path.name for path in two.glob("step*-*.pt"))
    stages = 0
    for step in steps:
        a = torch.load(one / step, map_location="cpu", weights_only=True)
        b = torch.load(two / step, map_location="cpu", weights_only=True)
        if "optimizer" not in a:
            continue  # selective_mim's pretrained.pt: the weights of the step already compared in last.pt
        stages += 1
        states_a, states_b = a["optimizer"]["state"], b["optimizer"]["state"]
        assert {int(s["step"]) for s in states_a.values()} == {1}, (step, "not exactly one optimizer step")
        assert {int(s["step"]) for s in states_b.values()} == {1}, (step, "not exactly one optimizer step")
        for moment in ("exp_avg", "exp_avg_sq"):
            first = {key: state[moment] for key, state in states_a.items()}
            second = {key: state[moment] for key, state in states_b.items()}
            assert relative_difference(first, second) < 1e-5, (step, moment, relative_difference(first, second))
        buffers = [key for key in a["model"] if "running_" in key]
        if buffers:
            assert relative_difference({k: a["model"][k] for k in buffers},
                                       {k: b["model"][k] for k in buffers}) < 1e-5, (step, "BatchNorm statistics")
    assert stages == {"masksup": 1, "lmae": 1, "simclr_seg": 2, "selective_mim": 3}[name], steps


# --- --sync-bn: SyncBatchNorm under torchrun on CUDA (the conversion; its effect is the global BatchNorm above) ---

def test_sync_batch_norm_only_under_torchrun_on_cuda(monkeypatch):
    m = method("masksup")  # the plumbing block is identical in the four files
    converted = []
    monkeypatch.setattr(torch.nn.SyncBatchNorm, "convert_sync_batchnorm",
                        classmethod(lambda cls, model, process_group=None: converted.append(model) or "synced"))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    cuda_ddp = m.Runtime(torch.device("cuda", 0), rank=0, world_size=2)
    assert m.sync_batch_norm(model, True, cuda_ddp) == "synced" and converted == [model]
    for enabled, runtime in [(False, cuda_ddp), (True, m.Runtime(torch.device("cpu"), rank=0, world_size=2)),
                             (True, m.Runtime(torch.device("cuda", 0), rank=0, world_size=1))]:
        assert m.sync_batch_norm(model, enabled, runtime) is model, (enabled, runtime)
    assert len(converted) == 1


class Converted(Exception):
    pass


@pytest.mark.parametrize("name", ("masksup", "simclr_seg", "selective_mim"))
@pytest.mark.parametrize("flag,expected", [(None, True), ("--no-sync-bn", False)])
def test_sync_bn_flag_reaches_the_conversion(name, flag, expected, tmp_path, monkeypatch):
    """Every BatchNorm script hands --sync-bn (default on) to sync_batch_norm with the model it then trains."""
    m = method(name)
    seen = []

    def spy(model, enabled, runtime):
        seen.append((enabled, any(isinstance(x, torch.nn.BatchNorm2d) for x in model.modules())))
        raise Converted

    monkeypatch.setattr(m, "sync_batch_norm", spy)
    with pytest.raises(Converted):
        m.main(m.get_args(tiny(name) + ([flag] if flag else []) + ["--out", str(tmp_path / "run")]))
    assert seen == [(expected, True)]


# --- one writer per run directory, an unwritable --out, Ctrl-C, progress in a log ---

@pytest.mark.parametrize("name", SCRIPTS)
def test_two_runs_started_together_into_one_out(name, tmp_path):
    """Both pass the early checks (the folder is empty); the lock taken under --out lets exactly one write there."""
    out = tmp_path / "run"
    runs = [subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), *tiny(name), "--workers", "0", "--seed",
                              str(seed), "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env=ENV) for seed in (0, 1)]
    results = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in results) == [0, 2], results
    seed = [s for s, (code, _) in enumerate(results) if code == 0][0]
    code, err = results[1 - seed]
    assert_one_error_line(code, err, str(out), "in use by another run", "pass another --out")
    config = json.loads((out / "config.json").read_text())
    assert config.get("seed", config.get("args", {}).get("seed")) == seed  # the config of the run that wrote
    epochs = [(r.get("stage"), r.get("partition"), r["epoch"]) for r in records_of(out) if "epoch" in r]
    assert epochs and len(epochs) == len(set(epochs)), epochs  # one run's records, not two runs' interleaved
    assert not (out / ".lock").exists() and not list(out.glob("*.tmp"))


def test_a_live_lock_refuses_a_later_run_and_a_dead_ones_is_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(f"{os.getppid()}\n")  # a live process that is not this one
    code, err = run_in_process("masksup", tiny("masksup") + ["--out", str(out)], capsys)
    assert_one_error_line(code, err, f"--out {out} is in use by another run (pid {os.getppid()})")
    assert snapshot(out) == {".lock": f"{os.getppid()}\n".encode()}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / ".lock").write_text(dead.stdout)
    code, err = run_in_process("masksup", tiny("masksup") + ["--out", str(out)], capsys)
    assert code == 0 and "was left by a process that is gone; taking it over" in err, err[-2000:]
    assert (out / "results.json").is_file() and not (out / ".lock").exists()


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("where", ["/proc/no-such-run", "file/run"])
def test_unwritable_out_is_one_line(name, where, tmp_path, capsys):
    (tmp_path / "file").write_text("a file where a folder is expected")
    out = where if where.startswith("/") else str(tmp_path / where)
    code, err = run_in_process(name, tiny(name) + ["--out", out], capsys)
    assert_one_error_line(code, err, f"--out {out}: cannot write in", "pass a folder you can write to")
    assert snapshot(tmp_path) == {"file": b"a file where a folder is expected"}


@pytest.mark.parametrize("command", ["degrade", "complete"])
def test_unwritable_out_of_the_lmae_subcommands_is_one_line(command, tmp_path, capsys):
    (tmp_path / "best.pt").write_bytes(b"not read before --out is checked")
    argv = ["degrade"] if command == "degrade" else ["complete", "--checkpoint", str(tmp_path / "best.pt"),
                                                      "--images", str(tmp_path), "--labels", str(tmp_path)]
    code, err = run_in_process("lmae", argv + ["--out", "/proc/no-such-run"], capsys)
    assert_one_error_line(code, err, "--out /proc/no-such-run: cannot write in /proc")


def test_ctrl_c_says_how_to_continue_and_leaves_nothing_half_written(tmp_path):
    out = tmp_path / "run"
    argv = [a for a in tiny("masksup") if a != "--eval-masked"]
    argv[argv.index("--epochs") + 1] = "1000"
    run = subprocess.Popen([sys.executable, str(ROOT / "masksup.py"), *argv, "--out", str(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    while not (out / "last.pt").is_file() and run.poll() is None:
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"interrupted: continue with --resume --out {out}" and "Traceback" not in err
    assert not (out / ".lock").exists() and not list(out.rglob("*.tmp"))
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert state["log_records"] <= len(records_of(out)) and state["epoch"] >= 1


def test_progress_without_a_terminal_prints_a_plain_line_at_most_every_30_s(monkeypatch, capsys):
    m = method("masksup")
    clock = iter([0.0, 10.0, 29.0, 31.0, 40.0, 62.0, 70.0])
    monkeypatch.setattr(m.time, "monotonic", lambda: next(clock))
    runtime = m.Runtime(torch.device("cpu"))
    bar = m.progress(range(6), runtime, "train epoch 3")  # stderr is captured: not a terminal
    assert isinstance(bar, m.PlainProgress)
    assert list(bar) == list(range(6))
    assert capsys.readouterr().out.splitlines() == ["train epoch 3: 3/6 after 31 s", "train epoch 3: 5/6 after 62 s"]
    assert not isinstance(m.progress(range(2), m.Runtime(torch.device("cpu"), rank=1), "x"), m.PlainProgress)


def test_a_checkpoint_of_other_flags_names_the_parts_that_differ(tmp_path):
    m = method("masksup")
    m.save_checkpoint(tmp_path / "best.pt", {"model": {}}, "masksup.py", "unet-w8-k11")
    with pytest.raises(m.UsageError, match="holds a unet-w8-k11 model but these flags build unet-w8-k10 "
                                           r"\(k11 there, k10 here\); change those flags"):
        m.load_checkpoint(tmp_path / "best.pt", "masksup.py", "unet-w8-k10")
