import pytest
import torch
import torch.nn.functional as F

from upcli.errors import UsageError
from upcli.upsamplers import Upsampler, create_upsampler, list_upsamplers
from upcli.upsamplers.bilateral import joint_bilateral_upsample, joint_bilateral_upsample_reference

TRAINING_FREE = ["bilinear", "bilateral"]


def _inputs(batch=2, channels=6, low=(5, 7), high=(23, 31), seed=0):
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, channels, *low, generator=gen)
    image = torch.rand(batch, 3, *high, generator=gen)
    return feats, image


@pytest.mark.parametrize("name", TRAINING_FREE)
@pytest.mark.parametrize("low, high", [((5, 7), (23, 31)), ((14, 19), (45, 61)), ((5, 7), (8, 9)), ((5, 7), (3, 4))])
def test_output_shape_at_non_integer_scales(name, low, high):
    feats, image = _inputs(low=low, high=high)
    up = create_upsampler(name)
    assert isinstance(up, Upsampler) and up.name == name
    assert up(feats, image, high).shape == (2, 6, *high)


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_guidance_of_another_size_is_resized(name):
    feats, image = _inputs(high=(46, 62))
    assert create_upsampler(name)(feats, image, (23, 31)).shape == (2, 6, 23, 31)


def test_bilinear_is_interpolate():
    feats, image = _inputs()
    expected = F.interpolate(feats, size=(23, 31), mode="bilinear", align_corners=False)
    torch.testing.assert_close(create_upsampler("bilinear")(feats, image, (23, 31)), expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "low, high, sigma_spatial, sigma_color, radius",
    [
        ((5, 7), (23, 31), 1.0, 0.1, 2),  # non-integer scale factors
        ((5, 7), (8, 9), 0.7, 0.3, 2),  # less than 2x: cells hold 1 or 2 pixels
        ((5, 7), (3, 4), 1.5, 0.2, 1),  # smaller output: some cells hold no pixel
        ((4, 6), (16, 24), 1.0, 0.1, 0),  # integer scale, centre tap only
        ((3, 6), (7, 20), 2.0, 0.5, 3),  # window wider than the map
    ],
)
def test_bilateral_matches_float64_reference(low, high, sigma_spatial, sigma_color, radius):
    feats, image = _inputs(low=low, high=high)
    args = (high, sigma_spatial, sigma_color, radius)
    fast = joint_bilateral_upsample(feats, image, *args)
    slow = joint_bilateral_upsample_reference(feats.double(), image.double(), *args)
    torch.testing.assert_close(fast.double(), slow, rtol=1e-5, atol=2e-5)


def test_bilateral_keeps_a_constant_map_constant():
    _, image = _inputs()
    feats = torch.arange(6.0).view(1, 6, 1, 1).expand(2, 6, 5, 7)
    out = create_upsampler("bilateral")(feats, image, (23, 31))
    torch.testing.assert_close(out, feats[:, :, :1, :1].expand_as(out), rtol=0, atol=1e-5)


def test_bilateral_is_sharper_than_bilinear_at_an_edge():
    height, width, stride = 56, 84, 14
    edge = 37  # not on a cell border
    truth = torch.zeros(1, 1, height, width)
    truth[..., edge:] = 1.0
    image = truth.expand(1, 3, height, width)  # the image has the same step
    feats = F.adaptive_avg_pool2d(truth, (height // stride, width // stride))
    near_edge = slice(edge - 2 * stride, edge + 2 * stride)

    def error(name):
        out = create_upsampler(name)(feats, image, (height, width))
        return (out - truth)[..., near_edge].abs().mean().item()

    assert error("bilateral") < 0.25 * error("bilinear")


@pytest.mark.parametrize("name", TRAINING_FREE)
def test_float16_in_float16_out(name):
    feats, image = _inputs()
    up = create_upsampler(name)
    out = up(feats.half(), image.half(), (23, 31))
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), up(feats, image, (23, 31)), rtol=0, atol=2e-2)


def test_registry():
    assert set(TRAINING_FREE) <= set(list_upsamplers())
    assert list_upsamplers("bil*") == ["bilateral", "bilinear"]
    with pytest.raises(UsageError, match="unknown upsampler 'nope'.*bilateral, bilinear"):
        create_upsampler("nope")
    # None kwargs (unset CLI flags) keep the entry's defaults
    up = create_upsampler("bilateral", backbone=None, sigma_color=None, radius=3)
    assert (up.sigma_color, up.radius) == (0.1, 3)


def test_bilateral_rejects_bad_settings():
    with pytest.raises(UsageError, match="positive"):
        create_upsampler("bilateral", sigma_color=0)
    with pytest.raises(UsageError, match="radius"):
        create_upsampler("bilateral", radius=-1)
    with pytest.raises(ValueError, match="batch sizes differ"):
        joint_bilateral_upsample(torch.zeros(2, 4, 3, 3), torch.zeros(1, 3, 9, 9), (9, 9))


def test_bench_guided_prints_a_row_per_upsampler(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(root / "examples" / "bench_guided.py"), "--images",
                          str(root / "examples" / "images"), "-n", "1", "--size", "64", "--upsamplers",
                          "bilinear,attention", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["bilinear", "attention"]
    assert all(r["grid"] == [2, 2] and r["channels"] == 320 and r["upsampler_ms"] > 0 for r in rows)
    assert rows[1]["output_MiB"] == 320 * 64 * 64 * 4 / 2**20 and "attention" in run.stdout
