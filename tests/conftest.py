"""Shared test fixtures."""

import socket
import subprocess
import sys

import pytest


@pytest.fixture
def plain_sgd():
    """A script preamble for DDP comparisons: Adam, AdamW and NAdam become plain SGD at the same lr."""
    return PLAIN_SGD


# Adaptive optimisers (Adam, AdamW, NAdam) turn a gradient at rounding level into a step of up to lr either way, so
# weights trained under DDP and in one process differ by ~lr wherever a gradient is ~0, and any "most elements
# agree" threshold sits on float noise. Scripts that compare them start with this preamble: plain SGD at the same
# lr, where the weights are start - lr * (sum of the gradients) and gradient noise stays at noise level.
PLAIN_SGD = (
    "import torch\n"
    "def _plain_sgd(params, lr=1e-3, **_):\n"
    "    return torch.optim.SGD(params, lr=lr)\n"
    "torch.optim.Adam = torch.optim.AdamW = torch.optim.NAdam = _plain_sgd\n"
)


@pytest.fixture
def torchrun():
    """``torchrun(*args, env=...)``: run ``args`` (a script, or ``-m module ...``) in 2 local torchrun processes."""

    def run(*args, env):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                               "127.0.0.1", "--master-port", str(port), *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=300)

    return run


@pytest.fixture
def cli():
    """``cli(*args, env=...)``: ``upcli ARGS`` in this process (no interpreter start-up), with ``returncode``,
    ``stdout`` and ``stderr`` as ``subprocess.run`` gives them. For tests of what the command prints and returns;
    signals and start-up itself need a real subprocess."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from upcli.cli import app

    def run(*args, env=None):
        result = CliRunner().invoke(app, [str(a) for a in args], env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return SimpleNamespace(returncode=result.exit_code, stdout=result.stdout, stderr=result.stderr)

    return run
