"""The batch engine and the feature store, with a model-free process step (fast)."""

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from upcli.errors import BadImageError, StoreError, UsageError
from upcli.io import FeatureStore
from upcli.io.images import load_rgb, scan_images
from upcli.io.jobs import Job, Output, run_job
from upcli.io.store import ShardWriter, verify_store
from upcli.runtime import split_from
from upcli.progress import ProgressReporter


def make_images(root: Path, n: int, bad: tuple[int, ...] = ()) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        path = root / f"d{i % 3}" / f"img{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i in bad:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (9 + i, 7 + 2 * i, 3), dtype=np.uint8)).save(path)
    return root


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def load(ref):
    return load_rgb(ref.path)


class Step:
    """Features = the image as float16 channels; counts calls so resume can be checked."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls = 0
        self.interrupt_at = interrupt_at

    def __call__(self, items, timings):
        self.calls += 1
        if self.calls == self.interrupt_at:
            raise KeyboardInterrupt
        return [Output(item.data.transpose(2, 0, 1).astype(np.float16) / 255, {"size": item.data.shape[:2], "dtype": "float16"})
                for item in items]


def job_for(root: Path, out: Path, shard_size: int = 2, **settings) -> Job:
    return Job(out, root, "test", scan_images(root), {"kind": "rgb", **settings}, shard_size)


def run(job, step=None, **kwargs):
    kwargs.setdefault("reporter", ProgressReporter("test", quiet=True))
    return run_job(job, load, step or Step(), **kwargs)


def store_bytes(out: Path) -> dict:
    """source -> raw stored bytes, read with plain h5py."""
    result = {}
    for shard in sorted(out.glob("shard-*.h5")):
        with h5py.File(shard, "r") as f:
            for ds in f["features"].values():
                result[ds.attrs["source"]] = ds[()].tobytes()
    return result


def test_run_writes_shards_manifest_and_reader(tmp_path):
    root = make_images(tmp_path / "imgs", 5)
    result = run(job_for(root, tmp_path / "out"))
    assert result.exit_code == 0 and result.processed == 5
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    store = FeatureStore(out)
    assert list(store) == [ref.rel for ref in scan_images(root)]
    for ref in scan_images(root):
        expected = torch.from_numpy(load_rgb(ref.path).transpose(2, 0, 1).astype(np.float16) / 255)
        assert torch.equal(store[ref.rel], expected)
    with h5py.File(out / "shard-00000.h5", "r") as f:
        assert bool(f.attrs["complete"]) and f.attrs["num_images"] == 2
        ds = next(iter(f["features"].values()))
        assert ds.chunks == ds.shape
    assert json.loads((out / "job.json").read_text())["inputs"] == list(store)


def test_bad_inputs_are_recorded_once_and_exit_3(tmp_path):
    root = make_images(tmp_path / "imgs", 5, bad=(1, 4))
    result = run(job_for(root, tmp_path / "out"))
    assert result.exit_code == 3 and result.processed == 3 and result.failed == 2
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert sorted(f["source"] for f in failures) == ["d1/img01.png", "d1/img04.png"]
    assert all(f["reason"] for f in failures)
    # a re-run skips everything and still reports the failures
    again = run(job_for(root, tmp_path / "out"))
    assert again.exit_code == 3 and again.processed == 0 and again.skipped_shards == 3


def test_strict_stops_at_first_bad_file_and_keeps_finished_shards(tmp_path):
    root = make_images(tmp_path / "imgs", 6, bad=(4,))
    with pytest.raises(BadImageError, match="img04"):
        run(job_for(root, tmp_path / "out"), strict=True)
    out = tmp_path / "out"
    assert not list(out.glob("*.tmp-*"))
    assert len(FeatureStore(out)) == 2  # shard 0 was finished before the bad file (4th in order)


def test_resume_rebuilds_only_unfinished_shards(tmp_path):
    root = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    run(job_for(root, out))
    reference = store_bytes(out)
    (out / "shard-00001.h5").unlink()
    (out / f"shard-00002.h5.tmp-{socket.gethostname()}-{dead_pid()}").write_bytes(b"partial")  # a killed run's
    step = Step()
    run(job_for(root, out), step)
    assert step.calls == 2  # only shard 1 was recomputed (one image per batch)
    assert store_bytes(out) == reference
    assert not list(out.glob("*.tmp-*"))


def test_interrupt_keeps_finished_shards_and_resumes(tmp_path):
    root = make_images(tmp_path / "imgs", 6)
    run(job_for(root, tmp_path / "ref"))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(job_for(root, out), Step(interrupt_at=4))
    assert not list(out.glob("*.tmp-*"))
    assert len(list(out.glob("shard-*.h5"))) == 1
    run(job_for(root, out))
    assert store_bytes(out) == store_bytes(tmp_path / "ref")


def test_other_job_refused_unless_overwrite(tmp_path):
    root = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    run(job_for(root, out))
    with pytest.raises(StoreError, match="holds another job.*--overwrite"):
        run(job_for(root, out, dtype="float32"))
    make_images(root, 4)  # one more image: the input list changed
    with pytest.raises(StoreError, match="input list changed"):
        run(job_for(root, out))
    (out / "notes.txt").write_text("mine")
    assert run(job_for(root, out, dtype="float32"), overwrite=True).processed == 4
    assert (out / "notes.txt").read_text() == "mine"


def test_an_input_rewritten_in_place_at_the_same_size_is_another_job(tmp_path):
    root = make_images(tmp_path / "imgs", 3)
    out = tmp_path / "out"
    run(job_for(root, out))
    assert run(job_for(root, out)).skipped_shards == 2  # shard size 2
    path = scan_images(root)[1].path
    data = bytearray(path.read_bytes())
    before = path.stat()
    data[-20] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))  # a coarse clock could tie: force it
    assert path.stat().st_size == before.st_size
    with pytest.raises(StoreError, match="holds another job \\(input files changed \\(size or modification time"):
        run(job_for(root, out))


def test_an_open_store_refuses_to_read_a_folder_rewritten_since(tmp_path):
    first = make_images(tmp_path / "first", 3)
    out = tmp_path / "out"
    run(job_for(first, out))
    store = FeatureStore(out)
    names = list(store)
    for path in sorted(p for p in first.rglob("*") if p.is_file()):  # the same names, other images
        path.rename(path.with_name("z" + path.name))
    run(job_for(first, out), overwrite=True)
    assert set(FeatureStore(out)) != set(names)
    with pytest.raises(StoreError, match="the folder was rewritten since, open it again"):
        store[names[0]]


def test_a_live_writers_temp_file_is_left_alone_and_its_shard_skipped(tmp_path):
    root = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    run(job_for(root, out), split=(0, 2))  # shards 0 and 2 done
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        live = out / f"shard-00001.h5.tmp-{socket.gethostname()}-{other.pid}"  # another process writes shard 1
        live.write_bytes(b"being written")
        lines = []
        reporter = ProgressReporter("test", quiet=False, stream=None)
        reporter.log = lines.append
        result = run(job_for(root, out), reporter=reporter)
        assert live.read_bytes() == b"being written" and not (out / "shard-00001.h5").exists()
        assert result.skipped_shards == 2 and result.processed == 0
        assert any(f"another writer (host {socket.gethostname()}, pid {other.pid}) holds shard-00001.h5" in line
                   for line in lines), lines
    finally:
        other.communicate(b"")
    run(job_for(root, out))  # that writer gone: its leftover is removed and the shard made
    assert not live.exists() and len(FeatureStore(out)) == 6


def test_job_json_is_checked_and_written_under_the_index_lock(tmp_path, monkeypatch):
    # two jobs started at the same instant in one --out: the check of job.json and its writing are one step under
    # the flock that the manifest rebuilds take, so the second waits and then sees the first's job.json
    import contextlib

    import upcli.io.jobs as jobs

    held, seen = [], []
    real_lock = jobs.index_lock

    @contextlib.contextmanager
    def recording_lock(out_dir):
        with real_lock(out_dir):
            held.append(True)
            try:
                yield
            finally:
                held.pop()

    real_write = jobs.write_atomic

    def recording_write(path, data):
        seen.append((Path(path).name, bool(held)))
        return real_write(path, data)

    monkeypatch.setattr(jobs, "index_lock", recording_lock)
    monkeypatch.setattr(jobs, "write_atomic", recording_write)
    root = make_images(tmp_path / "imgs", 2)
    run(job_for(root, tmp_path / "out"))
    assert ("job.json", True) in seen and ("job.json", False) not in seen


def test_a_shard_with_an_edited_source_is_made_again(tmp_path):
    root = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    run(job_for(root, out))
    reference = store_bytes(out)
    with h5py.File(out / "shard-00001.h5", "r+") as f:
        first, second = sorted(f["features"])
        f["features"][second].attrs["source"] = f["features"][first].attrs["source"]  # one missing, one twice
    assert verify_store(out)["problems"]
    result = run(job_for(root, out))
    assert result.skipped_shards == 2 and result.processed == 2
    assert store_bytes(out) == reference and verify_store(out)["problems"] == []


def test_finished_shards_keep_no_reserved_space(tmp_path):
    """Blocks are reserved past each shard's end before every image is written; the commit gives them back."""
    out = tmp_path / "out"
    run(job_for(make_images(tmp_path / "imgs", 4), out))
    for shard in out.glob("shard-*.h5"):
        st = shard.stat()
        assert st.st_blocks * 512 < st.st_size + (256 << 10), (shard.name, st.st_blocks * 512, st.st_size)


def test_flipped_bytes_in_a_stored_image_are_found_and_made_again(tmp_path):
    root = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    run(job_for(root, out))
    reference, manifest = store_bytes(out), (out / "manifest.jsonl").read_text()
    shard = out / "shard-00001.h5"
    with h5py.File(shard, "r") as f:
        key = sorted(f["features"])[1]
        source = f["features"][key].attrs["source"]
        offset, size = f["features"][key].id.get_chunk_info(0).byte_offset, f["features"][key].id.get_chunk_info(0).size
    data = bytearray(shard.read_bytes())
    start = offset + size // 2
    data[start:start + 64] = bytes(b ^ 0xFF for b in data[start:start + 64])  # 64 flipped bytes in its chunk
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="is corrupt"):
        FeatureStore(out)[source]
    report = verify_store(out)
    assert f"shard-00001.h5: {source} is corrupt (checksum mismatch)" in report["problems"][0]
    assert report["complete_shards"] == 2 and report["stored"] == 4
    assert source not in FeatureStore(out) and (out / "shard-00001.h5.corrupt").exists()
    result = run(job_for(root, out))  # that image made again, the shard's other image copied
    assert result.processed == 1 and store_bytes(out) == reference
    assert (out / "manifest.jsonl").read_text() == manifest
    assert verify_store(out)["problems"] == [] and not (out / "shard-00001.h5.corrupt").exists()


@pytest.mark.parametrize("bad", [[0], [1], [0, 1]])
def test_only_the_corrupt_images_of_a_set_aside_shard_are_made_again(tmp_path, bad):
    root = make_images(tmp_path / "imgs", 7)
    out = tmp_path / "out"
    run(job_for(root, out, shard_size=3), batch_size=2)
    reference, manifest = store_bytes(out), (out / "manifest.jsonl").read_text()
    shard = out / "shard-00001.h5"
    data = bytearray(shard.read_bytes())
    with h5py.File(shard, "r") as f:
        keys = sorted(f["features"])
        for i in bad:
            info = f["features"][keys[i]].id.get_chunk_info(0)
            start = info.byte_offset + info.size // 2
            data[start:start + 16] = bytes(b ^ 0xFF for b in data[start:start + 16])
    shard.write_bytes(bytes(data))
    assert len(verify_store(out)["problems"]) == len(bad)
    result = run(job_for(root, out, shard_size=3), batch_size=2)
    assert result.processed == len(bad) and result.skipped_shards == 2
    assert store_bytes(out) == reference and (out / "manifest.jsonl").read_text() == manifest  # input order kept
    assert verify_store(out)["problems"] == [] and not (out / "shard-00001.h5.corrupt").exists()


def test_two_workers_equal_one(tmp_path):
    root = make_images(tmp_path / "imgs", 7)
    run(job_for(root, tmp_path / "single"))
    for part in range(2):
        run(job_for(root, tmp_path / "split"), split=(part, 2))
    assert store_bytes(tmp_path / "split") == store_bytes(tmp_path / "single")
    assert (tmp_path / "split" / "manifest.jsonl").read_text() == (tmp_path / "single" / "manifest.jsonl").read_text()
    report = verify_store(tmp_path / "split")
    assert report["problems"] == [] and report["stored"] == 7
    with pytest.raises(UsageError, match="--overwrite cannot be combined"):
        run(job_for(root, tmp_path / "split"), split=(0, 2), overwrite=True)


def test_verify_finds_missing_shard(tmp_path):
    root = make_images(tmp_path / "imgs", 5)
    out = tmp_path / "out"
    run(job_for(root, out), split=(0, 2))  # shards 0 and 2 only
    report = verify_store(out)
    assert report["problems"] == ["shard-00001.h5: missing"]
    with pytest.raises(StoreError, match="no job.json"):
        verify_store(tmp_path / "imgs")


def test_disk_full_is_one_clear_error_and_loses_nothing(tmp_path, monkeypatch):
    root = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out"
    real_add, calls = ShardWriter.add, []

    def add(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, *args)

    monkeypatch.setattr(ShardWriter, "add", add)
    with pytest.raises(StoreError, match="disk full") as err:
        run(job_for(root, out))
    assert "\n" not in str(err.value)
    assert not list(out.glob("*.tmp-*"))
    assert len(FeatureStore(out)) == 2  # shard 0 is intact
    monkeypatch.setattr(ShardWriter, "add", real_add)
    assert run(job_for(root, out)).processed == 4


def test_reader_under_dataloader_with_two_workers(tmp_path):
    root = make_images(tmp_path / "imgs", 5)
    run(job_for(root, tmp_path / "out"))
    store = FeatureStore(tmp_path / "out")
    store[0]  # a handle opened in the parent must not leak into the workers
    loader = torch.utils.data.DataLoader(store, batch_size=None, num_workers=2)
    got = list(loader)
    assert len(got) == 5
    for i, feats in enumerate(got):
        assert torch.equal(feats, store[i])


def test_split_from_flags_and_env_says_where_it_came_from():
    assert split_from(4, 1, env={}) == (1, 4, "--num-shards/--shard-index")
    assert split_from(env={}) == (0, 1, "no split")
    assert split_from(env={"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3, "torchrun: RANK=2, WORLD_SIZE=3")
    assert split_from(env={"SLURM_NTASKS": "4", "SLURM_PROCID": "3"})[:2] == (3, 4)
    array = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "2"}
    assert split_from(env=array) == (3, 4, "SLURM array: SLURM_ARRAY_TASK_ID=5, SLURM_ARRAY_TASK_MIN=2, "
                                           "SLURM_ARRAY_TASK_COUNT=4")
    with pytest.raises(UsageError, match="shard-index"):
        split_from(2, 2, env={})
    with pytest.raises(UsageError, match="go together"):
        split_from(2, None, env={})
    with pytest.raises(UsageError, match=r"^SLURM array: SLURM_ARRAY_TASK_ID=5, .*COUNT=2 gives part 5, not in \[0, 2\)$"):
        split_from(env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2"})
    with pytest.raises(UsageError, match="RANK='x' in the environment is not a whole number"):
        split_from(env={"RANK": "x", "WORLD_SIZE": "2"})


def test_a_split_job_logs_its_part_and_where_it_came_from(tmp_path, monkeypatch):
    import io

    from upcli.configs import JobOptions
    from upcli.io.jobs import prepare_job

    root = make_images(tmp_path / "imgs", 6)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    plan = prepare_job("test", root, JobOptions(out=tmp_path / "out", workers=0), 2)
    log = io.StringIO()
    plan.reporter.stream = log
    plan.run(job_for(root, tmp_path / "out"), load, Step())
    assert ("test: part 1 of 2 (SLURM array: SLURM_ARRAY_TASK_ID=1, SLURM_ARRAY_TASK_MIN=0, "
            "SLURM_ARRAY_TASK_COUNT=2): 2 of the 6 inputs, shards 1, 3, ... of 3") in log.getvalue()


def test_a_job_mismatch_names_only_the_options_that_differ():
    from upcli.io.jobs import _difference

    old = {"command": "fit-image", "settings": {"size": 448, "fit": {"steps": 200, "views": 48, "base": "bilinear"}}}
    new = {"command": "fit-image", "settings": {"size": 448, "fit": {"steps": 100, "views": 48, "base": "jbu"}}}
    assert _difference(old, new) == "fit.steps 200 vs 100, fit.base 'bilinear' vs 'jbu'"
    assert _difference(old, {**new, "command": "upsample"}) == "command fit-image vs upsample"


def test_verify_never_empties_the_manifest_because_job_json_disagrees(tmp_path):
    import json

    root = make_images(tmp_path / "imgs", 5)
    out = tmp_path / "out"
    run(job_for(root, out))
    manifest = (out / "manifest.jsonl").read_text()
    assert len(manifest.splitlines()) == 5
    record = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**record, "fingerprint": "0" * 64}))
    report = verify_store(out)
    assert "shard-00000.h5: complete, but of another job than job.json's" in report["problems"]
    assert report["problems"][-1].startswith("manifest.jsonl left unchanged: 3 shards are of another job")
    assert (out / "manifest.jsonl").read_text() == manifest  # nothing changed
    verify_store(out, repair=True)  # told to: the manifest follows job.json (no shard of its job: empty)
    assert (out / "manifest.jsonl").read_text() == ""


@pytest.mark.parametrize("change, message", [
    ({"num_shards": 10**9}, "'num_shards' must be 3 for 5 inputs in shards of 2, got 1000000000"),
    ({"num_shards": "3"}, "'num_shards' must be 3"),
    ({"shard_size": 0}, "'shard_size' must be a positive integer"),
    ({"shard_size": [2]}, "'shard_size' must be a positive integer"),
    ({"inputs": "a.png"}, "'inputs' must be a list of file names"),
    ({"fingerprint": 7}, "'fingerprint' must be a string"),
])
def test_verify_refuses_a_job_json_of_wrong_types_in_one_line(tmp_path, change, message):
    import json

    root = make_images(tmp_path / "imgs", 5)
    out = tmp_path / "out"
    run(job_for(root, out))
    record = json.loads((out / "job.json").read_text())
    (out / "job.json").write_text(json.dumps({**record, **change}))
    with pytest.raises(StoreError, match=message) as info:
        verify_store(out)
    assert "\n" not in str(info.value)
    (out / "job.json").write_text("[1, 2]")
    with pytest.raises(StoreError, match="not an upcli job record"):
        verify_store(out)
    (out / "job.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(StoreError, match="unreadable"):
        verify_store(out)


def test_an_unwritable_out_and_a_foreign_job_json_are_one_line_errors(tmp_path, monkeypatch):
    import upcli.io.jobs as jobs
    from upcli.io.store import verify_store

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "job.json").write_text('{"tool": "something else"}')
    with pytest.raises(StoreError, match="not an upcli job record"):
        verify_store(tmp_path / "other")

    def read_only(path, data):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(jobs, "write_atomic", read_only)
    job = jobs.Job(tmp_path / "out", tmp_path, "upsample", [], {}, 1)
    with pytest.raises(StoreError, match="cannot write there \\(Permission denied\\)"):
        jobs.prepare_out_dir(job, overwrite=False)


def test_write_atomic_leaves_no_temporary_file_when_it_fails(tmp_path, monkeypatch):
    import upcli.io.store as store

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.os, "replace", disk_full)
    with pytest.raises(OSError, match="No space"):
        store.write_atomic(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_an_image_that_runs_out_of_memory_is_recorded_and_the_job_goes_on(tmp_path):
    root = make_images(tmp_path / "imgs", 5)

    class TooBig(Step):
        def __call__(self, items, timings):
            if any(item.ref.rel == "d1/img01.png" for item in items):
                raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                                   "you tried to allocate 51539607552 bytes")
            return super().__call__(items, timings)

    result = run(job_for(root, tmp_path / "out", shard_size=5), TooBig(), batch_size=2)
    assert result.exit_code == 3 and result.processed == 4
    assert [f["source"] for f in result.failures] == ["d1/img01.png"]
    assert "out of memory" in result.failures[0]["reason"] and len(FeatureStore(tmp_path / "out")) == 4

    class Broken(Step):
        def __call__(self, items, timings):
            raise RuntimeError("a real bug")

    with pytest.raises(RuntimeError, match="a real bug"):
        run(job_for(root, tmp_path / "out2", shard_size=5), Broken())


def test_a_preview_on_a_full_disk_is_a_one_line_store_error(tmp_path):
    import errno

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    class PreviewOnFullDisk(Step):
        def __call__(self, items, timings):
            outputs = super().__call__(items, timings)
            for output in outputs:
                output.files["previews/x.png"] = full_disk
            return outputs

    with pytest.raises(StoreError, match="disk full; finished shards are kept"):
        run(job_for(make_images(tmp_path / "imgs", 2), tmp_path / "out"), PreviewOnFullDisk())


def test_index_rebuilds_of_split_workers_take_turns(tmp_path):
    """Two rebuilds cannot interleave: the second waits for the lock the first holds (one node's workers)."""
    import threading

    import upcli.io.store as store

    (tmp_path / "out").mkdir()
    order = []
    with store.index_lock(tmp_path / "out"):
        other = threading.Thread(target=lambda: (store.write_index(tmp_path / "out", []), order.append("second")))
        other.start()
        other.join(timeout=0.5)
        order.append("first")
    other.join()
    assert order == ["first", "second"] and (tmp_path / "out" / "manifest.jsonl").read_text() == ""


def test_live_writer_reads_host_and_pid_from_the_name():
    from upcli.io.store import live_writer, temp_path

    assert live_writer(temp_path(Path("shard-00001.h5"))) is None  # this process's own
    assert live_writer(Path(f"shard-00001.h5.tmp-{socket.gethostname()}-{dead_pid()}")) is None
    assert live_writer(Path("shard-00001.h5.partial")) is None  # not a name upcli makes
    elsewhere = live_writer(Path("shard-00001.h5.tmp-node-17.cluster-4242"))
    assert elsewhere.startswith("host node-17.cluster, pid 4242, not checkable from here: delete")


def test_default_decode_workers_leave_a_small_cpu_to_the_model():
    import torch

    from upcli.runtime import default_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [default_workers(cpu, cores=n) for n in (1, 2, 4, 5, 64)] == [0, 0, 0, 1, 1]
    assert [default_workers(gpu, cores=n) for n in (1, 2, 3, 16)] == [1, 1, 2, 4]
