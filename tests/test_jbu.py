"""The learned JBU stack, resize-conv, the downsamplers and the multi-view objective."""

import itertools
import math

import pytest
import torch

from upcli.errors import UsageError, WeightsError
from upcli.upsamplers import create_upsampler
from upcli.upsamplers.base import stage_sizes
from upcli.upsamplers.checkpoints import save_upsampler, shipped_checkpoint
from upcli.upsamplers.jbu import JBULayer, JBUStack
from upcli.upsamplers.multiview import (DOWNSAMPLERS, MultiViewObjective, apply_jitter, random_projection,
                                        sample_jitter)
from upcli.training import generator


class FakeBackbone:
    def __init__(self, dim=8, stride=16, name="fake", layer="x"):
        self.dim, self.stride, self.name, self.layer = dim, stride, name, layer


@pytest.mark.parametrize("low, high", [((3, 5), (37, 53)), ((7, 7), (224, 224)), ((2, 3), (33, 47)), ((5, 4), (5, 4))])
def test_stage_sizes_land_exactly(low, high):
    sizes = stage_sizes(low, high)
    assert sizes[-1] == high
    prev = low
    for size in sizes:  # each stage grows by about 2x, never shrinks
        assert all(p <= s <= 3 * p for p, s in zip(prev, size))
        prev = size


@pytest.mark.parametrize("name", ["jbu", "resize-conv"])
@pytest.mark.parametrize("size", [(37, 53), (31, 19), (8, 8)])
def test_output_size_odd_non_square(name, size):
    up = create_upsampler(name, FakeBackbone(), pretrained=False)
    feats = torch.randn(2, 8, 3, 5)
    out = up(feats, torch.rand(2, 3, 41, 29), size)
    assert out.shape == (2, 8, *size) and out.dtype == feats.dtype and torch.isfinite(out).all()


def test_every_tap_gets_a_gradient():
    layer = JBULayer()
    guidance = torch.randn(1, 3, 12, 14)
    kernel = layer.kernel(guidance)
    kernel.retain_grad()
    feats = torch.randn(1, 5, 6, 7)
    up = torch.nn.functional.interpolate(feats, size=(12, 14), mode="bicubic", align_corners=False)
    from upcli.kernels import adaptive_conv

    adaptive_conv(up, kernel).square().sum().backward()
    per_tap = kernel.grad.abs().amax(dim=(0, 1, 2)).flatten()
    assert per_tap.numel() == 49 and (per_tap > 0).all(), "a tap got no gradient"
    for p in (layer.range_temp, layer.sigma_spatial, layer.range_proj[0].weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_kernel_is_a_normalised_window_without_fixup():
    layer = JBULayer()
    kernel = layer.kernel(torch.randn(2, 3, 9, 11))
    assert kernel.shape == (2, 9, 11, 7, 7)
    torch.testing.assert_close(kernel.sum(dim=(-1, -2)), torch.ones(2, 9, 11))
    assert (kernel >= 0).all()


def test_feature_keys_on_the_input_grid_equal_keys_of_the_upsampled_features():
    torch.manual_seed(0)
    layer = JBULayer(guidance="features", dim=6)
    feats, guidance = torch.randn(2, 6, 5, 7), torch.randn(2, 3, 11, 13)
    up = torch.nn.functional.interpolate(feats, size=(11, 13), mode="bicubic", align_corners=False)
    rms = feats.square().mean((1, 2, 3), keepdim=True).sqrt()
    keys = layer.feature_proj(up / rms)  # the definition: a projection of the stage's upsampled features
    from upcli.kernels import adaptive_conv

    want = adaptive_conv(up, layer.kernel(torch.cat([guidance, keys], 1)), padding="reflect")
    torch.testing.assert_close(layer(feats, guidance), want, atol=1e-5, rtol=1e-5)
    layer(feats, guidance).square().sum().backward()
    assert layer.feature_proj.weight.grad.abs().sum() > 0


def test_feature_guidance_needs_the_dim():
    with pytest.raises(ValueError, match="dim"):
        JBULayer(guidance="features")
    with pytest.raises(ValueError, match="guidance"):
        JBULayer(guidance="depth")


@pytest.mark.parametrize("kwargs", [{}, {"fixup": True, "guidance": "conv"}, {"guidance": "features"}])
def test_eval_is_deterministic_and_equals_train(kwargs):
    up = create_upsampler("jbu", FakeBackbone(), pretrained=False, **kwargs)
    torch.nn.init.normal_(up.residual.weight, std=0.1)
    feats, image = torch.randn(1, 8, 4, 6), torch.rand(1, 3, 40, 60)
    up.eval()
    with torch.no_grad():
        a, b = up(feats, image, (40, 60)), up(feats, image, (40, 60))
        up.train()
        c = up(feats, image, (40, 60))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_residual_on_the_input_grid_equals_on_the_output():
    # with image-only guidance the stages are linear, channel-shared and normalised: a 1x1 conv commutes with them
    torch.manual_seed(0)
    up_in = create_upsampler("jbu", FakeBackbone(), pretrained=False, residual="input", guidance="rgb")
    up_out = create_upsampler("jbu", FakeBackbone(), pretrained=False, residual="output", guidance="rgb")
    torch.nn.init.normal_(up_in.residual.weight, std=0.2)
    torch.nn.init.normal_(up_in.residual.bias, std=0.2)
    up_out.load_state_dict(up_in.state_dict())
    feats, image = torch.randn(1, 8, 4, 5), torch.rand(1, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(up_in(feats, image, (32, 40)), up_out(feats, image, (32, 40)), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["simple", "attention"])
@pytest.mark.parametrize("high, low", [((45, 70), (3, 5)), ((64, 96), (4, 6)), ((50, 33), (7, 4))])
def test_downsamplers_on_non_square_input(name, high, low):
    down = DOWNSAMPLERS.create(name, dim=6)
    x = torch.randn(2, 6, *high, requires_grad=True)
    y = down(x, low)
    assert y.shape == (2, 6, *low) and torch.isfinite(y).all()
    y.sum().backward()
    assert x.grad.abs().sum() > 0


def test_simple_downsampler_starts_as_average_pooling():
    down = DOWNSAMPLERS.create("simple", dim=3)
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(down(x, (4, 6)), torch.nn.functional.avg_pool2d(x, 8))


def test_jitter_is_per_sample_and_reproducible():
    gens = lambda: [generator(0, 1, 0, s) for s in range(4)]  # noqa: E731
    a, b = sample_jitter(gens()), sample_jitter(gens())
    assert torch.equal(a, b) and a.shape == (4, 2, 3)
    assert len({tuple(t.flatten().tolist()) for t in a}) == 4, "each sample draws its own view"
    identity = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    x = torch.rand(1, 2, 9, 13)
    torch.testing.assert_close(apply_jitter(x, identity), x, atol=1e-5, rtol=0)


def test_projected_objective_equals_the_unprojected_definition():
    # P^T down(t(F)) == down(t(P^T F)) with the saliency of F: the objective's shortcut changes nothing
    torch.manual_seed(0)
    up = create_upsampler("jbu", FakeBackbone(), pretrained=False)
    obj = MultiViewObjective(up, 8, "attention", projection_dim=5)
    lr, image = torch.randn(2, 8, 3, 4), torch.rand(2, 3, 48, 64)
    gens = [generator(0, 2, s) for s in range(2)]
    theta, proj = sample_jitter(gens), random_projection(gens, 8, 5)
    target = torch.randn(1, 8, 3, 4).expand(2, -1, -1, -1)  # one RMS for both samples
    with torch.no_grad():
        loss = obj(lr, image, [(theta, target, proj)])
        hr = up(lr, image, (48, 64))
        pred = obj.downsampler(apply_jitter(hr, theta), (3, 4))
        err = torch.einsum("bchw,bcp->bphw", pred - target, proj) / target.square().mean().sqrt()
        log_s = obj.scale_net(target) + 0.1
        direct = (err.square() / (2 * (2 * log_s).exp()) + log_s).mean()
    torch.testing.assert_close(loss, direct, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("downsampler", ["attention", "simple"])
def test_projecting_before_the_stages_gives_the_same_loss_and_gradients(downsampler):
    """With image-only guidance the objective upsamples V * P + 1 projected channels instead of C: the loss and
    every gradient (stages, residual, downsampler, uncertainty) must match the full path."""
    torch.manual_seed(0)
    up = create_upsampler("jbu", FakeBackbone(dim=12), pretrained=False)
    torch.nn.init.normal_(up.residual.weight, std=0.1)
    obj = MultiViewObjective(up, 12, downsampler, projection_dim=3)
    assert obj.project_first
    lr, image = torch.randn(2, 12, 3, 4), torch.rand(2, 3, 40, 52)
    views = []
    for v in range(2):
        gens = [generator(0, 2, s, v) for s in range(2)]
        views.append((sample_jitter(gens), torch.randn(2, 12, 3, 4), random_projection(gens, 12, 3)))
    results = []
    for project_first in (True, False):
        obj.project_first = project_first
        obj.zero_grad()
        loss = obj(lr, image, views)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in obj.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (full, full_grads) = results
    torch.testing.assert_close(fast, full, rtol=1e-4, atol=1e-6)
    assert fast_grads.keys() == full_grads.keys() and any(k.startswith("upsampler.stages") for k in fast_grads)
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=2e-3, atol=1e-6, msg=name)


def test_only_channel_shared_stacks_project_first():
    for kw, shared in [({}, True), ({"guidance": "conv"}, True), ({"guidance": "features"}, False),
                       ({"fixup": True}, False), ({"residual": "output"}, False)]:
        up = create_upsampler("jbu", FakeBackbone(), pretrained=False, **kw)
        assert MultiViewObjective(up, 8).project_first is shared, kw
    assert not MultiViewObjective(create_upsampler("resize-conv", FakeBackbone(), pretrained=False), 8).project_first


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    bb = FakeBackbone(dim=8, name="fake-a")
    up = create_upsampler("jbu", bb, pretrained=False, guidance="conv")
    torch.nn.init.normal_(up.residual.weight)
    path = tmp_path / "jbu.safetensors"
    save_upsampler(path, up, bb)
    loaded = create_upsampler(str(path), backbone=bb)
    assert isinstance(loaded, JBUStack) and loaded.config == up.config
    feats, image = torch.randn(1, 8, 3, 3), torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(loaded(feats, image, (24, 24)), up(feats, image, (24, 24)))
    with pytest.raises(WeightsError, match="trained for backbone 'fake-a'"):
        create_upsampler(str(path), backbone=FakeBackbone(dim=8, name="other"))
    with pytest.raises(WeightsError, match="trained for dim 8"):
        create_upsampler(str(path), backbone=FakeBackbone(dim=16, name="fake-a"))
    with pytest.raises(WeightsError, match="not resize-conv"):
        create_upsampler("resize-conv", backbone=bb, checkpoint=str(path))
    from upcli.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "sr.safetensors", {"w": torch.zeros(1)}, {"kind": "sr-net"})
    with pytest.raises(WeightsError, match="is a sr-net checkpoint, not an upsampler"):
        create_upsampler(str(tmp_path / "sr.safetensors"), backbone=bb)


def test_a_radius_per_stage_round_trips_and_a_wrong_count_is_refused(tmp_path):
    bb = FakeBackbone(dim=8, stride=16, name="fake-a")  # 4 layers
    up = create_upsampler("jbu", bb, pretrained=False, radius=[3, 2, 1, 0])
    assert [stage.kernel_size for stage in up.stages] == [7, 5, 3, 1]
    feats, image = torch.randn(1, 8, 2, 3), torch.rand(1, 3, 32, 48)
    kernels = []  # the kernel each stage applies: its own size, and a normalised window
    hooks = [stage.register_forward_hook(lambda m, args, out: kernels.append(m.kernel(args[1])))
             for stage in up.stages]
    with torch.no_grad():
        out = up(feats, image, (32, 48))
    assert [k.shape[-1] for k in kernels] == [7, 5, 3, 1]
    assert all(torch.allclose(k.sum((-1, -2)), torch.ones(())) for k in kernels)
    for h in hooks:
        h.remove()
    path = tmp_path / "jbu.safetensors"
    save_upsampler(path, up, bb)
    loaded = create_upsampler(str(path), backbone=bb)
    assert loaded.config["radius"] == [3, 2, 1, 0]
    with torch.no_grad():
        assert torch.equal(loaded(feats, image, (32, 48)), out)
    for bad in ([3, 2, 1], [3, 3, 3, 8]):
        with pytest.raises(ValueError, match="one per layer"):
            create_upsampler("jbu", bb, pretrained=False, radius=bad)


def test_no_shipped_checkpoint_is_one_clear_error():
    with pytest.raises(WeightsError, match="no jbu checkpoint ships for backbone 'fake'.*upcli train"):
        create_upsampler("jbu", FakeBackbone())


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="not a safetensors checkpoint"):
        create_upsampler(str(bad), backbone=FakeBackbone())
    with pytest.raises(UsageError, match="unknown upsampler"):
        create_upsampler("nosuch", backbone=FakeBackbone())


@pytest.mark.parametrize("kind", ["jbu", "pac"])
def test_shipped_efficientnet_lite0_checkpoint(kind):
    from upcli.backbones import create_backbone
    from upcli.checkpoints import read_config

    bb = create_backbone("efficientnet-lite0").eval()
    up = create_upsampler(kind, bb).eval()
    config = read_config(shipped_checkpoint(kind, bb))
    assert config["upsampler"] == kind and config["backbone"] == "efficientnet-lite0" and config["dim"] == 320
    assert config["training"]["step"] > 0
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = up(bb(image), image, (64, 96))
    assert out.shape == (1, 320, 64, 96) and torch.isfinite(out).all()


@pytest.mark.parametrize("taps", [1, 9, 25])
def test_softmax_taps_equals_torch_softmax_with_and_without_autograd(taps):
    from upcli.upsamplers.jbu import softmax_taps

    logits = torch.randn(2, 5, 7, taps) * 30  # large logits: the max is subtracted
    want = torch.softmax(logits, dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(softmax_taps(logits), want)
    logits.requires_grad_(True)
    got = softmax_taps(logits)
    torch.testing.assert_close(got, want)
    got[..., 0].sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("radius", [1, 2, 3])
def test_spatial_kernel_starts_at_the_same_width_in_pixels_for_any_radius(radius):
    """A fresh stage's kernel gives the neighbour one pixel away the same share whatever the window; a 3x3 window
    with 7x7's sigma would start as the identity and get no gradient to leave it."""
    layer = JBULayer(radius=radius)
    with torch.no_grad():
        layer.range_proj[2].weight.zero_()  # no range term: the spatial Gaussian alone
        layer.range_proj[2].bias.zero_()
        kernel = layer.kernel(torch.randn(1, 3, 9, 9))[0, 4, 4]
    r = radius
    assert kernel[r, r + 1] / kernel[r, r] == pytest.approx(math.exp(-1 / (2 * 0.75**2)), rel=1e-4)


@pytest.mark.parametrize("residual", ["input", "output"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_maps_made_in_the_stored_dtype_equal_the_float32_maps_rounded(residual, dtype):
    """``upsample_features(..., dtype)`` (a store's maps; the JBU's last stage writes them rounded) has the bits of
    the float32 maps rounded, for the JBU stack either residual and two upsamplers without their own ``render``
    (bilinear, bilateral), from features in float32 and from float16 ones (a compact store's)."""
    from upcli.upsamplers import upsample_features

    g = torch.Generator().manual_seed(3)
    low, image = torch.randn(1, 8, 3, 5, generator=g), torch.rand(1, 3, 40, 70, generator=g)
    exact = low.to(dtype).float()
    ups = (JBUStack(dim=8, layers=3, residual=residual), create_upsampler("bilinear"), create_upsampler("bilateral"))
    for up, feats in itertools.product(ups, (low, exact)):
        up.eval()
        want = upsample_features(up, feats, image, (37, 61), torch.device("cpu")).to(dtype)
        got = upsample_features(up, feats, image, (37, 61), torch.device("cpu"), dtype)
        assert got.dtype == dtype and torch.equal(got.view(torch.int16), want.view(torch.int16))
