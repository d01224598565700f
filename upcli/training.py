"""Helpers shared by every training loop: process groups, checkpoints, seeded randomness.

The checkpoint format is :mod:`upcli.checkpoints`; the training state that ``--resume`` needs is written beside
each checkpoint, in the same format. Optimiser state: :func:`optimizer_tensors` flattens ``optimizer.state_dict()``
into tensors plus a JSON part, :func:`load_optimizer_tensors` rebuilds it. Nothing is ever unpickled.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .checkpoints import load_checkpoint, read_config


# ---- processes ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device | None = None) -> Distributed:
    """Join the torchrun process group if ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Distributed(rank=rank, world_size=world, local_rank=local)


def teardown_distributed() -> None:
    """Leave the process group. On a normal exit, first wait for every rank; after an error the peers may be gone.

    Callers drop their DDP wrapper first. It sits in a reference cycle, so only ``gc.collect()`` frees it; left
    to interpreter exit, its reducer tears gloo down there and the process aborts with "terminate called without
    an active exception" (7 of 40 two-process runs of a minimal DDP script here; 0 of 64 with the collect)."""
    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def ensure_finite(loss: float, step: int, out) -> float:
    """``loss``, or a one-line ``UpcliError`` if it is NaN or infinite: a diverged run stops before its next save,
    so the checkpoint on disk is the last good one."""
    import math

    from .errors import UpcliError

    if not math.isfinite(loss):
        raise UpcliError(f"the loss became {loss} at step {step + 1}; stopped before saving, so {out} keeps its last "
                         "good checkpoint (try a lower --lr)")
    return loss


def global_mean(value: Tensor, world: int) -> float:
    """The mean of a scalar over all processes (the value itself in one process)."""
    if world > 1:
        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one named stream, e.g. ``generator(seed, step, sample)``: the same numbers on any
    number of processes and after any resume, because nothing depends on what was drawn before."""
    mixed = seed
    for s in stream:
        mixed = (mixed * 1_000_003 + int(s) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


# ---- training state ----------------------------------------------------------------------------------------

class InterruptsDeferred:
    """Ctrl-C or SIGTERM inside the block is held until the block ends, then raised as ``KeyboardInterrupt``: a
    checkpoint and its training state are written as a pair, never one without the other."""

    def __enter__(self):
        self._pending, self._old = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._hold)
        return self

    def _hold(self, signum, frame):
        self._pending = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        if self._pending and exc[0] is None:
            raise KeyboardInterrupt


def train_state_path(out: str | Path) -> Path:
    """Where a training loop keeps what ``--resume`` needs beside the checkpoint ``out`` (optimiser, step)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".train.safetensors")


def prepare_output(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Check ``--out`` before any training, so that no run dies at its first save: its folder is created and
    writable, and without ``--resume`` an existing checkpoint is only replaced with ``overwrite``. Raises
    ``UsageError``."""
    import tempfile

    from .errors import UsageError

    out = Path(out)
    if resume and overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the checkpoint's file name, e.g. {out / 'model.safetensors'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise UsageError(f"--out {out}: {out.parent} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=".upcli-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write to {out.parent} ({err.strerror or err})") from None
    existing = [p for p in (out, train_state_path(out)) if p.exists()]
    if existing and not resume and not overwrite:
        raise UsageError(f"--out {out} already exists; add --resume to continue that run, or --overwrite to "
                         "start a new one in its place")


def load_train_state(out: str | Path, state_path: Path, kind: str, identity: dict) -> tuple[dict[str, Tensor], dict]:
    """The training state beside checkpoint ``out`` for ``--resume``, after checking that both exist, that it is
    a ``kind`` state, and that it was made with the same settings (``identity``). Raises ``UsageError``."""
    from .errors import UsageError

    if not Path(state_path).is_file() or not Path(out).is_file():
        raise UsageError(f"--resume: no checkpoint to resume at {out} (and {Path(state_path).name})")
    state, config = load_checkpoint(state_path)
    if config.get("kind") != kind:
        raise UsageError(f"--resume: {state_path} is not a {kind}")
    plain = json.loads(json.dumps(identity))
    saved = config["train_config"]
    if saved != plain:
        diff = [k for k in {**plain, **saved} if plain.get(k) != saved.get(k)]
        raise UsageError(f"--resume: the checkpoint was made with other settings ({', '.join(diff)})")
    out_step = read_config(out).get("training", {}).get("step")
    if out_step is not None and int(out_step) != int(config["step"]):  # a kill between the two writes
        raise UsageError(f"--resume: {out} is at step {out_step} but {Path(state_path).name} at step {config['step']}; "
                         "the run was killed while saving, so the two do not belong together")
    return state, config


def optimizer_tensors(optimizer: torch.optim.Optimizer, prefix: str = "optim.") -> tuple[dict[str, Tensor], str]:
    """``optimizer.state_dict()`` as flat tensors plus a JSON string of everything that is not a tensor."""
    state = optimizer.state_dict()
    tensors, plain = {}, {}
    for index, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"{prefix}{index}.{name}"] = value
            else:
                plain.setdefault(str(index), {})[name] = value
    return tensors, json.dumps({"param_groups": state["param_groups"], "plain": plain})


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor], plain_json: str,
                           prefix: str = "optim.") -> None:
    """Inverse of :func:`optimizer_tensors`."""
    extra = json.loads(plain_json)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            index, name = key[len(prefix):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, entry in extra["plain"].items():
        state.setdefault(int(index), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
