"""Cross-scale neighbourhood attention: each output pixel attends to the k x k feature cells around it.

    logits[b, n, y, x, i, j] = scale * <query[b, n, :, y, x], key[b, n, :, sy + i, sx + j]>
    p = softmax over the k * k taps (i, j)
    out[b, c, y, x] = mean over heads n of sum_ij p[b, n, y, x, i, j] * value[b, c, sy + i, sx + j]

``query`` lives at the output resolution (H, W), ``key`` and ``value`` on the feature grid (h, w). Output pixel
``y`` sits at grid position ``(y + 0.5) * h / H - 0.5``; its centre cell is ``cy = min(floor((y + 0.5) * h / H),
h - 1)`` and its window the k cells from ``sy = clamp(cy - k // 2, 0, h - k)`` (likewise x): at the borders the
window is shifted, never padded, so every tap is a real cell. Any H, W (also H < h); ``1 <= k <= min(h, w)``.

Computation. ``neighbourhood_attention`` is a registered op (``upcli::neighbourhood_attention``,
``torch.library.custom_op`` with a fake kernel and autograd; its backward is the registered op
``upcli::neighbourhood_attention_backward``). The output pixels whose centre cell is the same share one window, so
the op is a batch of small dense matrix products (BLAS on the CPU): per cell, its pixels' queries times the
window's keys, a softmax, heads averaged, times the window's values. A few cell rows at a time, so the largest
temporaries are ``heads * k * k`` or ``C`` floats per pixel of those rows. Autograd saves only the inputs; the
backward recomputes the probabilities block by block. Nothing of size ``C * k * k * H * W`` is ever made. Half
types are computed in float32.

Backends (``backend=``):
* ``blocked``: the products above, forward and backward, on any device;
* ``cpp``: C++ kernels on the CPU, compiled at first use (``csrc/neighbourhood_attention_cpu.cpp``): per output
  row, segments of pixels that share a window, loops vectorised over those pixels; forward and backward (which
  recomputes the probabilities), nothing per tap kept beyond one segment;
* ``triton``: a fused forward kernel (``_triton_attention.py``: an online softmax over the taps, nothing per tap
  stored) on CUDA or under ``TRITON_INTERPRET=1``; its backward is the blocked form;
* ``auto`` (default): Triton's forward on CUDA when Triton is there, the C++ kernels on the CPU when they build,
  else ``blocked``.

``neighbourhood_attention_reference`` gathers the k * k keys and values (``C * k * k * H * W`` floats): easy to
read, for tests.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["BACKENDS", "neighbourhood_attention", "neighbourhood_attention_reference"]

BACKENDS = ("auto", "blocked", "cpp", "triton")


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
    heads, d, H, W = query.shape[1:]
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


# ---- the registered op: blocked GEMMs ---------------------------------------------------------------------------
#
# Output pixels whose centre cell is the same share one k x k window, so the op is a batch of small dense products:
# for the pixels of cell (a, b), logits = Q [N, d] @ K_win [k*k, d]^T per head, p = softmax, heads averaged, out =
# p [N, k*k] @ V_win [k*k, C]. Cells get floor or ceil of H / h rows (likewise columns); each cell's pixel block is
# padded to the largest (the padding repeats a real pixel and is masked out of every gradient). Blocks of cell
# rows are processed a few at a time, so temporaries stay near ``_BLOCK_ELEMENTS`` floats.

_HALF = (torch.float16, torch.bfloat16)
_BLOCK_ELEMENTS = 1 << 23


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _HALF or not dtype.is_floating_point else dtype


class _Cells:
    """How the ``n_out`` output positions of one axis group into the ``n_in`` cells of the grid."""

    def __init__(self, n_out: int, n_in: int, k: int, device):
        pos = torch.arange(n_out, device=device)
        centre = ((2 * pos + 1) * n_in).div(2 * n_out, rounding_mode="floor").clamp(max=n_in - 1)
        counts = torch.bincount(centre, minlength=n_in)
        first = torch.cumsum(counts, 0) - counts
        self.size = max(int(counts.max()), 1)  # pixels per cell after padding
        self.uniform = n_out == n_in * self.size  # every cell has `size` pixels: blocks are views, no gathers
        slot = torch.arange(self.size, device=device)
        self.members = first[:, None] + torch.minimum(slot, (counts - 1).clamp(min=0)[:, None])  # [n_in, size]
        self.members.clamp_(max=n_out - 1)
        self.valid = slot < counts[:, None]  # [n_in, size]
        self.position = centre * self.size + pos - first[centre]  # [n_out]: each position's place, cells padded
        self.first = torch.cat([first, first.new_tensor([n_out])])  # cell c owns positions first[c]:first[c + 1]
        self.taps = (centre.new_tensor(range(n_in)) - k // 2).clamp(0, n_in - k)[:, None] + torch.arange(k, device=device)


def _windows(t: Tensor, rows: _Cells, cols: _Cells) -> Tensor:
    """``t [B, ..., h, w]`` -> ``[B, h, w, ..., k*k]``: each cell's window of grid cells."""
    win = t[..., rows.taps[:, None, :, None], cols.taps[None, :, None, :]]  # [B, ..., h, w, k, k]
    lead = t.dim() - 3
    return win.flatten(-2).permute(0, lead + 1, lead + 2, *range(1, lead + 1), lead + 3)


def _blocks(t: Tensor, rows: _Cells, cols: _Cells, a0: int, a1: int) -> Tensor:
    """Pixel-major ``t [B, H, W, *F]`` -> ``[B, a1 - a0, w, N, *F]``: the pixels of cell rows a0:a1, by cell."""
    x = t[:, a0 * rows.size:a1 * rows.size] if rows.uniform else t.index_select(1, rows.members[a0:a1].flatten())
    if not cols.uniform:
        x = x.index_select(2, cols.members.flatten())
    x = x.unflatten(2, (-1, cols.size)).unflatten(1, (-1, rows.size))  # [B, A, R, w, S, *F]
    return x.transpose(2, 3).flatten(3, 4)


def _unblock(g: Tensor, rows: _Cells, cols: _Cells, a0: int, a1: int) -> Tensor:
    """Inverse of ``_blocks`` on the real pixels: ``[B, A, w, N, *F]`` -> ``[B, rows of cells a0:a1, W, *F]``."""
    x = g.unflatten(3, (rows.size, cols.size)).transpose(2, 3).flatten(3, 4).flatten(1, 2)  # [B, A*R, w*S, *F]
    if not rows.uniform:
        y = slice(int(rows.first[a0]), int(rows.first[a1]))
        x = x.index_select(1, rows.position[y] - a0 * rows.size)
    return x if cols.uniform else x.index_select(2, cols.position)


def _cell_rows_per_block(B: int, w: int, n: int, width: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, B * w * n * width))


def _attention(qb: Tensor, kw: Tensor, scale: float) -> Tensor:
    """Per-head probabilities ``[B, A, w, heads, N, k*k]`` from query blocks ``[B, A, w, heads, N, d]`` and key
    windows ``[B, A, w, heads, d, k*k]``."""
    return torch.softmax(torch.matmul(qb, kw) * scale, dim=-1)


def _pixel_major(t: Tensor, rows: _Cells, cols: _Cells) -> Tensor:
    """``[B, *F, H, W]`` -> ``[B, H, W, *F]`` (a copy only where the blocks are gathered)."""
    t = t.movedim((-2, -1), (1, 2))
    return t if rows.uniform and cols.uniform else t.contiguous()


def _uses_cpp(backend: str, value: Tensor) -> bool:
    """Whether the C++ kernels run (CPU tensors; ``auto``: when they build)."""
    if backend not in ("auto", "cpp") or value.device.type != "cpu":
        if backend == "cpp":
            raise RuntimeError(f"upcli.kernels: the cpp backend runs on the CPU, got tensors on {value.device}")
        return False
    from . import _cpu

    if backend == "cpp" and not _cpu.available():
        raise RuntimeError(f"upcli.kernels: the cpp backend is not available ({_cpu.unavailable_reason()})")
    return _cpu.available()


def _uses_triton(backend: str, value: Tensor) -> bool:
    """Whether the forward runs the Triton kernel (float32 and half types; ``auto``: on CUDA only)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend in ("blocked", "cpp") or (backend == "auto" and value.dtype not in (torch.float32, *_HALF)):
        return False
    from . import _triton_attention

    device = value.device
    if _triton_attention.available(device) and (backend == "triton" or device.type == "cuda"):
        return True
    if backend == "triton":
        raise RuntimeError(f"upcli.kernels: the Triton backend is not available on {device}")
    return False


@torch.library.custom_op("upcli::neighbourhood_attention", mutates_args=())
def _neighbourhood_attention(query: Tensor, key: Tensor, value: Tensor, k: int, scale: float,
                             backend: str) -> Tensor:
    if _uses_triton(backend, value):
        from ._triton_attention import neighbourhood_attention_forward

        return neighbourhood_attention_forward(query, key, value, k, scale)
    dtype = _compute_dtype(query, key, value)
    q, kk, v = (t.to(dtype) for t in (query, key, value))
    if _uses_cpp(backend, value):
        from ._cpu import neighbourhood_attention_forward

        return neighbourhood_attention_forward(q.contiguous(), kk.contiguous(), v.contiguous(), k, scale).to(value.dtype)
    (B, heads, d, H, W), (h, w) = q.shape, kk.shape[3:]
    rows, cols = _Cells(H, h, k, q.device), _Cells(W, w, k, q.device)
    kw = _windows(kk, rows, cols)  # [B, h, w, heads, d, kk]
    vw = _windows(v, rows, cols).transpose(-1, -2)  # [B, h, w, kk, C]
    q = _pixel_major(q, rows, cols)  # [B, H, W, heads, d]
    out = v.new_empty(B, v.shape[1], H, W)
    n = rows.size * cols.size
    step = _cell_rows_per_block(B, w, n, max(heads * k * k, v.shape[1], heads * d))
    for a0 in range(0, h, step):
        a1 = min(h, a0 + step)
        qb = _blocks(q, rows, cols, a0, a1).transpose(3, 4)  # [B, A, w, heads, N, d]
        p = _attention(qb, kw[:, a0:a1], scale).mean(3)  # [B, A, w, N, kk]
        o = torch.matmul(p, vw[:, a0:a1])  # [B, A, w, N, C]
        out[:, :, rows.first[a0]:rows.first[a1]] = _unblock(o, rows, cols, a0, a1).permute(0, 3, 1, 2)
    return out.to(value.dtype)


@_neighbourhood_attention.register_fake
def _(query, key, value, k, scale, backend):
    return value.new_empty(value.shape[0], value.shape[1], query.shape[3], query.shape[4])


def _scatter_windows(grad_w: Tensor, rows: _Cells, cols: _Cells, shape) -> Tensor:
    """Inverse of ``_windows`` for gradients: ``[B, h, w, ..., k*k]`` summed back into ``shape [B, ..., h, w]``."""
    B, h, w = grad_w.shape[:3]
    mid = grad_w.shape[3:-1]
    k = rows.taps.shape[1]
    flat = (rows.taps[:, None, :, None] * w + cols.taps[None, :, None, :]).reshape(-1)  # [h * w * k * k]
    src = grad_w.unflatten(-1, (k, k)).movedim((-2, -1), (3, 4)).reshape(B, -1, *mid)  # [B, h*w*k*k, ...]
    acc = grad_w.new_zeros(B, h * w, *mid).index_add_(1, flat, src)
    return acc.movedim(1, -1).reshape(shape).contiguous()


@torch.library.custom_op("upcli::neighbourhood_attention_backward", mutates_args=())
def _neighbourhood_attention_backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, k: int,
                                         scale: float, output_mask: list[bool],
                                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``query``, ``key`` and ``value`` (an empty tensor where ``output_mask`` is False), the
    probabilities recomputed block by block (C++: segment by segment)."""
    need_q, need_k, need_v = output_mask
    dtype = _compute_dtype(grad_out, query, key, value)
    g, q, kk, v = (t.to(dtype) for t in (grad_out, query, key, value))
    if _uses_cpp(backend, value):
        from ._cpu import neighbourhood_attention_backward

        grads = neighbourhood_attention_backward(*(t.contiguous() for t in (g, q, kk, v)), k, scale)
        return tuple(grad.to(t.dtype) if need else t.new_empty(0)
                     for grad, t, need in zip(grads, (query, key, value), output_mask))
    (B, heads, d, H, W), (h, w) = q.shape, kk.shape[3:]
    rows, cols = _Cells(H, h, k, q.device), _Cells(W, w, k, q.device)
    kw = _windows(kk, rows, cols)  # [B, h, w, heads, d, kk]
    vw = _windows(v, rows, cols).transpose(-1, -2)  # [B, h, w, kk, C]
    grad_q = torch.empty_like(q) if need_q else None
    grad_kw = torch.zeros_like(kw) if need_k else None
    grad_vw = torch.zeros_like(vw) if need_v else None
    q, g = _pixel_major(q, rows, cols), _pixel_major(g, rows, cols)  # [B, H, W, heads, d], [B, H, W, C]
    n = rows.size * cols.size
    step = _cell_rows_per_block(B, w, n, max(heads * k * k, v.shape[1], heads * d))
    for a0 in range(0, h, step):
        a1 = min(h, a0 + step)
        qb = _blocks(q, rows, cols, a0, a1).transpose(3, 4)  # [B, A, w, heads, N, d]
        p_heads = _attention(qb, kw[:, a0:a1], scale)  # [B, A, w, heads, N, kk]
        valid = (rows.valid[a0:a1, :, None, None] & cols.valid[None, None]).transpose(1, 2).flatten(2)  # [A, w, N]
        gb = _blocks(g, rows, cols, a0, a1) * valid[..., None]  # [B, A, w, N, C], padding zeroed
        if need_v:
            grad_vw[:, a0:a1] = torch.matmul(p_heads.mean(3).transpose(-1, -2), gb)  # [B, A, w, kk, C]
        if need_q or need_k:
            dp = (torch.matmul(gb, vw[:, a0:a1].transpose(-1, -2)) / heads).unsqueeze(3)  # [B, A, w, 1, N, kk]
            dl = p_heads * (dp - (p_heads * dp).sum(-1, keepdim=True)) * scale  # [B, A, w, heads, N, kk]
            if need_q:
                gq = torch.matmul(dl, kw[:, a0:a1].transpose(-1, -2)).transpose(3, 4)  # [B, A, w, N, heads, d]
                grad_q[..., rows.first[a0]:rows.first[a1], :] = _unblock(gq, rows, cols, a0, a1).permute(0, 3, 4, 1, 2)
            if need_k:
                grad_kw[:, a0:a1] = torch.matmul(qb.transpose(-1, -2), dl)  # [B, A, w, heads, d, kk]
    grad_k = _scatter_windows(grad_kw, rows, cols, kk.shape) if need_k else None
    grad_v = _scatter_windows(grad_vw.transpose(-1, -2), rows, cols, v.shape) if need_v else None
    return tuple(grad.to(t.dtype) if need else t.new_empty(0)
                 for grad, t, need in zip((grad_q, grad_k, grad_v), (query, key, value), output_mask))


@_neighbourhood_attention_backward_op.register_fake
def _(grad_out, query, key, value, k, scale, output_mask, backend):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((query, key, value), output_mask))


def _setup(ctx, inputs, output):
    query, key, value, ctx.k, ctx.scale, ctx.backend = inputs
    ctx.save_for_backward(query, key, value)  # the inputs only: every tap is recomputed in backward


def _backward(ctx, grad_out):
    if torch.is_grad_enabled():
        raise RuntimeError("upcli.kernels: double backward is not supported")
    mask = list(ctx.needs_input_grad[:3])
    grads = _neighbourhood_attention_backward_op(grad_out, *ctx.saved_tensors, ctx.k, ctx.scale, mask, ctx.backend)
    return *(g if need else None for g, need in zip(grads, mask)), None, None, None


_neighbourhood_attention.register_autograd(_backward, setup_context=_setup)


def neighbourhood_attention(query: Tensor, key: Tensor, value: Tensor, k: int, scale: float | None = None,
                            backend: str = "auto") -> Tensor:
    """Cross-scale neighbourhood attention (see the module docstring).

    Args:
        query: ``Tensor[B, heads, d, H, W]`` at the output resolution.
        key: ``Tensor[B, heads, d, h, w]`` on the feature grid.
        value: ``Tensor[B, C, h, w]``.
        k: the window size, ``1 <= k <= min(h, w)``.
        scale: the logits' factor, ``1 / sqrt(d)`` by default.
        backend: ``auto``, ``blocked``, ``cpp`` or ``triton`` (see the module docstring).

    Returns:
        ``Tensor[B, C, H, W]`` in the dtype and on the device of ``value``.
    """
    _check(query, key, value, k)
    scale = 1 / math.sqrt(query.shape[2]) if scale is None else float(scale)
    return _neighbourhood_attention(query, key, value, int(k), scale, backend)
