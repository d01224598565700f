"""iTPN: a HiViT backbone and the feature pyramid pretrained with it (Tian et al., CVPR 2023).

Tokens are kept per 16x16 patch, as ``Tensor[B, N, s, s, D]``: N patches, each an s x s grid of sub-tokens
(s = 4 at stride 4, 2 at stride 8, 1 at stride 16). Nothing before the attention stage mixes patches, and the
pyramid neck is token-wise too, so masked patches can be dropped right after the patch embedding
(``ids_keep``): the network on a masked image equals the network on its visible patches alone.

    model = ITPN(ITPN_ARCHS["tiny"])
    levels = model(images)                        # dict: s1, s2, s3 (stages), p16, p8, p4 (pyramid), token form
    p4 = to_map(levels["p4"], grid)               # Tensor[B, fpn_dim, 4 * gh, 4 * gw]

As a backbone: ``--backbone itpn:tiny`` (random init, seed 0: a baseline) or ``--backbone itpn:CKPT`` (a checkpoint
of ``upcli pretrain itpn``), with ``--layer`` one of s1, s2, s3, p16, p8, p4 (default p4, stride 4).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import UsageError, WeightsError, first_line

PATCH = 16  # pixels per patch; every image side must be a multiple (the backbone pads to one)
LEVELS = ("s1", "s2", "s3", "p16", "p8", "p4")  # shallow to deep; the pyramid's finest level is the default


@dataclass(frozen=True)
class ITPNConfig:
    dim: int  # channels at stride 16; stage 1 has dim / 4, stage 2 dim / 2
    mlp_depth: int  # MLP-only blocks in each of stages 1 and 2
    depth: int  # attention blocks in stage 3
    heads: int
    fpn_dim: int  # channels of every pyramid level
    fpn_depth: int = 2  # C-MLP blocks per top-down step, before each level's output block
    early_mlp_ratio: float = 3.0
    mlp_ratio: float = 4.0
    base_grid: int = 14  # patches per side the position embedding is laid out for (224 px)

    def level_dims(self) -> dict[str, int]:
        return {"s1": self.dim // 4, "s2": self.dim // 2, "s3": self.dim, "p16": self.fpn_dim, "p8": self.fpn_dim,
                "p4": self.fpn_dim}


LEVEL_STRIDES = {"s1": 4, "s2": 8, "s3": 16, "p16": 16, "p8": 8, "p4": 4}

# HiViT-T/S (attention at 384, 6 heads) and iTPN-B ("3324": 3 + 3 MLP blocks, 24 attention blocks at 512).
ITPN_ARCHS: dict[str, ITPNConfig] = {
    "tiny": ITPNConfig(dim=384, mlp_depth=2, depth=10, heads=6, fpn_dim=128),
    "small": ITPNConfig(dim=384, mlp_depth=4, depth=20, heads=6, fpn_dim=192),
    "base": ITPNConfig(dim=512, mlp_depth=3, depth=24, heads=8, fpn_dim=256),
}


def arch_config(arch: str, **overrides) -> ITPNConfig:
    if arch not in ITPN_ARCHS:
        raise UsageError(f"unknown iTPN arch {arch!r}: use one of {', '.join(ITPN_ARCHS)}")
    return replace(ITPN_ARCHS[arch], **overrides)


# ---- token layout ---------------------------------------------------------------------------------------------

def to_tokens(x: Tensor, s: int) -> Tensor:
    """``Tensor[B, D, gh*s, gw*s]`` -> ``Tensor[B, gh*gw, s, s, D]`` (patches in row-major order)."""
    B, D, H, W = x.shape
    gh, gw = H // s, W // s
    return x.view(B, D, gh, s, gw, s).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, s, s, D)


def to_map(tokens: Tensor, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`to_tokens` for a full grid of ``grid = (gh, gw)`` patches; ``(B, N, D)`` means s = 1."""
    if tokens.ndim == 3:
        tokens = tokens[:, :, None, None]
    B, N, s, _, D = tokens.shape
    gh, gw = grid
    return tokens.view(B, gh, gw, s, s, D).permute(0, 5, 1, 3, 2, 4).reshape(B, D, gh * s, gw * s)


def keep(tokens: Tensor, ids_keep: Tensor | None) -> Tensor:
    """The patches ``ids_keep`` (``LongTensor[B, n]``) of ``tokens`` (``[B, N, ...]``)."""
    if ids_keep is None:
        return tokens
    return tokens[torch.arange(tokens.shape[0], device=tokens.device)[:, None], ids_keep]


def sincos_embedding(grid: tuple[int, int], dim: int, base_grid: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, ``Tensor[gh*gw, dim]``. Positions are scaled to a ``base_grid``-wide
    layout, so other grids see the positions of the pretraining grid, as interpolating the table would give."""
    gh, gw = grid
    ys = (torch.arange(gh, dtype=torch.float64) + 0.5) * base_grid / gh - 0.5
    xs = (torch.arange(gw, dtype=torch.float64) + 0.5) * base_grid / gw - 0.5
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    parts = [f(p.reshape(-1, 1) * omega) for p in (x, y) for f in (torch.sin, torch.cos)]
    emb = torch.cat(parts, dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()


def random_ids_keep(batch: int, patches: int, mask_ratio: float, generators: list[torch.Generator]) -> Tensor:
    """Per sample, the sorted indices of the ``round(patches * (1 - mask_ratio))`` (at least 1) visible patches."""
    count = max(1, round(patches * (1 - mask_ratio)))
    return torch.stack([torch.randperm(patches, generator=g)[:count].sort().values for g in generators[:batch]])


# ---- layers -------------------------------------------------------------------------------------------------

class MlpBlock(nn.Module):
    """Pre-LN MLP with a residual: no token mixing (HiViT's early stages, iTPN's C-MLP)."""

    def __init__(self, dim: int, ratio: float, drop_path: float = 0.0):
        from timm.layers import DropPath, Mlp

        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.drop_path(self.mlp(self.norm(x)))


class PatchMerge(nn.Module):
    """2x2 sub-tokens inside each patch -> one, ``dim`` -> ``2 * dim`` (LN then a bias-free linear)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, s, _, D = x.shape
        x = x.view(B, N, s // 2, 2, s // 2, 2, D).permute(0, 1, 2, 4, 3, 5, 6).reshape(B, N, s // 2, s // 2, 4 * D)
        return self.reduction(self.norm(x))


class PatchSplit(nn.Module):
    """One sub-token -> 2x2 inside each patch (``dim_in`` -> ``dim_out``): a within-patch pixel shuffle."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim_in)
        self.expand = nn.Linear(dim_in, 4 * dim_out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, N, s, _, _ = x.shape
        x = self.expand(self.norm(x)).view(B, N, s, s, 2, 2, -1)
        return x.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, N, 2 * s, 2 * s, x.shape[-1])


# ---- the network --------------------------------------------------------------------------------------------

class ITPN(nn.Module):
    """HiViT (4x4 patch embedding, MLP stages at dim/4 and dim/2, global attention at dim) plus iTPN's top-down
    pyramid of C-MLP blocks (linear laterals, split-upsampling). ``forward(images, ids_keep)`` -> token levels."""

    def __init__(self, cfg: ITPNConfig, drop_path: float = 0.0):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.cfg = cfg
        C, Fd = cfg.dim, cfg.fpn_dim
        self.patch_embed = nn.Conv2d(3, C // 4, kernel_size=4, stride=4)
        self.embed_norm = nn.LayerNorm(C // 4)
        self.stage1 = nn.Sequential(*[MlpBlock(C // 4, cfg.early_mlp_ratio) for _ in range(cfg.mlp_depth)])
        self.merge1 = PatchMerge(C // 4)
        self.stage2 = nn.Sequential(*[MlpBlock(C // 2, cfg.early_mlp_ratio) for _ in range(cfg.mlp_depth)])
        self.merge2 = PatchMerge(C // 2)
        rates = torch.linspace(0, drop_path, cfg.depth, device="cpu").tolist()  # cpu: also when built on meta
        self.blocks = nn.ModuleList([Block(C, cfg.heads, cfg.mlp_ratio, qkv_bias=True, drop_path=r) for r in rates])
        self.norm = nn.LayerNorm(C)
        # pyramid: P16 from stage 3; P8 = split(stage 3) + lateral(stage 2); P4 = split(P8) + lateral(stage 1)
        self.align16 = nn.Linear(C, Fd)
        self.out16 = MlpBlock(Fd, cfg.mlp_ratio)
        self.split8 = PatchSplit(C, Fd)
        self.lateral8 = nn.Linear(C // 2, Fd, bias=False)
        self.fpn8 = nn.Sequential(*[MlpBlock(Fd, cfg.mlp_ratio) for _ in range(cfg.fpn_depth)])
        self.out8 = MlpBlock(Fd, cfg.mlp_ratio)
        self.split4 = PatchSplit(Fd, Fd)
        self.lateral4 = nn.Linear(C // 4, Fd, bias=False)
        self.fpn4 = nn.Sequential(*[MlpBlock(Fd, cfg.mlp_ratio) for _ in range(cfg.fpn_depth)])
        self.out4 = MlpBlock(Fd, cfg.mlp_ratio)
        self._pos_cache: dict[tuple[int, int], Tensor] = {}
        self.apply(_init_weights)
        dims = cfg.level_dims()
        # timm's feature interface, so ``Backbone`` wraps this like any timm model
        self.feature_info = [{"module": n, "num_chs": dims[n], "reduction": LEVEL_STRIDES[n]} for n in LEVELS]

    def position_embedding(self, grid: tuple[int, int], device) -> Tensor:
        if grid not in self._pos_cache:
            self._pos_cache[grid] = sincos_embedding(grid, self.cfg.dim, self.cfg.base_grid)
        return self._pos_cache[grid].to(device)

    def forward(self, images: Tensor, ids_keep: Tensor | None = None) -> dict[str, Tensor]:
        """Normalised ``images`` (sides multiples of 16) -> levels in token form, for the ``ids_keep`` patches only
        (all when None): s1 ``[B, n, 4, 4, dim/4]``, s2 ``[B, n, 2, 2, dim/2]``, s3 ``[B, n, dim]``, p16/p8/p4
        ``[B, n, s, s, fpn_dim]``."""
        H, W = images.shape[-2:]
        if H % PATCH or W % PATCH:
            raise ValueError(f"iTPN needs image sides that are multiples of {PATCH}, got {H}x{W}")
        grid = (H // PATCH, W // PATCH)
        x = keep(to_tokens(self.patch_embed(images), 4), ids_keep)
        s1 = self.stage1(self.embed_norm(x))
        s2 = self.stage2(self.merge1(s1))
        x = self.merge2(s2).flatten(1, 3)  # [B, n, dim]
        x = x + keep(self.position_embedding(grid, x.device).expand(x.shape[0], -1, -1), ids_keep)
        for block in self.blocks:
            x = block(x)
        s3 = self.norm(x)
        top = s3[:, :, None, None]
        p16 = self.out16(self.align16(top))
        x8 = self.fpn8(self.split8(top) + self.lateral8(s2))
        x4 = self.fpn4(self.split4(x8) + self.lateral4(s1))
        return {"s1": s1, "s2": s2, "s3": s3, "p16": p16, "p8": self.out8(x8), "p4": self.out4(x4)}

    def forward_intermediates(self, images: Tensor, indices, output_fmt: str = "NCHW", intermediates_only=True,
                              **_) -> list[Tensor]:
        """timm's interface (NCHW maps of the levels ``indices``). Sides that are not multiples of 16 are padded
        (edge replication) and each map cropped back to the padded-away cells."""
        H, W = images.shape[-2:]
        ph, pw = -H % PATCH, -W % PATCH
        if ph or pw:
            images = F.pad(images, (0, pw, 0, ph), mode="replicate")
        grid = (images.shape[-2] // PATCH, images.shape[-1] // PATCH)
        levels = self(images)
        maps = []
        for index in indices:
            name = LEVELS[index]
            stride = LEVEL_STRIDES[name]
            maps.append(to_map(levels[name], grid)[..., :math.ceil(H / stride), :math.ceil(W / stride)])
        return maps


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):  # the patch embedding, as a linear layer (MAE)
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        nn.init.zeros_(module.bias)


# ---- as a backbone ------------------------------------------------------------------------------------------

BACKBONE_PREFIX = "itpn:"
CHECKPOINT_KIND = "itpn"


def resolve_spec(spec: str) -> tuple[str, ITPNConfig, Path | None]:
    """``"tiny"`` -> (arch, its config, None); ``"run.safetensors"`` -> (arch, the checkpoint's config, path)."""
    if spec in ITPN_ARCHS:
        return spec, ITPN_ARCHS[spec], None
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"backbone itpn:{spec}: not an arch ({', '.join(ITPN_ARCHS)}) and no such checkpoint file")
    from ..checkpoints import read_config

    config = read_config(path, CHECKPOINT_KIND)
    return str(config.get("arch")), _architecture(path, config), path


def _architecture(path, config: dict) -> ITPNConfig:
    """The ``ITPNConfig`` of a checkpoint's config, or a one-line ``WeightsError``."""
    try:
        return ITPNConfig(**config["itpn"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: 'itpn' in its config is not an iTPN architecture ({type(exc).__name__}: "
                           f"{first_line(exc)})") from None


def backbone_features(spec: str) -> list[tuple[str, int, int]]:
    _, cfg, _ = resolve_spec(spec)
    dims = cfg.level_dims()
    return [(name, dims[name], LEVEL_STRIDES[name]) for name in LEVELS]


def create_itpn_model(spec: str, weights=None) -> ITPN:
    """The network of ``itpn:<spec>``: a checkpoint's weights, or ``weights``, or random init (seed 0)."""
    _, cfg, path = resolve_spec(spec)

    def build() -> ITPN:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ITPN(cfg)

    if path is None:
        model = build()
    else:  # a checkpoint's config: checked against its tensors before anything is allocated
        from ..checkpoints import build_checked

        model = build_checked(path, build, prefix="backbone.")
    source = weights if weights is not None else path
    if source is not None:
        load_itpn_weights(model, source)
    return model


def load_itpn_weights(model: ITPN, path) -> None:
    """Load the network from a ``upcli pretrain itpn`` checkpoint (its ``backbone.*`` tensors)."""
    from ..checkpoints import check_finite, load_checkpoint

    tensors, config = load_checkpoint(path, CHECKPOINT_KIND)
    check_finite(path, tensors)
    if _architecture(path, config) != model.cfg:
        raise WeightsError(f"{path} holds an iTPN of another shape ({config['arch']})")
    state = {k.removeprefix("backbone."): v for k, v in tensors.items() if k.startswith("backbone.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(f"{path}: {len(missing)} missing and {len(unexpected)} unexpected iTPN tensors")


def config_dict(arch: str, cfg: ITPNConfig) -> dict:
    return {"kind": CHECKPOINT_KIND, "arch": arch, "itpn": asdict(cfg)}
