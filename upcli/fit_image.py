"""``upcli fit-image``: an implicit field fitted to each image, rendered at any resolution into the feature store.

The same batch engine as ``upcli upsample`` (:func:`upcli.io.jobs.run_job`), with a per-image fit as the model
step. Each image is its own shard by default, so an interrupted folder run loses at most the image being fitted.
With ``save_fields``, each fitted field goes to ``OUT/fields/<image path>.safetensors``; a later run with
``from_fields`` renders those fields at another size without refitting, and writes the same store format.
"""

from __future__ import annotations

import functools
import json
from dataclasses import asdict
from pathlib import Path

from .errors import BadImageError, UsageError
from .io.images import ImageRef, load_rgb, target_size
from .io.jobs import Item, Job, JobResult, resolve_split, run_job
from .io.store import to_storage
from .progress import ProgressReporter, Timings
from .upsample import (DEFAULT_SIZE, _check_choices, _scan, _weights_identity, check_output_bytes, checkpoint_digests,
                       default_workers, parse_size, resolve_device)
from .upsamplers.implicit import FitConfig


def output_size(orig: tuple[int, int], size: int | None, scale: float | None) -> tuple[int, int]:
    """``(H, W)`` of the output: the shorter side ``size``, or ``scale`` times the image, or the image's own."""
    if scale is not None:
        return max(1, round(orig[0] * scale)), max(1, round(orig[1] * scale))
    return target_size(*orig, size)


def inputs_of(path: Path, out: Path | None = None) -> tuple[Path, list[ImageRef]]:
    """The root and image list of IMAGE_OR_FOLDER: one file, or every image under a folder (leaving out ``out``)."""
    if path.is_file():
        root = path.parent.resolve()
        return root, [ImageRef(path=path.resolve(), rel=path.name)]
    if not path.exists():
        raise UsageError(f"{str(path)!r} does not exist")
    return path.resolve(), _scan(path, exclude=out)


def field_path(field_dir: Path, rel: str) -> Path:
    return field_dir / f"{rel}.safetensors"


def load_for_fit(ref: ImageRef, size: int | None, scale: float | None, stride: int, dim: int,
                 from_fields: Path | None = None) -> dict:
    """Decode one image (DataLoader worker) and check that it can be fitted (or its field found) and stored."""
    import torch

    if from_fields is not None and not field_path(from_fields, ref.rel).is_file():
        raise BadImageError(ref.path, f"no saved field {field_path(from_fields, ref.rel)}")
    rgb = load_rgb(ref.path)
    orig = rgb.shape[:2]
    if min(orig) < stride:
        raise BadImageError(ref.path, f"image is {orig[1]}x{orig[0]} px, smaller than one cell of the backbone's "
                                      f"grid ({stride} px)")
    out = output_size(orig, size, scale)
    check_output_bytes(ref, out, dim)
    return {"image": torch.from_numpy(rgb), "orig_size": tuple(orig), "size": out}


class FitStep:
    """The model step: fit (or load) each image's field, render it at the output size."""

    def __init__(self, backbone, cfg: FitConfig, device, dtype: str, field_dir: Path | None, from_fields: Path | None,
                 preview_dir: Path, preview: int, reporter: ProgressReporter):
        self.backbone, self.cfg, self.device, self.dtype = backbone, cfg, device, dtype
        self.field_dir, self.from_fields = field_dir, from_fields
        self.preview_dir, self.preview, self.reporter = preview_dir, preview, reporter
        self.attrs = {"backbone": backbone.name, "layer": str(backbone.layer), "upsampler": "implicit", "dtype": dtype}

    def __call__(self, items: list[Item], timings: Timings) -> list:
        import torch

        from .upsamplers.implicit import FieldUpsampler, fit_field
        from .upsamplers.jbu import save_upsampler

        results = []
        for item in items:
            image = item.data["image"].to(self.device).permute(2, 0, 1)[None].float().div_(255)
            size = item.data["size"]
            extra = {}
            if self.from_fields is not None:
                with timings.measure("load field"):
                    field = FieldUpsampler(self.backbone, checkpoint=str(field_path(self.from_fields, item.ref.rel)))
                    field = field.to(self.device).eval()
            else:
                with timings.measure("fit"):
                    fit = fit_field(self.backbone, image, self.cfg)
                field = fit.upsampler
                extra = {"fit_seconds": round(fit.seconds, 3), "fit_loss": round(sum(fit.losses[-10:]) / len(fit.losses[-10:]), 6)}
                if self.field_dir is not None:
                    with timings.measure("save field"):
                        path = field_path(self.field_dir, item.ref.rel)
                        path.parent.mkdir(parents=True, exist_ok=True)
                        save_upsampler(path, field, self.backbone, extra={"source": item.ref.rel})
            with timings.measure("render"), torch.inference_mode():
                high = field(None, image, size)
            with timings.measure("to host"):
                array = to_storage(high[0], self.dtype)
            results.append((array, {**self.attrs, **extra, "orig_size": item.data["orig_size"], "size": size}))
            if item.index < self.preview:
                self._save_preview(item, image, field.lr_feats[0], high[0])
            if extra:
                self.reporter.log(f"fitted {item.ref.rel} in {extra['fit_seconds']:.1f} s, loss {extra['fit_loss']:.4f}")
        return results

    def _save_preview(self, item: Item, image, low, high) -> None:
        from .upsamplers import guidance_at
        from .viz import save_preview

        pixels = guidance_at(image, tuple(high.shape[-2:]))[0].mul(255).round().clamp(0, 255).byte()
        name = item.ref.rel.replace("/", "__").rsplit(".", 1)[0] + ".png"
        save_preview(self.preview_dir / name, pixels.permute(1, 2, 0).cpu().numpy(), low.float().cpu(), high.float().cpu())


def fit_images(
    images,
    out,
    *,
    backbone: str = "efficientnet-lite0",
    weights: str | None = None,
    layer: str | None = None,
    size: int | str | None = None,
    scale: float | None = None,
    fit: FitConfig = FitConfig(),
    save_fields: bool = False,
    from_fields: str | Path | None = None,
    dtype: str = "float16",
    compression: str = "none",
    shard_size: int = 1,
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
    """Fit an implicit field to each image (a file, or every image under a folder) and store its features.

    The output size is ``size`` (shorter side, or "original"), or ``scale`` times the image; by default 448."""
    import torch

    from .backbones import create_backbone
    from .upsamplers import create_upsampler

    if scale is not None:
        if size is not None:
            raise UsageError("give --size or --scale, not both")
        if not scale > 0:
            raise UsageError(f"--scale must be positive, got {scale}")
    size = parse_size(DEFAULT_SIZE if size is None and scale is None else size)
    fit.check()
    _check_choices(dtype=dtype, compression=compression, shard_size=shard_size, preview=preview)
    if from_fields is not None and save_fields:
        raise UsageError("--from-fields renders saved fields; it cannot be combined with --save-field")
    if from_fields is not None and not Path(from_fields).is_dir():
        raise UsageError(f"--from-fields {str(from_fields)!r} is not a folder")
    split = resolve_split(num_shards, shard_index)
    root, inputs = inputs_of(Path(images), Path(out))
    device = resolve_device(device)
    model = create_backbone(backbone, weights=weights, layer=layer).to(device).eval()
    if from_fields is None:
        create_upsampler(fit.base, backbone=model)  # a bad --base fails here, before anything is written
    settings = {
        "backbone": backbone, "weights": _weights_identity(weights), "layer": str(model.layer),
        "size": size or "original", "scale": scale, "dtype": dtype, "compression": compression,
        **({"from_fields": str(Path(from_fields).resolve())} if from_fields is not None else {"fit": asdict(fit)}),
        **({"save_fields": True} if save_fields else {}),  # only when set: stores made without it still resume
        **checkpoint_digests(backbone=backbone, base=None if from_fields is not None else fit.base),
    }
    out = Path(out)
    job = Job(out, root, "fit-image", inputs, settings, shard_size)
    reporter = ProgressReporter("fit-image", quiet=quiet, log_every=log_every)
    step = FitStep(model, fit, device, dtype, out / "fields" if save_fields else None,
                   Path(from_fields) if from_fields is not None else None, out / "previews", preview, reporter)
    timings = Timings(torch.cuda.synchronize if device.type == "cuda" else None)
    load = functools.partial(load_for_fit, size=size, scale=scale, stride=model.stride, dim=model.dim,
                             from_fields=step.from_fields)
    return run_job(
        job, load, step, split=split, shard_attrs={"command": "fit-image", "settings": json.dumps(settings, sort_keys=True)},
        compression=compression, batch_size=1, workers=default_workers() if workers is None else workers, strict=strict,
        overwrite=overwrite, reporter=reporter, timings=timings,
    )
