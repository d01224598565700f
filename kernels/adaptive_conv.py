"""Pixel-adaptive convolution: every output pixel has its own k x k weights, shared by all channels.

    out[b, c, h, w] = sum_ij weights[b, h, w, i, j] * xpad[b, c, h + i, w + j]

``xpad`` is ``x`` padded by ``k // 2`` (reflect, replicate or zeros; ``valid`` means ``x`` comes padded).
This one op is the inner loop of JBU, PAC and bilateral upsampling. Its memory traffic is one read of ``x``
and one write of ``out`` (the weights are C times smaller), so a fused kernel runs at memory speed, where
unfolding materialises C*k*k*H*W floats and eager shift-and-accumulate reads and writes ``out`` k*k times.

Backends, chosen by device at run time (``backend="auto"``):
- ``triton``: CUDA (and the Triton interpreter under ``TRITON_INTERPRET=1``);
- ``cpu``: a C++/OpenMP kernel compiled at first use and cached (``_cpu.py``); without a compiler, one
  warning and the fallback;
- ``reference``: shift-and-accumulate in plain PyTorch (``reference.py``), any device and dtype.

Each backend provides three functions, all in the "padded" frame: ``adaptive_conv_forward``,
``adaptive_conv_grad_input_padded`` and ``adaptive_conv_grad_weights``. ``neighbour_logits`` (the JBU range
kernel) is built from the same three.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from . import reference
from .reference import PAD_MODES, fold_padding_grad

BACKENDS = ("auto", "triton", "cpu", "reference")
_HALF = (torch.float16, torch.bfloat16)


def _backend(name: str, device: torch.device) -> ModuleType:
    """The module that computes on ``device``; ``auto`` takes the fastest available."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name in ("auto", "triton"):
        from . import _triton

        if _triton.available(device) and (name == "triton" or device.type == "cuda"):
            return _triton
        if name == "triton":
            raise RuntimeError(f"upcli.kernels: the Triton backend is not available on {device}")
    if name in ("auto", "cpu") and device.type == "cpu":
        from . import _cpu

        if _cpu.available():
            return _cpu
    if name == "cpu":
        raise RuntimeError(f"upcli.kernels: the C++ CPU backend is not available on {device}")
    return reference


def _compute_dtype(impl: ModuleType, dtype: torch.dtype) -> torch.dtype:
    """Half types are computed in float32, except by Triton, which loads them and accumulates in float32."""
    if dtype in _HALF and impl.__name__.endswith("_triton"):
        return dtype
    return torch.float32 if dtype in _HALF else dtype


def _prepare(impl: ModuleType, *tensors: Tensor) -> list[Tensor]:
    dtype = _compute_dtype(impl, tensors[0].dtype)
    return [t.to(dtype).contiguous() for t in tensors]


def _no_double_backward() -> None:
    if torch.is_grad_enabled():
        raise RuntimeError("upcli.kernels: double backward is not supported")


# ---- adaptive_conv -------------------------------------------------------------------------------------------

@torch.library.custom_op("upcli::adaptive_conv", mutates_args=())
def _adaptive_conv(x: Tensor, weights: Tensor, pad_mode: int, backend: str) -> Tensor:
    impl = _backend(backend, x.device)
    return impl.adaptive_conv_forward(*_prepare(impl, x, weights), pad_mode).to(x.dtype)


@_adaptive_conv.register_fake
def _(x, weights, pad_mode, backend):
    return x.new_empty(x.shape[0], x.shape[1], weights.shape[1], weights.shape[2])


def _adaptive_conv_setup(ctx, inputs, output):
    x, weights, ctx.pad_mode, ctx.backend = inputs
    ctx.save_for_backward(x, weights)


def _adaptive_conv_backward(ctx, grad_out):
    _no_double_backward()
    x, weights = ctx.saved_tensors
    impl = _backend(ctx.backend, x.device)
    g, xc, w = _prepare(impl, grad_out, x, weights)
    k = weights.shape[-1]
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_xpad = impl.adaptive_conv_grad_input_padded(g, w)
        grad_x = fold_padding_grad(grad_xpad, x.shape, k // 2, ctx.pad_mode).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = impl.adaptive_conv_grad_weights(g, xc, ctx.pad_mode, k).to(weights.dtype)
    return grad_x, grad_w, None, None


_adaptive_conv.register_autograd(_adaptive_conv_backward, setup_context=_adaptive_conv_setup)


def adaptive_conv(x: Tensor, weights: Tensor, padding: str = "reflect", backend: str = "auto") -> Tensor:
    """Convolve each pixel's k x k neighbourhood with that pixel's own weights.

    Args:
        x: ``Tensor[B, C, H, W]`` (``Tensor[B, C, H + k - 1, W + k - 1]`` with ``padding="valid"``).
        weights: ``Tensor[B, H, W, k, k]``, k odd.
        padding: ``"reflect"``, ``"replicate"``, ``"zeros"`` or ``"valid"``.
        backend: ``"auto"`` (by device), ``"triton"``, ``"cpu"`` or ``"reference"``.

    Returns:
        ``Tensor[B, C, H, W]`` in the dtype of ``x``; gradients flow to ``x`` and ``weights``.

    >>> x, w = torch.randn(1, 384, 56, 56), torch.softmax(torch.randn(1, 56, 56, 49), -1).view(1, 56, 56, 7, 7)
    >>> adaptive_conv(x, w).shape
    torch.Size([1, 384, 56, 56])
    """
    if x.device != weights.device:
        raise ValueError(f"x is on {x.device}, weights on {weights.device}")
    return _adaptive_conv(x, weights, _check(tuple(x.shape), tuple(weights.shape), padding), backend)


def bicubic_taps(in_len: int, out_len: int, device=None) -> tuple[Tensor, Tensor]:
    """The 4 taps of torch's bicubic resize (``align_corners=False``, A = -0.75) per output position: the first
    input index ``int64 [out_len]`` in ``[-2, in_len - 2]`` (taps ``first .. first + 3``; torch clamps them to
    ``[0, in_len)``) and the weights ``float64 [out_len, 4]``."""
    src = (torch.arange(out_len, dtype=torch.float64, device=device) + 0.5) * (in_len / out_len) - 0.5
    first = src.floor()
    t = (src - first)[:, None]
    d = torch.cat([t + 1, t, 1 - t, 2 - t], dim=1)  # distance of each tap
    a = -0.75
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return first.long() - 1, torch.where(d <= 1, near, far)


def adaptive_conv_bicubic(x: Tensor, weights: Tensor, padding: str = "reflect", backend: str = "auto",
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """``adaptive_conv`` of ``x`` resized (bicubic) to the weights' size: a JBU stage's whole inner step.

    Equals ``adaptive_conv(F.interpolate(x, size=(H, W), mode="bicubic"), weights, padding).to(out_dtype)``. On the
    C++ CPU path, when no gradient is needed, the resized rows are made inside the kernel and never stored: that
    saves torch's bicubic pass and a tensor (H W) / (h w) times the size of ``x``; a float16 or bfloat16
    ``out_dtype`` is rounded to there too, so no float32 output is made (half the bytes to allocate and write, and
    no second pass). Elsewhere (CUDA, autograd) it is that composition.

    Args:
        x: ``Tensor[B, C, h, w]``.
        weights: ``Tensor[B, H, W, k, k]``, k odd.
        padding: ``"reflect"``, ``"replicate"`` or ``"zeros"``, at the resized size.
        out_dtype: the output's dtype (default: ``x``'s).
    """
    if x.dim() != 4 or weights.dim() != 5:
        raise ValueError(f"expected x (B, C, h, w) and weights (B, H, W, k, k), got {tuple(x.shape)} and "
                         f"{tuple(weights.shape)}")
    if padding == "valid":
        raise ValueError("adaptive_conv_bicubic pads the resized input itself: use reflect, replicate or zeros")
    size = tuple(weights.shape[1:3])
    pad_mode = _check((x.shape[0], x.shape[1], *size), tuple(weights.shape), padding)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad)
    if x.device == weights.device and x.device.type == "cpu" and not needs_grad and backend in ("auto", "cpu"):
        impl = _backend(backend, x.device)
        if impl.__name__.endswith("_cpu") and min(x.shape[2:]) > 0:
            rows, cols = bicubic_taps(x.shape[2], size[0]), bicubic_taps(x.shape[3], size[1])
            x_c, weights_c = _prepare(impl, x, weights)
            fused = out_dtype if x_c.dtype == torch.float32 and out_dtype in (torch.float16, torch.bfloat16) else None
            out = impl.adaptive_conv_forward_resampled(x_c, weights_c, pad_mode, rows, cols, fused)
            return out.to(out_dtype or x.dtype)
    resized = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return adaptive_conv(resized, weights, padding, backend).to(out_dtype or x.dtype)


def _check(x_shape: tuple, w_shape: tuple, padding: str) -> int:
    """The pad mode for these shapes, or a ValueError that prints what was got."""
    if padding not in PAD_MODES:
        raise ValueError(f"padding must be one of {tuple(PAD_MODES)}, got {padding!r}")
    if len(x_shape) != 4 or len(w_shape) != 5:
        raise ValueError(f"expected x (B, C, H, W) and weights (B, H, W, k, k), got {x_shape} and {w_shape}")
    B, H, W, k, k2 = w_shape
    if k != k2 or k % 2 == 0:
        raise ValueError(f"weights must be (B, H, W, k, k) with k odd, got {w_shape}")
    extra = k - 1 if padding == "valid" else 0
    if x_shape[0] != B or x_shape[2:] != (H + extra, W + extra):
        raise ValueError(f"x {x_shape} does not match weights {w_shape} with padding={padding!r}")
    if padding == "reflect" and (k // 2 >= H or k // 2 >= W):
        raise ValueError(f"reflect padding needs H and W > k // 2 = {k // 2}, got {H}x{W}")
    return PAD_MODES[padding]


# ---- neighbour_logits ----------------------------------------------------------------------------------------

@torch.library.custom_op("upcli::neighbour_logits", mutates_args=())
def _neighbour_logits(keys: Tensor, k: int, pad_mode: int, backend: str) -> Tensor:
    impl = _backend(backend, keys.device)
    (keys_c,) = _prepare(impl, keys)
    return impl.adaptive_conv_grad_weights(keys_c, keys_c, pad_mode, k).to(keys.dtype)


@_neighbour_logits.register_fake
def _(keys, k, pad_mode, backend):
    return keys.new_empty(keys.shape[0], keys.shape[2], keys.shape[3], k, k)


def _neighbour_setup(ctx, inputs, output):
    keys, ctx.k, ctx.pad_mode, ctx.backend = inputs
    ctx.save_for_backward(keys)


def _neighbour_backward(ctx, grad_logits):
    # logits[h, w, i, j] = <keys[:, h, w], keys_pad[:, h + i, w + j]>: the centre term is an adaptive conv of the
    # keys with the logit gradients as weights, the neighbour term its input gradient, folded back.
    _no_double_backward()
    (keys,) = ctx.saved_tensors
    impl = _backend(ctx.backend, keys.device)
    kc, g = _prepare(impl, keys, grad_logits)
    centre = impl.adaptive_conv_forward(kc, g, ctx.pad_mode)
    neighbours = fold_padding_grad(impl.adaptive_conv_grad_input_padded(kc, g), keys.shape, ctx.k // 2, ctx.pad_mode)
    return (centre + neighbours).to(keys.dtype), None, None, None


_neighbour_logits.register_autograd(_neighbour_backward, setup_context=_neighbour_setup)


def neighbour_logits(keys: Tensor, kernel_size: int, padding: str = "reflect", backend: str = "auto") -> Tensor:
    """Dot products of each pixel's key with its k x k neighbours' keys (the JBU range kernel).

    Args:
        keys: ``Tensor[B, D, H, W]``.
        kernel_size: odd k.
        padding: how neighbours outside the map are formed: ``"reflect"``, ``"replicate"`` or ``"zeros"``.

    Returns:
        ``Tensor[B, k * k, H, W]`` (a view; tap ``i * k + j`` is the neighbour at offset ``(i - k // 2, j - k // 2)``),
        computed without unfolding the keys, with gradients.
    """
    if padding == "valid":
        raise ValueError("neighbour_logits pads the keys itself: use reflect, replicate or zeros")
    B, D, H, W = keys.shape
    mode = _check(tuple(keys.shape), (B, H, W, kernel_size, kernel_size), padding)
    logits = _neighbour_logits(keys, kernel_size, mode, backend)
    return logits.view(B, H, W, kernel_size * kernel_size).permute(0, 3, 1, 2)

