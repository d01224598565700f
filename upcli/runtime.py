"""What every command needs from the machine: the device, worker counts, the distributed world, one signal guard.

Nothing here touches the GPU or starts a process group at import.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from dataclasses import dataclass

from .errors import UsageError


# ---- devices and workers -----------------------------------------------------------------------------------

def resolve_device(device: str):
    """``--device``: ``auto`` (under torchrun or srun, each local process takes its own GPU), ``cpu`` or ``cuda[:N]``."""
    import torch

    if device == "auto":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    index = device.partition(":")[2]
    if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return torch.device(device)


def inference_autocast(device):
    """bfloat16 autocast on CUDA, none elsewhere: how features are computed for a store (and rendered from one)."""
    import torch

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def default_workers(device=None, cores: int | None = None) -> int:
    """DataLoader decode processes when ``--workers`` is not given. With a GPU: cores - 1, at most 4 (the main
    process mostly waits on it). On the CPU the model already uses every core, and a decode process takes one
    from it (measured on 2 cores: the backbone 1.3-2x slower, for ~7 ms of decoding per image): none up to 4
    cores, where decoding in line costs less, and one beyond (it keeps up with any CPU backbone)."""
    cores = cores or os.cpu_count() or 2
    if device is not None and getattr(device, "type", device) == "cpu":
        return 0 if cores <= 4 else 1
    return max(1, min(4, cores - 1))


# ---- splitting a job ---------------------------------------------------------------------------------------

def split_from(count: int | None = None, index: int | None = None, env=os.environ) -> tuple[int, int, str]:
    """``(part index, part count, where they came from)``: the flags, else torchrun, else SLURM tasks or a SLURM
    array, else one part. A bad value is a one-line ``UsageError`` that names where it came from."""
    origin = "--num-shards/--shard-index"
    if count is None and index is None:
        if "WORLD_SIZE" in env and "RANK" in env:
            origin = f"torchrun: RANK={env['RANK']}, WORLD_SIZE={env['WORLD_SIZE']}"
            count, index = _env_int(env, "WORLD_SIZE"), _env_int(env, "RANK")
        elif "SLURM_PROCID" in env and _env_int(env, "SLURM_NTASKS", "1") > 1:
            origin = f"SLURM tasks: SLURM_PROCID={env['SLURM_PROCID']}, SLURM_NTASKS={env['SLURM_NTASKS']}"
            count, index = _env_int(env, "SLURM_NTASKS"), _env_int(env, "SLURM_PROCID")
        elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            first = env.get("SLURM_ARRAY_TASK_MIN", "0")
            origin = (f"SLURM array: SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']}, SLURM_ARRAY_TASK_MIN={first}, "
                      f"SLURM_ARRAY_TASK_COUNT={env['SLURM_ARRAY_TASK_COUNT']}")
            count = _env_int(env, "SLURM_ARRAY_TASK_COUNT")
            index = _env_int(env, "SLURM_ARRAY_TASK_ID") - _env_int(env, "SLURM_ARRAY_TASK_MIN", "0")
        else:
            return 0, 1, "no split"
    if count is not None and count < 1:
        raise UsageError(f"--num-shards must be at least 1, got {count}" if origin.startswith("--") else
                         f"{origin} gives {count} parts; it must be at least 1")
    if count is None or index is None:
        raise UsageError("--num-shards and --shard-index go together")
    if not 0 <= index < count:
        raise UsageError(f"--shard-index must be in [0, {count}) for --num-shards {count}, got {index}"
                         if origin.startswith("--") else f"{origin} gives part {index}, not in [0, {count})")
    return index, count, origin


def _env_int(env, name: str, default: str | None = None) -> int:
    value = env.get(name, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name}={value!r} in the environment is not a whole number") from None


# ---- training processes ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, batch: int, what: str) -> range:
        """This process's samples of a global batch of ``batch``; a ``UsageError`` naming ``what`` unless it splits
        evenly over the processes."""
        if batch % self.world_size:
            raise UsageError(f"{what} {batch} must be a multiple of the {self.world_size} processes")
        local = batch // self.world_size
        return range(self.rank * local, (self.rank + 1) * local)


def setup_distributed(device=None) -> Distributed:
    """Join the torchrun process group if ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    import torch.distributed as dist

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
    import torch.distributed as dist

    if dist.is_initialized():
        if sys.exc_info()[0] is None:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def global_mean(value, world: int) -> float:
    """The mean of a scalar tensor over all processes (the value itself in one process)."""
    if world > 1:
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


# ---- signals -----------------------------------------------------------------------------------------------

class SignalGuard:
    """Ctrl-C and SIGTERM (SLURM, kill) inside the block, in one place.

    ``SignalGuard()``: SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does, so files are closed cleanly.
    ``SignalGuard(defer=True)``: both are held until the block ends, then raised as ``KeyboardInterrupt``, e.g. so
    that a checkpoint and its training state are written as a pair, never one without the other.
    Off the main thread (where Python delivers no signals) it does nothing.
    """

    def __init__(self, defer: bool = False):
        self.defer = defer

    def __enter__(self):
        self._pending, self._old = False, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM) if self.defer else (signal.SIGTERM,):
                self._old[sig] = signal.signal(sig, self._hold if self.defer else self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def _hold(self, signum, frame):
        self._pending = True

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        if self._pending and exc[0] is None:
            raise KeyboardInterrupt
