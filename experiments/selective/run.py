"""Selective vs random masking vs no pre-training on the shared real samples (issue 12 item 4), through the CLI.

    OMP_NUM_THREADS=1 python experiments/selective/run.py            # both datasets, ~25 min on one CPU thread
    python experiments/selective/run.py --datasets camvid --only-table   # rebuild the tables from finished runs

Per dataset: one pre-training per masking (seed 0: --stage pretrain --masking selective | random), then the
downstream U-Net from each of them and from scratch with the paper's three downstream seeds 0, 1234, 3741
(--stage finetune --pretrained ...): the same labelled set, the same test images for every row. The lowest-k
classes are chosen once, from the no-pre-training rows, and shared by all rows (Tables 3-4). Table 8: the last
partition's reconstruction loss of both pre-trainings. Fig. 3: random vs selective masks on real images (the
selective run's samples of its last partition). Writes runs under --runs, results.json, table.md and fig3_*.png
next to this file. Runs that finished (results.json present) are not repeated.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SHARED = Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = HERE
SEEDS = (0, 1234, 3741)  # the paper's downstream seeds (Sec. 2.4)
# Tiny sizes for a 2-core CPU shared with other jobs: 48 px shortest side, 6 x 6 patches, ResNet-18 U-Net.
COMMON = ["--img-size", "48", "--num-patches", "36", "--msssim-window", "3", "--arch", "resnet18-unet",
          "--workers", "0", "--pretrain-batch-size", "8", "--batch-size", "8", "--warmup-epochs", "2",
          "--device", "cpu"]
DATASETS = {
    # The shared CamVid sample has train (30) and val (10) only: val is the reported split, so nothing may be
    # selected on it: best.pt = the last epoch (--select-by last).
    "camvid": dict(flags=["--data", "camvid", "--data-root", str(SHARED / "CamVid"), "--pretrain-split", "train",
                          "--test-split", "val", "--select-by", "last"],
                   pretrain=["--partitions", "3", "--pretrain-epochs", "30"], finetune=["--epochs", "12"],
                   lowest_k=4),
    # Kvasir-SEG: 300 images, the reader's seeded 80/10/10 split (--split-seed 0 for every run); downstream on the
    # first fifth of train and val (48 + 6 labelled images, the paper's Nassar protocol),
    # all 30 test images; pre-training on all 240 train images without labels.
    "kvasir": dict(flags=["--data", "kvasir", "--data-root", str(SHARED / "Kvasir-SEG"), "--pretrain-split", "train",
                          "--train-fraction", "0.2"],
                   pretrain=["--partitions", "3", "--pretrain-epochs", "3"], finetune=["--epochs", "8"],
                   lowest_k=1),
}


def get_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=sorted(DATASETS))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "experiments-selective"), help="run folders")
    parser.add_argument("--out", default=str(HERE), help="where results.json, table.md and the figures go")
    parser.add_argument("--only-table", action="store_true", help="do not train; tabulate the finished runs")
    return parser.parse_args()


def run(out, argv, log):
    """One CLI run unless it finished before; returns its results.json."""
    if not (out / "results.json").is_file():
        if out.exists():
            shutil.rmtree(out)  # an interrupted run: start it again (the script keeps no partial state)
        command = [sys.executable, str(ROOT / "selective_mim.py"), *argv, "--out", str(out)]
        start = time.time()
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode != 0:
            sys.exit(f"failed: {' '.join(command)}\n{result.stderr[-2000:]}")
        log.append({"run": str(out.relative_to(out.parents[1])), "wall_s": round(time.time() - start, 1)})
        print(f"{log[-1]['run']}: {log[-1]['wall_s']} s", flush=True)
    return json.loads((out / "results.json").read_text())


def spread(values):
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def experiment(name, spec, runs, log):
    base = spec["flags"] + COMMON
    pretrained = {}
    for masking in ("selective", "random"):
        out = runs / name / f"pretrain-{masking}"
        pretrained[masking] = (out, run(out, base + spec["pretrain"] + ["--stage", "pretrain", "--masking", masking,
                                                                          "--seed", "0"], log))
    rows = {}
    for init in ("none", "random", "selective"):
        rows[init] = []
        for seed in SEEDS:
            argv = base + spec["finetune"] + ["--stage", "finetune", "--seed", str(seed), "--init", init]
            if init != "none":
                argv += ["--pretrained", str(pretrained[init][0] / "pretrained.pt")]
            rows[init].append(run(runs / name / f"finetune-{init}-seed{seed}", argv, log))
    classes = rows["none"][0]["class_names"]
    none_class = np.nanmean([[np.nan if v is None else v for v in r["test"]["per_class_iou"]] for r in rows["none"]],
                            axis=0)
    lowest = [int(i) for i in np.argsort(np.nan_to_num(none_class, nan=np.inf))[:spec["lowest_k"]]]  # chosen once
    table = {}
    for init, results in rows.items():
        per_class = np.array([[np.nan if v is None else v for v in r["test"]["per_class_iou"]] for r in results])
        table[init] = {"miou": spread([r["test"]["miou"] for r in results]),
                       "lowest_k": spread(np.nanmean(per_class[:, lowest], axis=1)),
                       "per_class": {classes[i]: spread(per_class[:, i]) for i in lowest},
                       "chance_miou": results[0]["test"]["chance_miou"]}
    table8 = {masking: {key: summary["pretrain"][key] for key in ("rec_loss", "val_rec_loss", "val_rec_loss_random")}
              for masking, (_, summary) in pretrained.items()}
    last = int(pretrained["selective"][1]["pretrain"]["partition"])
    figures = sorted((pretrained["selective"][0] / "samples").glob(f"pretrain_partition{last}_epoch_*.png"))
    if figures:
        shutil.copyfile(figures[-1], OUT / f"fig3_{name}.png")
    score = [json.loads(line) for line in (pretrained["selective"][0] / "metrics.jsonl").read_text().splitlines()]
    score = [r for r in score if r["stage"] == "score"]
    return {"rows": table, "lowest_classes": [classes[i] for i in lowest], "table8": table8, "scoring": score,
            "test_split": rows["none"][0]["test_split"]}


def markdown(results):
    lines = []
    for name, result in results.items():
        k = len(result["lowest_classes"])
        lines += [f"**{name}** (test split `{result['test_split']}`; lowest-{k} classes from the no-pre-training rows: "
                  f"{', '.join(result['lowest_classes'])})", "",
                  f"| initialisation | test mIoU (mean ± sd, 3 seeds) | lowest-{k} class IoU | chance mIoU |",
                  "|---|---|---|---|"]
        for init in ("none", "random", "selective"):
            row = result["rows"][init]
            lines.append(f"| {init} | {row['miou'][0]:.3f} ± {row['miou'][1]:.3f} | "
                         f"{row['lowest_k'][0]:.3f} ± {row['lowest_k'][1]:.3f} | {row['chance_miou']:.3f} |")
        t8 = result["table8"]
        lines += ["", "| pre-training (Table 8) | last-partition train rec. loss | val rec. loss, own masks | "
                      "val rec. loss, random masks |", "|---|---|---|---|"]
        for masking in ("random", "selective"):
            lines.append(f"| {masking} | {t8[masking]['rec_loss']:.4f} | {t8[masking]['val_rec_loss']:.4f} | "
                         f"{t8[masking]['val_rec_loss_random']:.4f} |")
        lines += ["", "| scoring step | hide-count overlap (chance 0.5) | Spearman score vs hide count | "
                      "never hidden |", "|---|---|---|---|"]
        for record in result["scoring"]:
            lines.append(f"| partition {record['partition']} | {record['hide_count_overlap']:.3f} | "
                         f"{record['hide_count_spearman']:.3f} | {record['never_hidden']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    global OUT
    args = get_args()
    OUT = Path(args.out)
    runs, log = Path(args.runs), []
    previous = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").is_file() else {}
    results = previous.get("datasets", {})
    start = time.time()
    for name in args.datasets:
        if args.only_table and not (runs / name).is_dir():
            continue
        results[name] = experiment(name, DATASETS[name], runs, log)
    walls = previous.get("wall_s", []) + log
    (OUT / "results.json").write_text(json.dumps({"datasets": results, "wall_s": walls}, indent=2))
    (OUT / "table.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wall time of this call: {time.time() - start:.0f} s; of all runs: {sum(w['wall_s'] for w in walls):.0f} s")


if __name__ == "__main__":
    main()
