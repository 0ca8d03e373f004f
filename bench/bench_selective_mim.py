"""Throughput of selective_mim.py's hot paths; one JSON line per configuration. Not a test.

    python bench/bench_selective_mim.py --device cuda --steps 200            # paper size: 256 px, ResNet-34 U-Net
    python bench/bench_selective_mim.py --device cuda --steps 200 --compile --channels-last
    python bench/bench_selective_mim.py --device cpu --steps 3               # tiny CPU smoke run (64 px, batch 4)
    python bench/bench_selective_mim.py --device cpu --steps 5 --amp          # bf16 autocast on a CPU with AMX/AVX512-BF16
    python bench/bench_selective_mim.py --device cpu --steps 5 --no-amp

Configurations
    pretrain_step   reconstruction train_step (random 50 % masks drawn on the device, Eq. 2 loss), images/s
    forward         no-grad forward of the reconstruction model, images/s (the unit of the scoring cost)
    scoring         selective_masks: S masked copies per image in one forward pass + Eq. (1) patch scores +
                    top-50 % selection, images/s; `cost_in_forwards` = forward images/s / scoring images/s, which
                    should be close to S (the copies) and not more
    finetune_step   downstream train_step (Jaccard loss, K classes, batch --finetune-batch-size), images/s
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import selective_mim as sm  # noqa: E402


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="selective_mim.py throughput")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 cuda, 1 cpu)")
    parser.add_argument("--img-size", type=int, default=None, help="square side (default 256 cuda, 64 cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="pre-training batch (default 128 = Table 1 "
                                                                     "VOC/Cityscapes on cuda, 4 on cpu)")
    parser.add_argument("--finetune-batch-size", type=int, default=8, help="downstream batch (paper 8)")
    parser.add_argument("--num-classes", type=int, default=21, help="downstream classes (VOC 21)")
    parser.add_argument("--num-patches", type=int, default=None, help="nominal patches (default 512 cuda, 64 cpu)")
    parser.add_argument("--samples", type=int, default=5, help="masked copies per scored image (paper 5)")
    parser.add_argument("--arch", choices=sorted(sm.PRESETS), default="resnet34-unet")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on with cuda, off on a cpu; --amp on a cpu needs bf16 support)")
    parser.add_argument("--compile", action="store_true", help="torch.compile train_step and the scoring model")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--configs", nargs="+", default=["pretrain_step", "forward", "scoring", "finetune_step"],
                        choices=["pretrain_step", "forward", "scoring", "finetune_step"])
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available; use --device cpu")
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.amp = cuda if args.amp is None else args.amp
    if args.amp and not cuda and not sm.cpu_supports_bf16():
        parser.error("--amp: this CPU has no bf16 support; pass --no-amp")
    args.img_size = args.img_size or (256 if cuda else 64)
    args.batch_size = args.batch_size or (128 if cuda else 4)
    args.num_patches = args.num_patches or (512 if cuda else 64)
    args.msssim_window = 11 if (11 - 1) * 16 < args.img_size else 3
    return args


def timed(function, steps, warmup, device):
    for _ in range(warmup):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(args):
    device = torch.device(args.device)
    amp = args.amp
    runtime = sm.Runtime(device, amp=amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    grid = sm.patch_grid(args.img_size, args.img_size, args.num_patches).to(device)
    step_fn = torch.compile(sm.train_step) if args.compile else sm.train_step
    size, batch = args.img_size, args.batch_size
    for config in args.configs:
        torch.manual_seed(0)
        out_channels = args.num_classes if config == "finetune_step" else 3
        model = sm.build_model(out_channels, args.arch).to(device).to(memory_format=memory_format)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        images = torch.randn(batch, 3, size, size, device=device)
        if config == "pretrain_step":
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

            def loss_fn(outputs, targets):
                return sm.reconstruction_loss(outputs, targets, args.msssim_window)

            def run():
                mask = sm.random_masks(batch, grid.num_patches, 0.5, device=device)
                inputs = sm.apply_mask(images, grid.to_pixels(mask)).contiguous(memory_format=memory_format)
                step_fn(model, optimizer, inputs, images, loss_fn, runtime)
            per_step = batch
        elif config == "finetune_step":
            batch_ft = args.finetune_batch_size
            images = torch.randn(batch_ft, 3, size, size, device=device).contiguous(memory_format=memory_format)
            labels = torch.randint(0, args.num_classes, (batch_ft, size, size), device=device)
            optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

            def run():
                step_fn(model, optimizer, images, labels, sm.jaccard_loss, runtime)
            per_step = batch_ft
        else:
            model.eval()
            scorer = torch.compile(model) if args.compile else model
            if config == "forward":
                copies = images.repeat_interleave(args.samples, 0).contiguous(memory_format=memory_format)

                def run():
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        scorer(copies)
                per_step = batch * args.samples  # forward passes of single images
            else:
                def run():
                    sm.selective_masks(scorer, images, grid, args.samples, 0.5, None, "all-mean", 3, amp)
                per_step = batch  # scored images
        seconds = timed(run, args.steps, args.warmup, device)
        record = {"config": config, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  "arch": args.arch, "img_size": size, "batch_size": per_step if config != "forward" else batch,
                  "patch_grid": f"{grid.rows}x{grid.cols}", "amp": amp, "compile": args.compile,
                  "channels_last": args.channels_last, "steps": args.steps,
                  "images_per_s": round(per_step * args.steps / seconds, 2),
                  "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2 ** 30, 3)
                  if device.type == "cuda" else None}
        if config == "forward":
            forward_rate = record["images_per_s"]
            record["note"] = f"images_per_s counts single-image forward passes ({args.samples} copies of {batch})"
        if config == "scoring" and "forward" in args.configs:
            record["cost_in_forwards"] = round(forward_rate / record["images_per_s"], 2)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main(get_args())
