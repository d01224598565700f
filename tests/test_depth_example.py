"""examples/depth_upsample.py on a tiny synthetic RGB-D set: pairing, units, the protocol and a short run."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "depth_upsample.py"


@pytest.fixture(scope="module")
def depth():
    spec = importlib.util.spec_from_file_location("depth_upsample", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def write_set(root: Path, n: int = 5, size=(50, 66)) -> None:
    """Depth steps that follow the colour edges (a near and a far region), 16-bit millimetres."""
    (root / "rgb").mkdir(parents=True)
    (root / "depth").mkdir()
    rng = np.random.default_rng(0)
    H, W = size
    for i in range(n):
        edge = int(rng.integers(W // 4, 3 * W // 4))
        rgb = np.zeros((H, W, 3), np.uint8)
        rgb[:, :edge] = (200, 40, 40)
        rgb[:, edge:] = (30, 60, 220)
        mm = np.where(np.arange(W)[None, :] < edge, 800 + 10 * i, 2500).astype(np.uint16).repeat(H, 0)
        Image.fromarray(rgb).save(root / "rgb" / f"{i:03d}_RGB.png")
        Image.fromarray(mm).save(root / "depth" / f"{i:03d}_HR_gt.png")


def test_units_and_the_protocol(depth, tmp_path):
    write_set(tmp_path / "set")
    pairs = depth.find_pairs(tmp_path / "set")
    assert [p[0].name[:3] for p in pairs] == [p[1].name[:3] for p in pairs] == ["000", "001", "002", "003", "004"]
    sample = depth.Sample(*pairs[0], 8)
    assert sample.hr.shape == (1, 48, 64) and sample.lr.shape == (1, 6, 8)  # cropped to a multiple of the scale
    assert sample.unit == "cm" and float(sample.to_unit(sample.hr).max()) == pytest.approx(250.0)
    # the RMSE is in cm: a prediction 1 mm too deep everywhere is 0.1 cm off
    one_mm = 1.0 / (sample.hi - sample.lo)
    off = torch.where(sample.hr < 0.5, sample.hr + one_mm, sample.hr - one_mm)  # inside [0, 1]
    assert depth.rmse(sample, off) == pytest.approx(0.1, rel=1e-3)
    np.save(tmp_path / "d.npy", np.ones((4, 4), np.float32))
    assert depth.load_depth(tmp_path / "d.npy")[1:] == (1.0, "units")
    Image.fromarray(np.ones((4, 4), np.uint8)).save(tmp_path / "d8.png")
    assert depth.load_depth(tmp_path / "d8.png")[1:] == (1.0, "grey levels")
    train, val = depth.split(tmp_path / "set", tmp_path / "set")
    assert len(train) == 4 and len(val) == 1 and val[0] == pairs[0]  # every 5th pair by name


def test_a_short_run_beats_bilinear_at_the_edges(depth, tmp_path):
    write_set(tmp_path / "set", n=10)
    out = tmp_path / "r.json"
    assert depth.main(["--train-root", str(tmp_path / "set"), "--eval-root", str(tmp_path / "set"), "--scale", "4",
                       "--steps", "60", "--batch-size", "4", "--crop", "32", "--lr", "2e-3", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    results = {name: r["rmse"] for name, r in report["results"].items()}
    assert report["unit"] == "cm" and set(results) == {"bilinear", "bicubic", "bilateral", "pac"}
    assert all(np.isfinite(v) and v > 0 for v in results.values())
    # the depth edges follow the colour edges exactly: guidance must help
    assert results["bilateral"] < results["bilinear"]
    assert results["pac"] < results["bilinear"], results
