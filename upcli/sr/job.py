"""``upcli sr``: super-resolve an image or a folder into PNGs, with the batch engine of ``upcli upsample``.

Each image is its own shard by default, so an interrupted folder run loses at most the image being trained on
(ZSSR takes minutes per image on a CPU); re-running the same command resumes. The PNGs mirror the input tree
under ``--out`` (suffix ``.png``); ``manifest.jsonl`` and ``failures.jsonl`` are as for the feature store.
"""

from __future__ import annotations

import functools
import time
from dataclasses import asdict
from pathlib import Path

from ..configs import ADAPT_STEPS, JobOptions, ZSSRConfig
from ..errors import BadImageError, UsageError
from ..io.images import ImageRef, load_rgb, printable_name
from ..io.jobs import Item, JobResult, Output, file_identity, prepare_job, preview_name
from ..io.store import IMAGE_SHARDS, image_key
from ..runtime import resolve_device

SHARD_SIZE = 1  # images per shard: an interruption loses one image at most

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

    def __init__(self, method, name: str, degradation, device, reporter, keys: dict[str, str]):
        self.method, self.name, self.degradation, self.device, self.reporter = method, name, degradation, device, reporter
        self.keys = keys  # input rel -> output PNG (``output_keys``)

    def __call__(self, items: list[Item], timings) -> list[Output]:
        from ..viz import save_png

        results = []
        for item in items:
            lr = item.data["image"].to(self.device).permute(2, 0, 1)[None].float().div_(255)
            start = time.perf_counter()
            progress = self.reporter.steps_of(printable_name(item.ref.rel))
            try:
                with timings.measure(self.name):
                    sr, info = self.method(lr, self.degradation, progress=progress)
            finally:
                progress.close()
            seconds = time.perf_counter() - start
            pixels = sr[0].mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).cpu().numpy()
            attrs = {"key": self.keys[item.ref.rel], "method": self.name, "scale": self.degradation.scale, "seconds": round(seconds, 3),
                     "size": list(pixels.shape[:2]), **{k: v for k, v in info.items() if v is not None}}
            files = {preview_name(item.ref.rel): functools.partial(save_png, rgb=side_by_side(lr, sr))} if item.preview else {}
            results.append(Output(pixels, attrs, files))
            if seconds > 5:
                self.reporter.log(f"{printable_name(item.ref.rel)}: {self.name} in {seconds:.1f} s")
        return results


def side_by_side(lr, sr):
    """Bicubic and SR side by side, uint8 (H, W, 3): a centre crop of at most 256 px of the output."""
    import numpy as np

    from .degrade import upscale

    bicubic = upscale(lr, sr.shape[-2:]).clamp(0, 1)
    h, w = sr.shape[-2:]
    c = min(256, h, w)
    top, left = (h - c) // 2, (w - c) // 2
    crops = [x[0, :, top:top + c, left:left + c].mul(255).round().byte().permute(1, 2, 0).cpu().numpy() for x in (bicubic, sr)]
    gap = np.full((c, 4, 3), 255, np.uint8)
    return np.concatenate([crops[0], gap, crops[1]], 1)


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
    options: JobOptions,
    *,
    scale: int = 2,
    zero_shot: bool = False,
    init: str | None = None,
    steps: int | None = None,
    kernel: str = "bicubic",
    subsample: str | None = None,
    zssr: ZSSRConfig = ZSSRConfig(),
) -> JobResult:
    """Super-resolve an image, or every image under a folder, by ``scale`` into PNGs under ``options.out``.

    Without ``zero_shot``: one pass of the network ``init``. With it: ZSSR from scratch, or, given ``init``,
    MZSR's ``steps`` (default 10) adaptation steps. ``kernel``/``subsample`` say how the LR images were made."""
    from .methods import create_sr_method

    degradation = degradation_of(scale, kernel, subsample)
    name = method_of(zero_shot, init, steps)
    zssr.check()
    if name != "zssr" and zssr != ZSSRConfig():
        raise UsageError("--max-iters, --noise and --seed set ZSSR (--zero-shot without --init), not " + name)
    plan = prepare_job("sr", images, options, SHARD_SIZE, checkpoints={"init": init, "kernel": kernel})
    keys = output_keys(plan.inputs, Path(options.out))
    device = resolve_device(options.device)
    method_options = {"zssr": {"config": zssr}, "mzsr": {"steps": ADAPT_STEPS if steps is None else steps}}.get(name, {})
    method = create_sr_method(name, init=init, device=device, **method_options)
    settings = {
        "method": name, "scale": scale, "kernel": kernel, "subsample": degradation.subsample,
        "init": file_identity(init) if init is not None else None,
        **({"zssr": asdict(zssr)} if name == "zssr" else {}), **({"steps": method_options["steps"]} if name == "mzsr" else {}),
    }
    step = SRStep(method, name, degradation, device, plan.reporter, keys)
    return plan.run(plan.job(settings, IMAGE_SHARDS), functools.partial(load_for_sr, scale=scale), step, device)


def output_keys(inputs: list[ImageRef], out: Path) -> dict[str, str]:
    """Each input's output PNG (relative to ``out``): its name with suffix .png, or with .png added where two
    inputs differ only in their suffix (a.jpg, a.png -> a.jpg.png, a.png.png). None may replace an input image."""
    from collections import Counter

    plain = Counter(image_key(ref.rel) for ref in inputs)
    keys = {ref.rel: image_key(ref.rel, keep_suffix=plain[image_key(ref.rel)] > 1) for ref in inputs}
    seen: dict[str, str] = {}
    for ref in inputs:
        key = keys[ref.rel]
        if key in seen:
            raise UsageError(f"{seen[key]} and {ref.rel} would both be written to {key}; rename one of them")
        seen[key] = ref.rel
        if (out / key).resolve() == Path(ref.path).resolve():
            raise UsageError(f"--out {out} would overwrite the input {ref.rel}; choose another output folder")
    return keys
