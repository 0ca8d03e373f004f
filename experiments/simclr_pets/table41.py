"""Table 4.1 of the SimCLR segmentation report as a grid of simclr_seg.py runs (calls the CLI, one process per run).

    python experiments/simclr_pets/table41.py --seeds 0 1 2                  # small synthetic form (minutes, CPU)
    python experiments/simclr_pets/table41.py --out runs/t41 --seeds 0 1 2 --grid-sources CIFAR=cifar10:data/cifar10 \
        Pet=catsdogs:data/catsdogs --data pets --data-root data/oxford-iiit-pet --pretrain-limit 23410   # the report's

Rows: baseline (--baseline-init, default none as in the report) and one SimCLR row per --grid-sources entry
(LABEL=DATA[:ROOT], a --pretrain-data with its root), each fine-tuned at every --dev-splits fraction, once per
--seeds seed. Every other flag goes to every simclr_seg.py run unchanged; the flags the grid sets per run (--stage,
--init, --dev-split, --pretrain-data, --pretrain-root, --seed, --out, --resume, --eval-only, --checkpoint) are
refused. Each run is a run directory of its own: OUT/seed<S>/pretrain-<source>, OUT/seed<S>/finetune-<source>-dev<NN>.
With --resume finished runs (results.json) are read back and an unfinished one continues (its last.pt).
Writes OUT/table4.1.md (mean +- sample std over the seeds), OUT/table4.1.csv (one row per run and seed),
OUT/table4.1-summary.csv and OUT/results.json.
"""
import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SIMCLR = ROOT / "simclr_seg.py"
TABLE_COLUMNS = ("ID", "Model", "Loss Func", "Dev Split", "IOU", "F1", "Dice", "Focal", "BCE", "Recall", "Accuracy")
METRIC_COLUMNS = TABLE_COLUMNS[4:]
PAPER_TABLE41 = {  # Table 4.1 of the report: (source, dev split %) -> test IoU, printed beside the grid's rows
    ("baseline", 20): 0.758, ("baseline", 50): 0.828, ("baseline", 80): 0.906,
    ("CIFAR", 20): 0.754, ("CIFAR", 50): 0.852, ("CIFAR", 80): 0.900,
    ("Pet", 20): 0.759, ("Pet", 50): 0.843, ("Pet", 80): 0.902,
}
PER_RUN = ("--stage", "--init", "--dev-split", "--pretrain-data", "--pretrain-root", "--seed", "--out", "--resume",
           "--eval-only", "--checkpoint")
# CHOICE C15: the grid's rows in a few minutes on a CPU when it runs on the synthetic set
SHAPES_GRID = {"--img-size": "32", "--epochs": "6", "--batch-size": "8", "--pretrain-epochs": "4",
               "--synthetic-images": "192"}
PRETRAIN_DATA = ("shapes", "cifar10", "catsdogs", "pets", "folder")


def flag_value(argv, flag):
    """The value given to `flag` in an argv list (`--flag v` or `--flag=v`), or None."""
    for i, item in enumerate(argv):
        if item == flag and i + 1 < len(argv):
            return argv[i + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return None


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", default="runs/simclr_seg-table41", help="the grid's folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0],
                        help="run every row (and every pre-training) once per seed; mean and spread over them")
    parser.add_argument("--dev-splits", type=float, nargs="+", default=[0.2, 0.5, 0.8],
                        help="dev fractions of the grid (Sec. 3.1: 0.2 0.5 0.8)")
    parser.add_argument("--grid-sources", nargs="+", default=None, metavar="LABEL=DATA[:ROOT]",
                        help="the pre-trained rows (default for --data pets: CIFAR=cifar10:data/cifar10 "
                             "Pet=catsdogs:data/catsdogs; synthetic: the stand-ins of CHOICE C15)")
    parser.add_argument("--baseline-init", default="none",
                        help="encoder of the baseline rows: none (the report's; default) | imagenet | imagenet:PATH")
    parser.add_argument("--resume", action="store_true", help="read finished runs back, continue an unfinished one")
    args, args.passthrough = parser.parse_known_args(argv)
    for flag in PER_RUN:
        if flag_value(args.passthrough, flag) is not None or flag in args.passthrough:
            parser.error(f"{flag} is set per run by the grid; drop it (the grid's own flags: --seeds, --dev-splits, "
                         f"--grid-sources, --baseline-init, --out, --resume)")
    args.synthetic = flag_value(args.passthrough, "--data") in (None, "shapes")
    if args.synthetic:
        args.passthrough = [item for flag, value in SHAPES_GRID.items() if flag_value(args.passthrough, flag) is None
                            for item in (flag, value)] + args.passthrough
    args.sources = parse_grid_sources(parser, args)
    return args


def parse_grid_sources(parser, args):
    """--grid-sources LABEL=DATA[:ROOT] ... -> {label: extra simclr_seg.py flags of its pre-training}."""
    if args.grid_sources is None and args.synthetic:  # CHOICE C15: small synthetic stand-ins for CIFAR-10 and CAT&DOG
        size = int(flag_value(args.passthrough, "--pretrain-img-size") or flag_value(args.passthrough, "--img-size"))
        return {"CIFAR": ["--pretrain-data", "shapes", "--pretrain-source-size", str(size // 2)],
                "Pet": ["--pretrain-data", "shapes", "--pretrain-source-size", str(size)]}
    sources = {}
    for item in args.grid_sources or ["CIFAR=cifar10:data/cifar10", "Pet=catsdogs:data/catsdogs"]:
        label, _, spec = item.partition("=")
        data, _, root = spec.partition(":")
        if not label or label == "baseline" or label in sources or data not in PRETRAIN_DATA:
            parser.error(f"--grid-sources takes LABEL=DATA[:ROOT] with a new label other than 'baseline' and DATA "
                         f"one of {', '.join(PRETRAIN_DATA)}, got {item!r}")
        if data == "folder" and not root:
            parser.error(f"--grid-sources {item!r}: folder needs a ROOT (folder=DIR)")
        sources[label] = ["--pretrain-data", data] + (["--pretrain-root", root] if root else [])
    return sources


def row_label(source, args):
    """CHOICE C16: the Model column names the encoder's start: the baseline's init, or the SimCLR source and the init
    its pre-training started from. The grid is fair by construction: every row and seed shares the split
    (--split-seed) and the fine-tuning recipe; only the encoder's start differs."""
    if source == "baseline":
        return f"baseline (init {args.baseline_init})"
    return f"{source} (SimCLR from {flag_value(args.passthrough, '--pretrain-init') or 'none'})"


def grid_runs(args):
    """-> list of (seed, kind, source, dev_split, run folder, simclr_seg.py argv) in run order."""
    runs, out = [], Path(args.out)
    for seed in args.seeds:
        common = [*args.passthrough, "--seed", str(seed)]
        for source, flags in args.sources.items():
            folder = out / f"seed{seed}" / f"pretrain-{source}"
            runs.append((seed, "pretrain", source, None, folder,
                         [*common, *flags, "--stage", "pretrain", "--out", str(folder)]))
        for source in ("baseline", *args.sources):
            pretrained = out / f"seed{seed}" / f"pretrain-{source}" / "pretrain.pt"
            init = args.baseline_init if source == "baseline" else f"simclr:{pretrained}"
            for dev_split in args.dev_splits:
                folder = out / f"seed{seed}" / f"finetune-{source}-dev{round(100 * dev_split)}"
                runs.append((seed, "finetune", source, dev_split, folder,
                             [*common, "--stage", "finetune", "--init", init, "--dev-split", f"{dev_split:g}",
                              "--out", str(folder)]))
    return runs


def run_once(folder, argv):
    """One simclr_seg.py run -> its results.json (read back if it finished before; continued if it has a last.pt)."""
    if (folder / "results.json").is_file():
        return json.loads((folder / "results.json").read_text())
    if folder.is_dir() and not (folder / "last.pt").is_file():
        shutil.rmtree(folder)  # the grid's own run, stopped before its first checkpoint: nothing to keep
    resume = ["--resume"] if (folder / "last.pt").is_file() else []
    subprocess.run([sys.executable, str(SIMCLR), *argv, *resume], check=True)
    return json.loads((folder / "results.json").read_text())


def summarise(rows):
    """Per (Model, Dev Split): mean and sample standard deviation over the seeds of every metric column."""
    groups = {}
    for row in rows:
        groups.setdefault((row["Model"], row["Dev Split"]), []).append(row)
    summary = []
    for (model, dev), members in groups.items():
        entry = {"ID": len(summary), "Model": model, "Loss Func": members[0]["Loss Func"], "Dev Split": dev,
                 "Source": members[0]["Source"], "Seeds": len(members)}
        for column in METRIC_COLUMNS:
            values = [m[column] for m in members]
            entry[column] = statistics.fmean(values)
            entry[f"{column} std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def summary_markdown(summary):
    columns = ("ID", "Model", "Loss Func", "Dev Split", "Seeds") + METRIC_COLUMNS
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for entry in summary:
        cells = [str(entry[c]) for c in columns[:5]] + [f"{entry[c]:.3f} ± {entry[c + ' std']:.3f}"
                                                         for c in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path, records, fieldnames):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows({k: f"{v:.4f}" if isinstance(v, float) else v for k, v in r.items()} for r in records)


def main(args):
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        sys.exit(f"error: --out {out} is not empty; pass --resume to continue that grid or another --out")
    out.mkdir(parents=True, exist_ok=True)
    rows, start, config = [], time.perf_counter(), None
    for seed, kind, source, dev_split, folder, argv in grid_runs(args):
        print(f"== table4.1: seed {seed}, {kind} {source}" + (f", dev {dev_split:g}" if dev_split else "") +
              f" -> {folder}", flush=True)
        results = run_once(folder, argv)
        if kind == "finetune":
            config = config or json.loads((folder / "config.json").read_text())
            row = results["finetune"]["row"]
            rows.append({**row, "ID": len(rows), "Model": row_label(source, args), "Seed": seed, "Source": source})
    summary = summarise(rows)
    run_args = config["args"]
    note = (f"\n\nData: {run_args['data']} (fine-tuning), {len(args.seeds)} seed(s) {args.seeds} (mean ± sample std "
            f"over seeds), split seed {run_args['split_seed']} (one test set for every row and seed), encoder "
            f"{run_args['arch']}, {run_args['img_size']} px, {run_args['pretrain_epochs']} pre-training / "
            f"{run_args['epochs']} fine-tuning epochs, {config['world_size']} process(es) on "
            f"{run_args.get('device')}, {time.perf_counter() - start:.0f} s.\n")
    if run_args["data"] == "pets":
        note += "\nThe report's IOU (one run each): " + ", ".join(
            f"{e['Source']} {e['Dev Split']}: {PAPER_TABLE41[(e['Source'], e['Dev Split'])]:.3f}"
            for e in summary if (e["Source"], e["Dev Split"]) in PAPER_TABLE41) + ".\n"
    (out / "table4.1.md").write_text("# Table 4.1 (our run)\n\n" + summary_markdown(summary) + note)
    write_csv(out / "table4.1.csv", rows, ("Seed", "Source") + TABLE_COLUMNS)
    write_csv(out / "table4.1-summary.csv", summary, list(summary[0]))
    results = {"experiment": "table4.1", "seeds": args.seeds, "rows": rows, "summary": summary}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(summary_markdown(summary) + note, flush=True)
    return results


if __name__ == "__main__":
    main(get_args())
