"""The scale objective (JAFAR, NAF): from the features of an image shrunk by delta, predict the features of the image.

For a crop ``I`` and a factor ``delta`` (about 2 to 4), the upsampler gets ``backbone(shrink(I, delta))``, guided
by ``I``, and is judged against ``backbone(I)``, whose grid is ``delta`` times finer: it learns what the backbone
would see in a sharper image, the job it has at inference. Where the prediction is made (``--target``):

- ``pooled``: at the crop's pixels, then averaged over each target cell (the encoder sees the image at the
  resolution it sees at inference; costs a full-resolution pass);
- ``grid``: straight at the target's grid, the guidance resized to it (JAFAR's low-resolution training; cheap).

The loss is ``1 - cos`` plus ``l2_weight`` times the squared error relative to the target's mean square, after a
random projection of the channels (one per sample, as in the multi-view objective). For an upsampler whose output
is a convex combination of its input vectors with weights that never see them (``attention``), projecting before
upsampling gives the same result as after, so only the projected channels are upsampled.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SCALE_TARGETS = ("pooled", "grid")


def project(feats: Tensor, proj: Tensor) -> Tensor:
    """``feats (B, C, h, w)`` times each sample's ``proj (B, C, P)``: ``(B, P, h, w)``."""
    return torch.einsum("bchw,bcp->bphw", feats, proj.to(feats))


def scale_loss(pred: Tensor, target: Tensor, l2_weight: float) -> Tensor:
    """Mean ``1 - cos`` over the target's cells plus ``l2_weight`` times the relative squared error."""
    cos = F.cosine_similarity(pred, target, dim=1, eps=1e-6)
    rel = (pred - target).square().mean() / target.detach().square().mean().clamp_min(1e-12)
    return (1 - cos).mean() + l2_weight * rel


class ScaleObjective(nn.Module):
    """The scale objective around an upsampler whose weights never see the features (no trainable parts of its
    own)."""

    loss_name = "1 - cos + relative L2"

    def __init__(self, upsampler: nn.Module, target: str = "pooled", l2_weight: float = 1.0):
        super().__init__()
        if target not in SCALE_TARGETS:
            raise ValueError(f"target must be one of {', '.join(SCALE_TARGETS)}, got {target!r}")
        self.upsampler, self.target, self.l2_weight = upsampler, target, l2_weight

    def forward(self, lr_feats: Tensor, image: Tensor, target: Tensor, proj: Tensor) -> Tensor:
        """``lr_feats (B, C, h, w)`` of the shrunk crops, ``image (B, 3, H, W)`` the crops, ``target (B, C, h', w')``
        their own features, ``proj (B, C, P)``."""
        target = project(target.float(), proj)
        grid = tuple(target.shape[-2:])
        size = grid if self.target == "grid" else tuple(image.shape[-2:])
        pred = self.upsampler(project(lr_feats.float(), proj), image, size)
        if tuple(pred.shape[-2:]) != grid:
            pred = F.adaptive_avg_pool2d(pred, grid)
        return scale_loss(pred, target, self.l2_weight)
