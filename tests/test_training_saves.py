"""A checkpoint and its training state are saved as one unit (upcli.training.save_pair / recover_pair): a run
killed at any point of a save resumes, bit-exact, and a full disk is one line that says what is kept."""

import errno
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from upcli.checkpoints import read_config, save_checkpoint
from upcli.errors import StoreError
from upcli.training import pending_path, prepare_output, recover_pair, save_pair, train_state_path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
TRAIN = ["train", str(EXAMPLES), "--steps", "3", "--batch-size", "2", "--image-size", "64", "--views", "1",
         "--save-every", "1", "--device", "cpu", "-q"]

# Runs the CLI and dies like kill -9 (os._exit: no cleanup, no finally) just before the rename named by argv[1]
# happens for the second time, i.e. in the middle of saving step 2.
KILLER = """
import os, sys
kill_before, target = sys.argv[1], sys.argv[2]
seen = {"n": 0}
real_replace = os.replace

def replace(src, dst):
    if str(dst).endswith(target):
        seen["n"] += 1
        if seen["n"] == 2:
            os._exit(9)
    return real_replace(src, dst)

os.replace = replace
sys.argv = ["upcli", *sys.argv[3:]]
from upcli.cli import app
app()
"""


def cli(*args, script=None):
    cmd = [sys.executable, "-c", script, *args] if script else [sys.executable, "-m", "upcli.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "w.safetensors"
    run = cli(*TRAIN, "--out", str(out))
    assert run.returncode == 0, run.stderr
    return load_file(out), load_file(train_state_path(out))


# where the kill lands: while the state is written (the new checkpoint is pending, the old pair in place), and
# between the two renames (the new state in place, the new checkpoint still pending)
@pytest.mark.parametrize("target, resumes_from", [(".train.safetensors.pending", 1), ("w.safetensors", 2)])
def test_a_kill_during_a_save_resumes_bit_exact(tmp_path, uninterrupted, target, resumes_from):
    out = tmp_path / "w.safetensors"
    killed = cli("kill", target, *TRAIN, "--out", str(out), script=KILLER)
    assert killed.returncode == 9, killed.stderr
    assert pending_path(out).exists()  # the kill left the save half done
    recover_pair(out)  # what --resume does first
    assert read_config(out)["training"]["step"] == read_config(train_state_path(out))["step"] == resumes_from
    resumed = cli(*TRAIN, "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.train.safetensors"]  # nothing left
    model, state = uninterrupted
    for want, path in ((model, out), (state, train_state_path(out))):
        got = load_file(path)
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def write_pair(out: Path, step: int):
    save_checkpoint(out, {"w": torch.full((2,), float(step))}, {"kind": "x", "training": {"step": step}})
    save_checkpoint(train_state_path(out), {"m": torch.zeros(1)}, {"kind": "x-state", "step": step})


def test_recover_finishes_or_drops_a_pending_save(tmp_path):
    out = tmp_path / "w.safetensors"
    write_pair(out, 1)
    state = train_state_path(out)
    # killed between the renames: state at 2 in place, checkpoint at 2 pending -> put in place
    save_checkpoint(pending_path(out), {"w": torch.full((2,), 2.0)}, {"kind": "x", "training": {"step": 2}})
    save_checkpoint(state, {"m": torch.zeros(1)}, {"kind": "x-state", "step": 2})
    recover_pair(out)
    assert read_config(out)["training"]["step"] == 2 and not pending_path(out).exists()
    # killed while the state was written: checkpoint at 3 pending, a partial temporary state -> both dropped
    save_checkpoint(pending_path(out), {"w": torch.full((2,), 3.0)}, {"kind": "x", "training": {"step": 3}})
    partial = state.with_name(state.name + ".pending.tmp-host-123")
    partial.write_bytes(b"half a file")
    recover_pair(out)
    assert read_config(out)["training"]["step"] == 2 and read_config(state)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.train.safetensors"]
    # killed after both pending files were complete, before any rename -> both put in place
    save_checkpoint(pending_path(out), {"w": torch.full((2,), 4.0)}, {"kind": "x", "training": {"step": 4}})
    save_checkpoint(pending_path(state), {"m": torch.zeros(1)}, {"kind": "x-state", "step": 4})
    prepare_output(out, resume=True, overwrite=False)  # every start recovers first
    assert read_config(out)["training"]["step"] == 4 and read_config(state)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.train.safetensors"]


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_pair(tmp_path):
    out = tmp_path / "w.safetensors"
    write_pair(out, 3)

    def disk_full(checkpoint, state):
        save_checkpoint(checkpoint, {"w": torch.zeros(2)}, {"kind": "x", "training": {"step": 4}})
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StoreError) as info:
        save_pair(out, 4, disk_full)
    message = str(info.value)
    assert "\n" not in message and "cannot save step 4" in message and "No space left on device" in message
    assert "keeps step 3" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.safetensors", "w.train.safetensors"]
    assert read_config(out)["training"]["step"] == 3
