"""Compact feature stores (``upcli upsample --store compact``): low-res features and image bytes, maps rendered on
read. Every map equals the full store's within float16 rounding; the store refuses a missing or altered upsampler
copy and undecodable image bytes in one line."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from upcli.configs import FeatureOptions, JobOptions
from upcli.errors import StoreError, UsageError
from upcli.io import FeatureStore
from upcli.io.store import verify_store
from upcli.upsample import upsample_folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Non-square images (both orientations), and one JPEG whose EXIF says to rotate it."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for name, (h, w) in {"wide.png": (40, 70), "tall.png": (75, 44)}.items():
        yy, xx = np.mgrid[:h, :w]
        arr = np.stack([(xx * 255 // w), (yy * 255 // h), rng.integers(0, 255, (h, w))], -1).astype(np.uint8)
        arr[h // 3:2 * h // 3, w // 4:w // 2] = (250, 20, 30)  # an edge for the guided upsamplers
        Image.fromarray(arr).save(root / name)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    Image.fromarray(rng.integers(0, 255, (36, 60, 3), dtype=np.uint8)).save(root / "rotated.jpg", exif=exif, quality=95)
    return root


def run(images: Path, out: Path, store: str, upsampler: str = "bilinear", **kw):
    options = JobOptions(out=out, workers=0)
    return upsample_folder(images, options, FeatureOptions(), upsampler=upsampler, size=48, store=store, **kw)


def assert_within_float16_rounding(full: torch.Tensor, compact: torch.Tensor) -> float:
    a, b = full.float(), compact.float()
    diff = (a - b).abs().max().item()
    assert a.shape == b.shape and diff <= 2**-10 * a.abs().max().item(), diff  # one float16 ulp of the largest
    return diff


@pytest.mark.parametrize("upsampler, args", [("bilinear", None), ("bilateral", {"sigma_color": 0.2}), ("jbu", None)])
def test_compact_maps_equal_the_full_store(images, tmp_path, upsampler, args):
    run(images, tmp_path / "full", "full", upsampler, upsampler_args=args)
    run(images, tmp_path / "compact", "compact", upsampler, upsampler_args=args)
    full, compact = FeatureStore(tmp_path / "full"), FeatureStore(tmp_path / "compact")
    assert sorted(compact) == sorted(full) == ["rotated.jpg", "tall.png", "wide.png"]
    for name in full:
        assert_within_float16_rounding(full[name], compact[name])
    assert full["rotated.jpg"].shape[1] > full["rotated.jpg"].shape[2]  # upright: taller than wide
    low = compact._dataset("wide.png")
    assert low.shape[1:] == (2, 3) and low.attrs["store"] == "compact"  # 48 x 84 at stride 32
    size = sum(p.stat().st_size for p in (tmp_path / "compact").rglob("*") if p.is_file())
    assert size < sum(p.stat().st_size for p in (tmp_path / "full").rglob("*") if p.is_file()) / 4
    assert verify_store(tmp_path / "compact")["problems"] == []


def test_compact_renders_any_size_and_in_dataloader_workers(images, tmp_path):
    run(images, tmp_path / "c", "compact", "jbu")
    store = FeatureStore(tmp_path / "c")
    big = store.get("wide.png", size=(100, 171))  # above the image's own 40 x 70
    assert big.shape == (320, 100, 171) and big.dtype == torch.float16 and torch.isfinite(big).all()
    assert torch.equal(store.get("wide.png", size=(48, 84)), store["wide.png"])
    loader = torch.utils.data.DataLoader(store, batch_size=None, num_workers=2)
    for name, tensor in zip(store, loader):
        assert torch.equal(tensor, store[name])


def test_a_full_store_resizes_on_get(images, tmp_path):
    run(images, tmp_path / "f", "full")
    store = FeatureStore(tmp_path / "f")
    assert store.get("tall.png", size=(20, 30)).shape == (320, 20, 30)
    assert torch.equal(store.get("tall.png", size=tuple(store["tall.png"].shape[1:])), store["tall.png"])


def test_a_missing_or_altered_upsampler_copy_is_refused_naming_its_sha256(images, tmp_path):
    run(images, tmp_path / "c", "compact", "jbu")
    (copy,) = (tmp_path / "c" / "upsamplers").glob("*.safetensors")
    sha = copy.stem
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=f"upsamplers/{sha}.safetensors is altered") as err:
        FeatureStore(tmp_path / "c")["wide.png"]
    assert "\n" not in str(err.value)
    copy.unlink()
    with pytest.raises(StoreError, match=f"checkpoint with sha256 {sha} is missing"):
        FeatureStore(tmp_path / "c")["wide.png"]


def test_stored_image_bytes_that_do_not_decode_name_the_image(images, tmp_path):
    run(images, tmp_path / "c", "compact")
    shard = next((tmp_path / "c").glob("shard-*.h5"))
    with h5py.File(shard, "r+") as f:  # rewritten through HDF5: the checksum holds, the bytes are not an image
        key = next(k for k, ds in f["features"].items() if ds.attrs["source"] == "tall.png")
        data = f["images"][key][()]
        del f["images"][key]
        f["images"].create_dataset(key, data=np.zeros_like(data) + 7, fletcher32=True)
    with pytest.raises(StoreError, match="the stored image of 'tall.png' cannot be decoded"):
        FeatureStore(tmp_path / "c")["tall.png"]
    assert FeatureStore(tmp_path / "c")["wide.png"].shape == (320, 48, 84)


def test_compact_resumes_and_is_another_job_than_full(images, tmp_path):
    out = tmp_path / "c"
    first = run(images, out, "compact", "jbu")
    again = run(images, out, "compact", "jbu")
    assert first.processed == 3 and again.processed == 0 and again.skipped_shards == first.skipped_shards + 1
    with pytest.raises(StoreError, match="holds another job .*store.*--overwrite"):
        run(images, out, "full", "jbu")
    with pytest.raises(UsageError, match="--store must be one of full, compact"):
        run(images, tmp_path / "x", "tiny")


def test_implicit_has_no_compact_form(images, tmp_path):
    with pytest.raises(UsageError, match="fit-image --store compact"):
        run(images, tmp_path / "c", "compact", "implicit")



def test_expand_renders_a_compact_store_into_a_full_one(images, tmp_path):
    from upcli.upsample import expand_store

    run(images, tmp_path / "c", "compact", "jbu")
    compact = FeatureStore(tmp_path / "c")
    options = JobOptions(out=tmp_path / "full", shard_size=2)
    first = expand_store(tmp_path / "c", options)
    full = FeatureStore(tmp_path / "full")
    assert first.processed == 3 and sorted(full) == sorted(compact)
    for name in compact:
        assert torch.equal(full[name], compact[name])
        assert "store" not in full.attrs(name) and tuple(full.attrs(name)["size"]) == tuple(full[name].shape[1:])
    assert verify_store(tmp_path / "full")["problems"] == []
    assert expand_store(tmp_path / "c", options).processed == 0  # resumes: nothing left
    with pytest.raises(UsageError, match="not a compact store"):
        expand_store(tmp_path / "full", JobOptions(out=tmp_path / "again"))


def test_fit_image_compact_keeps_the_fields_and_renders_them(images, tmp_path):
    """fit-image's compact form is its saved field, the low-res features and the image bytes (guided by the whole
    image, as fit-image renders): equal to its full store within float16 rounding."""
    from upcli.fit_image import fit_images
    from upcli.upsamplers.implicit import FitConfig

    tiny = FitConfig(steps=4, views=4, views_per_step=2, points_per_cell=2, fit_size=64, proj_dim=16, width=16)
    kw = dict(fit=tiny, scale=1.5)
    fit_images(images, JobOptions(tmp_path / "full", workers=0, quiet=True), **kw)
    fit_images(images, JobOptions(tmp_path / "c", workers=0, quiet=True), store="compact", **kw)
    full, compact = FeatureStore(tmp_path / "full"), FeatureStore(tmp_path / "c")
    for name in full:
        assert_within_float16_rounding(full[name], compact[name])
        assert (tmp_path / "c" / "fields" / f"{name}.safetensors").is_file()
    assert verify_store(tmp_path / "c")["problems"] == []
    field = tmp_path / "c" / "fields" / "wide.png.safetensors"
    field.write_bytes(field.read_bytes()[:-1] + b"x")
    with pytest.raises(StoreError, match="fields/wide.png.safetensors is altered"):
        FeatureStore(tmp_path / "c")["wide.png"]
    with pytest.raises(UsageError, match="--store compact keeps the fields it fits"):
        fit_images(images, JobOptions(tmp_path / "x", workers=0), store="compact", from_fields=tmp_path / "c" / "fields")


def test_dtype_on_read(images, tmp_path):
    run(images, tmp_path / "full", "full", "jbu")
    run(images, tmp_path / "c", "compact", "jbu")
    full, compact = FeatureStore(tmp_path / "full"), FeatureStore(tmp_path / "c", dtype=torch.float32)
    assert full["wide.png"].dtype == torch.float16 and full.get("wide.png", dtype=torch.float32).dtype == torch.float32
    exact = compact["wide.png"]  # not rounded to the stored float16
    assert exact.dtype == torch.float32 and not torch.equal(exact, exact.half().float())
    assert_within_float16_rounding(full["wide.png"], exact)
    assert torch.equal(compact.get("wide.png", dtype=torch.float16), FeatureStore(tmp_path / "c")["wide.png"])


def test_a_split_compact_job_equals_one_worker(images, tmp_path):
    one = run(images, tmp_path / "one", "compact", "jbu")
    for part in range(2):
        options = JobOptions(out=tmp_path / "two", workers=0, shard_size=1, num_shards=2, shard_index=part)
        upsample_folder(images, options, FeatureOptions(), upsampler="jbu", size=48, store="compact")
    single, split = FeatureStore(tmp_path / "one"), FeatureStore(tmp_path / "two")
    assert one.processed == 3 and sorted(split) == sorted(single)
    for name in single:
        assert torch.equal(split[name], single[name])
    assert verify_store(tmp_path / "two")["problems"] == []
