"""Upsamplers: ``(B, C, h, w)`` backbone features plus the image -> ``(B, C, H, W)`` features.

One registry, timm style: ``@register_upsampler("name")`` on an ``Upsampler`` subclass (:mod:`.base`), built by
``create_upsampler(name, backbone=...)``, listed by ``list_upsamplers()``. Checkpoints: :mod:`.checkpoints`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .._registry import Registry
from ..checkpoints import names_checkpoint_file
from .base import LearnedUpsampler, Upsampler, guidance_at, upsample_features

_UPSAMPLERS: Registry[Upsampler] = Registry("upsampler")


def register_upsampler(name: str) -> Callable[[type[Upsampler]], type[Upsampler]]:
    """Class decorator: register an ``Upsampler`` subclass under ``name`` and set its ``.name``."""

    def decorator(cls: type[Upsampler]) -> type[Upsampler]:
        cls.name = name
        return _UPSAMPLERS.register(name)(cls)

    return decorator


def upsampler_class(name: str) -> type[Upsampler]:
    """The class registered as ``name``; unknown names raise ``UsageError`` listing the choices."""
    return _UPSAMPLERS.get(name)


def create_upsampler(name: str, backbone: nn.Module | None = None, checkpoint: str | None = None,
                     pretrained: bool = True, **kwargs) -> Upsampler:
    """Build upsampler ``name``; ``None`` kwargs are dropped so the entry's defaults apply.

    ``backbone`` is handed to every entry (learned upsamplers take their dim from it and check checkpoints against
    it); it may be ``None``. Learned upsamplers load ``checkpoint``, else the one shipped for the backbone;
    ``pretrained=False`` gives fresh weights (for training). ``name`` may also be the path of a checkpoint
    (``upcli train``, ``fit-image --save-fields``). Unknown names raise ``UsageError`` listing the choices.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if names_checkpoint_file(name, _UPSAMPLERS):
        return load_upsampler(name, backbone, pretrained=pretrained, **kwargs)
    cls = upsampler_class(name)
    if checkpoint is None and pretrained and issubclass(cls, LearnedUpsampler):
        checkpoint = shipped_checkpoint(name, backbone)
    if checkpoint is not None:
        return load_upsampler(checkpoint, backbone, name, **kwargs)
    return cls.build(backbone, **kwargs)


def list_upsamplers(pattern: str = "*") -> list[str]:
    """Registered names matching the fnmatch ``pattern``."""
    return _UPSAMPLERS.names(pattern)


# The checkpoint module and the entries need the names above; entries register themselves on import.
from .checkpoints import load_upsampler, shipped_checkpoint  # noqa: E402
from . import attention, bilateral, bilinear, implicit, jbu, pac, resize_conv  # noqa: E402, F401

__all__ = ["Upsampler", "create_upsampler", "guidance_at", "list_upsamplers", "register_upsampler", "upsample_features",
           "upsampler_class"]
