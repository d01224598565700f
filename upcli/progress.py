"""Progress and timing reports: a rich bar on a terminal, plain periodic lines in batch logs (SLURM, nohup)."""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from contextlib import contextmanager


class Timings:
    """Seconds spent per phase; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each reading."""

    def __init__(self, sync=None):
        self.seconds: dict[str, float] = defaultdict(float)
        self._sync = sync or (lambda: None)

    @contextmanager
    def measure(self, phase: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[phase] += time.perf_counter() - start

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds


class ProgressReporter:
    """Counts finished items; draws a rich bar when stderr is a terminal, else logs a timestamped line every
    ``log_every`` s."""

    def __init__(self, description: str, quiet: bool = False, log_every: float = 30.0, stream=None,
                 unit: str = "images"):
        self.description = description
        self.unit = unit
        self.quiet = quiet
        self.log_every = log_every
        self.stream = stream or sys.stderr
        self.done = 0
        self.total = 0
        self._bar = None
        self._start = self._last_log = time.monotonic()

    def start(self, total: int) -> None:
        self.total = total
        self._start = self._last_log = time.monotonic()
        if self.quiet or not self.stream.isatty():
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
            console=Console(file=self.stream), transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.description, total=total, rate="")

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self._start, 1e-9)

    def advance(self, n: int, status: str = "") -> None:
        """``n`` more items done; ``status`` (e.g. "loss 0.123") is shown beside the rate."""
        self.done += n
        rate = f"{self.rate():.2f} {self.unit}/s" + (f", {status}" if status else "")
        if self._bar is not None:
            self._bar.update(self._task, advance=n, rate=rate)
        elif not self.quiet and time.monotonic() - self._last_log >= self.log_every:
            self._last_log = time.monotonic()
            left = (self.total - self.done) / max(self.rate(), 1e-9)
            self.log(f"{self.description}: {self.done}/{self.total} {self.unit}, {rate}, eta {_hms(left)}")

    def steps_of(self, label: str, unit: str = "iterations") -> StepProgress:
        """Progress of the steps inside one item (ZSSR's iterations on one image): call it ``(done, total)``,
        close it when the item is done."""
        return StepProgress(self, label, unit)

    def log(self, message: str) -> None:
        """A line that is always worth showing (a skipped file, a finished shard), unless quiet; in a log (no
        terminal) it starts with the local time, ``YYYY-MM-DD HH:MM:SS``."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(message, markup=False, highlight=False)
        else:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class StepProgress:
    """The steps inside one item: a second bar under the reporter's on a terminal, else a timestamped line every
    ``log_every`` seconds (``reporter: label: done/total unit``)."""

    def __init__(self, reporter: ProgressReporter, label: str, unit: str):
        self.reporter, self.label, self.unit = reporter, label, unit
        self._task = None
        self._last_log = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        r = self.reporter
        if r.quiet:
            return
        if r._bar is not None:
            if self._task is None:
                self._task = r._bar.add_task(f"  {self.label}", total=total, rate="")
            r._bar.update(self._task, completed=done, total=total, rate=f"{self.unit}")
        elif time.monotonic() - self._last_log >= r.log_every:
            self._last_log = time.monotonic()
            r.log(f"{r.description}: {self.label}: {done}/{total} {self.unit}")

    def close(self) -> None:
        if self._task is not None and self.reporter._bar is not None:
            self.reporter._bar.remove_task(self._task)
        self._task = None


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:02d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
