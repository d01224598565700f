"""The C++ CPU backend of adaptive_conv (``upcli.kernels._cpu``) against a float64 reference.

The reference pads with ``F.pad`` and gathers the k x k taps with ``F.unfold`` (tap ``i * k + j`` multiplies
``xpad[h + i, w + j]``); its gradients come from autograd. A nested-loop version checks the reference itself.
The first test to run compiles the extension (about 15 s on 2 cores, cached afterwards).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F

from upcli.kernels import _cpu

PAD = {0: "constant", 1: "reflect", 2: "replicate"}  # 3 = valid: x comes padded
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}  # relative to the largest reference value

# (B, C, H, W, k): non-square, B > 1, C not a multiple of the 4/6/8-channel register blocks nor of the 32-channel
# groups (37 spans two), H not a multiple of the 4-row forward tiles nor of the 8-row blocks, W not a multiple of
# the 8/16/32-wide vectors, k = 1, 3, 5, 7 (compile-time paths) and 9 (the runtime-k path).
SHAPES = [
    (2, 5, 9, 13, 3),
    (3, 19, 11, 6, 5),
    (1, 19, 17, 23, 7),
    (2, 5, 6, 4, 1),
    (1, 37, 10, 37, 7),
    (2, 3, 12, 19, 9),
]


@pytest.fixture(scope="module", autouse=True)
def _needs_cpp():
    if not _cpu.available():
        pytest.skip(f"C++ CPU path unavailable: {_cpu.unavailable_reason()}")


def _pad(x, k, mode):
    r = k // 2
    return x if mode == 3 else F.pad(x, (r, r, r, r), mode=PAD[mode])


def _reference(xpad, weights):
    """out[b, c, h, w] = sum_ij weights[b, h, w, i, j] * xpad[b, c, h + i, w + j], by unfold."""
    B, H, W, k, _ = weights.shape
    C = xpad.shape[1]
    taps = F.unfold(xpad, k).view(B, C, k * k, H, W)
    return torch.einsum("bcthw,bhwt->bchw", taps, weights.reshape(B, H, W, k * k))


def _loops(x, weights, mode):
    """The same sum by explicit loops, with the padding written out index by index."""
    B, C, Hx, Wx = x.shape
    _, H, W, k, _ = weights.shape
    r = k // 2
    out = torch.zeros(B, C, H, W, dtype=torch.float64)

    def src(i, n):  # padded index i - r of a length-n axis, or None for a zero
        i -= r
        if 0 <= i < n:
            return i
        return {0: None, 1: -i if i < 0 else 2 * (n - 1) - i, 2: min(max(i, 0), n - 1)}[mode]

    for b, c, h, w, i, j in itertools.product(range(B), range(C), range(H), range(W), range(k), range(k)):
        if mode == 3:
            v = x[b, c, h + i, w + j]
        else:
            y, z = src(h + i, Hx), src(w + j, Wx)
            v = 0.0 if y is None or z is None else x[b, c, y, z]
        out[b, c, h, w] += weights[b, h, w, i, j] * v
    return out


def _inputs(B, C, H, W, k, mode, seed=0):
    g = torch.Generator().manual_seed(seed)
    extra = k - 1 if mode == 3 else 0
    x = torch.randn(B, C, H + extra, W + extra, generator=g, dtype=torch.float64)
    weights = torch.randn(B, H, W, k, k, generator=g, dtype=torch.float64)
    grad_out = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    return x, weights, grad_out


def _assert_close(got, want, dtype):
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    tol = TOL[dtype] * max(want.abs().max().item(), 1e-30)
    torch.testing.assert_close(got.double(), want, rtol=TOL[dtype], atol=tol)


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_reference_matches_loops(mode):
    x, weights, _ = _inputs(2, 2, 4, 5, 3, mode)
    torch.testing.assert_close(_reference(_pad(x, 3, mode), weights), _loops(x, weights, mode))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}C{}H{}W{}k{}".format(*s))
def test_forward_and_gradients(shape, mode, dtype):
    B, C, H, W, k = shape
    x, weights, grad_out = _inputs(B, C, H, W, k, mode)
    xpad = _pad(x, k, mode).detach().requires_grad_()
    w = weights.clone().requires_grad_()
    out = _reference(xpad, w)
    out.backward(grad_out)

    xd, wd, gd = x.to(dtype), weights.to(dtype), grad_out.to(dtype)
    _assert_close(_cpu.adaptive_conv_forward(xd, wd, mode), out.detach(), dtype)
    _assert_close(_cpu.adaptive_conv_grad_input_padded(gd, wd), xpad.grad, dtype)
    _assert_close(_cpu.adaptive_conv_grad_weights(gd, xd, mode, k), w.grad, dtype)


def test_large_output_streamed_past_the_cache():
    """Outputs of 32 MiB or more with whole-vector rows are written with non-temporal stores: same values."""
    from upcli.kernels.reference import adaptive_conv_forward

    x, weights, _ = _inputs(1, 65, 257, 256, 3, 1)  # 65 * 257 * 256 float64 = 34 MB; 257 rows, 65 channels: partial tiles
    _assert_close(_cpu.adaptive_conv_forward(x, weights, 1), adaptive_conv_forward(x, weights, 1), torch.float64)


@pytest.mark.parametrize("mode", [0, 2, 3])
@pytest.mark.parametrize("shape", [(2, 3, 1, 2, 7), (1, 2, 3, 1, 5), (1, 9, 2, 2, 9)], ids=str)
def test_maps_smaller_than_the_window(shape, mode):
    """Zeros / replicate / valid allow k // 2 >= H or W (reflect does not): every tap may fall outside."""
    test_forward_and_gradients(shape, mode, torch.float64)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("k", [3, 7])
def test_neighbour_logits(mode, k):
    """grad_weights(keys, keys): each key dotted with its k x k neighbours (D = 32 channels, one group)."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(2, 32, 13, 18, generator=g, dtype=torch.float64)
    B, D, H, W = keys.shape
    taps = F.unfold(_pad(keys, k, mode), k).view(B, D, k * k, H, W)
    want = torch.einsum("bdthw,bdhw->bhwt", taps, keys).reshape(B, H, W, k, k)
    _assert_close(_cpu.adaptive_conv_grad_weights(keys.float(), keys.float(), mode, k), want, torch.float32)


def test_same_bits_for_any_thread_count():
    x, weights, grad_out = (t.float() for t in _inputs(2, 11, 19, 21, 7, 1))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(
                (
                    _cpu.adaptive_conv_forward(x, weights, 1),
                    _cpu.adaptive_conv_grad_input_padded(grad_out, weights),
                    _cpu.adaptive_conv_grad_weights(grad_out, x, 1, 7),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_sizes():
    w = torch.rand(2, 3, 4, 3, 3)
    assert _cpu.adaptive_conv_forward(torch.rand(2, 0, 3, 4), w, 0).shape == (2, 0, 3, 4)
    assert _cpu.adaptive_conv_grad_input_padded(torch.rand(2, 0, 3, 4), w).shape == (2, 0, 5, 6)
    gw = _cpu.adaptive_conv_grad_weights(torch.rand(2, 0, 3, 4), torch.rand(2, 0, 3, 4), 2, 3)
    assert gw.shape == (2, 3, 4, 3, 3) and not gw.any()
    assert _cpu.adaptive_conv_forward(torch.rand(0, 5, 3, 4), torch.rand(0, 3, 4, 3, 3), 1).shape == (0, 5, 3, 4)


def test_bad_inputs_raise():
    x, w = torch.rand(1, 2, 5, 6), torch.rand(1, 5, 6, 3, 3)
    with pytest.raises(RuntimeError, match="contiguous"):
        _cpu.adaptive_conv_forward(x.transpose(2, 3).contiguous().transpose(2, 3), w, 0)
    with pytest.raises(RuntimeError, match="does not match"):
        _cpu.adaptive_conv_forward(x, w, 3)  # valid mode wants x padded
    with pytest.raises(RuntimeError, match="k odd"):
        _cpu.adaptive_conv_forward(x, torch.rand(1, 5, 6, 2, 2), 0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        _cpu.adaptive_conv_forward(x.half(), w.half(), 0)
    with pytest.raises(RuntimeError, match="pad_mode"):
        _cpu.adaptive_conv_grad_weights(x, x, 4, 3)
    with pytest.raises(RuntimeError, match="reflect"):
        _cpu.adaptive_conv_forward(torch.rand(1, 2, 2, 6), torch.rand(1, 2, 6, 5, 5), 1)


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"UPCLI_NO_CPP_KERNELS": "1"}, "disabled by UPCLI_NO_CPP_KERNELS=1"),
        ({"CXX": "no-such-c++"}, "no C++ compiler"),
    ],
)
def test_unavailable_warns_once_and_does_not_raise(monkeypatch, env, reason):
    saved = dict(_cpu._state)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    _cpu._state.clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert _cpu.available() is False
            assert _cpu.available() is False
        assert len(caught) == 1
        message = str(caught[0].message)
        assert message.startswith("upcli.kernels: C++ CPU path unavailable (")
        assert message.endswith("); using the slower PyTorch path") and "\n" not in message and reason in message
        assert reason in _cpu.unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            _cpu.adaptive_conv_forward(torch.rand(1, 1, 3, 3), torch.rand(1, 3, 3, 1, 1), 0)
    finally:
        _cpu._state.clear()
        _cpu._state.update(saved)


# ---- forward_resampled: the adaptive conv of x resized by 4-tap tables (bicubic), resized inside the kernel ----

def _resampled(x, weights, mode):
    from upcli.kernels.adaptive_conv import bicubic_taps

    H, W = weights.shape[1:3]
    rows, cols = bicubic_taps(x.shape[2], H), bicubic_taps(x.shape[3], W)
    return _cpu.adaptive_conv_forward_resampled(x, weights, mode, rows, cols)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 5, 7, 10, 14, 3), (3, 19, 6, 3, 11, 7, 5), (1, 37, 9, 12, 18, 24, 7),
                                   (2, 3, 1, 1, 2, 2, 3), (1, 9, 4, 9, 8, 18, 9), (1, 10, 7, 10, 13, 19, 7),
                                   (2, 6, 5, 4, 5, 13, 3), (1, 4, 12, 9, 7, 9, 5), (1, 4, 6, 40, 9, 17, 3),
                                   (1, 5, 4, 30, 8, 61, 5)],
                         ids=lambda s: "B{}C{}h{}w{}H{}W{}k{}".format(*s))
def test_forward_resampled_equals_torch_bicubic_then_adaptive_conv(shape, mode, dtype):
    B, C, h, w, H, W, k = shape
    if mode == 1 and k // 2 >= min(H, W):
        pytest.skip("reflect needs the resized map larger than the radius")
    g = torch.Generator().manual_seed(sum(shape) + mode)
    x = torch.randn(B, C, h, w, generator=g, dtype=dtype)
    weights = torch.randn(B, H, W, k, k, generator=g, dtype=dtype)
    resized = F.interpolate(x, size=(H, W), mode="bicubic", align_corners=False)
    want = _reference(_pad(resized, k, mode), weights)
    got = _resampled(x, weights, mode)
    tol = 1e-5 if dtype == torch.float32 else 1e-6  # torch computes its float64 bicubic taps in float32
    torch.testing.assert_close(got, want, rtol=0, atol=tol * want.abs().max().item())


def test_forward_resampled_same_bits_for_any_thread_count_and_bad_inputs():
    from upcli.kernels.adaptive_conv import bicubic_taps

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 11, 9, 10, generator=g), torch.rand(2, 17, 21, 7, 7, generator=g)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 3):
            torch.set_num_threads(n)
            results.append(_resampled(x, w, 1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*results)
    rows, cols = bicubic_taps(9, 17), bicubic_taps(10, 21)
    with pytest.raises(RuntimeError, match="row taps must be"):
        _cpu.adaptive_conv_forward_resampled(x, w, 1, bicubic_taps(9, 16), cols)
    with pytest.raises(RuntimeError, match="column taps out of range"):
        _cpu.adaptive_conv_forward_resampled(x, w, 1, rows, (cols[0] + 2, cols[1]))
    with pytest.raises(RuntimeError, match="pads the resized input"):
        _cpu.adaptive_conv_forward_resampled(x, w, 3, rows, cols)


def test_adaptive_conv_bicubic_front_takes_the_fused_path_only_without_gradients():
    from upcli.kernels import adaptive_conv, adaptive_conv_bicubic

    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 6, 5, 8, generator=g), torch.rand(1, 9, 17, 5, 5, generator=g)
    composed = adaptive_conv(F.interpolate(x, size=(9, 17), mode="bicubic", align_corners=False), w, "replicate")
    with torch.no_grad():
        torch.testing.assert_close(adaptive_conv_bicubic(x, w, "replicate"), composed)
    x.requires_grad_(True)
    out = adaptive_conv_bicubic(x, w, "replicate")  # autograd: the composition
    out.sum().backward()
    assert out.grad_fn is not None and x.grad is not None and x.grad.shape == x.shape
    torch.testing.assert_close(out.detach(), composed)
    with pytest.raises(ValueError, match="pads the resized"):
        adaptive_conv_bicubic(x, w, "valid")
    with pytest.raises(ValueError, match="expected x"):
        adaptive_conv_bicubic(x[0], w)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, C, H, W, k", SHAPES)
def test_forward_resampled_rounds_to_a_16_bit_output_as_torch_does(B, C, H, W, k, out_dtype):
    """The rounded output (no float32 one made) has the bits of the float32 output's ``.to(out_dtype)``, for
    values that round, overflow float16, fall below its normal range, and are infinite; NaN where it has NaN."""
    from upcli.kernels.adaptive_conv import bicubic_taps

    g = torch.Generator().manual_seed(B * 1000 + C * 10 + k)
    x, w = torch.randn(B, C, max(H // 2, 1), max(W // 2, 1), generator=g), torch.rand(B, H, W, k, k, generator=g)
    x[0, 0] *= 1e5  # float16 overflows to inf
    x[-1, -1] *= 1e-6  # float16 subnormals
    x[0, -1, 0, 0], x[-1, 0, -1, -1] = float("nan"), float("inf")
    mode = 2 if min(H, W) <= k // 2 else 1
    rows, cols = bicubic_taps(x.shape[2], H), bicubic_taps(x.shape[3], W)
    want = _cpu.adaptive_conv_forward_resampled(x, w, mode, rows, cols).to(out_dtype)
    got = _cpu.adaptive_conv_forward_resampled(x, w, mode, rows, cols, out_dtype)
    nan = torch.isnan(want)  # any NaN (torch's vectorised bfloat16 rounding writes 0xFFFF, its scalar one 0x7FC0)
    assert got.dtype == out_dtype and torch.equal(torch.isnan(got), nan) and nan.any()
    assert torch.isinf(want).any() or out_dtype == torch.bfloat16  # float16 overflows
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
    with pytest.raises(RuntimeError, match="out_dtype"):
        _cpu.adaptive_conv_forward_resampled(x.double(), w.double(), mode, rows, cols, out_dtype)


def test_adaptive_conv_bicubic_out_dtype_equals_rounding_its_output():
    from upcli.kernels import adaptive_conv_bicubic

    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 6, 5, 8, generator=g), torch.rand(1, 9, 17, 5, 5, generator=g)
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        for backend in ("cpu", "reference"):
            got = adaptive_conv_bicubic(x, w, "replicate", backend=backend, out_dtype=dtype)
            assert got.dtype == dtype
            assert torch.equal(got, adaptive_conv_bicubic(x, w, "replicate", backend=backend).to(dtype))
