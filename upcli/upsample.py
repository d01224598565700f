"""``upcli upsample``: a backbone over an image folder, features upsampled to image resolution, into HDF5 shards."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from .errors import BadImageError, UsageError
from .io.jobs import Item, Job, JobResult, resolve_split, run_job
from .io.images import IMAGE_EXTENSIONS, ImageRef, image_size, load_rgb, resize_rgb, scan_images, target_size
from .io.store import COMPRESSIONS, DTYPES, to_storage
from .progress import ProgressReporter, Timings

DEFAULT_SIZE = 448


def parse_size(value: str | int | None) -> int | None:
    """``--size``: a positive int (shorter side) or "original"."""
    if value is None or value == "original":
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise UsageError(f"--size must be a positive integer or 'original', got {value!r}") from None
    if size < 1:
        raise UsageError(f"--size must be a positive integer or 'original', got {value!r}")
    return size


def resolve_device(device: str):
    import torch

    if device == "auto":  # under torchrun or srun, each local process takes its own GPU
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; use --device cpu")
    index = device.partition(":")[2]
    if index and not (index.isdigit() and int(index) < torch.cuda.device_count()):
        raise UsageError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 ...)")
    return torch.device(device)


def default_workers() -> int:
    return max(1, min(4, (os.cpu_count() or 2) - 1))


MAX_OUTPUT_BYTES = 16 * 2**30  # float32 features of one image, before storage


def check_output_bytes(ref: ImageRef, size: tuple[int, int], dim: int) -> None:
    """A ``BadImageError`` for an image whose features at ``size`` would not fit in memory (e.g. a long strip)."""
    if dim * size[0] * size[1] * 4 > MAX_OUTPUT_BYTES:
        raise BadImageError(ref.path, f"output {size[1]}x{size[0]} x {dim} channels would take "
                                      f"{dim * size[0] * size[1] * 4 / 2**30:.0f} GiB; lower --size")


def load_resized(ref: ImageRef, size: int | None, dim: int) -> dict:
    """Decode and resize one image (runs in DataLoader workers)."""
    import torch

    rgb = load_rgb(ref.path)
    orig = rgb.shape[:2]
    check_output_bytes(ref, target_size(*orig, size), dim)
    rgb = resize_rgb(rgb, target_size(*orig, size))
    return {"image": torch.from_numpy(rgb), "orig_size": tuple(orig)}


class UpsampleStep:
    """The model step of the job: backbone, then upsampler, for each group of same-size images."""

    def __init__(self, backbone, upsampler, device, dtype: str, preview_dir: Path | None = None, preview: int = 0):
        self.backbone, self.upsampler, self.device, self.dtype = backbone, upsampler, device, dtype
        self.preview_dir, self.preview = preview_dir, preview
        self.attrs = {"backbone": backbone.name, "layer": str(backbone.layer), "upsampler": upsampler.name, "dtype": dtype}

    def __call__(self, items: list[Item], timings: Timings) -> list:
        import torch

        results = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item.data["image"].shape[:2]), []).append(i)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")
        for size, members in groups.items():
            pixels = torch.stack([items[i].data["image"] for i in members]).to(self.device)
            # NCHW-contiguous: a channels-last view would make every map channels-last and its storage a slow transpose
            images = pixels.permute(0, 3, 1, 2).float().div_(255).contiguous()
            with torch.inference_mode(), autocast:
                with timings.measure("backbone"):
                    low = self.backbone(images)
                with timings.measure("upsample"):
                    high = self.upsampler(low, images, size=size)
            with timings.measure("to host"):
                arrays = [to_storage(feats, self.dtype) for feats in high]
            for j, i in enumerate(members):
                attrs = {**self.attrs, "orig_size": items[i].data["orig_size"], "size": size}
                results[i] = (arrays[j], attrs)
                if items[i].index < self.preview:
                    self._save_preview(items[i], pixels[j], low[j], high[j])
        return results

    def _save_preview(self, item: Item, pixels, low, high) -> None:
        from .viz import save_preview

        name = item.ref.rel.replace("/", "__").rsplit(".", 1)[0] + ".png"
        self.preview_dir.mkdir(parents=True, exist_ok=True)
        save_preview(self.preview_dir / name, pixels.cpu().numpy(), low.float().cpu(), high.float().cpu())


def upsample_folder(
    folder,
    out,
    *,
    backbone: str = "efficientnet-lite0",
    weights: str | None = None,
    layer: str | None = None,
    upsampler: str = "bilinear",
    upsampler_args: dict | None = None,
    size: int | str | None = DEFAULT_SIZE,
    dtype: str = "float16",
    compression: str = "none",
    shard_size: int = 16,
    batch_size: int = 1,
    workers: int | None = None,
    device: str = "auto",
    num_shards: int | None = None,
    shard_index: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    preview: int = 0,
    quiet: bool = False,
    log_every: float = 30.0,
) -> JobResult:
    """Write image-resolution features for every image under ``folder`` into HDF5 shards in ``out``."""
    import torch

    from .backbones import create_backbone
    from .upsamplers import create_upsampler

    size = parse_size(size)
    _check_choices(dtype=dtype, compression=compression, shard_size=shard_size, batch_size=batch_size, preview=preview)
    split = resolve_split(num_shards, shard_index)
    root = Path(folder)
    inputs = _scan(root, exclude=out)
    if upsampler_args and upsampler != "bilateral":
        raise UsageError(f"--sigma-spatial and --sigma-color set the bilateral upsampler, not {upsampler}")
    if upsampler == "implicit-field":
        raise UsageError("implicit-field renders one image's saved field: use `upcli fit-image IMAGE --from-fields DIR`")
    device = resolve_device(device)
    model = create_backbone(backbone, weights=weights, layer=layer).to(device).eval()
    up = create_upsampler(upsampler, backbone=model, **(upsampler_args or {})).to(device).eval()
    if up.name == "implicit-field":  # fitted to one image: it would paint that image's features on every other
        from .checkpoints import read_config

        raise UsageError(f"--upsampler {upsampler} is the field fitted to the single image "
                         f"{read_config(upsampler).get('source')!r}; render it with `upcli fit-image IMAGE --from-fields DIR`")
    settings = {
        "backbone": backbone, "weights": _weights_identity(weights), "layer": str(model.layer), "upsampler": upsampler,
        "upsampler_args": upsampler_args or {}, "size": size or "original", "dtype": dtype, "compression": compression,
        **checkpoint_digests(backbone=backbone, upsampler=upsampler),
    }
    job = Job(Path(out), root.resolve(), "upsample", inputs, settings, shard_size)
    step = UpsampleStep(model, up, device, dtype, Path(out) / "previews", preview)
    reporter = ProgressReporter("upsample", quiet=quiet, log_every=log_every)
    timings = Timings(torch.cuda.synchronize if device.type == "cuda" else None)
    return run_job(
        job, functools.partial(load_resized, size=size, dim=model.dim), step, split=split,
        shard_attrs={"command": "upsample", "settings": json.dumps(settings, sort_keys=True)}, compression=compression,
        batch_size=batch_size, workers=default_workers() if workers is None else workers, strict=strict,
        overwrite=overwrite, reporter=reporter, timings=timings,
    )


def plan_upsample(folder, *, backbone: str = "efficientnet-lite0", layer: str | None = None,
                  size: int | str | None = DEFAULT_SIZE, dtype: str = "float16") -> dict:
    """What ``upsample_folder`` would write, from image headers alone (``--dry-run``)."""
    import numpy as np

    from .backbones import get_backbone_cfg

    size = parse_size(size)
    _check_choices(dtype=dtype)
    inputs = _scan(Path(folder))
    cfg = get_backbone_cfg(backbone, layer=layer)
    itemsize = np.dtype("float32").itemsize if dtype == "float32" else 2
    shapes, bad = {}, {}
    for ref in inputs:
        try:
            shapes[ref.rel] = (cfg.dim, *target_size(*image_size(ref.path), size))
        except BadImageError as e:
            bad[ref.rel] = e.reason
    total = sum(int(np.prod(shape)) * itemsize for shape in shapes.values())
    return {"images": len(inputs), "shapes": shapes, "bad": bad, "bytes": total}


def _check_choices(dtype="float16", compression="none", shard_size=1, batch_size=1, preview=0) -> None:
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if compression not in COMPRESSIONS:
        raise UsageError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got {compression!r}")
    for flag, value in (("--shard-size", shard_size), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    if preview < 0:
        raise UsageError(f"--preview must be 0 or more, got {preview}")


def _scan(folder: Path, exclude=None) -> list[ImageRef]:
    inputs = scan_images(folder, exclude)
    if not inputs:
        raise UsageError(f"{folder}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return inputs


def checkpoint_digests(**specs) -> dict:
    """``{"<name>_sha256": digest}`` for each spec that names a checkpoint file (``itpn:PATH`` too), so that a job
    run with a retrained checkpoint is another job, not a resume of the old results."""
    import hashlib

    digests = {}
    for name, spec in specs.items():
        path = Path(str(spec).removeprefix("itpn:")) if spec is not None else None
        if path is not None and path.is_file():
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            digests[f"{name}_sha256"] = digest.hexdigest()
    return digests


def _weights_identity(weights) -> dict | None:
    if weights is None:
        return None
    path = Path(weights)
    stat = path.stat() if path.exists() else None
    return {"path": str(path.resolve()), "bytes": stat.st_size if stat else None}
