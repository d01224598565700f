"""A pool of training images decoded once into memory, and the random crops the training loops draw from it.

Every draw takes a ``torch.Generator``, so the loops decide what is drawn from (seed, step, sample) alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import BadImageError, UsageError
from ..progress import ProgressReporter
from .images import load_rgb, resize_rgb, scan_images, target_size


class ImagePool:
    """Training images (all under ``roots``) decoded once, shorter side resized to ``side`` (if given), kept as uint8."""

    def __init__(self, roots: str | list[str], side: int | None = None, reporter: ProgressReporter | None = None):
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        refs = [ref for root in roots for ref in scan_images(root)]
        self.images, self.skipped = [], []
        for ref in refs:
            try:
                rgb = load_rgb(ref.path)
            except BadImageError as exc:
                self.skipped.append(str(exc))
                if reporter:
                    reporter.log(f"skipped {exc}")
                continue
            self.images.append(torch.from_numpy(resize_rgb(rgb, target_size(*rgb.shape[:2], side))).permute(2, 0, 1))
        self._fitting: dict[int, list[int]] = {}
        if not self.images:
            raise UsageError(f"no readable images under {', '.join(map(str, roots))}")

    def crop(self, g: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
        """A random image, resized so ``size`` fits, randomly cropped to ``size``; float (3, H, W) in [0, 1]."""
        img = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
        H, W = size
        scale = max(H / img.shape[1], W / img.shape[2])
        if scale > 1 or min(img.shape[1:]) > 2 * max(H, W):
            img = F.interpolate(img[None].float(), size=(max(H, math.ceil(img.shape[1] * scale)),
                                                          max(W, math.ceil(img.shape[2] * scale))),
                                mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 255)
        top = int(torch.randint(img.shape[1] - H + 1, (1,), generator=g))
        left = int(torch.randint(img.shape[2] - W + 1, (1,), generator=g))
        return img[:, top:top + H, left:left + W].float() / 255

    def patch(self, g: torch.Generator, size: int) -> torch.Tensor:
        """A ``size``-square crop of a random image at its own resolution (images smaller than that are
        skipped), turned by k*90 degrees and mirrored at random; float (3, size, size) in [0, 1]."""
        fits = self._fitting.get(size)
        if fits is None:
            fits = self._fitting[size] = [i for i, img in enumerate(self.images) if min(img.shape[1:]) >= size]
            if not fits:
                raise UsageError(f"no training image is at least {size}x{size} px")
        img = self.images[fits[int(torch.randint(len(fits), (1,), generator=g))]]
        top = int(torch.randint(img.shape[1] - size + 1, (1,), generator=g))
        left = int(torch.randint(img.shape[2] - size + 1, (1,), generator=g))
        turns, mirror = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
        crop = img[:, top:top + size, left:left + size].rot90(turns, (1, 2))
        return (crop.flip(2) if mirror % 2 else crop).float() / 255
