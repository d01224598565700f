"""Degradations for super-resolution: MATLAB's bicubic ``imresize``, Gaussian blur kernels, subsampling.

Images are float tensors ``(B, C, H, W)`` in [0, 1]. Two ways down by an integer scale ``s``:

- ``bicubic``: MATLAB ``imresize(x, 1/s)`` (antialiased Keys cubic, height pass first), after the blur if any;
- ``direct``: correlate with the kernel (symmetric padding, no flip), then keep pixels ``[0::s, 0::s]``.

``Degradation(kernel, subsample, scale)`` bundles one of them; ZSSR, MZSR, back-projection and the benchmark
all degrade through it, so the son of a test image is made exactly as the test image was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UsageError

SUBSAMPLINGS = ("bicubic", "direct")


# ---- MATLAB imresize ---------------------------------------------------------------------------------------

def _cubic(x: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's "bicubic")."""
    ax = x.abs()
    ax2, ax3 = ax * ax, ax * ax * ax
    near = 1.5 * ax3 - 2.5 * ax2 + 1
    far = -0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2
    return torch.where(ax <= 1, near, torch.where(ax <= 2, far, torch.zeros_like(ax)))


def mirror(idx: torch.Tensor, length: int) -> torch.Tensor:
    """Indices outside ``[0, length)`` folded back by edge-including mirroring (numpy "symmetric", MATLAB)."""
    period = 2 * length
    idx = idx.remainder(period)
    return torch.where(idx < length, idx, period - 1 - idx)


def symmetric_indices(length: int, left: int, right: int) -> torch.Tensor:
    """Indices of a length-``length`` axis padded by ``left`` and ``right`` mirrored entries."""
    return mirror(torch.arange(-left, length + right), length)


def resize_matrix(in_len: int, out_len: int, scale: float, antialias: bool = True) -> torch.Tensor:
    """The ``(out_len, in_len)`` float64 matrix of MATLAB's bicubic imresize along one axis."""
    shrink = scale < 1 and antialias
    width = 4.0 / scale if shrink else 4.0
    x = torch.arange(1, out_len + 1, dtype=torch.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinate of each output pixel
    left = torch.floor(u - width / 2)
    taps = math.ceil(width) + 2
    index = left[:, None] + torch.arange(taps, dtype=torch.float64)[None]  # 1-based
    dist = u[:, None] - index
    weights = scale * _cubic(scale * dist) if shrink else _cubic(dist)
    weights = weights / weights.sum(1, keepdim=True)
    clamped = (index.long() - 1).clamp(0, in_len - 1)  # replicated edges: this matches the benchmarks' LR files
    matrix = torch.zeros(out_len, in_len, dtype=torch.float64)
    matrix.scatter_add_(1, clamped, weights)
    return matrix


def imresize(x: torch.Tensor, scale: float | tuple[float, float] | None = None,
             size: tuple[int, int] | None = None, quantize: bool = False) -> torch.Tensor:
    """MATLAB ``imresize(x, scale)`` or ``imresize(x, [H W])``, bicubic and antialiased.

    ``x`` is ``(..., H, W)`` float in [0, 1]. The axis with the smaller scale goes first (height on a tie), as in
    MATLAB. Edges are replicated, as in the MATLAB release that made the standard benchmark LR images (Set5,
    Set14, BSD100: 99.9999% of pixels within one grey level; mirrored edges miss up to 11 levels on the border
    rows). ``quantize`` rounds to 1/255 after each pass, as MATLAB does for uint8 images: with it the
    benchmarks' stored LR images are reproduced."""
    h, w = x.shape[-2:]
    if size is None:
        if scale is None:
            raise ValueError("give scale or size")
        sh, sw = (scale, scale) if isinstance(scale, (int, float)) else scale
        size = (math.ceil(h * sh), math.ceil(w * sw))
    else:
        sh, sw = (size[0] / h, size[1] / w) if scale is None else ((scale, scale) if isinstance(scale, (int, float)) else scale)
    order = sorted([(sh, 0), (sw, 1)])
    dtype = x.dtype
    out = x.double() if quantize else x
    for s, axis in order:
        matrix = resize_matrix(out.shape[-2 + axis], size[axis], s).to(out.device, out.dtype)
        out = torch.matmul(matrix, out) if axis == 0 else torch.matmul(out, matrix.T)
        if quantize:
            out = out.mul(255).round().clamp(0, 255).div(255)
    return out.to(dtype)


# ---- kernels -----------------------------------------------------------------------------------------------

def gaussian_kernel(size: int, var1: float, var2: float | None = None, theta: float = 0.0) -> torch.Tensor:
    """A ``size``x``size`` Gaussian, normalised to sum 1, with covariance ``R(theta) diag(var1, var2) R(theta)^T``.

    The variances are MZSR's eigenvalues lambda (so ``var1 = var2 = 2.0`` is MZSR's g_2.0, sigma = 1.41);
    ``theta`` is in radians; x runs along the width."""
    var2 = var1 if var2 is None else var2
    c, s = math.cos(theta), math.sin(theta)
    rot = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    cov = rot @ torch.diag(torch.tensor([var1, var2], dtype=torch.float64)) @ rot.T
    centre = (size - 1) / 2
    coords = torch.arange(size, dtype=torch.float64) - centre
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    points = torch.stack([xx, yy], -1)
    quad = torch.einsum("...i,ij,...j->...", points, torch.linalg.inv(cov), points)
    kernel = torch.exp(-0.5 * quad)
    return (kernel / kernel.sum()).float()


def random_kernel(scale: float, g: torch.Generator, size: int = 15) -> torch.Tensor:
    """MZSR's task kernel: theta ~ U[0, pi), lambda1 ~ U[1, 2.5 s], lambda2 ~ U[1, lambda1]."""
    u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
    theta = math.pi * u[0]
    var1 = 1 + (2.5 * scale - 1) * u[1]
    var2 = 1 + (var1 - 1) * u[2]
    return gaussian_kernel(size, var1, var2, theta)


def load_kernel(path: str | Path) -> torch.Tensor:
    """A 2-D kernel from ``.npy`` or ``.mat`` (the first 2-D numeric variable, e.g. ``Kernel`` or ``kernel``)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"kernel file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        elif path.suffix.lower() == ".mat":
            array = _mat_kernel(path)
        else:
            raise UsageError(f"kernel file {path}: expected .npy or .mat")
    except (OSError, ValueError, EOFError) as e:
        raise UsageError(f"kernel file {path}: unreadable ({e or type(e).__name__})") from None
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or min(array.shape) < 1 or not np.isfinite(array).all():
        raise UsageError(f"kernel file {path}: expected a finite 2-D array, got shape {array.shape}")
    if array.sum() <= 0:
        raise UsageError(f"kernel file {path}: the kernel sums to {array.sum():g}; it must be positive")
    return torch.from_numpy(array / array.sum()).float()


def _mat_kernel(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        content = loadmat(path)
    except NotImplementedError:  # MATLAB v7.3 files are HDF5
        import h5py

        with h5py.File(path, "r") as f:
            content = {k: np.asarray(v).T for k, v in f.items() if isinstance(v, h5py.Dataset)}
    except Exception as e:  # scipy's MatReadError and friends: not a MATLAB file
        raise ValueError(f"{type(e).__name__}: {e}") from None
    for name in ("Kernel", "kernel", *sorted(content)):
        value = content.get(name)
        if not name.startswith("__") and isinstance(value, np.ndarray) and value.ndim == 2 and value.dtype.kind in "fiu":
            return value
    raise ValueError("no 2-D numeric variable in the file")


# ---- degradation -------------------------------------------------------------------------------------------

def correlate(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``scipy.ndimage.correlate(x, kernel, mode="reflect")`` per channel (no flip, edge-including mirror)."""
    kh, kw = kernel.shape
    h, w = x.shape[-2:]
    rows = symmetric_indices(h, kh // 2, kh - 1 - kh // 2).to(x.device)
    cols = symmetric_indices(w, kw // 2, kw - 1 - kw // 2).to(x.device)
    padded = x.index_select(-2, rows).index_select(-1, cols)
    c = x.shape[-3]
    weight = kernel.to(x.device, x.dtype).expand(c, 1, kh, kw)
    return F.conv2d(padded, weight, groups=c)


@dataclass(frozen=True)
class Degradation:
    """How the LR image was made from the HR one: optional blur ``kernel``, then ``subsample`` by ``scale``."""

    scale: int = 2
    kernel: torch.Tensor | None = None
    subsample: str = "bicubic"

    def __post_init__(self):
        if self.subsample not in SUBSAMPLINGS:
            raise UsageError(f"subsampling must be one of {', '.join(SUBSAMPLINGS)}, got {self.subsample!r}")
        if self.scale not in (2, 3, 4):
            raise UsageError(f"--scale must be 2, 3 or 4, got {self.scale}")

    @property
    def symmetric(self) -> bool:
        """Whether rotating or mirroring an image commutes with this degradation (ZSSR's augmentation)."""
        if self.subsample == "direct":
            return False
        k = self.kernel
        return k is None or bool(torch.allclose(k, k.T, atol=1e-6) and torch.allclose(k, k.flip(0), atol=1e-6)
                                 and torch.allclose(k, k.flip(1), atol=1e-6))

    def lr_size(self, hr_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(math.ceil(n / self.scale) for n in hr_size)

    def __call__(self, hr: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """The LR image of ``hr``; ``quantize`` rounds to 8 bits as a saved image would be."""
        x = hr if self.kernel is None else correlate(hr, self.kernel)
        if self.subsample == "direct":
            x = x[..., :: self.scale, :: self.scale]
            return x.mul(255).round().clamp(0, 255).div(255) if quantize else x
        return imresize(x, 1 / self.scale, size=self.lr_size(hr.shape[-2:]), quantize=quantize)

    def describe(self) -> str:
        blur = "no blur" if self.kernel is None else f"{self.kernel.shape[0]}x{self.kernel.shape[1]} kernel"
        return f"x{self.scale}, {blur}, {self.subsample} subsampling"


def upscale(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic interpolation to ``size`` (MATLAB imresize): the input of the SR networks."""
    return imresize(x, size=size)


KERNEL_SPEC = re.compile(r"^(?:(?P<bicubic>bicubic)|gauss:(?P<sigma>[\d.eE+-]+)|"
                         r"aniso:(?P<v1>[\d.eE+-]+),(?P<v2>[\d.eE+-]+),(?P<theta>[\d.eE+-]+))$")


MAX_SIGMA = 25.0  # px: a wider blur leaves nothing to super-resolve, and its kernel would be huge


def kernel_size_for(var: float) -> int:
    """An odd kernel size holding +-4 sigma of the widest axis, at least 15 (MZSR's training size)."""
    return max(15, 2 * math.ceil(4 * math.sqrt(var)) + 1)


def parse_kernel(spec: str) -> torch.Tensor | None:
    """``bicubic`` (no blur: None), ``gauss:SIGMA`` (isotropic, standard deviation in px),
    ``aniso:VAR1,VAR2,THETA`` (variances in px^2, angle in degrees) or a ``.npy``/``.mat`` file."""
    match = KERNEL_SPEC.match(spec.strip())
    if match is None:
        if Path(spec).suffix.lower() in (".npy", ".mat"):
            return load_kernel(spec)
        raise UsageError(f"--kernel {spec!r}: expected bicubic, gauss:SIGMA, aniso:VAR1,VAR2,THETA_DEGREES, or a .npy/.mat file")
    try:
        if match["bicubic"]:
            return None
        if match["sigma"] is not None:
            sigma = float(match["sigma"])
            if not 0 < sigma <= MAX_SIGMA:
                raise ValueError
            return gaussian_kernel(kernel_size_for(sigma * sigma), sigma * sigma)
        v1, v2, theta = float(match["v1"]), float(match["v2"]), float(match["theta"])
        if not (0 < v1 <= MAX_SIGMA ** 2 and 0 < v2 <= MAX_SIGMA ** 2 and math.isfinite(theta)):
            raise ValueError
        return gaussian_kernel(kernel_size_for(max(v1, v2)), v1, v2, math.radians(theta))
    except ValueError:
        raise UsageError(f"--kernel {spec!r}: sigma must be in (0, {MAX_SIGMA}] px and variances in "
                         f"(0, {MAX_SIGMA ** 2}] px^2") from None
