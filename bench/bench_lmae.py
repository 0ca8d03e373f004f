"""Training-step throughput of lmae.py (not a test): images/s and peak GPU memory, one JSON line per configuration.

    python bench/bench_lmae.py --device cuda --steps 200                 # paper preset + small preset (--arch), bf16
    python bench/bench_lmae.py --device cuda --steps 200 --compile --channels-last
    python bench/bench_lmae.py --device cpu --steps 3                    # tiny sizes, a smoke run

Each configuration times `lmae.train_step` (masking, Stack Fuse, encoder, IPS, decoder, Eqs. 10-12, Adam) on
synthetic images and labels held on the device, so the data loader is not measured. When `timm` is importable the
same model is timed again with timm's ViT `Block`s in place of lmae.py's LMMSA blocks ("mae-timm-blocks"): an MAE
of equal sizes built from the reference blocks, as a yardstick for the attention/FFN implementation.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lmae  # noqa: E402

try:
    from timm.models.vision_transformer import Block as TimmBlock
except ImportError:  # timm is optional and not in requirements.txt
    TimmBlock = None


def get_args(argv=None):
    parser = argparse.ArgumentParser(description="lmae.py training-step throughput")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 200 on CUDA, 3 on CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 20 CUDA, 1 CPU)")
    parser.add_argument("--arch", nargs="+", default=None, choices=tuple(lmae.PRESETS),
                        help=f"lmae.py --arch values to time; default: {lmae.PAPER_PRESET} and small on CUDA; "
                             "small and tiny on CPU")
    parser.add_argument("--img-size", type=lmae.parse_size, default=None,
                        help="input HxW (default 224 on CUDA, the paper's VOC size; 64 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 24 (paper, VOC) on CUDA, 2 on CPU")
    parser.add_argument("--num-classes", type=int, default=21, help="K (default 21, VOC)")
    parser.add_argument("--patch-size", type=int, default=None, help="default 16 (8 on CPU)")
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast on or off (default: both, one line each; a CPU needs bf16 support)")
    parser.add_argument("--recipe", default="paper", choices=tuple(lmae.RECIPES),
                        help="lmae.py --recipe: paper (default) or fill (conv head + nearest prior, boundary weight)")
    parser.add_argument("--head", default=None, choices=lmae.HEADS, help="pixel head (default: --recipe's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the training step")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-timm", action="store_true", help="skip the timm-block comparison even if installed")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    args.device = torch.device("cuda" if cuda else "cpu")
    defaults = dict(steps=200, warmup=20, arch=[lmae.PAPER_PRESET, "small"], img_size=(224, 224),
                    batch_size=24, patch_size=16) if cuda else dict(
        steps=3, warmup=1, arch=["small", "tiny"], img_size=(64, 64), batch_size=2, patch_size=8)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.img_size[0] % args.patch_size or args.img_size[1] % args.patch_size:
        parser.error(f"--img-size must be a multiple of --patch-size {args.patch_size}")
    return args


def step_args(args, arch):
    """The lmae.py training configuration this benchmark runs (its defaults plus the benchmark's sizes)."""
    config = lmae.get_args(["--data", "voc", "--arch", arch, "--patch-size", str(args.patch_size),
                            "--img-size", f"{args.img_size[0]}x{args.img_size[1]}",
                            "--eval-size", f"{args.img_size[0]}x{args.img_size[1]}",
                            "--mask-ratio", str(args.mask_ratio), "--batch-size", str(args.batch_size),
                            "--recipe", args.recipe, *(["--head", args.head] if args.head else [])])
    config.channels_last = args.channels_last
    return config


def with_timm_blocks(model, arch):
    """The same network with timm's ViT Blocks (GELU MLP, ratio 4, qkv bias) as encoder and decoder blocks."""
    dims = lmae.PRESETS[arch]
    paper = model.lmae if isinstance(model, lmae.LMAEWithConvHead) else model  # --head conv wraps the paper's LMAE
    paper.encoder = torch.nn.ModuleList([TimmBlock(dims["encoder_dim"], dims["encoder_heads"], mlp_ratio=4.0,
                                                   qkv_bias=True) for _ in range(dims["encoder_depth"])])
    paper.decoder = torch.nn.ModuleList([TimmBlock(dims["decoder_dim"], dims["decoder_heads"], mlp_ratio=4.0,
                                                   qkv_bias=True) for _ in range(dims["decoder_depth"])])
    return model


def measure(args, arch, blocks, amp):
    device = args.device
    runtime = lmae.Runtime(device, amp=amp)
    config = step_args(args, arch)
    torch.manual_seed(0)
    model = lmae.build_model(config, args.num_classes)
    if blocks == "timm":
        model = with_timm_blocks(model, arch)
    model = model.to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    B, (H, W) = args.batch_size, args.img_size
    images = torch.randn(B, 3, H, W, device=device)
    labels = torch.randint(0, args.num_classes, (B, H, W), device=device)
    labels[:, : H // 2] = 0  # some background, so the strategies have something to rank
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    step = torch.compile(lmae.train_step) if args.compile else lmae.train_step
    model.train()
    for _ in range(args.warmup):
        step(model, optimizer, images, labels, config, runtime)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = step(model, optimizer, images, labels, config, runtime)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "method": "lmae", "model": "lmae" if blocks == "lmae" else "mae-timm-blocks", "arch": arch,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "img_size": [H, W],
        "batch_size": B, "patch_size": args.patch_size, "num_classes": args.num_classes,
        "mask_ratio": args.mask_ratio, "amp": amp, "recipe": args.recipe, "head": config.head,
        "compile": args.compile,
        "channels_last": args.channels_last, "steps": args.steps,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "images_per_s": round(args.steps * B / elapsed, 2), "step_ms": round(1000 * elapsed / args.steps, 2),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3) if device.type == "cuda"
        else None,
        "final_loss": round(float(loss), 4),
    }


def main(args):
    variants = ["lmae"] + (["timm"] if TimmBlock is not None and not args.no_timm else [])
    if TimmBlock is None and not args.no_timm:
        print(json.dumps({"note": "timm is not installed: no timm-block comparison"}), flush=True)
    amps = [args.amp] if args.amp is not None else [False, True]
    if args.device.type == "cpu" and not lmae.cpu_supports_bf16():
        amps = [False]
        print(json.dumps({"note": "this CPU has no bf16 support: --amp not measured"}), flush=True)
    for arch in args.arch:
        for blocks in variants:
            for amp in amps:
                print(json.dumps(measure(args, arch, blocks, amp)), flush=True)
            if args.device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main(get_args())
