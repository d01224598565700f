"""Checkpoints of upsamplers, loaded in timm's order: read and check the config, build the model from it, load the
weights last.

A checkpoint (``upcli train``, ``fit-image --save-fields``, ``upcli convert featup``) holds the upsampler's
``state_dict`` and a config of kind ``"upsampler"``: the upsampler's registered name (key ``upsampler``), the
backbone, layer and dim it was made for, and its architecture (``upsampler.config``).
"""

from __future__ import annotations

import inspect
from importlib import resources

from ..checkpoints import (
    build_checked,
    check_finite,
    checkpoint_bytes,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from ..errors import WeightsError
from .base import Upsampler

KIND = "upsampler"


def shipped_checkpoint(name: str, backbone) -> str:
    """The checkpoint shipped in the package for upsampler ``name`` and this backbone (``name.safetensors`` for a
    backbone-agnostic upsampler), or a one-line ``WeightsError``."""
    from . import upsampler_class

    if upsampler_class(name).backbone_agnostic:
        path = resources.files("upcli") / "weights" / f"{name}.safetensors"
        if not path.is_file():
            raise WeightsError(f"no {name} checkpoint ships yet; train one and pass --upsampler CKPT, or pass "
                               f"pretrained=False for fresh (untrained) weights")
        return str(path)
    if backbone is None:
        raise WeightsError(f"create_upsampler({name!r}) needs backbone= (a model from create_backbone: the {name} "
                           f"checkpoint shipped for it is loaded), or checkpoint=PATH, or pretrained=False with dim=")
    backbone_name = getattr(backbone, "name", None)
    path = resources.files("upcli") / "weights" / f"{name}-{backbone_name}.safetensors"
    if backbone_name is None or not path.is_file():
        raise WeightsError(f"no {name} checkpoint ships for backbone {backbone_name!r}; train one with "
                           f"`upcli train IMAGES --backbone {backbone_name} --upsampler {name} --out CKPT` and pass "
                           f"--upsampler CKPT")
    return str(path)


def check_checkpoint(path, name: str | None, backbone) -> dict:
    """The checkpoint's config, after refusing another kind, another upsampler than ``name`` (any when ``None``),
    or another backbone, layer or dim (no weight is read; a backbone-agnostic upsampler fits any backbone)."""
    config = read_config(path, KIND)
    learned = _learned_names()
    if config.get("upsampler") not in learned:
        raise WeightsError(f"{path}: 'upsampler' must be one of {', '.join(learned)}, got {config.get('upsampler')!r:.60}")
    if name is not None and config.get("upsampler") != name:
        raise WeightsError(f"{path} is a {config.get('upsampler')} checkpoint, not {name}")
    if backbone is not None and not _backbone_agnostic(config.get("upsampler")):
        want = {"backbone": getattr(backbone, "name", None), "layer": str(getattr(backbone, "layer", None)),
                "dim": getattr(backbone, "dim", None)}
        for key, value in want.items():
            if value is not None and str(config.get(key)) != str(value):
                raise WeightsError(f"{path} was trained for {key} {config.get(key)!r}, but the backbone has "
                                   f"{value!r}; train one for this backbone with `upcli train`")
    return config


def _learned_names() -> list[str]:
    """The registered upsamplers that have checkpoints."""
    from . import list_upsamplers, upsampler_class

    return [n for n in list_upsamplers() if upsampler_class(n).checkpointed]


def _backbone_agnostic(name) -> bool:
    """Whether ``name`` is a registered backbone-agnostic upsampler (unknown names are not: they fail later)."""
    from . import list_upsamplers, upsampler_class

    return name in list_upsamplers() and upsampler_class(name).backbone_agnostic


def upsampler_config(upsampler: Upsampler, backbone) -> dict:
    """What :func:`check_checkpoint` checks, plus the architecture (no backbone or layer when backbone-agnostic)."""
    if upsampler.backbone_agnostic:
        return {"kind": KIND, "upsampler": upsampler.name, **upsampler.config}
    return {"kind": KIND, "upsampler": upsampler.name, "backbone": getattr(backbone, "name", None),
            "layer": str(getattr(backbone, "layer", None)), **upsampler.config}


def save_upsampler(path, upsampler: Upsampler, backbone, extra: dict | None = None) -> None:
    save_checkpoint(path, upsampler.state_dict(), {**upsampler_config(upsampler, backbone), **(extra or {})})


def upsampler_bytes(upsampler: Upsampler, backbone, extra: dict | None = None) -> bytes:
    """What :func:`save_upsampler` writes, as bytes (to hash them before they are written)."""
    return checkpoint_bytes(upsampler.state_dict(), {**upsampler_config(upsampler, backbone), **(extra or {})})


def load_upsampler(path, backbone=None, name: str | None = None, pretrained: bool = True, **arch) -> Upsampler:
    """The upsampler in checkpoint ``path`` (``--upsampler PATH``), checked against ``backbone`` and, given,
    ``name``. The checkpoint's config gives the architecture (``arch`` fills what it lacks); ``pretrained=False``
    builds it with fresh weights, without reading them."""
    from . import upsampler_class

    config = check_checkpoint(path, name, backbone)
    cls = upsampler_class(config["upsampler"])
    model = build_checked(path, lambda: cls.build(backbone, **{**arch, **_architecture(cls, config)}))
    if pretrained:
        load_upsampler_weights(model, path)
    return model


def load_upsampler_weights(upsampler: Upsampler, path) -> None:
    """Fill ``upsampler`` (built from the checkpoint's config) with the checkpoint's tensors."""
    tensors, _ = load_checkpoint(path)
    check_finite(path, tensors)
    missing, unexpected = upsampler.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path} does not fit this upsampler (missing {missing[:3]}, unexpected {unexpected[:3]})")


def _architecture(cls: type[Upsampler], config: dict) -> dict:
    """The entries of ``config`` that ``cls``'s constructor takes."""
    params = inspect.signature(cls).parameters
    return {key: value for key, value in config.items() if key in params and key != "backbone"}
