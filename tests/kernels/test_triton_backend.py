"""The Triton backend of the adaptive convolution (``upcli.kernels._triton``) against a float64 unfold reference.

Without a GPU the kernels run in the Triton interpreter, on CPU tensors. ``TRITON_INTERPRET=1`` must be set
before ``import triton`` (``triton.language`` jit-compiles its own helpers at import), and other test files may
already have imported triton in this process. So the interpreter checks run in one worker subprocess started
with ``TRITON_INTERPRET=1``: each test below sends it the name of a ``case_*`` function of this file and its
arguments, and fails with the worker's traceback. The GPU test runs in-process, on the compiled kernels.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

ZEROS, REFLECT, REPLICATE, VALID = 0, 1, 2, 3
MODES = [ZEROS, REFLECT, REPLICATE, VALID]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Outputs in the input dtype are compared with these; float32 outputs (both gradients) always with float32's:
# products of half inputs are exact in float32, so only the accumulation order differs.
TOL = {
    "float32": {"rtol": 1e-5, "atol": 1e-5},
    "float16": {"rtol": 2e-3, "atol": 2e-3},
    "bfloat16": {"rtol": 1.6e-2, "atol": 1.6e-2},
}


# %%
# Float64 reference: F.pad + F.unfold
# -----------------------------------

def pad(x, r, mode):
    if mode == VALID or r == 0:
        return x
    return F.pad(x, (r, r, r, r), mode={ZEROS: "constant", REFLECT: "reflect", REPLICATE: "replicate"}[mode])


def patches(xpad, k, H, W):
    """``Tensor[B, C, k * k, H, W]``: tap ``i * k + j`` of pixel (h, w) is ``xpad[:, :, h + i, w + j]``."""
    return F.unfold(xpad, k).view(xpad.shape[0], xpad.shape[1], k * k, H, W)


def taps(weights):
    """``Tensor[B, H, W, k, k]`` -> ``Tensor[B, 1, k * k, H, W]``."""
    B, H, W, k, _ = weights.shape
    return weights.reshape(B, H, W, k * k).permute(0, 3, 1, 2).unsqueeze(1)


def ref_forward(x, weights, mode):
    _, H, W, k, _ = weights.shape
    return (patches(pad(x.double(), k // 2, mode), k, H, W) * taps(weights.double())).sum(2)


def ref_grad_input_padded(grad_out, weights):
    B, C, H, W = grad_out.shape
    k = weights.shape[-1]
    cols = grad_out.double().unsqueeze(2) * taps(weights.double())  # [B, C, k*k, H, W]
    return F.fold(cols.reshape(B, C * k * k, H * W), (H + k - 1, W + k - 1), k)  # fold = adjoint of unfold


def ref_grad_weights(grad_out, x, mode, k):
    B, _, H, W = grad_out.shape
    prod = patches(pad(x.double(), k // 2, mode), k, H, W) * grad_out.double().unsqueeze(2)
    return prod.sum(1).permute(0, 2, 3, 1).reshape(B, H, W, k, k)


def make_inputs(B, C, H, W, k, mode, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    extra = k - 1 if mode == VALID else 0
    x = torch.randn(B, C, H + extra, W + extra, generator=gen, dtype=torch.float64).to(dtype)
    weights = torch.randn(B, H, W, k, k, generator=gen, dtype=torch.float64).to(dtype)
    grad_out = torch.randn(B, C, H, W, generator=gen, dtype=torch.float64).to(dtype)
    return x, weights, grad_out


def check_all(ops, x, weights, grad_out, mode, dtype_name):
    """The three kernels of ``ops`` against the reference, on the inputs as given (any device, strides)."""
    k = weights.shape[-1]
    out = ops.adaptive_conv_forward(x, weights, mode)
    assert out.dtype == x.dtype and out.shape == grad_out.shape
    torch.testing.assert_close(out.double(), ref_forward(x, weights, mode), **TOL[dtype_name])

    grad_xpad = ops.adaptive_conv_grad_input_padded(grad_out, weights)
    assert grad_xpad.dtype == torch.float32
    torch.testing.assert_close(grad_xpad.double(), ref_grad_input_padded(grad_out, weights), **TOL["float32"])

    grad_w = ops.adaptive_conv_grad_weights(grad_out, x, mode, k)
    assert grad_w.dtype == torch.float32 and grad_w.shape == weights.shape
    torch.testing.assert_close(grad_w.double(), ref_grad_weights(grad_out, x, mode, k), **TOL["float32"])


# %%
# Cases: run inside the interpreter worker (names start with case_, so pytest does not collect them)
# --------------------------------------------------------------------------------------------------

def _ops(tiles=None):
    from upcli.kernels import _triton

    assert _triton.INTERPRET, "the worker must import triton with TRITON_INTERPRET=1"
    _triton._INTERPRETER_META.clear()
    _triton._INTERPRETER_META.update(BLOCK_C=16, BLOCK_W=32)  # the module's default
    if tiles is not None:
        _triton._INTERPRETER_META.update(BLOCK_C=tiles[0], BLOCK_W=tiles[1])
    return _triton


def case_matches_reference(mode, k, dtype, B=2, C=5, H=6, W=9, tiles=None):
    x, weights, grad_out = make_inputs(B, C, H, W, k, mode, DTYPES[dtype])
    check_all(_ops(tiles), x, weights, grad_out, mode, dtype)


def case_every_tap_gets_its_gradient(mode):
    # FeatUp's CUDA kernel indexes taps with blockIdx.z * blockIdx.z: only the 7 square taps of 49 get a gradient.
    ops = _ops()
    k = 7
    x, weights, grad_out = make_inputs(1, 3, 8, 10, k, mode, torch.float32, seed=1)
    grad_w = ops.adaptive_conv_grad_weights(grad_out, x, mode, k)
    torch.testing.assert_close(grad_w.double(), ref_grad_weights(grad_out, x, mode, k), **TOL["float32"])
    assert (grad_w.abs().amax(dim=(0, 1, 2)) > 0).all(), "a tap got no gradient"
    out = ops.adaptive_conv_forward(x, weights, mode)
    torch.testing.assert_close(out.double(), ref_forward(x, weights, mode), **TOL["float32"])


def case_neighbour_logits(mode):
    # grad_weights(keys, keys) are the dot products of each key with its k x k neighbours; 4 x 4 tiles: all
    # channels in one block, border and interior tiles
    ops = _ops(tiles=(4, 4))
    k = 5
    keys = make_inputs(1, 4, 5, 12, k, mode, torch.float32, seed=2)[0]
    centre = keys[..., k // 2:keys.shape[2] - k // 2, k // 2:keys.shape[3] - k // 2] if mode == VALID else keys
    logits = ops.adaptive_conv_grad_weights(centre.contiguous(), keys, mode, k)
    torch.testing.assert_close(logits.double(), ref_grad_weights(centre, keys, mode, k), **TOL["float32"])
    torch.testing.assert_close(logits[..., k // 2, k // 2], centre.square().sum(1))


def case_strided_inputs():
    # strides are passed to the kernels, never assumed
    ops = _ops()
    B, C, H, W, k = 2, 6, 5, 7, 3
    x = torch.randn(B, W, H, C).permute(0, 3, 2, 1)  # channels-last-like
    weights = torch.randn(B, H, W, 2 * k, k)[:, :, :, ::2]
    grad_out = torch.randn(B, C, H, 2 * W)[..., ::2]
    assert not (x.is_contiguous() or weights.is_contiguous() or grad_out.is_contiguous())
    for mode in (ZEROS, REFLECT):
        check_all(ops, x, weights, grad_out, mode, "float32")


def case_empty_and_k1():
    ops = _ops()
    x, weights, grad_out = make_inputs(0, 3, 4, 5, 3, REFLECT, torch.float32)
    assert ops.adaptive_conv_forward(x, weights, REFLECT).shape == (0, 3, 4, 5)
    assert ops.adaptive_conv_grad_input_padded(grad_out, weights).shape == (0, 3, 6, 7)
    assert ops.adaptive_conv_grad_weights(grad_out, x, REFLECT, 3).shape == (0, 4, 5, 3, 3)
    x, weights, grad_out = make_inputs(1, 0, 4, 5, 3, ZEROS, torch.float32)
    assert ops.adaptive_conv_grad_weights(grad_out, x, ZEROS, 3).abs().sum() == 0
    # k = 1: a per-pixel scale, the same in every pad mode
    x, weights, _ = make_inputs(1, 3, 4, 5, 1, ZEROS, torch.float32)
    for mode in MODES:
        torch.testing.assert_close(ops.adaptive_conv_forward(x, weights, mode), x * weights[:, None, :, :, 0, 0])


def case_rejects_bad_inputs():
    ops = _ops()
    x, weights, grad_out = make_inputs(1, 2, 4, 5, 3, ZEROS, torch.float32)
    errors = [
        (ValueError, "pad_mode", lambda: ops.adaptive_conv_forward(x, weights, 4)),
        (ValueError, "does not fit", lambda: ops.adaptive_conv_forward(x, weights, VALID)),
        (ValueError, "does not fit", lambda: ops.adaptive_conv_forward(x[..., :4], weights, ZEROS)),
        (ValueError, "odd", lambda: ops.adaptive_conv_forward(x, torch.randn(1, 4, 5, 2, 2), ZEROS)),
        (ValueError, "k, k", lambda: ops.adaptive_conv_forward(x, torch.randn(1, 4, 5, 3, 1), ZEROS)),
        (ValueError, "reflect", lambda: ops.adaptive_conv_forward(x[..., :2, :], torch.randn(1, 2, 5, 5, 5), REFLECT)),
        (ValueError, "dimensions", lambda: ops.adaptive_conv_forward(x[0], weights, ZEROS)),
        (TypeError, "float32", lambda: ops.adaptive_conv_forward(x.double(), weights, ZEROS)),
        (ValueError, "do not match", lambda: ops.adaptive_conv_grad_input_padded(grad_out[:, :, :3], weights)),
        (ValueError, "odd", lambda: ops.adaptive_conv_grad_weights(grad_out, x, ZEROS, 4)),
        (ValueError, "does not match", lambda: ops.adaptive_conv_grad_weights(grad_out, x[:, :1], ZEROS, 3)),
    ]
    for error, match, call in errors:
        with pytest.raises(error, match=match):
            call()


def case_available():
    ops = _ops()
    assert ops.available("cpu") and ops.available(torch.device("cpu"))


def attention_inputs(B, heads, d, C, H, W, h, w, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = ((B, heads, d, H, W), (B, heads, d, h, w), (B, C, h, w))
    return [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]


def case_attention_matches_reference(shape, heads, d, dtype, tiles=None):
    """The fused forward (and the gradients through it) against the float64 gathering reference."""
    from upcli.kernels import _triton_attention, neighbourhood_attention
    from upcli.kernels.neighbourhood_attention import neighbourhood_attention_reference

    _triton_attention._INTERPRETER_META.update(BLOCK_C=16, BLOCK_W=16)
    if tiles is not None:
        _triton_attention._INTERPRETER_META.update(BLOCK_C=tiles[0], BLOCK_W=tiles[1])
    H, W, h, w, k = shape
    q, key, v = attention_inputs(2, heads, d, 5, H, W, h, w, DTYPES[dtype])
    out = neighbourhood_attention(q, key, v, k, scale=0.7, backend="triton")
    assert out.dtype == v.dtype and out.shape == (2, 5, H, W)
    ref = neighbourhood_attention_reference(*(t.double() for t in (q, key, v)), k, scale=0.7)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, key, v), grad)
    want = torch.autograd.grad(ref, (q, key, v), grad.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])


# %%
# The interpreter worker
# ----------------------

WORKER = r"""
import dataclasses, importlib.util, json, sys, time, traceback

spec = importlib.util.spec_from_file_location("_triton_backend_cases", sys.argv[1])
cases = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cases)
try:  # the interpreter's int32 overflow checks double its run time; these sizes cannot overflow
    from triton.runtime import interpreter
    interpreter.interpreter_builder.options = dataclasses.replace(
        interpreter.interpreter_builder.options, sanitize_overflow=False)
except (ImportError, AttributeError, TypeError):
    pass
print("@@ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    start = time.perf_counter()
    try:
        getattr(cases, request["case"])(**request["kwargs"])
        reply = {"ok": True}
    except BaseException:
        reply = {"ok": False, "error": traceback.format_exc()}
    reply["seconds"] = time.perf_counter() - start
    print("@@reply " + json.dumps(reply), flush=True)
"""


class Interpreter:
    """A Python subprocess with ``TRITON_INTERPRET=1`` that runs this file's ``case_*`` functions on request."""

    def __init__(self, timeout_s=300.0):
        env = dict(os.environ, TRITON_INTERPRET="1")
        self.timeout_s = timeout_s
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, __file__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self._read_until("@@ready")

    def _read_until(self, marker):
        deadline = time.monotonic() + self.timeout_s
        while True:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                pytest.fail(f"the Triton interpreter worker gave no answer in {self.timeout_s} s")
            line = self.proc.stdout.readline()
            if not line:
                pytest.fail(f"the Triton interpreter worker exited with code {self.proc.wait()}")
            if line.startswith(marker):
                return line[len(marker):]

    def run(self, case, **kwargs):
        self.proc.stdin.write(json.dumps({"case": case, "kwargs": kwargs}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._read_until("@@reply "))
        if not reply["ok"]:
            pytest.fail(f"{case}({kwargs}) in the Triton interpreter:\n{reply['error']}", pytrace=False)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def interpreter():
    pytest.importorskip("triton")
    if not hasattr(select, "select") or sys.platform == "win32":
        pytest.skip("the interpreter worker reads its pipe with select()")
    worker = Interpreter()
    yield worker
    worker.close()


# %%
# Tests
# -----

@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(interpreter, mode, k, dtype):
    interpreter.run("case_matches_reference", mode=mode, k=k, dtype=dtype)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_bfloat16(interpreter, mode):
    interpreter.run("case_matches_reference", mode=mode, k=3, dtype="bfloat16", B=1)


@pytest.mark.parametrize("mode", MODES)
def test_matches_reference_with_small_tiles(interpreter, mode):
    # 4 x 4 tiles on W = 12: border tiles (remapped columns) and an interior one (no remapping), a channel
    # remainder (C = 6) and grad-weights' loop over channel blocks
    interpreter.run("case_matches_reference", mode=mode, k=3, dtype="float32", B=1, C=6, H=5, W=12, tiles=[4, 4])


@pytest.mark.parametrize("mode", [REFLECT, ZEROS])
def test_every_tap_gets_its_gradient(interpreter, mode):
    interpreter.run("case_every_tap_gets_its_gradient", mode=mode)


@pytest.mark.parametrize("mode", MODES)
def test_neighbour_logits(interpreter, mode):
    interpreter.run("case_neighbour_logits", mode=mode)


def test_strided_inputs(interpreter):
    interpreter.run("case_strided_inputs")


def test_empty_and_k1(interpreter):
    interpreter.run("case_empty_and_k1")


def test_rejects_bad_inputs(interpreter):
    interpreter.run("case_rejects_bad_inputs")


def test_available_when_interpreting(interpreter):
    interpreter.run("case_available")


# (H, W, h, w, k): odd, non-square; output larger than, smaller than and a whole multiple of the grid
ATTENTION_SHAPES = [(9, 13, 5, 7, 3), (3, 4, 5, 7, 5), (12, 21, 4, 7, 3), (7, 5, 7, 6, 1)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_attention_matches_reference(interpreter, shape):
    # 3 heads and d = 5: both padded to powers of two in the kernel
    interpreter.run("case_attention_matches_reference", shape=shape, heads=3, d=5, dtype="float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_attention_half_types(interpreter, dtype):
    interpreter.run("case_attention_matches_reference", shape=(9, 13, 5, 7, 3), heads=2, d=4, dtype=dtype)


def test_attention_with_small_tiles(interpreter):
    # 4 x 4 tiles: channel blocks with a remainder (C = 5) and several W tiles with a ragged last one
    interpreter.run("case_attention_matches_reference", shape=(6, 14, 3, 5, 3), heads=1, d=3, dtype="float32",
                    tiles=[4, 4])


def _load_fresh(name):
    spec = importlib.util.spec_from_file_location(name, importlib.util.find_spec("upcli.kernels._triton").origin)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_imports_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    module = _load_fresh("_upcli_triton_without_triton")
    assert not module.HAS_TRITON
    assert not module.available("cpu") and not module.available("cuda")


def test_import_needs_no_gpu():
    from upcli.kernels import _triton

    # compiled kernels (no TRITON_INTERPRET) cannot take CPU tensors, so the CPU is only available when interpreting
    assert _triton.available("cpu") == _triton.INTERPRET
    assert _triton.available("cuda") == _triton.HAS_TRITON


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_gpu_matches_reference(mode):
    pytest.importorskip("triton")
    from upcli.kernels import _triton

    if _triton.INTERPRET:
        pytest.skip("TRITON_INTERPRET=1: the compiled kernels are not in use")
    # C = 37: a remainder in every channel block; C = 32 and 100: grad-weights' one-block and looped paths.
    # W = 300: border and interior tiles whatever BLOCK_W the autotuner picks.
    for C, k in [(37, 7), (32, 5), (100, 3)]:
        x, weights, grad_out = (t.cuda() for t in make_inputs(2, C, 13, 300, k, mode, torch.float32))
        check_all(_triton, x, weights, grad_out, mode, "float32")
    for dtype in ["float16", "bfloat16"]:
        x, weights, grad_out = (t.cuda() for t in make_inputs(2, 24, 11, 300, 7, mode, DTYPES[dtype]))
        check_all(_triton, x, weights, grad_out, mode, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_gpu_attention_matches_reference(shape):
    pytest.importorskip("triton")
    from upcli.kernels import neighbourhood_attention
    from upcli.kernels.neighbourhood_attention import neighbourhood_attention_reference

    H, W, h, w, k = shape
    q, key, v = (t.detach().cuda() for t in attention_inputs(2, 3, 5, 70, H, W, h, w, torch.float32))
    out = neighbourhood_attention(q, key, v, k, backend="triton")
    ref = neighbourhood_attention_reference(q.double(), key.double(), v.double(), k)
    torch.testing.assert_close(out.double(), ref, **TOL["float32"])
