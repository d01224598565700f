"""The one resumable batch engine behind ``upsample``, ``fit-image`` and ``sr``.

A job is a sorted input list cut into shards of ``shard_size`` images. Shard ``s`` belongs to part
``s % parts`` of a split (``--num-shards/--shard-index``, torchrun or SLURM), so workers share an output
folder without talking to each other. A shard is written under a temporary name and renamed when complete;
a re-run skips complete shards and rebuilds the rest. Commands give the engine two callables:

- ``load(ref) -> data``: runs in DataLoader workers (decode, resize); raise ``BadImageError`` for a bad file.
- ``process(items, timings) -> [(array, attrs), ...]``: the model step, one result per item.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..errors import EXIT_OK, EXIT_SOME_FAILED, BadImageError, StoreError, UsageError
from ..progress import ProgressReporter, Timings
from .images import ImageRef
from .store import FEATURE_SHARDS, IMAGE_SHARDS, ShardKind, ShardWriter, read_shard_index, shard_name, write_atomic, write_index

JOB_FORMAT = "upcli-job"
STORE_FILES = ("job.json", "manifest.jsonl", "failures.jsonl", ".index.lock")


@dataclass
class Job:
    """What decides the stored bytes: the inputs, the settings and the shard size."""

    out_dir: Path
    root: Path
    command: str
    inputs: list[ImageRef]
    settings: dict
    shard_size: int

    @property
    def num_shards(self) -> int:
        return -(-len(self.inputs) // self.shard_size)

    @functools.cached_property
    def fingerprint(self) -> str:
        listing = [[ref.rel, _file_size(ref.path)] for ref in self.inputs]
        blob = json.dumps([self.command, self.settings, self.shard_size, listing], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def shard_items(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.inputs)))

    def record(self) -> dict:
        return {
            "format": JOB_FORMAT, "version": 1, "upcli_version": __version__, "command": self.command,
            "settings": self.settings, "shard_size": self.shard_size, "num_shards": self.num_shards,
            "fingerprint": self.fingerprint, "root": str(self.root), "inputs": [ref.rel for ref in self.inputs],
        }


@dataclass
class Item:
    """One input on its way through the engine."""

    index: int
    ref: ImageRef
    data: Any = None
    error: str | None = None
    decode_seconds: float = 0.0


@dataclass
class JobResult:
    exit_code: int
    processed: int = 0
    failed: int = 0
    skipped_shards: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def resolve_split(count: int | None = None, index: int | None = None, env=os.environ) -> tuple[int, int]:
    """(part index, part count): from the flags, else torchrun, else SLURM tasks or a SLURM array, else (0, 1)."""
    if count is None and index is None:
        if "WORLD_SIZE" in env and "RANK" in env:
            count, index = int(env["WORLD_SIZE"]), int(env["RANK"])
        elif int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
            count, index = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
        elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
            count = int(env["SLURM_ARRAY_TASK_COUNT"])
            index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
        else:
            count, index = 1, 0
    if count is not None and count < 1:
        raise UsageError(f"--num-shards must be at least 1, got {count}")
    if count is None or index is None:
        raise UsageError("--num-shards and --shard-index go together")
    if not 0 <= index < count:
        raise UsageError(f"--shard-index must be in [0, {count}) for --num-shards {count}, got {index}")
    return index, count


def prepare_out_dir(job: Job, overwrite: bool) -> None:
    """Create the folder and its job.json, or check that the one there is this job's."""
    out = job.out_dir
    if out.exists() and not out.is_dir():
        raise StoreError(f"--out {out}: exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"--out {out}: cannot create folder ({e.strerror})") from None
    job_file = out / "job.json"
    record = job.record()
    if job_file.exists() and not overwrite:
        try:
            old = json.loads(job_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise StoreError(f"{job_file}: unreadable ({e}); use --overwrite to start over") from None
        if old.get("fingerprint") != record["fingerprint"]:
            raise StoreError(f"{out} holds another job ({_difference(old, record)}); use --overwrite to replace it, or another --out")
        return
    if overwrite:
        clear_store(out)
    try:
        write_atomic(job_file, json.dumps(record, indent=1) + "\n")
    except OSError as e:
        raise StoreError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def _difference(old: dict, new: dict) -> str:
    if old.get("command") != new["command"]:
        return f"command {old.get('command')} vs {new['command']}"
    for key in {**old.get("settings", {}), **new["settings"]}:
        before, value = old.get("settings", {}).get(key), new["settings"].get(key)
        if before != value:
            if isinstance(before, dict) and isinstance(value, dict):  # e.g. fit-image's fit options: the keys that differ
                return ", ".join(f"{key}.{k} {before.get(k)!r} vs {value.get(k)!r}"
                                 for k in {**before, **value} if before.get(k) != value.get(k))
            return f"{key} {before!r} vs {value!r}"
    if old.get("shard_size") != new["shard_size"]:
        return f"shard_size {old.get('shard_size')} vs {new['shard_size']}"
    if old.get("inputs") != new["inputs"]:
        return f"input list changed: {len(old.get('inputs', []))} vs {len(new['inputs'])} images"
    return "input files changed"


def clear_store(out: Path) -> None:
    """Delete upcli's own files in ``out`` (never anything else)."""
    for record in out.glob("shard-*.json"):
        content = IMAGE_SHARDS.read_index(record)
        for key, _ in content["images"] if content else []:
            (out / key).unlink(missing_ok=True)
    for path in out.iterdir():
        name = path.name
        if name.startswith("shard-") and (".h5" in name or ".json" in name) or name.split(".tmp-")[0] in STORE_FILES:
            path.unlink()
    previews = out / "previews"
    if previews.is_dir():
        for path in previews.glob("*.png"):
            path.unlink()


class _Planned:
    """A map-style dataset over the inputs; ``load`` runs in DataLoader workers and never raises."""

    def __init__(self, inputs: list[ImageRef], load: Callable[[ImageRef], Any]):
        self.inputs = inputs
        self.load = load

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> Item:
        item = Item(index, self.inputs[index])
        start = time.perf_counter()
        try:
            item.ref.rel.encode("utf-8")  # the stores keep names as UTF-8 text
        except UnicodeEncodeError:
            item.error = "the file name is not valid UTF-8; rename the file"
            return item
        try:
            item.data = self.load(item.ref)
        except BadImageError as e:
            item.error = e.reason
        except Exception as e:  # a decoder bug or a resource error must not end the job
            item.error = f"{type(e).__name__}: {e}"
        item.decode_seconds = time.perf_counter() - start
        return item


def _collate(items: list[Item]) -> list[Item]:
    return items


class _ShardWriterThread(threading.Thread):
    """Writes shards in the background so that HDF5 I/O overlaps the model."""

    def __init__(self, out_dir: Path, attrs: dict, compression: str, reporter: ProgressReporter, timings: Timings,
                 kind: ShardKind = FEATURE_SHARDS):
        super().__init__(daemon=True, name="upcli-writer")
        self.out_dir, self.attrs, self.compression, self.kind = out_dir, attrs, compression, kind
        self.reporter, self.timings = reporter, timings
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.failures: list[dict] = []
        self._writer: ShardWriter | None = None

    def put(self, message: tuple) -> None:
        self.check()
        self.queue.put(message)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Write what is queued (at most a few images); an unfinished shard is then deleted."""
        self.queue.put(None)
        self.join()

    def run(self) -> None:
        while (message := self.queue.get()) is not None:
            if self.error is None:
                try:
                    start = time.perf_counter()
                    self._handle(*message)
                    self.timings.add("write", time.perf_counter() - start)
                except BaseException as e:  # reported to the main thread by check()
                    self.error = _store_error(e, self._writer)
                    self._abort()
        self._abort()

    def _handle(self, kind: str, *args) -> None:
        if kind == "open":
            self._writer = self.kind.writer(self.out_dir, args[0], self.attrs, self.compression)
        elif kind == "image":
            self._writer.add(*args)
        elif kind == "failure":
            self._writer.add_failure(*args)
            self.failures.append({"source": args[0], "reason": args[1]})
        elif kind == "commit":
            path = self._writer.commit()
            self._writer = None
            self.reporter.log(f"wrote {path.name}")

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


def _store_error(error: BaseException, writer: ShardWriter | None) -> BaseException:
    where = writer.tmp_path if writer is not None else "output folder"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"{where}: disk full; finished shards are kept, free space and re-run the same command to resume")
    if isinstance(error, OSError):
        return StoreError(f"{where}: cannot write ({error}); finished shards are kept, re-run to resume")
    return error


class TerminateAsInterrupt:
    """SIGTERM (SLURM, kill) is handled like Ctrl-C, so files are closed cleanly."""

    def __enter__(self):
        self._old = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def run_job(
    job: Job,
    load: Callable[[ImageRef], Any],
    process: Callable[[list[Item], Timings], list[tuple[Any, dict]]],
    *,
    split: tuple[int, int] = (0, 1),
    shard_attrs: dict | None = None,
    compression: str = "none",
    batch_size: int = 1,
    workers: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    reporter: ProgressReporter | None = None,
    timings: Timings | None = None,
    kind: ShardKind = FEATURE_SHARDS,
) -> JobResult:
    """Run this part of ``job``; returns exit code 0, or 3 when some inputs failed. Ctrl-C/SIGTERM raise KeyboardInterrupt.

    ``kind``: feature shards (``process`` returns arrays to store) or image shards (uint8 (H, W, 3) PNGs)."""
    from torch.utils.data import DataLoader

    reporter = reporter or ProgressReporter(job.command)
    timings = timings or Timings()
    part, parts = split
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    if overwrite and parts > 1:
        raise UsageError("--overwrite cannot be combined with a split of the work: clear --out once, then start the workers")
    prepare_out_dir(job, overwrite)
    fingerprint = job.fingerprint
    mine = [s for s in range(job.num_shards) if s % parts == part]
    done = {s: kind.read_index(job.out_dir / kind.name(s), fingerprint) for s in mine}
    done = {s: content for s, content in done.items() if content is not None}
    todo = [s for s in mine if s not in done]
    for shard in mine:  # leftovers of a killed run
        for stale in job.out_dir.glob(f"{kind.name(shard)}.tmp-*"):
            stale.unlink(missing_ok=True)
    old_failures = [f for content in done.values() for f in content["failures"]]
    if done:
        reporter.log(f"{job.command}: {len(done)} of {len(mine)} shards already complete, skipping them")

    batches, batch_shards = [], []
    for shard in todo:
        indices = list(job.shard_items(shard))
        for start in range(0, len(indices), batch_size):
            batches.append(indices[start:start + batch_size])
            batch_shards.append(shard)
    loader = DataLoader(
        _Planned(job.inputs, load), batch_sampler=batches, collate_fn=_collate, num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    writer = _ShardWriterThread(job.out_dir, {**(shard_attrs or {}), "job_fingerprint": fingerprint}, compression, reporter,
                                timings, kind)
    writer.start()
    total = sum(len(b) for b in batches)
    reporter.start(total)
    start_time = time.perf_counter()
    processed = 0
    try:
        with TerminateAsInterrupt():
            current = None
            for position, items in enumerate(loader):
                shard = batch_shards[position]
                if shard != current:
                    writer.put(("open", shard))
                    current = shard
                processed += _run_batch(items, process, writer, reporter, timings, strict, workers > 0)
                reporter.advance(len(items))
                if position + 1 == len(batches) or batch_shards[position + 1] != shard:
                    writer.put(("commit", shard))
            writer.stop()
            writer.check()
    finally:
        if writer.is_alive():
            writer.stop()
        reporter.close()
        del loader
        pending = sys.exc_info()[1]
        try:
            write_index(job.out_dir, list(range(job.num_shards)), fingerprint, kind)
        except OSError as e:
            if pending is None:  # else the error already on its way says more
                raise StoreError(f"{job.out_dir}: cannot write manifest.jsonl ({e.strerror or e}); finished shards "
                                 f"are kept, `upcli upsample --verify {job.out_dir}` rebuilds it") from None
    failures = old_failures + writer.failures
    return JobResult(
        exit_code=EXIT_SOME_FAILED if failures else EXIT_OK, processed=processed, failed=len(failures),
        skipped_shards=len(done), seconds=time.perf_counter() - start_time, timings=dict(timings.seconds), failures=failures,
    )


def _run_batch(items: list[Item], process, writer: _ShardWriterThread, reporter, timings: Timings, strict: bool,
               in_workers: bool) -> int:
    timings.add("decode (in workers)" if in_workers else "decode", sum(item.decode_seconds for item in items))
    good = []
    for item in items:
        if item.error is None:
            good.append(item)
            continue
        if strict:
            raise BadImageError(item.ref.rel, f"{item.error} (--strict stops at the first bad input)")
        reporter.log(f"skipped {item.ref.rel}: {item.error}")
        writer.put(("failure", item.ref.rel, item.error))
    try:
        done = list(zip(good, process(good, timings), strict=True)) if good else []
    except OSError as err:  # a preview or a saved field that cannot be written: disk full, read-only
        raise _store_error(err, None) from None
    except (RuntimeError, MemoryError) as err:
        if strict or not _out_of_memory(err):
            raise
        done = []
        for item in good:  # again one at a time: only an image that does not fit on its own fails
            try:
                done += zip([item], process([item], timings), strict=True)
            except (RuntimeError, MemoryError) as single:
                if not _out_of_memory(single):
                    raise
                reporter.log(f"skipped {item.ref.rel}: out of memory")
                writer.put(("failure", item.ref.rel, "out of memory at this output size; lower --size or --batch-size"))
    for item, (array, attrs) in done:
        writer.put(("image", item.ref.rel, array, attrs))
    return len(done)


def _out_of_memory(err: BaseException) -> bool:
    """A CPU or CUDA allocation failure (torch raises RuntimeError or its subclass OutOfMemoryError)."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return True
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err) or "out of memory" in str(err)


def verify_store(out_dir: Path) -> dict:
    """Check a store against its job.json: every shard complete and readable, every input there once.

    Rebuilds manifest.jsonl and failures.jsonl. Returns counts and a list of one-line problems.
    """
    import h5py

    out_dir = Path(out_dir)
    try:
        record = json.loads((out_dir / "job.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{out_dir}: no job.json; not an upcli output folder") from None
    except (OSError, ValueError) as e:
        raise StoreError(f"{out_dir / 'job.json'}: unreadable ({e})") from None
    try:
        inputs, shard_size, num_shards, fingerprint = (record["inputs"], record["shard_size"], record["num_shards"],
                                                       record["fingerprint"])
    except (KeyError, TypeError):
        raise StoreError(f"{out_dir / 'job.json'}: not an upcli job record") from None
    kind = IMAGE_SHARDS if record.get("command") == "sr" else FEATURE_SHARDS
    problems, stored, failed, complete = [], 0, 0, 0
    for shard in range(num_shards):
        path = out_dir / kind.name(shard)
        content = kind.read_index(path, fingerprint)
        if content is None:
            problems.append(f"{path.name}: {'missing' if not path.exists() else 'incomplete, unreadable or from another job'}")
            continue
        complete += 1
        expected = inputs[shard * shard_size:(shard + 1) * shard_size]
        found = [source for _, source in content["images"]] + [f["source"] for f in content["failures"]]
        problems += [f"{path.name}: {src} stored {found.count(src)} times" for src in sorted(set(found)) if found.count(src) > 1]
        problems += [f"{path.name}: {src} does not belong here" for src in sorted(set(found) - set(expected))]
        problems += [f"{path.name}: {src} is missing" for src in expected if src not in found]
        if kind is FEATURE_SHARDS:  # image shards: read_index has checked that each PNG is there
            with h5py.File(path, "r") as f:
                for key, source in content["images"]:
                    ds = f["features"][key]
                    if ds.ndim != 3 or tuple(ds.shape[1:]) != tuple(ds.attrs["size"]):
                        problems.append(f"{path.name}/{key}: shape {ds.shape} does not match its size attribute")
        stored += len(content["images"])
        failed += len(content["failures"])
    try:
        write_index(out_dir, list(range(num_shards)), fingerprint, kind)
    except OSError as e:
        problems.append(f"manifest.jsonl not rebuilt: {e.strerror or e}")
    return {"inputs": len(inputs), "stored": stored, "failed": failed, "shards": num_shards,
            "complete_shards": complete, "problems": problems}
