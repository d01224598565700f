"""Benchmark of upcli.kernels against the usual ways to write the same op, in one run on one device.

    python -m upcli.kernels.bench                              # CPU: C = 384, k = 7, 56^2 .. 448^2
    python -m upcli.kernels.bench --device cuda --sizes 224 448
    python -m upcli.kernels.bench --sizes 224 --no-compile --json bench.json
    python -m upcli.kernels.bench --device cuda --grid 32 --sizes 448 896   # NAF's attention setting, C = 384

For ``adaptive_conv`` it times the unfold reference, eager shift-and-accumulate, ``torch.compile`` of that, and
our op, forward alone and forward + backward; then ``neighbour_logits`` (32-d keys) against unfold + product; then
``neighbourhood_attention`` from a --grid x --grid feature map to each size (4 heads of 32 dims, C channels, k x k)
against its gathering (unfold-form) reference and an eager loop over the taps, forward and forward + backward
(``upcli`` is the fused Triton forward on CUDA and the C++ kernels on the CPU; ``upcli blocked`` the blocked-GEMM
form).
Each row gives ms, GB/s and GFLOP/s, also as fractions of this device's measured copy bandwidth and sgemm
rate, and the peak extra memory over the inputs. Exits 1 if any implementation disagrees with the reference.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from .adaptive_conv import adaptive_conv, neighbour_logits
from .neighbourhood_attention import _Cells, neighbourhood_attention, neighbourhood_attention_reference
from .reference import adaptive_conv_forward, adaptive_conv_unfold


_START = time.perf_counter()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, min_runs=3, budget_s=2.0):
    """Median seconds of ``fn()`` after one warm-up run."""
    fn()
    sync(device)
    times = []
    while len(times) < min_runs or (sum(times) < budget_s and len(times) < 20):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _libc():
    """glibc, set so that every allocation over 128 KiB is its own mapping: RSS then tracks live tensors."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; a fixed value also stops glibc from raising it
    return libc


_LIBC = _libc() if sys.platform.startswith("linux") else None


class PeakMemory:
    """Peak bytes allocated above what was live at entry: CUDA allocator stats, or the process's VmHWM on CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            if _LIBC is not None:  # hand freed heap memory back, so that reuse of it is not missed
                _LIBC.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
                f.write("5")
            self.base = _rss("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.peak = _rss("VmHWM") - self.base


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def device_rates(device) -> tuple[float, float]:
    """(copy GB/s counting read + write, sgemm GFLOP/s) measured here."""
    src = torch.empty(64 * 2**20, device=device).normal_()
    dst = torch.empty_like(src)
    copy = timed(lambda: dst.copy_(src), device)
    a = torch.randn(2048, 2048, device=device)
    gemm = timed(lambda: a @ a, device)
    return 2 * src.numel() * 4 / copy / 1e9, 2 * 2048**3 / gemm / 1e9


def shift_and_accumulate(x, w):
    """The eager baseline: one ``addcmul_`` per tap."""
    return adaptive_conv_forward(x, w, 1)


def run_case(name, fn, make_inputs, flops, nbytes, rates, device, backward, check=None):
    inputs = make_inputs()
    if backward:
        inputs = [t.requires_grad_() for t in inputs]

    def call():
        out = fn(*inputs)
        if backward:
            out.backward(torch.ones_like(out))
            for t in inputs:
                t.grad = None
        return out

    call()  # warm-up: compilation and autotuning stay out of the time and the memory
    with PeakMemory(device) as mem:
        out = call()
    ok = True if check is None else check(out.detach())
    seconds = timed(call, device)
    print(f"  [{time.perf_counter() - _START:6.1f} s] {name}", file=sys.stderr, flush=True)
    copy_gbs, gemm_gflops = rates
    gbs, gflops = nbytes / seconds / 1e9, flops / seconds / 1e9
    return {"impl": name, "ms": seconds * 1e3, "GB/s": gbs, "copy_frac": gbs / copy_gbs, "GFLOP/s": gflops,
            "sgemm_frac": gflops / gemm_gflops, "peak_MiB": mem.peak / 2**20, "agrees": ok}


def attention_tap_loop(query, key, value, k):
    """The eager baseline of ``neighbourhood_attention``: every tap's logits stacked, one softmax, then one
    ``addcmul_`` of each tap's values (per-tap tensors of ``heads * H * W`` and ``C * H * W``)."""
    (B, heads, d, H, W), (h, w) = query.shape, key.shape[3:]
    rows, cols = _Cells(H, h, k, query.device).taps, _Cells(W, w, k, query.device).taps
    cy = ((2 * torch.arange(H, device=query.device) + 1) * h).div(2 * H, rounding_mode="floor").clamp(max=h - 1)
    cx = ((2 * torch.arange(W, device=query.device) + 1) * w).div(2 * W, rounding_mode="floor").clamp(max=w - 1)
    row_of, col_of = rows[cy], cols[cx]  # [H, k], [W, k]: each pixel's window
    logits = torch.stack([(query * key[..., row_of[:, i, None], col_of[None, :, j]]).sum(2)
                          for i in range(k) for j in range(k)]) / d ** 0.5  # [k*k, B, heads, H, W]
    p = torch.softmax(logits, 0).mean(2, keepdim=True)  # [k*k, B, 1, H, W]
    out = value.new_zeros(B, value.shape[1], H, W)
    for t in range(k * k):
        out = out + p[t] * value[..., row_of[:, t // k, None], col_of[None, :, t % k]]
    return out


IMPLS = ("unfold", "eager", "torch.compile", "upcli")  # the adaptive_conv implementations it can time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224, 448])
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--kernel-size", type=int, default=7)
    parser.add_argument("--key-dim", type=int, default=32)
    parser.add_argument("--grid", type=int, default=14, help="neighbourhood_attention: the feature grid's side")
    parser.add_argument("--max-gib", type=float, default=6.0, help="skip implementations that would need more")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (its first call compiles)")
    parser.add_argument("--impls", default=",".join(IMPLS),
                        help="which adaptive_conv implementations to time (comma-separated)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    unknown = set(args.impls.split(",")) - set(IMPLS)
    if unknown:
        parser.error(f"--impls: unknown {', '.join(sorted(unknown))}; choose from {', '.join(IMPLS)}")
    device, C, k = torch.device(args.device), args.channels, args.kernel_size
    rates = device_rates(device)
    print(f"device {device}: copy {rates[0]:.1f} GB/s, sgemm {rates[1]:.1f} GFLOP/s, {torch.get_num_threads()} threads")
    compiled = None if args.no_compile else torch.compile(shift_and_accumulate, dynamic=False)
    rows, all_ok = [], True
    header = f"{'op':>16} {'size':>5} {'impl':>14} {'ms':>9} {'GB/s':>7} {'copy%':>6} {'GFLOP/s':>8} {'sgemm%':>6} {'peak MiB':>9} {'speedup':>8}"
    print(header + "   (speedup: vs eager for adaptive_conv, vs unfold for neighbour_logits and attention)")
    for size in args.sizes:
        H = W = size

        def conv_inputs():
            gen = torch.Generator(device=device).manual_seed(0)  # the same inputs on every call
            x = torch.randn(1, C, H, W, device=device, generator=gen)
            w = torch.softmax(torch.randn(1, H, W, k * k, device=device, generator=gen), -1).view(1, H, W, k, k)
            return [x, w]

        x0, w0 = conv_inputs()
        with torch.no_grad():
            truth = shift_and_accumulate(x0, w0)
        scale = truth.abs().max().item()

        def agrees(out, truth=truth, scale=scale):
            return bool(((out.float() - truth).abs().max() <= 1e-4 * scale + 1e-6).item())

        out_bytes = C * H * W * 4
        unfold_gib = C * k * k * H * W * 4 / 2**30
        impls = {"unfold": lambda x, w: adaptive_conv_unfold(x, w), "eager": shift_and_accumulate,
                 "torch.compile": compiled, "upcli": lambda x, w: adaptive_conv(x, w)}
        wanted = set(args.impls.split(","))
        impls = {name: fn for name, fn in impls.items() if name in wanted}
        for backward in (False, True):
            op = "adaptive_conv" + (" f+b" if backward else "")
            flops = 2 * C * H * W * k * k * (3 if backward else 1)
            nbytes = (2 * out_bytes + H * W * k * k * 4) * (3 if backward else 1)
            eager_ms = None
            for name, fn in impls.items():
                if fn is None or (name == "unfold" and unfold_gib * (3 if backward else 1.2) > args.max_gib):
                    print(f"{op:>16} {size:>5} {name:>14}   skipped" + (f" (needs ~{unfold_gib:.1f} GiB)" if fn else ""))
                    continue
                row = run_case(name, fn, conv_inputs, flops, nbytes, rates, device, backward, check=None if backward else agrees)
                row.update(op=op, size=size)
                eager_ms = row["ms"] if name == "eager" else eager_ms
                rows.append(row)
                all_ok &= row["agrees"]
                print(_format(row, eager_ms))
        # neighbour logits with 32-d keys: ours against unfold + product
        D = args.key_dim

        def key_inputs():
            return [torch.randn(1, D, H, W, device=device, generator=torch.Generator(device=device).manual_seed(1))]

        keys = key_inputs()[0]
        ref = (F.unfold(F.pad(keys, (k // 2,) * 4, mode="reflect"), k).view(1, D, k * k, H, W) * keys[:, :, None]).sum(1)

        def logits_agree(out, ref=ref):
            return bool(((out.float() - ref).abs().max() <= 1e-4 * ref.abs().max() + 1e-5).item())

        unfold_ms = None
        for name, fn in {"unfold": lambda t: (F.unfold(F.pad(t, (k // 2,) * 4, mode="reflect"), k).view(1, D, k * k, H, W) * t[:, :, None]).sum(1),
                         "upcli": lambda t: neighbour_logits(t, k)}.items():
            row = run_case(name, fn, key_inputs, 2 * D * H * W * k * k, (D * H * W + H * W * k * k) * 4, rates, device, False, logits_agree)
            row.update(op="neighbour_logits", size=size)
            unfold_ms = row["ms"] if name == "unfold" else unfold_ms
            rows.append(row)
            all_ok &= row["agrees"]
            print(_format(row, unfold_ms))
        rows_, ok = bench_attention(args, size, rates, device)
        rows += rows_
        all_ok &= ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "copy_GBps": rates[0], "sgemm_GFLOPs": rates[1], "rows": rows}, f, indent=1)
    if not all_ok:
        print("FAILED: an implementation disagrees with the reference", file=sys.stderr)
    return 0 if all_ok else 1


def bench_attention(args, size: int, rates, device) -> tuple[list[dict], bool]:
    """``neighbourhood_attention`` from a ``--grid`` map to ``size``: ours against the unfold form and the tap loop."""
    C, k, heads, d, g = args.channels, min(args.kernel_size, args.grid), 4, args.key_dim, args.grid

    def inputs():
        gen = torch.Generator(device=device).manual_seed(2)
        return [torch.randn(1, heads, d, size, size, device=device, generator=gen),
                torch.randn(1, heads, d, g, g, device=device, generator=gen),
                torch.randn(1, C, g, g, device=device, generator=gen)]

    with torch.no_grad():
        truth = neighbourhood_attention(*inputs(), k)
    scale = truth.abs().max().item()

    def agrees(out):
        return bool(((out.float() - truth).abs().max() <= 1e-4 * scale + 1e-6).item())

    impls = {"unfold": lambda q, kk, v: neighbourhood_attention_reference(q, kk, v, k),
             "eager": lambda q, kk, v: attention_tap_loop(q, kk, v, k),
             "upcli": lambda q, kk, v: neighbourhood_attention(q, kk, v, k)}
    # "upcli" is the fused Triton forward on CUDA, the C++ kernels on the CPU; this is the blocked-GEMM form
    impls["upcli blocked"] = lambda q, kk, v: neighbourhood_attention(q, kk, v, k, backend="blocked")
    unfold_gib = (C + heads * d) * k * k * size * size * 4 / 2**30
    rows, ok = [], True
    for backward in (False, True):
        op = "attention" + (" f+b" if backward else "")
        flops = 2 * (heads * d + C) * k * k * size * size * (3 if backward else 1)
        nbytes = ((C + heads * d) * size * size * 4) * (3 if backward else 1)
        base_ms = None
        for name, fn in impls.items():
            if not name.startswith("upcli") and unfold_gib * (3 if backward else 1.2) > args.max_gib:
                print(f"{op:>16} {size:>5} {name:>14}   skipped (the unfold form needs ~{unfold_gib:.1f} GiB)")
                continue
            row = run_case(name, fn, inputs, flops, nbytes, rates, device, backward, None if backward else agrees)
            row.update(op=op, size=size)
            base_ms = row["ms"] if name == "unfold" else base_ms
            rows.append(row)
            ok &= row["agrees"]
            print(_format(row, base_ms))
    return rows, ok


def _format(row, base_ms) -> str:
    speedup = f"{base_ms / row['ms']:.1f}x" if base_ms else ""
    flag = "" if row["agrees"] else "  DISAGREES"
    return (f"{row['op']:>16} {row['size']:>5} {row['impl']:>14} {row['ms']:>9.2f} {row['GB/s']:>7.1f} {row['copy_frac']:>6.0%} "
            f"{row['GFLOP/s']:>8.1f} {row['sgemm_frac']:>6.0%} {row['peak_MiB']:>9.1f} {speedup:>8}{flag}")


if __name__ == "__main__":
    sys.exit(main())
