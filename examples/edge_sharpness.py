"""Edge sharpness of each upsampler on one image, and a side-by-side preview of their features.

    python examples/edge_sharpness.py                                   # chelsea, 448 px, the shipped upsamplers
    python examples/edge_sharpness.py --image photo.jpg --methods bilinear,attention=run.safetensors --preview p.png

The backbone sees the image at --size (square); each method upsamples those features to --size, guided by the
image, and ``upcli.viz.edge_sharpness`` compares the feature gradient at the image's strongest 10% of edges with
its mean elsewhere. The preview shows the image, then each method's features coloured by one shared PCA.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from upcli.backbones import create_backbone
from upcli.io.images import load_rgb
from upcli.upsamplers import create_upsampler
from upcli.viz import edge_sharpness, pca_rgb, save_png

HERE = Path(__file__).resolve().parent


def parse_methods(text: str) -> dict[str, str]:
    """``"bilinear,attention=run.safetensors"`` -> ``{"bilinear": "bilinear", "attention": "run.safetensors"}``."""
    entries = [e.strip().partition("=") for e in text.split(",") if e.strip()]
    return {label: (spec if sep else label) for label, sep, spec in entries}


@torch.no_grad()
def run(image_path: Path, methods: dict[str, str], size: int, backbone_name: str, layer: str | None) -> tuple[dict, list]:
    rgb = load_rgb(image_path)
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
    backbone = create_backbone(backbone_name, layer=layer).eval()
    lr_feats = backbone(image)
    scores, maps = {}, []
    for label, spec in methods.items():
        up = create_upsampler(spec, backbone=backbone).eval()
        feats = up(lr_feats, image, (size, size))[0]
        scores[label] = round(edge_sharpness(feats, image[0]), 2)
        maps.append(feats)
    return scores, [image, maps]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=HERE / "images" / "chelsea.png")
    parser.add_argument("--methods", default="bilinear,bilateral,jbu,pac,attention")
    parser.add_argument("--size", type=int, default=448)
    parser.add_argument("--backbone", default="efficientnet-lite0")
    parser.add_argument("--layer", default=None)
    parser.add_argument("--preview", type=Path, default=None, help="write the side-by-side PNG here")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    scores, (image, maps) = run(args.image, parse_methods(args.methods), args.size, args.backbone, args.layer)
    print(f"{'method':<16} {'edge sharpness':>14}")
    for label, value in scores.items():
        print(f"{label:<16} {value:>14.2f}")
    if args.preview:
        panels = [(image[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)] + pca_rgb(maps)
        save_png(args.preview, np.concatenate(panels, axis=1))
    if args.json:
        args.json.write_text(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
