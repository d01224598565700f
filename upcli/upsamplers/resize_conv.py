"""Resize-conv: FeatUp's learned baseline, trained by the same multi-view objective as the JBU.

Each ~2x stage (the sizes of :func:`~upcli.upsamplers.jbu.stage_sizes`, so it lands exactly on any size):
bilinear resize of the features, concatenation with the normalised image at that size, a 1x1 conv back to
``dim``, ReLU (none on the last stage), and a residual add. The convs start at zero: an untrained
resize-conv is bilinear upsampling.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Upsampler, guidance_at, register_upsampler
from .jbu import (IMAGENET_MEAN, IMAGENET_STD, _backbone_dim, check_checkpoint, load_weights, shipped_checkpoint,
                  stage_sizes)


@register_upsampler("resize-conv")
class ResizeConv(Upsampler):
    def __init__(self, backbone: nn.Module | None = None, dim: int | None = None, layers: int | None = None,
                 checkpoint: str | None = None, pretrained: bool = True):
        super().__init__()
        if checkpoint is None and pretrained:
            checkpoint = shipped_checkpoint(self.name, backbone)
        if checkpoint is not None:
            config = check_checkpoint(checkpoint, self.name, backbone)
            dim, layers = config["dim"], config["layers"]
        dim = dim if dim is not None else _backbone_dim(backbone)
        layers = layers if layers is not None else max(1, round(math.log2(getattr(backbone, "stride", 16))))
        self.config = {"dim": dim, "layers": layers}
        self.stages = nn.ModuleList(nn.Conv2d(dim + 3, dim, 1) for _ in range(layers))
        for conv in self.stages:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if checkpoint is not None:
            load_weights(self, checkpoint)

    def forward(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int]) -> Tensor:
        x = lr_feats.float()
        image = (image.float() - self.mean) / self.std
        sizes = stage_sizes(tuple(x.shape[-2:]), tuple(size))
        for s, stage_size in enumerate(sizes):
            x = F.interpolate(x, size=stage_size, mode="bilinear", align_corners=False)
            delta = self.stages[min(s, len(self.stages) - 1)](torch.cat([x, guidance_at(image, stage_size)], dim=1))
            x = x + (delta if s == len(sizes) - 1 else F.relu(delta))
        return x.to(lr_feats.dtype)
