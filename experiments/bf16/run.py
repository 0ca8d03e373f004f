"""bf16 autocast vs fp32 on this CPU (issue 20 item 2), through the CLIs only: per method its default synthetic run
and the smallest real lane of its experiment, 3 seeds each, `--no-amp` vs `--amp`; metric, paired difference, wall.

    OMP_NUM_THREADS=1 python experiments/bf16/run.py --methods masksup selective_mim [--lanes default real]
    python experiments/bf16/run.py --only-table          # tabulate the finished runs

Runs masksup.py, simclr_seg.py, selective_mim.py and lmae.py, one thread each (OMP_NUM_THREADS=1); runs that
finished (results.json present) are not repeated. Writes <runs>/<method>-<lane>-s<seed>-<fp32|bf16>/,
<runs>/bf16.json and prints the table (mean +- sample std over seeds; the paired difference bf16 - fp32 per seed,
then its mean +- std). Needs a CPU with AVX512-BF16 or AMX.
"""
import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
SEEDS = (0, 1, 2)
# lane -> (flags, metric path in results.json). Real lanes: the smallest real lane of each method's experiment.
LANES = {
    "lmae": {
        "default": ([], "test.pa_miou"),
        # the CamVid default (--recipe fill, CHOICE C19) on the shared 30 + 10 frame sample, scored on val
        "real": (["--data", "camvid", "--data-root", str(SHARED / "CamVid"), "--test-split", "val", "--workers", "0",
                  "--epochs", "15", "--eval-every", "15"], "test.pa_miou"),
    },
    "masksup": {
        "default": ([], "test.miou"),
        # experiments/masksup_polyps: full MaskSup, high masks, 12 epochs (its layout must have been built once)
        "real": (["--data", "pranet", "--data-root", str(ROOT / "runs" / "masksup_polyps" / "data"), "--arch", "unet",
                  "--unet-width", "8", "--img-size", "64", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "8",
                  "--workers", "0", "--masking", "high", "--epochs", "12", "--test-split", "Kvasir"], "test.miou"),
    },
    "simclr_seg": {
        "default": ([], "finetune.row.IOU"),
        # experiments/simclr_pets: Pet pre-training (120 images) then fine-tuning at dev split 0.8
        "real": (["--data", "pets", "--data-root", str(SHARED / "oxford-iiit-pet"), "--pretrain-data", "pets",
                  "--pretrain-limit", "120", "--arch", "resnet18", "--img-size", "64", "--pretrain-epochs", "10",
                  "--pretrain-batch-size", "16", "--pretrain-optimizer", "adam", "--pretrain-lr", "1e-3",
                  "--crop-scale", "0.3", "1", "--color-strength", "0.5", "--epochs", "8", "--batch-size", "16",
                  "--lr", "1e-3", "--workers", "0"], "finetune.row.IOU"),
    },
    "selective_mim": {
        "default": ([], "test.miou"),
        # experiments/selective: Kvasir-SEG, selective masking, 3 partitions x 3 epochs, then 8 downstream epochs
        "real": (["--img-size", "48", "--num-patches", "36", "--msssim-window", "3", "--arch", "resnet18-unet",
                  "--workers", "0", "--pretrain-batch-size", "8", "--batch-size", "8", "--warmup-epochs", "2",
                  "--data", "kvasir", "--data-root", str(SHARED / "Kvasir-SEG"), "--pretrain-split", "train",
                  "--train-fraction", "0.2", "--partitions", "3", "--pretrain-epochs", "3", "--epochs", "8"],
                 "test.miou"),
    },
}
MODES = {"fp32": "--no-amp", "bf16": "--amp"}


def metric(results, path):
    for key in path.split("."):
        results = results[key]
    return float(results)


def run(method, lane, seed, mode, runs):
    out = runs / f"{method}-{lane}-s{seed}-{mode}"
    if not (out / "results.json").is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run starts again
        flags, _ = LANES[method][lane]
        command = [sys.executable, str(ROOT / f"{method}.py"), *flags, "--seed", str(seed), MODES[mode], "--device",
                   "cpu", "--out", str(out)]
        load, start = os.getloadavg()[0], time.time()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if result.returncode != 0:
            sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
        (out / "wall.json").write_text(json.dumps({"wall_s": round(time.time() - start, 1), "load_before": load,
                                                   "load_after": os.getloadavg()[0]}))
        print(f"{out.name}: {time.time() - start:.0f} s", flush=True)
    return json.loads((out / "results.json").read_text()), json.loads((out / "wall.json").read_text())


def mean_std(values):
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", choices=sorted(LANES), default=sorted(LANES))
    parser.add_argument("--lanes", nargs="+", choices=("default", "real"), default=("default", "real"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "bf16"))
    parser.add_argument("--only-table", action="store_true", help="do not train; tabulate the finished runs")
    args = parser.parse_args()
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    if "masksup" in args.methods and "real" in args.lanes and not args.only_table:
        spec = importlib.util.spec_from_file_location("polyps", ROOT / "experiments" / "masksup_polyps" / "run.py")
        polyps = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(polyps)
        polyps.build_layout(ROOT / "runs" / "masksup_polyps" / "data")  # its layout, built once
    rows = []
    for method in args.methods:
        for lane in args.lanes:
            scores = {mode: [] for mode in MODES}
            walls = {mode: [] for mode in MODES}
            for seed in SEEDS:
                for mode in MODES:
                    out = runs / f"{method}-{lane}-s{seed}-{mode}"
                    if args.only_table and not (out / "results.json").is_file():
                        continue
                    results, wall = run(method, lane, seed, mode, runs)
                    scores[mode].append(metric(results, LANES[method][lane][1]))
                    walls[mode].append(wall["wall_s"])
            paired = [b - a for a, b in zip(scores["fp32"], scores["bf16"])]
            if paired:
                rows.append({"method": method, "lane": lane, "metric": LANES[method][lane][1], "scores": scores,
                             "walls": walls, "paired": paired})
    (runs / "bf16.json").write_text(json.dumps(rows, indent=1))
    print("| method | lane | metric | seeds | fp32 | bf16 | bf16 - fp32 (paired) | wall fp32 / bf16 (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        n = len(row["paired"])
        print(f"| {row['method']} | {row['lane']} | {row['metric']} | {n} | {mean_std(row['scores']['fp32'][:n])} | "
              f"{mean_std(row['scores']['bf16'][:n])} | {mean_std(row['paired'])} | "
              f"{statistics.mean(row['walls']['fp32']):.0f} / {statistics.mean(row['walls']['bf16']):.0f} |")


if __name__ == "__main__":
    main()
