"""Training-step throughput of simclr_seg.py (not a test): images/s and peak GPU memory, one JSON line per config.

    python bench/bench_simclr_seg.py --device cuda --steps 200                # ResNet-50, bf16, channels-last
    python bench/bench_simclr_seg.py --device cuda --steps 200 --compile
    python bench/bench_simclr_seg.py --device cpu --steps 3                   # ResNet-18 at 32 px, a smoke run
    OMP_NUM_THREADS=1 python bench/bench_simclr_seg.py --device cpu --amp-both  # CPU: bf16 autocast vs fp32

Configurations (the issue's list): SimCLR pre-training steps (two views per image through ResNet-50 + projection
head, NT-Xent, LARS) at batch 32 and 64x64 and at 224x224, and the U-Net fine-tuning step (ResNet-50 U-Net, BCE,
Adam) at 224x224. Each times `simclr_seg.train_step` + backward + optimizer step on synthetic tensors held on the
device, so the data loader (and the per-image augmentation) is not measured. images_per_s counts images, not
views: a pre-training image costs two encoder passes.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import simclr_seg  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="simclr_seg.py training-step throughput")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 200 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 CUDA, 1 CPU)")
    parser.add_argument("--arch", default=None, choices=sorted(simclr_seg.ENCODER_CHANNELS),
                        help="default resnet50 (paper) on CUDA, resnet18 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default 32 on CUDA, 4 on CPU")
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="pre-training view sizes (default 64 224 on CUDA, 32 on CPU); fine-tuning uses the last")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on with CUDA, off on a CPU; a CPU needs AVX512-BF16/AMX)")
    parser.add_argument("--amp-both", action="store_true", help="time every configuration with --no-amp and --amp")
    parser.add_argument("--compile", action="store_true", help="torch.compile train_step")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels-last memory format (CUDA)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.device = torch.device("cuda" if cuda else "cpu")
    defaults = dict(steps=200, warmup=20, arch="resnet50", batch_size=32, sizes=[64, 224]) if cuda else dict(
        steps=3, warmup=1, arch="resnet18", batch_size=4, sizes=[32])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.amp = cuda if args.amp is None else args.amp
    args.channels_last = args.channels_last and cuda
    return args


def bench(stage, size, args):
    device = args.device
    flags = ["--device", device.type, "--arch", args.arch, "--img-size", str(size),
             "--pretrain-optimizer", "lars", "--stage", stage]
    run_args = simclr_seg.get_args(flags)
    run_args.channels_last = args.channels_last
    torch.manual_seed(0)
    if stage == "pretrain":
        model = simclr_seg.SimCLR(args.arch, run_args.projection_hidden_dim, run_args.projection_dim)
    else:
        model = simclr_seg.SimCLRUNet(args.arch, run_args.decoder_channels)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer, scheduler = simclr_seg.build_optimizer(stage, model, run_args, steps_per_epoch=args.warmup + args.steps)
    step_fn = torch.compile(simclr_seg.train_step) if args.compile else simclr_seg.train_step
    B = args.batch_size
    images = torch.randn(B, 3, size, size, device=device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if stage == "pretrain":
        batch = [images, torch.flip(images, dims=(3,))]  # two "views"
    else:
        batch = [images, torch.randint(0, 2, (B, size, size), device=device)]
    model.train()
    runtime = simclr_seg.Runtime(device, amp=args.amp)

    def one_step():
        optimizer.zero_grad(set_to_none=True)
        loss = step_fn(model, batch, stage, runtime, "bce", run_args.temperature)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss

    for _ in range(args.warmup):
        one_step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = one_step()
    loss.item()  # sync point: wait for the last step
    elapsed = time.perf_counter() - started
    return {
        "method": "simclr_seg", "stage": stage, "arch": args.arch, "img_size": size, "batch_size": B,
        "views_per_image": 2 if stage == "pretrain" else 1, "steps": args.steps, "device": device.type,
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "amp_bf16": args.amp, "channels_last": args.channels_last, "compile": args.compile,
        "parameters": simclr_seg.count_parameters(model),
        "images_per_s": round(B * args.steps / elapsed, 2),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1) if device.type == "cuda" else None,
    }


def main(args):
    configs = [("pretrain", size) for size in args.sizes] + [("finetune", args.sizes[-1])]
    for stage, size in configs:
        for amp in (False, True) if args.amp_both else (args.amp,):
            args.amp = amp
            print(json.dumps(bench(stage, size, args)), flush=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main(get_args())
