"""ZSSR (Shocher et al., CVPR 2018): a small CNN trained on the test image alone.

    for it in range(max_iters):
        father = augmented crop of the LR image         # rotations/mirrors only if the degradation allows them
        son    = degradation(father)                    # made exactly as the LR image was made
        loss   = L1(net(upscale(son)), father); Adam step
        every 50 its: reconstruction error of the whole image; every 60: fit a line to the last ones,
                      divide the learning rate by 10 when it no longer falls clearly; stop below 9e-6
    sr = median over the 8 rotations/mirrors of back-projected net(upscale(lr)), back-projected again

:func:`super_resolve` (the test-time ensemble and back-projection) is shared with MZSR and the feed-forward path.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import ZSSRConfig
from ..training import generator
from .degrade import Degradation, upscale
from .net import SRNet, zssr_net



@dataclass
class ZSSRResult:
    sr: torch.Tensor
    net: SRNet
    iterations: int
    seconds: float
    losses: list = field(default_factory=list)
    reconstruction: list = field(default_factory=list)  # (iteration, mse)


# ---- training pairs ----------------------------------------------------------------------------------------

def father_crop(image: torch.Tensor, size: tuple[int, int], g: torch.Generator, cfg: ZSSRConfig,
                rotate: bool) -> torch.Tensor:
    """One augmented HR "father" (1, 3, *size) cut from ``image`` (1, 3, H, W).

    ZSSR's mix: 5% a plain crop, 45% a crop turned by k*90 degrees and mirrored, 50% an affine warp (scale
    U[min_scale, 1], anisotropy, shear, any rotation and a mirror) sampled bicubically."""
    h, w = image.shape[-2:]
    u = torch.rand(8, generator=g, dtype=torch.float64).tolist()
    n = torch.randn(3, generator=g, dtype=torch.float64).tolist()
    if u[0] < 0.5:  # integer crop
        top = int(u[1] * (h - size[0] + 1))
        left = int(u[2] * (w - size[1] + 1))
        crop = image[..., top:top + size[0], left:left + size[1]]
        if u[0] >= 0.05 and rotate:
            turns = int(u[3] * 4) if size[0] == size[1] else 2 * int(u[3] * 2)
            crop = crop.rot90(turns, (-2, -1))
            crop = crop.flip(-1) if u[4] < 0.5 else crop
        return crop
    scale = cfg.min_scale + (1 - cfg.min_scale) * u[1]
    sx, sy = scale * (1 + 0.25 * n[0] / 2), scale * (1 - 0.25 * n[0] / 2)
    theta = 2 * math.pi * u[2] if rotate else 0.0
    shear = 0.1 * n[1] if rotate else 0.0
    mirror = -1.0 if rotate and u[3] < 0.5 else 1.0
    c, s = math.cos(theta), math.sin(theta)
    # output offset (px) -> source offset (px): rotate(shear(scale^-1(mirror(offset))))
    a = torch.tensor([[c, -s], [s, c]], dtype=torch.float64) @ torch.tensor([[1, shear], [0, 1]], dtype=torch.float64)
    a = a @ torch.diag(torch.tensor([mirror / sx, 1 / sy], dtype=torch.float64))
    reach = torch.tensor([size[1], size[0]], dtype=torch.float64) / 2
    extent = (a.abs() @ reach).tolist()  # half-size of the sampled area in the source, x and y
    cx = extent[0] + (w - 2 * extent[0]) * u[4] if w > 2 * extent[0] else w / 2
    cy = extent[1] + (h - 2 * extent[1]) * u[5] if h > 2 * extent[1] else h / 2
    # normalised coordinates (align_corners=False): x_n = (2 x + 1) / W - 1 with x the pixel index
    ys = torch.arange(size[0], dtype=torch.float64) - (size[0] - 1) / 2
    xs = torch.arange(size[1], dtype=torch.float64) - (size[1] - 1) / 2
    oy, ox = torch.meshgrid(ys, xs, indexing="ij")
    src = torch.stack([ox, oy], -1) @ a.T
    gx = (2 * (src[..., 0] + cx)) / w - 1
    gy = (2 * (src[..., 1] + cy)) / h - 1
    grid = torch.stack([gx, gy], -1)[None].to(image.dtype)
    out = F.grid_sample(image, grid.to(image.device), mode="bicubic", padding_mode="reflection", align_corners=False)
    return out.clamp(0, 1)


def crop_size(image_size: tuple[int, int], crop: int, scale: int) -> tuple[int, int]:
    """Fathers as large as ``crop`` but within the image, multiples of the scale."""
    return tuple(max(scale, min(crop, n) // scale * scale) for n in image_size)


# ---- test time ---------------------------------------------------------------------------------------------

def back_project(sr: torch.Tensor, lr: torch.Tensor, degradation: Degradation, iters: int) -> torch.Tensor:
    """``sr += upscale(lr - degradation(sr))``, ``iters`` times: makes the output consistent with its input."""
    for _ in range(iters):
        sr = (sr + upscale(lr - degradation(sr), sr.shape[-2:])).clamp(0, 1)
    return sr


def run_tiled(net: SRNet, x: torch.Tensor, tile: int = 512) -> torch.Tensor:
    """``net(x)`` in ``tile``-px tiles with a halo as wide as the network's reach: the same result, bounded memory."""
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return net(x)
    halo = net.config["depth"]
    out = torch.empty_like(x)
    for top in range(0, h, tile):
        for left in range(0, w, tile):
            t0, l0 = max(top - halo, 0), max(left - halo, 0)
            b1, r1 = min(top + tile + halo, h), min(left + tile + halo, w)
            y = net(x[..., t0:b1, l0:r1])
            th, tw = min(tile, h - top), min(tile, w - left)
            out[..., top:top + th, left:left + tw] = y[..., top - t0:top - t0 + th, left - l0:left - l0 + tw]
    return out


@torch.no_grad()
def super_resolve(net: SRNet, lr: torch.Tensor, degradation: Degradation, ensemble: bool = False,
                  back_projection: int = 0) -> torch.Tensor:
    """``net`` applied to ``lr`` (1, 3, h, w): with ``ensemble``, the median over the 8 rotations and mirrors,
    each back-projected, then the median back-projected again (ZSSR's test time)."""
    size = (lr.shape[-2] * degradation.scale, lr.shape[-1] * degradation.scale)
    if not ensemble:
        return back_project(run_tiled(net, upscale(lr, size)).clamp(0, 1), lr, degradation, back_projection)
    outputs = []
    for k in range(4):
        for mirror in (False, True):
            x = lr.rot90(k, (-2, -1))
            x = x.flip(-1) if mirror else x
            y = run_tiled(net, upscale(x, (x.shape[-2] * degradation.scale, x.shape[-1] * degradation.scale)))
            y = y.flip(-1) if mirror else y
            y = y.rot90(-k, (-2, -1))
            outputs.append(back_project(y.clamp(0, 1), lr, degradation, back_projection))
    fused = torch.stack(outputs).median(0).values
    return back_project(fused, lr, degradation, back_projection)


# ---- training ----------------------------------------------------------------------------------------------

def reconstruction_error(net: SRNet, lr: torch.Tensor, degradation: Degradation) -> float:
    with torch.no_grad():
        son = degradation(lr)
        return F.mse_loss(run_tiled(net, upscale(son, lr.shape[-2:])), lr).item()


def _slope_is_flat(points: list[tuple[int, float]], ratio: float) -> bool:
    """ZSSR's test: fit a line to the errors; flat when its fall is within ``ratio`` of its uncertainty."""
    x = np.array([p[0] for p in points], dtype=np.float64)
    y = np.array([p[1] for p in points], dtype=np.float64)
    (slope, _), cov = np.polyfit(x, y, 1, cov=True)
    return -ratio * slope < math.sqrt(max(cov[0, 0], 0.0))


def zssr(lr: torch.Tensor, degradation: Degradation, cfg: ZSSRConfig = ZSSRConfig(), net: SRNet | None = None,
         progress=None) -> ZSSRResult:
    """Train a network on ``lr`` (1, 3, h, w) in [0, 1] alone and super-resolve it by ``degradation.scale``."""
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    net = (net or zssr_net()).to(lr.device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    rate, last_change = cfg.learning_rate, 0
    rotate = degradation.symmetric
    size = crop_size(tuple(lr.shape[-2:]), cfg.crop, degradation.scale)
    losses, recon = [], []
    it = 0
    for it in range(cfg.max_iters):
        g = generator(cfg.seed, it)
        with torch.no_grad():
            father = father_crop(lr, size, g, cfg, rotate)
            son = degradation(father)
            if cfg.noise_std:
                son = (son + cfg.noise_std * torch.randn(son.shape, generator=g).to(son)).clamp(0, 1)
            son_up = upscale(son, father.shape[-2:])
        loss = F.l1_loss(net(son_up), father)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress(it + 1, cfg.max_iters)
        if (it + 1) % cfg.test_every == 0:
            recon.append((it + 1, reconstruction_error(net, lr, degradation)))
        if (it + 1) % cfg.policy_every == 0 and it + 1 - last_change >= cfg.min_iters:
            window = [p for p in recon if p[0] > it + 1 - cfg.min_iters]
            if len(window) >= 4 and _slope_is_flat(window, cfg.change_ratio):
                rate /= 10
                last_change = it + 1
                if rate < cfg.min_learning_rate:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = rate
    net.eval()
    ensemble = rotate if cfg.ensemble is None else cfg.ensemble
    bp = (10 if rotate else 2) if cfg.back_projection is None else cfg.back_projection
    sr = super_resolve(net, lr, degradation, ensemble=ensemble, back_projection=bp)
    return ZSSRResult(sr=sr, net=net, iterations=it + 1, seconds=time.perf_counter() - start, losses=losses,
                      reconstruction=recon)
