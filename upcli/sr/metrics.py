"""PSNR and SSIM on the Y channel, as SR papers report them (the MATLAB script of Kim et al.)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_y(rgb: torch.Tensor) -> torch.Tensor:
    """Luma of BT.601 YCbCr in [16, 235] (MATLAB ``rgb2ycbcr``) from RGB (..., 3, H, W) in [0, 1]."""
    r, g, b = rgb.double().unbind(-3)
    return 16 + 65.481 * r + 128.553 * g + 24.966 * b


def _prepare(sr: torch.Tensor, hr: torch.Tensor, shave: int) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit images, Y channel, ``shave`` pixels cut from each border."""
    if sr.shape != hr.shape:
        raise ValueError(f"SR {tuple(sr.shape)} and HR {tuple(hr.shape)} differ in size")
    quant = lambda x: x.double().mul(255).round().clamp(0, 255).div(255)  # noqa: E731
    y_sr, y_hr = to_y(quant(sr)), to_y(quant(hr))
    if shave:
        y_sr, y_hr = y_sr[..., shave:-shave, shave:-shave], y_hr[..., shave:-shave, shave:-shave]
    return y_sr, y_hr


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, shave: int) -> float:
    y_sr, y_hr = _prepare(sr, hr, shave)
    mse = (y_sr - y_hr).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0**2 / mse)).item()


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, shave: int) -> float:
    """SSIM with an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, over the valid region (Wang et al.)."""
    y_sr, y_hr = _prepare(sr, hr, shave)
    x, y = y_sr.reshape(1, 1, *y_sr.shape[-2:]), y_hr.reshape(1, 1, *y_hr.shape[-2:])
    coords = torch.arange(11, dtype=torch.float64) - 5
    g = torch.exp(-coords**2 / (2 * 1.5**2))
    window = (g[:, None] * g[None]) / (g.sum() ** 2)
    window = window[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    xx, yy, xy = F.conv2d(x * x, window), F.conv2d(y * y, window), F.conv2d(x * y, window)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim.mean().item()
