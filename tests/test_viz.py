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


def test_save_preview_writes_three_panels(tmp_path):
    low, high = _maps()
    image = np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)
    path = tmp_path / "previews" / "cat.png"
    save_preview(path, image, low, high)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (3 * 28, 20)
        panels = np.asarray(png.convert("RGB"))
    assert np.array_equal(panels[:, :28], image)
    assert sorted(p.name for p in path.parent.iterdir()) == ["cat.png"]  # no temp file left behind


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
