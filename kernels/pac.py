"""Pixel-adaptive convolution in the PAC form (Su et al., "Pixel-Adaptive Convolutional Neural Networks", CVPR 2019).

    out[b, o, h, w] = sum_c sum_ij weight[o, c, i, j] * kernel[b, h, w, i, j] * xpad[b, c, h*s + i*d, w*s + j*d] + bias[o]

``kernel`` is the adaptive part (one k x k kernel per output pixel, e.g. a Gaussian of guidance differences),
``weight`` the ordinary learned filter. The transposed variant is the same sum over the input with ``s - 1``
zeros inserted between pixels, padded by ``d * (k - 1) - padding``, with ``weight`` flipped and transposed,
so ``kernel`` lives at the (larger) output resolution, as in PAC's ``PacConvTranspose2d``.

This implementation:
- works one tap at a time: the tap's shifted input times its kernel slice (C*H*W floats), then one GEMM with
  ``weight[:, :, i, j]``, so nothing k*k times larger than the input is ever made (PAC's unfold makes C*k*k*H*W);
- saves no per-tap tensors for backward; the backward recomputes each tap's product;
- zero padding, as PAC.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair


def _taps(k: int):
    return ((i, j) for i in range(k) for j in range(k))


def tap_view(xpad: Tensor, i: int, j: int, out_size, stride, dilation) -> Tensor:
    """``xpad[:, :, h*s + i*d, w*s + j*d]`` for every output (h, w): a strided view, no copy."""
    (Ho, Wo), (sh, sw), (dh, dw) = out_size, stride, dilation
    return xpad[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]


class _PacConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xpad, kernel, weight, stride, dilation):
        B, Ho, Wo, k, _ = kernel.shape
        out = xpad.new_zeros(B, weight.shape[0], Ho * Wo)
        for i, j in _taps(k):
            tap = tap_view(xpad, i, j, (Ho, Wo), stride, dilation) * kernel[:, None, :, :, i, j]
            out.baddbmm_(weight[:, :, i, j].expand(B, -1, -1), tap.reshape(B, xpad.shape[1], Ho * Wo))
        ctx.save_for_backward(xpad, kernel, weight)
        ctx.stride, ctx.dilation = stride, dilation
        return out.view(B, -1, Ho, Wo)

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():
            raise RuntimeError("upcli.kernels.pac_conv: double backward is not supported")
        xpad, kernel, weight = ctx.saved_tensors
        B, Ho, Wo, k, _ = kernel.shape
        C = xpad.shape[1]
        g = grad_out.reshape(B, -1, Ho * Wo)
        grad_xpad = torch.zeros_like(xpad) if ctx.needs_input_grad[0] else None
        grad_kernel = torch.empty_like(kernel) if ctx.needs_input_grad[1] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[2] else None
        for i, j in _taps(k):
            shifted = tap_view(xpad, i, j, (Ho, Wo), ctx.stride, ctx.dilation)
            k_ij = kernel[:, None, :, :, i, j]
            if grad_weight is not None:
                tap = (shifted * k_ij).reshape(B, C, Ho * Wo)
                grad_weight[:, :, i, j] = torch.einsum("bop,bcp->oc", g, tap)
            if grad_xpad is None and grad_kernel is None:
                continue
            grad_tap = torch.matmul(weight[:, :, i, j].T, g).view(B, C, Ho, Wo)
            if grad_kernel is not None:
                grad_kernel[..., i, j] = torch.einsum("bchw,bchw->bhw", grad_tap, shifted)
            if grad_xpad is not None:
                tap_view(grad_xpad, i, j, (Ho, Wo), ctx.stride, ctx.dilation).addcmul_(grad_tap, k_ij)
        return grad_xpad, grad_kernel, grad_weight, None, None


def pac_conv(
    x: Tensor,
    kernel: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    transposed: bool = False,
    output_padding=0,
) -> Tensor:
    """Pixel-adaptive convolution.

    Args:
        x: ``Tensor[B, C_in, H, W]``.
        kernel: ``Tensor[B, H_out, W_out, k, k]``, the adaptive kernel at each output pixel.
        weight: ``Tensor[C_out, C_in, k, k]`` (``Tensor[C_in, C_out, k, k]`` when ``transposed``, as in torch).
        bias: ``Tensor[C_out]`` or None.
        stride, padding, dilation, output_padding: as in ``F.conv2d`` / ``F.conv_transpose2d``.

    Returns:
        ``Tensor[B, C_out, H_out, W_out]``; ``H_out`` follows the conv (or transposed conv) size formula.
    """
    stride, padding, dilation, output_padding = map(_pair, (stride, padding, dilation, output_padding))
    k = weight.shape[-1]
    if weight.shape[-2] != k or kernel.shape[-2:] != (k, k):
        raise ValueError(f"weight {tuple(weight.shape)} and kernel {tuple(kernel.shape)} must share a square k x k")
    if transposed:
        x, weight = zero_insert(x, stride), weight.transpose(0, 1).flip(-1, -2)
        pads = [dilation[a] * (k - 1) - padding[a] for a in (0, 1)]
        x = F.pad(x, (pads[1], pads[1] + output_padding[1], pads[0], pads[0] + output_padding[0]))
        stride = (1, 1)
    else:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {x.shape[1]} input channels")
    out_size = tuple((x.shape[2 + a] - dilation[a] * (k - 1) - 1) // stride[a] + 1 for a in (0, 1))
    if kernel.shape[:3] != (x.shape[0], *out_size):
        raise ValueError(f"kernel {tuple(kernel.shape)} must be (B, H_out, W_out, k, k) = ({x.shape[0]}, {out_size[0]}, {out_size[1]}, {k}, {k})")
    out = _PacConv.apply(x, kernel, weight, stride, dilation)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def zero_insert(x: Tensor, stride) -> Tensor:
    """``stride - 1`` zeros between pixels: the input of a transposed conv seen as a plain one."""
    sh, sw = stride
    if (sh, sw) == (1, 1):
        return x
    B, C, H, W = x.shape
    out = x.new_zeros(B, C, (H - 1) * sh + 1, (W - 1) * sw + 1)
    out[:, :, ::sh, ::sw] = x
    return out


def pac_conv_reference(x, kernel, weight, bias=None, stride=1, padding=0, dilation=1) -> Tensor:
    """The PAC sum by unfolding (C*k*k*H*W floats): tests only. Not transposed."""
    B, Ho, Wo, k, _ = kernel.shape
    cols = F.unfold(x, k, dilation=dilation, padding=padding, stride=stride).view(B, x.shape[1], k * k, Ho, Wo)
    cols = cols * kernel.reshape(B, Ho, Wo, k * k).permute(0, 3, 1, 2)[:, None]
    out = torch.einsum("ocT,bcThw->bohw", weight.reshape(weight.shape[0], weight.shape[1], k * k), cols)
    return out if bias is None else out + bias.view(1, -1, 1, 1)
