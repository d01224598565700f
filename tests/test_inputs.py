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


def test_cli_upsample_dry_run_with_several_inputs_and_include(cli, tmp_path):
    root = dataset(tmp_path / "d")
    run = cli("upsample", root, "--include", "train/*", "--include", "val/*", "--exclude", "*/deep/*", "--dry-run")
    assert run.returncode == 0, run.stderr
    listed = [line.split("\t")[0] for line in run.stdout.splitlines() if "\t" in line]
    assert listed == ["train/a.png", "train/b.jpg", "val/a.png"]
    two = cli("upsample", root / "train", root / "val", "--dry-run")
    assert two.returncode == 0 and "4 images" in two.stdout, two.stderr


def test_features_in_one_call_equal_the_store(tmp_path):
    """upcli.features(path | PIL | array | tensor) gives what upsample stores, before its float16."""
    import torch

    import upcli
    from upcli.configs import FeatureOptions
    from upcli.io import FeatureStore
    from upcli.upsample import upsample_folder

    root = dataset(tmp_path / "d") / "train"
    upsample_folder(root / "a.png", JobOptions(out=tmp_path / "o", workers=0, quiet=True), FeatureOptions(),
                    upsampler="jbu", size=40)
    stored = FeatureStore(tmp_path / "o")["a.png"]
    feats = upcli.features(root / "a.png", upsampler="jbu", size=40)
    assert feats.shape == stored.shape == (320, 40, 50) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.half(), stored, rtol=0, atol=0)
    pil = Image.open(root / "a.png")
    assert torch.equal(upcli.features(pil, upsampler="jbu", size=40), feats)
    tensor = torch.from_numpy(np.asarray(pil)).permute(2, 0, 1).float() / 255
    assert torch.equal(upcli.features(tensor, upsampler="jbu", size=40), feats)
    with pytest.raises(ValueError, match="expected an image tensor"):
        upcli.features(tensor[0])


def test_a_learned_upsampler_without_backbone_names_the_missing_argument():
    from upcli.errors import WeightsError
    from upcli.upsamplers import create_upsampler

    with pytest.raises(WeightsError, match=r"create_upsampler\('jbu'\) needs backbone="):
        create_upsampler("jbu")


def test_version_flag():
    import upcli

    run = subprocess.run([sys.executable, "-m", "upcli", "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.strip() == f"upcli {upcli.__version__}"


def test_the_reader_batches_named_maps_of_one_size_and_converts_dtype(tmp_path):
    """FeatureStore(with_names, size, dtype) under a shuffling DataLoader; a bfloat16 store read as float32, and
    with plain h5py by the README's recipe."""
    import h5py
    import torch

    from upcli.configs import FeatureOptions
    from upcli.io import FeatureStore
    from upcli.upsample import upsample_folder

    root = dataset(tmp_path / "d")
    upsample_folder(root, JobOptions(out=tmp_path / "o", workers=0, quiet=True), FeatureOptions(dtype="bfloat16"),
                    size=24)
    plain = FeatureStore(tmp_path / "o")
    assert plain["train/a.png"].dtype == torch.bfloat16
    store = FeatureStore(tmp_path / "o", dtype=torch.float32, size=(16, 20), with_names=True)
    loader = torch.utils.data.DataLoader(store, batch_size=2, shuffle=True, num_workers=0,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for names, batch in loader:
        assert batch.dtype == torch.float32 and batch.shape[1:] == (320, 16, 20)
        for name, feats in zip(names, batch):
            assert torch.equal(feats, plain.get(name, size=(16, 20), dtype=torch.float32))
        seen += names
    assert sorted(seen) == sorted(plain) and seen != sorted(seen)  # every map once, shuffled
    assert store["val/a.png"][1].numpy().dtype == np.float32
    # the README's recipe: bfloat16 maps are stored as their uint16 bits
    with h5py.File(next((tmp_path / "o").glob("shard-*.h5")), "r") as f:
        ds = next(iter(f["features"].values()))
        bits = ds[()]
        as_float = (bits.astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(as_float, plain[str(ds.attrs["source"])].float().numpy())


def test_upsample_size_hxw_gives_every_map_that_size(tmp_path):
    from upcli.configs import FeatureOptions
    from upcli.io import FeatureStore
    from upcli.upsample import upsample_folder

    root = dataset(tmp_path / "d")
    (root / "val" / "wide.png").parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((10, 40, 3), np.uint8)).save(root / "val" / "wide.png")
    upsample_folder(root / "val", JobOptions(out=tmp_path / "o", workers=0, quiet=True), FeatureOptions(), size="24x32")
    store = FeatureStore(tmp_path / "o")
    assert {tuple(store[name].shape) for name in store} == {(320, 24, 32)} and len(store) == 3
    with pytest.raises(UsageError, match="--size must be a positive integer, HxW"):
        upsample_folder(root, JobOptions(out=tmp_path / "x"), FeatureOptions(), size="24x")
