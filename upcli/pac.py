"""Pixel-adaptive convolution layers (Su et al., CVPR 2019), called as ``layer(x, guidance)``.

    v'[p] = sum over taps q of  W[q - p] * K(f[p], f[q]) * v[q]  (+ b)

``W`` is the learned filter, ``f`` the guidance features, ``K`` the adapting kernel; with ``K == 1`` each layer
is its torch counterpart (``nn.Conv2d``, ``nn.ConvTranspose2d``, and ``nn.AvgPool2d`` for a normalised pool).

    conv = PacConv2d(64, 64, 5, padding=2)
    y = conv(x, guidance)                      # guidance (B, Cg, H, W): features, an image, ...

Kernels (``kernel_type``), from the squared guidance distance ``D = |f[q] - f~[p]|^2`` (``f~`` is ``f``, or ``f``
smoothed by ``smooth_kernel``):
* ``"gaussian"``: ``K = exp(-D / 2)``;
* ``"inv_{a}_{l}"``: ``K = a + (D + 1e-4) ** (l / 2)`` (detail-preserving pooling); ``_asym`` squares
  ``relu(f[q] - f~[p])`` instead; ``a`` and ``l`` are learned unless ``_fixed``.

``normalize_kernel`` divides K by its sum over the taps that land on real input samples (not the padding, and for
the transposed layer not the inserted zeros either), as PAC does.

Differences from PAC's release, on purpose: the transposed layer flips ``W`` as ``nn.ConvTranspose2d`` does (PAC's
does not), so it equals torch's layer at ``K == 1``; nothing k*k times the size of the input is made (the sums
run per tap in ``upcli.kernels``; the guidance distances per tap, recomputed in backward); ``kernel_gain``
(a learned factor on ``D``) lets a layer start exactly at ``K == 1`` and still learn, which ``hot_swap`` uses.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .kernels import pac_conv, pac_pool, pac_squared_distance, pac_tap_mask

__all__ = ["PacConv2d", "PacConvTranspose2d", "PacPool2d", "hot_swap", "parse_kernel_type"]

_INV = re.compile(r"^inv_(?P<a>[-+0-9.e]+)_(?P<l>[-+0-9.e]+)(?P<flags>(_asym|_fixed)*)$")
_SMOOTH = re.compile(r"^(none|gaussian|average_(?P<avg>\d+)|full_(?P<full>\d+))$")


def parse_kernel_type(kernel_type: str) -> dict:
    """``"gaussian"`` or ``"inv_{a}_{l}[_asym][_fixed]"`` -> ``{"kind", "alpha", "lam", "asym", "fixed"}``."""
    if kernel_type == "gaussian":
        return {"kind": "gaussian", "alpha": None, "lam": None, "asym": False, "fixed": True}
    match = _INV.match(kernel_type)
    if match is None:
        raise ValueError(f"kernel_type must be 'gaussian' or 'inv_{{alpha}}_{{lambda}}[_asym][_fixed]', "
                         f"got {kernel_type!r}")
    flags = match["flags"]
    return {"kind": "inv", "alpha": float(match["a"]), "lam": float(match["l"]), "asym": "_asym" in flags,
            "fixed": "_fixed" in flags}


class _PacBase(nn.Module):
    """The adapting kernel: its type, smoothing, normalisation, guidance branch and optional learned gain."""

    def __init__(self, kernel_size, stride, padding, dilation, kernel_type: str = "gaussian",
                 smooth_kernel: str = "none", normalize_kernel: bool = False,
                 guidance_branch: nn.Module | None = None, kernel_gain: float | None = None, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        if self.kernel_size[0] != self.kernel_size[1] or self.kernel_size[0] % 2 == 0:
            raise ValueError(f"PAC layers take odd square kernels, got kernel_size={kernel_size}")
        self.kernel_type, self.normalize_kernel = kernel_type, normalize_kernel
        spec = parse_kernel_type(kernel_type)
        self.kind, self.asym = spec["kind"], spec["asym"]
        self._inv_init = (spec["alpha"], spec["lam"])
        if self.kind == "inv":
            alpha, lam = torch.tensor(spec["alpha"], **factory), torch.tensor(spec["lam"], **factory)
            if spec["fixed"]:
                self.register_buffer("inv_alpha", alpha)
                self.register_buffer("inv_lambda", lam)
            else:
                self.inv_alpha, self.inv_lambda = nn.Parameter(alpha), nn.Parameter(lam)
        match = _SMOOTH.match(smooth_kernel)
        if match is None:
            raise ValueError(f"smooth_kernel must be none, gaussian, average_N or full_N, got {smooth_kernel!r}")
        self.smooth_kernel = smooth_kernel
        if smooth_kernel == "none":
            self.smooth = None
        elif smooth_kernel == "gaussian":
            g = torch.tensor([0.25, 0.5, 0.25], **factory)
            self.register_buffer("smooth", (g[:, None] * g[None, :])[None, None])
        elif match["avg"] or match["full"]:
            size = int(match["avg"] or match["full"])
            box = torch.full((1, 1, size, size), 1.0 / size**2, **factory)
            if match["full"]:
                self.smooth = nn.Parameter(box)
            else:
                self.register_buffer("smooth", box)
        self.guidance_branch = guidance_branch
        self._kernel_gain_init = kernel_gain
        self.kernel_gain = None if kernel_gain is None else nn.Parameter(torch.tensor(float(kernel_gain), **factory))

    def _init_filter(self, transposed: bool, in_channels: int, out_channels: int, bias: bool, shared_filters: bool,
                     device=None, dtype=None) -> None:
        """``weight`` (torch's layout: ``(out, in, k, k)``, ``(in, out, k, k)`` when ``transposed``; ``(1, 1, k, k)``
        with ``shared_filters``, one k x k filter for every channel) and ``bias``, then ``reset_parameters``."""
        if shared_filters and in_channels != out_channels:
            raise ValueError("shared_filters needs in_channels == out_channels")
        self.in_channels, self.out_channels, self.shared_filters = in_channels, out_channels, shared_filters
        self.transposed = transposed
        shape = (in_channels, out_channels) if transposed else (out_channels, in_channels)
        self._full_shape = (*shape, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(*((1, 1) if shared_filters else shape), *self.kernel_size,
                                               device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The kernel's own parameters back to their initial values; ``weight`` and ``bias`` drawn as
        ``nn.Conv2d`` / ``nn.ConvTranspose2d`` draw theirs. A shared filter is drawn as a one-channel layer's, its
        bias as the full layer's, in the order used since shared filters exist (full weight, bias, shared weight),
        so a seeded model keeps its initial values and random stream."""
        with torch.no_grad():
            if self.kind == "inv":
                self.inv_alpha.fill_(self._inv_init[0])
                self.inv_lambda.fill_(self._inv_init[1])
            if isinstance(self.smooth, nn.Parameter):
                self.smooth.fill_(1.0 / self.smooth.shape[-1] ** 2)
            if self.kernel_gain is not None:
                self.kernel_gain.fill_(self._kernel_gain_init)
        if getattr(self, "weight", None) is None:
            return
        full = self.weight
        if self.shared_filters:  # drawn and dropped: only the random stream needs it
            full = torch.empty(self._full_shape, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(full, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = nn.init._calculate_fan_in_and_fan_out(full)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        if self.shared_filters:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        k = self.kernel_size[0]
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1
                     for n, p, d, s in zip((H, W), self.padding, self.dilation, self.stride))

    def input_kernel(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        """For guidance at the input's resolution (conv, pool): ``K`` at the output pixels."""
        f = self.guidance_features(x, guidance)
        if f.shape[0] != x.shape[0] or f.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"guidance {tuple(f.shape)} must match the input {tuple(x.shape)} in B, H and W")
        return self.compute_kernel(f, self.output_size(*x.shape[-2:]), self.stride, self.padding, self.dilation)

    def guidance_features(self, x: Tensor, guidance: Tensor | None) -> Tensor:
        f = x if guidance is None else guidance
        return f if self.guidance_branch is None else self.guidance_branch(f)

    def compute_kernel(self, f: Tensor, out_size, stride, padding, dilation, real_taps: Tensor | None = None) -> Tensor:
        """``K (B, H_out, W_out, k, k)`` from guidance ``f`` laid over the taps (zero padding, as PAC).

        With ``normalize_kernel``, K is divided by its sum over the taps that land on real input samples:
        ``real_taps`` (``pac_tap_mask``), by default those of a conv over ``f``'s grid (the padding left out).
        """
        k = self.kernel_size[0]
        centre = None
        if self.smooth is not None:
            size = self.smooth.shape[-1]
            B, C, H, W = f.shape
            centre = F.conv2d(f.reshape(B * C, 1, H, W), self.smooth.to(f.dtype), padding=size // 2).view(B, C, H, W)
        D = pac_squared_distance(f, k, stride, padding, dilation, centre=centre, asym=self.asym)
        if tuple(D.shape[1:3]) != tuple(out_size):
            raise ValueError(f"out_size {tuple(out_size)} does not match the guidance: {tuple(D.shape[1:3])}")
        if self.kernel_gain is not None:  # kept >= 0, with a straight-through gradient so it can leave 0
            gain = self.kernel_gain
            D = D * (gain + (gain.clamp_min(0) - gain).detach())
        if self.kind == "gaussian":
            K = torch.exp(-0.5 * D)
        else:
            K = self.inv_alpha + (D + 1e-4) ** (self.inv_lambda / 2)
        if self.normalize_kernel:  # over the taps on real input samples only
            if real_taps is None:
                real_taps = pac_tap_mask(f.shape[-2:], k, stride, padding, dilation, device=f.device, dtype=f.dtype)
            K = K * real_taps
            K = K / K.sum((-2, -1), keepdim=True).clamp_min(1e-12)
        return K


class PacConv2d(_PacBase):
    """``nn.Conv2d`` with a pixel-adaptive kernel. ``shared_filters``: one k x k filter for every channel
    (``in_channels == out_channels``), run by ``pac_pool`` (the fused ``adaptive_conv`` at stride 1)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True, kernel_type: str = "gaussian", smooth_kernel: str = "none",
                 normalize_kernel: bool = False, shared_filters: bool = False,
                 guidance_branch: nn.Module | None = None, kernel_gain: float | None = None, device=None, dtype=None):
        super().__init__(kernel_size, stride, padding, dilation, kernel_type, smooth_kernel, normalize_kernel,
                         guidance_branch, kernel_gain, device, dtype)
        self._init_filter(False, in_channels, out_channels, bias, shared_filters, device, dtype)

    def forward(self, x: Tensor, guidance: Tensor | None = None) -> Tensor:
        K = self.input_kernel(x, guidance)
        if not self.shared_filters:
            return pac_conv(x, K.to(x.dtype), self.weight, self.bias, self.stride, self.padding, self.dilation)
        out = pac_pool(x, K * self.weight[0, 0], self.stride, self.padding, self.dilation)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, kernel_type={self.kernel_type!r}"
                + (", normalize_kernel=True" if self.normalize_kernel else "")
                + (", shared_filters=True" if self.shared_filters else ""))


class PacConvTranspose2d(_PacBase):
    """``nn.ConvTranspose2d`` with a pixel-adaptive kernel; the guidance is at the *output* resolution. ``W`` is
    flipped as torch's layer does, so ``K == 1`` gives ``nn.ConvTranspose2d`` with the same weight.

    ``normalize_kernel``: at each output pixel K is divided by its sum over the taps that land on real input
    samples, leaving out the inserted zeros and the padding, as PAC's layer does (its transposed ``nd2col`` mask);
    with ``K == 1`` and ``W == 1`` the layer averages the input samples that reach each pixel.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, output_padding=0,
                 dilation=1, bias: bool = True, kernel_type: str = "gaussian", smooth_kernel: str = "none",
                 normalize_kernel: bool = False, shared_filters: bool = False,
                 guidance_branch: nn.Module | None = None, kernel_gain: float | None = None, device=None, dtype=None):
        super().__init__(kernel_size, stride, padding, dilation, kernel_type, smooth_kernel, normalize_kernel,
                         guidance_branch, kernel_gain, device, dtype)
        self.output_padding = _pair(output_padding)
        self._init_filter(True, in_channels, out_channels, bias, shared_filters, device, dtype)

    def output_size(self, H: int, W: int) -> tuple[int, int]:
        k = self.kernel_size[0]
        return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, op in
                     zip((H, W), self.stride, self.padding, self.dilation, self.output_padding))

    def forward(self, x: Tensor, guidance: Tensor) -> Tensor:
        out_size = self.output_size(*x.shape[-2:])
        f = self.guidance_features(x, guidance)
        if f.shape[0] != x.shape[0] or tuple(f.shape[-2:]) != out_size:
            raise ValueError(f"guidance {tuple(f.shape)} must be at the output size {out_size} (batch {x.shape[0]})")
        k, d = self.kernel_size[0], self.dilation
        same = tuple(di * (k - 1) // 2 for di in d)  # K at stride 1 on the output grid
        geometry = dict(stride=self.stride, padding=self.padding, dilation=d, transposed=True,
                        output_padding=self.output_padding)
        real_taps = None
        if self.normalize_kernel:  # the input's samples, not the output grid: no inserted zeros, no padding
            real_taps = pac_tap_mask(x.shape[-2:], k, **geometry, device=f.device, dtype=f.dtype)
        K = self.compute_kernel(f, out_size, (1, 1), same, d, real_taps)
        if not self.shared_filters:
            return pac_conv(x, K.to(x.dtype), self.weight, self.bias, **geometry)
        out = pac_pool(x, K * self.weight[0, 0].flip(-1, -2), **geometry)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)


class PacPool2d(_PacBase):
    """``sum_q K * v[q]`` over each window (a K-weighted sum; with ``normalize_kernel`` a K-weighted average, which
    is ``nn.AvgPool2d(count_include_pad=False)`` at ``K == 1``).

    ``stride`` defaults to ``kernel_size``, as in ``nn.AvgPool2d`` / ``nn.MaxPool2d``, so ``PacPool2d(k)`` drops in
    for them as a downsampling pool. PAC's ``PacPool2d`` defaults to ``stride=1`` (a same-size filter, as its CRF
    and DPP uses need): pass ``stride=1`` for that.
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, kernel_type: str = "gaussian",
                 smooth_kernel: str = "none", normalize_kernel: bool = False,
                 guidance_branch: nn.Module | None = None, kernel_gain: float | None = None, device=None, dtype=None):
        super().__init__(kernel_size, kernel_size if stride is None else stride, padding, dilation, kernel_type,
                         smooth_kernel, normalize_kernel, guidance_branch, kernel_gain, device, dtype)

    def forward(self, x: Tensor, guidance: Tensor | None = None) -> Tensor:
        return pac_pool(x, self.input_kernel(x, guidance), self.stride, self.padding, self.dilation)


# ---- hot-swapping ---------------------------------------------------------------------------------------------

class _GuidanceSource:
    """The guidance of the current forward pass, captured by a hook on the model or one of its modules."""

    def __init__(self):
        self.value: Tensor | None = None

    def take_input(self, module, args) -> None:
        self.value = args[0]

    def take_output(self, module, args, output) -> None:
        self.value = output


class HotSwappedPacConv2d(PacConv2d):
    """A ``PacConv2d`` in place of an ``nn.Conv2d`` inside a model: its guidance comes from the model's own
    forward pass (resized to this layer's input), and it starts at ``K == 1`` (``kernel_gain = 0``)."""

    def __init__(self, conv: nn.Conv2d, source: _GuidanceSource, **pac_options):
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("hot_swap takes nn.Conv2d layers with groups=1, zero padding and numeric padding")
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         conv.dilation, bias=conv.bias is not None, kernel_gain=0.0, **pac_options)
        with torch.no_grad():
            self.weight.copy_(conv.weight)
            if conv.bias is not None:
                self.bias.copy_(conv.bias)
        self.to(conv.weight.device, conv.weight.dtype)
        self._source = source

    def forward(self, x: Tensor, guidance: Tensor | None = None) -> Tensor:
        if guidance is None:
            guidance = self._source.value
            if guidance is None:
                raise RuntimeError("hot-swapped PAC layer: no guidance captured in this forward pass")
            if guidance.shape[-2:] != x.shape[-2:]:
                guidance = F.interpolate(guidance, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return super().forward(x, guidance.to(x.dtype))


def hot_swap(model: nn.Module, layer_names: list[str], guidance: str = "input", **pac_options) -> list[str]:
    """Replace the ``nn.Conv2d`` layers ``layer_names`` of ``model`` (in place) by PAC layers that keep their
    weights and start as an exact no-op (``K == 1``: the model's output is unchanged); a learned gain per layer
    lets training turn the adaptation on. Guidance: ``"input"`` (the model's input) or the name of a module of
    ``model`` whose output is the guidance, resized to each layer's input. Returns the swapped names."""
    modules = dict(model.named_modules())
    source = _GuidanceSource()
    if guidance == "input":
        model.register_forward_pre_hook(source.take_input)
    elif guidance in modules:
        modules[guidance].register_forward_hook(source.take_output)
    else:
        raise ValueError(f"guidance must be 'input' or a module of the model, got {guidance!r}")
    for name in layer_names:
        conv = modules.get(name)
        if not isinstance(conv, nn.Conv2d):
            raise ValueError(f"{name!r} is not an nn.Conv2d of the model")
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, attr, HotSwappedPacConv2d(conv, source, **pac_options))
    return list(layer_names)
