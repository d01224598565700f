"""Guided depth upsampling with PAC's joint upsampling network, against bilinear, bicubic and bilateral upsampling.

    python examples/depth_upsample.py --scale 8 --json depth-x8.json          # the RGB-D-D subset, split 4:1
    python examples/depth_upsample.py --scale 4 --train-root nyu/train --eval-root nyu/test --json nyu-x4.json

Data: ``ROOT/rgb/`` and ``ROOT/depth/`` paired by sorted file name; depth as 16-bit PNG (millimetres: reported
in cm), 8-bit PNG (reported in grey levels) or .npy (reported in its own units; ``--unit-scale`` overrides).
With one root for both (the default, ``../shared/data/depth/rgbdd_subset203``) every 5th pair by name is
validation, the rest training.

Protocol (DCTNet's for RGB-D-D): HR depth and RGB cropped bottom/right to a multiple of the scale; LR depth =
bicubic downsampling (antialiased, as PIL) to 1/scale; depth min-max normalised with the HR map's min and max,
outputs de-normalised the same way; RMSE per image in the reported unit, no border crop, averaged over images.

Network (``PacJointUpsample``, Su et al. 2019): a target branch (3 convs 5x5, 32 ch) on the LR depth, a guidance
branch (3 convs 5x5) on the RGB giving 16 channels per 2x stage, log2(scale) ``PacConvTranspose2d(32, 32, 5,
stride 2)`` + ReLU, and a final branch (2 convs 5x5) to one channel. Here its output is added to the bicubic
upsampling of the input (a residual; PAC's network predicts depth directly), which trains much faster.
Training: random crops, flips, Adam with cosine decay, MSE on the normalised depth. PAC trains NYU for 5000
epochs; the defaults here are minutes on a CPU, so the numbers are not PAC's (see the README).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from upcli.io.images import load_rgb
from upcli.pac import PacConvTranspose2d
from upcli.upsamplers.bilateral import joint_bilateral_upsample

HERE = Path(__file__).resolve().parent
DEFAULT_ROOT = HERE.parent.parent / "shared" / "data" / "depth" / "rgbdd_subset203"
DEPTH_SUFFIXES = (".png", ".npy")


# ---- data ---------------------------------------------------------------------------------------------------
def load_depth(path: Path) -> tuple[np.ndarray, float, str]:
    """Depth as float32, the factor to the reported unit, and the unit's name."""
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32), 1.0, "units"
    with Image.open(path) as img:
        array = np.array(img)
    if array.dtype == np.uint8:
        return array.astype(np.float32), 1.0, "grey levels"
    return array.astype(np.float32), 0.1, "cm"  # 16-bit: millimetres


def find_pairs(root: Path) -> list[tuple[Path, Path]]:
    rgbs = sorted(p for p in (root / "rgb").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    depths = sorted(p for p in (root / "depth").iterdir() if p.suffix.lower() in DEPTH_SUFFIXES)
    if len(rgbs) != len(depths) or not rgbs:
        raise SystemExit(f"{root}: {len(rgbs)} RGB and {len(depths)} depth files; they pair by sorted name")
    return list(zip(rgbs, depths))


class Sample:
    """One pair, cropped to a multiple of ``scale``: RGB (3, H, W) in [0, 1], normalised HR and LR depth."""

    def __init__(self, rgb_path: Path, depth_path: Path, scale: int):
        depth, self.unit_scale, self.unit = load_depth(depth_path)
        rgb = load_rgb(rgb_path)
        H, W = (min(depth.shape[0], rgb.shape[0]) // scale * scale, min(depth.shape[1], rgb.shape[1]) // scale * scale)
        self.name = depth_path.name
        self.rgb = torch.from_numpy(rgb[:H, :W]).permute(2, 0, 1).float() / 255
        hr = torch.from_numpy(depth[:H, :W].copy())
        self.lo, self.hi = float(hr.min()), float(hr.max())
        self.hr = ((hr - self.lo) / max(self.hi - self.lo, 1e-6))[None]
        self.lr = F.interpolate(self.hr[None], size=(H // scale, W // scale), mode="bicubic", antialias=True,
                                align_corners=False)[0]

    def to_unit(self, normalised: Tensor) -> Tensor:
        return (normalised * (self.hi - self.lo) + self.lo) * self.unit_scale


def split(root_train: Path, root_eval: Path) -> tuple[list, list]:
    if root_train.resolve() == root_eval.resolve():
        pairs = find_pairs(root_train)
        return [p for i, p in enumerate(pairs) if i % 5], [p for i, p in enumerate(pairs) if i % 5 == 0]
    return find_pairs(root_train), find_pairs(root_eval)


# ---- the network --------------------------------------------------------------------------------------------
def convs(channels: list[int], last_relu: bool = False) -> nn.Sequential:
    layers = []
    for i, (a, b) in enumerate(zip(channels, channels[1:])):
        layers.append(nn.Conv2d(a, b, 5, padding=2))
        if last_relu or i < len(channels) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class PacJointUpsample(nn.Module):
    def __init__(self, scale: int, width: int = 32, guide: int = 16):
        super().__init__()
        self.stages = int(math.log2(scale))
        if 2 ** self.stages != scale:
            raise ValueError("the scale must be a power of 2")
        self.guide = guide
        self.target = convs([1, width, width, width])
        self.guidance = convs([3, width, width, guide * self.stages])
        self.up = nn.ModuleList(PacConvTranspose2d(width, width, 5, stride=2, padding=2, output_padding=1)
                                for _ in range(self.stages))
        self.final = convs([width, width, 1])

    def forward(self, lr: Tensor, rgb: Tensor) -> Tensor:
        x = self.target(lr)
        g = self.guidance(rgb)
        for s, up in enumerate(self.up):
            size = (lr.shape[-2] * 2 ** (s + 1), lr.shape[-1] * 2 ** (s + 1))
            guide = g[:, s * self.guide:(s + 1) * self.guide]
            if tuple(guide.shape[-2:]) != size:
                guide = F.interpolate(guide, size=size, mode="bilinear", align_corners=False, antialias=True)
            x = F.relu(up(x, guide))
        return bicubic(lr, rgb.shape[-2:]) + self.final(x)


def bicubic(lr: Tensor, size) -> Tensor:
    return F.interpolate(lr, size=tuple(size), mode="bicubic", align_corners=False)


def crops(samples: list[Sample], scale: int, size: int, count: int, g: torch.Generator):
    """``count`` random crops (HR ``size``, a multiple of ``scale``) with flips: (lr, rgb, hr) batches."""
    lrs, rgbs, hrs = [], [], []
    for _ in range(count):
        s = samples[int(torch.randint(len(samples), (1,), generator=g))]
        cells = size // scale
        top = int(torch.randint(s.lr.shape[-2] - cells + 1, (1,), generator=g))
        left = int(torch.randint(s.lr.shape[-1] - cells + 1, (1,), generator=g))
        lr = s.lr[:, top:top + cells, left:left + cells]
        rgb = s.rgb[:, top * scale:(top + cells) * scale, left * scale:(left + cells) * scale]
        hr = s.hr[:, top * scale:(top + cells) * scale, left * scale:(left + cells) * scale]
        if float(torch.rand((), generator=g)) < 0.5:
            lr, rgb, hr = lr.flip(-1), rgb.flip(-1), hr.flip(-1)
        lrs.append(lr), rgbs.append(rgb), hrs.append(hr)
    return torch.stack(lrs), torch.stack(rgbs), torch.stack(hrs)


def train(samples: list[Sample], args) -> PacJointUpsample:
    torch.manual_seed(args.seed)
    net = PacJointUpsample(args.scale)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    for step in range(args.steps):
        lr, rgb, hr = crops(samples, args.scale, args.crop, args.batch_size, g)
        loss = F.mse_loss(net(lr, rgb), hr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(1, args.steps // 10) == 0:
            print(f"  step {step + 1}/{args.steps}: loss {loss.item():.2e} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
    return net.eval()


# ---- evaluation ---------------------------------------------------------------------------------------------
def rmse(sample: Sample, prediction: Tensor) -> float:
    error = sample.to_unit(prediction.clamp(0, 1)) - sample.to_unit(sample.hr)
    return float(error.square().mean().sqrt())


def bilateral(sample: Sample, sigma_spatial: float, sigma_color: float) -> Tensor:
    return joint_bilateral_upsample(sample.lr[None], sample.rgb[None], tuple(sample.hr.shape[-2:]),
                                    sigma_spatial=sigma_spatial, sigma_color=sigma_color, radius=2)[0]


def tune_bilateral(samples: list[Sample]) -> tuple[float, float]:
    """The bilateral baseline's sigmas, chosen on (up to 20) training images."""
    grid = [(s, c) for s in (0.5, 1.0, 2.0) for c in (0.05, 0.1, 0.2, 0.4)]
    scores = {sc: np.mean([rmse(x, bilateral(x, *sc)) for x in samples[:20]]) for sc in grid}
    return min(scores, key=scores.get)


@torch.no_grad()
def evaluate(samples: list[Sample], net: PacJointUpsample | None, sigmas) -> dict:
    methods = {
        "bilinear": lambda s: F.interpolate(s.lr[None], size=s.hr.shape[-2:], mode="bilinear",
                                            align_corners=False)[0],
        "bicubic": lambda s: bicubic(s.lr[None], s.hr.shape[-2:])[0],
        "bilateral": lambda s: bilateral(s, *sigmas),
    }
    if net is not None:
        methods["pac"] = lambda s: net(s.lr[None], s.rgb[None])[0]
    results = {}
    for name, fn in methods.items():
        t0 = time.perf_counter()
        scores = [rmse(s, fn(s)) for s in samples]
        results[name] = {"rmse": float(np.mean(scores)), "seconds_per_image": (time.perf_counter() - t0) / len(samples)}
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--eval-root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--scale", type=int, choices=(4, 8, 16), default=8)
    parser.add_argument("--steps", type=int, default=1000, help="training steps (0: baselines only)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--crop", type=int, default=128, help="HR crop side, a multiple of --scale")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--limit", type=int, default=None, help="only the first N training and eval pairs")
    parser.add_argument("--unit-scale", type=float, default=None, help="reported unit per stored depth value")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crop % args.scale or args.crop // args.scale < 4:
        parser.error("--crop must be a multiple of --scale, at least 4 LR pixels")
    train_pairs, eval_pairs = split(args.train_root, args.eval_root)
    train_set = [Sample(*p, args.scale) for p in train_pairs[:args.limit]]
    eval_set = [Sample(*p, args.scale) for p in eval_pairs[:args.limit]]
    if args.unit_scale is not None:
        for s in train_set + eval_set:
            s.unit_scale, s.unit = args.unit_scale, "units"
    print(f"x{args.scale}: {len(train_set)} training and {len(eval_set)} evaluation pairs", file=sys.stderr)
    sigmas = tune_bilateral(train_set)
    t0 = time.perf_counter()
    net = train(train_set, args) if args.steps else None
    train_seconds = time.perf_counter() - t0
    results = evaluate(eval_set, net, sigmas)
    unit = eval_set[0].unit
    print(f"\nRMSE ({unit}) on {len(eval_set)} images, x{args.scale}:")
    print("| method | RMSE | s / image |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['rmse']:.3f} | {r['seconds_per_image']:.3f} |")
    report = {"scale": args.scale, "unit": unit, "train_pairs": len(train_set), "eval_pairs": len(eval_set),
              "bilateral_sigmas": sigmas, "train_seconds": train_seconds, "results": results,
              "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
