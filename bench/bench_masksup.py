"""Training-step throughput of MaskSup vs the plain supervised step (not a test).

MaskSup runs two forward/backward passes per image (clean + masked), the supervised baseline one; this prints
images/s and peak GPU memory for both, per network, one JSON line per configuration:

    python bench/bench_masksup.py --device cuda --steps 200 [--compile]      # LeViT-UNet-192/-384 at 224x224
    python bench/bench_masksup.py --device cpu --steps 3                      # tiny CPU smoke run
    python bench/bench_masksup.py --device cpu --amp-both --steps 20          # CPU: bf16 autocast vs fp32

On CUDA: bf16 autocast and channels_last (as masksup.py with --amp --channels-last); --amp-both measures each
configuration with and without bf16 autocast (on a CPU it needs AVX512-BF16/AMX). Masks are drawn on the device
every step with the free-form generator (--masking high), as in training. Synthetic random inputs, so data
loading is not measured.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import masksup  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="MaskSup training-step benchmark")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 CUDA, 1 CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 (paper) on CUDA, 2 on CPU")
    parser.add_argument("--archs", nargs="+", default=None, choices=masksup.ARCHS,
                        help="default levit-192 levit-384 on CUDA, unet on CPU")
    parser.add_argument("--img-size", type=int, default=None, help="224 for LeViT; default 224 CUDA, 64 CPU")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="keep NCHW (channels_last is on by default on CUDA)")
    parser.add_argument("--no-amp", dest="amp", action="store_false",
                        help="fp32 (bf16 autocast is on by default on CUDA)")
    parser.add_argument("--amp-both", action="store_true", help="measure with and without bf16 autocast")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.batch_size = args.batch_size or (16 if cuda else 2)
    args.archs = args.archs or (["levit-192", "levit-384"] if cuda else ["unet"])
    args.img_size = args.img_size or (224 if cuda or any(a != "unet" for a in args.archs) else 64)
    args.amp = args.amp and cuda
    args.amp_settings = [True, False] if args.amp_both else [args.amp]
    args.channels_last = args.channels_last and cuda
    return args


def bench(arch, method, args):
    device = torch.device(args.device)
    flags = ["--device", args.device, "--arch", arch, "--img-size", str(args.img_size), "--data", "kvasir"]
    if method == "supervised":
        flags += ["--alpha2", "0", "--alpha3", "0"]
    run_args = masksup.get_args(flags)
    masksup.resolve_recipe(run_args, True)
    run_args.amp, run_args.channels_last = args.amp, args.channels_last
    runtime = masksup.Runtime(device, amp=args.amp)
    torch.manual_seed(0)
    model = masksup.build_model(run_args.arch, 1, run_args.unet_width, run_args.drop_path).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    step = torch.compile(masksup.train_step) if args.compile else masksup.train_step
    B, S = args.batch_size, args.img_size
    images = torch.rand(B, 3, S, S, device=device) * 2 - 1
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 2, (B, S, S), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    model.train()

    def one_step():
        mask = masksup.make_masks(run_args.masking, B, S, S, generator, device)
        return step(model, optimizer, images, labels, mask, run_args, runtime)

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        losses = one_step()
    losses.sum().item()  # sync point: wait for the last step
    elapsed = time.perf_counter() - started
    return {
        "method": method, "arch": arch, "img_size": S, "batch_size": B, "steps": args.steps,
        "passes_per_step": 1 if method == "supervised" else 2, "device": args.device,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "amp_bf16": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "parameters": sum(p.numel() for p in model.parameters()),
        "images_per_s": round(B * args.steps / elapsed, 2),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.type == "cuda" else None,
    }


def main(args):
    for arch in args.archs:
        for method in ("masksup", "supervised"):
            for amp in args.amp_settings:
                args.amp = amp
                print(json.dumps(bench(arch, method, args)), flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main(get_args())
