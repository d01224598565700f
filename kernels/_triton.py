"""Triton backend of the adaptive convolution: CUDA, or the Triton interpreter on CPU under ``TRITON_INTERPRET=1``.

    out[b, c, h, w] = sum_{i, j < k} weights[b, h, w, i, j] * xpad[b, c, h + i, w + j]

``xpad`` is ``x`` padded by ``r = k // 2`` on each side. The padding is never materialised: every kernel maps an
index of the padded frame back onto ``x`` (``_remap``), by pad mode:

    0 zeros      out of range -> masked load, 0
    1 reflect    -1 -> 1, H -> H - 2 (``F.pad(mode="reflect")``; needs r < H and r < W)
    2 replicate  clamp to [0, H - 1]
    3 valid      ``x`` comes padded, (B, C, H + k - 1, W + k - 1); no remapping

Memory traffic (the case for fusing). Eager shift-and-accumulate reads and writes ``out`` k*k times; unfolding
writes and reads C*k*k*H*W elements. The forward kernel reads ``x`` once from DRAM and writes ``out`` once; the
k*k re-reads of each ``x`` element hit L1 (horizontal taps: same program) and L2 (vertical taps: programs of
neighbouring rows run together). The weights are C / k^2 times smaller than ``x``.

Tiling. A program owns BLOCK_W consecutive pixels of one output row:
- forward and grad-input (a gather: each output element has one owner, no atomics): BLOCK_C channels, a
  [BLOCK_C, BLOCK_W] float32 accumulator; each tap's BLOCK_W weights are loaded once for all BLOCK_C channels.
  The forward unrolls all k*k taps over thin channel tiles; grad-input loops over tap rows, a row's k taps
  unrolled.
- grad-weights (a reduction over channels): for each tap row, a [k, BLOCK_W] float32 accumulator summed over
  channel blocks of [BLOCK_C, k, BLOCK_W] products; the k taps of a row are a tensor axis, not unrolled code.
- The launchers pass the weights stored tap-major, (B, k, k, H, W) (a copy unless they already are), so that
  loading one tap for a row of pixels is coalesced rather than a k*k-strided gather.
- Column indices are remapped for the pad mode on every tile (an interior-tile fast path measured no faster).
Grid: (W tiles, rows, batch x channel blocks), so programs that run together share rows of ``x`` in L2.
On CUDA the block sizes are autotuned (key: C, W, k); the interpreter uses one fixed configuration.

Speed (H100, C = 384, k = 7, 448^2, float32): forward 3.4 ms in isolation, about 7% of the copy bandwidth; the
target is 50%. These kernels are bound by the k*k loads per output through L1/L2 and by registers, not DRAM;
reaching the bandwidth needs each loaded ``x`` row reused across the k column taps in registers or shared
memory (or the taps of a row as a banded matrix product on the tensor cores), which is the next step.

Functions (inputs on CUDA, or CPU when interpreting; float32, float16 or bfloat16; any strides):
- ``adaptive_conv_forward(x, weights, pad_mode) -> Tensor[B, C, H, W]`` in ``x.dtype``;
- ``adaptive_conv_grad_input_padded(grad_out, weights) -> Tensor[B, C, H + k - 1, W + k - 1]`` float32;
- ``adaptive_conv_grad_weights(grad_out, x, pad_mode, k) -> Tensor[B, H, W, k, k]`` float32.
Importing this module touches no GPU and works without Triton (``available()`` is then False).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: the module still imports, available() says no.
    HAS_TRITON = False

    class _NoTriton:
        """Stands in for ``triton`` and ``triton.language`` so that the kernel definitions below still execute."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ``@triton.jit`` decides at decoration time (i.e. now, at import) whether kernels are compiled or interpreted.
INTERPRET = HAS_TRITON and _interpreting()

PAD_ZEROS, PAD_REFLECT, PAD_REPLICATE, PAD_VALID = 0, 1, 2, 3
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The interpreter runs every program in Python, at a cost per operation rather than per element: one fixed,
# fairly large tile keeps the number of programs down. (Tests shrink it to cover W tiles and channel blocks.)
_INTERPRETER_META = {"BLOCK_C": 16, "BLOCK_W": 32}


def available(device) -> bool:
    """Whether these kernels run on ``device``: Triton is importable and ``device`` is CUDA, or we interpret."""
    if not HAS_TRITON:
        return False
    return torch.device(device).type == "cuda" or INTERPRET


def _autotune(configs, key):
    """``triton.autotune`` on GPU; the interpreter gets ``_INTERPRETER_META`` from the launchers instead."""

    def decorate(kernel):
        if not HAS_TRITON or INTERPRET:
            return kernel
        return triton.autotune(configs=[triton.Config(meta, num_warps=w) for meta, w in configs], key=key)(kernel)

    return decorate


# (meta, num_warps) for grad-input. Tiles are [BLOCK_C, BLOCK_W], W the contiguous axis.
_TILE_CONFIGS = [
    ({"BLOCK_C": 8, "BLOCK_W": 128}, 4),
    ({"BLOCK_C": 16, "BLOCK_W": 64}, 4),
    ({"BLOCK_C": 32, "BLOCK_W": 32}, 4),
    ({"BLOCK_C": 32, "BLOCK_W": 64}, 4),
    ({"BLOCK_C": 32, "BLOCK_W": 128}, 8),
    ({"BLOCK_C": 64, "BLOCK_W": 64}, 8),
]
# The forward unrolls all k*k taps: only thin channel tiles fit (the three measured on an H100; wider ones spilled).
_FWD_CONFIGS = [
    ({"BLOCK_C": 4, "BLOCK_W": 128}, 4),
    ({"BLOCK_C": 8, "BLOCK_W": 128}, 4),
    ({"BLOCK_C": 16, "BLOCK_W": 64}, 4),
]
# grad-weights fixes BLOCK_C (8, or C if smaller); only the pixel tile is tuned.
_PIXEL_CONFIGS = [
    ({"BLOCK_W": 32}, 2),
    ({"BLOCK_W": 64}, 4),
    ({"BLOCK_W": 128}, 4),
    ({"BLOCK_W": 128}, 8),
]


# %%
# Kernels
# -------


@triton.jit
def _remap(q, n, PAD_MODE: tl.constexpr):
    """Index ``q`` in [-r, n + r) -> an index into an axis of length ``n``, by pad mode.

    Zeros mode returns ``q`` unchanged (the caller masks what is outside [0, n)); so does valid mode, whose
    ``x`` is already the padded frame.
    """
    if PAD_MODE == 1:  # reflect about 0 and n - 1
        q = tl.abs(q)
        q = tl.where(q >= n, 2 * n - 2 - q, q)
    elif PAD_MODE == 2:  # replicate
        q = tl.minimum(tl.maximum(q, 0), n - 1)
    return q


@triton.jit
def _fwd_tap_row(acc, x_row, w_row, offs_w, row_mask, w_mask, W_in, stride_xw, stride_wj,
                 K: tl.constexpr, R: tl.constexpr, COL_MODE: tl.constexpr):
    """``acc += weights[.., i, j] * x[.., w + j - R]`` (remapped by ``COL_MODE``) for the K taps j of one tap row."""
    for j in tl.static_range(K):
        col = _remap(offs_w + (j - R), W_in, COL_MODE)  # [BLOCK_W]; a constant shift keeps the alignment known
        x_mask = row_mask
        if COL_MODE == 0:
            x_mask = x_mask & ((col >= 0) & (col < W_in))[None, :]
        # this tap's weight for each pixel: loaded once, used for all BLOCK_C channels
        wt = tl.load(w_row + j * stride_wj, mask=w_mask, other=0.0).to(tl.float32)
        xt = tl.load(x_row + col[None, :] * stride_xw, mask=x_mask, other=0.0)
        acc += xt.to(tl.float32) * wt[None, :]
    return acc


@_autotune(_FWD_CONFIGS, key=["C", "W", "K"])
@triton.jit
def _adaptive_conv_fwd_kernel(
    # pointers
    x_ptr, w_ptr, out_ptr,
    # strides
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wb, stride_wh, stride_ww, stride_wi, stride_wj,
    stride_ob, stride_oc, stride_oh, stride_ow,
    # sizes: channels, output rows/cols, rows/cols of x (unpadded, or padded in valid mode)
    C, H, W, H_in, W_in,
    # meta
    K: tl.constexpr, PAD_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    pid_w = tl.program_id(0)
    h = tl.program_id(1)
    pid_bc = tl.program_id(2)
    num_cb = tl.cdiv(C, BLOCK_C)
    b = (pid_bc // num_cb).to(tl.int64)
    offs_c = (pid_bc % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    c_mask = offs_c < C
    w_mask = offs_w < W
    tile_mask = c_mask[:, None] & w_mask[None, :]

    # Tap (i, j) of pixel (h, w) reads x at (h + i - R, w + j - R), remapped; valid mode has R = 0.
    R: tl.constexpr = (K // 2) * (PAD_MODE != 3)
    # channel offsets in int64: C * H * W may pass 2**31 (e.g. C = 384 at 2400 x 2400)
    x_chan = x_ptr + b * stride_xb + offs_c[:, None].to(tl.int64) * stride_xc  # [BLOCK_C, 1]
    w_pix = w_ptr + b * stride_wb + h * stride_wh + offs_w * stride_ww  # [BLOCK_W]: tap (0, 0) of each pixel
    acc = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    # All K*K taps unrolled, with thin channel tiles (BLOCK_C 4 to 16) to keep registers free: on an H100 at 448^2,
    # C = 384, k = 7 this ran in 3.4 ms against 6.9 ms for a loop over tap rows with an interior/border split.
    for i in tl.static_range(K):
        row = _remap(h + (i - R), H_in, PAD_MODE)  # scalar
        row_mask = tile_mask
        if PAD_MODE == 0:
            row_mask = row_mask & (row >= 0) & (row < H_in)
        acc = _fwd_tap_row(acc, x_chan + row * stride_xh, w_pix + i * stride_wi, offs_w, row_mask, w_mask, W_in,
                           stride_xw, stride_wj, K, R, PAD_MODE)

    out = (out_ptr + b * stride_ob + offs_c[:, None].to(tl.int64) * stride_oc + h * stride_oh
           + offs_w[None, :] * stride_ow)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)


@_autotune(_TILE_CONFIGS, key=["C", "W", "K"])
@triton.jit
def _adaptive_conv_grad_input_kernel(
    # pointers
    g_ptr, w_ptr, gx_ptr,
    # strides
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_wb, stride_wh, stride_ww, stride_wi, stride_wj,
    stride_xb, stride_xc, stride_xh, stride_xw,
    # sizes: channels, rows/cols of grad_out, rows/cols of grad_xpad (H + K - 1, W + K - 1)
    C, H, W, H_pad, W_pad,
    # meta
    K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # grad_xpad[b, c, y, x] = sum_ij weights[b, y - i, x - j, i, j] * grad_out[b, c, y - i, x - j]
    # Each program gathers BLOCK_W pixels of row y of grad_xpad for BLOCK_C channels: every output element is
    # written by exactly one program, so no atomics and a deterministic sum.
    pid_x = tl.program_id(0)
    y = tl.program_id(1)
    pid_bc = tl.program_id(2)
    num_cb = tl.cdiv(C, BLOCK_C)
    b = (pid_bc // num_cb).to(tl.int64)
    offs_c = (pid_bc % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_x = pid_x * BLOCK_W + tl.arange(0, BLOCK_W)
    c_mask = offs_c < C

    # pointers at (h, w) = (0, x): tap (i, j) reads (y - i, x - j)
    g_chan = g_ptr + b * stride_gb + offs_c[:, None].to(tl.int64) * stride_gc  # [BLOCK_C, 1]
    g_pix = g_chan + offs_x[None, :] * stride_gw  # [BLOCK_C, BLOCK_W]
    w_pix = w_ptr + b * stride_wb + offs_x * stride_ww  # [BLOCK_W]
    acc = tl.zeros((BLOCK_C, BLOCK_W), dtype=tl.float32)
    for i in range(K):  # as in the forward: tap rows looped, the taps of a row unrolled
        h = y - i  # the output row that reads row y through tap row i
        h_ok = (h >= 0) & (h < H)
        g_row = g_pix + h * stride_gh
        w_row = w_pix + (h * stride_wh + i * stride_wi)
        for j in tl.static_range(K):
            p_mask = (offs_x >= j) & (offs_x < W + j) & h_ok  # 0 <= x - j < W
            wt = tl.load(w_row + j * (stride_wj - stride_ww), mask=p_mask, other=0.0).to(tl.float32)
            gt = tl.load(g_row - j * stride_gw, mask=c_mask[:, None] & p_mask[None, :], other=0.0)
            acc += gt.to(tl.float32) * wt[None, :]

    out = (gx_ptr + b * stride_xb + offs_c[:, None].to(tl.int64) * stride_xc + y * stride_xh
           + offs_x[None, :] * stride_xw)
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=c_mask[:, None] & (offs_x < W_pad)[None, :])


@_autotune(_PIXEL_CONFIGS, key=["C", "W", "K"])
@triton.jit
def _adaptive_conv_grad_weights_kernel(
    # pointers
    g_ptr, x_ptr, gw_ptr,
    # strides
    stride_gb, stride_gc, stride_gh, stride_gw,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wb, stride_wh, stride_ww, stride_wi, stride_wj,
    # sizes: channels, rows/cols of grad_out, rows/cols of x (unpadded, or padded in valid mode)
    C, H, W, H_in, W_in,
    # meta
    K: tl.constexpr, KP: tl.constexpr, PAD_MODE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr,
):
    # grad_w[b, h, w, i, j] = sum_c grad_out[b, c, h, w] * xpad[b, c, h + i, w + j]
    # Each program owns BLOCK_W pixels of row h. For each tap row i it reduces over channel blocks a
    # [BLOCK_C, KP, BLOCK_W] product, the K taps j of the row as a (padded) tensor axis. Both loops run at run
    # time: nothing is unrolled K*K times, so the kernel compiles in seconds and holds few registers.
    # KP = next_power_of_2(K).
    pid_w = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)
    offs_j = tl.arange(0, KP)
    offs_c = tl.arange(0, BLOCK_C)
    w_mask = offs_w < W
    R: tl.constexpr = (K // 2) * (PAD_MODE != 3)  # as in the forward
    # the column each (tap j, pixel w) reads, remapped once for all rows and channels
    col = _remap(offs_w[None, :] + (offs_j[:, None] - R), W_in, PAD_MODE)  # [KP, BLOCK_W]
    jw_mask = (offs_j < K)[:, None] & w_mask[None, :]  # the taps stored
    col_mask = jw_mask  # the taps read from x (zeros mode: not those outside it, whose gradient is 0)
    if PAD_MODE == 0:
        col_mask = col_mask & (col >= 0) & (col < W_in)
    c_off = offs_c.to(tl.int64)  # int64: C * H * W may pass 2**31
    g_tile = g_ptr + b * stride_gb + c_off[:, None] * stride_gc + h * stride_gh + offs_w[None, :] * stride_gw
    x_chan = x_ptr + b * stride_xb + c_off[:, None, None] * stride_xc + (col * stride_xw)[None, :, :]
    gw_pix = gw_ptr + b * stride_wb + h * stride_wh + offs_w[None, :] * stride_ww + offs_j[:, None] * stride_wj
    for i in range(K):
        row = _remap(h + (i - R), H_in, PAD_MODE)
        x_mask = col_mask
        if PAD_MODE == 0:
            x_mask = x_mask & (row >= 0) & (row < H_in)
        acc = tl.zeros((KP, BLOCK_W), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c_mask = offs_c < C - c0
            gt = tl.load(g_tile + c0 * stride_gc, mask=c_mask[:, None] & w_mask[None, :], other=0.0)
            xt = tl.load(x_chan + c0 * stride_xc + row * stride_xh, mask=c_mask[:, None, None] & x_mask[None, :, :],
                         other=0.0)
            acc += tl.sum(gt.to(tl.float32)[:, None, :] * xt.to(tl.float32), axis=0)
        tl.store(gw_pix + i * stride_wi, acc.to(gw_ptr.dtype.element_ty), mask=jw_mask)


# %%
# Launchers: check, allocate, launch
# ----------------------------------


def _check_tensor(t: Tensor, name: str, dim: int) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if not available(t.device):
        raise RuntimeError(f"upcli.kernels._triton: {name} is on {t.device}; Triton runs on CUDA "
                           "(or on CPU with TRITON_INTERPRET=1 set before import)")


def _check_kernel_size(k: int) -> None:
    if k < 1 or k % 2 == 0:
        raise ValueError(f"kernel size must be odd and positive, got {k}")


def _check_padded_x(x: Tensor, H: int, W: int, k: int, pad_mode: int) -> None:
    """``x`` has the right size for output (H, W) under ``pad_mode`` (reflect also needs r < H, r < W)."""
    if pad_mode not in (PAD_ZEROS, PAD_REFLECT, PAD_REPLICATE, PAD_VALID):
        raise ValueError(f"pad_mode must be 0 (zeros), 1 (reflect), 2 (replicate) or 3 (valid), got {pad_mode}")
    extra = k - 1 if pad_mode == PAD_VALID else 0
    if tuple(x.shape[2:]) != (H + extra, W + extra):
        raise ValueError(f"x {tuple(x.shape)} does not fit an output of {H}x{W} with k={k}, pad_mode={pad_mode}")
    if pad_mode == PAD_REFLECT and (k // 2 >= H or k // 2 >= W):
        raise ValueError(f"reflect padding needs H and W > k // 2 = {k // 2}, got {H}x{W}")


def _tap_major(weights: Tensor) -> Tensor:
    """``weights`` as the same (B, H, W, k, k) tensor stored tap-major, as (B, k, k, H, W).

    The kernels load one tap for a row of pixels at a time: stored pixel-major these loads are gathers with a
    k*k stride (a cache line per pixel), tap-major they are coalesced. The copy costs k*k*H*W elements, C/k^2
    times less than the read of ``x``; it is free when the caller already stores the weights tap-major.
    """
    return weights.permute(0, 3, 4, 1, 2).contiguous().permute(0, 3, 4, 1, 2)


def _meta(**fixed) -> dict:
    """Launch meta-parameters: the interpreter's fixed tile, or nothing (autotuned) on GPU, plus ``fixed``."""
    meta = dict(_INTERPRETER_META) if INTERPRET else {}
    meta.update(fixed)
    return meta


def adaptive_conv_forward(x: Tensor, weights: Tensor, pad_mode: int) -> Tensor:
    """``x: Tensor[B, C, H, W]`` (``[B, C, H + k - 1, W + k - 1]`` if valid), ``weights: Tensor[B, H, W, k, k]``
    -> ``Tensor[B, C, H, W]`` in ``x.dtype``, accumulated in float32."""
    # (1) check
    _check_tensor(x, "x", 4)
    _check_tensor(weights, "weights", 5)
    B, H, W, k, k2 = weights.shape
    if k != k2:
        raise ValueError(f"weights must be (B, H, W, k, k), got {tuple(weights.shape)}")
    _check_kernel_size(k)
    if x.shape[0] != B or x.device != weights.device:
        raise ValueError(f"x {tuple(x.shape)} on {x.device} does not match weights {tuple(weights.shape)} "
                         f"on {weights.device}")
    _check_padded_x(x, H, W, k, pad_mode)
    C = x.shape[1]
    # (2) allocate
    out = torch.empty((B, C, H, W), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    # (3) launch
    grid = lambda META: (triton.cdiv(W, META["BLOCK_W"]), H, B * triton.cdiv(C, META["BLOCK_C"]))
    weights = _tap_major(weights)
    _adaptive_conv_fwd_kernel[grid](
        x, weights, out,
        *x.stride(), *weights.stride(), *out.stride(),
        C, H, W, x.shape[2], x.shape[3],
        K=k, PAD_MODE=pad_mode, **_meta(),
    )
    return out


def adaptive_conv_grad_input_padded(grad_out: Tensor, weights: Tensor) -> Tensor:
    """``grad_out: Tensor[B, C, H, W]``, ``weights: Tensor[B, H, W, k, k]`` -> the float32 gradient of the padded
    input, ``Tensor[B, C, H + k - 1, W + k - 1]`` (the caller folds it back onto ``x``)."""
    # (1) check
    _check_tensor(grad_out, "grad_out", 4)
    _check_tensor(weights, "weights", 5)
    B, C, H, W = grad_out.shape
    k = weights.shape[-1]
    if tuple(weights.shape) != (B, H, W, k, k) or grad_out.device != weights.device:
        raise ValueError(f"weights {tuple(weights.shape)} on {weights.device} do not match grad_out "
                         f"{tuple(grad_out.shape)} on {grad_out.device}")
    _check_kernel_size(k)
    # (2) allocate
    H_pad, W_pad = H + k - 1, W + k - 1
    grad_xpad = torch.empty((B, C, H_pad, W_pad), dtype=torch.float32, device=grad_out.device)
    if grad_xpad.numel() == 0:
        return grad_xpad
    if H == 0 or W == 0:
        return grad_xpad.zero_()
    # (3) launch
    grid = lambda META: (triton.cdiv(W_pad, META["BLOCK_W"]), H_pad, B * triton.cdiv(C, META["BLOCK_C"]))
    weights = _tap_major(weights)
    _adaptive_conv_grad_input_kernel[grid](
        grad_out, weights, grad_xpad,
        *grad_out.stride(), *weights.stride(), *grad_xpad.stride(),
        C, H, W, H_pad, W_pad,
        K=k, **_meta(),
    )
    return grad_xpad


def adaptive_conv_grad_weights(grad_out: Tensor, x: Tensor, pad_mode: int, k: int) -> Tensor:
    """``grad_out: Tensor[B, C, H, W]``, ``x`` as in the forward -> ``Tensor[B, H, W, k, k]`` float32,
    ``sum_c grad_out[b, c, h, w] * xpad[b, c, h + i, w + j]``.

    ``adaptive_conv_grad_weights(keys, keys, mode, k)`` gives the neighbour logits (key dot products)."""
    # (1) check
    _check_tensor(grad_out, "grad_out", 4)
    _check_tensor(x, "x", 4)
    _check_kernel_size(k)
    B, C, H, W = grad_out.shape
    if tuple(x.shape[:2]) != (B, C) or x.device != grad_out.device:
        raise ValueError(f"x {tuple(x.shape)} on {x.device} does not match grad_out {tuple(grad_out.shape)} "
                         f"on {grad_out.device}")
    _check_padded_x(x, H, W, k, pad_mode)
    # (2) allocate
    grad_w = torch.empty((B, H, W, k, k), dtype=torch.float32, device=grad_out.device)
    if grad_w.numel() == 0:
        return grad_w
    if C == 0:
        return grad_w.zero_()
    # (3) launch. The [BLOCK_C, KP, BLOCK_W] product caps BLOCK_C at 8 on GPU.
    block_c = min(triton.next_power_of_2(C), _INTERPRETER_META["BLOCK_C"] if INTERPRET else 8)
    grid = lambda META: (triton.cdiv(W, META["BLOCK_W"]), H, B)
    _adaptive_conv_grad_weights_kernel[grid](
        grad_out, x, grad_w,
        *grad_out.stride(), *x.stride(), *grad_w.stride(),
        C, H, W, x.shape[2], x.shape[3],
        K=k, KP=triton.next_power_of_2(k), PAD_MODE=pad_mode, **_meta(BLOCK_C=block_c),
    )
    return grad_w
