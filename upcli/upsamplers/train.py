"""``upcli train``: fit a learned upsampler: jbu, pac, resize-conv by multi-view reconstruction, attention by the
scale objective (``scale_objective``) over one or several feature sources.

The loop, in one place (nanoGPT style):

    for step in range(start, steps):
        images  = crops of the training images        # which ones and where: a function of (seed, step, sample)
        lr      = backbone(shrink(images, scale))     # frozen; scale 1 unless --input-scale
        views   = [(jitter, backbone(jitter(images)), projection) for each of --views]
        loss    = objective(lr, images, views)         # upsample, jitter, downsample, NLL
        loss.backward(); optimizer.step()
        every --save-every steps: checkpoint (and the --val loss)

Every random choice comes from ``generator(seed, purpose, step, sample)``: a run resumed from a checkpoint, or
split over torchrun processes (DDP, same global batch), draws the same images, crops, views and projections as
one uninterrupted process. The learning rate follows a cosine from ``--lr`` to a tenth of it. The checkpoint ``OUT``
holds the upsampler (what ``upcli upsample --upsampler OUT`` loads); ``.train.safetensors`` beside it holds the
rest (objective, optimiser, step) for ``--resume``; with ``--val``, ``.best.safetensors`` keeps the upsampler of
the checkpoint with the lowest held-out loss so far.

``--input-scale`` (JAFAR's and NAF's idea, under FeatUp's loss): the upsampler is fed the features of the crop
shrunk by that factor, guided by the full crop, and judged against the features of views of the full crop: it is
asked what the backbone would see in a sharper image, the job at inference. With 1 it is FeatUp's objective. On the
CamVid probe the JBU gained nothing from it (see the README), so 1 stays its default.

``--upsampler attention`` (backbone-agnostic) is trained by the scale objective alone: per step one feature source
(a backbone at a layer, from the comma lists ``--backbone`` and ``--layer``) and one factor (``--input-scale``,
2,3,4 by default) are drawn; the upsampler maps the features of the shrunk crop to those of the crop. The
checkpoint lists the sources it was trained on (``feature_sources``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..checkpoints import load_checkpoint, save_checkpoint
from ..configs import TrainConfig
from ..errors import UsageError
from ..io.pool import ImagePool
from ..progress import ProgressReporter
from ..runtime import global_mean, resolve_device, setup_distributed
from ..training import (
    TrainingRun,
    TrainResult,
    ensure_finite,
    generator,
    load_optimizer_tensors,
    load_train_state,
    optimizer_tensors,
    prepare_output,
    train_state_path,
)
from . import guidance_at
from .base import stage_sizes
from .jbu import GUIDANCE_KINDS
from .multiview import (
    JitterConfig,
    MultiViewObjective,
    apply_jitter,
    random_projection,
    sample_jitter,
)
from .scale_objective import ScaleObjective

# purposes of the random streams
_DATA, _VIEW, _PROJ, _SIZE, _VAL, _SCALE, _SOURCE = 1, 2, 3, 4, 5, 6, 7
TRAINABLE = ("jbu", "pac", "resize-conv", "attention")
JBU_ARGS = ("guidance", "fixup", "radius")  # train's jbu-only flags
SCALE_OBJECTIVE = ("attention",)  # trained by the scale objective; the others by multi-view reconstruction
SCALE_PROJECTION_DIM = 64


def drawn_for_step(options: list, cfg: TrainConfig, purpose: int, step: int):
    """One of ``options`` for ``step`` (the same on every process and after a resume)."""
    return options[int(torch.randint(len(options), (1,), generator=generator(cfg.seed, purpose, step)))]


def input_scale(cfg: TrainConfig, step: int) -> float:
    """The factor the crops of ``step`` are shrunk by before the backbone (one of ``cfg.input_scales``)."""
    return drawn_for_step(cfg.input_scales, cfg, _SCALE, step)


def shrink(images: torch.Tensor, scale: float, stride: int | None = None) -> torch.Tensor:
    """``images`` (B, 3, H, W) ``scale`` times smaller (antialiased), at least 16 px a side; given a ``stride``,
    each side is a multiple of it (at least 2), so the backbone's grid covers exactly the shrunk image."""
    if scale == 1:
        return images
    H, W = images.shape[-2:]
    if stride:
        return guidance_at(images, tuple(max(2, round(n / scale / stride)) * stride for n in (H, W)))
    return guidance_at(images, (max(16, round(H / scale)), max(16, round(W / scale))))


def feature_sources(cfg: TrainConfig) -> list[tuple[str, str | None]]:
    """Every (backbone, layer) of ``--backbone`` and ``--layer``, comma lists both."""
    names = [name.strip() for name in cfg.backbone.split(",") if name.strip()]
    layers = [layer.strip() for layer in cfg.layer.split(",")] if cfg.layer else [None]
    return [(name, layer) for name in names for layer in layers]


def make_batch(pool: ImagePool, cfg: TrainConfig, step: int, samples: range, purpose: int = _DATA):
    """The crops for global sample indices ``samples`` of ``step`` and the (shared) image size."""
    size = drawn_for_step(cfg.image_sizes, cfg, _SIZE, step)
    return torch.stack([pool.crop(generator(cfg.seed, purpose, step, s), size) for s in samples])


def make_views(backbone, images, cfg: TrainConfig, step: int, samples: range, dim: int, purpose_offset: int = 0):
    views = []
    for v in range(cfg.views):
        gens = [generator(cfg.seed, _VIEW + purpose_offset, step, s, v) for s in samples]
        theta = sample_jitter(gens, JitterConfig())
        with torch.no_grad():
            target = backbone(apply_jitter(images, theta))
        proj = random_projection([generator(cfg.seed, _PROJ + purpose_offset, step, s, v) for s in samples],
                                 dim, cfg.projection_dim)
        views.append((theta, target.float(), proj))
    return views


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False, log_every: float = 10.0) -> TrainResult:
    """Run (or continue) training; returns a ``TrainResult``. Writes ``cfg.out`` and its ``.train`` state."""
    from ..backbones import create_backbone
    from . import create_upsampler
    from .checkpoints import save_upsampler

    device = resolve_device(cfg.device)
    dist = setup_distributed(device)
    mine = dist.local_batch(cfg.batch_size, "--batch-size")
    if cfg.upsampler not in TRAINABLE:
        raise UsageError(f"--upsampler must be one of {', '.join(TRAINABLE)}, got {cfg.upsampler!r}")
    scale_objective = cfg.upsampler in SCALE_OBJECTIVE
    sources = feature_sources(cfg)
    if len(sources) > 1 and not scale_objective:
        raise UsageError(f"several feature sources (--backbone {cfg.backbone} --layer {cfg.layer}) train only a "
                         f"backbone-agnostic upsampler ({', '.join(SCALE_OBJECTIVE)}), not {cfg.upsampler}")
    if cfg.weights and len({name for name, _ in sources}) > 1:
        raise UsageError("--weights needs one backbone, not a comma list")
    if scale_objective and min(cfg.input_scales) <= 1:
        raise UsageError(f"--upsampler {cfg.upsampler} learns from shrunk crops: --input-scale must be above 1 "
                         f"(e.g. 2,3,4), got {cfg.input_scales}")
    jbu_args = [name for name in JBU_ARGS if name in cfg.upsampler_args]
    if cfg.upsampler != "jbu" and jbu_args:
        raise UsageError(f"--{', --'.join(jbu_args)} set the jbu upsampler, not {cfg.upsampler}")
    if cfg.upsampler == "jbu" and set(cfg.upsampler_args) - set(JBU_ARGS):
        raise UsageError("--arch sets the attention upsampler; jbu takes --guidance, --fixup and --radius")
    if cfg.upsampler_args.get("guidance", "rgb") not in GUIDANCE_KINDS:
        raise UsageError(f"--guidance must be one of {', '.join(GUIDANCE_KINDS)}, "
                         f"got {cfg.upsampler_args['guidance']!r}")
    if not cfg.lr >= 0:  # 0 is allowed: one step of it writes the initial weights
        raise UsageError(f"--lr must be 0 or more, got {cfg.lr}")
    out, state_path = Path(cfg.out), train_state_path(cfg.out)
    prepare_output(out, resume, overwrite)
    best_path = out.with_name(out.name.removesuffix(".safetensors") + ".best.safetensors")
    torch.manual_seed(cfg.seed)  # parameter initialisation: the same on every process
    backbones = [create_backbone(name, weights=cfg.weights, layer=layer).to(device).eval() for name, layer in sources]
    for backbone in backbones:
        backbone.requires_grad_(False)
        for h, w in cfg.image_sizes:
            grid = backbone.grid_size(h, w)
            least = 2 * backbone.stride * (max(cfg.input_scales) if scale_objective else 1)
            if min(grid) < 2 or (scale_objective and min(h, w) < least):
                raise UsageError(f"--image-size {h}x{w} gives a {grid[0]}x{grid[1]} grid of {backbone.name} features "
                                 f"(stride {backbone.stride}): too few cells; use sides of at least {least:g}")
    backbone = backbones[0]
    try:
        upsampler = create_upsampler(cfg.upsampler, backbone=backbone, pretrained=False, **cfg.upsampler_args)
    except (TypeError, ValueError) as err:  # an architecture that does not fit, e.g. a radius per stage, a bad --arch
        raise UsageError(f"--upsampler {cfg.upsampler}: {err}") from None
    if scale_objective:
        objective = ScaleObjective(upsampler, cfg.scale_target, cfg.l2_weight).to(device)
    else:
        objective = MultiViewObjective(upsampler, backbone.dim, cfg.downsampler, cfg.projection_dim).to(device)
    optimizer = torch.optim.NAdam(objective.parameters(), lr=cfg.lr)
    start = 0
    if resume:
        start = _resume(cfg, objective, optimizer, out, state_path)
    side = max(max(s) for s in cfg.image_sizes)
    reporter = ProgressReporter("train", quiet=quiet or not dist.is_main, unit="steps", log_every=log_every)
    pool = ImagePool(cfg.images, side, reporter, stream=None)  # large sets are decoded at each draw, not held
    val_set = None
    if cfg.val:
        val_pool = ImagePool(cfg.val, side, reporter)
        val_set = (ScaleValidationSet(val_pool, backbones, cfg, device) if scale_objective
                   else ValidationSet(val_pool, backbone, cfg, device))
    best_val = _best_val_loss(best_path) if resume else math.inf
    # a backbone-agnostic checkpoint says what it was trained on: any other source is a zero-shot use
    trained_on = ({"feature_sources": [{"backbone": b.name, "layer": str(b.layer)} for b in backbones]}
                  if upsampler.backbone_agnostic else {})

    def save_model(path: Path, **training) -> None:
        save_upsampler(path, upsampler, backbone, extra={"training": training, **trained_on})

    def save(step: int, checkpoint: Path, state: Path, **info) -> None:
        save_model(checkpoint, step=step, **info)
        _save_state(state, cfg, objective, optimizer, step)

    run = TrainingRun("train", dist, reporter, save, start, cfg.steps, out)
    # a size that needs fewer stages than the stack has leaves the last layers unused in that step
    stages = {len(stage_sizes(backbone.grid_size(*size), size)) for size in cfg.image_sizes}
    run.parallel(objective, find_unused_parameters=hasattr(upsampler, "stages") and min(stages) < len(upsampler.stages))
    history, val_loss = [], None
    with run:
        for step in range(start, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step)
            images = make_batch(pool, cfg, step, mine).to(device)
            if scale_objective:
                loss = run.model(*scale_batch(drawn_for_step(backbones, cfg, _SOURCE, step), images, cfg, step, mine))
            else:
                with torch.no_grad():
                    lr_feats = backbone(shrink(images, input_scale(cfg, step))).float()
                views = make_views(backbone, images, cfg, step, mine, backbone.dim)
                loss = run.model(lr_feats, images, views)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = ensure_finite(global_mean(loss.detach(), dist.world_size), step, out)
            history.append(value)
            done = step + 1
            status = f"loss {value:.4f} ({objective.loss_name})"
            if not scale_objective:  # the NLL depends on the learned uncertainty; this error compares across runs
                status += f", reconstruction error {global_mean(loss.new_tensor(objective.last_error), dist.world_size):.4f}"
            run.step_done(done, status)
            if done % cfg.save_every == 0 or done == cfg.steps:
                if val_set is not None:
                    val_loss = val_set.loss(objective)
                    reporter.log(f"step {done}: train loss {value:.4f}, val loss {val_loss:.4f} ({objective.loss_name})")
                run.checkpoint(done, train_loss=value, val_loss=val_loss)
                if val_loss is not None and val_loss < best_val:
                    best_val = val_loss
                    if dist.is_main:
                        save_model(best_path, step=done, val_loss=val_loss)
    return run.result(losses=history, val_loss=val_loss, skipped=pool.skipped)


def scale_batch(backbone, images, cfg: TrainConfig, step: int, samples: range, purpose: int = _PROJ):
    """The scale objective's inputs for ``images``: the features of the crops shrunk by the step's factor, the
    crops, their own features, and a random projection of the channels per sample."""
    with torch.no_grad():
        lr_feats = backbone(shrink(images, input_scale(cfg, step), backbone.stride)).float()
        target = backbone(images).float()
    proj = random_projection([generator(cfg.seed, purpose, step, s) for s in samples], backbone.dim,
                             min(SCALE_PROJECTION_DIM, backbone.dim))
    return lr_feats, images, target, proj.to(images.device)


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Cosine decay from ``cfg.lr`` to ``cfg.lr / 10`` over the run (a function of the step: resumes exactly)."""
    progress = step / max(cfg.steps - 1, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _best_val_loss(path: Path) -> float:
    from ..checkpoints import read_config

    if not path.is_file():
        return math.inf
    return float(read_config(path).get("training", {}).get("val_loss", math.inf))


class ValidationSet:
    """The first ``cfg.val_images`` crops of the val images with fixed views, their backbone features computed
    once: the held-out loss is comparable between checkpoints and runs, and costs one objective call."""

    def __init__(self, pool: ImagePool, backbone, cfg: TrainConfig, device):
        samples = range(cfg.val_images)
        with torch.no_grad():
            self.images = make_batch(pool, cfg, 0, samples, purpose=_VAL).to(device)
            self.views = make_views(backbone, self.images, cfg, 0, samples, backbone.dim, purpose_offset=10)
            self.lr_feats = backbone(shrink(self.images, input_scale(cfg, 0))).float()

    def loss(self, objective: MultiViewObjective) -> float:
        with torch.no_grad():
            return float(objective(self.lr_feats, self.images, self.views))


class ScaleValidationSet:
    """``cfg.val_images`` fixed val crops, each with a fixed feature source (in turn) and shrink factor, their
    features computed once: the held-out scale loss, comparable between checkpoints and runs."""

    def __init__(self, pool: ImagePool, backbones: list, cfg: TrainConfig, device):
        self.batches = []
        for i in range(cfg.val_images):
            images = make_batch(pool, cfg, 0, range(i, i + 1), purpose=_VAL).to(device)
            # step i of the shrink-factor stream, source i in turn: a fixed mix of both
            self.batches.append(scale_batch(backbones[i % len(backbones)], images, cfg, i, range(1), _VAL))

    def loss(self, objective: ScaleObjective) -> float:
        with torch.no_grad():
            return sum(float(objective(*batch)) for batch in self.batches) / len(self.batches)


def _save_state(path: Path, cfg: TrainConfig, objective, optimizer, step: int) -> None:
    tensors, optim_json = optimizer_tensors(optimizer)
    for name, t in objective.state_dict().items():
        if not name.startswith("upsampler."):
            tensors[f"objective.{name}"] = t
    save_checkpoint(path, tensors, {"kind": "train-state", "step": step, "optimizer": optim_json,
                                    "train_config": cfg.identity()})


def _resume(cfg: TrainConfig, objective, optimizer, out: Path, state_path: Path) -> int:
    state, config = load_train_state(out, state_path, "train-state", cfg.identity())
    up, _ = load_checkpoint(out)
    rest = {k[len("objective."):]: v for k, v in state.items() if k.startswith("objective.")}
    objective.load_state_dict({**{f"upsampler.{k}": v for k, v in up.items()}, **rest})
    load_optimizer_tensors(optimizer, state, config["optimizer"])
    return int(config["step"])
