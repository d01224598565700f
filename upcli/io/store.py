"""The feature store: HDF5 shards written atomically, and a reader that works under DataLoader workers.

Layout of an output folder (documented in README.md, readable with plain h5py):

    job.json            settings, input list and its fingerprint
    shard-00000.h5      attrs: format, format_version, shard_index, job_fingerprint, complete, failures (JSON)
      /features/000000  one dataset per image, (C, H, W), one chunk; attrs: source, orig_size, size,
                        backbone, layer, upsampler, dtype ("bfloat16" data is stored as uint16 bits)
    manifest.jsonl      {"source", "shard", "key"} per stored image, in input order
    failures.jsonl      {"source", "reason"} per input that could not be read

Commands whose results are images (``upcli sr``) use image shards instead: each result is a PNG at its
source's relative path (suffix ``.png``), and ``shard-00000.json`` lists a finished shard's images and failures.

``verify_store`` checks a finished store against its job.json; ``clear_store`` deletes upcli's own files in one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import BadImageError, StoreError, UsageError, first_line

FORMAT = "upcli-features"
JOB_FORMAT = "upcli-job"
_METADATA_MARGIN = 1 << 20  # bytes reserved beside each image's data for HDF5's metadata and the commit
STORE_FILES = ("job.json", "manifest.jsonl", "failures.jsonl", ".index.lock")
IMAGE_FORMAT = "upcli-images"
FORMAT_VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")
COMPRESSIONS = {"none": {}, "lzf": {"compression": "lzf", "shuffle": True}, "gzip": {"compression": "gzip", "compression_opts": 4, "shuffle": True}}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.h5"


def to_storage(tensor, dtype: str) -> np.ndarray:
    """A torch tensor as the numpy array stored on disk (bfloat16 as its uint16 bits)."""
    import torch

    if dtype == "bfloat16":
        return tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.uint16).numpy()
    return tensor.detach().to("cpu", getattr(torch, dtype)).contiguous().numpy()


def from_storage(array: np.ndarray, dtype: str):
    """Inverse of ``to_storage``: a torch tensor in the stored dtype."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def check_feature_format(dtype: str, compression: str) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")


MAX_OUTPUT_BYTES = 16 * 2**30  # float32 features of one image, before storage


def check_feature_bytes(ref, size: tuple[int, int], dim: int) -> None:
    """A ``BadImageError`` for an image whose features at ``size`` would not fit in memory (e.g. a long strip)."""
    if dim * size[0] * size[1] * 4 > MAX_OUTPUT_BYTES:
        raise BadImageError(ref.path, f"output {size[1]}x{size[0]} x {dim} channels would take "
                                      f"{dim * size[0] * size[1] * 4 / 2**30:.0f} GiB; lower --size")


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """The temporary name this process writes ``path`` under: ``NAME.tmp-HOST-PID``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def live_writer(tmp: Path) -> str | None:
    """Who writes temporary file ``tmp`` (``"host H, pid P"``) if that process may still be alive, else None (a
    leftover to delete): a dead pid on this host, this process, or a name not made by :func:`temp_path`. Files of
    other hosts cannot be checked and count as alive."""
    match = re.fullmatch(r".*\.tmp-(.+)-(\d+)", Path(tmp).name)
    if match is None:
        return None
    host, pid = match.group(1), int(match.group(2))
    if host == socket.gethostname():
        if pid == os.getpid():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            pass
        return f"host {host}, pid {pid}"
    return f"host {host}, pid {pid}, not checkable from here: delete {Path(tmp).name} if it is gone"


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: leave no partial temporary file behind
        tmp.unlink(missing_ok=True)
        raise


def reserve_space(fd: int, offset: int, nbytes: int) -> bool:
    """Reserve ``nbytes`` of disk blocks from ``offset`` of an open file without changing its size (Linux
    ``fallocate(FALLOC_FL_KEEP_SIZE)``): writes into that range can then not meet a full disk, whatever else
    writes to it meanwhile. Raises ``OSError`` (ENOSPC) when the space is not there; returns False where the
    platform or filesystem cannot reserve."""
    import ctypes

    fallocate = getattr(ctypes.CDLL(None, use_errno=True), "fallocate", None)
    if fallocate is None:
        return False
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, 1, offset, nbytes) == 0:  # 1: FALLOC_FL_KEEP_SIZE
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


class ShardWriter:
    """Writes one shard under a temporary name; ``commit`` renames it into place, ``abort`` deletes it."""

    def __init__(self, out_dir: Path, shard_index: int, attrs: dict, compression: str = "none"):
        import h5py

        self.final_path = Path(out_dir) / shard_name(shard_index)
        self.tmp_path = temp_path(self.final_path)
        self._filters = COMPRESSIONS[compression]
        self.failures: list[dict] = []
        self.num_images = 0
        self._file = h5py.File(self.tmp_path, "w")
        self._file.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "shard_index": shard_index, "complete": False})
        self._file.attrs.update(attrs)
        self._features = self._file.create_group("features")

    def add(self, source: str, array: np.ndarray, attrs: dict, extra: dict[str, np.ndarray] | None = None) -> str:
        """Store ``array`` as ``/features/KEY`` with ``attrs`` (and ``source``), and each of ``extra`` as
        ``/NAME/KEY`` (a compact store's image bytes); returns KEY."""
        extra = extra or {}
        # HDF5 must never meet a full disk: a failed write leaves objects whose destructors write again, and the
        # process then crashes. So the blocks for the image and its metadata are reserved past the file's end
        # first; where the filesystem cannot reserve, the free space is checked instead (which another writer
        # could still use up before HDF5 writes).
        needed = array.nbytes + sum(a.nbytes for a in extra.values()) + _METADATA_MARGIN
        try:
            reserved = reserve_space(self._file.id.get_vfd_handle(), self._file.id.get_filesize(), needed)
        except OSError as err:
            raise OSError(err.errno, f"{err.strerror} ({needed} bytes could not be reserved)",
                          str(self.tmp_path)) from None
        free = None if reserved else shutil.disk_usage(self.tmp_path.parent).free
        if free is not None and free < needed:
            raise OSError(errno.ENOSPC, f"No space left on device ({free} bytes free, {array.nbytes} needed)",
                          str(self.tmp_path))
        key = f"{self.num_images:06d}"
        # fill_time="never": HDF5 would otherwise write the chunk twice (fill value, then data), 6x slower
        # fletcher32: a checksum per chunk, checked by HDF5 on every read (a flipped byte is an error, not data)
        ds = self._features.create_dataset(key, data=array, chunks=array.shape, fill_time="never", fletcher32=True,
                                           **self._filters)
        ds.attrs["source"] = source
        ds.attrs.update(attrs)
        for name, data in extra.items():
            self._file.require_group(name).create_dataset(key, data=data, fletcher32=True, **self._filters)
        self.num_images += 1
        return key

    def add_failure(self, source: str, reason: str) -> None:
        self.failures.append({"source": source, "reason": reason})

    def add_copy(self, shard, key: str) -> str:
        """Add image ``key`` of another open shard (``h5py.File``) as it is stored there."""
        ds = shard["features"][key]
        extra = {name: group[key][()] for name, group in shard.items() if name != "features" and key in group}
        return self.add(str(ds.attrs["source"]), ds[()], {k: v for k, v in ds.attrs.items() if k != "source"}, extra)

    def commit(self) -> Path:
        self._file.attrs["num_images"] = self.num_images
        self._file.attrs["failures"] = json.dumps(self.failures)
        self._file.attrs["complete"] = True
        self._file.close()
        os.truncate(self.tmp_path, self.tmp_path.stat().st_size)  # frees the blocks reserved past the end
        fsync_path(self.tmp_path)
        os.replace(self.tmp_path, self.final_path)
        fsync_path(self.final_path.parent)
        return self.final_path

    def abort(self) -> None:
        """Close and delete the unfinished shard. Its bytes are freed first: closing flushes HDF5's cached
        metadata, and on a full disk a failed flush leaves objects whose destructors later crash the process."""
        try:
            os.truncate(self.tmp_path, 0)
        except OSError:
            pass
        self._features = None
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - the shard is being thrown away; the error that led here is reported
            pass
        finally:
            self.tmp_path.unlink(missing_ok=True)


def stored_sources(content: dict) -> list[str]:
    """The inputs a shard's index (``read_index``) accounts for: its results, then its failures."""
    return [source for _, source in content["images"]] + [f.get("source") for f in content["failures"]]


def read_shard_index(path: Path, fingerprint: str | None = None) -> dict | None:
    """The contents of a complete shard, or None if it is missing, partial, unreadable or from another job."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            if attrs.get("format") != FORMAT or not bool(attrs.get("complete", False)):
                return None
            if fingerprint is not None and attrs.get("job_fingerprint") != fingerprint:
                return None
            images = [(key, str(ds.attrs["source"])) for key, ds in f["features"].items()]
            return {"images": images, "failures": json.loads(attrs.get("failures", "[]"))}
    except (OSError, KeyError, ValueError):
        return None


def read_all(shard, key: str) -> None:
    """Read every dataset of image ``key`` in an open shard (``/features/KEY`` and a compact store's
    ``/images/KEY``): HDF5 checks each chunk's fletcher32 checksum, so a changed byte raises ``OSError``."""
    for group in shard.values():
        if key in group:
            group[key][()]


def set_aside_path(path: Path) -> Path:
    """Where ``verify_store`` puts a shard with a corrupt image: ``shard-N.h5.corrupt``."""
    return path.with_name(path.name + ".corrupt")


def intact_images(path: Path, fingerprint: str) -> dict[str, str]:
    """source -> key of each image of a set-aside shard of this job that still reads back intact (every chunk's
    checksum passes); empty if the file is not there, unreadable or of another job."""
    import h5py

    content = read_shard_index(path, fingerprint)
    intact = {}
    if content is not None:
        with h5py.File(path, "r") as f:
            for key, source in content["images"]:
                try:
                    read_all(f, key)
                except OSError:
                    continue
                intact[source] = key
    return intact


def image_key(source: str, keep_suffix: bool = False) -> str:
    """Where the image result of ``source`` goes, relative to the output folder: its path with suffix .png, or
    with .png added (``keep_suffix``: for inputs whose names differ only in their suffix, a.jpg and a.png)."""
    return source + ".png" if keep_suffix else str(Path(source).with_suffix(".png"))


class ImageShardWriter:
    """A shard of image results: each PNG is written atomically at once; ``commit`` writes the shard's record."""

    def __init__(self, out_dir: Path, shard_index: int, attrs: dict, compression: str = "none"):
        self.out_dir = Path(out_dir)
        self.final_path = self.out_dir / f"shard-{shard_index:05d}.json"
        self.tmp_path = self.final_path  # nothing temporary outlives a call
        self.record = {"format": IMAGE_FORMAT, "format_version": FORMAT_VERSION, "shard_index": shard_index,
                       "complete": True, **attrs, "images": [], "failures": []}

    def add(self, source: str, array: np.ndarray, attrs: dict, extra: dict | None = None) -> str:
        """``array``: uint8 (H, W, 3); ``attrs["key"]``, if given, is where it goes (else ``image_key(source)``).
        Image shards keep no ``extra`` arrays."""
        if extra:
            raise ValueError(f"image shards keep no extra arrays, got {sorted(extra)}")
        from PIL import Image

        attrs = dict(attrs)
        key = attrs.pop("key", None) or image_key(source)
        path = self.out_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        data = buffer.getvalue()
        write_atomic(path, data)
        self.record["images"].append({"key": key, "source": source, "sha256": hashlib.sha256(data).hexdigest(), **attrs})
        return key

    def add_failure(self, source: str, reason: str) -> None:
        self.record["failures"].append({"source": source, "reason": reason})

    def commit(self) -> Path:
        write_atomic(self.final_path, json.dumps(self.record, indent=1) + "\n")
        return self.final_path

    def abort(self) -> None:
        pass


def _png_intact(path: Path, sha256: str | None) -> bool:
    """Whether an image result is there with the digest its shard recorded (records without one: only there)."""
    if not path.is_file():
        return False
    return sha256 is None or hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def read_image_shard_index(path: Path, fingerprint: str | None = None) -> dict | None:
    """Like :func:`read_shard_index` for an image shard; None also when one of its PNGs has gone or changed (its
    sha256 is in the record)."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if record.get("format") != IMAGE_FORMAT or not record.get("complete"):
            return None
        if fingerprint is not None and record.get("job_fingerprint") != fingerprint:
            return None
        images = [(entry["key"], entry["source"]) for entry in record["images"]]
        if not all(_png_intact(Path(path).parent / entry["key"], entry.get("sha256")) for entry in record["images"]):
            return None
        return {"images": images, "failures": record["failures"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class ShardKind:
    """How a job's shards are written and read back: feature shards (HDF5) or image shards (PNG + JSON)."""

    suffix: str
    writer: type
    read_index: Callable[..., dict | None]

    def name(self, index: int) -> str:
        return f"shard-{index:05d}{self.suffix}"


FEATURE_SHARDS = ShardKind(".h5", ShardWriter, read_shard_index)
IMAGE_SHARDS = ShardKind(".json", ImageShardWriter, read_image_shard_index)


def write_index(out_dir: Path, shard_indices: list[int], fingerprint: str | None = None,
                kind: ShardKind = FEATURE_SHARDS) -> tuple[int, int]:
    """Rebuild manifest.jsonl and failures.jsonl from the complete shards; returns (images, failures).

    The workers of a split job each rebuild them when they finish. A lock makes the reading and the writing one
    step, so a slower worker cannot replace a newer index with its older view (where the filesystem has locks)."""
    with index_lock(out_dir):
        manifest, failures = [], []
        for index in shard_indices:
            content = kind.read_index(out_dir / kind.name(index), fingerprint)
            if content is None:
                continue
            manifest += [{"source": src, "shard": kind.name(index), "key": key} for key, src in content["images"]]
            failures += content["failures"]
        write_atomic(out_dir / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in manifest))
        write_atomic(out_dir / "failures.jsonl", "".join(json.dumps(r) + "\n" for r in failures))
    return len(manifest), len(failures)


def stored_kind(out_dir: Path, num_shards: int) -> ShardKind:
    """Which kind of shards a store holds: image shards where their index files are there, else feature shards."""
    found = any((Path(out_dir) / IMAGE_SHARDS.name(s)).exists() for s in range(num_shards))
    return IMAGE_SHARDS if found else FEATURE_SHARDS


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
    copies = out / "upsamplers"  # a compact store's upsampler checkpoints (``compact.CHECKPOINTS``)
    if copies.is_dir():
        for path in copies.glob("*.safetensors"):
            path.unlink()


def read_job_record(out_dir: Path) -> dict:
    """``out_dir/job.json``, after checking the types and ranges of what ``verify_store`` uses; a one-line
    ``StoreError`` naming the key otherwise."""
    out_dir = Path(out_dir)
    path = out_dir / "job.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{out_dir}: no job.json; not an upcli output folder") from None
    except (OSError, ValueError, RecursionError) as e:
        raise StoreError(f"{path}: unreadable ({type(e).__name__})") from None
    if not isinstance(record, dict):
        raise StoreError(f"{path}: not an upcli job record (a JSON {type(record).__name__}, not an object)")
    missing = [key for key in ("inputs", "shard_size", "num_shards", "fingerprint") if key not in record]
    if missing:
        raise StoreError(f"{path}: not an upcli job record (no {missing[0]!r})")
    inputs, shard_size, num_shards = record["inputs"], record["shard_size"], record["num_shards"]
    if not isinstance(inputs, list) or not all(isinstance(x, str) for x in inputs):
        raise StoreError(f"{path}: 'inputs' must be a list of file names")
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise StoreError(f"{path}: 'shard_size' must be a positive integer, got {shard_size!r:.40}")
    if not isinstance(num_shards, int) or isinstance(num_shards, bool) or num_shards != -(-len(inputs) // shard_size):
        raise StoreError(f"{path}: 'num_shards' must be {-(-len(inputs) // shard_size)} for {len(inputs)} inputs "
                         f"in shards of {shard_size}, got {num_shards!r:.40}")
    if not isinstance(record.get("fingerprint"), str):
        raise StoreError(f"{path}: 'fingerprint' must be a string")
    return record


def verify_store(out_dir: Path, repair: bool = False) -> dict:
    """Check a store against its job.json: every shard complete and readable, every input there once.

    Rebuilds manifest.jsonl and failures.jsonl, except where shards on disk are complete but of another job than
    job.json says: then job.json, not the shards, may be what is wrong, and the manifest is left as it is unless
    ``repair``. Returns counts and a list of one-line problems.
    """
    import h5py

    out_dir = Path(out_dir)
    record = read_job_record(out_dir)
    inputs, shard_size, num_shards, fingerprint = (record["inputs"], record["shard_size"], record["num_shards"],
                                                   record["fingerprint"])
    kind = stored_kind(out_dir, num_shards)
    problems, stored, failed, complete, other_job = [], 0, 0, 0, 0
    for shard in range(num_shards):
        path = out_dir / kind.name(shard)
        content = kind.read_index(path, fingerprint)
        if content is None:
            if not path.exists():
                problems.append(f"{path.name}: missing")
            elif kind.read_index(path, None) is not None:
                other_job += 1
                problems.append(f"{path.name}: complete, but of another job than job.json's")
            else:
                problems.append(f"{path.name}: incomplete or unreadable")
            continue
        complete += 1
        expected = inputs[shard * shard_size:(shard + 1) * shard_size]
        found = stored_sources(content)
        problems += [f"{path.name}: {src} stored {found.count(src)} times" for src in sorted(set(found)) if found.count(src) > 1]
        problems += [f"{path.name}: {src} does not belong here" for src in sorted(set(found) - set(expected))]
        problems += [f"{path.name}: {src} is missing" for src in expected if src not in found]
        if kind is FEATURE_SHARDS:  # image shards: read_index has checked each PNG's digest
            corrupt = []
            with h5py.File(path, "r") as f:
                for key, source in content["images"]:
                    ds = f["features"][key]
                    compact = ds.attrs.get("store") == "compact"  # low-res features: the size is rendered
                    if ds.ndim != 3 or (not compact and tuple(ds.shape[1:]) != tuple(ds.attrs["size"])):
                        problems.append(f"{path.name}/{key}: shape {ds.shape} does not match its size attribute")
                    if compact and key not in f.get("images", {}):
                        problems.append(f"{path.name}/{key}: a compact store's image bytes are missing")
                    try:
                        read_all(f, key)
                    except OSError:
                        corrupt.append(source)
            if corrupt:  # set aside: the manifest leaves it out; a re-run copies the intact images, makes the rest
                aside = set_aside_path(path)
                os.replace(path, aside)
                complete -= 1
                problems += [f"{path.name}: {src} is corrupt (checksum mismatch); the shard is set aside as "
                             f"{aside.name}, a re-run makes this image again" for src in corrupt]
                continue
        stored += len(content["images"])
        failed += len(content["failures"])
    if other_job and not repair:
        problems.append(f"manifest.jsonl left unchanged: {other_job} shards are of another job than job.json says; "
                        "check job.json, or pass --repair to rebuild the manifest from it")
    else:
        try:
            write_index(out_dir, list(range(num_shards)), fingerprint, kind)
        except OSError as e:
            problems.append(f"manifest.jsonl not rebuilt: {e.strerror or e}")
    return {"inputs": len(inputs), "stored": stored, "failed": failed, "shards": num_shards,
            "complete_shards": complete, "problems": problems}


@contextlib.contextmanager
def index_lock(out_dir: Path):
    """An exclusive ``flock`` on ``out_dir/.index.lock``; no lock where the platform or filesystem has none."""
    try:
        import fcntl

        handle = open(Path(out_dir) / ".index.lock", "a")
    except (ImportError, OSError):
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


class FeatureStore:
    """Read an upcli output folder: ``store["sub/cat.jpg"]`` or ``store[i]`` gives a (C, H, W) tensor.

    Full and compact stores (``upcli upsample --store compact``) are read alike: a compact store renders each map
    when it is read, from the low-res features and the image it keeps, with the upsampler the job used (on
    ``device``, the CPU by default). ``store.get(name, size=(H, W))`` gives another size (a full store's map is
    resized bilinearly; a compact store renders at that size, above the image's own too).

    Options for training loops: ``dtype`` converts on read (``torch.float32``: what most models want; bfloat16
    stores come back as ``torch.bfloat16`` otherwise), ``size=(H, W)`` gives every map that size (so that a
    DataLoader can batch them), ``with_names=True`` makes each item ``(source name, tensor)`` (to match features
    to labels under ``shuffle=True``).

    h5py handles open lazily in each process, so the store can be handed to a DataLoader with workers.

    >>> store = FeatureStore("feats/")
    >>> feats = store["cat.jpg"]            # torch.Tensor (C, H, W), float16 by default
    >>> big = store.get("cat.jpg", size=(896, 1344))
    >>> loader = DataLoader(FeatureStore("feats/", dtype=torch.float32, size=(224, 224), with_names=True),
    ...                     batch_size=8, shuffle=True, num_workers=2)   # batches of (names, (8, C, 224, 224))
    """

    def __init__(self, root, device=None, dtype=None, size: tuple[int, int] | None = None, with_names: bool = False):
        self.root = Path(root)
        manifest = self.root / "manifest.jsonl"
        if not manifest.is_file():
            raise StoreError(f"{self.root}: no manifest.jsonl; not an upcli output folder (or run `upcli upsample --verify {self.root}`)")
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.sources = [r["source"] for r in rows]
        self._index = {r["source"]: (r["shard"], r["key"]) for r in rows}
        self._files: dict = {}
        self._pid = os.getpid()
        self.device, self.dtype, self.size, self.with_names = device, dtype, size, with_names
        self._renderer = None

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self):
        return iter(self.sources)

    def __contains__(self, source) -> bool:
        return source in self._index

    def keys(self):
        return list(self.sources)

    def items(self):
        return ((s, self.get(s)) for s in self.sources)

    def _dataset(self, item):
        import h5py

        source = self.sources[item] if isinstance(item, int) else item
        try:
            shard, key = self._index[source]
        except KeyError:
            raise KeyError(f"{source!r} is not in {self.root}") from None
        if self._pid != os.getpid():  # forked into a worker: never reuse the parent's handles
            self._files, self._renderer, self._pid = {}, None, os.getpid()
        if shard not in self._files:
            self._files[shard] = h5py.File(self.root / shard, "r")
        try:
            ds = self._files[shard]["features"][key]
            stored = str(ds.attrs["source"])
        except KeyError:
            stored = None
        if stored != source:  # e.g. an --overwrite since this store read its manifest
            raise StoreError(f"{self.root / shard}: holds {stored!r} where the manifest read at opening says "
                             f"{source!r}; the folder was rewritten since, open it again")
        return ds

    def attrs(self, item) -> dict:
        return dict(self._dataset(item).attrs)

    def shard_path(self, item) -> Path:
        """The shard file that holds ``item`` (a source name or an index)."""
        source = self.sources[item] if isinstance(item, int) else item
        return self.root / self._index[source][0]

    def __getitem__(self, item):
        """``store[name]`` or ``store[i]``: the map with the store's options; ``(name, map)`` with ``with_names``."""
        tensor = self.get(item)
        return (self.sources[item] if isinstance(item, int) else item, tensor) if self.with_names else tensor

    def get(self, item, size: tuple[int, int] | None = None, device=None, dtype=None):
        """The map of ``item`` (a source name or an index) at ``size`` (``(H, W)``; default: the job's size),
        rendered on ``device`` (default: the store's) where the store is compact, as ``dtype`` (default: the
        store's; the stored one if neither is given, on the CPU: a compact store's maps are then rounded to it as a
        full store's were)."""
        import torch

        ds = self._dataset(item)
        attrs = dict(ds.attrs)
        compact = attrs.get("store") == "compact"
        try:
            data = ds[()]
            image = ds.file["images"][ds.name.rsplit("/", 1)[1]][()] if compact else None
        except OSError as err:  # a fletcher32 mismatch: a changed byte on disk
            raise StoreError(f"{self.root}: {item!r} is corrupt ({first_line(err)}); `upcli upsample --verify "
                             f"{self.root}` sets its shard aside for a re-run to make again") from None
        except KeyError:
            raise StoreError(f"{self.root}: the image bytes of compact entry {item!r} are missing") from None
        stored = str(attrs.get("dtype", ds.dtype.name))
        tensor = from_storage(data, stored)
        device = torch.device(device or self.device or "cpu")
        dtype, size = dtype or self.dtype, size or self.size
        if compact:
            if self._renderer is None:
                from .compact import Renderer

                self._renderer = Renderer(self.root)
            high = self._renderer.render(str(attrs["source"]), attrs, tensor, image, size, device,
                                         dtype or tensor.dtype)
        elif size is not None and tuple(size) != tuple(tensor.shape[-2:]):
            high = torch.nn.functional.interpolate(tensor[None].to(device).float(), size=tuple(size),
                                                   mode="bilinear", align_corners=False)[0].to(dtype or tensor.dtype)
        else:
            return tensor if dtype is None else tensor.to(dtype)
        return high if dtype is not None else high.cpu()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"], state["_renderer"] = {}, None
        return state
