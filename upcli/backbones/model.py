"""``Backbone``: a timm model that maps images in [0, 1] of any size to one layer's NCHW feature map."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from .cfg import IMAGENET_NORM, BackboneCfg, make_cfg
from .weights import BUNDLED_WEIGHTS, create_pretrained, load_backbone_weights


def _layer_names(feature_info: Sequence[dict], vit: bool) -> tuple[str, ...]:
    return tuple(str(i) for i in range(len(feature_info))) if vit else tuple(f["module"] for f in feature_info)


def _is_vit(feature_info: Sequence[dict]) -> bool:
    # one stride for every feature: a plain (non-hierarchical) transformer whose layers are its blocks
    return len(feature_info) > 1 and len({f["reduction"] for f in feature_info}) == 1


def timm_cfg(model_name: str, layer=None) -> BackboneCfg:
    """Config of any timm model (``timm:<name>``), read off a weightless build on the meta device."""
    import timm

    if not timm.is_model(model_name):
        raise UsageError(f"unknown timm model {model_name!r}: type timm:<name> with a name from timm.list_models(), "
                         "e.g. timm:convnext_tiny")
    with torch.device("meta"):
        model = timm.create_model(model_name)
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise UsageError(f"timm model {model_name!r} has no feature_info/forward_intermediates; pick another")
    vit = _is_vit(info)
    features = [(n, f["num_chs"], f["reduction"]) for n, f in zip(_layer_names(info, vit), info)]
    pcfg = model.pretrained_cfg
    tag = pcfg.get("tag")
    return make_cfg(f"timm:{model_name}", f"{pcfg['architecture']}.{tag}" if tag else pcfg["architecture"],
                    features, layer, norm=(pcfg.get("mean") or IMAGENET_NORM[0], pcfg.get("std") or IMAGENET_NORM[1]),
                    license=pcfg.get("license", "unknown"), vit=vit)


def create_timm_model(cfg: BackboneCfg, weights=None, pretrained: bool = True, **kwargs) -> nn.Module:
    """The timm model for ``cfg``: weights from ``weights``, else bundled, else the hub; random if not pretrained."""
    import timm

    if cfg.vit:
        kwargs.setdefault("dynamic_img_size", True)  # interpolate position embeddings for any grid
    if weights is None and pretrained and cfg.name in BUNDLED_WEIGHTS:
        weights = BUNDLED_WEIGHTS[cfg.name]()
    if weights is None and pretrained:
        return create_pretrained(cfg, **kwargs)
    model = timm.create_model(cfg.timm_name, pretrained=False, **kwargs)
    if weights is not None:
        load_backbone_weights(model, weights, cfg)
    return model


class Backbone(nn.Module):
    """Images ``Tensor[B, 3, H, W]`` in [0, 1] -> float32 ``Tensor[B, dim, h, w]``, ``(h, w) = grid_size(H, W)``.

    This implementation:
    * resizes (bilinear, antialiased) to exactly ``(h * stride, w * stride)`` so the grid covers the whole image with
      no padding offset, then normalises with ``cfg.mean``/``cfg.std``;
    * takes one layer via timm's ``forward_intermediates``: for ViTs a block's patch tokens with the final norm applied
      (position embeddings interpolated to the grid), for CNNs a stage output.
    """

    def __init__(self, cfg: BackboneCfg, model: nn.Module):
        super().__init__()
        info = model.feature_info
        layers = _layer_names(info, cfg.vit)
        n = len(layers)
        if cfg.vit and -n <= int(cfg.layer) < n:
            self.index = int(cfg.layer) % n
        elif not cfg.vit and cfg.layer in layers:
            self.index = layers.index(cfg.layer)
        else:
            raise UsageError(f"layer {cfg.layer!r} is not in this {cfg.name} model: use one of {', '.join(layers)}")
        # the built model is the truth (model kwargs may change depth or width)
        feature = info[self.index]
        self.cfg = replace(cfg, dim=feature["num_chs"], stride=feature["reduction"], layers=layers)
        self.model = model
        self.register_buffer("pixel_mean", torch.tensor(cfg.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.std).view(1, 3, 1, 1), persistent=False)

    name = property(lambda self: self.cfg.name)
    dim = property(lambda self: self.cfg.dim)
    stride = property(lambda self: self.cfg.stride)
    layer = property(lambda self: self.cfg.layer)
    mean = property(lambda self: self.cfg.mean)
    std = property(lambda self: self.cfg.std)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        return max(1, round(height / self.stride)), max(1, round(width / self.stride))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        h, w = self.grid_size(*images.shape[-2:])
        size = (h * self.stride, w * self.stride)
        x = images.to(self.pixel_mean.dtype)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        x = self.normalize(x).to(next(self.model.parameters()).dtype)
        feats = self.model.forward_intermediates(
            x, indices=[self.index], norm=self.cfg.vit, stop_early=True, output_fmt="NCHW", intermediates_only=True)
        return feats[0].float()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer={self.layer!r}, dim={self.dim}, stride={self.stride}"


def build_backbone(cfg: BackboneCfg, weights=None, pretrained: bool = True, **kwargs) -> Backbone:
    from .itpn import BACKBONE_PREFIX, create_itpn_model

    if cfg.name.startswith(BACKBONE_PREFIX):  # upcli's own network: weights from its checkpoint or ``weights``
        return Backbone(cfg, create_itpn_model(cfg.name.removeprefix(BACKBONE_PREFIX), weights)).eval()
    return Backbone(cfg, create_timm_model(cfg, weights, pretrained, **kwargs)).eval()
