"""Training-step time of each method against the same network built from widely used parts (not a test).

    /work/bench-venv/bin/python bench/compare.py                       # all four, fp32 and bf16, 3 runs, one table
    /work/bench-venv/bin/python bench/compare.py --methods selective_mim --dtypes fp32 --runs 3 --steps 5

Pairs (same sizes, same loss and optimizer unless stated; ratio = peer time / our time, > 1: ours is faster):
    masksup        masksup.py LeViT-UNet-192 (224 px)  vs  timm `levit_192` stem + stages inside the same U-Net decoder
    simclr_seg     SimCLR ResNet-50 + head, NT-Xent    vs  torchvision `resnet50` (fc = the same MLP) + the common
                                                           NT-Xent (sthalles/SimCLR `info_nce_loss`)
    selective_mim  ResNet-34 U-Net, (1 - MS-SSIM) + L1 vs  segmentation_models_pytorch `Unet('resnet34')`, same loss
    lmae           lmae.py (LMMSA blocks)              vs  the same MAE with timm ViT `Block`s (bench/bench_lmae.py)
Each step includes what the script's step does (masks drawn, forward, loss, backward, optimizer). Every (method,
dtype) runs ours and the peer in separate processes, alternating, `--runs` times; each process times `--steps`
steps after `--warmup`. timm and segmentation_models_pytorch are not requirements of the project: install them in
a separate venv (README 'Performance'). Figures only mean something on an idle machine: the load average is printed.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
METHODS = ("masksup", "simclr_seg", "selective_mim", "lmae")
PEERS = {"masksup": "timm levit_192 + same decoder", "simclr_seg": "torchvision resnet50 + NT-Xent",
         "selective_mim": "smp Unet('resnet34')", "lmae": "MAE of timm ViT Blocks"}


# --- the pairs: each returns a zero-argument step function (ours or the peer) ---

def masksup_step(impl, batch, runtime):
    import masksup
    args = masksup.get_args(["--device", "cpu", "--arch", "levit-192", "--img-size", "224", "--data", "kvasir"])
    masksup.resolve_recipe(args, True)
    model = masksup.build_model("levit-192", 1, args.unet_width, 0.0)
    if impl == "peer":
        import timm
        levit = timm.create_model("levit_192", pretrained=False, num_classes=0)
        stem = levit.stem  # conv1 act1 conv2 act2 conv3 act3 conv4: the same stride-16 stem, Hardswish between
        model.stem = nn.ModuleList([stem.conv1, stem.conv2, stem.conv3, stem.conv4])
        model.stages = nn.ModuleList(levit.stages)  # tokens (B, N, C) -> (B, N', C'), 14 -> 7 -> 4 a side
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    images = torch.rand(batch, 3, 224, 224) * 2 - 1
    labels = torch.randint(0, 2, (batch, 224, 224))
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step():
        mask = masksup.make_masks(args.masking, batch, 224, 224, generator, torch.device("cpu"))
        return masksup.train_step(model, optimizer, images, labels, mask, args, runtime)
    return model, step


def info_nce_loss(features, batch, temperature):
    """sthalles/SimCLR's info_nce_loss (the most used PyTorch SimCLR): features (2B, d) -> logits, labels."""
    labels = torch.cat([torch.arange(batch) for _ in range(2)], dim=0)
    labels = (labels.unsqueeze(0) == labels.unsqueeze(1)).float()
    features = F.normalize(features, dim=1)
    similarity = features @ features.T
    mask = torch.eye(labels.shape[0], dtype=torch.bool)
    labels = labels[~mask].view(labels.shape[0], -1)
    similarity = similarity[~mask].view(similarity.shape[0], -1)
    positives = similarity[labels.bool()].view(labels.shape[0], -1)
    negatives = similarity[~labels.bool()].view(similarity.shape[0], -1)
    logits = torch.cat([positives, negatives], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long))


def simclr_seg_step(impl, batch, runtime, size=64):
    import simclr_seg
    import torchvision
    if impl == "ours":
        model = simclr_seg.SimCLR("resnet50", 512, 128)
    else:
        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Sequential(nn.Linear(2048, 512), nn.ReLU(inplace=True), nn.Linear(512, 128))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # the same for both (not LARS)
    views = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        if impl == "ours":
            loss = simclr_seg.train_step(model, views, "pretrain", runtime, temperature=0.1)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=runtime.amp):
                features = model(torch.cat(views))
            loss = info_nce_loss(features.float(), batch, 0.1)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return model, step


def selective_mim_step(impl, batch, runtime, size=64):
    import functools
    import selective_mim as sm
    if impl == "ours":
        model = sm.build_model(3, "resnet34-unet")
    else:
        import segmentation_models_pytorch as smp
        model = smp.Unet("resnet34", encoder_weights=None, classes=3, decoder_channels=(256, 128, 64, 32, 16))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = torch.randn(batch, 3, size, size)
    grid = sm.patch_grid(size, size, 64)
    loss_fn = functools.partial(sm.reconstruction_loss, window_size=3)  # the synthetic preset's MS-SSIM window
    generator = torch.Generator().manual_seed(0)
    model.train()

    def step():
        hidden = grid.to_pixels(sm.random_masks(batch, grid.num_patches, 0.5, generator))  # (B, H, W)
        return sm.train_step(model, optimizer, sm.apply_mask(images, hidden), images, loss_fn, runtime)
    return model, step


def lmae_step(impl, batch, runtime):
    import bench_lmae
    import lmae
    args = bench_lmae.get_args(["--device", "cpu", "--arch", "tiny", "--img-size", "224", "--patch-size", "16",
                                "--batch-size", str(batch)])
    config = bench_lmae.step_args(args, "tiny")
    model = lmae.build_model(config, args.num_classes)
    if impl == "peer":
        model = bench_lmae.with_timm_blocks(model, "tiny")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    images = torch.randn(batch, 3, 224, 224)
    labels = torch.randint(0, args.num_classes, (batch, 224, 224))
    labels[:, :112] = 0
    model.train()
    return model, lambda: lmae.train_step(model, optimizer, images, labels, config, runtime)


STEPS = {"masksup": (masksup_step, 4), "simclr_seg": (simclr_seg_step, 16), "selective_mim": (selective_mim_step, 8),
         "lmae": (lmae_step, 8)}  # (builder, default batch)


def worker(args):
    """One process: build (method, impl), warm up, time --steps steps -> one JSON line."""
    torch.manual_seed(0)
    import masksup  # any of the four: the same Runtime (plumbing block)
    runtime = masksup.Runtime(torch.device("cpu"), amp=args.dtype == "bf16")
    builder, batch = STEPS[args.method]
    model, step = builder(args.impl, args.batch_size or batch, runtime)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        float(step().flatten()[0])  # the step's result on the host: its work is done
        times.append(time.perf_counter() - start)
    print(json.dumps({"method": args.method, "impl": args.impl, "dtype": args.dtype, "step_ms": 1000 * min(times),
                      "median_ms": 1000 * statistics.median(times),
                      "params_m": sum(p.numel() for p in model.parameters()) / 1e6}), flush=True)


def load():
    return os.getloadavg()[0]


def driver(args):
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    rows, loads = [], [load()]
    for method in args.methods:
        for dtype in args.dtypes:
            pairs = []
            for run in range(args.runs):
                result = {}
                for impl in (("ours", "peer") if run % 2 == 0 else ("peer", "ours")):  # alternate who goes first
                    command = [sys.executable, __file__, "--worker", method, impl, dtype, "--steps", str(args.steps),
                               "--warmup", str(args.warmup)] + (["--batch-size", str(args.batch_size)]
                                                                if args.batch_size else [])
                    out = subprocess.run(command, env=env, capture_output=True, text=True)
                    if out.returncode:
                        sys.exit(f"error: {method} {impl} {dtype} failed:\n{out.stderr[-2000:]}")
                    result[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                    loads.append(load())
                pairs.append(result)
                print(json.dumps({"method": method, "dtype": dtype, "run": run, "ours_ms": result["ours"]["step_ms"],
                                  "peer_ms": result["peer"]["step_ms"], "load1": round(load(), 2)}), flush=True)
            ratios = [p["peer"]["step_ms"] / p["ours"]["step_ms"] for p in pairs]
            rows.append((method, PEERS[method], dtype, statistics.median(p["ours"]["step_ms"] for p in pairs),
                         statistics.median(p["peer"]["step_ms"] for p in pairs), min(ratios), max(ratios),
                         pairs[0]["ours"]["params_m"], pairs[0]["peer"]["params_m"]))
    print(f"\nCPU {args.threads} thread(s), {args.runs} alternating runs x {args.steps} steps (fastest step), load "
          f"average {min(loads):.2f}-{max(loads):.2f}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}")
    print("| method | peer | dtype | ours ms/step | peer ms/step | ratio peer/ours (min-max) | params M ours/peer |")
    print("|---|---|---|---|---|---|---|")
    for method, peer, dtype, ours, theirs, low, high, p_ours, p_peer in rows:
        print(f"| {method} | {peer} | {dtype} | {ours:.0f} | {theirs:.0f} | {low:.2f}-{high:.2f} | "
              f"{p_ours:.1f} / {p_peer:.1f} |")


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="our training steps vs the ecosystem's parts (CPU)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--dtypes", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"])
    parser.add_argument("--runs", type=int, default=3, help="alternating process pairs per (method, dtype)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per process (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=None, help="default per method: 4, 16, 8, 8")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads of each worker (default 1)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "IMPL", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.method, args.impl, args.dtype = args.worker
    return args


if __name__ == "__main__":
    arguments = get_args()
    worker(arguments) if arguments.worker else driver(arguments)
