"""Joint Bilateral Upsampling, training-free.

Kopf, Cohen, Lischinski, Uyttendaele, "Joint Bilateral Upsampling", SIGGRAPH 2007.

For an output pixel ``p`` with low-res coordinate ``u(p) = (p + 0.5) * h / H - 0.5`` (per axis)::

    out(p) = sum_q f(|u(p) - q|) g(|I(p) - Ibar(q)|) F(q) / sum_q f(...) g(...)

over the low-res grid points ``q`` within ``radius`` of ``c(p)``, the low-res cell holding ``p``. ``f`` and
``g`` are Gaussians, ``I`` is the guidance at output size and ``Ibar`` is ``I`` averaged over each low-res
cell (``adaptive_avg_pool2d`` to ``(h, w)``); taps outside the map get zero weight.

This implementation:
- groups output pixels by ``c(p)``: each cell's rows and columns are padded to the largest block
  ``s = max cell size`` (index maps), so the weights form ``(h * w, s * s, k * k)`` with ``k = 2 * radius + 1``;
- evaluates all weights at once as a softmax over the ``k * k`` taps of the log-weights, which is the
  normalisation above and cannot underflow to 0 / 0;
- multiplies them per cell with the ``(k * k, C)`` neighbour features, taken by ``F.unfold`` of the small
  low-res map, in channel chunks: about ``H * W * k * k * C`` multiply-adds in BLAS, and no
  ``(C, k * k, H, W)`` tensor;
- computes in float32 and returns the dtype of ``lr_feats``;
- ``sigma_spatial`` is in low-res pixels, ``sigma_color`` in Euclidean RGB distance on [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError
from . import register_upsampler
from .base import Upsampler, guidance_at

_CHUNK_ELEMENTS = 1 << 22  # float32 elements per channel chunk of the padded result: 16 MiB, cache-friendly


def joint_bilateral_upsample(
    lr_feats: Tensor,
    guidance: Tensor,
    size: tuple[int, int],
    sigma_spatial: float = 1.0,
    sigma_color: float = 0.1,
    radius: int = 2,
) -> Tensor:
    """``Tensor[B, C, h, w]`` features guided by ``Tensor[B, 3, H_img, W_img]`` -> ``Tensor[B, C, H, W]``."""
    _check_inputs(lr_feats, guidance)
    B, C, h, w = lr_feats.shape
    H, W = size
    k = 2 * radius + 1
    guidance = guidance_at(guidance.float(), (H, W))
    rows = _AxisLayout(H, h, radius, sigma_spatial, lr_feats.device)
    cols = _AxisLayout(W, w, radius, sigma_spatial, lr_feats.device)
    spatial = rows.log_weight[:, None, :, None, :, None] + cols.log_weight[None, :, None, :, None, :]
    spatial = spatial.reshape(h * w, rows.slots * cols.slots, k * k)  # (cells, slots, taps)
    # position of each output pixel in the padded (h, w, s_rows, s_cols) layout, row-major over (H, W)
    padded_pos = (
        (rows.cell[:, None] * w + cols.cell[None, :]) * (rows.slots * cols.slots)
        + rows.slot[:, None] * cols.slots
        + cols.slot[None, :]
    ).reshape(-1)
    chunk = max(1, _CHUNK_ELEMENTS // (h * w * rows.slots * cols.slots))

    out = torch.empty(B, C, H, W, dtype=lr_feats.dtype, device=lr_feats.device)
    for b in range(B):
        guide = guidance[b]  # (3, H, W)
        guide_cells = guide[:, rows.index][:, :, :, cols.index]  # (3, h, s_rows, w, s_cols)
        guide_cells = guide_cells.permute(1, 3, 2, 4, 0).reshape(h * w, -1, 3)  # (hw, ss, 3)
        pooled = F.adaptive_avg_pool2d(guide, (h, w))
        pooled_taps = F.unfold(pooled[None], k, padding=radius).view(3, k * k, h * w)
        pooled_taps = pooled_taps.permute(2, 0, 1).contiguous()  # (hw, 3, kk)
        # |I - Ibar|^2 = |I|^2 + |Ibar|^2 - 2 I.Ibar, the last term as a batched matmul
        norms = guide_cells.square().sum(-1, keepdim=True) + pooled_taps.square().sum(1, keepdim=True)
        color_dist2 = torch.baddbmm(norms, guide_cells, pooled_taps, alpha=-2).clamp_min_(0)  # (hw, ss, kk)
        logits = spatial - color_dist2.mul_(1 / (2 * sigma_color**2))
        weights = torch.softmax(logits, dim=-1)

        for c0 in range(0, C, chunk):
            feats = lr_feats[b : b + 1, c0 : c0 + chunk].float()
            taps = F.unfold(feats, k, padding=radius).view(-1, k * k, h * w).permute(2, 1, 0).contiguous()
            result = torch.bmm(weights, taps).view(-1, taps.shape[-1])  # (padded pixels, c)
            out[b, c0 : c0 + chunk] = result.index_select(0, padded_pos).T.reshape(-1, H, W)
    return out


def joint_bilateral_upsample_reference(
    lr_feats: Tensor,
    guidance: Tensor,
    size: tuple[int, int],
    sigma_spatial: float = 1.0,
    sigma_color: float = 0.1,
    radius: int = 2,
) -> Tensor:
    """The formula above as a plain float64 loop over output pixels and taps (slow; for tests)."""
    _check_inputs(lr_feats, guidance)
    feats = lr_feats.double()
    _, _, h, w = feats.shape
    H, W = size
    guide = guidance_at(guidance.double(), (H, W))
    pooled = F.adaptive_avg_pool2d(guide, (h, w))
    out = torch.zeros(feats.shape[:2] + (H, W), dtype=torch.float64)
    for y in range(H):
        uy, cy = (y + 0.5) * h / H - 0.5, (2 * y + 1) * h // (2 * H)
        for x in range(W):
            ux, cx = (x + 0.5) * w / W - 0.5, (2 * x + 1) * w // (2 * W)
            numerator, denominator = 0.0, 0.0
            for qy in range(max(0, cy - radius), min(h, cy + radius + 1)):
                for qx in range(max(0, cx - radius), min(w, cx + radius + 1)):
                    spatial = math.exp(-((uy - qy) ** 2 + (ux - qx) ** 2) / (2 * sigma_spatial**2))
                    color_dist2 = (guide[:, :, y, x] - pooled[:, :, qy, qx]).square().sum(1)
                    weight = spatial * torch.exp(-color_dist2 / (2 * sigma_color**2))  # (B,)
                    numerator = numerator + weight[:, None] * feats[:, :, qy, qx]
                    denominator = denominator + weight[:, None]
            out[:, :, y, x] = numerator / denominator
    return out.to(lr_feats.dtype)


class _AxisLayout:
    """One axis of the cell grouping: ``out_len`` output pixels over ``in_len`` low-res cells.

    ``cell``, ``slot``: per output pixel, its cell and its place in it; ``slots``: the largest cell;
    ``index (in_len, slots)``: the output pixel in each slot (padding slots repeat a real one);
    ``log_weight (in_len, slots, k)``: the spatial log-weight of each tap, ``-inf`` off the map.
    """

    def __init__(self, out_len: int, in_len: int, radius: int, sigma: float, device: torch.device):
        pixel = torch.arange(out_len, device=device)
        self.cell = (2 * pixel + 1) * in_len // (2 * out_len)
        counts = torch.bincount(self.cell, minlength=in_len)
        start = torch.cumsum(counts, 0) - counts
        self.slot = pixel - start[self.cell]
        self.slots = int(counts.max())
        self.index = (start[:, None] + torch.arange(self.slots, device=device)).clamp(max=out_len - 1)

        position = (self.index + 0.5) * in_len / out_len - 0.5  # low-res coordinate u
        tap = torch.arange(in_len, device=device)[:, None, None] + torch.arange(-radius, radius + 1, device=device)
        log_weight = -(position[:, :, None] - tap).square() / (2 * sigma**2)
        self.log_weight = log_weight.masked_fill((tap < 0) | (tap >= in_len), float("-inf"))


def _check_inputs(lr_feats: Tensor, guidance: Tensor) -> None:
    if lr_feats.dim() != 4 or guidance.dim() != 4 or guidance.shape[1] != 3:
        got = f"{tuple(lr_feats.shape)} and {tuple(guidance.shape)}"
        raise ValueError(f"expected lr_feats (B, C, h, w) and guidance (B, 3, H, W), got {got}")
    if lr_feats.shape[0] != guidance.shape[0]:
        raise ValueError(f"batch sizes differ: lr_feats {lr_feats.shape[0]}, guidance {guidance.shape[0]}")


@register_upsampler("bilateral")
class BilateralUpsampler(Upsampler):
    def __init__(
        self,
        sigma_spatial: float = 1.0,
        sigma_color: float = 0.1,
        radius: int = 2,
        backbone: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if sigma_spatial <= 0 or sigma_color <= 0:
            raise UsageError(f"bilateral sigmas must be positive, got {sigma_spatial=} and {sigma_color=}")
        if radius < 0 or radius != int(radius):
            raise UsageError(f"bilateral radius must be a non-negative integer, got {radius}")
        self.sigma_spatial = float(sigma_spatial)
        self.sigma_color = float(sigma_color)
        self.radius = int(radius)

    def forward(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int]) -> Tensor:
        return joint_bilateral_upsample(lr_feats, image, size, self.sigma_spatial, self.sigma_color, self.radius)

    def extra_repr(self) -> str:
        return f"sigma_spatial={self.sigma_spatial}, sigma_color={self.sigma_color}, radius={self.radius}"
