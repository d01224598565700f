"""Backbone-agnostic neighbourhood-attention upsampling (NAF-style): one shipped model for every backbone.

From features ``(B, C, h, w)`` and the image, straight to ``(B, C, H, W)`` in one step:

    enc     = encoder(normalise(image resized to (H, W)))         3x3 convs + GELU, (B, width, H, W)
    query   = rope(q_proj(enc),                 pixel positions)  (B, heads, d, H, W)
    key     = rope(k_proj(avg_pool(enc, (h, w))), cell positions) (B, heads, d, h, w)
    out     = neighbourhood_attention(query, key, lr_feats, k)    softmax over the k x k cells around each pixel,
                                                                  heads averaged

Positions are in feature-grid units: pixel ``(y, x)`` at ``((y + 0.5) h / H - 0.5, (x + 0.5) w / W - 0.5)``,
cell ``(i, j)`` at ``(i, j)``. 2-D RoPE rotates half of each head's ``d`` dims by the row and half by the column
position, so the logits depend on the pixel's position relative to each cell, not on where it is in the image.
Each head also adds a Gaussian spatial prior ``-|p - c|^2 / (2 sigma^2)`` with a learned width (three extra
query/key dims carry it, so the op stays plain attention), capped at k / 6 so that the window's edge is 3 sigma
away: far cells of the window get little weight, so the output does not jump where a pixel's window moves by one
cell. With RoPE alone an early model showed the cell grid as seams; so did one whose widths started at 0.75-3
cells (a cell 3.5 cells away kept 0.3-0.6 of the centre's weight), and its output was washed out. The window
(``k_eff = min(k, h, w)``) is shifted inside the grid at the borders.

The values are the backbone's own low-res vectors, unprojected, and the weights never see the features: every
output vector is a convex combination of the input vectors (constant features stay constant), and one model
serves any backbone, layer, channel count and output size. Its checkpoints bind none of them
(``backbone_agnostic``): ``create_upsampler("attention")`` loads ``upcli/weights/attention.safetensors``, not one
per backbone.

Departures from NAF (valeoai/NAF), kept small until the model is trained and measured:

* one 3x3 conv stack as the encoder instead of NAF's two branches (1x1 pixel, 3x3 context): fewer parts to tune;
* separate 1x1 query and key projections of the shared encoding (NAF pools the queries into keys): costs nothing
  (the key projection runs on the small grid) and lets keys and queries differ;
* fixed RoPE frequencies (periods 2 to 32 cells, geometric) rather than anything learned;
* ``upcli.kernels.neighbourhood_attention`` instead of NATTEN, so nothing else to install; default k = 7 (NAF: 9
  or 15), enough for ~2 cells of displacement either way.

``upcli/weights/attention.safetensors`` ships (trained on efficientnet-lite0 blocks.6, blocks.2 and blocks.1; its
``feature_sources``); README "attention" gives its command and what it measures. ``pretrained=False`` gives fresh
weights (seeded by the caller's torch RNG).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import neighbourhood_attention
from . import register_upsampler
from .base import LearnedUpsampler, guidance_at

ROPE_PERIODS = (2.0, 32.0)  # shortest and longest RoPE wavelength, in feature cells
SIGMA_INIT = (0.35, 0.9)  # the heads' initial spatial widths, in feature cells (geometric)
SIGMA_MAX = 1 / 6  # of the window size k: 3 sigma stay inside the window's half width


def rope_angles(positions: Tensor, n: int) -> Tensor:
    """``(len(positions), n)`` rotation angles: each position times ``n`` frequencies with periods from
    ``ROPE_PERIODS[0]`` to ``ROPE_PERIODS[1]`` cells (geometric)."""
    lo, hi = ROPE_PERIODS
    periods = torch.logspace(math.log10(lo), math.log10(hi), n, dtype=torch.float32, device=positions.device)
    return positions[:, None].float() * (2 * math.pi / periods)


def distance_terms(rows: Tensor, cols: Tensor, query: bool) -> Tensor:
    """``(3, H, W)`` extra query (``query``) or key dims whose product is ``-|p - c|^2 / 2`` up to a term of the
    query alone (softmax drops it): ``[py, px, 1] . [cy, cx, -|c|^2 / 2]``."""
    y, x = torch.broadcast_tensors(rows[:, None], cols[None, :])
    last = torch.ones_like(y) if query else -(y.square() + x.square()) / 2
    return torch.stack([y, x, last])


def apply_rope(x: Tensor, rows: Tensor, cols: Tensor, factor: float = 1.0, out: Tensor | None = None) -> Tensor:
    """2-D RoPE on ``x (B, heads, d, H, W)``, times ``factor``: the first ``d / 2`` dims rotate by the row position
    ``rows [H]``, the rest by the column position ``cols [W]``; within each half, dim ``i`` pairs with dim
    ``i + d / 4``. With ``out`` (no autograd; a view may be given), written there in place, with no temporaries
    of x's size."""
    d = x.shape[2]
    n = d // 4
    ay = rope_angles(rows, n).T[:, :, None]  # (n, H, 1)
    ax = rope_angles(cols, n).T[:, None, :]  # (n, 1, W)
    parts = []
    for half, angle in ((slice(0, d // 2), ay), (slice(d // 2, d), ax)):
        a, b = x[:, :, half][:, :, :n], x[:, :, half][:, :, n:]
        cos, sin = angle.cos() * factor, angle.sin() * factor
        if out is None:
            parts += [a * cos - b * sin, a * sin + b * cos]
        else:
            dest = out[:, :, half]
            torch.mul(a, cos, out=dest[:, :, :n]).addcmul_(b, sin, value=-1)
            torch.mul(a, sin, out=dest[:, :, n:]).addcmul_(b, cos)
    return torch.cat(parts, dim=2) if out is None else out


@register_upsampler("attention")
class AttentionUpsampler(LearnedUpsampler):
    """Neighbourhood attention from an image encoding to the backbone's grid; values are the raw features.

    ``create_upsampler("attention", pretrained=False)`` needs no backbone; a checkpoint loads for any backbone.
    """

    backbone_agnostic = True

    def __init__(self, heads: int = 4, head_dim: int = 32, kernel_size: int = 7, width: int = 32, depth: int = 3):
        super().__init__(heads=heads, head_dim=head_dim, kernel_size=kernel_size, width=width, depth=depth)
        if head_dim % 4 or heads < 1 or kernel_size < 1 or depth < 1 or width < 1:
            raise ValueError(f"head_dim must be a multiple of 4 (2-D RoPE), and heads, kernel_size, width and depth "
                             f"at least 1; got {self.config}")
        layers = []
        for i in range(depth):
            layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, padding_mode="replicate"), nn.GELU()]
        self.encoder = nn.Sequential(*layers)
        self.query = nn.Conv2d(width, heads * head_dim, 1)
        self.key = nn.Conv2d(width, heads * head_dim, 1)
        lo, hi = SIGMA_INIT
        init = torch.logspace(math.log10(lo), math.log10(hi), heads) / self.sigma_max
        self.sigma_logit = nn.Parameter(torch.logit(init.clamp(1e-3, 1 - 1e-3)))

    @property
    def sigma_max(self) -> float:
        return SIGMA_MAX * self.config["kernel_size"]

    def sigma(self) -> Tensor:
        """The heads' spatial widths in feature cells, each in (0, k / 6)."""
        return self.sigma_max * torch.sigmoid(self.sigma_logit)

    @classmethod
    def build(cls, backbone=None, **arch) -> AttentionUpsampler:
        """Fresh weights; the backbone is not needed (nor read)."""
        return cls(**arch)

    def forward(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int]) -> Tensor:
        B, C, h, w = lr_feats.shape
        H, W = (int(s) for s in size)
        heads, d = self.config["heads"], self.config["head_dim"]
        enc = self.encoder(self.normalize(guidance_at(image, (H, W))))
        q = self.query(enc).view(B, heads, d, H, W)
        k = self.key(F.adaptive_avg_pool2d(enc, (h, w))).view(B, heads, d, h, w)
        dev = enc.device
        py = (torch.arange(H, device=dev, dtype=torch.float32) + 0.5) * (h / H) - 0.5
        px = (torch.arange(W, device=dev, dtype=torch.float32) + 0.5) * (w / W) - 0.5
        cy, cx = (torch.arange(n, device=dev, dtype=torch.float32) for n in (h, w))
        # logits: <rope(q), rope(k)> / sqrt(d) (appearance, relative position) - |p - c|^2 / (2 sigma_head^2)
        inv_var = self.sigma().pow(-2).view(1, heads, 1, 1, 1)
        distance = distance_terms(py, px, query=True) * inv_var
        if torch.is_grad_enabled():
            queries = torch.cat([apply_rope(q, py, px, 1 / math.sqrt(d)), distance.expand(B, -1, -1, -1, -1)], dim=2)
        else:  # inference: the full-resolution queries filled in place, no copies of that size
            queries = q.new_empty(B, heads, d + 3, H, W)
            apply_rope(q, py, px, 1 / math.sqrt(d), out=queries[:, :, :d])
            queries[:, :, d:] = distance
        k = torch.cat([apply_rope(k, cy, cx), distance_terms(cy, cx, query=False).expand(B, heads, 3, h, w)], dim=2)
        k_eff = min(self.config["kernel_size"], h, w)
        out = neighbourhood_attention(queries, k, lr_feats.float(), k_eff, scale=1.0)
        return out.to(lr_feats.dtype)
