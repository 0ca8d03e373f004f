"""Table of experiments/lmae_camvid/run.sh: PA-mIoU of the unknown pixels, mean +- std over seeds (reads
summary.json files only)."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lmae_camvid")
rows, counted = {}, set()
for summary in sorted(out.glob("completed-*/summary.json")):
    _, name, ratio, seed = summary.parent.name.split("-")
    values = json.loads(summary.read_text())
    cell = rows.setdefault(ratio[1:], {})
    first = (ratio, seed) not in counted  # the baselines do not depend on the model: count them once per seed
    counted.add((ratio, seed))
    for key, label in (("pa_miou", f"L-MAE ({name})"), ("nearest_pa_miou", "nearest known pixel"),
                       ("frequent_pa_miou", "most frequent known class")):
        if key != "pa_miou" and not first:
            continue
        cell.setdefault(label, []).append(values[key])
        cell.setdefault(label + " acc", []).append(values[key.replace("miou", "pixel_acc")])


def fmt(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f} (n={len(values)})"


gaps = {}  # (ratio, model) -> [L-MAE PA-mIoU - nearest PA-mIoU] per seed (same masks)
for summary in sorted(out.glob("completed-*/summary.json")):
    _, name, ratio, seed = summary.parent.name.split("-")
    values = json.loads(summary.read_text())
    gaps.setdefault((ratio[1:], name), []).append(values["pa_miou"] - values["nearest_pa_miou"])

print("| unknown share | fill | PA-mIoU | pixel acc. (unknown pixels) | PA-mIoU minus nearest fill, paired by seed |")
print("| --- | --- | --- | --- | --- |")
for ratio in sorted(rows):
    for label in [k for k in rows[ratio] if not k.endswith(" acc")]:
        name = label[len("L-MAE ("):-1] if label.startswith("L-MAE") else None
        gap = fmt(gaps[(ratio, name)]) if name else ""
        print(f"| {float(ratio):.0%} | {label} | {fmt(rows[ratio][label])} | {fmt(rows[ratio][label + ' acc'])} | "
              f"{gap} |")

# Levers (experiments/lmae_camvid_full/run.sh): each lane minus the default lane `fill`, same seed and masks.
levers = {(ratio, name): [] for ratio, name in gaps if name not in ("fill", None)}
for (ratio, name), values in levers.items():
    for summary in sorted(out.glob(f"completed-{name}-r{ratio}-s*/summary.json")):
        fill = summary.parent.parent / summary.parent.name.replace(f"-{name}-", "-fill-") / "summary.json"
        if fill.is_file():
            values.append(json.loads(summary.read_text())["pa_miou"] - json.loads(fill.read_text())["pa_miou"])
if any(levers.values()):
    print("\n| unknown share | lane | PA-mIoU minus the fill lane's, paired by seed |\n| --- | --- | --- |")
    for (ratio, name), values in sorted(levers.items()):
        if values:
            print(f"| {float(ratio):.0%} | {name} | {fmt(values)} |")
