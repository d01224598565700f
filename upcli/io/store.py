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
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import StoreError

FORMAT = "upcli-features"
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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, Ctrl-C: leave no partial temporary file behind
        tmp.unlink(missing_ok=True)
        raise


class ShardWriter:
    """Writes one shard under a temporary name; ``commit`` renames it into place, ``abort`` deletes it."""

    def __init__(self, out_dir: Path, shard_index: int, attrs: dict, compression: str = "none"):
        import h5py

        self.final_path = Path(out_dir) / shard_name(shard_index)
        self.tmp_path = self.final_path.with_name(f"{self.final_path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        self._filters = COMPRESSIONS[compression]
        self.failures: list[dict] = []
        self.num_images = 0
        self._file = h5py.File(self.tmp_path, "w")
        self._file.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION, "shard_index": shard_index, "complete": False})
        self._file.attrs.update(attrs)
        self._features = self._file.create_group("features")

    def add(self, source: str, array: np.ndarray, attrs: dict) -> str:
        key = f"{self.num_images:06d}"
        # fill_time="never": HDF5 would otherwise write the chunk twice (fill value, then data), 6x slower
        ds = self._features.create_dataset(key, data=array, chunks=array.shape, fill_time="never", **self._filters)
        ds.attrs["source"] = source
        ds.attrs.update(attrs)
        self.num_images += 1
        return key

    def add_failure(self, source: str, reason: str) -> None:
        self.failures.append({"source": source, "reason": reason})

    def commit(self) -> Path:
        self._file.attrs["num_images"] = self.num_images
        self._file.attrs["failures"] = json.dumps(self.failures)
        self._file.attrs["complete"] = True
        self._file.close()
        fsync_path(self.tmp_path)
        os.replace(self.tmp_path, self.final_path)
        fsync_path(self.final_path.parent)
        return self.final_path

    def abort(self) -> None:
        try:
            self._file.close()
        finally:
            self.tmp_path.unlink(missing_ok=True)


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


def image_key(source: str) -> str:
    """Where the image result of ``source`` goes, relative to the output folder: its path with suffix .png."""
    return str(Path(source).with_suffix(".png"))


class ImageShardWriter:
    """A shard of image results: each PNG is written atomically at once; ``commit`` writes the shard's record."""

    def __init__(self, out_dir: Path, shard_index: int, attrs: dict, compression: str = "none"):
        self.out_dir = Path(out_dir)
        self.final_path = self.out_dir / f"shard-{shard_index:05d}.json"
        self.tmp_path = self.final_path  # nothing temporary outlives a call
        self.record = {"format": IMAGE_FORMAT, "format_version": FORMAT_VERSION, "shard_index": shard_index,
                       "complete": True, **attrs, "images": [], "failures": []}

    def add(self, source: str, array: np.ndarray, attrs: dict) -> str:
        """``array``: uint8 (H, W, 3)."""
        from PIL import Image

        key = image_key(source)
        path = self.out_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
        self.record["images"].append({"key": key, "source": source, **attrs})
        return key

    def add_failure(self, source: str, reason: str) -> None:
        self.record["failures"].append({"source": source, "reason": reason})

    def commit(self) -> Path:
        write_atomic(self.final_path, json.dumps(self.record, indent=1) + "\n")
        return self.final_path

    def abort(self) -> None:
        pass


def read_image_shard_index(path: Path, fingerprint: str | None = None) -> dict | None:
    """Like :func:`read_shard_index` for an image shard; None also when one of its PNGs has gone."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
        if record.get("format") != IMAGE_FORMAT or not record.get("complete"):
            return None
        if fingerprint is not None and record.get("job_fingerprint") != fingerprint:
            return None
        images = [(entry["key"], entry["source"]) for entry in record["images"]]
        if not all((Path(path).parent / key).is_file() for key, _ in images):
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
    with _index_lock(out_dir):
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


@contextlib.contextmanager
def _index_lock(out_dir: Path):
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

    h5py handles open lazily in each process, so the store can be handed to a DataLoader with workers.

    >>> store = FeatureStore("feats/")
    >>> feats = store["cat.jpg"]            # torch.Tensor (C, H, W), float16 by default
    >>> loader = DataLoader(store, batch_size=None, num_workers=2)
    """

    def __init__(self, root):
        self.root = Path(root)
        manifest = self.root / "manifest.jsonl"
        if not manifest.is_file():
            raise StoreError(f"{self.root}: no manifest.jsonl; not an upcli output folder (or run `upcli upsample --verify {self.root}`)")
        rows = [json.loads(line) for line in manifest.read_text(encoding="utf-8").splitlines() if line.strip()]
        self.sources = [r["source"] for r in rows]
        self._index = {r["source"]: (r["shard"], r["key"]) for r in rows}
        self._files: dict = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.sources)

    def __iter__(self):
        return iter(self.sources)

    def __contains__(self, source) -> bool:
        return source in self._index

    def keys(self):
        return list(self.sources)

    def items(self):
        return ((s, self[s]) for s in self.sources)

    def _dataset(self, item):
        import h5py

        source = self.sources[item] if isinstance(item, int) else item
        try:
            shard, key = self._index[source]
        except KeyError:
            raise KeyError(f"{source!r} is not in {self.root}") from None
        if self._pid != os.getpid():  # forked into a worker: never reuse the parent's handles
            self._files, self._pid = {}, os.getpid()
        if shard not in self._files:
            self._files[shard] = h5py.File(self.root / shard, "r")
        return self._files[shard]["features"][key]

    def attrs(self, item) -> dict:
        return dict(self._dataset(item).attrs)

    def __getitem__(self, item):
        ds = self._dataset(item)
        return from_storage(ds[()], str(ds.attrs.get("dtype", ds.dtype.name)))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_files"] = {}
        return state
