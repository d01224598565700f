"""Speed and held-out quality of ``upcli fit-image`` settings, against bilinear and JBU, on real photos.

    python examples/bench_fit_image.py                                   # 10 CamVid val images, default fit
    python examples/bench_fit_image.py --variants "steps=100;base=jbu;points_per_cell=12" --json fit.json

For each image (shorter side resized to --fit-size), every method gives features at that size; the score is the
held-out multi-view reconstruction error (``upcli.upsamplers.multiview.view_error``): --eval-views jitters that no
fit has seen, each view's features box-pooled to the backbone's grid and compared with the backbone's features of
that view, |error|^2 / |target|^2. Lower is better. "view error" cuts the views from the image at the fit size;
"detail error" cuts them from the image at its own resolution (at most 2x the fit size), so zoomed views show the
detail that a closer look at the scene shows. A variant is a ';'-separated entry of FitConfig fields
(``key=value,key=value``); the default entry is the shipped default. Seconds are per image, fit plus render.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from upcli.backbones import create_backbone
from upcli.io.images import IMAGE_EXTENSIONS, load_rgb, target_size
from upcli.upsamplers import create_upsampler, guidance_at
from upcli.upsamplers.implicit import FitConfig, fit_field
from upcli.upsamplers.multiview import view_error

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "camvid" / "val"


def parse_variant(text: str) -> tuple[str, FitConfig]:
    """``"steps=100,base=jbu"`` -> a FitConfig with those fields changed (types from the defaults)."""
    types = {f.name: type(getattr(FitConfig(), f.name)) for f in fields(FitConfig)}
    changes = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in types:
            raise SystemExit(f"unknown FitConfig field {key!r}; choose from {', '.join(types)}")
        changes[key] = value.lower() in ("1", "true", "yes") if types[key] is bool else types[key](value)
    return (text or "default"), replace(FitConfig(), **changes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int, default=10)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--variants", default="", help="';'-separated FitConfig changes; '' is the default fit")
    parser.add_argument("--baselines", default="bilinear,jbu")
    parser.add_argument("--eval-views", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)[: args.limit]
    backbone = create_backbone(args.backbone).eval()
    variants = dict(parse_variant(v.strip()) for v in args.variants.split(";"))
    scores: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}
    details: dict[str, list[float]] = {}
    for path in paths:
        image = torch.from_numpy(load_rgb(path)).permute(2, 0, 1)[None].float() / 255
        fit_size = next(iter(variants.values())).fit_size
        size = target_size(*image.shape[-2:], fit_size)
        small = guidance_at(image, size)
        detail = guidance_at(image, target_size(*image.shape[-2:], min(min(image.shape[-2:]), 2 * fit_size)))
        with torch.no_grad():
            lr = backbone(small)

        def score(name, hr):
            scores.setdefault(name, []).append(view_error(hr, small, backbone, args.eval_views, seed=1))
            details.setdefault(name, []).append(view_error(hr, small, backbone, args.eval_views, seed=1, source=detail))

        for name in filter(None, args.baselines.split(",")):
            up = create_upsampler(name, backbone=backbone).eval()
            start = time.perf_counter()
            with torch.no_grad():
                hr = up(lr, small, size)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            score(name, hr)
        for name, cfg in variants.items():
            start = time.perf_counter()
            field = fit_field(backbone, image, cfg).upsampler
            hr = field(None, small, size)
            seconds.setdefault(name, []).append(time.perf_counter() - start)
            score(name, hr)
        print(f"{path.name}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in scores.items()), file=sys.stderr, flush=True)

    results = {name: {"view_error": round(sum(v) / len(v), 5), "detail_error": round(sum(details[name]) / len(v), 5),
                      "seconds_per_image": round(sum(seconds[name]) / len(v), 3),
                      "images": len(v)} for name, v in scores.items()}
    results["_config"] = {"backbone": args.backbone, "images": str(args.images), "limit": args.limit,
                          "eval_views": args.eval_views, "torch_threads": torch.get_num_threads()}
    print(f"{'method':40s} {'view error':>10s} {'detail error':>12s} {'s/image':>8s}")
    for name, r in results.items():
        if not name.startswith("_"):
            print(f"{name:40s} {r['view_error']:10.4f} {r['detail_error']:12.4f} {r['seconds_per_image']:8.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
