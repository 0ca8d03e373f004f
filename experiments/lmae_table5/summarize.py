"""Table of experiments/lmae_table5/run.sh: test mIoU of the segmentation model per label variant (mean +- std over
seeds) and the completion quality of the training labels (reads results.json / summary.json files only)."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lmae_table5")


def fmt(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f} (n={len(values)})"


print("| training labels of the segmentation model | test mIoU (CamVid val) |")
print("| --- | --- |")
for variant in ("degraded", "completed", "full"):
    values = [json.loads(p.read_text())["test"]["miou"] for p in sorted(out.glob(f"seg-{variant}-s*/results.json"))]
    if values:
        print(f"| {variant} | {fmt(values)} |")
summaries = [json.loads(p.read_text()) for p in sorted(out.glob("completed-s*/summary.json"))]
if summaries:
    print()
    print("| completion of the unknown training pixels | PA-mIoU |")
    print("| --- | --- |")
    for key, label in (("pa_miou", "L-MAE (trained on the degraded labels only)"),
                       ("nearest_pa_miou", "nearest known pixel"), ("frequent_pa_miou", "most frequent known class")):
        print(f"| {label} | {fmt([s[key] for s in summaries])} |")
