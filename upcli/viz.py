"""Pictures: one PCA shared by several feature maps, and the one writer of preview PNGs (every command's)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .io.store import write_atomic

_MAX_FIT_PIXELS = 50_000
_PIXEL_CHUNK = 8192  # pixels per step, so no map is ever copied whole to float32/float64
_LABEL_HEIGHT = 14  # pixels of the strip above each preview panel


def pca_rgb(maps: list[Tensor], k: int = 3, fit: list[Tensor] | None = None) -> list[np.ndarray]:
    """Colour ``Tensor[C, h, w]`` maps by ONE PCA -> ``uint8 (h, w, k)`` each, fitted over ``fit`` (default: all
    the maps). Previews fit it on the low-res features alone, so every upsampler of one image gets its colours.

    The fit uses at most 50k pixels (a fixed-seed sample, so it is deterministic). Each component is
    scaled to 0..255 between its 1st and 99th percentile over that sample, the same for every map, so
    colours are comparable across maps. Components beyond ``C`` are black.
    """
    flats = [m.detach().cpu().reshape(m.shape[0], -1) for m in maps]
    fitted = flats if fit is None else [m.detach().cpu().reshape(m.shape[0], -1) for m in fit]
    if len({f.shape[0] for f in flats + fitted}) != 1:
        raise ValueError(f"maps must have the same channel count, got {[f.shape[0] for f in flats + fitted]}")
    sample = _sample_pixels(fitted)

    mean, basis = principal_axes(sample, k)
    sample_proj = torch.cat([_project(chunk, mean, basis) for chunk in sample], dim=1)  # (k, n)
    low = torch.quantile(sample_proj, 0.01, dim=1, keepdim=True)
    high = torch.quantile(sample_proj, 0.99, dim=1, keepdim=True)
    scale = 255 / (high - low).clamp_min(1e-12)

    colours = []
    for m, flat in zip(maps, flats):
        steps = range(0, flat.shape[1], _PIXEL_CHUNK)
        proj = torch.cat([_project(flat[:, i : i + _PIXEL_CHUNK], mean, basis) for i in steps], dim=1)
        rgb = ((proj - low) * scale).clamp(0, 255).round().to(torch.uint8)
        colours.append(rgb.T.reshape(*m.shape[1:], k).numpy())
    return colours


def edge_sharpness(feats: Tensor, image: Tensor, top: float = 0.1) -> float:
    """How much sharper the features change at the image's edges than elsewhere.

    ``feats (C, H, W)`` at the resolution of ``image (3, H, W)`` in [0, 1]. The channels are standardised; the
    feature gradient magnitude (forward differences, summed over channels) is averaged over the pixels with the
    strongest ``top`` fraction of image gradients (grey levels) and divided by its mean over the rest. About 1
    for a map that ignores the image (bilinear: 1.1 on chelsea at 448); higher when feature edges sit on image
    edges.
    """
    if feats.dim() != 3 or image.dim() != 3 or feats.shape[1:] != image.shape[1:]:
        raise ValueError(f"expected feats (C, H, W) and image (3, H, W) of one size, got {tuple(feats.shape)} and "
                         f"{tuple(image.shape)}")

    def gradient(x: Tensor) -> Tensor:  # (C, H, W) -> (H - 1, W - 1)
        dy, dx = x[:, 1:, :-1] - x[:, :-1, :-1], x[:, :-1, 1:] - x[:, :-1, :-1]
        return (dy.square() + dx.square()).sum(0).sqrt()

    f = feats.detach().float()
    f = (f - f.mean(dim=(1, 2), keepdim=True)) / f.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)
    feature_grad = gradient(f)
    image_grad = gradient(image.detach().float().mean(0, keepdim=True)).flatten()
    edges = torch.zeros_like(image_grad, dtype=torch.bool)
    edges[image_grad.topk(max(1, int(top * image_grad.numel()))).indices] = True
    feature_grad = feature_grad.flatten()
    return float(feature_grad[edges].mean() / feature_grad[~edges].mean().clamp_min(1e-12))


def save_preview(path: str | Path, image: np.ndarray, lr_feats: Tensor, hr_feats: Tensor | dict[str, Tensor]) -> None:
    """Write one PNG: the image | the low-res features | the high-res features (one panel per upsampler when
    ``hr_feats`` is ``{name: Tensor[C, H, W]}``), side by side, each panel labelled above.

    Every map is coloured by one PCA fitted on the low-res features (``Tensor[C, h, w]``), so the colours of an
    image are the same in every run and for every upsampler, and shown at the image size (nearest neighbour).
    The file appears atomically.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    height, width = image.shape[:2]
    high = hr_feats if isinstance(hr_feats, dict) else {"upsampled": hr_feats}
    colours = pca_rgb([lr_feats, *high.values()], fit=[lr_feats])
    labels = ["image", f"low-res {lr_feats.shape[1]}x{lr_feats.shape[2]}"] + [
        f"{name} {m.shape[1]}x{m.shape[2]}" for name, m in high.items()]
    panels = [image] + [_nearest(rgb, (height, width)) for rgb in colours]
    save_png(path, np.concatenate([_labelled(panel, label) for panel, label in zip(panels, labels)], axis=1))


def _labelled(panel: np.ndarray, label: str) -> np.ndarray:
    """``panel`` under a white strip with ``label`` in black (Pillow's built-in font)."""
    from PIL import ImageDraw

    strip = Image.new("RGB", (panel.shape[1], _LABEL_HEIGHT), "white")
    ImageDraw.Draw(strip).text((3, 2), label, fill="black")
    return np.concatenate([np.asarray(strip), panel], axis=0)


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    """Write a uint8 (H, W, 3) array as a PNG that appears atomically (its folder is created): every preview."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, format="PNG")
    write_atomic(path, png.getvalue())


def _sample_pixels(flats: list[Tensor]) -> list[Tensor]:
    """At most ``_MAX_FIT_PIXELS`` pixels drawn over all maps with a fixed seed, as float32 ``(C, n)`` chunks."""
    total = sum(f.shape[1] for f in flats)
    n = min(total, _MAX_FIT_PIXELS)
    picks = torch.randperm(total, generator=torch.Generator().manual_seed(0))[:n].sort().values
    offsets = torch.tensor([0] + [f.shape[1] for f in flats]).cumsum(0)
    chunks = []
    for flat, start, end in zip(flats, offsets[:-1], offsets[1:]):
        local = picks[(picks >= start) & (picks < end)] - start
        chunks += [flat[:, local[i : i + _PIXEL_CHUNK]].float() for i in range(0, len(local), _PIXEL_CHUNK)]
    return chunks


def principal_axes(chunks: list[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The one PCA of upcli: mean ``(C, 1)`` and the top-``k`` principal axes ``(C, k)`` (float32) of the pixels in
    ``(C, n)`` chunks, from their float64 covariance (memory C x C, whatever n), each axis signed so that its
    largest entry is positive. Axes beyond ``C`` are zero. Used by the previews and by the implicit field's fit."""
    channels, device = chunks[0].shape[0], chunks[0].device
    total = torch.zeros(channels, 1, dtype=torch.float64, device=device)
    outer = torch.zeros(channels, channels, dtype=torch.float64, device=device)
    count = 0
    for chunk in chunks:
        x = chunk.double()
        total += x.sum(1, keepdim=True)
        outer += x @ x.T
        count += x.shape[1]
    mean = total / count
    cov = outer / count - mean @ mean.T
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    basis = vectors.flip(1)[:, :k]
    # sign convention: the largest-magnitude entry of each axis is positive
    basis *= torch.sign(basis.gather(0, basis.abs().argmax(0, keepdim=True)))
    if basis.shape[1] < k:  # fewer channels than components
        basis = torch.cat([basis, basis.new_zeros(channels, k - basis.shape[1])], dim=1)
    return mean.float(), basis.float()


def _project(pixels: Tensor, mean: Tensor, basis: Tensor) -> Tensor:
    """``(C, n)`` pixels -> ``(k, n)`` components."""
    return basis.T @ (pixels.float() - mean)


def _nearest(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if rgb.shape[:2] == size:
        return rgb
    return np.array(Image.fromarray(rgb).resize(size[::-1], Image.Resampling.NEAREST))
