"""Base classes of upsamplers: ``Upsampler`` (the interface) and ``LearnedUpsampler`` (what ``upcli train`` fits).

Constructors take plain architecture arguments and read no file; :mod:`.checkpoints` builds a model from a
checkpoint's config, then loads its weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.cfg import IMAGENET_NORM


class Upsampler(nn.Module):
    """Base class. ``forward(lr_feats, image, size)`` returns features at ``size``.

    Shapes: ``lr_feats: Tensor[B, C, h, w]``; ``image: Tensor[B, 3, H_img, W_img]``, float in [0, 1], the
    guidance (any size: subclasses resize it with ``guidance_at``); ``size = (H, W)``;
    returns ``Tensor[B, C, H, W]`` in the dtype of ``lr_feats``.

    An upsampler with weights keeps its architecture arguments in ``self.config``: its checkpoints store them.
    A ``backbone_agnostic`` one never sees the features' values when making its weights (any backbone, layer and
    dim): its checkpoints record no backbone, are checked against none, and one file ships for all backbones.
    """

    name: str = ""
    checkpointed: bool = False  # its weights live in checkpoints (learned, or fitted per image)
    backbone_agnostic: bool = False

    @classmethod
    def build(cls, backbone=None, **arch) -> Upsampler:
        """This upsampler with fresh weights, for ``backbone`` (may be ``None``) and architecture ``arch``."""
        return cls(backbone=backbone, **arch)

    def render(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """``forward``'s maps as ``dtype`` (what a store keeps). An upsampler whose last step can write ``dtype``
        itself overrides this, to skip making the maps in float32 first (the largest tensor of the pipeline)."""
        return self(lr_feats, image, size=size).to(dtype)


def upsample_features(upsampler: Upsampler, low: Tensor, images: Tensor, size: tuple[int, int], device,
                      dtype: torch.dtype | None = None) -> Tensor:
    """``upsampler(low, images, size)`` as ``upcli upsample`` runs it (inference mode, autocast on CUDA), as
    ``dtype`` where given (``Upsampler.render``): the one way a full store's maps are made and a compact store's
    rendered."""
    from ..runtime import inference_autocast

    with torch.inference_mode(), inference_autocast(device):
        if dtype is None:
            return upsampler(low, images, size=size)
        return upsampler.render(low, images, size, dtype)


def guidance_at(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``image`` resized to ``size`` (bilinear, antialiased when shrinking); unchanged if already that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def stage_sizes(low: tuple[int, int], high: tuple[int, int]) -> list[tuple[int, int]]:
    """Output size of each ~2x stage from ``low`` to exactly ``high``."""
    ratio = max(high[0] / low[0], high[1] / low[1])
    n = max(1, round(math.log2(ratio)))
    sizes = [(round(low[0] * (high[0] / low[0]) ** (s / n)), round(low[1] * (high[1] / low[1]) ** (s / n)))
             for s in range(1, n)]
    return sizes + [tuple(high)]


class LearnedUpsampler(Upsampler):
    """What the upsamplers of ``upcli train`` share: their architecture (``self.config``, in the order of the
    constructor's arguments), image normalisation, and a checkpoint shipped per backbone
    (``create_upsampler(name, backbone)``; ``pretrained=False`` gives fresh weights).

    :meth:`build` takes ``dim`` from the backbone and ``layers`` as ``round(log2(stride))`` when not given.
    """

    checkpointed = True

    def __init__(self, **config):
        super().__init__()
        self.config = config
        self.register_buffer("mean", torch.tensor(IMAGENET_NORM[0]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_NORM[1]).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def build(cls, backbone=None, **arch) -> LearnedUpsampler:
        if arch.get("dim") is None:
            if backbone is None or not hasattr(backbone, "dim"):
                raise ValueError("a learned upsampler needs the backbone (for its feature dim) or dim=")
            arch["dim"] = int(backbone.dim)
        if arch.get("layers") is None:
            arch["layers"] = max(1, round(math.log2(getattr(backbone, "stride", 16))))
        return cls(**arch)

    def normalize(self, image: Tensor) -> Tensor:
        """``[0, 1]`` RGB -> ImageNet-normalised, the guidance's scale."""
        return (image.float() - self.mean) / self.std

    @staticmethod
    def residual_correction(dim: int) -> nn.Conv2d:
        """A 1x1 conv that starts at zero: a learned correction of the features that starts as none."""
        conv = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv
