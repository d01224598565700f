"""Time and peak memory of each upsampler next to the backbone, per image, on this machine.

    python examples/bench_guided.py                                  # 448 px, 8 photos, bilinear/jbu/attention
    python examples/bench_guided.py --size 896 --upsamplers bilinear,attention=run.safetensors -n 4

For each of ``-n`` images (square crops at --size), the backbone's features (efficientnet-lite0: a 14 x 14 grid of
320 channels at 448) are upsampled to --size, guided by the image; the table gives median ms of the backbone and of
each upsampler, their ratio, and the upsampler's peak extra memory (growth of the process's maximum resident set
over its first call, in a fresh process per upsampler, output included) next to the size of its float32 output.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "data" / "photos"


def measure(images: str, n: int, size: int, backbone: str, method: str) -> dict:
    """Runs in a fresh process: the peak memory growth of the first call, then median times over the images."""
    import torch

    from upcli.backbones import create_backbone
    from upcli.io import load_rgb, resize_rgb, scan_images
    from upcli.upsamplers import create_upsampler

    torch.manual_seed(0)
    bb = create_backbone(backbone).eval()
    label, _, path = method.partition("=")
    up = create_upsampler(path or label, backbone=bb).eval()
    batches = [torch.from_numpy(resize_rgb(load_rgb(ref.path), (size, size))).permute(2, 0, 1)[None].float() / 255
               for ref in scan_images(images)[:n]]
    bb_ms, up_ms = [], []
    with torch.no_grad():
        feats = bb(batches[0])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out = up(feats, batches[0], (size, size))  # the first call: its growth of the peak is what it needs
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
        for image in batches:
            start = time.perf_counter()
            feats = bb(image)
            bb_ms.append(1000 * (time.perf_counter() - start))
            start = time.perf_counter()
            out = up(feats, image, (size, size))
            up_ms.append(1000 * (time.perf_counter() - start))
    return {"method": label, "grid": list(feats.shape[-2:]), "channels": feats.shape[1],
            "backbone_ms": statistics.median(bb_ms), "upsampler_ms": statistics.median(up_ms),
            "peak_extra_MiB": peak / 2**20, "output_MiB": out.numel() * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else HERE / "images"))
    parser.add_argument("-n", type=int, default=8)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--upsamplers", default="bilinear,jbu,attention")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one method in this process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.images, args.n, args.size, args.backbone, args.one)))
        return
    rows = []
    print(f"{args.backbone} at {args.size}^2, median over {args.n} images")
    print(f"{'upsampler':>12} {'grid':>7} {'C':>4} {'backbone ms':>12} {'upsampler ms':>13} {'ratio':>6} "
          f"{'peak extra MiB':>15} {'output MiB':>11}")
    for method in [m for m in args.upsamplers.split(",") if m]:
        cmd = [sys.executable, __file__, "--one", method, "--images", args.images, "-n", str(args.n),
               "--size", str(args.size), "--backbone", args.backbone]
        row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        rows.append(row)
        print(f"{row['method']:>12} {'x'.join(map(str, row['grid'])):>7} {row['channels']:>4} "
              f"{row['backbone_ms']:>12.1f} {row['upsampler_ms']:>13.1f} "
              f"{row['upsampler_ms'] / row['backbone_ms']:>6.2f} {row['peak_extra_MiB']:>15.1f} "
              f"{row['output_MiB']:>11.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
