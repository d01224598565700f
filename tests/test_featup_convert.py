"""FeatUp JBU checkpoint conversion: key mapping, semantics against an independent reference, safety."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from upcli.checkpoints import read_config, read_state_dict
from upcli.errors import WeightsError
from upcli.upsamplers import create_upsampler
from upcli.upsamplers.featup import convert_featup_checkpoint, convert_featup_jbu

D = 16
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def featup_state_dict(dim: int = D, norm: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors in the layout of FeatUp's Lightning ``state_dict`` (the real key names and shapes)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.3):
        return torch.randn(*shape, generator=g) * scale

    sd = {}
    for k in range(1, 5):
        p = f"upsampler.up{k}."
        # scalar or (1,) like some Lightning saves; a non-trivial temperature and sigma
        sd[p + "range_temp"] = torch.tensor(0.3 * k - 0.5) if k % 2 else torch.tensor([0.2 * k])
        sd[p + "sigma_spatial"] = torch.tensor([0.6 + 0.2 * k]) if k % 2 else torch.tensor(0.7 + 0.1 * k)
        sd[p + "range_proj.0.weight"], sd[p + "range_proj.0.bias"] = rnd(32, 3, 1, 1, scale=1.0), rnd(32)
        sd[p + "range_proj.3.weight"], sd[p + "range_proj.3.bias"] = rnd(32, 32, 1, 1), rnd(32)
        sd[p + "fixup_proj.0.weight"], sd[p + "fixup_proj.0.bias"] = rnd(49, 52, 1, 1), rnd(49)
        sd[p + "fixup_proj.3.weight"], sd[p + "fixup_proj.3.bias"] = rnd(49, 49, 1, 1), rnd(49)
    sd["upsampler.fixup_proj.1.weight"], sd["upsampler.fixup_proj.1.bias"] = rnd(dim, dim, 1, 1), rnd(dim)
    if norm:
        sd["model.1.norm.weight"], sd["model.1.norm.bias"] = 1 + rnd(dim, scale=0.1), rnd(dim, scale=0.1)
        sd["model.0.blocks.0.attn.qkv.weight"] = rnd(3 * dim, dim)
    else:
        sd["model.blocks.0.attn.qkv.weight"] = rnd(3 * dim, dim)
    sd["downsampler.w"], sd["downsampler.b"] = rnd(1, 1, 14, 14), rnd(1, 1, 14, 14)
    sd["downsampler.attention_net.1.weight"] = rnd(1, dim)
    sd["scale_net.net.weight"], sd["scale_net.net.bias"] = rnd(1, dim, 1, 1), rnd(1)
    return sd


def lightning_file(tmp_path, sd, name="featup.ckpt"):
    path = tmp_path / name
    torch.save({"epoch": 0, "global_step": 2000, "pytorch-lightning_version": "1.9.5", "state_dict": sd,
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}]}, path)
    return path


def stage_params(sd, k):
    """FeatUp's parameters of ``up{k}``, names without the prefix."""
    p = f"upsampler.up{k}."
    return {key[len(p):]: v for key, v in sd.items() if key.startswith(p)}


# ---- an independent FeatUp JBU layer, unfold-based, written from the description (featup.md 1.1) --------------

def featup_jbu_ref(source, guidance, p, radius=3):
    B, C = source.shape[:2]
    _, _, H, W = guidance.shape
    k = 2 * radius + 1

    def mlp(x, name):  # Conv, GELU, Dropout2d (identity in eval), Conv
        x = F.gelu(F.conv2d(x, p[f"{name}.0.weight"], p[f"{name}.0.bias"]))
        return F.conv2d(x, p[f"{name}.3.weight"], p[f"{name}.3.bias"])

    keys = mlp(guidance, "range_proj")
    neighbours = F.unfold(F.pad(keys, [radius] * 4, mode="reflect"), k).view(B, keys.shape[1], k * k, H, W)
    temp = p["range_temp"].reshape(()).exp().clamp(1e-4, 1e4)
    range_kernel = torch.softmax(temp * torch.einsum("bcphw,bchw->bphw", neighbours, keys), dim=1)
    grid = torch.linspace(-1, 1, k)
    d2 = (grid[:, None] ** 2 + grid[None, :] ** 2).reshape(1, k * k, 1, 1)
    spatial = torch.exp(-d2 / (2 * p["sigma_spatial"].reshape(()) ** 2))
    kernel = range_kernel * spatial
    kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
    kernel = kernel + 0.1 * mlp(torch.cat([kernel, guidance], dim=1), "fixup_proj")
    up = F.interpolate(source, size=(H, W), mode="bicubic", align_corners=False)
    patches = F.unfold(F.pad(up, [radius] * 4, mode="reflect"), k).view(B, C, k * k, H, W)
    return torch.einsum("bcphw,bphw->bchw", patches, kernel)


def featup_stack_ref(lr_feats, image, sd, pool):
    """FeatUp's stack: channel norm, 4 stages of 2x guided by ``pool(normalised image, 2h x 2w)``, 0.1 residual."""
    x = F.layer_norm(lr_feats.permute(0, 2, 3, 1), (lr_feats.shape[1],), sd["model.1.norm.weight"],
                     sd["model.1.norm.bias"]).permute(0, 3, 1, 2)
    guidance = (image - MEAN) / STD
    for k in range(1, 5):
        h, w = x.shape[-2:]
        x = featup_jbu_ref(x, pool(guidance, (2 * h, 2 * w)), stage_params(sd, k))
    return x + 0.1 * F.conv2d(x, sd["upsampler.fixup_proj.1.weight"], sd["upsampler.fixup_proj.1.bias"])


# ---- tests -----------------------------------------------------------------------------------------------------

def test_every_parameter_is_the_mapped_featup_tensor(tmp_path):
    sd = featup_state_dict()
    stack = convert_featup_jbu(read_state_dict(lightning_file(tmp_path, sd)))
    assert not stack.training
    cfg = stack.config
    assert (cfg["dim"], cfg["layers"], cfg["key_dim"], cfg["radius"]) == (D, 4, 32, 3)
    assert cfg["fixup"] and cfg["residual"] == "output" and cfg["channel_norm"] and cfg["guidance"] == "rgb"
    expected = {"channel_norm.weight": sd["model.1.norm.weight"], "channel_norm.bias": sd["model.1.norm.bias"],
                "residual.weight": 0.1 * sd["upsampler.fixup_proj.1.weight"],
                "residual.bias": 0.1 * sd["upsampler.fixup_proj.1.bias"]}
    for k in range(1, 5):
        src, dst = f"upsampler.up{k}.", f"stages.{k - 1}."
        for name in ("range_temp", "sigma_spatial"):
            expected[dst + name] = sd[src + name].reshape(())
        for mlp in ("range_proj", "fixup_proj"):
            for theirs, ours in ((0, 0), (3, 2)):
                for p in ("weight", "bias"):
                    expected[f"{dst}{mlp}.{ours}.{p}"] = sd[f"{src}{mlp}.{theirs}.{p}"]
    ours = stack.state_dict()
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key

    lr, image = torch.randn(1, D, 4, 6), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out = stack(lr, image, (64, 96))
    assert out.shape == (1, D, 64, 96) and torch.isfinite(out).all()


def test_converted_layer_matches_featup_reference():
    sd = featup_state_dict(seed=1)
    stage = convert_featup_jbu(sd).stages[0]
    g = torch.Generator().manual_seed(2)
    source = torch.randn(2, D, 6, 9, generator=g)
    guidance = (torch.rand(2, 3, 12, 18, generator=g) - MEAN) / STD
    # in float64: FeatUp's unnormalised fixup kernel amplifies float32 rounding (both sides are ~7e-5 off in float32);
    # what is left (~6e-8) is torch's bicubic, whose taps are float32 numbers even for float64 input
    source, guidance = source.double(), guidance.double()
    with torch.no_grad():
        ours = stage.double()(source, guidance)
        ref = featup_jbu_ref(source, guidance, {k: v.double() for k, v in stage_params(sd, 1).items()})
    assert ours.shape == ref.shape == (2, D, 12, 18)
    # the fixup term must matter here, or the test would not check its mapping
    no_fixup = {k: v.double() for k, v in stage_params(sd, 1).items()}
    no_fixup.update({"fixup_proj.3.weight": torch.zeros(49, 49, 1, 1, dtype=torch.float64),
                     "fixup_proj.3.bias": torch.zeros(49, dtype=torch.float64)})
    assert (ref - featup_jbu_ref(source, guidance, no_fixup)).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_converted_stack_matches_featup_reference():
    """At 16x the converted stack is FeatUp's, guidance pooling (adaptive_avg_pool2d) included."""
    sd = featup_state_dict(seed=3)
    stack = convert_featup_jbu(sd)
    g = torch.Generator().manual_seed(4)
    lr, image = torch.randn(1, D, 4, 6, generator=g) * 3 + 1, torch.rand(1, 3, 64, 96, generator=g)
    with torch.no_grad():
        ours = stack(lr, image, (64, 96))
        ref = featup_stack_ref(lr, image, sd, F.adaptive_avg_pool2d)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_checkpoint_round_trip(tmp_path):
    sd = featup_state_dict(dim=384, seed=5)
    src = lightning_file(tmp_path, sd)
    out = convert_featup_checkpoint(src, tmp_path / "featup-dinov2.safetensors", "dinov2", "-1").out
    assert out.is_file()
    backbone = SimpleNamespace(name="dinov2", layer="-1", dim=384)
    loaded = create_upsampler(str(out), backbone=backbone).eval()
    stack = convert_featup_jbu(sd)
    lr, image = torch.randn(1, 384, 4, 6), torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded(lr, image, (64, 96)), stack(lr, image, (64, 96)), rtol=0, atol=0)
    with pytest.raises(WeightsError, match="dim"):  # the checkpoint is tied to that backbone's dim
        create_upsampler(str(out), backbone=SimpleNamespace(name="dinov2", layer="-1", dim=768))


def test_bare_and_safetensors_inputs(tmp_path):
    from safetensors.torch import save_file

    sd = featup_state_dict(norm=False, seed=6)
    bare = {k.removeprefix("upsampler."): v for k, v in sd.items()}
    torch.save(bare, tmp_path / "bare.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sd.safetensors"))
    a = convert_featup_jbu(read_state_dict(tmp_path / "bare.pth"))
    b = convert_featup_jbu(read_state_dict(tmp_path / "sd.safetensors"), dim=D)
    assert not a.config["channel_norm"] and a.channel_norm is None and not b.config["channel_norm"]
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # an upsampler-only dict does not say whether the norm was on: refused unless told
    only_up = {k: v for k, v in bare.items() if not k.startswith(("model.", "downsampler", "scale_net"))}
    with pytest.raises(WeightsError, match="channel-norm"):
        convert_featup_jbu(only_up)
    assert convert_featup_jbu(only_up, channel_norm=True).config["channel_norm"]


def test_unsafe_pickle_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": featup_state_dict(dim=384), "hyper_parameters": Trap()}, path)
    with pytest.raises(WeightsError) as err:
        convert_featup_checkpoint(path, tmp_path / "out.safetensors", "dinov2")
    message = str(err.value)
    assert "\n" not in message and "weights_only=False" in message and "['state_dict']" in message
    assert "evil-state.pth" in message and "Trap" in message
    assert not TRAPPED  # the object was never reconstructed


def test_missing_key_wrong_dim_and_missing_file(tmp_path):
    sd = featup_state_dict()
    del sd["upsampler.up3.fixup_proj.3.bias"]
    with pytest.raises(WeightsError, match=r"upsampler\.up3\.fixup_proj\.3\.bias"):
        convert_featup_jbu(sd)
    with pytest.raises(WeightsError, match="16-channel"):
        convert_featup_jbu(featup_state_dict(), dim=384)
    extra = {**featup_state_dict(), "upsampler.up5.range_temp": torch.tensor(0.0)}
    with pytest.raises(WeightsError, match="up5"):
        convert_featup_jbu(extra)
    with pytest.raises(WeightsError, match="nope.ckpt: no such file"):
        read_state_dict(tmp_path / "nope.ckpt")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="junk.pth: cannot read checkpoint"):
        read_state_dict(tmp_path / "junk.pth")


def test_conversion_for_a_named_backbone(tmp_path):
    src = lightning_file(tmp_path, featup_state_dict(dim=384, seed=7))
    out = tmp_path / "featup-dinov2.safetensors"
    line = convert_featup_checkpoint(src, out, "dinov2").summary()
    assert "\n" not in line and str(out) in line and "dim 384" in line and "channel norm on" in line
    assert "--layer" not in line and "--layer 2" in convert_featup_checkpoint(src, out, "dinov2", layer=2).summary()
    config = read_config(out)
    assert (config["upsampler"], config["backbone"], config["layer"], config["dim"]) == ("jbu", "dinov2", "2", 384)
    # a backbone whose features have another dim is refused before anything is written
    with pytest.raises(WeightsError, match="384-channel"):
        convert_featup_checkpoint(src, tmp_path / "x.safetensors", "resnet50")
    assert not (tmp_path / "x.safetensors").exists()


TRAPPED: list[str] = []


class Trap:
    """Stands for a non-allowlisted object (e.g. an OmegaConf config): unpickling it would run ``__init__``."""

    def __init__(self, tag: str | None = None):
        if tag is not None:
            TRAPPED.append(tag)

    def __reduce__(self):
        return (Trap, ("Trap unpickled",))
