"""Learned joint bilateral upsampling (FeatUp's JBU stack, rebuilt on ``upcli.kernels``).

One stage maps features ``(B, C, h, w)`` to ``(B, C, H, W)`` guided by the image at ``(H, W)``:

    up      = bicubic(feats, (H, W))
    keys    = MLP(guidance)                                   per-pixel keys, (B, key_dim, H, W)
    logits  = exp(t) * <key(p), key(q)> - |p - q|^2 / (2 s^2)   for the k x k neighbours q of p
    kernel  = softmax over the k x k taps                     range x spatial, normalised
    out     = adaptive_conv(up, kernel)                       one fused op, no unfold

``t`` (temperature) and ``s`` (spatial sigma, in window-normalised units as in FeatUp) are learned. The
logits come from ``neighbour_logits`` and the aggregation from ``adaptive_conv_bicubic`` (which, at inference on
CPU, makes the bicubic rows inside the kernel instead of storing ``up``): both run without unfolding
the keys or the features, and their filter gradients reach all k*k taps (FeatUp's CUDA op reaches 7 of 49).

The stack (:class:`JBUStack`) runs stages of about 2x from the backbone's grid to *exactly* the requested size,
any aspect ratio: ``n = round(log2(ratio))`` stages with sizes ``round(h * (H / h) ** (s / n))``. Stage ``s`` uses
layer ``min(s, layers - 1)``. ``radius`` is one for every layer (3: FeatUp's 7x7) or one per layer; the finest
stages hold most of the pixels, so small kernels there are most of the speed (the shipped efficientnet-lite0 stack
uses 3, 3, 3, 2, 1: the same probe mIoU as 3 everywhere at 1.7x the speed).

A zero-initialised 1x1 residual corrects the features. FeatUp applies it at the output; here it runs on the
backbone grid, before the stages, which costs (H W) / (h w) times less: at 448^2 and C = 320, 0.04 instead of
41 GFLOP. With image-only guidance (``rgb``, ``conv``) the stages are linear and treat
every channel alike with weights that sum to one, so both places compute the same function (exactly so without
``fixup``); with ``features`` guidance the correction also feeds the keys. No dropout: eval and train compute the
same function, and inference is deterministic.

``guidance`` (measured on the CamVid probe, see the README): ``"rgb"`` (the default) feeds the key MLP the bare RGB
pixel, as FeatUp; ``"conv"`` a 3x3 conv of the image; ``"features"`` the RGB pixel and a learned 16-d projection of
the stage's (RMS-normalised) features, so the range term also sees where the features change. The projection is
linear, so it runs on the stage's input grid and is bicubically upsampled with the features (the same numbers, at
a fraction of the cost). ``fixup`` adds FeatUp's unnormalised correction of the kernel,
``0.1 * MLP([kernel, guidance])``. Neither ``conv``, ``features`` nor ``fixup`` beat ``rgb`` on the full probe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import adaptive_conv_bicubic, neighbour_logits
from . import register_upsampler
from .base import LearnedUpsampler, guidance_at, stage_sizes

MAX_RADIUS = 7  # 15x15 windows, far past FeatUp's 7x7 (the kernels themselves take k up to 63)


def stage_radii(radius, layers: int) -> list[int]:
    """The kernel radius of each layer: ``radius`` is one number for all, or one per layer (coarsest first)."""
    radii = [radius] * layers if isinstance(radius, int) else [int(r) for r in radius]
    if len(radii) != layers or not all(0 <= r <= MAX_RADIUS for r in radii):
        raise ValueError(f"radius must be a number in 0..{MAX_RADIUS} or one per layer ({layers}), got {radius!r}")
    return radii


def softmax_taps(logits: Tensor) -> Tensor:
    """Softmax over the last dim (the taps). Without autograd, on CPU, a window of fewer than 16 taps goes through
    three vectorised passes instead: torch's CPU softmax over so short a last dim is per row, about 4x slower
    (448^2 x 9 taps: 20 ms against 4.5 ms on 2 cores)."""
    if logits.device.type != "cpu" or logits.shape[-1] >= 16 or (torch.is_grad_enabled() and logits.requires_grad):
        return torch.softmax(logits, dim=-1)
    e = (logits - logits.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


GUIDANCE_KINDS = ("rgb", "conv", "features")
FEATURE_KEYS = 16  # dims of the feature projection in guidance="features"


class JBULayer(nn.Module):
    """One learned joint bilateral stage: ``(feats (B, C, h, w), guidance (B, 3, H, W)) -> (B, C, H, W)``."""

    def __init__(self, key_dim: int = 32, radius: int = 3, guidance: str = "rgb", fixup: bool = False,
                 dim: int | None = None):
        super().__init__()
        if guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance must be one of {', '.join(GUIDANCE_KINDS)}, got {guidance!r}")
        if guidance == "features" and dim is None:
            raise ValueError("guidance='features' needs the feature dim")
        self.radius, self.kernel_size = radius, 2 * radius + 1
        taps = self.kernel_size**2
        in_dim = {"rgb": 3, "conv": 16, "features": 3 + FEATURE_KEYS}[guidance]
        self.guidance_stem = nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect") if guidance == "conv" else None
        self.feature_proj = nn.Conv2d(dim, FEATURE_KEYS, 1) if guidance == "features" else None
        self.range_proj = nn.Sequential(nn.Conv2d(in_dim, key_dim, 1), nn.GELU(), nn.Conv2d(key_dim, key_dim, 1))
        self.range_temp = nn.Parameter(torch.zeros(()))
        # sigma is in window units (the window spans [-1, 1]), as FeatUp, which starts it at 1.0 (a 7x7 blur of
        # sigma ~3 px per stage, ~45 px over five stages). It starts here at ~0.75 px whatever the radius (0.25 for
        # 7x7), near plain bicubic upsampling: measured on CamVid (see the note of issue 4), untrained, 28.9 vs 33.2
        # mIoU, bilinear 34.5. The same 0.25 for a 3x3 window would be 0.25 px: the kernel starts as the identity,
        # with vanishing gradients, and stays there.
        self.sigma_spatial = nn.Parameter(torch.full((), 0.75 / max(radius, 1)))
        self.fixup_proj = (nn.Sequential(nn.Conv2d(taps + 3, taps, 1), nn.GELU(), nn.Conv2d(taps, taps, 1))
                           if fixup else None)
        grid = torch.linspace(-1, 1, self.kernel_size)
        self.register_buffer("dist2", (grid[:, None] ** 2 + grid[None, :] ** 2).reshape(taps), persistent=False)

    def padding(self, size) -> str:
        """Reflect, as FeatUp; maps too small to reflect (a few pixels) replicate."""
        return "reflect" if min(size) > self.radius else "replicate"

    def kernel(self, guidance: Tensor) -> Tensor:
        """Per-pixel weights ``(B, H, W, k, k)`` from the normalised guidance ``(B, 3 [+ 16], H, W)``."""
        g = guidance if self.guidance_stem is None else F.gelu(self.guidance_stem(guidance))
        keys = self.range_keys(g)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        spatial = -self.dist2 / (2 * self.sigma_spatial.square().clamp_min(1e-6))
        # (B, H, W, k*k) in memory: the softmax runs over contiguous taps, and the result is the kernel's layout
        logits = neighbour_logits(keys, self.kernel_size, self.padding(keys.shape[-2:])).permute(0, 2, 3, 1)
        weights = softmax_taps(torch.addcmul(spatial, logits, temp))
        if self.fixup_proj is not None:
            w = weights.permute(0, 3, 1, 2)
            weights = (w + 0.1 * self.fixup_proj(torch.cat([w, guidance[:, :3]], dim=1))).permute(0, 2, 3, 1)
        B, H, W, _ = weights.shape
        return weights.reshape(B, H, W, self.kernel_size, self.kernel_size)

    def range_keys(self, g: Tensor) -> Tensor:
        """``range_proj(g)`` (two 1x1 convs) as per-pixel matmuls: ``(B, Cin, H, W) -> (B, key_dim, H, W)``.

        The pixels are rows of the first product and columns of the second, whose transposed operand BLAS reads
        in place, so the keys come out NCHW (what ``neighbour_logits`` reads) with no transposing copy of them."""
        first, act, second = self.range_proj
        B, C, H, W = g.shape
        hidden = act(F.linear(g.permute(0, 2, 3, 1).reshape(B, H * W, C), first.weight.flatten(1), first.bias))
        w2 = second.weight.flatten(1).expand(B, -1, -1)
        return torch.baddbmm(second.bias[None, :, None], w2, hidden.transpose(1, 2)).view(B, -1, H, W)

    def forward(self, feats: Tensor, guidance: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
        size = tuple(guidance.shape[-2:])
        if self.feature_proj is not None:
            rms = feats.float().square().mean((1, 2, 3), keepdim=True).add(1e-12).sqrt()
            keys = self.feature_proj(feats.float() / rms)
            guidance = torch.cat([guidance, F.interpolate(keys, size=size, mode="bicubic", align_corners=False)], 1)
        kernel = self.kernel(guidance).to(feats.dtype)
        # = adaptive_conv(bicubic(feats)).to(out_dtype)
        return adaptive_conv_bicubic(feats, kernel, padding=self.padding(size), out_dtype=out_dtype)


@register_upsampler("jbu")
class JBUStack(LearnedUpsampler):
    """Stages of learned JBU from the backbone grid to any output size, plus a 1x1 residual correction.

    ``create_upsampler("jbu", backbone)`` loads the checkpoint shipped for that backbone (or ``checkpoint=PATH``);
    ``pretrained=False`` gives fresh weights for training.
    """

    def __init__(self, dim: int, layers: int, key_dim: int = 32, radius: int | list[int] = 3, guidance: str = "rgb",
                 fixup: bool = False, residual: str = "input", channel_norm: bool = False,
                 guidance_resize: str = "bilinear"):
        super().__init__(dim=dim, layers=layers, key_dim=key_dim, radius=radius, guidance=guidance, fixup=fixup,
                         residual=residual, channel_norm=channel_norm, guidance_resize=guidance_resize)
        if residual not in ("input", "output") or guidance_resize not in ("bilinear", "area"):
            raise ValueError(f"residual must be input or output and guidance_resize bilinear or area, got "
                             f"{residual!r} and {guidance_resize!r}")
        # FeatUp checkpoints (see featup.py) normalise the backbone features over channels first
        self.channel_norm = nn.LayerNorm(dim) if channel_norm else None
        self.stages = nn.ModuleList(JBULayer(key_dim, r, guidance, fixup, dim) for r in stage_radii(radius, layers))
        self.residual = self.residual_correction(dim)

    def forward(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int]) -> Tensor:
        return self.render(lr_feats, image, size, lr_feats.dtype)

    def render(self, lr_feats: Tensor, image: Tensor, size: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The maps as ``dtype``; the last stage writes them so (on the C++ path: no float32 maps are made) unless
        a residual follows it."""
        residual_last = self.config["residual"] == "output"  # FeatUp's place
        x = self.propagate(self.prepare(lr_feats), image, size, None if residual_last else dtype)
        if residual_last:
            x = x + self.residual(x)
        return x.to(dtype)

    @property
    def channel_shared(self) -> bool:
        """Whether ``propagate`` is linear and treats every channel alike with weights summing to one (image-only
        guidance, no fixup, residual on the input). Then ``propagate(prepare(F)) @ P == propagate(prepare(F) @ P)``
        for any channel projection ``P``, which training uses to upsample a few projected channels instead of C."""
        c = self.config
        return c["guidance"] != "features" and not c["fixup"] and c["residual"] == "input"

    def prepare(self, lr_feats: Tensor) -> Tensor:
        """What happens on the backbone grid: the channel norm (FeatUp checkpoints) and the residual correction."""
        x = lr_feats.float()
        if self.channel_norm is not None:
            x = self.channel_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if self.config["residual"] == "input":  # at the low resolution: see the module docstring
            x = x + self.residual(x)
        return x

    def propagate(self, x: Tensor, image: Tensor, size: tuple[int, int], dtype: torch.dtype | None = None) -> Tensor:
        """The JBU stages from ``x``'s grid to ``size``, guided by ``image`` (B, 3, H, W) in [0, 1]; the last one's
        output as ``dtype`` (default: ``x``'s)."""
        image = self.normalize(image)
        sizes = stage_sizes(tuple(x.shape[-2:]), tuple(size))
        for s, stage_size in enumerate(sizes):
            last = s == len(sizes) - 1
            x = self.stages[min(s, len(self.stages) - 1)](x, self.guidance(image, stage_size), dtype if last else None)
        return x

    def guidance(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """The normalised image at a stage's size: antialiased bilinear, or box-filtered ("area") as FeatUp."""
        if self.config["guidance_resize"] == "area":
            return F.adaptive_avg_pool2d(image, size)
        return guidance_at(image, size)
