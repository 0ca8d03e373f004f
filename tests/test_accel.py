"""The accelerated paths (--amp --channels-last, --compile) of all four scripts, on the CPU, at the tiniest sizes.

For each script a few training steps per phase run three times in-process: fp32 eager (the reference), bf16 autocast
with NHWC convolutions (--amp --channels-last; needs a CPU with AVX512-BF16 or AMX, else skipped), and --compile.
Every logged loss (train and validation, every phase and epoch) must match the reference within tolerance():
--compile 1e-3 relative in the first epoch (the same fp32 arithmetic, fused and reordered), 1e-2 after more
updates; --amp 2e-2 (8-bit mantissas); looser where a data-dependent choice follows, and not at all for
simclr_seg's bf16 pre-training (see tolerance()).
Each accelerated run's checkpoints must hold bare fp32 weights (no `_orig_mod.`/`module.` prefix from the compile
or DDP wrappers) that an eager fp32 model loads strictly: `--eval-only` without the flags scores them.

Cost (measured on the shared 2-core CPU, load average 3-4): the default (aot_eager) file 65 s, 16 tests. Inductor,
the default backend of --compile, C++-compiles every kernel of the step (89 g++ runs for masksup's tiny U-Net): with
a cold cache 356 s for masksup (load 5.7), 123 s simclr_seg, 147 s selective_mim, 73 s lmae; warm 8-11 s each. The
suite cannot afford that, so its --compile runs use torch.compile with the `aot_eager` backend: Dynamo's graph
capture and AOTAutograd's forward/backward graphs (what our code can break: graph breaks, recompiles, functionalised
in-place ops, dtypes of the traced graph) run with eager kernels. ACCEL_BACKEND=inductor runs the same tests with
the real inductor (all 8 --compile tests passed so, 5 min 53 s with a partly warm cache):
    ACCEL_BACKEND=inductor python -m pytest -q tests/test_accel.py
"""
import functools
import importlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

SCRIPTS = ("masksup", "simclr_seg", "selective_mim", "lmae")
BACKEND = os.environ.get("ACCEL_BACKEND", "aot_eager")


def tolerance(name, mode, key):
    """Relative tolerance of the loss logged under `key` = (stage, partition, epoch, field) -> float, or None (not
    compared, only finite). Measured (aot_eager and inductor vs eager; bf16 vs fp32) at these flags: compile <= 2e-4
    before any data-dependent choice; bf16 0.01-0.8 %."""
    stage, partition = key[:2]
    # selective_mim partition 1 hides the top half of its patch scores, a discontinuous function of the weights:
    # a weight differing in the 7th digit can flip a patch, and the later phases inherit it (measured 1.4e-3).
    after_choice = name == "selective_mim" and (partition or 0) + (stage == "finetune") > 0
    if mode == "compile":
        # the first epoch of the first phase (a forward from the initial weights, then one update) to 1e-3; later,
        # the reordered sums have gone through more updates (inductor: up to 3.3e-3 in simclr_seg's epoch 2)
        first = key[2] == 1 and stage in (None, "pretrain") and not partition
        return 1e-3 if first else 1e-2
    if name == "simclr_seg" and stage == "pretrain":
        # at initialisation all projections point nearly the same way, and NT-Xent at tau 0.1 magnifies the bf16
        # rounding of the backbone's output: the forward alone differs 10 % (README 'Performance')
        return None
    return 5e-2 if after_choice else 2e-2


# A few steps of every phase, full batches only (a last short batch would add a compile for its shape).
ACCEL_FLAGS = {
    "masksup": ["--img-size", "32", "--limit", "8", "--unet-width", "4", "--epochs", "2", "--batch-size", "4",
                "--workers", "0", "--device", "cpu"],
    "simclr_seg": ["--img-size", "64", "--synthetic-images", "24", "--limit", "8", "--epochs", "2",
                   "--pretrain-epochs", "2", "--batch-size", "4", "--pretrain-batch-size", "4",
                   "--projection-hidden-dim", "32", "--projection-dim", "16", "--decoder-channels", "32", "16", "16",
                   "8", "8", "--device", "cpu", "--workers", "0"],
    "selective_mim": ["--img-size", "40", "--num-patches", "16", "--msssim-window", "3", "--arch", "resnet18-unet",
                      "--workers", "0", "--limit", "16", "--pretrain-val-fraction", "0", "--partitions", "2",
                      "--pretrain-epochs", "1", "--epochs", "1", "--pretrain-batch-size", "4", "--batch-size", "8",
                      "--device", "cpu"],
    "lmae": ["--epochs", "2", "--img-size", "32x48", "--limit", "8", "--arch", "tiny", "--workers", "0",
             "--batch-size", "4", "--device", "cpu"],
}
MODES = {"fp32": ["--no-amp"], "amp": ["--amp", "--channels-last"], "compile": ["--compile", "--no-amp"]}


def cpu_has_bf16():
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@functools.lru_cache(maxsize=None)
def run(name, mode, root):
    """Train `name` with MODES[mode] into root/name-mode once per session -> (run folder, {record key: loss})."""
    module = importlib.import_module(name)
    out = Path(root) / f"{name}-{mode}"
    compile_fn = torch.compile
    if mode == "compile":  # torch.compile(fn) inside the script -> the chosen backend
        torch.compile = functools.partial(compile_fn, backend=BACKEND)
    try:
        torch._dynamo.reset()
        module.main(module.get_args(ACCEL_FLAGS[name] + MODES[mode] + ["--out", str(out)]))
    finally:
        torch.compile = compile_fn
        torch._dynamo.reset()
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        where = (record.get("stage"), record.get("partition"), record.get("epoch"))
        losses.update({(*where, key): value for key, value in record.items()
                       if "loss" in key and isinstance(value, float)})
    return out, losses


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("accel")
    yield str(path)
    shutil.rmtree(path)  # ~1.6 GB of checkpoints


def assert_losses_match(name, mode, root):
    _, reference = run(name, "fp32", root)
    _, losses = run(name, mode, root)
    assert reference and losses.keys() == reference.keys()
    assert all(math.isfinite(value) for value in losses.values()), losses
    off = {key: (losses[key], value, tolerance(name, mode, key)) for key, value in reference.items()
           if tolerance(name, mode, key) is not None and
           not abs(losses[key] - value) <= tolerance(name, mode, key) * abs(value)}
    assert not off, f"{name} {MODES[mode]}: losses (accelerated, fp32 eager, relative tolerance) differ: {off}"


def assert_checkpoints_load_into_eager_fp32(name, mode, root):
    module = importlib.import_module(name)
    out, _ = run(name, mode, root)
    checkpoints = sorted(out.glob("*.pt"))
    assert checkpoints
    for path in checkpoints:
        state = module.load_checkpoint(path, module.SCRIPT)
        weights = state["model"]
        wrapped = [key for key in weights if key.startswith(("_orig_mod.", "module.")) or "._orig_mod." in key]
        assert not wrapped, f"{path.name} holds wrapper-prefixed keys: {wrapped[:3]}"
        assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}, path.name
    # --eval-only builds an eager fp32 model (no --amp, --compile, --channels-last) and loads best.pt strictly
    module.main(module.get_args(ACCEL_FLAGS[name] + ["--out", str(out), "--eval-only"]))
    result = json.loads((out / "eval_test.json").read_text())
    assert result


@pytest.mark.parametrize("name", SCRIPTS)
def test_compiled_steps_match_eager_fp32(name, root):
    assert_losses_match(name, "compile", root)


@pytest.mark.parametrize("name", SCRIPTS)
def test_compiled_runs_save_bare_weights_an_eager_model_loads(name, root):
    assert_checkpoints_load_into_eager_fp32(name, "compile", root)


@pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 autocast on a CPU needs AVX512-BF16 or AMX")
@pytest.mark.parametrize("name", SCRIPTS)
def test_bf16_channels_last_steps_match_fp32(name, root):
    assert_losses_match(name, "amp", root)


@pytest.mark.skipif(not cpu_has_bf16(), reason="bf16 autocast on a CPU needs AVX512-BF16 or AMX")
@pytest.mark.parametrize("name", SCRIPTS)
def test_bf16_channels_last_runs_save_fp32_weights_an_eager_model_loads(name, root):
    assert_checkpoints_load_into_eager_fp32(name, "amp", root)


# The --amp default on a CPU: on where the README's bf16 table shows the method's metric holds (all but selective_mim),
# only on a CPU with bf16; a typed --amp/--no-amp always wins (--amp without bf16 is refused).
AMP_ON_CPU = {"masksup": True, "simclr_seg": True, "selective_mim": False, "lmae": True}


class SetUp(Exception):
    pass


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("bf16", (True, False))
@pytest.mark.parametrize("typed", ([], ["--amp"], ["--no-amp"]))
def test_the_amp_default_on_a_cpu_is_per_method(name, bf16, typed, monkeypatch, tmp_path):
    module = importlib.import_module(name)
    monkeypatch.setattr(module, "cpu_supports_bf16", lambda: bf16)
    real, resolved = module.setup_runtime, []

    def setup_then_stop(args, **kw):  # main's own call, with its own arguments; then stop before any data is read
        resolved.append(real(args, **kw).amp)
        raise SetUp

    monkeypatch.setattr(module, "setup_runtime", setup_then_stop)
    args = module.get_args(ACCEL_FLAGS[name] + typed + ["--out", str(tmp_path / "run")])
    if typed == ["--amp"] and not bf16:
        with pytest.raises(module.UsageError, match="--amp: this CPU has no bf16"):
            module.main(args)
        return
    with pytest.raises(SetUp):
        module.main(args)
    assert resolved == [{"--amp": True, "--no-amp": False}[typed[0]] if typed else bf16 and AMP_ON_CPU[name]]
