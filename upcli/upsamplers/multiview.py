"""FeatUp's multi-view reconstruction objective: jitters, learned downsamplers, and the loss.

A view ``t`` (reflect-pad, zoom, crop, flip) is drawn *per sample* and applied by one ``grid_sample`` to both the
image and the high-res features, which share its geometry. The loss compares ``down(t(F_hr))`` with
``backbone(t(x))`` under a Gaussian NLL with a per-pixel uncertainty predicted from the target, after a random
projection of the channels (fresh per sample and view):

    L = mean( |P^T (down(t(F_hr)) - f(t(x)))|^2 / (2 r^2 s^2) + log s ),   s = exp(conv1x1(f(t(x))) + 0.1)

with ``r`` the RMS of each target (a constant): FeatUp layer-normalises the features instead, which changes what
the upsampler is fed; dividing the error keeps the features as they are and the loss on one scale.

The downsamplers map ``(B, C, H, W)`` to the backbone's grid ``(h, w)`` for any size and aspect ratio:
features are first resized to ``(h * f, w * f)`` with ``f = round(H / h)`` (a no-op when the image is a multiple
of the stride), then pooled over f x f cells without unfolding:
- ``simple``: one learned f x f blur, shared by channels (softmax of logits; starts as a box filter);
- ``attention``: per pixel, a saliency logit (1x1 conv) times a learned f x f weight map plus a bias map,
  softmax over each cell. Deterministic: FeatUp's random mask of cells, applied even in eval, is not kept.
The learned maps are stored at 64 x 64 and resized to the cell, so one downsampler serves every stride.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._registry import Registry
from ..training import generator


# ---- jitter -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class JitterConfig:
    max_pad: float = 20 / 224  # as a fraction of the image side (FeatUp: 20 px at 224)
    max_zoom: float = 2.0
    zoom_prob: float = 0.5
    flip_prob: float = 0.5


def sample_jitter(generators: list[torch.Generator], cfg: JitterConfig = JitterConfig()) -> Tensor:
    """One affine view per sample, ``(B, 2, 3)`` for ``F.affine_grid`` (normalised coordinates).

    The view is a crop of the reflect-padded image, zoomed by ``z`` in [1, max_zoom] with probability
    ``zoom_prob``, and flipped with ``flip_prob``. Sample ``b`` draws only from ``generators[b]``.
    """
    thetas = []
    for g in generators:
        u = torch.rand(5, generator=g, dtype=torch.float64).tolist()
        zoom = 1 + (cfg.max_zoom - 1) * u[1] if u[0] < cfg.zoom_prob else 1.0
        scale = 1 / zoom  # the view covers 1/zoom of the padded-and-zoomed extent
        # centre offsets: the view stays inside the image padded by max_pad on each side
        room = max(0.0, (1 + 2 * cfg.max_pad) - scale)
        tx, ty = (2 * u[2] - 1) * room, (2 * u[3] - 1) * room
        flip = -1.0 if u[4] < cfg.flip_prob else 1.0
        thetas.append([[scale * flip, 0.0, tx], [0.0, scale, ty]])
    return torch.tensor(thetas, dtype=torch.float32)


def apply_jitter(x: Tensor, theta: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """``x`` (B, C, H, W) seen through the views ``theta``; outside the image is reflected."""
    size = tuple(size or x.shape[-2:])
    grid = F.affine_grid(theta.to(x.device, x.dtype), [x.shape[0], x.shape[1], *size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def render_views(source: Tensor, theta: Tensor, size: tuple[int, int], max_pad: float) -> Tensor:
    """The views ``theta`` (V, 2, 3; zoom, shift and flip, no rotation) of ``source`` (1, 3, H, W) at ``size``,
    antialiased: each view is an area-averaged crop of the reflect-padded image (``roi_align``), so a source
    larger than ``size`` gives sharper zoomed views instead of aliasing. Inside the image and at 1:1 it equals
    ``apply_jitter``."""
    from torchvision.ops import roi_align

    H, W = source.shape[-2:]
    pad_y, pad_x = math.ceil(max_pad * H) + 1, math.ceil(max_pad * W) + 1
    padded = F.pad(source, (pad_x, pad_x, pad_y, pad_y), mode="reflect")
    sx, tx, sy, ty = theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2]
    boxes = torch.stack([
        torch.zeros_like(sx),
        (tx - sx.abs() + 1) / 2 * W + pad_x, (ty - sy.abs() + 1) / 2 * H + pad_y,
        (tx + sx.abs() + 1) / 2 * W + pad_x, (ty + sy.abs() + 1) / 2 * H + pad_y,
    ], dim=1).to(source)
    views = roi_align(padded, boxes, tuple(size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flipped = (sx < 0).to(source.device)
    return torch.where(flipped.view(-1, 1, 1, 1), views.flip(-1), views)


# ---- downsamplers -------------------------------------------------------------------------------------------

DOWNSAMPLERS: Registry[nn.Module] = Registry("downsampler")


def _to_cells(x: Tensor, low: tuple[int, int]) -> tuple[Tensor, int]:
    """``x`` resized so that each of the ``low`` cells is f x f pixels; returns it and f."""
    f = max(1, round(x.shape[-2] / low[0]))
    target = (low[0] * f, low[1] * f)
    if tuple(x.shape[-2:]) != target:
        x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
    return x, f


def _cell_softmax_pool(x: Tensor, logits: Tensor, f: int) -> Tensor:
    """Sum over each f x f cell of ``x`` weighted by the softmax of ``logits`` (B, 1, H, W) within the cell."""
    top = F.max_pool2d(logits, f)
    e = (logits - F.interpolate(top, scale_factor=f, mode="nearest")).exp()
    return F.avg_pool2d(x * e, f) / F.avg_pool2d(e, f)


class Downsampler(nn.Module):
    """``forward(x (B, C, H, W), low=(h, w)) -> (B, C, h, w)``, split in two so that the objective can jitter and
    project cheaply: ``saliency(x)`` is the per-pixel part (``None`` or ``(B, 1, H, W)``, computed before the
    jitter), ``pool(x, saliency, low)`` the per-cell softmax pooling (after it). The saliency, where there is one,
    is the 1x1 conv ``saliency_proj``: the objective relies on it being linear."""

    def saliency(self, x: Tensor) -> Tensor | None:
        return None

    def pool(self, x: Tensor, saliency: Tensor | None, low: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, low: tuple[int, int]) -> Tensor:
        return self.pool(x, self.saliency(x), low)


def _tiled(cell: Tensor, f: int, low: tuple[int, int]) -> Tensor:
    """A learned ``(m, m)`` map resized to one f x f cell and tiled over the ``low`` grid: ``(1, 1, h f, w f)``."""
    return F.interpolate(cell[None, None], size=(f, f), mode="bilinear", align_corners=False).repeat(1, 1, *low)


@DOWNSAMPLERS.register("simple")
class SimpleDownsampler(Downsampler):
    """One learned blur per cell, shared by all channels (softmax of logits; starts as a box filter)."""

    def __init__(self, dim: int, max_cell: int = 64):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(max_cell, max_cell))

    def pool(self, x, saliency, low):
        x, f = _to_cells(x, low)
        return _cell_softmax_pool(x, _tiled(self.logits, f, low), f)


@DOWNSAMPLERS.register("attention")
class AttentionDownsampler(Downsampler):
    """A saliency logit per pixel (1x1 conv) times a learned weight map plus a bias map; softmax per cell."""

    def __init__(self, dim: int, max_cell: int = 64):
        super().__init__()
        self.saliency_proj = nn.Conv2d(dim, 1, 1)
        self.weight = nn.Parameter(1 + 0.01 * torch.randn(max_cell, max_cell))
        self.bias = nn.Parameter(0.01 * torch.randn(max_cell, max_cell))

    def saliency(self, x):
        return self.saliency_proj(x)

    def pool(self, x, saliency, low):
        both, f = _to_cells(torch.cat([x, saliency], dim=1), low)
        x, saliency = both[:, :-1], both[:, -1:]
        return _cell_softmax_pool(x, saliency * _tiled(self.weight, f, low) + _tiled(self.bias, f, low), f)


# ---- the objective ------------------------------------------------------------------------------------------

def random_projection(generators: list[torch.Generator], dim: int, out_dim: int) -> Tensor:
    """``(B, dim, out_dim)`` Gaussian matrices with unit-norm columns, one per sample."""
    mats = torch.stack([torch.randn(dim, out_dim, generator=g) for g in generators])
    return mats / mats.norm(dim=1, keepdim=True)


def _rms(target: Tensor) -> Tensor:
    """Each sample's feature scale (detached): errors relative to it make the loss the same for any backbone."""
    return target.detach().square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-6)


def uncertainty_net(dim: int) -> nn.Conv2d:
    """The 1x1 conv predicting each target pixel's log-scale ``log s - 0.1``; ``s ~ exp(0.1)`` at the start, as FeatUp."""
    net = nn.Conv2d(dim, 1, 1)
    with torch.no_grad():
        net.weight.mul_(0.1)
        net.bias.mul_(0.1)
    return net


def gaussian_nll(err: Tensor, log_s: Tensor) -> Tensor:
    """Mean of ``err^2 / (2 s^2) + log s``: ``err`` (B, P, h, w) against one scale per pixel ``log_s`` (B, 1, h, w)."""
    return (err.square() / (2 * (2 * log_s).exp().clamp_min(1e-8)) + log_s).mean()


def view_error(hr_feats: Tensor, image: Tensor, backbone: nn.Module, views: int = 16, seed: int = 0,
               jitter: JitterConfig = JitterConfig(), source: Tensor | None = None) -> float:
    """Held-out multi-view reconstruction error of ``hr_feats`` (1, C, H, W), the features of ``image`` (1, 3, H, W).

    For ``views`` seeded jitters ``t``: ``|box(t(F_hr)) - backbone(t(x))|^2 / |backbone(t(x))|^2``, averaged. The
    box downsampler is fixed (a plain mean over each backbone cell), so every upsampler is judged by the same rule.
    With ``source`` (the same image at a higher resolution) the views ``t(x)`` are cut from it, so zoomed views
    show the detail that a closer look at the scene would.
    """
    total = 0.0
    with torch.no_grad():
        for v in range(views):
            theta = sample_jitter([generator(seed, 0xE7A1, v)], jitter)
            seen_image = apply_jitter(image, theta) if source is None else render_views(
                source, theta, tuple(image.shape[-2:]), jitter.max_pad)
            target = backbone(seen_image).float()
            seen, f = _to_cells(apply_jitter(hr_feats.float(), theta), tuple(target.shape[-2:]))
            pred = F.avg_pool2d(seen, f)
            total += float((pred - target).square().sum() / target.square().sum())
    return total / views


class MultiViewObjective(nn.Module):
    """The trainable parts of the objective around an upsampler: downsampler and uncertainty net."""

    loss_name = "Gaussian NLL, can be negative"

    def __init__(self, upsampler: nn.Module, dim: int, downsampler: str = "attention", projection_dim: int = 30):
        super().__init__()
        self.upsampler = upsampler
        self.downsampler = DOWNSAMPLERS.create(downsampler, dim=dim)
        self.scale_net = uncertainty_net(dim)
        self.projection_dim = min(projection_dim, dim)
        # project on the backbone grid, before upsampling, when that gives the same loss (see forward)
        self.project_first = bool(getattr(upsampler, "channel_shared", False))

    def forward(self, lr_feats: Tensor, image: Tensor, views: list[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
        """Mean loss over ``views``: each ``(theta, target (B, C, h, w), projection (B, C, P))``.

        Jitter, resizing and pooling are linear in the features and act on each channel alike, and the saliency
        is a 1x1 conv, so ``P^T down(t(F)) = down(t(P^T F))`` with the saliency of ``F`` jittered alongside: the
        jitter and the pooling run on P + 1 channels instead of C. When the upsampler's stages are channel-shared
        too (``project_first``; JBU with image-only guidance), the projections and the saliency weights are applied
        on the backbone grid, and only those V * P + 1 channels are upsampled. Same loss, a fraction of the work.
        """
        size = tuple(image.shape[-2:])
        projs = [proj.to(lr_feats.device, torch.float32) for _, _, proj in views]
        saliency_conv = getattr(self.downsampler, "saliency_proj", None)
        if self.project_first:
            x = self.upsampler.prepare(lr_feats)
            columns = projs + ([saliency_conv.weight.view(1, -1, 1).expand(len(x), -1, -1)] if saliency_conv else [])
            hr = self.upsampler.propagate(torch.einsum("bchw,bcp->bphw", x, torch.cat(columns, dim=2)), image, size)
            widths = [p.shape[2] for p in projs] + ([1] if saliency_conv else [])
            seen_views = list(hr.split(widths, dim=1))
            saliency = seen_views.pop() + saliency_conv.bias.view(1, 1, 1, 1) if saliency_conv else None
        else:
            hr = self.upsampler(lr_feats, image, size)
            saliency = self.downsampler.saliency(hr)
            seen_views = [torch.einsum("bchw,bcp->bphw", hr, proj.to(hr)) for proj in projs]
        total, error = hr.new_zeros(()), 0.0
        for (theta, target, _), proj, seen in zip(views, projs, seen_views):
            if saliency is not None:
                seen = torch.cat([seen, saliency], dim=1)
            seen = apply_jitter(seen, theta)
            if saliency is None:
                pred = self.downsampler.pool(seen, None, tuple(target.shape[-2:]))
            else:
                pred = self.downsampler.pool(seen[:, :-1], seen[:, -1:], tuple(target.shape[-2:]))
            err = (pred - torch.einsum("bchw,bcp->bphw", target, proj)) / _rms(target)
            total = total + gaussian_nll(err, self.scale_net(target) + 0.1)
            error += float(err.detach().square().mean())
        self.last_error = error / len(views)  # the mean squared error relative to the target's scale: comparable
        return total / len(views)
