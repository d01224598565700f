"""Plain PyTorch versions of the adaptive convolution: the slow truth for tests, and the last fallback.

    out[b, c, h, w] = sum_ij weights[b, h, w, i, j] * xpad[b, c, h + i, w + j]

- ``adaptive_conv_unfold``: ``F.unfold`` then a product. Obviously right, and it materialises C*k*k*H*W
  floats (3.8 GB at 224^2, C = 384, k = 7): tests and the benchmark only.
- ``adaptive_conv_forward``, ``..._grad_input_padded``, ``..._grad_weights``: shift-and-accumulate, one tap at a time, so no
  temporary is larger than the output. This is the "eager" baseline and the backend of last resort.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PAD_MODES = {"zeros": 0, "reflect": 1, "replicate": 2, "valid": 3}
_TORCH_PAD = {0: "constant", 1: "reflect", 2: "replicate"}


def pad_input(x: Tensor, r: int, mode: int) -> Tensor:
    """``x`` padded by ``r`` on every side with pad mode ``mode`` (``valid``: already padded)."""
    if mode == PAD_MODES["valid"] or r == 0:
        return x
    return F.pad(x, (r, r, r, r), mode=_TORCH_PAD[mode])


def fold_padding_grad(grad_xpad: Tensor, x_shape, r: int, mode: int) -> Tensor:
    """The adjoint of ``pad_input``: the gradient of the padded tensor folded back onto ``x``.

    Works in place on ``grad_xpad`` and returns a view of its interior (no copy of the map).
    """
    if mode == PAD_MODES["valid"] or r == 0:
        return grad_xpad
    return _fold_axis(_fold_axis(grad_xpad, r, mode, -1), r, mode, -2)


def _fold_axis(grad: Tensor, r: int, mode: int, dim: int) -> Tensor:
    """Add the ``r`` padded entries at each end of ``dim`` onto the entries they copied; the interior view."""
    n = grad.shape[dim] - 2 * r
    inner = grad.narrow(dim, r, n)
    left, right = grad.narrow(dim, 0, r), grad.narrow(dim, n + r, r)
    if mode == PAD_MODES["reflect"]:  # pad[r - 1 - t] = x[1 + t], pad[n + r + t] = x[n - 2 - t]
        inner.narrow(dim, 1, r).add_(left.flip(dim))
        inner.narrow(dim, n - 1 - r, r).add_(right.flip(dim))
    elif mode == PAD_MODES["replicate"]:
        inner.narrow(dim, 0, 1).add_(left.sum(dim, keepdim=True))
        inner.narrow(dim, n - 1, 1).add_(right.sum(dim, keepdim=True))
    return inner


def adaptive_conv_unfold(x: Tensor, weights: Tensor, padding: str = "reflect") -> Tensor:
    """Unfold reference. ``x: Tensor[B, C, H, W]``, ``weights: Tensor[B, H, W, k, k]`` -> ``Tensor[B, C, H, W]``."""
    B, H, W, k, _ = weights.shape
    xpad = pad_input(x, k // 2, PAD_MODES[padding])
    patches = F.unfold(xpad, k).view(B, xpad.shape[1], k * k, H, W)  # C*k*k*H*W floats
    return torch.einsum("bcthw,bhwt->bchw", patches, weights.reshape(B, H, W, k * k))


def adaptive_conv_forward(x: Tensor, weights: Tensor, pad_mode: int) -> Tensor:
    k = weights.shape[-1]
    H, W = weights.shape[1:3]
    xpad = pad_input(x, k // 2, pad_mode)
    out = torch.zeros(x.shape[0], x.shape[1], H, W, dtype=torch.promote_types(x.dtype, weights.dtype), device=x.device)
    for i in range(k):
        for j in range(k):
            out.addcmul_(xpad[:, :, i:i + H, j:j + W], weights[:, None, :, :, i, j])
    return out


def adaptive_conv_grad_input_padded(grad_out: Tensor, weights: Tensor) -> Tensor:
    B, C, H, W = grad_out.shape
    k = weights.shape[-1]
    grad_xpad = grad_out.new_zeros(B, C, H + k - 1, W + k - 1)
    for i in range(k):
        for j in range(k):
            grad_xpad[:, :, i:i + H, j:j + W].addcmul_(grad_out, weights[:, None, :, :, i, j])
    return grad_xpad


def adaptive_conv_grad_weights(grad_out: Tensor, x: Tensor, pad_mode: int, k: int) -> Tensor:
    B, C, H, W = grad_out.shape
    xpad = pad_input(x, k // 2, pad_mode)
    grad_w = grad_out.new_empty(B, H, W, k, k)
    for i in range(k):
        for j in range(k):
            grad_w[..., i, j] = torch.einsum("bchw,bchw->bhw", grad_out, xpad[:, :, i:i + H, j:j + W])
    return grad_w
