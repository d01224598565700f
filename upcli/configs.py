"""The settings of each command as plain dataclasses: their defaults, checks and resume identities.

Importable without torch, so that ``upcli --help`` stays fast and states these very defaults. The modules that
run the commands import them from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import UsageError

def option(default, help: str, flag: tuple = (), **settings):
    """A field that is also a command-line flag: its default (``...``: required), its ``--help`` line, and typer
    settings (``flag``: the flag's own spelling, e.g. ``("--noise",)``; ``argument``; ``min``; ``show_default``).
    ``upcli.cli`` builds the flags from these, so their defaults and help live here, once."""
    metadata = {"help": help, "flag": flag, **settings}
    return field(metadata=metadata) if default is ... else field(default=default, metadata=metadata)


ADAPT_STEPS = 10  # MZSR's adaptation steps per image (``sr --zero-shot --init CKPT`` without ``--steps``)


@dataclass
class JobOptions:
    """What every job command (``upsample``, ``fit-image``, ``sr``) shares: where it writes, how the work is cut and
    split, and how it reports."""

    out: Path | None = option(None, "Output folder: job.json, shards (or PNGs), manifest.", flag=("--out", "-o"))
    files_from: str | None = option(None, "A file listing input images, one per line ('-': standard input); relative "
                                          "paths are relative to the list's folder.", show_default=False)
    include: list[str] | None = option(None, "Keep only the inputs whose path (relative to the inputs' common folder) "
                                             "matches this pattern, e.g. 'train/*'; repeatable.", show_default=False)
    exclude: list[str] | None = option(None, "Leave out the inputs whose path matches this pattern, e.g. '*annot/*'; "
                                             "repeatable.", show_default=False)
    shard_size: int | None = option(None, "Images per shard file. (default: 16 for upsample; 1 for fit-image and sr, "
                                          "so an interruption loses one image at most)", show_default=False)
    batch_size: int = option(1, "Images per model call (same-size images are batched).")
    workers: int | None = option(None, "DataLoader decode workers. (default: on a GPU cores - 1, at most 4; on the "
                                       "CPU none up to 4 cores, else 1)", show_default=False)
    device: str = option("auto", "auto, cpu or cuda[:N].")
    num_shards: int | None = option(None, "Split the work into N parts (default: from RANK/WORLD_SIZE or SLURM).")
    shard_index: int | None = option(None, "Which part this process does, 0..N-1.")
    strict: bool = option(False, "Stop at the first bad image instead of recording it.")
    overwrite: bool = option(False, "Replace another job's files in --out.")
    preview: int = option(0, "Write N preview PNGs to OUT/previews.")
    quiet: bool = option(False, "Only errors.", flag=("--quiet", "-q"))
    log_every: float = option(30.0, "Seconds between progress lines when stderr is not a terminal.")


@dataclass
class FeatureOptions:
    """What ``upsample`` and ``fit-image`` share: the backbone, and how its features are stored."""

    backbone: str = option("efficientnet-lite0", "Backbone name (see upcli upsample --list-backbones), timm:<model>, or "
                                                 "itpn:<checkpoint>.")
    weights: str | None = option(None, "Local backbone checkpoint: official DINOv2/DINO .pth, timm or torchvision layout.")
    layer: str | None = option(None, "Backbone layer to read (default: the entry's own).")
    dtype: str = option("float16", "Stored dtype: float16, bfloat16 or float32.")
    compression: str = option("none", "none, lzf or gzip.")


@dataclass
class TrainingOptions:
    """What every training command (``train``, ``pretrain mzsr``, ``pretrain itpn``) shares."""

    images: list[Path] = option(..., "Folders of training images, scanned recursively.", argument=True,
                                show_default=False)
    out: Path = option(..., "Checkpoint to write (.safetensors); training state goes beside it.", flag=("--out", "-o"),
                       dir_okay=False)
    resume: bool = option(False, "Continue from --out and its training state.")
    overwrite: bool = option(False, "Start a new run in place of an existing --out.")
    device: str = option("auto", "auto, cpu or cuda[:N].")
    quiet: bool = option(False, "Only errors.", flag=("--quiet", "-q"))
    log_every: float = option(10.0, "Seconds between progress lines when stderr is not a terminal.")

    def config(self) -> dict:
        """What a training config takes of these."""
        return {"images": [str(p) for p in self.images], "out": str(self.out), "device": self.device}

    def run(self) -> dict:
        """What a training function takes of these."""
        return {"resume": self.resume, "overwrite": self.overwrite, "quiet": self.quiet, "log_every": self.log_every}


@dataclass(frozen=True)
class FitConfig:
    """How one image is fitted. The defaults are the measured speed/quality trade-off on a 2-core CPU."""

    steps: int = option(200, "Optimisation steps per image.")
    views: int = option(48, "Jittered views featurised per image, cached (FeatUp: 3000).")
    views_per_step: int = 6
    points_per_cell: int = 6  # s: s x s random points per backbone cell, fresh each step
    fit_size: int = option(224, "Shorter side of the image the views are made from.")
    proj_dim: int = 128
    n_freqs: int = 8
    max_freq: float = 5.0  # log of the highest frequency
    width: int = 128
    colour: bool = option(False, "Feed the field the pixel colours too (FeatUp); off: position only, which probed better.",
                          flag=("--colour/--no-colour",))
    max_pad: float = 30 / 224  # views: reflect padding as a fraction of the side (FeatUp: 30 px at 224) ...
    max_zoom: float = 1.8  # ... and the largest zoom (FeatUp: 1.8)
    detail_views: bool = True  # views cut from the image at up to max_zoom x fit_size: zoomed views show real detail
    learning_rate: float = 3e-3
    base: str = option("bilinear", "Upsampler the field starts from and corrects: bilinear, jbu, ...")
    downsampler: str = "attention"
    seed: int = option(0, "Seed of the views, points and initial weights.")

    def check(self) -> None:
        for name in ("steps", "views", "views_per_step", "points_per_cell", "fit_size", "proj_dim", "n_freqs", "width"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UsageError(f"learning rate must be positive, got {self.learning_rate}")
        if self.base in ("implicit", "implicit-field"):
            raise UsageError(f"--base {self.base}: the field corrects a feed-forward upsampler (bilinear, bilateral, "
                             "jbu, pac or a checkpoint), not another fit")


@dataclass
class TrainConfig:
    images: list[str]
    out: str
    backbone: str = option("efficientnet-lite0", "Backbone name, timm:<model> or itpn:<checkpoint>; attention: a comma list "
                           "(with --layer, every backbone at every layer is one feature source, one drawn per step).")
    upsampler: str = option("jbu", "jbu, pac or resize-conv (multi-view reconstruction), or attention (scale objective).")
    steps: int = option(2000, "Optimizer steps in all (also when resuming).", min=1)
    batch_size: int = option(4, "Images per step, over all processes.", min=1)
    lr: float = option(1e-3, "NAdam learning rate.")
    image_sizes: list[tuple[int, int]] = field(default_factory=lambda: [(224, 224)])
    input_scales: list[float] | None = None  # None: 2,3,4 for attention, else 1 (FeatUp's objective)
    views: int = option(2, "Jittered views per image and step.", min=1)
    downsampler: str = option("attention", "attention or simple.")
    projection_dim: int = 30
    seed: int = option(0, "Seed of every random choice.")
    save_every: int = option(100, "Steps between checkpoints.", min=1)
    val: str | None = option(None, "Folder of held-out images: report the reconstruction loss at each checkpoint.")
    val_images: int = 16
    weights: str | None = option(None, "Local backbone checkpoint.")
    layer: str | None = option(None, "Backbone layer (default: the entry's own); attention: a comma list.")
    scale_target: str = option("pooled", "attention: predict the target features at the crop's pixels, then average "
                               "over each target cell (pooled), or straight at the target's grid (grid).")
    l2_weight: float = option(1.0, "attention: weight of the relative squared error next to 1 - cos.")
    upsampler_args: dict = field(default_factory=dict)
    device: str = "auto"

    def __post_init__(self):
        """Options given as text (``--image-size 112,96x144``, ``--input-scale``, ``--radius``) are parsed here."""
        if isinstance(self.image_sizes, str):
            self.image_sizes = parse_image_sizes(self.image_sizes)
        if isinstance(self.input_scales, str):
            self.input_scales = parse_input_scales(self.input_scales)
        if self.input_scales is None:
            self.input_scales = [2.0, 3.0, 4.0] if self.upsampler == "attention" else [1.0]
        if isinstance(self.upsampler_args.get("radius"), str):
            self.upsampler_args = {**self.upsampler_args, "radius": parse_radius(self.upsampler_args["radius"])}

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues."""
        d = asdict(self)
        for key in ("steps", "save_every", "val", "val_images", "device", "out"):
            d.pop(key)
        d["image_sizes"] = [list(s) for s in self.image_sizes]
        if self.input_scales == [1.0]:  # FeatUp's objective: runs from before the option existed resume
            d.pop("input_scales")
        if self.upsampler != "attention":  # the scale objective's settings; runs from before they existed resume
            d.pop("scale_target")
            d.pop("l2_weight")
        return d


@dataclass
class ZSSRConfig:
    crop: int = 128
    max_iters: int = option(3000, "ZSSR: most training iterations per image.")
    min_iters: int = 256          # between learning-rate changes
    learning_rate: float = 1e-3
    min_learning_rate: float = 9e-6
    test_every: int = 50          # reconstruction error of the whole image
    policy_every: int = 60        # learning-rate check
    change_ratio: float = 1.5
    noise_std: float = option(
        0.0, "ZSSR: noise std added to the sons, for noisy real images (ZSSR: 0.0125).", flag=("--noise",))
    min_scale: float = 0.5        # fathers are the image downscaled by U[min_scale, 1]
    ensemble: bool | None = None  # None: when the degradation commutes with rotations
    back_projection: int | None = None  # None: 10, or 2 for an asymmetric degradation
    seed: int = option(0, "ZSSR: seed of the crops and initial weights.")

    def check(self) -> None:
        """A one-line ``UsageError`` for a setting that cannot run (CLI names where the CLI sets them)."""
        for name, flag in (("max_iters", "--max-iters"), ("crop", "crop"), ("min_iters", "min_iters"),
                           ("test_every", "test_every"), ("policy_every", "policy_every")):
            if getattr(self, name) < 1:
                raise UsageError(f"{flag} must be at least 1, got {getattr(self, name)}")
        if self.noise_std < 0:
            raise UsageError(f"--noise must be 0 or more, got {self.noise_std}")
        if not 0 < self.min_learning_rate <= self.learning_rate:
            raise UsageError("learning rates must be positive, the minimum no larger than the start")
        if not 0 < self.min_scale <= 1:
            raise UsageError(f"min_scale must be in (0, 1], got {self.min_scale}")


@dataclass
class MZSRConfig:
    images: list[str]
    out: str
    scale: int = option(2, "2, 3 or 4.")
    subsample: str = option("bicubic", "How task LR images are made after the blur: bicubic or direct.")
    pretrain_steps: int = option(5000, "Stage 1 steps, bicubic pretraining (paper: 800k).")     # stage 1 (paper: 800k)
    pretrain_batch: int = 16       # paper: 32 patches of 96 px
    pretrain_patch: int = 64
    pretrain_lr: float = 4e-4      # halved at 1/2 and 3/4 of stage 1 (paper: every 100k, floor 1e-4)
    meta_steps: int = option(100, "Stage 2 steps, meta-transfer learning (paper: 100k).")
    tasks: int = option(5, "Tasks (kernels) per meta-step.")
    task_batch: int = 8            # support patches; as many query patches
    task_patch: int = 64
    inner_steps: int = 5
    inner_lr: float = 1e-2
    meta_lr: float = option(1e-4, "Adam learning rate of stage 2 (paper: 1e-4).")
    kernel_size: int = 15
    plain_tasks: float = option(0.2, "Share of tasks without blur.")
    anneal_steps: int | None = None  # meta-steps over which the query weights move to the last inner step
                                     # (None: equal weights, as MZSR's released code ran)
    init: str | None = option(None, "Start from this network (e.g. a finished stage 1, with --pretrain-steps 0).")
    seed: int = option(0, "Seed of every random choice.")
    save_every: int = option(200, "Steps between checkpoints.")
    device: str = "auto"

    @property
    def steps(self) -> int:
        return self.pretrain_steps + self.meta_steps

    def check(self) -> None:
        from .sr.degrade import SUBSAMPLINGS

        if self.subsample not in SUBSAMPLINGS:
            raise UsageError(f"--subsample must be one of {', '.join(SUBSAMPLINGS)}, got {self.subsample!r}")
        if self.scale not in (2, 3, 4):
            raise UsageError(f"--scale must be 2, 3 or 4, got {self.scale}")
        for name in ("pretrain_steps", "meta_steps"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more")
        for name in ("pretrain_batch", "pretrain_patch", "tasks", "task_batch", "task_patch", "inner_steps", "save_every"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
        if not 0 <= self.plain_tasks <= 1:
            raise UsageError(f"--plain-tasks is a share of the tasks, between 0 and 1, got {self.plain_tasks}")
        if self.meta_lr <= 0 or self.pretrain_lr <= 0 or self.inner_lr <= 0:
            raise UsageError("learning rates (--meta-lr) must be positive")
        if self.steps == 0:
            raise UsageError("nothing to train: --pretrain-steps and --meta-steps are both 0")

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues."""
        keep = asdict(self)
        for name in ("out", "save_every", "device", "images", "meta_steps"):  # stage 2 may be extended
            keep.pop(name)
        return keep


@dataclass
class ITPNPretrainConfig:
    images: list[str]
    out: str
    default_steps = 1000  # without --steps or --epochs (a class constant, not a field)
    arch: str = option("tiny", "tiny, small or base.")
    image_size: int = option(224, "Side of the random resized crops, a multiple of 16.")
    steps: int | None = option(None, "Optimiser steps. (default: 1000, unless --epochs)", show_default=False)
    epochs: float | None = option(None, "Passes over the images, instead of --steps.", show_default=False)
    batch_size: int = option(32, "Images per step, over all processes.")
    lr: float = option(1e-3, "Peak AdamW learning rate, after linear warmup; cosine decay after.")  # peak, after warmup
    min_lr: float = 1e-5
    warmup: float = option(0.05, "Share of the steps spent warming up.")  # share of the steps
    weight_decay: float = option(0.05, "AdamW weight decay (matrices only).")
    mask_ratio: float = option(0.75, "Share of the 16x16 patches dropped.")
    pixel_weight: float = option(1.0, "Weight of masked pixel reconstruction.")
    feature_weight: float = option(1.0, "Weight of masked feature modelling (0: pixels only).")
    feature_positions: str = option(
        "all", "Where feature targets are scored: masked (the dropped patches, through the decoder) or all (each level also at its visible patches).")
    teacher: str = option(
        "ema", "Feature targets: ema (a moving average of the network) or a backbone, e.g. efficientnet-lite0, dinov2, clip.")
    teacher_layer: str | None = option(None, "Layer of a backbone teacher. (default: its default)", show_default=False)
    teacher_weights: str | None = option(None, "Local weights file of a backbone teacher.")
    ema_decay: float = option(0.998, "Decay of the EMA teacher.")
    drop_path: float = option(0.0, "Stochastic depth of the attention blocks.")
    arch_overrides: dict = field(default_factory=dict)  # e.g. {"depth": 2}, for tests
    workers: int | None = option(
        None, "Data-loading processes. (default: 0 when the images fit in memory; up to 8 when more than 5000 are streamed from disk)", show_default=False)
    preview_every: int = option(0, "Write a reconstruction PNG every N steps beside --out (0: never).")
    save_every: int = option(200, "Steps between checkpoints.")
    seed: int = option(0, "Seed of every random choice.")
    device: str = "auto"

    def check(self) -> None:
        from .backbones.itpn import PATCH, arch_config

        if self.image_size % PATCH or self.image_size < PATCH:
            raise UsageError(f"--image-size must be a multiple of {PATCH}, got {self.image_size}")
        if not 0 <= self.mask_ratio < 1:
            raise UsageError(f"--mask-ratio must be in [0, 1), got {self.mask_ratio}")
        if self.steps is not None and self.epochs is not None:
            raise UsageError("give --steps or --epochs, not both")
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs <= 0):
            raise UsageError("--steps and --epochs must be positive")
        if self.save_every < 1 or self.preview_every < 0 or (self.workers is not None and self.workers < 0):
            raise UsageError("--save-every must be at least 1, --preview-every and --workers 0 or more")
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.warmup < 1:
            raise UsageError("--batch-size and --lr must be positive and --warmup in [0, 1)")
        if self.pixel_weight < 0 or self.feature_weight < 0 or self.pixel_weight + self.feature_weight == 0:
            raise UsageError("--pixel-weight and --feature-weight must be >= 0, and not both 0")
        if self.feature_positions not in ("masked", "all"):
            raise UsageError(f"--feature-positions must be masked or all, got {self.feature_positions!r}")
        if round((self.image_size // PATCH) ** 2 * self.mask_ratio) == 0 and (
                self.pixel_weight > 0 or self.feature_positions == "masked"):
            raise UsageError(f"--mask-ratio {self.mask_ratio} drops no patch of a {self.image_size}-px crop, so "
                             "nothing is left to reconstruct: use --pixel-weight 0 --feature-positions all")
        if self.teacher == "ema" and (self.teacher_layer is not None or self.teacher_weights is not None):
            raise UsageError("--teacher-layer and --teacher-weights set a backbone teacher, not --teacher ema")
        if self.teacher != "ema" and self.ema_decay != ITPNPretrainConfig.ema_decay:
            raise UsageError(f"--ema-decay sets the EMA teacher, not --teacher {self.teacher}")
        arch_config(self.arch, **self.arch_overrides)

    def identity(self) -> dict:
        """What a resumed run must share with the run it continues (the length may change)."""
        keep_ = asdict(self)
        for name in ("out", "images", "steps", "epochs", "workers", "preview_every", "save_every", "device"):
            keep_.pop(name)
        return keep_


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


def parse_arch(text: str | None) -> dict[str, int]:
    """``"kernel_size=5,heads=8"`` -> ``{"kernel_size": 5, "heads": 8}`` (``--arch``; whole numbers only)."""
    arch = {}
    for item in (text or "").split(","):
        key, sep, value = item.partition("=")
        if not item.strip():
            continue
        try:
            if not sep or not key.strip().isidentifier():
                raise ValueError
            arch[key.strip()] = int(value)
        except ValueError:
            raise UsageError(f"--arch: expected KEY=VALUE pairs of whole numbers, e.g. kernel_size=5,heads=8; "
                             f"got {text!r}") from None
    return arch


def parse_radius(text: str) -> int | list[int]:
    """``"3"`` -> ``3`` (every JBU stage 7x7); ``"3,3,3,2,1"`` -> one radius per stage, coarsest first."""
    from .upsamplers.jbu import MAX_RADIUS

    radii = number_list(text, "--radius", int, 0, MAX_RADIUS, "radius")
    return radii[0] if len(radii) == 1 else radii
