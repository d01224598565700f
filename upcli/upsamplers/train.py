"""``upcli train``: fit a learned upsampler (jbu, pac, resize-conv) by multi-view reconstruction.

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
CamVid probe the JBU gained nothing from it (see the README), so 1 stays the default.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import UsageError
from ..io.pool import ImagePool
from ..io.jobs import TerminateAsInterrupt
from ..progress import ProgressReporter
from ..checkpoints import load_checkpoint, save_checkpoint
from ..training import (InterruptsDeferred, ensure_finite, generator, global_mean, load_optimizer_tensors,
                        load_train_state, optimizer_tensors, prepare_output, setup_distributed, teardown_distributed,
                        train_state_path)
from . import guidance_at
from .base import stage_sizes
from .jbu import GUIDANCE_KINDS, MAX_RADIUS
from .multiview import JitterConfig, MultiViewObjective, apply_jitter, random_projection, sample_jitter

# purposes of the random streams
_DATA, _VIEW, _PROJ, _SIZE, _VAL, _SCALE = 1, 2, 3, 4, 5, 6
TRAINABLE = ("jbu", "pac", "resize-conv")


@dataclass
class TrainConfig:
    images: list[str]
    out: str
    backbone: str = "efficientnet-lite0"
    upsampler: str = "jbu"
    steps: int = 2000
    batch_size: int = 4
    lr: float = 1e-3
    image_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(224, 224)])
    input_scales: list[float] = field(default_factory=lambda: [1.0])
    views: int = 2
    downsampler: str = "attention"
    projection_dim: int = 30
    seed: int = 0
    save_every: int = 100
    val: str | None = None
    val_images: int = 16
    weights: str | None = None
    layer: str | None = None
    upsampler_args: dict = field(default_factory=dict)
    device: str = "auto"

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues."""
        d = asdict(self)
        for key in ("steps", "save_every", "val", "val_images", "device", "out"):
            d.pop(key)
        d["image_sizes"] = [list(s) for s in self.image_sizes]
        if self.input_scales == [1.0]:  # FeatUp's objective: runs from before the option existed resume
            d.pop("input_scales")
        return d


def parse_image_sizes(text: str) -> list[tuple[int, int]]:
    """``"224"`` -> ``[(224, 224)]``; ``"112,96x144"`` -> ``[(112, 112), (96, 144)]``."""
    sizes = []
    for item in str(text).split(","):
        parts = item.strip().lower().split("x")
        try:
            h, w = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        except (ValueError, IndexError):
            raise UsageError(f"--image-size: expected N, HxW or a comma list of them, got {text!r}") from None
        if len(parts) > 2 or h < 16 or w < 16:
            raise UsageError(f"--image-size: sizes must be N or HxW with sides >= 16, got {item.strip()!r}")
        sizes.append((h, w))
    return sizes


def number_list(text: str, option: str, kind: type, low: float, high: float, what: str) -> list:
    """``"1.5,2"`` -> ``[1.5, 2.0]`` for ``kind=float``, each in ``[low, high]``, or a one-line ``UsageError``."""
    try:
        values = [kind(item) for item in str(text).split(",")]
    except ValueError:
        raise UsageError(f"{option}: expected a number or a comma list of numbers, got {text!r}") from None
    if not all(low <= v <= high for v in values):
        raise UsageError(f"{option}: each {what} must be between {low} and {high}, got {text!r}")
    return values


def parse_input_scales(text: str) -> list[float]:
    """``"2"`` -> ``[2.0]``; ``"1.5,2,3"`` -> ``[1.5, 2.0, 3.0]``; each at least 1."""
    return number_list(text, "--input-scale", float, 1, 16, "factor")


def parse_radius(text: str) -> int | list[int]:
    """``"3"`` -> ``3`` (every JBU stage 7x7); ``"3,3,3,2,1"`` -> one radius per stage, coarsest first."""
    radii = number_list(text, "--radius", int, 0, MAX_RADIUS, "radius")
    return radii[0] if len(radii) == 1 else radii


def drawn_for_step(options: list, cfg: TrainConfig, purpose: int, step: int):
    """One of ``options`` for ``step`` (the same on every process and after a resume)."""
    return options[int(torch.randint(len(options), (1,), generator=generator(cfg.seed, purpose, step)))]


def input_scale(cfg: TrainConfig, step: int) -> float:
    """The factor the crops of ``step`` are shrunk by before the backbone (one of ``cfg.input_scales``)."""
    return drawn_for_step(cfg.input_scales, cfg, _SCALE, step)


def shrink(images: torch.Tensor, scale: float) -> torch.Tensor:
    """``images`` (B, 3, H, W) ``scale`` times smaller (antialiased), at least 16 px a side."""
    if scale == 1:
        return images
    H, W = images.shape[-2:]
    return guidance_at(images, (max(16, round(H / scale)), max(16, round(W / scale))))


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


def train(cfg: TrainConfig, resume: bool = False, quiet: bool = False, overwrite: bool = False) -> dict:
    """Run (or continue) training; returns a summary dict. Writes ``cfg.out`` and its ``.train`` state."""
    from ..backbones import create_backbone
    from ..upsample import resolve_device
    from . import create_upsampler
    from .checkpoints import save_upsampler

    device = resolve_device(cfg.device)
    dist = setup_distributed(device)
    if cfg.batch_size % dist.world_size:
        raise UsageError(f"--batch-size {cfg.batch_size} must be a multiple of the {dist.world_size} processes")
    if cfg.upsampler not in TRAINABLE:
        raise UsageError(f"--upsampler must be one of {', '.join(TRAINABLE)}, got {cfg.upsampler!r}")
    if cfg.upsampler_args.get("guidance", "rgb") not in GUIDANCE_KINDS:
        raise UsageError(f"--guidance must be one of {', '.join(GUIDANCE_KINDS)}, "
                         f"got {cfg.upsampler_args['guidance']!r}")
    if not cfg.lr >= 0:  # 0 is allowed: one step of it writes the initial weights
        raise UsageError(f"--lr must be 0 or more, got {cfg.lr}")
    out, state_path = Path(cfg.out), train_state_path(cfg.out)
    prepare_output(out, resume, overwrite)
    best_path = out.with_name(out.name.removesuffix(".safetensors") + ".best.safetensors")
    torch.manual_seed(cfg.seed)  # parameter initialisation: the same on every process
    backbone = create_backbone(cfg.backbone, weights=cfg.weights, layer=cfg.layer).to(device).eval()
    backbone.requires_grad_(False)
    for h, w in cfg.image_sizes:
        grid = backbone.grid_size(h, w)
        if min(grid) < 2:
            raise UsageError(f"--image-size {h}x{w} gives a {grid[0]}x{grid[1]} grid of {backbone.name} features "
                             f"(stride {backbone.stride}): nothing to upsample; use sides of at least {2 * backbone.stride}")
    try:
        upsampler = create_upsampler(cfg.upsampler, backbone=backbone, pretrained=False, **cfg.upsampler_args)
    except ValueError as err:  # an architecture that does not fit the backbone, e.g. a radius per stage
        raise UsageError(f"--upsampler {cfg.upsampler}: {err}") from None
    objective = MultiViewObjective(upsampler, backbone.dim, cfg.downsampler, cfg.projection_dim).to(device)
    optimizer = torch.optim.NAdam(objective.parameters(), lr=cfg.lr)
    start = 0
    if resume:
        start = _resume(cfg, objective, optimizer, out, state_path)
    model = objective
    if dist.world_size > 1:
        # a size that needs fewer stages than the stack has leaves the last layers unused in that step
        stages = {len(stage_sizes(backbone.grid_size(*size), size)) for size in cfg.image_sizes}
        unused = hasattr(upsampler, "stages") and min(stages) < len(upsampler.stages)
        model = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=unused)

    side = max(max(s) for s in cfg.image_sizes)
    reporter = ProgressReporter("train", quiet=quiet or not dist.is_main, unit="steps", log_every=10.0)
    pool = ImagePool(cfg.images, side, reporter, stream=None)  # large sets are decoded at each draw, not held
    val_set = ValidationSet(ImagePool(cfg.val, side, reporter), backbone, cfg, device) if cfg.val else None
    best_val = _best_val_loss(best_path) if resume else math.inf
    local = cfg.batch_size // dist.world_size
    mine = range(dist.rank * local, (dist.rank + 1) * local)
    reporter.start(cfg.steps - start)

    def checkpoint(step: int, **info) -> None:
        if dist.is_main:
            with InterruptsDeferred():
                save_upsampler(out, upsampler, backbone, extra={"training": {"step": step, **info}})
                _save_state(state_path, cfg, objective, optimizer, step)

    with TerminateAsInterrupt():
        history, t0, val_loss, done = [], time.perf_counter(), None, start
        try:
            for step in range(start, cfg.steps):
                for group in optimizer.param_groups:
                    group["lr"] = learning_rate(cfg, step)
                images = make_batch(pool, cfg, step, mine).to(device)
                with torch.no_grad():
                    lr_feats = backbone(shrink(images, input_scale(cfg, step))).float()
                views = make_views(backbone, images, cfg, step, mine, backbone.dim)
                loss = model(lr_feats, images, views)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = ensure_finite(global_mean(loss.detach(), dist.world_size), step, out)
                history.append(value)
                reporter.advance(1, status=f"loss {value:.4f}")
                done = step + 1
                if done % cfg.save_every == 0 or done == cfg.steps:
                    if val_set is not None:
                        val_loss = val_set.loss(objective)
                        reporter.log(f"step {done}: train loss {value:.4f}, val loss {val_loss:.4f}")
                    checkpoint(done, train_loss=value, val_loss=val_loss)
                    if val_loss is not None and val_loss < best_val:
                        best_val = val_loss
                        if dist.is_main:
                            save_upsampler(best_path, upsampler, backbone,
                                           extra={"training": {"step": done, "val_loss": val_loss}})
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: keep the finished steps, then stop
            if done > start and done % cfg.save_every and done != cfg.steps:
                checkpoint(done, interrupted=True)
            raise
        finally:
            reporter.close()
            model = None  # the DDP reducer holds the process group: free it first, not at interpreter exit
            teardown_distributed()
    return {"steps": cfg.steps, "start": start, "seconds": time.perf_counter() - t0, "losses": history,
            "val_loss": val_loss, "skipped": pool.skipped}


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
