"""Pixel-adaptive convolution in the PAC form (Su et al., "Pixel-Adaptive Convolutional Neural Networks", CVPR 2019).

    out[b, o, h, w] = sum_c sum_ij weight[o, c, i, j] * kernel[b, h, w, i, j] * xpad[b, c, h*s + i*d, w*s + j*d] + bias[o]

``kernel`` is the adaptive part (one k x k kernel per output pixel, e.g. a Gaussian of guidance differences),
``weight`` the ordinary learned filter. The transposed variant is the same sum over the input with ``s - 1``
zeros inserted between pixels, padded by ``d * (k - 1) - padding`` (plus ``output_padding`` at the bottom/right),
with ``weight`` flipped and transposed, so ``kernel`` lives at the (larger) output resolution, as in PAC's
``PacConvTranspose2d``. Three registered ops (``torch.library.custom_op`` with a fake kernel and autograd; each
backward is a registered op too, ``upcli::*_backward``, so a traced graph holds one opaque call per pass):

- ``pac_conv``: the sum above (PAC's ``pacconv2d`` / ``pacconv_transpose2d``);
- ``pac_pool``: ``out[b, c, h, w] = sum_ij kernel[b, h, w, i, j] * xpad[b, c, tap (i, j)]``, every channel alike
  (PAC's ``pacpool2d``; also a shared-filter PAC layer, with ``kernel * weight`` as the kernel);
- ``pac_squared_distance``: the adapting kernel's input, ``D[b, h, w, i, j] = sum_c (gpad[b, c, tap (i, j)] -
  cpad[b, c, centre tap])^2`` (``relu`` of the difference with ``asym``), from guidance ``g`` and centre features
  ``c`` (``g`` itself, or ``g`` smoothed); ``K = exp(-D / 2)`` and the like are then plain torch.

``pac_tap_mask`` (no gradient, no op) says which taps land on real input samples: PAC's normalised kernel is
divided by its sum over those taps only.

Memory. PAC's release unfolds the input (``C * k * k * H_out * W_out`` floats: ~1 GB for one 640x480 layer with
C = 32, k = 5) and its kernel builder several tensors of that size. Here every op works one tap at a time: a tap's
strided view of the padded input, times its kernel slice (C*H*W floats), then one GEMM with ``weight[:, :, i, j]``
(``pac_conv``) or one accumulate (``pac_pool``, ``pac_squared_distance``). Nothing k*k times the size of the input
is ever made, autograd saves only the op's inputs, and the backward recomputes each tap's product.

Backends: plain PyTorch per tap on every device; ``pac_pool`` at stride 1 and dilation 1 (every transposed
``pac_pool``, stride being taken by the zero insertion) runs the fused ``adaptive_conv`` kernels (Triton on CUDA,
C++ on CPU). Zero padding, as PAC. ``*_reference``: unfold forms, obviously right and k*k times larger, for tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from .adaptive_conv import _backend, _no_double_backward, _prepare
from .reference import PAD_MODES

__all__ = ["pac_conv", "pac_pool", "pac_squared_distance", "pac_tap_mask", "pac_conv_reference",
           "pac_pool_reference", "pac_squared_distance_reference"]

_VALID = PAD_MODES["valid"]


# ---- references: unfold, C*k*k*H*W floats (tests only) ---------------------------------------------------------

def _unfold(x: Tensor, k: int, stride, padding, dilation, transposed: bool, output_padding) -> Tensor:
    """``Tensor[B, C, k * k, H_out, W_out]``: every tap of every output pixel (PAC's ``nd2col``)."""
    stride, padding, dilation, output_padding = map(_pair, (stride, padding, dilation, output_padding))
    if transposed:  # zeros inserted by a ones-kernel transposed conv, then the transposed padding (as PAC)
        C = x.shape[1]
        x = F.conv_transpose2d(x, x.new_ones(C, 1, 1, 1), stride=stride, groups=C)
        pads = [dilation[a] * (k - 1) - padding[a] for a in (0, 1)]
        x = F.pad(x, (pads[1], pads[1] + output_padding[1], pads[0], pads[0] + output_padding[0]))
        stride, padding = (1, 1), (0, 0)
    B, C, H, W = x.shape
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, s in zip((H, W), padding, dilation, stride)]
    return F.unfold(x, k, dilation=dilation, padding=padding, stride=stride).view(B, C, k * k, *out)


def pac_conv_reference(x, kernel, weight, bias=None, stride=1, padding=0, dilation=1, transposed: bool = False,
                       output_padding=0) -> Tensor:
    """``pac_conv`` by unfolding (C*k*k*H*W floats): tests only."""
    B, Ho, Wo, k, _ = kernel.shape
    if transposed:
        weight = weight.transpose(0, 1).flip(-1, -2)
    cols = _unfold(x, k, stride, padding, dilation, transposed, output_padding)
    cols = cols * kernel.reshape(B, Ho, Wo, k * k).permute(0, 3, 1, 2)[:, None]
    out = torch.einsum("ocT,bcThw->bohw", weight.reshape(weight.shape[0], weight.shape[1], k * k), cols)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def pac_pool_reference(x, kernel, stride=1, padding=0, dilation=1, transposed: bool = False,
                       output_padding=0) -> Tensor:
    """``pac_pool`` by unfolding: tests only."""
    B, Ho, Wo, k, _ = kernel.shape
    cols = _unfold(x, k, stride, padding, dilation, transposed, output_padding)
    return torch.einsum("bcThw,bhwT->bchw", cols, kernel.reshape(B, Ho, Wo, k * k))


def pac_squared_distance_reference(guidance, kernel_size: int, stride=1, padding=0, dilation=1, centre=None,
                                   asym: bool = False) -> Tensor:
    """``pac_squared_distance`` by unfolding (PAC's native kernel builder): tests only."""
    k = kernel_size
    cols = _unfold(guidance, k, stride, padding, dilation, False, 0)
    centres = _unfold(guidance if centre is None else centre, k, stride, padding, dilation, False, 0)
    d = cols - centres[:, :, k * k // 2: k * k // 2 + 1]
    if asym:
        d = F.relu(d)
    B, _, _, Ho, Wo = cols.shape
    return (d * d).sum(1).permute(0, 2, 3, 1).reshape(B, Ho, Wo, k, k)


# ---- the padded frame, one tap at a time ----------------------------------------------------------------------

def _taps(k: int):
    return ((i, j) for i in range(k) for j in range(k))


def _tap_view(xpad: Tensor, i: int, j: int, out_size, stride, dilation) -> Tensor:
    """``xpad[:, :, h*s + i*d, w*s + j*d]`` for every output (h, w): a strided view, no copy."""
    (Ho, Wo), (sh, sw), (dh, dw) = out_size, stride, dilation
    return xpad[:, :, i * dh: i * dh + sh * (Ho - 1) + 1: sh, j * dw: j * dw + sw * (Wo - 1) + 1: sw]


def _frame_pads(k: int, padding, dilation, transposed: bool, output_padding) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) from the (zero-inserted) input to the padded frame. Negative
    when a transposed conv's padding exceeds ``d * (k - 1)`` (F.pad then crops)."""
    if not transposed:
        return padding[1], padding[1], padding[0], padding[0]
    pads = [dilation[a] * (k - 1) - padding[a] for a in (0, 1)]
    return pads[1], pads[1] + output_padding[1], pads[0], pads[0] + output_padding[0]


def _padded(x: Tensor, k: int, stride, padding, dilation, transposed: bool, output_padding):
    """The padded frame and the tap stride in it: ``x`` padded, or zero-inserted and padded (tap stride 1)."""
    if transposed:
        sh, sw = stride
        if (sh, sw) != (1, 1):
            B, C, H, W = x.shape
            inserted = x.new_zeros(B, C, (H - 1) * sh + 1, (W - 1) * sw + 1)
            inserted[:, :, ::sh, ::sw] = x
            x = inserted
        stride = (1, 1)
    return F.pad(x, _frame_pads(k, padding, dilation, transposed, output_padding)), tuple(stride)


def _unpadded_grad(grad_xpad: Tensor, k: int, stride, padding, dilation, transposed: bool, output_padding) -> Tensor:
    """The adjoint of ``_padded``: the padded frame's gradient back on ``x`` (a view where it can be)."""
    grad = F.pad(grad_xpad, [-p for p in _frame_pads(k, padding, dilation, transposed, output_padding)])
    return grad[:, :, ::stride[0], ::stride[1]] if transposed else grad


def _out_size(padded_hw, k: int, stride, dilation) -> tuple[int, int]:
    return tuple((n - d * (k - 1) - 1) // s + 1 for n, d, s in zip(padded_hw, dilation, stride))


# ---- pac_conv ------------------------------------------------------------------------------------------------

def _conv_weight(weight: Tensor, transposed: bool) -> Tensor:
    """``Tensor[C_out, C_in, k, k]`` as a correlation over the padded frame."""
    return weight.transpose(0, 1).flip(-1, -2) if transposed else weight


@torch.library.custom_op("upcli::pac_conv", mutates_args=())
def _pac_conv(x: Tensor, kernel: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], transposed: bool, output_padding: Sequence[int]) -> Tensor:
    B, Ho, Wo, k, _ = kernel.shape
    xpad, tap_stride = _padded(x, k, stride, padding, dilation, transposed, output_padding)
    w = _conv_weight(weight, transposed)
    out = xpad.new_zeros(B, w.shape[0], Ho * Wo)
    for i, j in _taps(k):
        tap = _tap_view(xpad, i, j, (Ho, Wo), tap_stride, dilation) * kernel[:, None, :, :, i, j]
        out.baddbmm_(w[:, :, i, j].expand(B, -1, -1), tap.reshape(B, xpad.shape[1], Ho * Wo))
    return out.view(B, w.shape[0], Ho, Wo)


@_pac_conv.register_fake
def _(x, kernel, weight, stride, padding, dilation, transposed, output_padding):
    return x.new_empty(x.shape[0], weight.shape[1] if transposed else weight.shape[0], kernel.shape[1],
                       kernel.shape[2])


@torch.library.custom_op("upcli::pac_conv_backward", mutates_args=())
def _pac_conv_backward_op(grad_out: Tensor, x: Tensor, kernel: Tensor, weight: Tensor, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], transposed: bool,
                          output_padding: Sequence[int], output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``x``, ``kernel`` and ``weight`` (an empty tensor where ``output_mask`` is False), each
    tap's product recomputed."""
    B, Ho, Wo, k, _ = kernel.shape
    xpad, tap_stride = _padded(x, k, stride, padding, dilation, transposed, output_padding)
    w = _conv_weight(weight, transposed)
    C = xpad.shape[1]
    g = grad_out.reshape(B, grad_out.shape[1], Ho * Wo)
    need_x, need_kernel, need_weight = output_mask
    grad_xpad = torch.zeros_like(xpad) if need_x else None
    grad_kernel = torch.empty_like(kernel) if need_kernel else kernel.new_empty(0)
    grad_w = torch.empty_like(w) if need_weight else None
    for i, j in _taps(k):
        shifted = _tap_view(xpad, i, j, (Ho, Wo), tap_stride, dilation)
        k_ij = kernel[:, None, :, :, i, j]
        if need_weight:
            tap = (shifted * k_ij).reshape(B, C, Ho * Wo)
            grad_w[:, :, i, j] = torch.einsum("bop,bcp->oc", g, tap)
        if not (need_x or need_kernel):
            continue
        grad_tap = torch.matmul(w[:, :, i, j].T, g).view(B, C, Ho, Wo)
        if need_kernel:
            grad_kernel[..., i, j] = torch.einsum("bchw,bchw->bhw", grad_tap, shifted)
        if need_x:
            _tap_view(grad_xpad, i, j, (Ho, Wo), tap_stride, dilation).addcmul_(grad_tap, k_ij)
    grad_x = x.new_empty(0)
    if need_x:
        grad_x = _unpadded_grad(grad_xpad, k, stride, padding, dilation, transposed, output_padding).contiguous()
    grad_weight = weight.new_empty(0)
    if need_weight:
        grad_weight = (grad_w.flip(-1, -2).transpose(0, 1) if transposed else grad_w).contiguous()
    return grad_x, grad_kernel, grad_weight


@_pac_conv_backward_op.register_fake
def _(grad_out, x, kernel, weight, stride, padding, dilation, transposed, output_padding, output_mask):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((x, kernel, weight), output_mask))


def _pac_conv_setup(ctx, inputs, output):
    x, kernel, weight, *ctx.geometry = inputs
    ctx.save_for_backward(x, kernel, weight)  # the inputs only: every tap is recomputed in backward


def _pac_conv_backward(ctx, grad_out):
    _no_double_backward()
    mask = list(ctx.needs_input_grad[:3])
    grads = _pac_conv_backward_op(grad_out, *ctx.saved_tensors, *ctx.geometry, mask)
    return *(g if need else None for g, need in zip(grads, mask)), None, None, None, None, None


_pac_conv.register_autograd(_pac_conv_backward, setup_context=_pac_conv_setup)


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
        Gradients flow to ``x``, ``kernel``, ``weight`` and ``bias`` (no double backward).

    >>> x, w = torch.randn(1, 8, 16, 16), torch.randn(4, 8, 3, 3)
    >>> pac_conv(x, torch.ones(1, 8, 8, 3, 3), w, stride=2, padding=1).shape
    torch.Size([1, 4, 8, 8])
    """
    stride, padding, dilation, output_padding = map(_pair, (stride, padding, dilation, output_padding))
    k = weight.shape[-1]
    if weight.dim() != 4 or weight.shape[-2] != k or kernel.dim() != 5 or kernel.shape[-2:] != (k, k):
        raise ValueError(f"weight {tuple(weight.shape)} and kernel {tuple(kernel.shape)} must share a square k x k")
    c_in = weight.shape[0] if transposed else weight.shape[1]
    if x.dim() != 4 or c_in != x.shape[1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit x {tuple(x.shape)} ({c_in} input channels)")
    out_size = output_size(tuple(x.shape[-2:]), k, stride, padding, dilation, transposed, output_padding)
    if tuple(kernel.shape[:3]) != (x.shape[0], *out_size):
        raise ValueError(f"kernel {tuple(kernel.shape)} must be (B, H_out, W_out, k, k) = ({x.shape[0]}, "
                         f"{out_size[0]}, {out_size[1]}, {k}, {k})")
    out = _pac_conv(x, kernel, weight, stride, padding, dilation, transposed, output_padding)
    return out if bias is None else out + bias.view(1, -1, 1, 1)


def output_size(input_size, kernel_size: int, stride=1, padding=0, dilation=1, transposed: bool = False,
                output_padding=0) -> tuple[int, int]:
    """``(H_out, W_out)`` of a conv (``transposed``: a transposed conv) over an input of ``input_size``."""
    stride, padding, dilation, output_padding = map(_pair, (stride, padding, dilation, output_padding))
    k = kernel_size
    if transposed:
        return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1
                     for n, s, p, d, op in zip(input_size, stride, padding, dilation, output_padding))
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, s in zip(input_size, padding, dilation, stride))


# ---- pac_pool ------------------------------------------------------------------------------------------------

def _fused(k: int, tap_stride, dilation) -> bool:
    """The padded-frame sum is ``adaptive_conv(padding="valid")`` (its fused kernels)."""
    return tuple(tap_stride) == (1, 1) and tuple(dilation) == (1, 1) and k % 2 == 1


@torch.library.custom_op("upcli::pac_pool", mutates_args=())
def _pac_pool(x: Tensor, kernel: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
              transposed: bool, output_padding: Sequence[int]) -> Tensor:
    B, Ho, Wo, k, _ = kernel.shape
    xpad, tap_stride = _padded(x, k, stride, padding, dilation, transposed, output_padding)
    if _fused(k, tap_stride, dilation):
        impl = _backend("auto", x.device)
        return impl.adaptive_conv_forward(*_prepare(impl, xpad, kernel), _VALID).to(x.dtype)
    out = _tap_view(xpad, 0, 0, (Ho, Wo), tap_stride, dilation) * kernel[:, None, :, :, 0, 0]
    for i, j in list(_taps(k))[1:]:
        out += _tap_view(xpad, i, j, (Ho, Wo), tap_stride, dilation) * kernel[:, None, :, :, i, j]
    return out


@_pac_pool.register_fake
def _(x, kernel, stride, padding, dilation, transposed, output_padding):
    return x.new_empty(x.shape[0], x.shape[1], kernel.shape[1], kernel.shape[2])


@torch.library.custom_op("upcli::pac_pool_backward", mutates_args=())
def _pac_pool_backward_op(grad_out: Tensor, x: Tensor, kernel: Tensor, stride: Sequence[int], padding: Sequence[int],
                          dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                          output_mask: Sequence[bool]) -> tuple[Tensor, Tensor]:
    """The gradients of ``x`` and ``kernel`` (an empty tensor where ``output_mask`` is False)."""
    B, Ho, Wo, k, _ = kernel.shape
    xpad, tap_stride = _padded(x, k, stride, padding, dilation, transposed, output_padding)
    need_x, need_kernel = output_mask
    grad_xpad, grad_kernel = None, kernel.new_empty(0)
    if _fused(k, tap_stride, dilation):
        impl = _backend("auto", x.device)
        g, xc, w = _prepare(impl, grad_out, xpad, kernel)
        if need_x:
            grad_xpad = impl.adaptive_conv_grad_input_padded(g, w).to(x.dtype)
        if need_kernel:
            grad_kernel = impl.adaptive_conv_grad_weights(g, xc, _VALID, k).to(kernel.dtype)
    else:
        grad_xpad = torch.zeros_like(xpad) if need_x else None
        grad_kernel = torch.empty_like(kernel) if need_kernel else grad_kernel
        for i, j in reversed(list(_taps(k))):  # last tap first: the sums autograd made of the eager per-tap form
            if need_kernel:
                grad_kernel[..., i, j] = (grad_out * _tap_view(xpad, i, j, (Ho, Wo), tap_stride, dilation)).sum(1)
            if need_x:
                _tap_view(grad_xpad, i, j, (Ho, Wo), tap_stride, dilation).add_(grad_out * kernel[:, None, :, :, i, j])
    grad_x = x.new_empty(0)
    if need_x:
        grad_x = _unpadded_grad(grad_xpad, k, stride, padding, dilation, transposed, output_padding).contiguous()
    return grad_x, grad_kernel


@_pac_pool_backward_op.register_fake
def _(grad_out, x, kernel, stride, padding, dilation, transposed, output_padding, output_mask):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((x, kernel), output_mask))


def _pac_pool_setup(ctx, inputs, output):
    x, kernel, *ctx.geometry = inputs
    ctx.save_for_backward(x, kernel)


def _pac_pool_backward(ctx, grad_out):
    _no_double_backward()
    mask = list(ctx.needs_input_grad[:2])
    grads = _pac_pool_backward_op(grad_out, *ctx.saved_tensors, *ctx.geometry, mask)
    return *(g if need else None for g, need in zip(grads, mask)), None, None, None, None, None


_pac_pool.register_autograd(_pac_pool_backward, setup_context=_pac_pool_setup)


def pac_pool(x: Tensor, kernel: Tensor, stride=1, padding=0, dilation=1, transposed: bool = False,
             output_padding=0) -> Tensor:
    """Each channel's k x k taps weighted by the pixel's adaptive kernel and summed (PAC's ``pacpool2d``).

    ``pac_conv`` with one shared filter ``weight[0, 0]`` is ``pac_pool(x, kernel * weight[0, 0])`` (flipped,
    ``weight[0, 0].flip(-1, -2)``, when ``transposed``), at C_in times less work than a full filter bank.

    Args:
        x: ``Tensor[B, C, H, W]``.
        kernel: ``Tensor[B, H_out, W_out, k, k]``, cast to the dtype of ``x``.
        stride, padding, dilation, transposed, output_padding: as in ``pac_conv``.

    Returns:
        ``Tensor[B, C, H_out, W_out]``, with gradients to ``x`` and ``kernel``.
    """
    stride, padding, dilation, output_padding = map(_pair, (stride, padding, dilation, output_padding))
    if x.dim() != 4 or kernel.dim() != 5 or kernel.shape[-1] != kernel.shape[-2]:
        raise ValueError(f"expected x (B, C, H, W) and kernel (B, H_out, W_out, k, k), got {tuple(x.shape)} and "
                         f"{tuple(kernel.shape)}")
    k = kernel.shape[-1]
    out_size = output_size(tuple(x.shape[-2:]), k, stride, padding, dilation, transposed, output_padding)
    if tuple(kernel.shape[:3]) != (x.shape[0], *out_size):
        raise ValueError(f"kernel {tuple(kernel.shape)} must be (B, H_out, W_out, k, k) = ({x.shape[0]}, "
                         f"{out_size[0]}, {out_size[1]}, {k}, {k})")
    return _pac_pool(x, kernel.to(x.dtype), stride, padding, dilation, transposed, output_padding)


# ---- pac_squared_distance ------------------------------------------------------------------------------------

@torch.library.custom_op("upcli::pac_squared_distance", mutates_args=())
def _pac_squared_distance(guidance: Tensor, centre: Tensor | None, kernel_size: int, stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], asym: bool) -> Tensor:
    k = kernel_size
    gpad, _ = _padded(guidance, k, stride, padding, dilation, False, (0, 0))
    Ho, Wo = _out_size(gpad.shape[-2:], k, stride, dilation)
    cpad, _ = _padded(guidance if centre is None else centre, k, stride, padding, dilation, False, (0, 0))
    c = _tap_view(cpad, k // 2, k // 2, (Ho, Wo), stride, dilation)
    out = c.new_empty(guidance.shape[0], Ho, Wo, k, k)
    for i, j in _taps(k):
        d = _tap_view(gpad, i, j, (Ho, Wo), stride, dilation) - c
        if asym:
            d = d.clamp_min(0)
        out[..., i, j] = (d * d).sum(1)
    return out


@_pac_squared_distance.register_fake
def _(guidance, centre, kernel_size, stride, padding, dilation, asym):
    Ho, Wo = output_size(tuple(guidance.shape[-2:]), kernel_size, stride, padding, dilation)
    return guidance.new_empty(guidance.shape[0], Ho, Wo, kernel_size, kernel_size)


@torch.library.custom_op("upcli::pac_squared_distance_backward", mutates_args=())
def _pac_squared_distance_backward_op(grad: Tensor, guidance: Tensor, centre: Tensor | None, kernel_size: int,
                                      stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                                      asym: bool, output_mask: Sequence[bool]) -> tuple[Tensor, Tensor]:
    """The gradients of ``guidance`` and ``centre`` (an empty tensor where ``output_mask`` is False); without a
    ``centre`` the first holds both terms and the second is empty."""
    k = kernel_size
    gpad, _ = _padded(guidance, k, stride, padding, dilation, False, (0, 0))
    cpad, _ = _padded(guidance if centre is None else centre, k, stride, padding, dilation, False, (0, 0))
    B, Ho, Wo = grad.shape[:3]
    c = _tap_view(cpad, k // 2, k // 2, (Ho, Wo), stride, dilation)
    need_guidance = output_mask[0]
    need_centre = output_mask[1] if centre is not None else need_guidance
    grad_gpad = torch.zeros_like(gpad) if need_guidance else None
    grad_c = torch.zeros_like(c)
    for i, j in _taps(k):
        d = _tap_view(gpad, i, j, (Ho, Wo), stride, dilation) - c
        if asym:
            d = d.clamp_min(0)
        g = 2 * grad[:, None, :, :, i, j] * d
        grad_c -= g
        if grad_gpad is not None:
            _tap_view(grad_gpad, i, j, (Ho, Wo), stride, dilation).add_(g)
    geometry = (k, stride, padding, dilation, False, (0, 0))
    grad_guidance = _unpadded_grad(grad_gpad, *geometry) if need_guidance else guidance.new_empty(0)
    grad_centre = guidance.new_empty(0)
    if need_centre:
        grad_cpad = torch.zeros_like(cpad)
        _tap_view(grad_cpad, k // 2, k // 2, (Ho, Wo), stride, dilation).copy_(grad_c)
        grad_centre = _unpadded_grad(grad_cpad, *geometry)
    if centre is None:  # the centre is the guidance: both terms land on it
        return (grad_guidance + grad_centre if need_guidance else grad_guidance), guidance.new_empty(0)
    return grad_guidance.contiguous(), grad_centre.contiguous()


@_pac_squared_distance_backward_op.register_fake
def _(grad, guidance, centre, kernel_size, stride, padding, dilation, asym, output_mask):
    own_centre = centre is not None and output_mask[1]
    return (guidance.new_empty(guidance.shape if output_mask[0] else (0,)),
            guidance.new_empty(guidance.shape if own_centre else (0,)))


def _pac_squared_distance_setup(ctx, inputs, output):
    guidance, centre, *ctx.geometry = inputs
    ctx.save_for_backward(guidance, centre)


def _pac_squared_distance_backward(ctx, grad):
    _no_double_backward()
    mask = list(ctx.needs_input_grad[:2])
    grads = _pac_squared_distance_backward_op(grad, *ctx.saved_tensors, *ctx.geometry, mask)
    return *(g if need else None for g, need in zip(grads, mask)), None, None, None, None, None


_pac_squared_distance.register_autograd(_pac_squared_distance_backward, setup_context=_pac_squared_distance_setup)


def pac_squared_distance(guidance: Tensor, kernel_size: int, stride=1, padding=0, dilation=1,
                         centre: Tensor | None = None, asym: bool = False) -> Tensor:
    """Squared guidance distances between each output pixel's window centre and its k x k taps.

        D[b, h, w, i, j] = sum_c (gpad[b, c, h*s + i*d, w*s + j*d] - cpad[b, c, h*s + (k//2)*d, w*s + (k//2)*d])^2

    ``gpad`` and ``cpad`` are ``guidance`` and ``centre`` zero-padded by ``padding``; with ``asym`` the difference
    goes through ``relu`` first (neighbour minus centre, as PAC's ``inv_*_asym`` kernels). PAC's Gaussian kernel is
    ``exp(-D / 2)``.

    Args:
        guidance: ``Tensor[B, C, H, W]``.
        kernel_size: odd k.
        stride, padding, dilation: the conv's (for a transposed layer's output-resolution guidance: stride 1,
            padding ``d * (k - 1) // 2``).
        centre: ``Tensor[B, C, H, W]``, the centre features (e.g. smoothed guidance); None: ``guidance``.

    Returns:
        ``Tensor[B, H_out, W_out, k, k]``, with gradients to ``guidance`` and ``centre``.
    """
    stride, padding, dilation = map(_pair, (stride, padding, dilation))
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if guidance.dim() != 4 or (centre is not None and centre.shape != guidance.shape):
        raise ValueError(f"expected guidance (B, C, H, W) and a centre of the same shape, got "
                         f"{tuple(guidance.shape)} and {None if centre is None else tuple(centre.shape)}")
    return _pac_squared_distance(guidance, centre, kernel_size, stride, padding, dilation, asym)


# ---- which taps are real input ---------------------------------------------------------------------------------

def pac_tap_mask(input_size, kernel_size: int, stride=1, padding=0, dilation=1, transposed: bool = False,
                 output_padding=0, *, device=None, dtype=None) -> Tensor:
    """``Tensor[H_out, W_out, k, k]``: 1 where tap ``(i, j)`` of output pixel ``(h, w)`` lands on a real input
    sample, 0 where it lands in the zero padding (or, ``transposed``, on an inserted zero): PAC's ``mask_pattern``,
    the taps a normalised kernel is normalised over."""
    stride, padding, dilation, output_padding = map(_pair, (stride, padding, dilation, output_padding))
    k = kernel_size
    ones, tap_stride = _padded(torch.ones(1, 1, *input_size, device=device, dtype=dtype), k, stride, padding,
                               dilation, transposed, output_padding)
    out_size = _out_size(ones.shape[-2:], k, tap_stride, dilation)
    taps = [_tap_view(ones, i, j, out_size, tap_stride, dilation)[0, 0] for i, j in _taps(k)]
    return torch.stack(taps, -1).view(*out_size, k, k)
