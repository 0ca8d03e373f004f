"""Table of experiments/lmae_table5/run.sh and camvid_full.sh: test mIoU of the segmentation model per label variant
(mean +- std over seeds, and paired by seed against the degraded labels) and the completion quality of the unknown
training pixels (reads results.json / summary.json files only)."""
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/lmae_table5")


def fmt(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f} (n={len(values)})"


def test_miou(variant):
    return {p.parent.name.rsplit("-s", 1)[1]: json.loads(p.read_text())["test"]["miou"]
            for p in sorted(out.glob(f"seg-{variant}-s*/results.json"))}


base = test_miou("degraded")
print("| training labels of the segmentation model | test mIoU (CamVid val) | minus degraded, paired by seed |")
print("| --- | --- | --- |")
for variant in ("degraded", "nearest", "completed", "full"):
    scores = test_miou(variant)
    paired = [scores[s] - base[s] for s in scores if s in base]
    if scores:
        print(f"| {variant} | {fmt(list(scores.values()))} | {fmt(paired) if variant != 'degraded' and paired else ''} |")
# run.sh writes completed-sN/, camvid_full.sh model-sN/ (and nearest-sN/, whose summary holds the same nearest score)
summaries = [json.loads(p.read_text()) for p in sorted([*out.glob("completed-s*/summary.json"),
                                                        *out.glob("model-s*/summary.json")])]
if summaries:
    print()
    print("| completion of the unknown training pixels | PA-mIoU |")
    print("| --- | --- |")
    for key, label in (("pa_miou", "L-MAE (trained on the degraded labels only)"),
                       ("nearest_pa_miou", "nearest known pixel"), ("frequent_pa_miou", "most frequent known class")):
        print(f"| {label} | {fmt([s[key] for s in summaries])} |")
