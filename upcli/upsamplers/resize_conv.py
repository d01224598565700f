"""Resize-conv: FeatUp's learned baseline, trained by the same multi-view objective as the JBU.

Each ~2x stage (the sizes of :func:`~upcli.upsamplers.base.stage_sizes`, so it lands exactly on any size):
bilinear resize of the features, concatenation with the normalised image at that size, a 1x1 conv back to
``dim``, ReLU (none on the last stage), and a residual add. The convs start at zero: an untrained
resize-conv is bilinear upsampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import register_upsampler
from .base import LearnedUpsampler, guidance_at, stage_sizes


@register_upsampler("resize-conv")
class ResizeConv(LearnedUpsampler):
    def __init__(self, dim: int, layers: int):
        super().__init__(dim=dim, layers=layers)
        self.stages = nn.ModuleList(nn.Conv2d(dim + 3, dim, 1) for _ in range(layers))
        for conv in self.stages:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int]) -> Tensor:
        x = lr_feats.float()
        image = self.normalize(image)
        sizes = stage_sizes(tuple(x.shape[-2:]), tuple(size))
        for s, stage_size in enumerate(sizes):
            x = F.interpolate(x, size=stage_size, mode="bilinear", align_corners=False)
            delta = self.stages[min(s, len(self.stages) - 1)](torch.cat([x, guidance_at(image, stage_size)], dim=1))
            x = x + (delta if s == len(sizes) - 1 else F.relu(delta))
        return x.to(lr_feats.dtype)
