"""``upcli upsample``: a backbone over images, features upsampled to image resolution, into HDF5 shards."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any

import numpy as np

from .errors import BadImageError, UsageError
from .io.images import DEFAULT_SIZE, ImageRef, image_size, load_rgb, parse_size, resize_rgb, target_size
from .configs import FeatureOptions, JobOptions
from .io.jobs import Item, JobResult, Output, file_identity, prepare_job, preview_name
from .io.compact import STORES
from .io.store import check_feature_bytes, check_feature_format, to_storage
from .runtime import inference_autocast, resolve_device

SHARD_SIZE = 16  # images per shard file


def load_resized(ref: ImageRef, size: int | None, dim: int, keep_bytes: bool = False) -> dict:
    """Decode and resize one image (runs in DataLoader workers); ``keep_bytes``: also the file's bytes, the
    ones decoded (a compact store keeps them)."""
    import torch

    data = ref.path.read_bytes() if keep_bytes else None
    rgb = load_rgb(ref.path, data)
    orig = rgb.shape[:2]
    check_feature_bytes(ref, target_size(*orig, size), dim)
    rgb = resize_rgb(rgb, target_size(*orig, size))
    item = {"image": torch.from_numpy(rgb), "orig_size": tuple(orig)}
    if keep_bytes:
        item["bytes"] = np.frombuffer(data, dtype=np.uint8)
    return item


class UpsampleStep:
    """The model step of the job: backbone, then upsampler, for each group of same-size images. ``compact``:
    the backbone only; its low-res features and the image's bytes are stored (the upsampler runs for previews)."""

    def __init__(self, backbone, upsampler, device, dtype: str, compact: dict | None = None, compare: dict | None = None):
        self.backbone, self.upsampler, self.device, self.dtype = backbone, upsampler, device, dtype
        self.compare = compare or {}  # more upsamplers, by name, shown beside this one in the previews
        self.attrs = {"backbone": backbone.name, "layer": str(backbone.layer), "upsampler": upsampler.name, "dtype": dtype}
        self.compact = compact  # {"attrs": ..., "files": ...}: what each compact image adds
        if compact is not None:
            self.attrs.update(compact["attrs"])

    def __call__(self, items: list[Item], timings) -> list[Output]:
        import torch

        from .upsamplers import upsample_features
        from .viz import save_preview

        results = [None] * len(items)
        stored = getattr(torch, self.dtype)
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple(item.data["image"].shape[:2]), []).append(i)
        for size, members in groups.items():
            pixels = torch.stack([items[i].data["image"] for i in members]).to(self.device)
            # NCHW-contiguous: a channels-last view would make every map channels-last and its storage a slow transpose
            images = pixels.permute(0, 3, 1, 2).float().div_(255).contiguous()
            with torch.inference_mode(), inference_autocast(self.device), timings.measure("backbone"):
                low = self.backbone(images)
            high = None
            if self.compact is None or any(items[i].preview for i in members):
                with timings.measure("upsample"):  # made in the stored dtype (the largest tensor: made once)
                    high = upsample_features(self.upsampler, low, images, size, self.device, stored)
            with timings.measure("to host"):
                arrays = [to_storage(feats, self.dtype) for feats in (high if self.compact is None else low)]
            for j, i in enumerate(members):
                output = Output(arrays[j], {**self.attrs, "orig_size": items[i].data["orig_size"], "size": size})
                if self.compact is not None:
                    output.extra["images"] = items[i].data["bytes"]
                    output.files.update(self.compact["files"])
                if items[i].preview:
                    shown = {self.upsampler.name: high[j].float().cpu()}
                    for name, other in self.compare.items():  # as stored too: the same colours as in its own run
                        shown[name] = upsample_features(other, low[j:j + 1], images[j:j + 1], size, self.device,
                                                        stored)[0].float().cpu()
                    output.files[preview_name(items[i].ref.rel)] = functools.partial(
                        save_preview, image=pixels[j].cpu().numpy(), lr_feats=low[j].float().cpu(), hr_feats=shown)
                results[i] = output
        return results


@dataclasses.dataclass
class PreparedUpsample:
    """An ``upsample`` job that passed every check made before its first image (:func:`prepare_upsample`)."""

    plan: Any
    job: Any
    step: UpsampleStep
    load: Any
    device: Any
    compression: str

    def run(self) -> JobResult:
        return self.plan.run(self.job, self.load, self.step, self.device, self.compression)


def prepare_upsample(images, options: JobOptions, features: FeatureOptions = FeatureOptions(), *,
                     upsampler: str = "bilinear", upsampler_args: dict | None = None,
                     size: int | str | None = DEFAULT_SIZE, store: str = "full", compare: str | None = None,
                     dry_run: bool = False) -> PreparedUpsample:
    """Every check that ``upsample`` makes before its first image, in its order, writing nothing: the options, the
    inputs and this process's part of a split, the backbone's weights, the upsampler for this backbone, and
    ``--out`` (free, or this same job's). The job and ``--dry-run`` both start here, so a dry run fails where
    the job would, with the same line and exit code. ``dry_run``: ``--out`` may be absent. ``compare``: a comma
    list of more upsamplers shown beside this one in the previews (the store holds this one's only)."""
    from .backbones import create_backbone
    from .io.jobs import check_out_dir
    from .upsamplers import create_upsampler

    size = parse_size(size)
    f = features
    check_feature_format(f.dtype, f.compression)
    if store not in STORES:
        raise UsageError(f"--store must be one of {', '.join(STORES)}, got {store!r}")
    plan = prepare_job("upsample", images, options, SHARD_SIZE, checkpoints={"backbone": f.backbone, "upsampler": upsampler},
                       dry_run=dry_run)
    if upsampler_args and upsampler != "bilateral":
        raise UsageError(f"--sigma-spatial and --sigma-color set the bilateral upsampler, not {upsampler}")
    if upsampler == "implicit-field":
        raise UsageError("implicit-field renders one image's saved field: use `upcli fit-image IMAGE --from-fields DIR`")
    device = resolve_device(options.device)
    model = create_backbone(f.backbone, weights=f.weights, layer=f.layer).to(device).eval()
    up = create_upsampler(upsampler, backbone=model, **(upsampler_args or {})).to(device).eval()
    if up.name == "implicit-field":  # fitted to one image: it would paint that image's features on every other
        from .checkpoints import read_config

        raise UsageError(f"--upsampler {upsampler} is the field fitted to the single image "
                         f"{read_config(upsampler).get('source')!r}; render it with `upcli fit-image IMAGE --from-fields DIR`")
    settings = {
        "backbone": f.backbone, "weights": file_identity(f.weights), "layer": str(model.layer), "upsampler": upsampler,
        "upsampler_args": upsampler_args or {}, "size": size or "original", "dtype": f.dtype, "compression": f.compression,
    }
    compact = compact_recipe(upsampler, model, upsampler_args or {}, up) if store == "compact" else None
    if compact is not None:
        settings.update(store="compact", upsampler_sha256=compact["attrs"]["upsampler_sha256"])
    job = plan.job(settings)
    if options.out is not None:
        check_out_dir(job, options.overwrite)
    others = [name for name in (compare or "").split(",") if name]
    if others and not options.preview:
        raise UsageError("--compare shows other upsamplers in the previews: give --preview N too")
    others = {name: create_upsampler(name, backbone=model).to(device).eval() for name in others}
    step = UpsampleStep(model, up, device, f.dtype, compact, others)
    load = functools.partial(load_resized, size=size, dim=model.dim, keep_bytes=compact is not None)
    return PreparedUpsample(plan, job, step, load, device, f.compression)


def upsample_folder(images, options: JobOptions, features: FeatureOptions = FeatureOptions(), **upsampling) -> JobResult:
    """Write image-resolution features of ``images`` (files, folders or patterns: see
    :func:`upcli.io.images.collect_images`; ``options`` may filter and add to them) into HDF5 shards in
    ``options.out``; ``store="compact"``: the low-res features and the image files' bytes, rendered on read
    (:mod:`.io.compact`). ``upsampling``: the keywords of :func:`prepare_upsample`."""
    return prepare_upsample(images, options, features, **upsampling).run()


def compact_recipe(name: str, backbone, upsampler_args: dict, upsampler) -> dict:
    """What each image of a compact store adds: the attrs that say how to render it, and the side file that
    keeps a copy of the upsampler's checkpoint (by sha256) in the store."""
    from .io.compact import CHECKPOINTS, file_sha256, keep_checkpoint, upsampler_checkpoint

    if upsampler.name == "implicit":
        raise UsageError("--store compact renders with a deterministic upsampler; implicit fits each image (use "
                         "`upcli fit-image --store compact`, which keeps each image's field)")
    checkpoint = upsampler_checkpoint(name, backbone)
    sha = file_sha256(checkpoint) if checkpoint is not None else ""
    relative = f"{CHECKPOINTS}/{sha}.safetensors" if checkpoint is not None else ""
    files = {relative: keep_checkpoint(checkpoint, sha)} if checkpoint is not None else {}
    attrs = {"store": "compact", "upsampler_checkpoint": relative, "upsampler_sha256": sha,
             "upsampler_args": json.dumps(upsampler_args, sort_keys=True), "guidance": "resized"}
    return {"attrs": attrs, "files": files}


def expand_store(compact_dir, options: JobOptions) -> JobResult:
    """Render every map of a compact store into a full store at ``options.out``: a job of its own (resumable,
    splittable, ``--verify``), whose inputs are the compact store's entries, stamped by the shards that hold them."""
    from .io.images import ImageRef
    from .io.jobs import JobPlan
    from .io.store import FeatureStore, read_job_record, to_storage
    from .runtime import split_from

    record = read_job_record(compact_dir)
    if record["settings"].get("store") != "compact":
        raise UsageError(f"--expand {compact_dir}: not a compact store (upcli upsample --store compact)")
    if options.out is None:
        raise UsageError("--expand needs --out DIR for the full store")
    store = FeatureStore(compact_dir)
    device = resolve_device(options.device)
    inputs = [ImageRef(store.shard_path(name), name) for name in store]
    settings = {**record["settings"], "store": "full", "expanded_from": record["fingerprint"]}
    options = dataclasses.replace(options, workers=0)  # nothing to decode: the entries are read as rendered
    *split, origin = split_from(options.num_shards, options.shard_index)
    plan = JobPlan("upsample", options, store.root, inputs, options.shard_size or SHARD_SIZE, tuple(split), {}, origin)
    compact_only = ("source", "store", "upsampler_sha256", "upsampler_args")

    def render(items: list[Item], timings) -> list[Output]:
        outputs = []
        for item in items:
            with timings.measure("upsample"):
                feats = store.get(item.ref.rel, device=device)
            attrs = {k: v for k, v in store.attrs(item.ref.rel).items() if k not in compact_only}
            outputs.append(Output(to_storage(feats, settings["dtype"]), attrs))
        return outputs

    return plan.run(plan.job(settings), lambda ref: None, render, device, settings["compression"])


def plan_upsample(images, features: FeatureOptions = FeatureOptions(), size: int | str | None = DEFAULT_SIZE,
                  options: JobOptions = JobOptions(), **upsampling) -> dict:
    """What ``upsample_folder`` would write (``--dry-run``): every check of :func:`prepare_upsample`, then this
    process's part of the inputs with their output shapes, from image headers alone, and the bytes of both
    store kinds."""
    import numpy as np

    prepared = prepare_upsample(images, options, features, size=size, dry_run=True, **upsampling)
    model, size = prepared.step.backbone, parse_size(size)
    itemsize = np.dtype("float32").itemsize if features.dtype == "float32" else 2
    mine = prepared.job.part_inputs(prepared.plan.split)
    shapes, bad, compact = {}, {}, 0
    for ref in mine:
        try:
            shapes[ref.rel] = (model.dim, *target_size(*image_size(ref.path), size))
        except BadImageError as e:
            bad[ref.rel] = e.reason
            continue
        grid = [max(1, round(side / model.stride)) for side in shapes[ref.rel][1:]]
        compact += model.dim * grid[0] * grid[1] * itemsize + ref.path.stat().st_size
    total = sum(int(np.prod(shape)) * itemsize for shape in shapes.values())
    return {"images": len(mine), "shapes": shapes, "bad": bad, "bytes": total, "compact_bytes": compact,
            "split": prepared.plan.split, "split_origin": prepared.plan.split_origin, "of": len(prepared.job.inputs)}


def upsample_command(images, options: JobOptions, features: FeatureOptions = FeatureOptions(), *,
                     list_backbones: bool = False, verify=None, repair: bool = False, dry_run: bool = False,
                     expand=None, **upsampling) -> int:
    """All of ``upcli upsample``: ``--list-backbones``, ``--verify DIR [--repair]``, ``--expand DIR``, ``--dry-run``
    or the job (``upsampling``: the keywords of :func:`upsample_folder`). Prints what the mode reports and returns
    the exit code."""
    import sys

    if list_backbones:
        from .backbones import get_backbone_cfg, list_backbones as names

        for name in names():
            cfg = get_backbone_cfg(name)
            print(f"{name:22s} dim {cfg.dim:5d}  stride {cfg.stride:3d}  layer {cfg.layer}")
        return 0
    if verify is not None:
        from .io.store import verify_store

        report = verify_store(verify, repair=repair)
        for problem in report["problems"]:
            print(f"upcli upsample --verify: {problem}", file=sys.stderr)
        print(f"{verify}: {report['stored']} stored, {report['failed']} failed, of {report['inputs']} inputs; "
              f"{report['complete_shards']}/{report['shards']} shards complete")
        return 1 if report["problems"] else 0
    if repair:
        raise UsageError("--repair goes with --verify DIR")
    if expand is not None:
        if images:
            raise UsageError("--expand DIR renders a compact store: give no images")
        return expand_store(expand, options).exit_code
    if dry_run:
        plan = plan_upsample(images, features, options=options, **upsampling)
        shapes = list(plan["shapes"].items())
        for rel, shape in shapes[:20]:
            print(f"{rel}\t{'x'.join(map(str, shape))}")
        if len(shapes) > 20:
            print(f"... and {len(shapes) - 20} more")
        for rel, reason in plan["bad"].items():
            print(f"{rel}\tunreadable: {reason}")
        part, parts = plan["split"]
        if parts > 1:
            print(f"part {part} of {parts} ({plan['split_origin']}): {plan['images']} of the {plan['of']} images")
        n = max(len(shapes), 1)
        print(f"{plan['images']} images, {len(plan['bad'])} unreadable, before compression: about "
              f"{plan['bytes'] / 2**30:.2f} GiB with --store full ({plan['bytes'] / n / 2**20:.1f} MiB per image), "
              f"{plan['compact_bytes'] / 2**30:.3f} GiB with --store compact "
              f"({plan['compact_bytes'] / n / 2**20:.2f} MiB per image)")
        return 0
    return upsample_folder(images, options, features, **upsampling).exit_code
