"""Compact against full feature stores on this machine: disk per image, write time, read time.

    python examples/bench_compact.py                                 # 20 photos at 448, bilinear/jbu/bilateral
    python examples/bench_compact.py --images examples/images -n 4 --upsamplers jbu

For each upsampler, ``upcli upsample`` writes the same ``-n`` photos twice, ``--store full`` and
``--store compact``; then each map is read back from both. The table gives, per image: the store's bytes on disk,
the job's time per image (its own clock: from the first image to the last write, decoding, backbone, upsampler
and writing included, model loading not) and its ratio to the backbone's mean time alone on the same images
(measured just before the compact job), the
read time of one map from each store (the compact one also with ``dtype=torch.float32``, which skips rounding
the map to the stored float16), and the upsampler's own time on that map (medians over the images). The maximum
difference between the two stores' maps is printed too (it should be within float16 rounding).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_IMAGES = HERE.parent.parent / "shared" / "data" / "photos"


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--upsamplers", default="bilinear,jbu,bilateral")
    parser.add_argument("--workers", type=int, default=None, help="decode workers of the jobs (default: upcli's)")
    args = parser.parse_args()

    import torch

    from upcli.backbones import create_backbone
    from upcli.configs import FeatureOptions, JobOptions
    from upcli.io import FeatureStore, load_rgb, resize_rgb, scan_images
    from upcli.io.images import target_size
    from upcli.upsample import upsample_folder
    from upcli.upsamplers import create_upsampler, upsample_features

    work = Path(tempfile.mkdtemp(prefix="bench-compact-"))
    try:
        photos = work / "photos"
        photos.mkdir()
        for ref in scan_images(args.images)[:args.n]:
            shutil.copy(ref.path, photos / ref.path.name)
        refs = scan_images(photos)
        backbone = create_backbone("efficientnet-lite0").eval()
        images = []
        for ref in refs:
            rgb = load_rgb(ref.path)
            rgb = resize_rgb(rgb, target_size(*rgb.shape[:2], args.size))
            images.append(torch.from_numpy(rgb).permute(2, 0, 1)[None].float().div(255).contiguous())

        def backbone_mean_ms() -> float:
            """The backbone's mean time alone on the photos (measured next to each compact job: this machine's
            speed drifts by tens of percent over minutes)."""
            with torch.inference_mode():
                backbone(images[0])
                start = time.perf_counter()
                for image in images:
                    backbone(image)
            return 1000 * (time.perf_counter() - start) / len(images)

        print(f"{len(refs)} photos at {args.size}")
        header = (f"{'upsampler':>10} {'full MB/img':>12} {'compact KB/img':>15} {'ratio':>6} {'write full ms':>14} "
                  f"{'write compact ms':>17} {'backbone ms':>12} {'compact/backbone':>17} {'read full ms':>13} "
                  f"{'read compact ms':>16} {'read compact f32':>17} {'upsampler ms':>13} {'max diff':>9}")
        print(header)
        device = torch.device("cpu")
        for name in args.upsamplers.split(","):
            written, backbone_ms = {}, 0.0
            for store in ("full", "compact"):
                if store == "compact":
                    backbone_ms = backbone_mean_ms()
                out = work / f"{name}-{store}"
                result = upsample_folder(photos, JobOptions(out=out, workers=args.workers, quiet=True),
                                         FeatureOptions(), upsampler=name, size=args.size, store=store)
                written[store] = (out, result.seconds)
                if store == "compact":
                    parts = ", ".join(f"{k} {1000 * v / len(refs):.0f}" for k, v in result.timings.items())
                    print(f"{'':>10} compact job, ms per image: {parts}")
            up = create_upsampler(name, backbone=backbone).eval()
            full, compact = FeatureStore(written["full"][0]), FeatureStore(written["compact"][0])
            compact32 = FeatureStore(written["compact"][0], dtype=torch.float32)
            read_full, read_compact, read_compact32, own, diff = [], [], [], [], 0.0
            compact[refs[0].rel]  # builds the upsampler once
            for ref, image in zip(refs, images):
                start = time.perf_counter()
                a = full[ref.rel]
                read_full.append(1000 * (time.perf_counter() - start))
                start = time.perf_counter()
                b = compact[ref.rel]
                read_compact.append(1000 * (time.perf_counter() - start))
                start = time.perf_counter()
                compact32[ref.rel]
                read_compact32.append(1000 * (time.perf_counter() - start))
                with torch.inference_mode():
                    low = backbone(image)
                start = time.perf_counter()
                upsample_features(up, low, image, tuple(image.shape[-2:]), device)
                own.append(1000 * (time.perf_counter() - start))
                diff = max(diff, (a.float() - b.float()).abs().max().item())
            n = len(refs)
            per_image = {store: 1000 * written[store][1] / n for store in written}
            full_b, compact_b = disk_bytes(written["full"][0]) / n, disk_bytes(written["compact"][0]) / n
            print(f"{name:>10} {full_b / 2**20:>12.1f} {compact_b / 2**10:>15.1f} {full_b / compact_b:>6.0f} "
                  f"{per_image['full']:>14.0f} {per_image['compact']:>17.0f} {backbone_ms:>12.0f} "
                  f"{per_image['compact'] / backbone_ms:>17.2f} {statistics.median(read_full):>13.0f} "
                  f"{statistics.median(read_compact):>16.0f} {statistics.median(read_compact32):>17.0f} "
                  f"{statistics.median(own):>13.0f} {diff:>9.2e}")
            shutil.rmtree(written["full"][0])
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
