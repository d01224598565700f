"""Checkpoints edited by hand or by an attacker: every one is refused with one line naming what is wrong, before
anything the config asks for is allocated."""

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from upcli.checkpoints import CHECKPOINT_FORMAT, read_config
from upcli.errors import WeightsError
from upcli.upsamplers import create_upsampler
from upcli.upsamplers.checkpoints import save_upsampler

BACKBONE = SimpleNamespace(name="toy", dim=8, stride=4, layer="l")


def good_jbu(path: Path) -> dict:
    torch.manual_seed(0)
    up = create_upsampler("jbu", backbone=BACKBONE, pretrained=False)
    save_upsampler(path, up, BACKBONE)
    return read_config(path)


def rewrite(path: Path, config=None, tensors=None, raw_meta: str | None = None) -> Path:
    """``path`` with its metadata (a config dict, or ``raw_meta`` as is) and/or tensors replaced."""
    from safetensors.torch import load_file

    tensors = load_file(path) if tensors is None else tensors
    meta = raw_meta if raw_meta is not None else json.dumps(config)
    save_file(tensors, path, metadata={"upcli": meta})
    return path


def refused(path, match: str):
    with pytest.raises(WeightsError, match=match) as info:
        create_upsampler(str(path), backbone=BACKBONE)
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("meta, match", [
    ("[1, 2, 3]", "a JSON list, not an object"),
    ('{"format": "%s", "version": "abc", "kind": "upsampler"}' % CHECKPOINT_FORMAT, "unsupported checkpoint format"),
    ("[" * 100_000 + "]" * 100_000, "no upcli config"),
])
def test_metadata_that_is_not_a_config(tmp_path, meta, match):
    path = tmp_path / "x.safetensors"
    good_jbu(path)
    refused(rewrite(path, raw_meta=meta), match)


@pytest.mark.parametrize("change, match", [
    ({"radius": "three"}, "no model that can be built"),
    ({"radius": {"a": 1}}, "no model that can be built"),
    ({"layers": [2]}, "no model that can be built"),
    ({"upsampler": "bilateral"}, "'upsampler' must be one of attention, implicit-field, jbu, pac, resize-conv"),
    ({"key_dim": 33}, "tensor 'stages.0.range_proj.0.weight' is \\[32, 3, 1, 1\\], but its config makes it \\[33, 3, 1, 1\\]"),
])
def test_configs_of_wrong_types_or_sizes(tmp_path, change, match):
    path = tmp_path / "x.safetensors"
    config = good_jbu(path)
    refused(rewrite(path, {**config, **change}), match)


def test_upsampler_naming_its_own_file_is_not_a_recursion(tmp_path):
    path = tmp_path / "x.safetensors"
    config = good_jbu(path)
    refused(rewrite(path, {**config, "upsampler": str(path)}), "'upsampler' must be one of")


@pytest.mark.parametrize("key_dim", [9000, 10**9])
def test_a_huge_architecture_in_a_small_file_allocates_nothing(tmp_path, key_dim):
    # 9000 asked for 2.36 GB from a 280-byte file, 1e9 for 4e18 bytes: the config's model is built on the meta
    # device first and must match the file's own tensors
    path = tmp_path / "x.safetensors"
    config = good_jbu(path)
    start = time.perf_counter()
    refused(rewrite(path, {**config, "key_dim": key_dim}), "but its config makes it|no model that can be built")
    assert time.perf_counter() - start < 5


def test_a_wrong_tensor_shape(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "x.safetensors"
    config = good_jbu(path)
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("range_temp"))
    tensors[key] = torch.zeros(5)
    refused(rewrite(path, config, tensors), f"tensor '{key}' is \\[5\\]")


def test_non_finite_weights_are_refused(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "x.safetensors"
    config = good_jbu(path)
    tensors = load_file(path)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], math.nan)
    refused(rewrite(path, config, tensors), f"tensor '{key}' has NaN or infinite values")


def test_the_cli_shows_one_line(cli, tmp_path):
    path = tmp_path / "x.safetensors"
    save_upsampler(path, create_upsampler("attention", pretrained=False), None)  # fits any backbone
    rewrite(path, {**read_config(path), "width": 10**6})
    examples = Path(__file__).resolve().parents[1] / "examples" / "images"
    run = cli("upsample", examples, "--upsampler", path, "--out", tmp_path / "o", "--workers", "0")
    assert run.returncode != 0 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "but its config makes it" in run.stderr


@pytest.mark.parametrize("net, match", [
    ([64, 8], "'net' in its config must be an object, got list"),
    ({"channels": "many"}, "no model that can be built"),
    ({"channels": 10**6}, "but its config makes it|no model that can be built"),
])
def test_sr_net_configs(tmp_path, net, match):
    from upcli.sr.net import load_sr_net, mzsr_net, save_sr_net

    path = tmp_path / "sr.safetensors"
    save_sr_net(path, mzsr_net(), {"scale": 2})
    rewrite(path, {**read_config(path), "net": net})
    with pytest.raises(WeightsError, match=match) as info:
        load_sr_net(path)
    assert "\n" not in str(info.value)


def test_itpn_configs(tmp_path):
    from upcli.backbones import create_backbone
    from upcli.backbones.itpn import CHECKPOINT_KIND

    path = tmp_path / "itpn.safetensors"
    save_file({"backbone.x": torch.zeros(1)}, path, metadata={"upcli": json.dumps(
        {"format": CHECKPOINT_FORMAT, "version": 1, "kind": CHECKPOINT_KIND, "arch": "tiny", "itpn": ["x"]})})
    with pytest.raises(WeightsError, match="'itpn' in its config is not an iTPN architecture"):
        create_backbone(f"itpn:{path}")
