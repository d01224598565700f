"""upcli.kernels.neighbourhood_attention: the blocked and C++ backends against the gathering reference (forward and
gradients), gradcheck, opcheck, the window geometry, and what it never saves."""

import pytest
import torch

from upcli.kernels import neighbourhood_attention
from upcli.kernels.neighbourhood_attention import neighbourhood_attention_reference, window_starts

# (H, W, h, w, k): odd and non-square, output smaller than, larger than and equal to the grid; whole multiples of
# the grid (every cell the same size: the blocks are views) on both axes, on one, and on none
SHAPES = [(9, 13, 5, 7, 3), (3, 4, 5, 7, 5), (11, 6, 6, 5, 1), (20, 17, 7, 6, 5), (5, 7, 5, 7, 3), (2, 3, 3, 3, 3),
          (12, 21, 4, 7, 3), (12, 17, 4, 6, 3)]


def _backend(name: str) -> str:
    """The backend, or a skip where the C++ kernels do not build here."""
    if name == "cpp":
        from upcli.kernels import _cpu

        if not _cpu.available():
            pytest.skip(f"C++ CPU path unavailable: {_cpu.unavailable_reason()}")
    return name


BACKENDS = ["blocked", "cpp"]


def inputs(B, heads, d, C, H, W, h, w, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, heads, d, H, W, dtype=dtype, generator=gen).requires_grad_()
    k = torch.randn(B, heads, d, h, w, dtype=dtype, generator=gen).requires_grad_()
    v = torch.randn(B, C, h, w, dtype=dtype, generator=gen).requires_grad_()
    return q, k, v


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("heads", [1, 3])
def test_matches_reference_forward_and_gradients(shape, heads, backend):
    H, W, h, w, k = shape
    q, key, v = inputs(2, heads, 4, 5, H, W, h, w)
    out = neighbourhood_attention(q, key, v, k, backend=_backend(backend))
    ref = neighbourhood_attention_reference(q, key, v, k)
    assert out.shape == (2, 5, H, W) and out.dtype == v.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, key, v), grad), torch.autograd.grad(ref, (q, key, v), grad)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_blocks_of_a_few_cell_rows_give_the_same(monkeypatch):
    import importlib

    na = importlib.import_module("upcli.kernels.neighbourhood_attention")  # the package exports a function so named

    q, key, v = inputs(2, 2, 4, 5, 13, 18, 5, 6)
    whole = neighbourhood_attention(q, key, v, 3, backend="blocked")
    grads = torch.autograd.grad(whole.square().sum(), (q, key, v))
    monkeypatch.setattr(na, "_BLOCK_ELEMENTS", 1)  # one cell row per block
    blocked = neighbourhood_attention(q, key, v, 3, backend="blocked")
    torch.testing.assert_close(blocked, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(blocked.square().sum(), (q, key, v)), grads):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_and_partial_gradients(backend):
    q, key, v = inputs(1, 2, 3, 4, 7, 5, 4, 6)
    out = neighbourhood_attention(q, key, v.detach(), 3, scale=0.7, backend=_backend(backend))
    ref = neighbourhood_attention_reference(q, key, v.detach(), 3, scale=0.7)
    torch.testing.assert_close(out, ref)
    (gk,) = torch.autograd.grad(out.sum(), (key,))
    (rk,) = torch.autograd.grad(ref.sum(), (key,))
    torch.testing.assert_close(gk, rk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    q, key, v = inputs(2, 2, 3, 2, 5, 7, 4, 3)
    backend = _backend(backend)
    assert torch.autograd.gradcheck(lambda a, b, c: neighbourhood_attention(a, b, c, 3, backend=backend), (q, key, v))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    q, key, v = inputs(2, 2, 3, 4, 7, 5, 4, 6)
    torch.library.opcheck(torch.ops.upcli.neighbourhood_attention.default, (q, key, v, 3, 0.5, _backend(backend)))
    grad = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    for mask in ([True, True, True], [False, True, False], [False, False, True]):
        torch.library.opcheck(torch.ops.upcli.neighbourhood_attention_backward.default,
                              (grad, q.detach(), key.detach(), v.detach(), 3, 0.5, mask, backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_value_gives_the_constant(backend):
    q, key, _ = inputs(2, 4, 8, 3, 13, 9, 5, 4, dtype=torch.float32)
    v = torch.full((2, 3, 5, 4), 2.5)
    torch.testing.assert_close(neighbourhood_attention(q * 10, key, v, 3, backend=_backend(backend)),
                               torch.full((2, 3, 13, 9), 2.5))


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_and_half_follow_value_dtype(backend):
    backend = _backend(backend)
    q, key, v = inputs(1, 2, 4, 3, 6, 5, 4, 4, dtype=torch.float32)
    out = neighbourhood_attention(q, key, v, 3, backend=backend)
    torch.testing.assert_close(out, neighbourhood_attention_reference(q, key, v, 3), rtol=1e-5, atol=1e-5)
    half = neighbourhood_attention(q.bfloat16(), key.bfloat16(), v.bfloat16(), 3, backend=backend)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out, rtol=5e-2, atol=5e-2)


def test_window_geometry():
    """Centre cell floor((y + 0.5) h / H), window shifted (never padded) at the borders."""
    assert window_starts(8, 4, 3).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert window_starts(4, 8, 3).tolist() == [0, 2, 4, 5]
    assert window_starts(5, 5, 1).tolist() == [0, 1, 2, 3, 4]
    assert window_starts(3, 5, 5).tolist() == [0, 0, 0]
    # one-hot values: the output at a pixel is the attention mass on that cell, zero outside its window
    h, w, H, W, k = 5, 6, 7, 9, 3
    q, key, _ = inputs(1, 1, 2, 1, H, W, h, w)
    rows, cols = window_starts(H, h, k), window_starts(W, w, k)
    for cell in [(0, 0), (2, 3), (4, 5)]:
        v = torch.zeros(1, 1, h, w, dtype=torch.float64)
        v[0, 0, cell[0], cell[1]] = 1
        out = neighbourhood_attention(q.detach(), key.detach(), v, k)[0, 0]
        inside = ((rows <= cell[0]) & (cell[0] < rows + k))[:, None] & ((cols <= cell[1]) & (cell[1] < cols + k))
        assert (out[~inside] == 0).all() and (out[inside] > 0).all()


@pytest.mark.parametrize("k", [0, 5, -1])
def test_wrong_k_raises(k):
    q, key, v = inputs(1, 1, 2, 1, 6, 6, 4, 6)
    with pytest.raises(ValueError, match="k must be"):
        neighbourhood_attention(q, key, v, k)


def test_wrong_shapes_raise():
    q, key, v = inputs(1, 2, 3, 4, 6, 6, 4, 5)
    with pytest.raises(ValueError):
        neighbourhood_attention(q[:, :1], key, v, 3)
    with pytest.raises(ValueError):
        neighbourhood_attention(q, key, v[..., :4], 3)
    with pytest.raises(ValueError):
        neighbourhood_attention(q[0], key, v, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_never_saves_per_tap_tensors(backend):
    q, key, v = inputs(1, 2, 4, 8, 16, 16, 6, 6, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        neighbourhood_attention(q, key, v, 5, backend=_backend(backend))
    assert sum(saved) <= q.numel() + key.numel() + v.numel()


def test_unknown_backend_raises():
    q, key, v = inputs(1, 1, 2, 1, 6, 6, 4, 6)
    with pytest.raises(ValueError, match="backend must be one of"):
        neighbourhood_attention(q, key, v, 3, backend="cuda")


def test_triton_backend_on_cpu_needs_the_interpreter():
    from upcli.kernels import _triton

    if _triton.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the interpreter runs Triton on the CPU")
    q, key, v = inputs(1, 1, 2, 1, 6, 6, 4, 6, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="Triton backend is not available on cpu"):
        neighbourhood_attention(q, key, v, 3, backend="triton")
    torch.testing.assert_close(neighbourhood_attention(q, key, v, 3), neighbourhood_attention(q, key, v, 3,
                                                                                             backend="blocked"))


def test_auto_is_the_cpp_backend_on_the_cpu_where_it_builds():
    q, key, v = inputs(1, 2, 4, 3, 9, 11, 4, 5, dtype=torch.float32)
    auto = neighbourhood_attention(q, key, v, 3)
    torch.testing.assert_close(auto, neighbourhood_attention(q, key, v, 3, backend=_backend("cpp")), rtol=0, atol=0)


def test_cpp_backend_threads_give_the_same_gradients():
    """The window gradients are summed per thread, then reduced: 1 thread and 2 agree."""
    backend = _backend("cpp")
    q, key, v = inputs(2, 2, 4, 3, 17, 11, 5, 4)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = neighbourhood_attention(q, key, v, 3, backend=backend)
            results.append((out, *torch.autograd.grad(out.square().sum(), (q, key, v))))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cpp_backward_is_bit_exact_from_run_to_run():
    """Window gradients are summed per thread: each thread takes fixed rows, so repeated runs agree bit for bit
    (training resumes exactly)."""
    backend = _backend("cpp")
    q, key, v = inputs(2, 2, 8, 6, 40, 33, 5, 4, dtype=torch.float32)
    grads = []
    for _ in range(6):
        out = neighbourhood_attention(q, key, v, 3, backend=backend)
        grads.append(torch.autograd.grad(out.square().sum(), (q, key, v)))
    for other in grads[1:]:
        assert all(torch.equal(a, b) for a, b in zip(grads[0], other))
