import numpy as np
import pytest
import torch
from PIL import Image

from upcli.viz import pca_rgb, save_preview


def _maps(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, 7, generator=gen), torch.randn(16, 20, 28, generator=gen)


def test_pca_rgb_shapes_and_dtypes():
    low, high = _maps()
    out = pca_rgb([low, high])
    assert [o.shape for o in out] == [(5, 7, 3), (20, 28, 3)]
    assert all(o.dtype == np.uint8 for o in out)
    assert out[1].min() == 0 and out[1].max() == 255  # robust percentiles stretch the range


def test_pca_is_shared_and_deterministic():
    low, high = _maps()
    first, second, other = pca_rgb([high, high, low])
    assert np.array_equal(first, second)
    again = pca_rgb([high, high, low])
    assert all(np.array_equal(a, b) for a, b in zip(again, [first, second, other]))


def test_pca_rgb_with_few_channels_and_half_precision():
    (two,) = pca_rgb([torch.randn(2, 6, 6)])
    assert two.shape == (6, 6, 3) and (two[:, :, 2] == 0).all()
    low, high = _maps()
    out = pca_rgb([low.half(), high.half()])
    assert [o.shape for o in out] == [(5, 7, 3), (20, 28, 3)]


def test_save_preview_writes_labelled_panels(tmp_path):
    low, high = _maps()
    image = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    path = tmp_path / "previews" / "cat.png"
    save_preview(path, image, low, high)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (3 * 28, 20 + 14)
        panels = np.asarray(png.convert("RGB"))
    assert np.array_equal(panels[14:, :28], image)
    assert (panels[:14] < 128).any() and (panels[:14] == 255).mean() > 0.5  # black text on white strips
    assert sorted(p.name for p in path.parent.iterdir()) == ["cat.png"]  # no temp file left behind


def test_preview_colours_come_from_the_low_res_features_alone(tmp_path):
    """The same image previewed with two upsamplers: the low-res panel is coloured the same in both."""
    low, high = _maps()
    image = np.zeros((20, 28, 3), np.uint8)
    save_preview(tmp_path / "a.png", image, low, high)
    save_preview(tmp_path / "b.png", image, low, {"jbu": high * 3 + 1, "bilinear": -high})
    a, b = (np.asarray(Image.open(tmp_path / name).convert("RGB")) for name in ("a.png", "b.png"))
    assert b.shape == (34, 4 * 28, 3)
    assert np.array_equal(a[14:, 28:56], b[14:, 28:56])


def test_edge_sharpness_is_high_only_where_feature_edges_sit_on_image_edges():
    from upcli.viz import edge_sharpness

    gen = torch.Generator().manual_seed(0)
    image = torch.full((3, 40, 40), 0.2)
    image[:, :, 20:] = 0.8  # one vertical edge between columns 19 and 20
    image += 0.01 * torch.rand(image.shape, generator=gen)
    channels = torch.randn(8, 1, 1, generator=gen)
    step = (torch.arange(40) >= 20).float().expand(40, 40) * channels  # changes exactly at the edge
    ramp = (torch.arange(40) / 39).expand(40, 40) * channels  # changes evenly everywhere
    assert edge_sharpness(step, image) > 10
    assert 0.8 < edge_sharpness(ramp, image) < 1.5
    with pytest.raises(ValueError):
        edge_sharpness(step[:, :20], image)


def test_upsample_compare_previews_several_upsamplers_in_the_same_colours(tmp_path):
    from upcli.configs import JobOptions
    from upcli.errors import UsageError
    from upcli.upsample import upsample_folder

    image = tmp_path / "imgs" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(image)
    upsample_folder(image.parent, JobOptions(out=tmp_path / "one", preview=1, workers=0, quiet=True), size=40,
                    upsampler="bilinear")
    upsample_folder(image.parent, JobOptions(out=tmp_path / "two", preview=1, workers=0, quiet=True), size=40,
                    upsampler="jbu", compare="bilinear,bilateral")
    one = np.asarray(Image.open(tmp_path / "one" / "previews" / "a.png").convert("RGB"))
    two = np.asarray(Image.open(tmp_path / "two" / "previews" / "a.png").convert("RGB"))
    assert one.shape == (14 + 40, 3 * 56, 3) and two.shape == (14 + 40, 5 * 56, 3)
    assert np.array_equal(one[14:, 56:112], two[14:, 56:112])  # the low-res panel: one colouring
    assert np.array_equal(one[14:, 112:168], two[14:, 168:224])  # bilinear, in either run
    with pytest.raises(UsageError, match="give --preview N too"):
        upsample_folder(image.parent, JobOptions(out=tmp_path / "x", workers=0), upsampler="jbu", compare="bilinear")
