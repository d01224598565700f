"""Bilinear upsampling: the training-free baseline every guided upsampler is compared against.

This implementation:
- ``F.interpolate(mode="bilinear", align_corners=False)`` straight from ``lr_feats`` to ``size``;
- ignores the image (it takes it only to share the ``Upsampler`` interface);
- has no parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from . import register_upsampler
from .base import Upsampler


@register_upsampler("bilinear")
class BilinearUpsampler(Upsampler):
    def __init__(self, backbone: nn.Module | None = None) -> None:
        super().__init__()

    def forward(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int]) -> Tensor:
        return F.interpolate(lr_feats, size=tuple(size), mode="bilinear", align_corners=False)
