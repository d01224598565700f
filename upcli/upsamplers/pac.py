"""PAC joint upsampler: a guidance branch on the image and a stack of 2x PAC transposed convolutions.

Each stage is ``PacConvTranspose2d(dim, dim, 5, stride=2)`` with one shared 5x5 filter for all channels (the
features have hundreds of channels; a full ``dim x dim`` filter would cost ``dim`` times more) and a Gaussian
adapting kernel on learned guidance features of the image at the stage's output size:

    guide_s = head_s(trunk(image at the stage's size))          a small CNN, then 1x1 per stage
    K       = exp(-gain_s * |guide(q) - guide(p)|^2 / 2)         gain_s learned, starts at 0
    out     = sum_q W[q - p] * K * zero-inserted feats[q]        W starts as the bilinear 2x filter

At initialisation ``K == 1`` and ``W`` is bilinear interpolation, so an untrained stack is exactly bilinear 2^n
upsampling (edges replicated, as ``F.interpolate``); training learns the filter, the guidance and how strongly
to adapt. ``n = round(log2(ratio))`` stages, then a resize to the exact size; a zero-initialised 1x1 residual on
the backbone grid, as the JBU. Trained by ``upcli train --upsampler pac`` with the JBU's objective and
checkpoint format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..pac import PacConvTranspose2d
from . import register_upsampler
from .base import LearnedUpsampler, guidance_at, stage_sizes


def bilinear_filter() -> Tensor:
    """The 5x5 transposed-conv filter (stride 2, padding 2, output padding 1) of bilinear 2x upsampling."""
    taps = torch.tensor([0.0, 0.25, 0.75, 0.75, 0.25])
    return taps[:, None] * taps[None, :]


class PacUpStage(nn.Module):
    """2x: ``feats (B, C, h, w)`` and guidance ``(B, G, 2h, 2w)`` -> ``(B, C, 2h, 2w)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.up = PacConvTranspose2d(dim, dim, 5, stride=2, padding=2, output_padding=1, bias=False,
                                     shared_filters=True, kernel_gain=0.0)
        with torch.no_grad():
            self.up.weight.copy_(bilinear_filter()[None, None])

    def forward(self, feats: Tensor, guide: Tensor) -> Tensor:
        # one replicated cell around the features (two pixels around the guidance), cropped after: edges as bilinear
        x = F.pad(feats, (1, 1, 1, 1), mode="replicate")
        g = F.pad(guide, (2, 2, 2, 2), mode="replicate")
        return self.up(x, g)[..., 2:-2, 2:-2]


@register_upsampler("pac")
class PacUpsampler(LearnedUpsampler):
    """``create_upsampler("pac", backbone, pretrained=False)`` for training, or ``checkpoint=PATH``."""

    def __init__(self, dim: int, layers: int, guide_dim: int = 8, hidden: int = 16):
        super().__init__(dim=dim, layers=layers, guide_dim=guide_dim, hidden=hidden)
        self.guidance_trunk = nn.Sequential(
            nn.Conv2d(3, hidden, 3, padding=1, padding_mode="replicate"), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1, padding_mode="replicate"), nn.ReLU())
        self.guidance_heads = nn.ModuleList(nn.Conv2d(hidden, guide_dim, 1) for _ in range(layers))
        self.stages = nn.ModuleList(PacUpStage(dim) for _ in range(layers))
        self.residual = self.residual_correction(dim)

    def forward(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int]) -> Tensor:
        x = lr_feats.float()
        x = x + self.residual(x)
        image = self.normalize(image)
        low = tuple(x.shape[-2:])
        n = len(stage_sizes(low, tuple(size)))  # round(log2(ratio)) stages, as the JBU
        for s in range(n):
            out_size = (low[0] * 2 ** (s + 1), low[1] * 2 ** (s + 1))
            i = min(s, len(self.stages) - 1)
            guide = self.guidance_heads[i](self.guidance_trunk(guidance_at(image, out_size)))
            x = self.stages[i](x, guide)
        if tuple(x.shape[-2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False,
                              antialias=x.shape[-2] > size[0] or x.shape[-1] > size[1])
        return x.to(lr_feats.dtype)


__all__ = ["PacUpsampler", "PacUpStage", "bilinear_filter"]
