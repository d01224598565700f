"""Upsamplers: ``(B, C, h, w)`` backbone features plus the image -> ``(B, C, H, W)`` features.

One registry, timm style: ``@register_upsampler("name")`` on an ``Upsampler`` subclass, built by
``create_upsampler(name, backbone=...)``, listed by ``list_upsamplers()``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from .._registry import Registry


class Upsampler(nn.Module):
    """Base class. ``forward(lr_feats, image, size)`` returns features at ``size``.

    Shapes: ``lr_feats: Tensor[B, C, h, w]``; ``image: Tensor[B, 3, H_img, W_img]``, float in [0, 1], the
    guidance (any size: subclasses resize it with ``guidance_at``); ``size = (H, W)``;
    returns ``Tensor[B, C, H, W]`` in the dtype of ``lr_feats``.
    """

    name: str = ""


def guidance_at(image: Tensor, size: tuple[int, int]) -> Tensor:
    """``image`` resized to ``size`` (bilinear, antialiased when shrinking); unchanged if already that size."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return F.interpolate(image, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


_UPSAMPLERS: Registry[Upsampler] = Registry("upsampler")


def register_upsampler(name: str) -> Callable[[type[Upsampler]], type[Upsampler]]:
    """Class decorator: register an ``Upsampler`` subclass under ``name`` and set its ``.name``."""

    def decorator(cls: type[Upsampler]) -> type[Upsampler]:
        cls.name = name
        return _UPSAMPLERS.register(name)(cls)

    return decorator


def create_upsampler(name: str, backbone: nn.Module | None = None, **kwargs) -> Upsampler:
    """Build upsampler ``name``; ``None`` kwargs are dropped so the entry's defaults apply.

    ``backbone`` is handed to every entry (learned upsamplers check its ``dim``); it may be ``None``.
    ``name`` may also be the path of a checkpoint written by ``upcli train`` (any learned upsampler).
    Unknown names raise ``UsageError`` listing the choices.
    """
    if name not in _UPSAMPLERS and (name.endswith(".safetensors") or os.path.sep in name or os.path.isfile(name)):
        from .jbu import load_upsampler

        return load_upsampler(name, backbone)
    return _UPSAMPLERS.create(name, backbone=backbone, **kwargs)


def list_upsamplers(pattern: str = "*") -> list[str]:
    """Registered names matching the fnmatch ``pattern``."""
    return _UPSAMPLERS.names(pattern)


# Entries register themselves on import; they need the names above.
from . import bilateral, bilinear, implicit, jbu, pac, resize_conv  # noqa: F401

__all__ = ["Upsampler", "create_upsampler", "guidance_at", "list_upsamplers", "register_upsampler"]
