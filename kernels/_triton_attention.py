"""Triton forward of ``neighbourhood_attention``: CUDA, or the Triton interpreter on CPU under ``TRITON_INTERPRET=1``.

    s[n, t]  = scale * <query[b, n, :, y, x], key[b, n, :, sy + i, sx + j]>      t = i * k + j, the k * k taps
    P[t]     = mean over heads n of softmax_t(s[n, :])[t]
    out[c]   = sum_t P[t] * value[b, c, sy + i, sx + j]

One program owns BLOCK_W consecutive pixels of one output row and BLOCK_C channels. The heads are a tensor axis
(queries and keys are loaded as [heads, d, BLOCK_W] tiles), the taps an unrolled loop:
- pass 1, over the taps: the running maximum and sum of exp of each head's logits (an online softmax);
- pass 2, over the taps again: each tap's logits recomputed, its head-averaged probability, times the tap's values.
Nothing per tap is stored, in registers or in memory: the kernel reads the inputs and writes ``out`` once. The
logits are recomputed for every block of channels (``heads * d * k * k`` products per pixel, next to the
``BLOCK_C * k * k`` of the values). Window starts are computed in the kernel, as ``window_starts`` does.

The backward on CUDA is the blocked-GEMM op (cuBLAS); a fused backward kernel is to come.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import INTERPRET, _autotune, available, tl, triton

__all__ = ["available", "neighbourhood_attention_forward"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_META = {"BLOCK_C": 16, "BLOCK_W": 16}
_CONFIGS = [
    ({"BLOCK_C": 32, "BLOCK_W": 32}, 4),
    ({"BLOCK_C": 64, "BLOCK_W": 32}, 4),
    ({"BLOCK_C": 64, "BLOCK_W": 64}, 8),
    ({"BLOCK_C": 128, "BLOCK_W": 32}, 8),
]


@triton.jit
def _window_start(pos, n_out, n_in, K: tl.constexpr):
    """The first of the K grid cells that output position ``pos`` (of ``n_out``) attends to (of ``n_in``)."""
    centre = tl.minimum(((2 * pos + 1) * n_in) // (2 * n_out), n_in - 1)
    return tl.minimum(tl.maximum(centre - K // 2, 0), n_in - K)


@triton.jit
def _tap_logits(q, key_ptr, key_head, key_row, sx, tap_mask, scale):
    """[BLOCK_N, BLOCK_W] logits of one tap: ``q [BLOCK_N, BLOCK_D, BLOCK_W]`` against the keys at (row, sx)."""
    keys = tl.load(key_ptr + key_head + key_row + sx[None, None, :], mask=tap_mask, other=0.0).to(tl.float32)
    return tl.sum(q * keys, axis=1) * scale


@_autotune(_CONFIGS, key=["C", "W", "K", "NH", "D"])
@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, out_ptr, C, H, W, h, w, NH, D, scale,
                    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr):
    pid_x, y, pid_bc = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    c_blocks = tl.cdiv(C, BLOCK_C)
    b, c0 = pid_bc // c_blocks, (pid_bc % c_blocks) * BLOCK_C

    xs = pid_x * BLOCK_W + tl.arange(0, BLOCK_W)
    x_ok = xs < W
    sy = _window_start(y, H, h, K)
    sx = _window_start(tl.minimum(xs, W - 1), W, w, K)
    heads = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    head_ok = heads < NH
    qk_mask = (head_ok[:, None, None] & (dims < D)[None, :, None]) & x_ok[None, None, :]

    # the queries of these pixels, [heads, d, pixels]; the keys' offsets up to the tap's cell
    q_head = (b * NH + heads[:, None, None]) * D + dims[None, :, None]
    q = tl.load(q_ptr + (q_head * H + y) * W + xs[None, None, :], mask=qk_mask, other=0.0).to(tl.float32)
    key_head = q_head * (h * w)

    # pass 1: each head's running max and sum of exp over the taps
    m = tl.full((BLOCK_N, BLOCK_W), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    for t in tl.static_range(K * K):
        s = _tap_logits(q, k_ptr, key_head, (sy + t // K) * w, sx + t % K, qk_mask, scale)
        m_new = tl.maximum(m, s)
        l = l * tl.exp(m - m_new) + tl.exp(s - m_new)
        m = m_new
    weight = tl.where(head_ok[:, None], 1.0 / (l * NH), 0.0)  # softmax normaliser, heads averaged

    # pass 2: each tap's head-averaged probability times its values
    cs = c0 + tl.arange(0, BLOCK_C)
    cv_mask = (cs < C)[:, None] & x_ok[None, :]
    v_chan = (b * C + cs[:, None]) * (h * w)
    acc = tl.zeros((BLOCK_C, BLOCK_W), tl.float32)
    for t in tl.static_range(K * K):
        s = _tap_logits(q, k_ptr, key_head, (sy + t // K) * w, sx + t % K, qk_mask, scale)
        p = tl.sum(tl.exp(s - m) * weight, axis=0)  # [BLOCK_W]
        vals = tl.load(v_ptr + v_chan + (sy + t // K) * w + (sx + t % K)[None, :], mask=cv_mask, other=0.0)
        acc += vals.to(tl.float32) * p[None, :]

    out_offsets = ((b * C + cs[:, None]) * H + y) * W + xs[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=cv_mask)


def neighbourhood_attention_forward(query: Tensor, key: Tensor, value: Tensor, k: int, scale: float) -> Tensor:
    """``Tensor[B, C, H, W]`` in ``value.dtype`` (float32, float16 or bfloat16; accumulated in float32)."""
    if value.dtype not in _DTYPES:
        raise TypeError(f"upcli.kernels: the Triton backend takes {_DTYPES}, got {value.dtype}")
    query, key, value = (t.contiguous() for t in (query, key, value))
    B, heads, d, H, W = query.shape
    C, h, w = value.shape[1:]
    out = torch.empty(B, C, H, W, device=value.device, dtype=value.dtype)
    if out.numel() == 0:
        return out
    blocks = {"BLOCK_N": triton.next_power_of_2(heads), "BLOCK_D": triton.next_power_of_2(d)}
    args = (query, key, value, out, C, H, W, h, w, heads, d, scale)
    if INTERPRET:
        meta = _INTERPRETER_META
        grid = (triton.cdiv(W, meta["BLOCK_W"]), H, B * triton.cdiv(C, meta["BLOCK_C"]))
        _forward_kernel[grid](*args, K=k, **blocks, **meta)
    else:
        _forward_kernel[lambda cfg: (triton.cdiv(W, cfg["BLOCK_W"]), H, B * triton.cdiv(C, cfg["BLOCK_C"]))](
            *args, K=k, **blocks)
    return out
