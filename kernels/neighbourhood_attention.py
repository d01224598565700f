"""Cross-scale neighbourhood attention: each output pixel attends to the k x k feature cells around it.

    logits[b, n, y, x, i, j] = scale * <query[b, n, :, y, x], key[b, n, :, sy + i, sx + j]>
    p = softmax over the k * k taps (i, j)
    out[b, c, y, x] = mean over heads n of sum_ij p[b, n, y, x, i, j] * value[b, c, sy + i, sx + j]

``query`` lives at the output resolution (H, W), ``key`` and ``value`` on the feature grid (h, w). Output pixel
``y`` sits at grid position ``(y + 0.5) * h / H - 0.5``; its centre cell is ``cy = min(floor((y + 0.5) * h / H),
h - 1)`` and its window the k cells from ``sy = clamp(cy - k // 2, 0, h - k)`` (likewise x): at the borders the
window is shifted, never padded, so every tap is a real cell. Any H, W (also H < h); ``1 <= k <= min(h, w)``.

Memory. ``neighbourhood_attention`` is a registered op (``upcli::neighbourhood_attention``, ``torch.library.custom_op``
with a fake kernel and autograd; its backward is the registered op ``upcli::neighbourhood_attention_backward``). It
loops over the k * k taps: per tap it gathers that tap's key and value cells with index tensors (``sy + i`` for the
rows, ``sx + j`` for the columns), so the largest temporaries are one tap's keys (``heads * d * H * W``) and values
(``C * H * W``). The forward takes two passes over the taps: the per-pixel logsumexp of the logits (an online
max/sum), then the probabilities times the values. Autograd saves only the inputs; the backward recomputes every
tap (one pass for the logsumexp and ``sum_ij p dp``, one for the gradients, scattered back with ``index_add_``).
Nothing of size ``C * k * k * H * W`` is ever made. Half types are computed in float32. CPU and CUDA run the PyTorch
tap loop; fused C++/Triton paths are to come.

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


# ---- the registered op -----------------------------------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _HALF or not dtype.is_floating_point else dtype


def _tap_indices(query: Tensor, key: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``int64 [k, H]`` and ``int64 [k, W]``: the grid row of tap row i for each output row, likewise columns."""
    taps = torch.arange(k, device=key.device)[:, None]
    H, W = query.shape[3:]
    h, w = key.shape[3:]
    return window_starts(H, h, k, key.device) + taps, window_starts(W, w, k, key.device) + taps


def _taps(query: Tensor, key: Tensor, k: int):
    """Per tap (i, j): i, j, the row and column indices, and that tap's keys ``[B, heads, d, H, W]``."""
    rows, cols = _tap_indices(query, key, k)
    for i in range(k):
        key_rows = key.index_select(3, rows[i])  # [B, heads, d, H, w]
        for j in range(k):
            yield i, j, rows[i], cols[j], key_rows[..., cols[j]]  # (index_select on the last dim is slow on CPU)


def _logits(query: Tensor, key_tap: Tensor, scale: float) -> Tensor:
    return (query * key_tap).sum(2) * scale


def _logsumexp(query: Tensor, key: Tensor, k: int, scale: float) -> Tensor:
    """``[B, heads, H, W]``: the logsumexp of each pixel's k * k logits, one tap at a time (online max)."""
    m = query.new_full((query.shape[0], query.shape[1], *query.shape[3:]), -math.inf)
    s = torch.zeros_like(m)
    for *_, key_tap in _taps(query, key, k):
        logits = _logits(query, key_tap, scale)
        m_new = torch.maximum(m, logits)
        s = s * torch.exp(m - m_new) + torch.exp(logits - m_new)
        m = m_new
    return m + torch.log(s)


@torch.library.custom_op("upcli::neighbourhood_attention", mutates_args=())
def _neighbourhood_attention(query: Tensor, key: Tensor, value: Tensor, k: int, scale: float) -> Tensor:
    dtype = _compute_dtype(query, key, value)
    q, kk, v = (t.to(dtype).contiguous() for t in (query, key, value))
    heads = q.shape[1]
    lse = _logsumexp(q, kk, k, scale)
    out = v.new_zeros(v.shape[0], v.shape[1], *q.shape[3:])
    value_rows = None
    for i, j, row, col, key_tap in _taps(q, kk, k):
        if j == 0:
            value_rows = v.index_select(2, row)  # [B, C, H, w]
        p = torch.exp(_logits(q, key_tap, scale) - lse).sum(1, keepdim=True) / heads  # [B, 1, H, W]
        out.addcmul_(value_rows[..., col], p)
    return out.to(value.dtype)


@_neighbourhood_attention.register_fake
def _(query, key, value, k, scale):
    return value.new_empty(value.shape[0], value.shape[1], query.shape[3], query.shape[4])


@torch.library.custom_op("upcli::neighbourhood_attention_backward", mutates_args=())
def _neighbourhood_attention_backward_op(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, k: int,
                                         scale: float, output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``query``, ``key`` and ``value`` (an empty tensor where ``output_mask`` is False), every tap
    recomputed: a first pass for the logsumexp and ``D = sum_ij p dp``, a second for the gradients."""
    need_q, need_k, need_v = output_mask
    dtype = _compute_dtype(grad_out, query, key, value)
    g, q, kk, v = (t.to(dtype).contiguous() for t in (grad_out, query, key, value))
    heads = q.shape[1]
    w = kk.shape[4]
    need_logit_grad = need_q or need_k
    rows, _ = _tap_indices(q, kk, k)
    g_rows = None

    def dp(i: int, j: int, col: Tensor) -> Tensor:
        """``[B, 1, H, W]``: d loss / d p of tap (i, j), the same for every head."""
        nonlocal g_rows
        if j == 0:
            g_rows = v.index_select(2, rows[i])
        return (g * g_rows[..., col]).sum(1, keepdim=True) / heads

    # pass 1: the logsumexp and D, both online over the taps
    m = q.new_full((q.shape[0], heads, *q.shape[3:]), -math.inf)
    s = torch.zeros_like(m)
    d_acc = torch.zeros_like(m)
    for i, j, _, col, key_tap in _taps(q, kk, k):
        logits = _logits(q, key_tap, scale)
        m_new = torch.maximum(m, logits)
        decay, e = torch.exp(m - m_new), torch.exp(logits - m_new)
        s = s * decay + e
        if need_logit_grad:
            d_acc = d_acc * decay + e * dp(i, j, col)
        m = m_new
    lse = m + torch.log(s)
    big_d = d_acc / s

    # pass 2: the gradients
    grad_q = torch.zeros_like(q) if need_q else None
    grad_k = torch.zeros_like(kk) if need_k else None
    grad_v = torch.zeros_like(v) if need_v else None
    grad_k_rows = grad_v_rows = None
    for i, j, row, col, key_tap in _taps(q, kk, k):
        p = torch.exp(_logits(q, key_tap, scale) - lse)  # [B, heads, H, W]
        if j == 0:
            grad_k_rows = q.new_zeros(*q.shape[:4], w) if need_k else None
            grad_v_rows = v.new_zeros(*v.shape[:2], q.shape[3], w) if need_v else None
        if need_v:
            grad_v_rows.index_add_(3, col, g * (p.sum(1, keepdim=True) / heads))
        if need_logit_grad:
            dl = (p * (dp(i, j, col) - big_d) * scale)[:, :, None]  # [B, heads, 1, H, W]
            if need_q:
                grad_q.addcmul_(dl, key_tap)
            if need_k:
                grad_k_rows.index_add_(4, col, dl * q)
        if j == k - 1:
            if need_k:
                grad_k.index_add_(3, row, grad_k_rows)
            if need_v:
                grad_v.index_add_(2, row, grad_v_rows)
    return tuple(grad.to(t.dtype) if need else t.new_empty(0)
                 for grad, t, need in zip((grad_q, grad_k, grad_v), (query, key, value), output_mask))


@_neighbourhood_attention_backward_op.register_fake
def _(grad_out, query, key, value, k, scale, output_mask):
    return tuple(t.new_empty(t.shape if need else (0,)) for t, need in zip((query, key, value), output_mask))


def _setup(ctx, inputs, output):
    query, key, value, ctx.k, ctx.scale = inputs
    ctx.save_for_backward(query, key, value)  # the inputs only: every tap is recomputed in backward


def _backward(ctx, grad_out):
    if torch.is_grad_enabled():
        raise RuntimeError("upcli.kernels: double backward is not supported")
    mask = list(ctx.needs_input_grad[:3])
    grads = _neighbourhood_attention_backward_op(grad_out, *ctx.saved_tensors, ctx.k, ctx.scale, mask)
    return *(g if need else None for g, need in zip(grads, mask)), None, None


_neighbourhood_attention.register_autograd(_backward, setup_context=_setup)


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
    _check(query, key, value, k)
    scale = 1 / math.sqrt(query.shape[2]) if scale is None else float(scale)
    return _neighbourhood_attention(query, key, value, int(k), scale)
