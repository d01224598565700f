"""Cross-scale neighbourhood attention: each output pixel attends to the k x k feature cells around it.

    logits[b, n, y, x, i, j] = scale * <query[b, n, :, y, x], key[b, n, :, sy + i, sx + j]>
    p = softmax over the k * k taps (i, j)
    out[b, c, y, x] = mean over heads n of sum_ij p[b, n, y, x, i, j] * value[b, c, sy + i, sx + j]

``query`` lives at the output resolution (H, W), ``key`` and ``value`` on the feature grid (h, w). Output pixel
``y`` sits at grid position ``(y + 0.5) * h / H - 0.5``; its centre cell is ``cy = min(floor((y + 0.5) * h / H),
h - 1)`` and its window the k cells from ``sy = clamp(cy - k // 2, 0, h - k)`` (likewise x): at the borders the
window is shifted, never padded, so every tap is a real cell. Any H, W (also H < h); ``1 <= k <= min(h, w)``.

``neighbourhood_attention_reference`` gathers the k * k keys and values (``C * k * k * H * W`` floats): easy to
read, for tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["neighbourhood_attention", "neighbourhood_attention_reference"]


def window_starts(n_out: int, n_in: int, k: int, device=None) -> Tensor:
    """``int64 [n_out]``: the first of the k grid cells each of ``n_out`` output positions attends to."""
    pos = torch.arange(n_out, device=device)
    centre = ((2 * pos + 1) * n_in).div(2 * n_out, rounding_mode="floor").clamp(max=n_in - 1)
    return (centre - k // 2).clamp(0, n_in - k)


def _check(query: Tensor, key: Tensor, value: Tensor, k: int) -> None:
    if query.dim() != 5 or key.dim() != 5 or value.dim() != 4:
        raise ValueError(f"expected query (B, heads, d, H, W), key (B, heads, d, h, w) and value (B, C, h, w), got "
                         f"{tuple(query.shape)}, {tuple(key.shape)} and {tuple(value.shape)}")
    if query.shape[:3] != key.shape[:3] or key.shape[0] != value.shape[0] or key.shape[3:] != value.shape[2:]:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} do not "
                         "match (B, heads and d of query and key; B, h and w of key and value)")
    if not 1 <= k <= min(key.shape[3:]):
        raise ValueError(f"k must be in 1 .. min(h, w) = {min(key.shape[3:])}, got {k}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, "
                         f"{value.device}")


def neighbourhood_attention_reference(query: Tensor, key: Tensor, value: Tensor, k: int,
                                      scale: float | None = None) -> Tensor:
    """The op in plain PyTorch: gathers each pixel's k * k keys and values (memory-hungry; for tests)."""
    _check(query, key, value, k)
    B, heads, d, H, W = query.shape
    h, w = key.shape[3:]
    scale = 1 / math.sqrt(d) if scale is None else scale
    taps = torch.arange(k, device=key.device)
    rows = (window_starts(H, h, k, key.device)[:, None] + taps)[:, None, :, None]  # [H, 1, k, 1]
    cols = (window_starts(W, w, k, key.device)[:, None] + taps)[None, :, None, :]  # [1, W, 1, k]
    keys = key[:, :, :, rows, cols]  # [B, heads, d, H, W, k, k]
    values = value[:, :, rows, cols]  # [B, C, H, W, k, k]
    logits = torch.einsum("bndyx,bndyxij->bnyxij", query.to(keys.dtype), keys) * scale
    p = torch.softmax(logits.flatten(-2), -1).view_as(logits)
    return torch.einsum("bnyxij,bcyxij->bcyx", p.to(values.dtype), values) / heads


def neighbourhood_attention(query: Tensor, key: Tensor, value: Tensor, k: int, scale: float | None = None) -> Tensor:
    """Cross-scale neighbourhood attention (see the module docstring).

    Args:
        query: ``Tensor[B, heads, d, H, W]`` at the output resolution.
        key: ``Tensor[B, heads, d, h, w]`` on the feature grid.
        value: ``Tensor[B, C, h, w]``.
        k: the window size, ``1 <= k <= min(h, w)``.
        scale: the logits' factor, ``1 / sqrt(d)`` by default.

    Returns:
        ``Tensor[B, C, H, W]`` in the dtype and on the device of ``value``.
    """
    return neighbourhood_attention_reference(query, key, value, k, scale)
