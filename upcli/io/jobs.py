"""The one resumable batch engine behind ``upsample``, ``fit-image`` and ``sr``.

A job is a sorted input list cut into shards of ``shard_size`` images. Shard ``s`` belongs to part
``s % parts`` of a split (``--num-shards/--shard-index``, torchrun or SLURM), so workers share an output
folder without talking to each other. A shard is written under a temporary name and renamed when complete;
a re-run skips complete shards and rebuilds the rest.

A command (``upsample``, ``fit-image``, ``sr``) takes a :class:`JobOptions`, calls :func:`prepare_job` (scan,
option checks, split, checkpoint digests: the same call for a run and for ``--dry-run``), builds its model,
and hands :func:`run_job` two callables:

- ``load(ref) -> data``: runs in DataLoader workers (decode, resize); raise ``BadImageError`` for a bad file.
- ``process(items, timings) -> [Output, ...]``: the model step, one result per item. It only computes: the
  writer thread stores each ``Output``'s array and writes its side files (previews, saved fields).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .. import __version__
from ..configs import JobOptions
from ..errors import EXIT_OK, EXIT_SOME_FAILED, BadImageError, StoreError, UsageError
from ..progress import ProgressReporter, Timings
from ..runtime import SignalGuard, default_workers, split_from
from .images import ImageRef, collect_images, printable_name
from .store import (FEATURE_SHARDS, JOB_FORMAT, ShardKind, ShardWriter, clear_store, index_lock, intact_images,
                    live_writer, set_aside_path, stored_sources, write_atomic, write_index)


@dataclass
class JobPlan:
    """What :func:`prepare_job` found: the inputs, their root, this worker's part, and the checkpoint digests."""

    command: str
    options: JobOptions
    root: Path
    inputs: list[ImageRef]
    shard_size: int
    split: tuple[int, int]
    digests: dict
    split_origin: str = "no split"  # where the split came from (flags, torchrun, SLURM), for the log

    def job(self, settings: dict, kind: ShardKind = FEATURE_SHARDS) -> "Job":
        """The job with these settings (the digests added), stored as ``kind``."""
        settings = {**settings, **self.digests}
        out = Path(self.options.out) if self.options.out is not None else None  # None: a dry run without --out
        return Job(out, self.root, self.command, self.inputs, settings, self.shard_size, kind)

    @functools.cached_property
    def reporter(self) -> ProgressReporter:
        return ProgressReporter(self.command, quiet=self.options.quiet, log_every=self.options.log_every)

    def run(self, job: "Job", load: Callable[[ImageRef], Any], process: Callable, device=None,
            compression: str = "none") -> "JobResult":
        """:func:`run_job` with this plan's options; prints the summary (unless quiet)."""
        o = self.options
        sync = None
        if device is not None and device.type == "cuda":
            import torch

            sync = torch.cuda.synchronize
        part, parts = self.split
        if parts > 1:
            mine = len(job.part_inputs(self.split))
            self.reporter.log(f"{self.command}: part {part} of {parts} ({self.split_origin}): {mine} of the "
                              f"{len(job.inputs)} inputs, shards {part}, {part + parts}, ... of {job.num_shards}")
        result = run_job(job, load, process, split=self.split, compression=compression, batch_size=o.batch_size,
                         workers=default_workers(device) if o.workers is None else o.workers, strict=o.strict,
                         overwrite=o.overwrite, reporter=self.reporter, timings=Timings(sync), preview=o.preview)
        for line in result.summary(self.command, job.out_dir):
            self.reporter.log(line)
        return result


def prepare_job(command: str, source, options: JobOptions, default_shard_size: int = 1,
                checkpoints: dict | None = None, dry_run: bool = False) -> JobPlan:
    """Check the shared options, scan ``source`` (an image, or a folder scanned recursively, leaving out
    ``options.out``), take this worker's part of the split, and hash the checkpoint files named in ``checkpoints``
    (``{"upsampler": spec, ...}``; specs that are not files are left out). Writes nothing; a ``dry_run`` needs no
    ``out``."""
    if (not source and options.files_from is None) or options.out is None and not dry_run:
        raise UsageError("give images (files, folders, patterns or --files-from LIST) and --out DIR")
    shard_size = default_shard_size if options.shard_size is None else options.shard_size
    for flag, value in (("--shard-size", shard_size), ("--batch-size", options.batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if options.preview < 0:
        raise UsageError(f"--preview must be 0 or more, got {options.preview}")
    *split, origin = split_from(options.num_shards, options.shard_index)
    check_run(options.workers or 0, options.overwrite, split[1])
    root, inputs = collect_images(source, options.files_from, options.include, options.exclude, options.out)
    return JobPlan(command, options, root, inputs, shard_size, tuple(split), checkpoint_digests(**(checkpoints or {})),
                   origin)


def check_run(workers: int, overwrite: bool, parts: int) -> None:
    """What :func:`run_job` refuses, checked early by :func:`prepare_job` too (before any model is built)."""
    if workers < 0:
        raise UsageError(f"--workers must be 0 or more, got {workers}")
    if overwrite and parts > 1:
        raise UsageError("--overwrite cannot be combined with a split of the work: clear --out once, then start the workers")


def checkpoint_digests(**specs) -> dict:
    """``{"<name>_sha256": digest}`` for each spec that names a checkpoint file (``itpn:PATH`` too), so that a job
    run with a retrained checkpoint is another job, not a resume of the old results."""
    digests = {}
    for name, spec in specs.items():
        path = Path(str(spec).removeprefix("itpn:")) if spec is not None else None
        if path is not None and path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digests[f"{name}_sha256"] = digest.hexdigest()
    return digests


def file_identity(path) -> dict | None:
    """How job settings name a file given by path (``--weights``, ``--init``): its resolved path and size."""
    if path is None:
        return None
    path = Path(path)
    stat = path.stat() if path.exists() else None
    return {"path": str(path.resolve()), "bytes": stat.st_size if stat else None}


@dataclass
class Output:
    """What ``process`` gives for one input: the array to store, its attributes, side files that the writer
    thread writes: ``{path relative to the output folder: write(path)}`` (previews, saved fields), and ``extra``
    arrays of feature shards (``{group: array}``, e.g. a compact store's image bytes)."""

    array: Any
    attrs: dict
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # more arrays stored under the same key (compact stores)


def preview_name(rel: str) -> str:
    """``previews/<source path with / as __, extension .png>``."""
    return "previews/" + rel.replace("/", "__").rsplit(".", 1)[0] + ".png"


@dataclass
class Job:
    """What decides the stored bytes: the inputs, the settings and the shard size."""

    out_dir: Path
    root: Path
    command: str
    inputs: list[ImageRef]
    settings: dict
    shard_size: int
    kind: ShardKind = FEATURE_SHARDS  # feature shards (HDF5) or image shards (PNG files): not part of the fingerprint

    @property
    def num_shards(self) -> int:
        return -(-len(self.inputs) // self.shard_size)

    @functools.cached_property
    def fingerprint(self) -> str:
        listing = [[ref.rel, *_file_stamp(ref.path)] for ref in self.inputs]
        blob = json.dumps([self.command, self.settings, self.shard_size, listing], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def shard_items(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.inputs)))

    def part_inputs(self, split: tuple[int, int]) -> list[ImageRef]:
        """The inputs that part ``split = (index, count)`` of a split job makes: those of its shards."""
        part, parts = split
        return [self.inputs[i] for s in range(part, self.num_shards, parts) for i in self.shard_items(s)]

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
    preview: bool = False  # among the first ``--preview`` inputs: ``process`` adds its preview to the Output


@dataclass
class JobResult:
    exit_code: int
    processed: int = 0
    failed: int = 0
    skipped_shards: int = 0
    seconds: float = 0.0
    timings: dict = field(default_factory=dict)
    failures: list = field(default_factory=list)

    def summary(self, command: str, out_dir: Path) -> list[str]:
        """The lines a command ends with: counts and speed, where the time went, where the failures are listed."""
        lines = [f"{command}: {self.processed} images written to {out_dir} ({self.processed / max(self.seconds, 1e-9):.2f} "
                 f"img/s, {self.seconds / max(self.processed, 1):.2f} s per image), {self.failed} failed, "
                 f"{self.skipped_shards} shards already done"]
        if self.timings:
            lines.append(f"time: {', '.join(f'{k} {v:.2f}s' for k, v in self.timings.items())}")
        if self.failed:
            lines.append(f"failed inputs are listed in {Path(out_dir) / 'failures.jsonl'}")
        return lines


def _file_stamp(path: Path) -> tuple[int, int]:
    """Size and modification time (ns) of an input: a file rewritten in place, even at the same size, is another
    input. ``(-1, -1)`` where it cannot be stat'ed."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _check_job_file(out: Path, record: dict) -> bool:
    """Whether ``out`` holds a job.json (then of this job: another job's is a one-line ``StoreError``)."""
    job_file = out / "job.json"
    if not job_file.exists():
        return False
    try:
        old = json.loads(job_file.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise StoreError(f"{job_file}: unreadable ({type(e).__name__}); use --overwrite to start over") from None
    if not isinstance(old, dict) or old.get("fingerprint") != record["fingerprint"]:
        what = _difference(old, record) if isinstance(old, dict) else "not a job record"
        raise StoreError(f"{out} holds another job ({what}); use --overwrite to replace it, or another --out")
    return True


def check_out_dir(job: Job, overwrite: bool) -> None:
    """What :func:`prepare_out_dir` refuses, checked without writing anything (``--dry-run``)."""
    if job.out_dir.exists() and not job.out_dir.is_dir():
        raise StoreError(f"--out {job.out_dir}: exists and is not a folder")
    if not overwrite:
        _check_job_file(job.out_dir, job.record())


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
    with index_lock(out):  # check and write as one step: two jobs started at once cannot both pass
        if not overwrite and _check_job_file(out, record):
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
    return "input files changed (size or modification time)"


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
                 kind: ShardKind):
        super().__init__(daemon=True, name="upcli-writer")
        self.out_dir, self.attrs, self.compression, self.kind = out_dir, attrs, compression, kind
        self.reporter, self.timings = reporter, timings
        self.queue: queue.Queue = queue.Queue(maxsize=4)
        self.error: BaseException | None = None
        self.failures: list[dict] = []
        self._writer: ShardWriter | None = None
        self._set_aside = None  # the open set-aside shard whose intact images are copied into this one

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
            shard, set_aside = args
            self._writer = self.kind.writer(self.out_dir, shard, self.attrs, self.compression)
            if set_aside is not None:
                import h5py

                self._set_aside = h5py.File(set_aside, "r")
        elif kind == "copy":
            self._writer.add_copy(self._set_aside, args[0])
        elif kind == "image":
            source, output = args
            for rel, write in output.files.items():  # previews, saved fields: before the shard can commit
                path = self.out_dir / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                write(path)
            self._writer.add(source, output.array, output.attrs, output.extra)
        elif kind == "failure":
            self._writer.add_failure(*args)
            self.failures.append({"source": args[0], "reason": args[1]})
        elif kind == "commit":
            path = self._writer.commit()
            self._writer = None
            if self._set_aside is not None:  # its intact images are in the new shard now
                set_aside = Path(self._set_aside.filename)
                self._set_aside.close()
                set_aside.unlink()
                self._set_aside = None
            self.reporter.log(f"wrote {path.name}")

    def _abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        if self._set_aside is not None:
            self._set_aside.close()
            self._set_aside = None


def _store_error(error: BaseException, writer: ShardWriter | None) -> BaseException:
    where = writer.tmp_path if writer is not None else "output folder"
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreError(f"{where}: disk full; finished shards are kept, free space and re-run the same command to resume")
    if isinstance(error, OSError):
        return StoreError(f"{where}: cannot write ({error}); finished shards are kept, re-run to resume")
    return error


def run_job(
    job: Job,
    load: Callable[[ImageRef], Any],
    process: Callable[[list[Item], Timings], list[Output]],
    *,
    split: tuple[int, int] = (0, 1),
    compression: str = "none",
    batch_size: int = 1,
    workers: int = 0,
    strict: bool = False,
    overwrite: bool = False,
    reporter: ProgressReporter | None = None,
    timings: Timings | None = None,
    preview: int = 0,
) -> JobResult:
    """Run this part of ``job``; returns exit code 0, or 3 when some inputs failed. Ctrl-C/SIGTERM raise KeyboardInterrupt.

    ``process`` returns an :class:`Output` per item: an array for feature shards, a uint8 (H, W, 3) image for image
    shards. Items among the first ``preview`` inputs have ``item.preview`` set."""
    from torch.utils.data import DataLoader

    reporter = reporter or ProgressReporter(job.command)
    timings = timings or Timings()
    part, parts = split
    check_run(workers, overwrite, parts)
    kind = job.kind
    prepare_out_dir(job, overwrite)
    fingerprint = job.fingerprint
    mine = [s for s in range(job.num_shards) if s % parts == part]
    done = {s: kind.read_index(job.out_dir / kind.name(s), fingerprint) for s in mine}
    done = {s: content for s, content in done.items() if content is not None and _holds_its_inputs(job, s, content)}
    held = {}  # shard -> the live writer of its temporary file (another process given the same shard)
    for shard in mine:
        for tmp in job.out_dir.glob(f"{kind.name(shard)}.tmp-*"):
            writer_now = live_writer(tmp)
            if writer_now is None:
                tmp.unlink(missing_ok=True)  # a leftover of a killed run
            elif shard not in done:
                held[shard] = writer_now
    for shard, who in held.items():
        reporter.log(f"{job.command}: another writer ({who}) holds {kind.name(shard)}; leaving it to that one")
    todo = [s for s in mine if s not in done and s not in held]
    old_failures = [f for content in done.values() for f in content["failures"]]
    if done:
        reporter.log(f"{job.command}: {len(done)} of {len(mine)} shards already complete, skipping them")

    # a shard that --verify set aside for a corrupt image: its intact images are copied, only the rest made again
    copies: dict[int, dict[int, str]] = {}  # shard -> {input index: key in the set-aside shard}
    if kind is FEATURE_SHARDS:
        for shard in todo:
            intact = intact_images(set_aside_path(job.out_dir / kind.name(shard)), fingerprint)
            copies[shard] = {i: intact[job.inputs[i].rel] for i in job.shard_items(shard) if job.inputs[i].rel in intact}
        if any(copies.values()):
            reporter.log(f"{job.command}: {sum(map(len, copies.values()))} intact images of set-aside shards are "
                         f"copied, not made again")
    batches, batch_shards = [], []
    for shard in todo:
        indices = [i for i in job.shard_items(shard) if i not in copies.get(shard, {})]
        for start in range(0, max(len(indices), 1), batch_size):  # one empty batch where all are copied
            batches.append(indices[start:start + batch_size])
            batch_shards.append(shard)
    loader = DataLoader(
        _Planned(job.inputs, load), batch_sampler=batches, collate_fn=_collate, num_workers=workers,
        prefetch_factor=2 if workers else None,
    )
    shard_attrs = {"command": job.command, "settings": json.dumps(job.settings, sort_keys=True),
                   "job_fingerprint": fingerprint}
    writer = _ShardWriterThread(job.out_dir, shard_attrs, compression, reporter, timings, kind)
    writer.start()
    total = sum(len(b) for b in batches)
    reporter.start(total)
    start_time = time.perf_counter()
    processed = 0
    try:
        with SignalGuard():
            current = None
            for position, items in enumerate(loader):
                shard = batch_shards[position]
                for item in items:
                    item.preview = item.index < preview
                if shard != current:
                    to_copy = sorted(copies.get(shard, {}).items())  # (input index, key), in input order
                    writer.put(("open", shard, set_aside_path(job.out_dir / kind.name(shard)) if to_copy else None))
                    current = shard
                while to_copy and (not items or to_copy[0][0] < items[0].index):  # the shard keeps input order
                    writer.put(("copy", to_copy.pop(0)[1]))
                processed += _run_batch(items, process, writer, reporter, timings, strict, workers > 0)
                reporter.advance(len(items))
                if position + 1 == len(batches) or batch_shards[position + 1] != shard:
                    for _, key in to_copy:
                        writer.put(("copy", key))
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


def _holds_its_inputs(job: Job, shard: int, content: dict) -> bool:
    """Whether a complete shard holds each of its inputs once, as a result or a failure (an edited ``source``
    attribute makes it another shard: it is made again)."""
    return sorted(stored_sources(content)) == sorted(job.inputs[i].rel for i in job.shard_items(shard))


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
        reporter.log(f"skipped {printable_name(item.ref.rel)}: {item.error}")
        writer.put(("failure", item.ref.rel, item.error))
    try:
        done = list(zip(good, process(good, timings), strict=True)) if good else []
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
                reporter.log(f"skipped {printable_name(item.ref.rel)}: out of memory")
                writer.put(("failure", item.ref.rel, "out of memory at this output size; lower --size or --batch-size"))
    for item, output in done:
        writer.put(("image", item.ref.rel, output))
    return len(done)


def _out_of_memory(err: BaseException) -> bool:
    """A CPU or CUDA allocation failure (torch raises RuntimeError or its subclass OutOfMemoryError)."""
    import torch

    if isinstance(err, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return True
    return isinstance(err, MemoryError) or "can't allocate memory" in str(err) or "out of memory" in str(err)
