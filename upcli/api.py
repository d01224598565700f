"""``upcli.features``: the features of one image at its resolution, in one call (what ``upsample`` stores)."""

from __future__ import annotations

import functools
import os

import numpy as np

from .io.images import DEFAULT_SIZE, load_rgb, parse_size, resize_rgb, target_size


@functools.lru_cache(maxsize=4)
def _models(backbone: str, weights: str | None, layer: str | None, upsampler: str, device: str):
    """The backbone and upsampler, built once per process for these arguments."""
    from .backbones import create_backbone
    from .upsamplers import create_upsampler

    model = create_backbone(backbone, weights=weights, layer=layer).to(device).eval()
    return model, create_upsampler(upsampler, backbone=model).to(device).eval()


def _rgb(image) -> np.ndarray:
    """``uint8 (H, W, 3)`` from a path, a PIL image, an ``(H, W, 3)`` uint8 array or a ``(3, H, W)`` tensor in
    [0, 1] (or uint8)."""
    import torch
    from PIL import Image, ImageOps

    from .io.images import _to_rgb_array

    if isinstance(image, (str, os.PathLike)):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return _to_rgb_array(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected an image tensor (3, H, W), got {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            image = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
        return image.permute(1, 2, 0).cpu().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 array (H, W, 3), got {array.dtype} {array.shape}")
    return array


def features(image, backbone: str = "efficientnet-lite0", upsampler: str = "bilinear",
             size: int | str | None = DEFAULT_SIZE, *, weights: str | None = None, layer: str | None = None,
             device: str = "cpu"):
    """Features of one image at the output resolution: ``Tensor[C, H, W]`` (float32), as ``upcli upsample`` makes
    them with the same arguments (before its storage dtype).

    ``image``: a path, a PIL image, a uint8 array ``(H, W, 3)`` or a tensor ``(3, H, W)`` in [0, 1]. ``size``: the
    output's shorter side (``None`` or "original": the image's own). The models are built on the first call and
    kept for the next ones with the same arguments.

    >>> feats = upcli.features("cat.jpg", backbone="dinov2", weights="dinov2_vits14_pretrain.pth", upsampler="jbu")
    """
    import torch

    from .upsamplers import upsample_features

    rgb = _rgb(image)
    rgb = resize_rgb(rgb, target_size(*rgb.shape[:2], parse_size(size)))
    device = torch.device(device)
    model, up = _models(backbone, None if weights is None else str(weights), layer, upsampler, str(device))
    pixels = torch.from_numpy(rgb).to(device).permute(2, 0, 1)[None].float().div_(255).contiguous()
    with torch.inference_mode():
        low = model(pixels)
    return upsample_features(up, low, pixels, tuple(rgb.shape[:2]), device)[0].float().clone()
