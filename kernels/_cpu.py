"""Fast CPU backends of ``adaptive_conv`` and ``neighbourhood_attention``: C++/OpenMP kernels compiled at first use.

    out[b, c, h, w] = sum_ij weights[b, h, w, i, j] * xpad[b, c, h + i, w + j]     (adaptive_conv)

The kernels live in ``csrc/adaptive_conv_cpu.cpp`` and ``csrc/neighbourhood_attention_cpu.cpp`` (whose header
says how it works), built into one extension. Nothing is compiled at install: the first call to
:func:`available` (or to any op) builds them with :func:`torch.utils.cpp_extension.load` into torch's extension
cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``) and later processes reuse the build.
The build is specific to this CPU (``-march=native``), so the cache name carries a hash of the CPU's features,
the source and the flags. If no build works (no compiler, no ninja, a build error, or ``UPCLI_NO_CPP_KERNELS=1``),
:func:`available` returns False after one warning, and the caller uses the PyTorch path.

The adaptive_conv implementation:
- one pass over ``x`` and one write of ``out`` per op; rows are padded into per-thread scratch (the padding mode
  is an index remap at load time), so no temporary is larger than a few rows and the hot loops have no branches;
- vectorised over ``w`` (weights transposed per row to ``[k*k, W]``), register-blocked over channels;
- threads over (batch, row blocks) with ``at::parallel_for`` (honours ``torch.set_num_threads``);
- accumulates in the input dtype (float32 or float64). Half types are the caller's to upcast.

All functions take contiguous CPU tensors of one dtype, float32 or float64. ``pad_mode``: 0 zeros, 1 reflect,
2 replicate, 3 valid (``x`` already padded by ``k // 2``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "adaptive_conv_forward",
    "adaptive_conv_forward_resampled",
    "adaptive_conv_grad_input_padded",
    "adaptive_conv_grad_weights",
    "available",
    "neighbourhood_attention_backward",
    "neighbourhood_attention_forward",
    "unavailable_reason",
]

_CSRC = Path(__file__).resolve().parent / "csrc"
# source file -> the TORCH_LIBRARY namespace it registers; all are built into one extension
_SOURCES = {"adaptive_conv_cpu.cpp": "upcli_adaptive_conv_cpu",
            "neighbourhood_attention_cpu.cpp": "upcli_neighbourhood_attention_cpu"}
_DISABLE_ENV = "UPCLI_NO_CPP_KERNELS"
# Flag sets tried in order; the later ones only if the earlier fail to build (e.g. a compiler without
# -march=native or without OpenMP).
_FLAG_SETS = (
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-fopenmp"],
    ["-O3"],
)

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "reason": str | None, "flags": list[str]


def _cpu_fingerprint() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _one_line(exc: BaseException) -> str:
    """The exception on one short line: the first compiler ``error:`` line of a build log, else its first line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error:" in ln), lines[0] if lines else "")
    text = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _import_cpp_extension():
    """``torch.utils.cpp_extension``, without its import-time "No CUDA runtime is found" log line (a CUDA build of
    torch on a CPU machine prints it; this path never uses CUDA)."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _build() -> tuple[bool, str | None, list[str]]:
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return False, f"disabled by {_DISABLE_ENV}={os.environ[_DISABLE_ENV]}", []
    missing = [name for name in _SOURCES if not (_CSRC / name).is_file()]
    if missing:
        return False, f"source {missing[0]} not found in {_CSRC}", []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"no C++ compiler found ({compiler!r} is not on PATH)", []
    try:
        cpp_extension = _import_cpp_extension()

        if not cpp_extension.is_ninja_available():
            return False, "ninja is not installed (pip install ninja)", []
    except Exception as exc:  # noqa: BLE001 - any failure here only means "no C++ path"
        return False, _one_line(exc), []

    source = b"\0".join((_CSRC / name).read_bytes() for name in _SOURCES)
    reason = None
    for flags in _FLAG_SETS:
        tag = hashlib.sha1(
            b"\0".join([source, " ".join(flags).encode(), _cpu_fingerprint().encode(), torch.__version__.encode()])
        ).hexdigest()[:12]
        try:
            cpp_extension.load(
                name=f"upcli_adaptive_conv_cpu_{tag}",
                sources=[str(_CSRC / name) for name in _SOURCES],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                is_python_module=False,
                verbose=False,
            )
            for namespace in _SOURCES.values():
                getattr(torch.ops, namespace).forward  # noqa: B018 - the ops are registered
            return True, None, flags
        except Exception as exc:  # noqa: BLE001 - report the first failure, try simpler flags
            reason = reason or _one_line(exc)
    return False, reason, []


def available() -> bool:
    """True if the C++ kernels are built (building them on the first call); never raises.

    When False, one ``RuntimeWarning`` per process says why; :func:`unavailable_reason` repeats it.
    """
    if "ok" not in _state:
        with _lock:
            if "ok" not in _state:
                try:
                    ok, reason, flags = _build()
                except Exception as exc:  # noqa: BLE001 - availability must not crash the caller
                    ok, reason, flags = False, _one_line(exc), []
                _state.update(reason=reason, flags=flags)
                if not ok:
                    warnings.warn(
                        f"upcli.kernels: C++ CPU path unavailable ({reason}); using the slower PyTorch path",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                _state["ok"] = ok
    return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None if it is True or was not asked yet)."""
    return _state.get("reason")  # type: ignore[return-value]


def _ops(namespace: str = "upcli_adaptive_conv_cpu"):
    if not available():
        raise RuntimeError(f"upcli.kernels: C++ CPU path unavailable ({unavailable_reason()})")
    return getattr(torch.ops, namespace)


def adaptive_conv_forward(x: Tensor, weights: Tensor, pad_mode: int) -> Tensor:
    """``out[b, c, h, w] = sum_ij weights[b, h, w, i, j] * xpad[b, c, h + i, w + j]``.

    Args:
        x: ``Tensor[B, C, H, W]``, or ``Tensor[B, C, H + k - 1, W + k - 1]`` with ``pad_mode=3`` (valid).
        weights: ``Tensor[B, H, W, k, k]``, k odd.
        pad_mode: 0 zeros, 1 reflect (needs k // 2 < H, W), 2 replicate, 3 valid.

    Returns:
        ``Tensor[B, C, H, W]``.
    """
    return _ops().forward(x, weights, int(pad_mode))


def adaptive_conv_forward_resampled(x: Tensor, weights: Tensor, pad_mode: int, rows: tuple[Tensor, Tensor],
                                    cols: tuple[Tensor, Tensor], out_dtype: torch.dtype | None = None) -> Tensor:
    """:func:`adaptive_conv_forward` of ``x`` (``Tensor[B, C, h, w]``) resized to the weights' ``(H, W)`` by 4-tap
    tables ``rows = (first int64 [H], weight float64 [H, 4])`` and ``cols`` (``[W]``, ``[W, 4]``) from
    ``adaptive_conv.bicubic_taps``; each resized row is made per thread when the kernel needs it, never stored.
    ``out_dtype`` float16 or bfloat16 (from float32): the output is rounded as ``.to(out_dtype)`` rounds, row block
    by row block, and no float32 output is made."""
    return _ops().forward_resampled(x, weights, int(pad_mode), *rows, *cols, out_dtype)


def adaptive_conv_grad_input_padded(grad_out: Tensor, weights: Tensor) -> Tensor:
    """Gradient w.r.t. the padded input: ``Tensor[B, C, H + k - 1, W + k - 1]``.

    ``grad_xpad[b, c, h + i, w + j] += weights[b, h, w, i, j] * grad_out[b, c, h, w]``, computed as a gather.
    Folding it back to ``x`` (the padding's adjoint) is the caller's.
    """
    return _ops().grad_input_padded(grad_out, weights)


def adaptive_conv_grad_weights(grad_out: Tensor, x: Tensor, pad_mode: int, k: int) -> Tensor:
    """Gradient w.r.t. the weights: ``Tensor[B, H, W, k, k]``, ``sum_c grad_out[b, c, h, w] * xpad[b, c, h + i, w + j]``.

    With ``grad_out = x = keys`` this is the neighbour logits (each key dotted with its k x k neighbours).
    """
    return _ops().grad_weights(grad_out, x, int(pad_mode), int(k))


def neighbourhood_attention_forward(query: Tensor, key: Tensor, value: Tensor, k: int, scale: float) -> Tensor:
    """``upcli.kernels.neighbourhood_attention``'s forward (contiguous CPU tensors of one dtype, float32 or
    float64): ``Tensor[B, C, H, W]``."""
    return _ops("upcli_neighbourhood_attention_cpu").forward(query, key, value, int(k), float(scale))


def neighbourhood_attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, k: int,
                                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Its gradients of query, key and value; the probabilities are recomputed, nothing per tap is kept."""
    return _ops("upcli_neighbourhood_attention_cpu").backward(grad_out, query, key, value, int(k), float(scale))


if __name__ == "__main__":
    # Benchmark: python -m upcli.kernels._cpu
    import time

    def _median_ms(fn, reps=7):
        fn()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2] * 1e3

    t0 = time.perf_counter()
    ok = available()
    print(
        f"available={ok} ({time.perf_counter() - t0:.1f} s incl. build or cache load), threads={torch.get_num_threads()}"
    )
    if ok:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 384, 224, 224, generator=g)
        w = torch.softmax(torch.randn(1, 224, 224, 49, generator=g), -1).view(1, 224, 224, 7, 7)
        go = torch.randn(1, 384, 224, 224, generator=g)
        keys = torch.randn(1, 32, 224, 224, generator=g)
        f = _median_ms(lambda: adaptive_conv_forward(x, w, 1))
        gi = _median_ms(lambda: adaptive_conv_grad_input_padded(go, w))
        gw = _median_ms(lambda: adaptive_conv_grad_weights(go, x, 1, 7))
        nl = _median_ms(lambda: adaptive_conv_grad_weights(keys, keys, 1, 7))
        print(
            f"C=384 224x224 k=7 fp32: forward {f:.1f} ms, grad_input {gi:.1f} ms, grad_weights {gw:.1f} ms, "
            f"total {f + gi + gw:.1f} ms; neighbour logits C=32: {nl:.1f} ms"
        )
