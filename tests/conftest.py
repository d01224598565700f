"""Shared test fixtures."""

import socket
import subprocess
import sys

import pytest


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
