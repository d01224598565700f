"""Helpers shared by every training loop: checkpoints, seeded randomness, the loop's tail.

The checkpoint format is :mod:`upcli.checkpoints`; the training state that ``--resume`` needs is written beside
each checkpoint, in the same format. The two are one unit (:func:`save_pair`): both are written under pending
names, then renamed into place, the state first; :func:`recover_pair` (run before every start) finishes a save that
a kill interrupted after both were written, or drops one interrupted before, so a killed run always resumes.
Optimiser state: :func:`optimizer_tensors` flattens ``optimizer.state_dict()`` into tensors plus a JSON part,
:func:`load_optimizer_tensors` rebuilds it. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from .checkpoints import load_checkpoint, read_config
from .errors import EXIT_OK, EXIT_SOME_FAILED
from .runtime import Distributed, SignalGuard, teardown_distributed


# ---- the loop ------------------------------------------------------------------------------------------------

def ensure_finite(loss: float, step: int, out) -> float:
    """``loss``, or a one-line ``UpcliError`` if it is NaN or infinite: a diverged run stops before its next save,
    so the checkpoint on disk is the last good one."""
    import math

    from .errors import UpcliError

    if not math.isfinite(loss):
        raise UpcliError(f"the loss became {loss} at step {step + 1}; stopped before saving, so {out} keeps its last "
                         "good checkpoint (try a lower --lr)")
    return loss


@dataclass
class TrainResult:
    """What a training command did: the steps it ran, their losses, and the training images it had to skip."""

    command: str
    out: str
    start: int
    steps: int
    seconds: float = 0.0
    losses: list[float] | dict[str, list[float]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    val_loss: float | None = None
    images_per_second: float | None = None

    @property
    def exit_code(self) -> int:
        """0, or 3 when unreadable training images were skipped."""
        return EXIT_SOME_FAILED if self.skipped else EXIT_OK

    def summary(self) -> str:
        """One line: the steps, their speed and last losses, and the file written."""
        if self.start >= self.steps:
            return (f"{self.command}: already at step {self.start} of {self.steps}; nothing to do (raise the step "
                    "count to train further)")
        losses = self.losses if isinstance(self.losses, dict) else {"loss": self.losses}
        last = ", ".join(f"{name} {values[-1]:.4f}" for name, values in losses.items() if values)
        rate = f" ({self.images_per_second:.2f} images/s)" if self.images_per_second is not None else ""
        val = f", val loss {self.val_loss:.4f}" if self.val_loss is not None else ""
        return (f"{self.command}: steps {self.start}..{self.steps} in {self.seconds:.0f} s{rate}, "
                f"last {last}{val}; wrote {self.out}")


class TrainingRun:
    """What every training loop does around its steps::

        run = TrainingRun("train", dist, reporter, save, start, steps)
        run.parallel(module)                       # DDP over the processes; the module itself in one
        with run:
            for step in range(start, steps):
                loss = run.model(batch) ...
                run.step_done(step + 1, f"loss {value:.4f}")
                if it is time: run.checkpoint(step + 1, loss=value)
        return run.result(losses=..., skipped=...)

    Inside the block SIGTERM is handled like Ctrl-C; on either, the steps finished since the last checkpoint are
    saved before the interrupt goes on. However the block ends, the progress bar is closed and the process group
    left. ``save(step, checkpoint_path, state_path, **info)`` writes the checkpoint and its training state to the
    paths given (:func:`save_pair` renames them into place); it runs on the main process only, with Ctrl-C held
    until both files are in place.
    """

    def __init__(self, command: str, dist: Distributed, reporter, save: Callable[..., None], start: int, steps: int,
                 out):
        self.command, self.dist, self.reporter, self.save = command, dist, reporter, save
        self.start, self.steps, self.out = start, steps, str(out)
        self.done = self.saved = start
        self.model = None

    def parallel(self, module, **ddp_options):
        """Wrap ``module`` in DDP when there are several processes; call it as ``run.model`` (the run holds the
        only reference, so the wrapper is freed before the process group is left)."""
        self.model = torch.nn.parallel.DistributedDataParallel(module, **ddp_options) if self.dist.world_size > 1 else module

    def __enter__(self):
        self._signals = SignalGuard().__enter__()
        self.reporter.start(self.steps - self.start)
        self._t0 = time.perf_counter()
        return self

    def step_done(self, done: int, status: str) -> None:
        self.done = done
        self.reporter.advance(1, status=status)

    def checkpoint(self, step: int, **info) -> None:
        if self.dist.is_main:
            with SignalGuard(defer=True):
                save_pair(self.out, step, lambda checkpoint, state: self.save(step, checkpoint, state, **info))
        self.saved = step

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and self.done > self.saved:
                self.checkpoint(self.done, interrupted=True)
        finally:
            self.seconds = time.perf_counter() - self._t0
            self.reporter.close()
            self.model = None  # the DDP reducer holds the process group: free it first, not at interpreter exit
            teardown_distributed()
            self._signals.__exit__(exc_type, exc, tb)

    def result(self, **fields) -> TrainResult:
        """The run's ``TrainResult``; its summary (and any skipped images) is printed by the main process."""
        result = TrainResult(self.command, self.out, self.start, self.steps, self.seconds, **fields)
        if self.dist.is_main:
            self.reporter.log(result.summary())
            if result.skipped:
                print(f"{self.command}: {len(result.skipped)} unreadable images were skipped (first: "
                      f"{result.skipped[0]})", file=sys.stderr)
        return result


def generator(seed: int, *stream: int) -> torch.Generator:
    """A CPU generator for one named stream, e.g. ``generator(seed, step, sample)``: the same numbers on any
    number of processes and after any resume, because nothing depends on what was drawn before."""
    mixed = seed
    for s in stream:
        mixed = (mixed * 1_000_003 + int(s) + 0x9E3779B9) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


# ---- training state ----------------------------------------------------------------------------------------

def train_state_path(out: str | Path) -> Path:
    """Where a training loop keeps what ``--resume`` needs beside the checkpoint ``out`` (optimiser, step)."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".train.safetensors")


def pending_path(path: str | Path) -> Path:
    """Where :func:`save_pair` writes ``path`` before renaming it into place."""
    path = Path(path)
    return path.with_name(path.name + ".pending")


def _saved_step(path: Path) -> int | None:
    """The step a checkpoint (``training.step``) or a training state (``step``) was saved at; None if unreadable."""
    try:
        config = read_config(path)
    except Exception:  # noqa: BLE001 - unreadable: no step
        return None
    training = config.get("training")
    step = training.get("step") if isinstance(training, dict) else config.get("step")
    return step if isinstance(step, int) else None


def save_pair(out: str | Path, step: int, write: Callable[[Path, Path], None]) -> None:
    """Save checkpoint ``out`` and its training state as one unit.

    ``write(checkpoint_path, state_path)`` writes both to pending names; then the state, then the checkpoint are
    renamed into place. Killed anywhere, the pair on disk is the old one, the new one, or the new state with the
    new checkpoint still pending, which :func:`recover_pair` puts in place. An ``OSError`` while writing (a full
    disk) removes the pending files and raises a one-line ``StoreError`` that says which step is kept.
    """
    from .errors import StoreError

    out = Path(out)
    state = train_state_path(out)
    pending_out, pending_state = pending_path(out), pending_path(state)
    try:
        write(pending_out, pending_state)
    except OSError as err:
        for path in (pending_out, pending_state):
            path.unlink(missing_ok=True)
        kept = f"{out.name} keeps step {_saved_step(out)}" if out.exists() else "nothing is saved yet"
        raise StoreError(f"cannot save step {step} to {out} ({err.strerror or err}); {kept}") from None
    os.replace(pending_state, state)
    os.replace(pending_out, out)


def recover_pair(out: str | Path) -> None:
    """Finish or drop a :func:`save_pair` that a kill interrupted, and remove its temporary files.

    A pending state exists only once both pending files are complete: both are put in place. A pending checkpoint
    alone is put in place when the state already in place is of its step (killed between the two renames), and
    deleted otherwise (killed while the state was being written: the old pair stands).
    """
    out = Path(out)
    state = train_state_path(out)
    for path in (out, state, pending_path(out), pending_path(state)):
        for tmp in path.parent.glob(f"{path.name}.tmp-*"):  # write_atomic's, left by a kill -9
            tmp.unlink(missing_ok=True)
    pending_out, pending_state = pending_path(out), pending_path(state)
    if pending_state.exists():
        os.replace(pending_state, state)
        if pending_out.exists():
            os.replace(pending_out, out)
    elif pending_out.exists():
        if state.exists() and _saved_step(pending_out) == _saved_step(state):
            os.replace(pending_out, out)
        else:
            pending_out.unlink()


def prepare_output(out: str | Path, resume: bool, overwrite: bool) -> None:
    """Check ``--out`` before any training, so that no run dies at its first save: its folder is created and
    writable, and without ``--resume`` an existing checkpoint is only replaced with ``overwrite``. A save that a
    kill interrupted is finished or dropped first (:func:`recover_pair`). Raises ``UsageError``."""
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
    recover_pair(out)
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
