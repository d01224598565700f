"""What a backbone outputs (channels, stride, layer, normalisation), known without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

from ..errors import UsageError

Rgb = Tuple[float, float, float]
Feature = Tuple[str, int, int]  # (layer name, channels, stride in pixels)

IMAGENET_NORM: tuple[Rgb, Rgb] = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_NORM: tuple[Rgb, Rgb] = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TF_EDGE_NORM: tuple[Rgb, Rgb] = ((127 / 255,) * 3, (128 / 255,) * 3)  # (x * 255 - 127) / 128


@dataclass(frozen=True)
class BackboneCfg:
    name: str  # registry name, e.g. "dinov2" or "timm:convnext_tiny"
    timm_name: str  # timm model name, with pretrained tag where there is one
    dim: int  # channels of the chosen layer
    stride: int  # image pixels per feature cell
    layer: str  # the chosen layer: a block index for ViTs ("-1" = last), a stage name otherwise
    layers: tuple[str, ...]  # valid layer names
    mean: Rgb  # on the [0, 1] pixel scale
    std: Rgb
    license: str = "unknown"
    vit: bool = False  # plain ViT: patch tokens of one block, final norm applied

    @property
    def arch(self) -> str:
        return self.timm_name.split(".")[0]

    def describe(self, tag: bool = False) -> str:
        return f"{self.name} ({self.timm_name if tag else self.arch})"


def make_cfg(
        name: str,
        timm_name: str,
        features: Sequence[Feature],
        layer: Union[str, int, None] = None,
        *,
        norm: tuple[Rgb, Rgb] = IMAGENET_NORM,
        license: str = "unknown",
        vit: bool = False,
) -> BackboneCfg:
    """Pick ``layer`` out of ``features`` (shallow to deep); ``None`` is the deepest."""
    layer, dim, stride = select_layer(name, features, layer, vit)
    names = tuple(f[0] for f in features)
    return BackboneCfg(name, timm_name, dim, stride, layer, names, tuple(norm[0]), tuple(norm[1]), license, vit)


def select_layer(name: str, features: Sequence[Feature], layer: Union[str, int, None], vit: bool) -> Feature:
    names = [f[0] for f in features]
    n = len(names)
    if layer is None:
        return ("-1" if vit else names[-1]), features[-1][1], features[-1][2]
    layer = str(layer).strip()
    if vit:
        try:
            index = int(layer)
            _, dim, stride = features[index]
            return str(index), dim, stride
        except (ValueError, IndexError):
            valid = f"a block index 0..{n - 1} or {-n}..-1 (default -1 = last block)"
    elif layer in names:
        return features[names.index(layer)]
    else:
        valid = f"one of {', '.join(names)} (default {names[-1]})"
    raise UsageError(f"bad layer {layer!r} for backbone {name}: use {valid}")
