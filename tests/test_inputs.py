"""The inputs of upsample, fit-image and sr (one scanner, ``collect_images``): files, folders, glob patterns,
--files-from, --include/--exclude; names unique and stable."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from upcli.configs import JobOptions
from upcli.errors import UsageError
from upcli.io.images import collect_images
from upcli.io.jobs import prepare_job


def dataset(root: Path) -> Path:
    """A CamVid-like folder: images and label PNGs side by side, and one name in two folders."""
    for rel in ["train/a.png", "train/b.jpg", "trainannot/a.png", "val/a.png", "val/notes.txt", "val/deep/c.png"]:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.fromarray(np.full((8, 10, 3), 40, np.uint8)).save(path)
    return root


def rels(*args, **kw) -> list[str]:
    return [ref.rel for ref in collect_images(*args, **kw)[1]]


def test_one_folder_and_one_file_keep_their_names(tmp_path):
    root = dataset(tmp_path / "d")
    assert rels(root / "train") == ["a.png", "b.jpg"]
    assert collect_images(root / "train")[0] == root / "train"
    assert rels(root / "val" / "a.png") == ["a.png"]


def test_several_folders_and_files_are_named_from_their_common_folder(tmp_path):
    root = dataset(tmp_path / "d")
    found_root, refs = collect_images([root / "train", root / "val", root / "trainannot" / "a.png"])
    assert found_root == root
    assert [r.rel for r in refs] == ["train/a.png", "train/b.jpg", "trainannot/a.png", "val/a.png", "val/deep/c.png"]
    assert len({r.rel for r in refs}) == len(refs)  # a.png three times, three names
    assert rels([root / "train", root / "train" / "a.png"]) == ["a.png", "b.jpg"]  # listed once


def test_glob_patterns_are_expanded_by_upcli(tmp_path):
    root = dataset(tmp_path / "d")
    assert rels(str(root / "*" / "a.png")) == ["train/a.png", "trainannot/a.png", "val/a.png"]
    assert rels(str(root / "val" / "**" / "*.png")) == ["a.png", "deep/c.png"]
    assert rels(str(root / "val" / "*")) == ["a.png", "deep/c.png"]  # notes.txt is not an image; deep/ is scanned
    with pytest.raises(UsageError, match="no file or folder matches this pattern"):
        collect_images(str(root / "*.webp"))


def test_include_and_exclude_match_the_names(tmp_path):
    root = dataset(tmp_path / "d")
    assert rels(root, include=["train/*"]) == ["train/a.png", "train/b.jpg"]
    assert rels(root, exclude=["*annot/*", "*.jpg"]) == ["train/a.png", "val/a.png", "val/deep/c.png"]
    assert rels(root, include=["val/*"], exclude=["val/deep/*"]) == ["val/a.png"]
    with pytest.raises(UsageError, match="leave no image of the 5 found"):
        collect_images(root, include=["test/*"])


def test_files_from_a_list_or_stdin(tmp_path, monkeypatch):
    root = dataset(tmp_path / "d")
    listing = root / "lists" / "some.txt"
    listing.parent.mkdir()
    listing.write_text(f"../train/a.png\n\n{root / 'val' / 'deep' / 'c.png'}\n../val/gone.png\n")
    found_root, refs = collect_images([], files_from=listing)
    assert found_root == root and [r.rel for r in refs] == ["train/a.png", "val/deep/c.png", "val/gone.png"]
    monkeypatch.chdir(root)
    monkeypatch.setattr(sys, "stdin", io.StringIO("val/a.png\n"))
    assert rels([], files_from="-") == ["a.png"]
    with pytest.raises(UsageError, match="--files-from .*cannot read it"):
        collect_images([], files_from=root / "none.txt")


def test_a_missing_source_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        collect_images([tmp_path / "nope"])


@pytest.mark.parametrize("command", ["upsample", "fit-image", "sr"])
def test_every_job_command_takes_the_same_inputs(tmp_path, command):
    root = dataset(tmp_path / "d")
    options = JobOptions(out=tmp_path / "out", include=["*/a.png"], exclude=["trainannot/*"])
    plan = prepare_job(command, [root / "train", str(root / "val" / "*")], options)
    assert plan.root == root and [r.rel for r in plan.inputs] == ["train/a.png", "val/a.png"]


def test_cli_upsample_dry_run_with_several_inputs_and_include(tmp_path):
    root = dataset(tmp_path / "d")
    run = subprocess.run([sys.executable, "-m", "upcli", "upsample", str(root), "--include", "train/*", "--include",
                          "val/*", "--exclude", "*/deep/*", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    listed = [line.split("\t")[0] for line in run.stdout.splitlines() if "\t" in line]
    assert listed == ["train/a.png", "train/b.jpg", "val/a.png"]
    two = subprocess.run([sys.executable, "-m", "upcli", "upsample", str(root / "train"), str(root / "val"),
                          "--dry-run"], capture_output=True, text=True, timeout=120)
    assert two.returncode == 0 and "4 images" in two.stdout, two.stderr
