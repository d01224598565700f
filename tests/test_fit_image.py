"""``upcli fit-image``: the per-image implicit field, its store output, resume, saved fields and bad input."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upcli.backbones import create_backbone
from upcli.cli import app
from upcli.errors import StoreError, UsageError
from upcli.fit_image import fit_images
from upcli.io import FeatureStore
from upcli.io.images import load_rgb
from upcli.configs import JobOptions
from upcli.upsamplers import create_upsampler, guidance_at
from upcli.upsamplers.implicit import FieldUpsampler, FitConfig, cell_points, fit_field, reflect
from upcli.upsamplers.multiview import apply_jitter, view_error

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
TINY = FitConfig(steps=4, views=4, views_per_step=2, points_per_cell=2, fit_size=64, proj_dim=16, width=16)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone("efficientnet-lite0").eval()


def photo(name="chelsea.png", size=(64, 96)) -> torch.Tensor:
    rgb = torch.from_numpy(load_rgb(EXAMPLES / name)).permute(2, 0, 1)[None].float() / 255
    return guidance_at(rgb, size)


def folder(root: Path, n: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(["chelsea.png", "coffee.png", "astronaut.png"][:n]):
        rgb = load_rgb(EXAMPLES / name)
        Image.fromarray(rgb[:: 4 + i, :: 5]).save(root / f"img{i}.png")  # small, non-square, different sizes
    return root


def test_points_follow_the_view_and_reflect_like_grid_sample():
    image = torch.rand(1, 3, 20, 28)
    theta = torch.tensor([[[0.7, 0.0, 0.5], [0.0, 0.7, -0.45]], [[-1.2, 0.0, 0.1], [0.0, 1.2, 0.0]]])
    xy = cell_points(theta, (2, 3), 4, torch.Generator().manual_seed(0))
    assert xy.shape == (2, 8, 12, 2) and xy.abs().max() <= 1
    # sampling the image at the points = sampling the jittered view at the points before the view's geometry
    from torch.nn.functional import grid_sample

    u = torch.rand(2, 8, 12, 2, generator=torch.Generator().manual_seed(0))
    xs = (torch.arange(12) + u[..., 0]) * (2 / 12) - 1
    ys = (torch.arange(8)[:, None] + u[..., 1]) * (2 / 8) - 1
    view_xy = torch.stack([xs, ys], dim=-1)
    seen = apply_jitter(image.expand(2, -1, -1, -1), theta, size=(200, 280))  # fine view, nearest-ish
    direct = grid_sample(image.expand(2, -1, -1, -1), xy, padding_mode="reflection", align_corners=False)
    through_view = grid_sample(seen, view_xy, mode="nearest", align_corners=False)
    assert (direct - through_view).abs().mean() < 0.05
    assert torch.allclose(reflect(torch.tensor([1.2, -1.5, 3.5, 0.3])), torch.tensor([0.8, -0.5, -0.5, 0.3]))


def test_views_cut_from_a_larger_source_match_apply_jitter_and_antialias():
    from upcli.upsamplers.multiview import render_views

    image = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16), size=(48, 64), mode="bilinear")
    theta = torch.tensor([[[0.6, 0.0, 0.2], [0.0, 0.6, -0.1]], [[-0.8, 0.0, -0.1], [0.0, 0.8, 0.15]]])
    inside = render_views(image, theta, (48, 64), max_pad=0.1)
    torch.testing.assert_close(inside, apply_jitter(image.expand(2, -1, -1, -1), theta), atol=1e-5, rtol=0)
    # from a 4x source a view is an area average (antialiased), not a point sample
    big = torch.rand(1, 3, 192, 256)
    identity = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(render_views(big, identity, (48, 64), 0.1), torch.nn.functional.avg_pool2d(big, 4),
                               atol=1e-5, rtol=0)


def test_fit_lowers_the_loss_and_the_held_out_view_error(backbone):
    image = photo(size=(96, 128))
    cfg = FitConfig(steps=60, views=12, views_per_step=4, points_per_cell=4, fit_size=96, proj_dim=32, width=32)
    result = fit_field(backbone, image, cfg)
    assert np.mean(result.losses[-10:]) < np.mean(result.losses[:3]) - 0.05, result.losses
    with torch.no_grad():
        bilinear = create_upsampler("bilinear")(backbone(image), image, (96, 128))
        fitted = result.upsampler(None, image, (96, 128))
    assert view_error(fitted, image, backbone, views=6, seed=1) < view_error(bilinear, image, backbone, views=6, seed=1)


def test_field_renders_any_size_and_is_deterministic(backbone):
    image = photo()
    first, second = fit_field(backbone, image, TINY).upsampler, fit_field(backbone, image, TINY).upsampler
    for size in [(64, 96), (37, 150), (200, 300)]:
        out = first(None, image, size)
        assert out.shape == (1, 320, *size) and torch.isfinite(out).all()
        assert torch.equal(out, second(None, image, size))


def test_saved_field_with_a_learned_base_renders_the_same(backbone, tmp_path):
    from upcli.upsamplers.checkpoints import save_upsampler

    image = photo()
    field = fit_field(backbone, image, FitConfig(**{**TINY.__dict__, "base": "jbu", "colour": True})).upsampler
    save_upsampler(tmp_path / "f.safetensors", field, backbone)
    loaded = create_upsampler(str(tmp_path / "f.safetensors"), backbone=backbone)
    assert isinstance(loaded, FieldUpsampler) and loaded.config["base"] == "jbu" and loaded.config["colour"]
    torch.testing.assert_close(loaded(None, image, (50, 70)), field(None, image, (50, 70)), rtol=0, atol=0)


def test_implicit_upsampler_interface(backbone):
    image = torch.cat([photo(), photo("coffee.png")])
    up = create_upsampler("implicit", backbone=backbone, **{k: v for k, v in TINY.__dict__.items()})
    with torch.inference_mode():  # as inside `upcli upsample --upsampler implicit`
        out = up(backbone(image), image, (40, 50))
    assert out.shape == (2, 320, 40, 50)
    torch.testing.assert_close(out, up(backbone(image), image, (40, 50)))


def test_store_sizes_scale_and_save_field_rerender(tmp_path):
    images = folder(tmp_path / "imgs")
    out = tmp_path / "out"
    result = fit_images(images, JobOptions(out, workers=0, quiet=True), scale=1.5, fit=TINY, save_fields=True)
    assert result.exit_code == 0 and result.processed == 3
    store = FeatureStore(out)
    for i in range(3):
        h, w = load_rgb(images / f"img{i}.png").shape[:2]
        assert store[f"img{i}.png"].shape == (320, round(h * 1.5), round(w * 1.5))
        assert (out / "fields" / f"img{i}.png.safetensors").is_file()
    again = tmp_path / "again"
    result = fit_images(images, JobOptions(again, workers=0, quiet=True), scale=1.5, from_fields=out / "fields")
    assert result.exit_code == 0
    rerendered = FeatureStore(again)
    for key in store.keys():
        assert torch.equal(torch.as_tensor(np.asarray(store[key])), torch.as_tensor(np.asarray(rerendered[key])))
    with pytest.raises(StoreError, match="save_fields True vs None"):  # a re-run must not skip saving the fields
        fit_images(images, JobOptions(out, workers=0, quiet=True), scale=1.5, fit=TINY)
    larger = fit_images(images, JobOptions(tmp_path / "big", workers=0, quiet=True), size=77, from_fields=out / "fields")
    assert larger.exit_code == 0 and min(FeatureStore(tmp_path / "big")["img0.png"].shape[1:]) == 77
    from upcli.upsample import upsample_folder

    with pytest.raises(UsageError, match="field fitted to the single image 'img0.png'.*--from-fields"):
        upsample_folder(images, JobOptions(tmp_path / "up", workers=0), upsampler=str(out / "fields" / "img0.png.safetensors"))
    assert not (tmp_path / "up").exists()


KILL_AT_SECOND_IMAGE = """
import os, signal, sys, time
from pathlib import Path
import upcli.fit_image as m
from upcli.configs import JobOptions
from upcli.upsamplers.implicit import FitConfig

real = m.FitStep.__call__
def call(self, items, timings):
    if items[0].index == 1:
        first = Path(sys.argv[2]) / "shard-00000.h5"
        while not first.exists():  # the writer thread commits the first image's shard
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, items, timings)
m.FitStep.__call__ = call
cfg = FitConfig(steps=4, views=4, views_per_step=2, points_per_cell=2, fit_size=64, proj_dim=16, width=16)
m.fit_images(sys.argv[1], JobOptions(sys.argv[2], workers=0, quiet=True), size=40, fit=cfg)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_folder_resumes_after_sigkill_losing_only_the_image_in_flight(tmp_path):
    images = folder(tmp_path / "imgs")
    out = tmp_path / "out"
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_IMAGE, str(images), str(out)], capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    assert (out / "shard-00000.h5").exists() and not (out / "shard-00001.h5").exists()
    first_bytes = (out / "shard-00000.h5").read_bytes()
    result = fit_images(images, JobOptions(out, workers=0, quiet=True), size=40, fit=TINY)
    assert result.skipped_shards == 1 and result.processed == 2 and result.exit_code == 0
    assert (out / "shard-00000.h5").read_bytes() == first_bytes
    straight = fit_images(images, JobOptions(tmp_path / "straight", workers=0, quiet=True), size=40, fit=TINY)
    assert straight.processed == 3
    a, b = FeatureStore(out), FeatureStore(tmp_path / "straight")
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        assert np.array_equal(np.asarray(a[key]), np.asarray(b[key])), key


def test_bad_inputs_are_recorded_and_the_folder_goes_on(tmp_path):
    images = folder(tmp_path / "imgs", n=1)
    Image.fromarray(np.zeros((12, 40, 3), np.uint8)).save(images / "tiny.png")  # smaller than one 32-px cell
    (images / "text.jpg").write_bytes(b"this is not a JPEG")
    result = fit_images(images, JobOptions(tmp_path / "out", workers=0, quiet=True), size=40, fit=TINY)
    assert result.exit_code == 3 and result.processed == 1 and result.failed == 2
    reasons = {f["source"]: f["reason"] for f in result.failures}
    assert "smaller than one cell" in reasons["tiny.png"]
    assert "text.jpg" in reasons
    assert list(FeatureStore(tmp_path / "out").keys()) == ["img0.png"]


@pytest.mark.parametrize("kwargs, message", [
    ({"size": 0}, "--size must be a positive integer"),
    ({"size": 100, "scale": 2.0}, "not both"),
    ({"size": None, "scale": -1.0}, "--scale must be positive"),
    ({"fit": FitConfig(steps=0)}, "steps must be at least 1"),
    ({"fit": FitConfig(base="nosuch")}, "unknown upsampler 'nosuch'"),
    ({"fit": FitConfig(base="implicit")}, "--base implicit: the field corrects a feed-forward upsampler"),
    ({"job": {"workers": -1}}, "--workers must be 0 or more"),
])
def test_bad_options_are_one_line_errors(tmp_path, kwargs, message):
    images = folder(tmp_path / "imgs", n=1)
    with pytest.raises(UsageError, match=message):
        fit_images(images, JobOptions(tmp_path / "out", **kwargs.pop("job", {})), **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_on_one_image(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["fit-image", str(EXAMPLES / "coffee.png"), "--out", str(tmp_path / "o"), "--size", "48",
                                      "--steps", "3", "--views", "3", "--fit-size", "64", "--preview", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    assert FeatureStore(tmp_path / "o")["coffee.png"].shape[1] == 48
    assert (tmp_path / "o" / "previews" / "coffee.png").is_file()
    result = CliRunner().invoke(app, ["fit-image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2 and "does not exist" in result.output
