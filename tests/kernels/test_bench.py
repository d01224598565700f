"""kernels/bench.py: it refuses unknown implementations, and its exit status says whether every one agreed."""

import json
import subprocess
import sys

ARGS = ["--sizes", "8", "--channels", "4", "--no-compile", "--impls", "eager,upcli"]


def run_bench(code: str, tmp_path) -> subprocess.CompletedProcess:
    # a subprocess: the bench sets glibc's mmap threshold for its memory figures, which would outlive a test
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)


def test_bench_rows_agree_and_go_to_json(tmp_path):
    out = tmp_path / "bench.json"
    done = run_bench(f"import sys, upcli.kernels.bench as b; sys.exit(b.main({ARGS + ['--json', str(out)]!r}))",
                     tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["op"], r["impl"]) for r in rows} >= {("adaptive_conv", "eager"), ("adaptive_conv", "upcli"),
                                                     ("adaptive_conv f+b", "upcli"), ("neighbour_logits", "upcli"),
                                                     ("attention", "unfold"), ("attention", "eager"),
                                                     ("attention f+b", "upcli"), ("attention", "upcli blocked")}
    assert all(r["agrees"] for r in rows)


def test_bench_exits_nonzero_when_an_implementation_disagrees(tmp_path):
    code = ("import sys, upcli.kernels.bench as b; b.adaptive_conv = lambda x, w: 2 * x; "
            f"sys.exit(b.main({ARGS!r}))")
    done = run_bench(code, tmp_path)
    assert done.returncode == 1
    assert "DISAGREES" in done.stdout and "FAILED" in done.stderr


def test_bench_refuses_an_unknown_implementation(tmp_path):
    done = run_bench(f"import upcli.kernels.bench as b; b.main({ARGS[:-1] + ['eager,fast']!r})", tmp_path)
    assert done.returncode == 2
    assert "unknown fast" in done.stderr.splitlines()[-1]
