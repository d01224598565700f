"""Throughput, time split and disk use of ``upcli upsample`` on this machine.

    python examples/bench_upsample.py                     # 16 photos from ../shared/data/photos, or examples/images
    python examples/bench_upsample.py --images DIR -n 32 --json bench.json
    python examples/bench_upsample.py --upsamplers bilinear,jbu          # learned JBU next to the backbone time

Prints two tables: images/s with the time split per (size, upsampler), and bytes per image on disk per
(dtype, compression). Writes one JSON with the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from upcli.io import scan_images
from upcli.configs import FeatureOptions, JobOptions
from upcli.upsample import upsample_folder

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "data" / "photos"


def subset(folder: Path, n: int, into: Path) -> Path:
    """Copy the first n images (sorted) so that every run sees the same inputs."""
    into.mkdir(parents=True)
    for ref in scan_images(folder)[:n]:
        shutil.copy(ref.path, into / ref.rel.replace("/", "__"))
    return into


def run(images: Path, out: Path, workers: int = 0, shard_size: int = 16, backbone: str = "efficientnet-lite0",
        dtype: str = "float16", compression: str = "none", **kwargs) -> dict:
    os.sync()  # start each run with no dirty pages of the previous one left to write back
    options = JobOptions(out, quiet=True, overwrite=True, workers=workers, shard_size=shard_size)
    result = upsample_folder(images, options, FeatureOptions(backbone, dtype=dtype, compression=compression), **kwargs)
    files = list(out.glob("shard-*.h5"))
    return {
        "images_per_s": result.processed / result.seconds,
        "seconds": result.seconds,
        "split_s": {k: round(v, 3) for k, v in result.timings.items()},
        "bytes_per_image": sum(f.stat().st_size for f in files) / max(result.processed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else HERE / "images")
    parser.add_argument("-n", type=int, default=16, help="number of images")
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--upsamplers", default="bilinear,bilateral",
                        help="comma list: names (bilinear, bilateral, jbu, resize-conv) or checkpoint paths")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    upsamplers = [u.strip() for u in args.upsamplers.split(",") if u.strip()]

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = subset(args.images, args.n, Path(tmp) / "images")
        common = dict(backbone=args.backbone, workers=args.workers, shard_size=args.n)
        run(images, Path(tmp) / "warmup", size=224, **common)
        print(f"{args.backbone}, {args.n} images from {args.images}, {args.workers} decode worker(s)\n")
        print(f"{'size':>5} {'upsampler':>10} {'img/s':>7}  time split (s)")
        for size in (224, 448):
            for upsampler in upsamplers:
                r = run(images, Path(tmp) / "out", size=size, upsampler=upsampler, **common)
                results[f"size{size}-{upsampler}"] = r
                split = ", ".join(f"{k} {v:.2f}" for k, v in r["split_s"].items())
                print(f"{size:>5} {Path(upsampler).stem[:10]:>10} {r['images_per_s']:>7.2f}  {split}")
        print(f"\n{'dtype':>9} {'compression':>11} {'MiB/image':>10}  (size 448, bilinear)")
        for dtype in ("float16", "bfloat16", "float32"):
            for compression in ("none", "lzf", "gzip"):
                r = run(images, Path(tmp) / "out", size=448, dtype=dtype, compression=compression, **common)
                results[f"{dtype}-{compression}"] = r
                print(f"{dtype:>9} {compression:>11} {r['bytes_per_image'] / 2**20:>10.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
