"""The backbone-agnostic neighbourhood-attention upsampler: fresh weights, and the shipped checkpoint."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from upcli.checkpoints import read_config
from upcli.errors import WeightsError
from upcli.upsamplers import create_upsampler, list_upsamplers
from upcli.upsamplers.attention import AttentionUpsampler, apply_rope
from upcli.upsamplers.checkpoints import save_upsampler, shipped_checkpoint

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


def fresh(seed=0, **arch) -> AttentionUpsampler:
    torch.manual_seed(seed)
    return create_upsampler("attention", pretrained=False, **arch).eval()


def test_registered_and_built_without_a_backbone():
    assert "attention" in list_upsamplers()
    a, b, c = fresh(0), fresh(0), fresh(1)
    assert isinstance(a, AttentionUpsampler) and a.backbone_agnostic
    assert a.config == {"heads": 4, "head_dim": 32, "kernel_size": 7, "width": 32, "depth": 3}
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # the caller's RNG seeds it
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


@pytest.mark.parametrize("size", [(8, 8), (37, 23), (16, 61)])
def test_constant_features_stay_constant(size):
    up = fresh()
    feats = torch.full((2, 5, 6, 9), 0.0) + torch.tensor([1.5, -2.0, 0.0, 3.25, 7.0]).view(1, 5, 1, 1)
    with torch.no_grad():
        out = up(feats, torch.rand(2, 3, 50, 40), size)
    assert out.shape == (2, 5, *size)
    torch.testing.assert_close(out, feats[:, :, :1, :1].expand_as(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("C, grid, size", [(3, (7, 7), (28, 28)), (17, (4, 11), (13, 50)), (320, (3, 5), (40, 24)),
                                           (8, (1, 1), (5, 3)), (6, (2, 9), (9, 2))])
def test_any_channels_aspect_and_grids_smaller_than_k(C, grid, size):
    up = fresh()
    feats = torch.randn(1, C, *grid)
    with torch.no_grad():
        out = up(feats, torch.rand(1, 3, 31, 45), size)
    assert out.shape == (1, C, *size) and torch.isfinite(out).all()
    # a convex combination of the input vectors: inside their per-channel range
    lo, hi = feats.amin((2, 3), keepdim=True), feats.amax((2, 3), keepdim=True)
    assert (out >= lo - 1e-5).all() and (out <= hi + 1e-5).all()


def test_output_dtype_follows_the_features():
    up = fresh()
    feats = torch.randn(1, 4, 5, 5).half()
    with torch.no_grad():
        out = up(feats, torch.rand(1, 3, 20, 20), (20, 20))
    assert out.dtype == torch.float16


def test_eval_is_deterministic():
    up = fresh()
    feats, image = torch.randn(1, 6, 5, 7), torch.rand(1, 3, 30, 42)
    with torch.no_grad():
        assert torch.equal(up(feats, image, (30, 42)), up(feats, image, (30, 42)))


def test_inference_path_equals_the_training_path():
    """Without autograd the queries are filled in place (no copies at full resolution): the same output."""
    up = fresh(3)
    feats, image = torch.randn(2, 6, 5, 7), torch.rand(2, 3, 30, 41)
    with torch.no_grad():
        fast = up(feats, image, (30, 41))
    torch.testing.assert_close(up(feats, image, (30, 41)).detach(), fast, rtol=1e-5, atol=1e-6)


def test_gradients_reach_encoder_and_projections():
    up = fresh().train()
    feats = torch.randn(1, 6, 5, 7)
    target = torch.randn(1, 6, 20, 28)
    (up(feats, torch.rand(1, 3, 20, 28), (20, 28)) - target).square().mean().backward()
    for name, p in up.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_rope_logits_depend_on_relative_position_only():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 8, 1, 1), torch.randn(1, 1, 8, 1, 1)

    def logit(qy, qx, ky, kx):
        rq = apply_rope(q, torch.tensor([qy]), torch.tensor([qx]))
        rk = apply_rope(k, torch.tensor([ky]), torch.tensor([kx]))
        return (rq * rk).sum()

    torch.testing.assert_close(logit(0.25, 1.0, 2.0, 3.0), logit(5.25, -2.0, 7.0, 0.0))
    assert not torch.allclose(logit(0.25, 1.0, 2.0, 3.0), logit(0.25, 1.0, 3.0, 3.0))
    torch.testing.assert_close(apply_rope(q, torch.zeros(1), torch.zeros(1)), q)  # position 0: no rotation


def test_save_load_round_trip_for_any_backbone(tmp_path):
    up = fresh(3, width=16, heads=2, head_dim=8)
    path = tmp_path / "attention.safetensors"
    save_upsampler(path, up, SimpleNamespace(name="dinov2", layer="-1", dim=384))
    config = read_config(path)
    assert config["upsampler"] == "attention" and not {"backbone", "layer", "dim"} & set(config)
    feats, image = torch.randn(1, 17, 4, 6), torch.rand(1, 3, 24, 36)
    for backbone in (None, SimpleNamespace(name="clip", layer="7", dim=17), SimpleNamespace(name="other", dim=3)):
        loaded = create_upsampler(str(path), backbone=backbone).eval()
        assert isinstance(loaded, AttentionUpsampler) and loaded.config == up.config
        with torch.no_grad():
            assert torch.equal(loaded(feats, image, (24, 36)), up(feats, image, (24, 36)))
    loaded = create_upsampler("attention", backbone=SimpleNamespace(name="x", dim=5), checkpoint=str(path))
    assert loaded.config == up.config


def test_the_shipped_checkpoint_needs_no_backbone_and_lists_its_sources():
    up = create_upsampler("attention").eval()  # upcli/weights/attention.safetensors
    config = read_config(shipped_checkpoint("attention", None))
    assert config["upsampler"] == "attention" and config["training"]["step"] > 0
    sources = {(s["backbone"], s["layer"]) for s in config["feature_sources"]}
    assert ("efficientnet-lite0", "blocks.6") in sources and ("efficientnet-lite0", "blocks.4") not in sources
    for C in (320, 7):  # the trained channel count and another, with no retraining
        feats, image = torch.randn(1, C, 5, 7), torch.rand(1, 3, 40, 56)
        with torch.no_grad():
            out = up(feats, image, (40, 56))
        assert out.shape == (1, C, 40, 56) and torch.isfinite(out).all()
        lo, hi = feats.amin(dim=(2, 3), keepdim=True), feats.amax(dim=(2, 3), keepdim=True)
        assert ((out >= lo - 1e-4) & (out <= hi + 1e-4)).all()  # a convex combination of the input vectors


def test_no_shipped_checkpoint_is_a_one_line_error(monkeypatch, tmp_path):
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)  # a package without weights
    with pytest.raises(WeightsError) as info:
        create_upsampler("attention")
    message = str(info.value)
    assert "\n" not in message and "no attention checkpoint ships" in message and "pretrained=False" in message


def test_cli_upsample_with_a_fresh_checkpoint(tmp_path):
    from typer.testing import CliRunner

    from upcli.cli import app
    from upcli.io import FeatureStore

    ckpt = tmp_path / "attention.safetensors"
    save_upsampler(ckpt, fresh(), None)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["upsample", str(EXAMPLES), "--upsampler", str(ckpt), "--size", "64",
                                      "--workers", "0", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    assert len(store) == 4
    for source in store:
        feats = store[source]
        assert feats.shape[0] == 320 and min(feats.shape[1:]) == 64 and torch.isfinite(feats.float()).all()


def test_spatial_prior_alone_picks_the_nearest_cell_when_narrow():
    up = fresh()
    with torch.no_grad():
        for conv in (up.query, up.key):
            conv.weight.zero_()
            conv.bias.zero_()
        up.sigma_logit.fill_(-20.0)  # sigma ~ 0
        feats = torch.randn(1, 5, 4, 6)
        out = up(feats, torch.rand(1, 3, 40, 60), (40, 60))  # 10 x 10 pixels per cell
    torch.testing.assert_close(out[..., 5::10, 5::10], feats, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        up.sigma_logit.fill_(20.0)  # the widest allowed: every pixel mixes its neighbours in
        wide = up(feats, torch.rand(1, 3, 40, 60), (40, 60))
    assert (wide[..., 5::10, 5::10] - feats).abs().amax() > 0.1
    # but never so wide that the window's edge has weight: 3 sigma fit in the half window
    assert float(up.sigma().max()) <= up.config["kernel_size"] / 6 + 1e-6


def test_cli_upsample_with_the_shipped_attention_on_an_unseen_layer(tmp_path):
    from typer.testing import CliRunner

    from upcli.cli import app
    from upcli.io import FeatureStore

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["upsample", str(EXAMPLES), "--upsampler", "attention", "--layer", "blocks.4",
                                      "--size", "64", "--workers", "0", "--out", str(out), "-q"])
    assert result.exit_code == 0, result.output
    store = FeatureStore(out)
    for source in store:
        feats = store[source]
        assert feats.shape[0] == 112 and min(feats.shape[1:]) == 64 and torch.isfinite(feats.float()).all()
