"""``upcli fit-image``: an implicit field fitted to each image, rendered at any resolution into the feature store.

The same batch engine as ``upcli upsample`` (:func:`upcli.io.jobs.run_job`), with a per-image fit as the model
step. Each image is its own shard by default, so an interrupted folder run loses at most the image being fitted.
With ``save_fields``, each fitted field goes to ``OUT/fields/<image path>.safetensors``; a later run with
``from_fields`` renders those fields at another size without refitting, and writes the same store format.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import asdict
from pathlib import Path

from .configs import FeatureOptions, FitConfig, JobOptions
from .errors import BadImageError, UsageError
from .io.images import DEFAULT_SIZE, ImageRef, load_rgb, parse_size, printable_name, target_size
from .io.jobs import Item, JobResult, Output, file_identity, prepare_job, preview_name
from .io.compact import STORES
from .io.store import check_feature_bytes, check_feature_format, to_storage
from .runtime import resolve_device

SHARD_SIZE = 1  # images per shard file: an interrupted folder run loses at most the image being fitted


def output_size(orig: tuple[int, int], size: int | None, scale: float | None) -> tuple[int, int]:
    """``(H, W)`` of the output: the shorter side ``size``, or ``scale`` times the image, or the image's own."""
    if scale is not None:
        return max(1, round(orig[0] * scale)), max(1, round(orig[1] * scale))
    return target_size(*orig, size)


def field_path(field_dir: Path, rel: str) -> Path:
    return field_dir / f"{rel}.safetensors"


def load_for_fit(ref: ImageRef, size: int | None, scale: float | None, stride: int, dim: int,
                 from_fields: Path | None = None, keep_bytes: bool = False) -> dict:
    """Decode one image (DataLoader worker) and check that it can be fitted (or its field found) and stored;
    ``keep_bytes``: also the file's bytes, the ones decoded (a compact store keeps them)."""
    import numpy as np
    import torch

    if from_fields is not None and not field_path(from_fields, ref.rel).is_file():
        raise BadImageError(ref.path, f"no saved field {field_path(from_fields, ref.rel)}")
    data = ref.path.read_bytes() if keep_bytes else None
    rgb = load_rgb(ref.path, data)
    orig = rgb.shape[:2]
    if min(orig) < stride:
        raise BadImageError(ref.path, f"image is {orig[1]}x{orig[0]} px, smaller than one cell of the backbone's "
                                      f"grid ({stride} px)")
    out = output_size(orig, size, scale)
    check_feature_bytes(ref, out, dim)
    item = {"image": torch.from_numpy(rgb), "orig_size": tuple(orig), "size": out}
    if keep_bytes:
        item["bytes"] = np.frombuffer(data, dtype=np.uint8)
    return item


class FitStep:
    """The model step: fit (or load) each image's field, render it at the output size. ``compact``: store the
    field (as ``--save-field`` does), the low-res features and the image's bytes instead (rendered on read)."""

    def __init__(self, backbone, cfg: FitConfig, device, dtype: str, save_fields: bool, from_fields: Path | None,
                 reporter, compact: bool = False):
        self.backbone, self.cfg, self.device, self.dtype = backbone, cfg, device, dtype
        self.save_fields, self.from_fields, self.reporter = save_fields, from_fields, reporter
        self.compact = compact
        self.attrs = {"backbone": backbone.name, "layer": str(backbone.layer), "upsampler": "implicit", "dtype": dtype}

    def __call__(self, items: list[Item], timings) -> list[Output]:
        import torch

        from .io.store import write_atomic
        from .upsamplers import guidance_at
        from .upsamplers.checkpoints import load_upsampler, save_upsampler, upsampler_bytes
        from .upsamplers.implicit import fit_field
        from .viz import save_preview

        results = []
        for item in items:
            image = item.data["image"].to(self.device).permute(2, 0, 1)[None].float().div_(255)
            size = item.data["size"]
            extra, files = {}, {}
            if self.from_fields is not None:
                with timings.measure("load field"):
                    field = load_upsampler(field_path(self.from_fields, item.ref.rel), self.backbone, "implicit-field")
                    field = field.to(self.device).eval()
            else:
                with timings.measure("fit"):
                    fit = fit_field(self.backbone, image, self.cfg)
                field = fit.upsampler
                extra = {"fit_seconds": round(fit.seconds, 3), "fit_loss": round(sum(fit.losses[-10:]) / len(fit.losses[-10:]), 6)}
                saved = str(field_path(Path("fields"), item.ref.rel))
                if self.compact:  # the store keeps the field and renders it on read: its sha256 says which
                    data = upsampler_bytes(field, self.backbone, {"source": item.ref.rel})
                    files[saved] = functools.partial(write_atomic, data=data)
                    extra.update(store="compact", upsampler_checkpoint=saved, guidance="original",
                                 upsampler_sha256=hashlib.sha256(data).hexdigest(), upsampler_args="{}")
                elif self.save_fields:
                    files[saved] = functools.partial(save_upsampler, upsampler=field, backbone=self.backbone,
                                                     extra={"source": item.ref.rel})
            high = None
            if not self.compact or item.preview:
                with timings.measure("render"), torch.inference_mode():
                    high = field(None, image, size)
            with timings.measure("to host"):
                array = to_storage(field.lr_feats[0] if self.compact else high[0], self.dtype)
            if item.preview:
                pixels = guidance_at(image, tuple(high.shape[-2:]))[0].mul(255).round().clamp(0, 255).byte()
                files[preview_name(item.ref.rel)] = functools.partial(
                    save_preview, image=pixels.permute(1, 2, 0).cpu().numpy(), lr_feats=field.lr_feats[0].float().cpu(),
                    hr_feats=high[0].float().cpu())
            output = Output(array, {**self.attrs, **extra, "orig_size": item.data["orig_size"], "size": size}, files)
            if self.compact:
                output.attrs["upsampler"] = "implicit-field"
                output.extra["images"] = item.data["bytes"]
            results.append(output)
            if extra:
                self.reporter.log(f"fitted {printable_name(item.ref.rel)} in {extra['fit_seconds']:.1f} s, loss {extra['fit_loss']:.4f}")
        return results


def fit_images(
    images,
    options: JobOptions,
    features: FeatureOptions = FeatureOptions(),
    fit: FitConfig = FitConfig(),
    *,
    size: int | str | None = None,
    scale: float | None = None,
    save_fields: bool = False,
    from_fields: str | Path | None = None,
    store: str = "full",
) -> JobResult:
    """Fit an implicit field to each image (a file, or every image under a folder) and store its features.

    The output size is ``size`` (shorter side, or "original"), or ``scale`` times the image; by default 448.
    ``store="compact"`` keeps each image's field (in ``OUT/fields``, as ``save_fields``), its low-res features
    and its bytes, and the maps are rendered on read (:mod:`.io.compact`)."""
    from .backbones import create_backbone
    from .upsamplers import create_upsampler

    if scale is not None:
        if size is not None:
            raise UsageError("give --size or --scale, not both")
        if not scale > 0:
            raise UsageError(f"--scale must be positive, got {scale}")
    size = parse_size(DEFAULT_SIZE if size is None and scale is None else size)
    fit.check()
    f = features
    check_feature_format(f.dtype, f.compression)
    if from_fields is not None and save_fields:
        raise UsageError("--from-fields renders saved fields; it cannot be combined with --save-field")
    if from_fields is not None and fit != FitConfig():
        raise UsageError("--from-fields renders saved fields: the fit options (--steps, --views, ...) do not apply")
    if store not in STORES:
        raise UsageError(f"--store must be one of {', '.join(STORES)}, got {store!r}")
    if store == "compact" and from_fields is not None:
        raise UsageError("--store compact keeps the fields it fits; --from-fields renders saved ones into a full store")
    if from_fields is not None and not Path(from_fields).is_dir():
        raise UsageError(f"--from-fields {str(from_fields)!r} is not a folder")
    plan = prepare_job("fit-image", images, options, SHARD_SIZE,
                       checkpoints={"backbone": f.backbone, "base": None if from_fields is not None else fit.base})
    device = resolve_device(options.device)
    model = create_backbone(f.backbone, weights=f.weights, layer=f.layer).to(device).eval()
    if from_fields is None:
        create_upsampler(fit.base, backbone=model)  # a bad --base fails here, before anything is written
    settings = {
        "backbone": f.backbone, "weights": file_identity(f.weights), "layer": str(model.layer),
        "size": size or "original", "scale": scale, "dtype": f.dtype, "compression": f.compression,
        **({"from_fields": str(Path(from_fields).resolve())} if from_fields is not None else {"fit": asdict(fit)}),
        **({"save_fields": True} if save_fields else {}),  # only when set: stores made without it still resume
        **({"store": "compact"} if store == "compact" else {}),
    }
    from_fields = Path(from_fields) if from_fields is not None else None
    compact = store == "compact"
    step = FitStep(model, fit, device, f.dtype, save_fields, from_fields, plan.reporter, compact)
    load = functools.partial(load_for_fit, size=size, scale=scale, stride=model.stride, dim=model.dim,
                             from_fields=from_fields, keep_bytes=compact)
    return plan.run(plan.job(settings), load, step, device, f.compression)
