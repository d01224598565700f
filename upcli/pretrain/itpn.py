"""``upcli pretrain itpn``: integral pretraining of HiViT and its feature pyramid (iTPN), in one loop.

The objectives (a batch of random resized crops, 75% of the 16x16 patches dropped before the backbone):

* masked image modelling: a light Transformer decoder, fed by the sum of the three pyramid levels of the visible
  patches plus a mask token at each dropped one, predicts the per-patch normalised pixels of the dropped patches
  (MSE), as iTPN's released pixel pretraining;
* masked feature modelling (the paper's MFM, whose code was never released; this is our reading of it): the same
  decoder has one head per pyramid level (stride 16, 8, 4) that regresses, at the dropped patches, a teacher's
  features on the whole image at that level's resolution, layer-normalised without parameters (MSE); with
  ``feature_positions="all"`` (the default) each level also regresses them at its visible patches itself. The teacher
  is an EMA copy of the network (its own pyramid levels) or any registered backbone (``--teacher
  efficientnet-lite0``; its ``--teacher-layer`` resized to each level's grid).

The loop is nanoGPT-style: AdamW (0.9, 0.95) with linear warmup and cosine decay, DDP under torchrun (each process
draws its share of the batch from the seeded streams, so any number of processes sees the same data), checkpoints
every ``save_every`` steps and on Ctrl-C or SIGTERM, ``--resume``, preview PNGs of the reconstructions.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.cfg import IMAGENET_NORM
from ..backbones.itpn import (ITPN, PATCH, arch_config, config_dict, keep, random_ids_keep, sincos_embedding,
                              to_map, to_tokens)
from ..configs import ITPNPretrainConfig
from ..io.pool import ImagePool
from ..progress import ProgressReporter
from ..runtime import global_mean, resolve_device, setup_distributed, teardown_distributed
from ..checkpoints import load_checkpoint, save_checkpoint
from ..training import (TrainingRun, TrainResult, ensure_finite, generator, load_optimizer_tensors, load_train_state,
                        optimizer_tensors, prepare_output, train_state_path)

PYRAMID = {"p16": 1, "p8": 2, "p4": 4}  # level -> sub-tokens per patch side
_CROP, _MASK, _PREVIEW = 1, 2, 3  # purposes of the random streams
# decoder (width, blocks, heads) per arch: iTPN-B's is 512 x 8; the smaller ones are cut for CPU budgets
DECODERS = {"tiny": (256, 4, 8), "small": (384, 4, 12), "base": (512, 8, 16)}
STATE_KIND = "itpn-train-state"



# ---- teachers -----------------------------------------------------------------------------------------------

def _layer_norm(x: Tensor) -> Tensor:
    return F.layer_norm(x, x.shape[-1:])


class EMATeacher(nn.Module):
    """An exponential moving average of the student network; targets are its own pyramid levels."""

    def __init__(self, student: ITPN, decay: float):
        super().__init__()
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.decay = decay
        self.dims = {level: student.cfg.fpn_dim for level in PYRAMID}

    @torch.no_grad()
    def targets(self, images: Tensor) -> dict[str, Tensor]:
        levels = self.model(normalize(images))
        return {level: _layer_norm(levels[level]) for level in PYRAMID}

    @torch.no_grad()
    def update(self, student: ITPN) -> None:
        for t, s in zip(self.model.parameters(), student.parameters()):
            t.lerp_(s.detach(), 1 - self.decay)


class BackboneTeacher(nn.Module):
    """A frozen registered backbone; its layer, resized to each pyramid level's grid, is the target there."""

    def __init__(self, name: str, layer: str | None, weights: str | None):
        from ..backbones import create_backbone

        super().__init__()
        self.backbone = create_backbone(name, weights=weights, layer=layer).eval().requires_grad_(False)
        self.dims = {level: self.backbone.dim for level in PYRAMID}

    @torch.no_grad()
    def targets(self, images: Tensor) -> dict[str, Tensor]:
        feats = self.backbone(images)
        gh, gw = images.shape[-2] // PATCH, images.shape[-1] // PATCH
        out = {}
        for level, s in PYRAMID.items():
            resized = F.interpolate(feats, size=(gh * s, gw * s), mode="bilinear", antialias=True, align_corners=False)
            out[level] = _layer_norm(to_tokens(resized, s))
        return out

    def update(self, student: ITPN) -> None:
        pass


def make_teacher(cfg: ITPNPretrainConfig, student: ITPN) -> nn.Module | None:
    if cfg.feature_weight == 0:
        return None
    if cfg.teacher == "ema":
        return EMATeacher(student, cfg.ema_decay)
    return BackboneTeacher(cfg.teacher, cfg.teacher_layer, cfg.teacher_weights)


# ---- the decoder and the objectives ------------------------------------------------------------------------

_MEAN = torch.tensor(IMAGENET_NORM[0]).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_NORM[1]).view(1, 3, 1, 1)


def normalize(images: Tensor) -> Tensor:
    """Images in [0, 1] -> the ImageNet-normalised input of the network."""
    return (images - _MEAN.to(images.device)) / _STD.to(images.device)


def patch_pixels(images: Tensor) -> Tensor:
    """``Tensor[B, 3, H, W]`` -> ``Tensor[B, N, 16 * 16 * 3]``, each patch normalised to zero mean, unit variance."""
    pixels = to_tokens(images, PATCH).flatten(2)
    mean, var = pixels.mean(-1, keepdim=True), pixels.var(-1, keepdim=True)
    return (pixels - mean) / (var + 1e-6).sqrt()


class PyramidDecoder(nn.Module):
    """Sums the pyramid levels of the visible patches (each sub-token embedded to ``dim / s^2``, concatenated per
    patch), puts a mask token at every dropped patch, runs ``depth`` Transformer blocks with sin-cos positions, and
    predicts each patch's normalised pixels and, per level, its teacher features (``target_dims``)."""

    def __init__(self, fpn_dim: int, dim: int, depth: int, heads: int, target_dims: dict[str, int], base_grid: int):
        from timm.models.vision_transformer import Block

        super().__init__()
        self.dim, self.base_grid = dim, base_grid
        self.embed = nn.ModuleDict({level: nn.Sequential(nn.LayerNorm(fpn_dim), nn.Linear(fpn_dim, dim // (s * s)))
                                    for level, s in PYRAMID.items()})
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.pixel_head = nn.Linear(dim, PATCH * PATCH * 3)
        self.feature_heads = nn.ModuleDict({level: nn.Linear(dim, PYRAMID[level] ** 2 * d)
                                            for level, d in target_dims.items()})
        self.target_dims = dict(target_dims)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, levels: dict[str, Tensor], ids_keep: Tensor, grid: tuple[int, int]):
        B, N = ids_keep.shape[0], grid[0] * grid[1]
        visible = sum(self.embed[level](levels[level]).flatten(2) for level in PYRAMID)  # [B, n, dim]
        x = self.mask_token.expand(B, N, -1).clone()
        x[torch.arange(B, device=x.device)[:, None], ids_keep] = visible.to(x.dtype)
        x = x + sincos_embedding(grid, self.dim, self.base_grid).to(x.device)
        x = self.norm(self.blocks(x))
        features = {level: head(x).view(B, N, PYRAMID[level], PYRAMID[level], -1)
                    for level, head in self.feature_heads.items()}
        return self.pixel_head(x), features


class ITPNPretrainer(nn.Module):
    """The student (``backbone``: HiViT + pyramid) and its ``decoder``; ``forward`` gives the weighted losses.

    Feature targets are scored at the dropped patches (the decoder's per-level heads) and, with ``level_heads``
    (``feature_positions="all"``), also at the visible ones, each level regressing them itself (LN + linear per
    sub-token), as iTPN's released CLIP distillation scores every token."""

    def __init__(self, backbone: ITPN, decoder: PyramidDecoder, pixel_weight: float = 1.0,
                 feature_weight: float = 1.0, feature_positions: str = "all"):
        super().__init__()
        self.backbone, self.decoder = backbone, decoder
        self.pixel_weight, self.feature_weight = pixel_weight, feature_weight
        fpn_dim = backbone.cfg.fpn_dim
        self.level_heads = nn.ModuleDict({
            level: nn.Sequential(nn.LayerNorm(fpn_dim), nn.Linear(fpn_dim, d))
            for level, d in decoder.target_dims.items()}) if feature_positions == "all" else None

    def forward(self, images: Tensor, ids_keep: Tensor, targets: dict[str, Tensor] | None = None):
        """``images`` in [0, 1]; the pixel loss is a mean over the dropped patches, the feature loss a mean over
        the levels of the mean over the scored patches (only given ``targets``). Returns (losses, pixels)."""
        B, _, H, W = images.shape
        grid = (H // PATCH, W // PATCH)
        levels = self.backbone(normalize(images), ids_keep)
        pixels, features = self.decoder(levels, ids_keep, grid)
        masked = torch.ones(B, grid[0] * grid[1], dtype=torch.bool, device=images.device)
        masked[torch.arange(B, device=images.device)[:, None], ids_keep] = False
        per_patch = ((pixels - patch_pixels(images)) ** 2).mean(-1)
        pixel_loss = per_patch[masked].mean() if masked.any() else per_patch.sum() * 0  # nothing dropped
        losses = {"pixel": pixel_loss}
        total = self.pixel_weight * pixel_loss
        if targets is not None:
            per_level = []
            for level, prediction in features.items():
                error = ((prediction - targets[level]) ** 2).mean((2, 3, 4))[masked]
                if self.level_heads is not None:
                    own = self.level_heads[level](levels[level])
                    visible = ((own - keep(targets[level], ids_keep)) ** 2).mean((2, 3, 4))
                    error = torch.cat([error, visible.flatten()])
                per_level.append(error.mean())
            losses["feature"] = torch.stack(per_level).mean()
            total = total + self.feature_weight * losses["feature"]
        losses["loss"] = total
        return losses, pixels


def build_pretrainer(cfg: ITPNPretrainConfig) -> tuple[ITPNPretrainer, nn.Module | None]:
    """The pretraining model (student network + decoder) for ``cfg`` and its teacher (None without MFM)."""
    arch = arch_config(cfg.arch, **cfg.arch_overrides)
    student = ITPN(arch, drop_path=cfg.drop_path)
    teacher = make_teacher(cfg, student)
    dim, depth, heads = DECODERS[cfg.arch]
    decoder = PyramidDecoder(arch.fpn_dim, dim, depth, heads, teacher.dims if teacher else {}, arch.base_grid)
    return ITPNPretrainer(student, decoder, cfg.pixel_weight, cfg.feature_weight, cfg.feature_positions), teacher


# ---- data, schedule, previews ------------------------------------------------------------------------------

def crop_batch(pool: ImagePool, cfg: ITPNPretrainConfig, step: int, samples: range) -> Tensor:
    return torch.stack([pool.resized_crop(generator(cfg.seed, _CROP, step, s), cfg.image_size) for s in samples])


class _StepCrops(torch.utils.data.Dataset):
    """Item ``step``: this process's crops of that step (for a ``DataLoader`` with worker processes)."""

    def __init__(self, pool: ImagePool, cfg: ITPNPretrainConfig, samples: range):
        self.pool, self.cfg, self.samples = pool, cfg, samples

    def __getitem__(self, step: int) -> tuple[Tensor, list[str]]:
        """The crops, and the images skipped as unreadable while drawing them (in a worker's copy of the pool)."""
        before = len(self.pool.skipped)
        return crop_batch(self.pool, self.cfg, step, self.samples), self.pool.skipped[before:]


def crop_batches(pool: ImagePool, cfg: ITPNPretrainConfig, steps: range, samples: range):
    """The crops of each step in ``steps``, decoded ahead by ``cfg.workers`` processes (none: in this one)."""
    workers = cfg.workers if cfg.workers is not None else (min(8, os.cpu_count() or 1) if pool.stream else 0)
    if workers == 0:
        yield from (crop_batch(pool, cfg, step, samples) for step in steps)
        return
    loader = torch.utils.data.DataLoader(_StepCrops(pool, cfg, samples), sampler=steps, batch_size=None,
                                         num_workers=workers, prefetch_factor=2)
    for crops, skipped in loader:
        pool.skipped += skipped  # counted here, where the command reports them
        yield crops


def mask_batch(cfg: ITPNPretrainConfig, step: int, samples: range, patches: int) -> Tensor:
    gens = [generator(cfg.seed, _MASK, step, s) for s in samples]
    return random_ids_keep(len(gens), patches, cfg.mask_ratio, gens)


def learning_rate(cfg: ITPNPretrainConfig, step: int, steps: int) -> float:
    """Linear warmup over ``warmup * steps``, then cosine decay from ``lr`` to ``min_lr``."""
    warm = round(cfg.warmup * steps)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms, biases or the mask token)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


@torch.no_grad()
def save_reconstruction(path: Path, model: ITPNPretrainer, image: Tensor, ids_keep: Tensor) -> None:
    """A PNG of [image | visible patches | reconstruction | reconstruction with the visible patches pasted in].
    Each predicted patch is un-normalised with the true patch's mean and variance, as MAE shows them."""
    from ..viz import save_png

    was_training = model.training
    model.eval()
    _, pixels = model(image, ids_keep)
    model.train(was_training)
    B, _, H, W = image.shape
    grid = (H // PATCH, W // PATCH)
    truth = to_tokens(image, PATCH).flatten(2)
    mean, std = truth.mean(-1, keepdim=True), (truth.var(-1, keepdim=True) + 1e-6).sqrt()
    recon = pixels * std + mean
    shown = torch.zeros_like(truth[..., :1])
    shown[:, ids_keep[0]] = 1
    as_image = lambda t: to_map(t.view(B, -1, PATCH, PATCH, 3), grid)  # noqa: E731
    panels = [image, as_image(truth * shown + 0.5 * (1 - shown)), as_image(recon),
              as_image(truth * shown + recon * (1 - shown))]
    strip = torch.cat([p[0].clamp(0, 1) for p in panels], dim=2)
    save_png(path, (strip.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def preview_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".safetensors") + ".previews")


# ---- the loop ---------------------------------------------------------------------------------------------

def pretrain_itpn(cfg: ITPNPretrainConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False, log_every: float = 10.0) -> TrainResult:
    """Run (or continue) ``upcli pretrain itpn``; writes ``cfg.out`` (network + decoder) and its ``.train`` state."""
    cfg.check()
    device = resolve_device(cfg.device)
    dist = setup_distributed(device)
    try:
        mine = dist.local_batch(cfg.batch_size, "--batch-size")
        prepare_output(cfg.out, resume, overwrite)
        reporter = ProgressReporter("pretrain itpn", quiet=quiet or not dist.is_main, unit="steps", log_every=log_every)
        pool = ImagePool(cfg.images, 2 * cfg.image_size, reporter, stream=None)
        steps = cfg.steps or (math.ceil(cfg.epochs * len(pool) / cfg.batch_size) if cfg.epochs else cfg.default_steps)
        torch.manual_seed(cfg.seed)  # the same initial weights on every process
        model, teacher = build_pretrainer(cfg)
        model.to(device)
        if teacher is not None:
            teacher.to(device)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
        out, state_path = Path(cfg.out), train_state_path(cfg.out)
        start = _resume(cfg, model, teacher, optimizer, out, state_path) if resume else 0
        return _loop(cfg, model, teacher, optimizer, pool, dist, mine, device, reporter, start, steps)
    finally:
        teardown_distributed()


def _loop(cfg, model, teacher, optimizer, pool, dist, mine: range, device, reporter, start: int, steps: int) -> TrainResult:
    out = Path(cfg.out)
    patches = (cfg.image_size // PATCH) ** 2
    if cfg.preview_every:  # one fixed crop and mask, the same in every preview
        preview_image = crop_batch(pool, cfg, -1, range(1)).to(device)
        preview_mask = mask_batch(cfg, -1, range(1), patches).to(device)
    history = {"pixel": [], "feature": []}

    def save(step: int, checkpoint: Path, state_path: Path, **info) -> None:
        tensors = model.state_dict()  # backbone.*, decoder.*, level_heads.*
        last = {name: values[-1] for name, values in history.items() if values}
        state, optim_json = optimizer_tensors(optimizer)
        if isinstance(teacher, EMATeacher):
            state.update({f"ema.{k}": v for k, v in teacher.model.state_dict().items()})
        save_checkpoint(checkpoint, tensors, {**config_dict(cfg.arch, model.backbone.cfg), "image_size": cfg.image_size,
                                       "target_dims": model.decoder.target_dims, "pretrain": cfg.identity(),
                                       "training": {"step": step, "steps": steps, **last, **info}})
        save_checkpoint(state_path, state, {"kind": STATE_KIND, "step": step, "optimizer": optim_json,
                                            "train_config": cfg.identity()})

    run = TrainingRun("pretrain itpn", dist, reporter, save, start, steps, out)
    run.parallel(model)
    model.train()
    with run:
        for step, images in zip(range(start, steps), crop_batches(pool, cfg, range(start, steps), mine)):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, steps)
            images = images.to(device)
            ids_keep = mask_batch(cfg, step, mine, patches).to(device)
            targets = teacher.targets(images) if teacher is not None else None
            losses, _ = run.model(images, ids_keep, targets)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            optimizer.step()
            if teacher is not None:
                teacher.update(model.backbone)
            for name in [name for name in history if name in losses]:  # one order on every process
                history[name].append(ensure_finite(global_mean(losses[name].detach(), dist.world_size), step, out))
            done = step + 1
            run.step_done(done, ", ".join(f"{name} {values[-1]:.4f}" for name, values in history.items() if values))
            if dist.is_main and cfg.preview_every and done % cfg.preview_every == 0:
                save_reconstruction(preview_dir(out) / f"step_{done:06d}.png", model, preview_image, preview_mask)
            if done % cfg.save_every == 0 or done == steps:
                run.checkpoint(done)
    rate = (run.done - start) * cfg.batch_size / max(run.seconds, 1e-9)
    return run.result(losses=history, images_per_second=rate, skipped=pool.skipped)


def _resume(cfg, model: ITPNPretrainer, teacher, optimizer, out: Path, state_path: Path) -> int:
    state, config = load_train_state(out, state_path, STATE_KIND, cfg.identity())
    tensors, _ = load_checkpoint(out)
    model.load_state_dict(tensors)
    if isinstance(teacher, EMATeacher):
        teacher.model.load_state_dict({k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")})
    load_optimizer_tensors(optimizer, state, config["optimizer"])
    return int(config["step"])
