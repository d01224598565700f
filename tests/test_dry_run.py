"""``upcli upsample --dry-run`` makes every check the real run makes before its first image (one function for
both): it fails where the run fails, with the same line and exit code, and lists only this process's part."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_backbones import dinov2_hub_state_dict


def images(root: Path, n: int = 8) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((20, 30, 3), 10 * i, np.uint8)).save(root / f"im{i}.png")
    return root


@pytest.fixture
def upcli(cli):
    """``upcli upsample ARGS``, offline."""
    return lambda *args, env=None: cli("upsample", *args, env={"HF_HUB_OFFLINE": "1", **(env or {})})


def same_failure(upcli, args: list, out: Path) -> str:
    """The dry run and the real run fail alike; returns their one line."""
    dry, real = upcli(*args, "--dry-run"), upcli(*args, "--out", out)
    assert dry.returncode == real.returncode != 0, (dry.stderr, real.stderr)
    assert len(dry.stderr.strip().splitlines()) == 1, dry.stderr
    assert dry.stderr.strip().splitlines()[-1] == real.stderr.strip().splitlines()[-1]
    return dry.stderr.strip()


def test_missing_weights_offline(upcli, tmp_path):
    line = same_failure(upcli, [images(tmp_path / "imgs"), "--backbone", "dinov2"], tmp_path / "o")
    assert "could not download weights for dinov2" in line


def test_no_jbu_checkpoint_for_this_backbone(upcli, tmp_path):
    weights = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(dinov2_hub_state_dict(depth=12), weights)  # the whole ViT-S/14 layout, random values
    line = same_failure(upcli, [images(tmp_path / "imgs"), "--backbone", "dinov2", "--weights", weights, "--layer", "0",
                         "--upsampler", "jbu"], tmp_path / "o")
    assert "no jbu checkpoint ships for backbone 'dinov2'" in line


def test_an_out_that_holds_another_job(upcli, tmp_path):
    imgs = images(tmp_path / "imgs", 2)
    assert upcli(imgs, "--out", tmp_path / "o", "--size", "32").returncode == 0
    dry = upcli(imgs, "--out", tmp_path / "o", "--size", "48", "--dry-run")
    real = upcli(imgs, "--out", tmp_path / "o", "--size", "48")
    assert dry.returncode == real.returncode == 1
    assert dry.stderr.strip() == real.stderr.strip() and "holds another job" in dry.stderr
    same = upcli(imgs, "--out", tmp_path / "o", "--size", "32", "--dry-run")  # the same job: it would resume
    assert same.returncode == 0, same.stderr


def test_a_slurm_array_task_lists_its_own_part(upcli, tmp_path):
    imgs = images(tmp_path / "imgs", 8)
    env = {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    dry = upcli(imgs, "--dry-run", "--shard-size", "2", "--size", "32", env=env)
    assert dry.returncode == 0, dry.stderr
    listed = [line.split("\t")[0] for line in dry.stdout.splitlines() if "\t" in line]
    assert listed == ["im2.png", "im3.png", "im6.png", "im7.png"]  # shards 1 and 3 of 4
    assert "part 1 of 2 (SLURM array: SLURM_ARRAY_TASK_ID=1" in dry.stdout and "4 of the 8 images" in dry.stdout
    bad = upcli(imgs, "--dry-run", env={"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "2"})
    assert bad.returncode == 2 and "SLURM array: SLURM_ARRAY_TASK_ID=5" in bad.stderr, bad.stderr
    assert "gives part 5, not in [0, 2)" in bad.stderr and "--shard-index" not in bad.stderr
