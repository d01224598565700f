"""The public ops of upcli.kernels against unfold references, on every CPU backend (torchvision TestDeformConv style)."""


import pytest
import torch
import torch.nn.functional as F

from upcli.kernels import adaptive_conv, neighbour_logits, pac_conv
from upcli.kernels.adaptive_conv import _backend
from upcli.kernels.pac import pac_conv_reference
from upcli.kernels.reference import adaptive_conv_unfold

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5),
       torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


BACKENDS = ["reference"] + (["cpu"] if _backend("auto", torch.device("cpu")).__name__.endswith("_cpu") else [])


def inputs(B, C, H, W, k, padding, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    extra = k - 1 if padding == "valid" else 0
    x = torch.randn(B, C, H + extra, W + extra, generator=g, dtype=dtype)
    w = torch.randn(B, H, W, k, k, generator=g, dtype=dtype)
    return x, w


SHAPES = [(1, 3, 5, 7, 3), (2, 5, 9, 6, 5), (3, 19, 8, 11, 7), (2, 2, 4, 4, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["reflect", "replicate", "zeros", "valid"])
@pytest.mark.parametrize("shape", SHAPES)
def test_adaptive_conv_matches_unfold_forward_and_grads(backend, padding, shape):
    B, C, H, W, k = shape
    if padding == "reflect" and k // 2 >= min(H, W):
        pytest.skip("reflect needs H, W > k // 2")
    x, w = inputs(B, C, H, W, k, padding)
    x1, w1 = x.clone().requires_grad_(), w.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    ours = adaptive_conv(x1, w1, padding, backend=backend)
    expected = adaptive_conv_unfold(x2, w2, padding) if padding != "valid" else _valid_unfold(x2, w2)
    torch.testing.assert_close(ours, expected, **TOL[torch.float64])
    g = torch.randn_like(ours)
    ours.backward(g)
    expected.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL[torch.float64])
    torch.testing.assert_close(w1.grad, w2.grad, **TOL[torch.float64])


def _valid_unfold(x, w):
    B, H, W, k, _ = w.shape
    patches = F.unfold(x, k).view(B, x.shape[1], k * k, H, W)
    return torch.einsum("bcthw,bhwt->bchw", patches, w.reshape(B, H, W, k * k))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["reflect", "zeros"])
def test_adaptive_conv_gradcheck(backend, padding):
    x, w = inputs(2, 3, 5, 6, 3, padding)
    assert torch.autograd.gradcheck(lambda a, b: adaptive_conv(a, b, padding, backend=backend),
                                    (x.requires_grad_(), w.requires_grad_()), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_adaptive_conv_dtypes_accumulate_in_float32(backend, dtype):
    x, w = inputs(1, 4, 6, 7, 5, "reflect", dtype=torch.float32)
    out = adaptive_conv(x.to(dtype), w.to(dtype), backend=backend)
    assert out.dtype == dtype
    expected = adaptive_conv_unfold(x.to(dtype).double(), w.to(dtype).double())
    torch.testing.assert_close(out.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_batch_zero(backend):
    x, w = inputs(2, 6, 7, 5, 3, "replicate")
    x_cl = x.to(memory_format=torch.channels_last)
    w_nc = w.permute(0, 2, 1, 3, 4).contiguous().permute(0, 2, 1, 3, 4)
    assert not w_nc.is_contiguous()
    torch.testing.assert_close(adaptive_conv(x_cl, w_nc, "replicate", backend=backend), adaptive_conv_unfold(x, w, "replicate"))
    empty = adaptive_conv(x[:0], w[:0], "replicate", backend=backend)
    assert empty.shape == (0, 6, 7, 5)


def test_wrong_sizes_raise():
    x, w = inputs(1, 3, 5, 5, 3, "zeros")
    with pytest.raises(ValueError, match="k odd"):
        adaptive_conv(x, torch.zeros(1, 5, 5, 4, 4, dtype=x.dtype))
    with pytest.raises(ValueError, match="does not match weights"):
        adaptive_conv(x[:, :, :4], w)
    with pytest.raises(ValueError, match="padding must be one of"):
        adaptive_conv(x, w, "circular")
    with pytest.raises(ValueError, match="reflect padding needs"):
        adaptive_conv(torch.zeros(1, 1, 2, 2), torch.zeros(1, 2, 2, 5, 5))


def test_double_backward_raises():
    x, w = inputs(1, 2, 4, 4, 3, "zeros")
    x.requires_grad_()
    out = adaptive_conv(x, w, "zeros", backend="reference")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


def test_opcheck():
    x, w = inputs(2, 3, 5, 6, 3, "reflect", dtype=torch.float32)
    torch.library.opcheck(torch.ops.upcli.adaptive_conv.default, (x.requires_grad_(), w.requires_grad_(), 1, "reference"))
    keys = torch.randn(1, 4, 5, 6, requires_grad=True)
    torch.library.opcheck(torch.ops.upcli.neighbour_logits.default, (keys, 3, 0, "reference"))


def neighbour_unfold(keys, k, padding):
    B, D, H, W = keys.shape
    pad = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}[padding]
    patches = F.unfold(F.pad(keys, (k // 2,) * 4, mode=pad), k).view(B, D, k * k, H, W)
    return (patches * keys[:, :, None]).sum(1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("padding", ["reflect", "replicate", "zeros"])
def test_neighbour_logits_matches_unfold(backend, padding):
    keys = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    k1, k2 = keys.clone().requires_grad_(), keys.clone().requires_grad_()
    ours = neighbour_logits(k1, 5, padding, backend=backend)
    expected = neighbour_unfold(k2, 5, padding)
    assert ours.shape == (2, 25, 7, 9)
    torch.testing.assert_close(ours, expected, **TOL[torch.float64])
    g = torch.randn_like(expected)
    ours.backward(g)
    expected.backward(g)
    torch.testing.assert_close(k1.grad, k2.grad, **TOL[torch.float64])
    assert torch.autograd.gradcheck(lambda t: neighbour_logits(t, 3, padding, backend=backend),
                                    (torch.randn(1, 3, 4, 5, dtype=torch.float64, requires_grad=True),), fast_mode=True)


PAC_CASES = [dict(), dict(stride=2), dict(stride=(2, 1), padding=(1, 0), dilation=(2, 1)), dict(padding=2, dilation=2)]


@pytest.mark.parametrize("kwargs", PAC_CASES)
def test_pac_conv_matches_unfold_and_grads(kwargs):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64, generator=g)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=g)
    bias = torch.randn(4, dtype=torch.float64, generator=g)
    plain = F.conv2d(x, weight, bias, **kwargs)
    kernel = torch.rand(2, *plain.shape[2:], 3, 3, dtype=torch.float64, generator=g)
    args = [t.clone().requires_grad_() for t in (x, kernel, weight, bias)]
    ref_args = [t.clone().requires_grad_() for t in (x, kernel, weight, bias)]
    ours = pac_conv(*args, **kwargs)
    expected = pac_conv_reference(*ref_args, **kwargs)
    torch.testing.assert_close(ours, expected)
    # with an all-ones adaptive kernel PAC is a plain convolution
    torch.testing.assert_close(pac_conv(x, torch.ones_like(kernel), weight, bias, **kwargs), plain)
    grad = torch.randn_like(ours)
    ours.backward(grad)
    expected.backward(grad)
    for a, b in zip(args, ref_args):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("kwargs", [dict(stride=2), dict(stride=2, padding=1, output_padding=1), dict(stride=(2, 3), dilation=2, padding=(2, 1))])
def test_pac_conv_transposed_is_conv_transpose_with_ones(kwargs):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=g)
    weight = torch.randn(3, 6, 3, 3, dtype=torch.float64, generator=g)
    plain = F.conv_transpose2d(x, weight, **kwargs)
    ones = torch.ones(2, *plain.shape[2:], 3, 3, dtype=torch.float64)
    torch.testing.assert_close(pac_conv(x, ones, weight, transposed=True, **kwargs), plain)
    kernel = torch.rand_like(ones).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, kk, w: pac_conv(a, kk, w, transposed=True, **kwargs),
                                    (x.requires_grad_(), kernel, weight.requires_grad_()), fast_mode=True)


def test_pac_conv_never_saves_per_tap_tensors():
    """Backward must recompute taps: what autograd keeps is the inputs, not k*k products."""
    x = torch.randn(1, 8, 16, 16, requires_grad=True)
    kernel = torch.rand(1, 16, 16, 7, 7, requires_grad=True)
    weight = torch.randn(8, 8, 7, 7, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        pac_conv(x, kernel, weight, padding=3)
    assert sum(saved) <= x.numel() * 1.9 + kernel.numel() + weight.numel()
