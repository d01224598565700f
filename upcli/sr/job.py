"""``upcli sr``: super-resolve an image or a folder into PNGs, with the batch engine of ``upcli upsample``.

Each image is its own shard by default, so an interrupted folder run loses at most the image being trained on
(ZSSR takes minutes per image on a CPU); re-running the same command resumes. The PNGs mirror the input tree
under ``--out`` (suffix ``.png``); ``manifest.jsonl`` and ``failures.jsonl`` are as for the feature store.
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import BadImageError, UsageError
from ..io.images import ImageRef, load_rgb
from ..io.jobs import Item, Job, JobResult, resolve_split, run_job
from ..io.store import IMAGE_SHARDS, image_key
from ..progress import ProgressReporter, Timings
from .zssr import ZSSRConfig

MAX_OUTPUT_PIXELS = 80_000_000
MIN_INPUT_SIDE = 8  # the son of a smaller image has almost nothing left to learn from


def load_for_sr(ref: ImageRef, scale: int) -> dict:
    """Decode one image (DataLoader worker) and check that it can be super-resolved."""
    import torch

    rgb = load_rgb(ref.path)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_INPUT_SIDE * scale // 2:
        raise BadImageError(ref.path, f"image is {w}x{h} px; x{scale} needs at least {MIN_INPUT_SIDE * scale // 2} px a side")
    if h * w * scale * scale > MAX_OUTPUT_PIXELS:
        raise BadImageError(ref.path, f"output {w * scale}x{h * scale} px is over {MAX_OUTPUT_PIXELS // 10**6} Mpx")
    return {"image": torch.from_numpy(rgb)}


class SRStep:
    """The model step: super-resolve each image, to uint8 (H, W, 3)."""

    def __init__(self, method, name: str, degradation, device, preview_dir: Path, preview: int, reporter: ProgressReporter):
        self.method, self.name, self.degradation, self.device = method, name, degradation, device
        self.preview_dir, self.preview, self.reporter = preview_dir, preview, reporter

    def __call__(self, items: list[Item], timings: Timings) -> list:
        results = []
        for item in items:
            lr = item.data["image"].to(self.device).permute(2, 0, 1)[None].float().div_(255)
            start = time.perf_counter()
            with timings.measure(self.name):
                sr, info = self.method(lr, self.degradation)
            seconds = time.perf_counter() - start
            pixels = sr[0].mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            attrs = {"method": self.name, "scale": self.degradation.scale, "seconds": round(seconds, 3),
                     "size": list(pixels.shape[:2]), **{k: v for k, v in info.items() if v is not None}}
            results.append((pixels, attrs))
            if item.index < self.preview:
                self._save_preview(item, lr, sr)
            if seconds > 5:
                self.reporter.log(f"{item.ref.rel}: {self.name} in {seconds:.1f} s")
        return results

    def _save_preview(self, item: Item, lr, sr) -> None:
        """Bicubic and SR side by side: a centre crop of at most 256 px of the output."""
        import numpy as np
        from PIL import Image

        from .degrade import upscale

        bicubic = upscale(lr, sr.shape[-2:]).clamp(0, 1)
        h, w = sr.shape[-2:]
        c = min(256, h, w)
        top, left = (h - c) // 2, (w - c) // 2
        crops = [x[0, :, top:top + c, left:left + c].mul(255).round().byte().permute(1, 2, 0).cpu().numpy() for x in (bicubic, sr)]
        gap = np.full((c, 4, 3), 255, np.uint8)
        self.preview_dir.mkdir(parents=True, exist_ok=True)
        name = item.ref.rel.replace("/", "__").rsplit(".", 1)[0] + ".png"
        Image.fromarray(np.concatenate([crops[0], gap, crops[1]], 1)).save(self.preview_dir / name)


def degradation_of(scale: int, kernel: str = "bicubic", subsample: str | None = None):
    """The degradation named by ``--scale``, ``--kernel`` and ``--subsample`` (default: bicubic for the plain
    bicubic kernel, direct after a blur kernel, as in MZSR)."""
    from .degrade import Degradation, parse_kernel

    blur = parse_kernel(kernel)
    return Degradation(scale, blur, subsample or ("bicubic" if blur is None else "direct"))


def method_of(zero_shot: bool, init: str | None, steps: int | None) -> str:
    if not zero_shot:
        if init is None:
            raise UsageError("give --init CKPT (a network from `upcli pretrain mzsr`) for a feed-forward pass, or --zero-shot")
        if steps is not None:
            raise UsageError("--steps adapts the network to each image; it needs --zero-shot")
        return "feedforward"
    if init is None and steps is not None:
        raise UsageError("--steps counts MZSR's adaptation steps and needs --init CKPT; ZSSR's length is --max-iters")
    return "zssr" if init is None else "mzsr"


def super_resolve_images(
    images,
    out,
    *,
    scale: int = 2,
    zero_shot: bool = False,
    init: str | None = None,
    steps: int | None = None,
    kernel: str = "bicubic",
    subsample: str | None = None,
    zssr: ZSSRConfig = ZSSRConfig(),
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
    """Super-resolve an image, or every image under a folder, by ``scale`` into PNGs under ``out``.

    Without ``zero_shot``: one pass of the network ``init``. With it: ZSSR from scratch, or, given ``init``,
    MZSR's ``steps`` (default 10) adaptation steps. ``kernel``/``subsample`` say how the LR images were made."""
    import torch

    from ..fit_image import inputs_of
    from ..upsample import _check_choices, _weights_identity, checkpoint_digests, default_workers, resolve_device
    from .methods import create_sr_method

    degradation = degradation_of(scale, kernel, subsample)
    name = method_of(zero_shot, init, steps)
    zssr.check()
    _check_choices(shard_size=shard_size, preview=preview)
    split = resolve_split(num_shards, shard_index)
    root, inputs = inputs_of(Path(images), Path(out))
    _check_outputs(inputs, Path(out))
    device = resolve_device(device)
    options = {"zssr": {"config": zssr}, "mzsr": {"steps": 10 if steps is None else steps}}.get(name, {})
    method = create_sr_method(name, init=init, device=device, **options)
    settings = {
        "method": name, "scale": scale, "kernel": kernel, "subsample": degradation.subsample,
        "init": _weights_identity(init) if init is not None else None,
        **({"zssr": asdict(zssr)} if name == "zssr" else {}), **({"steps": options["steps"]} if name == "mzsr" else {}),
        **checkpoint_digests(init=init, kernel=kernel),
    }
    job = Job(Path(out), root, "sr", inputs, settings, shard_size)
    reporter = ProgressReporter("sr", quiet=quiet, log_every=log_every)
    step = SRStep(method, name, degradation, device, Path(out) / "previews", preview, reporter)
    timings = Timings(torch.cuda.synchronize if device.type == "cuda" else None)
    return run_job(
        job, functools.partial(load_for_sr, scale=scale), step, split=split,
        shard_attrs={"command": "sr", "settings": json.dumps(settings, sort_keys=True)}, batch_size=1,
        workers=default_workers() if workers is None else workers, strict=strict, overwrite=overwrite,
        reporter=reporter, timings=timings, kind=IMAGE_SHARDS,
    )


def _check_outputs(inputs: list[ImageRef], out: Path) -> None:
    """Each result gets its own PNG, and none of them replaces an input image."""
    seen: dict[str, str] = {}
    for ref in inputs:
        key = image_key(ref.rel)
        if key in seen:
            raise UsageError(f"{seen[key]} and {ref.rel} would both be written to {key}; rename one of them")
        seen[key] = ref.rel
        if (out / key).resolve() == Path(ref.path).resolve():
            raise UsageError(f"--out {out} would overwrite the input {ref.rel}; choose another output folder")
