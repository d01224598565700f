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


STREAM_OVER = 5000  # with ``stream=None``, larger sets are decoded on demand instead of held in memory


class ImagePool:
    """Training images (all under ``roots``), shorter side resized to ``side`` (if given).

    Held in memory as uint8, decoded once (unreadable files are skipped and logged), or with ``stream`` decoded from
    disk at each draw (an unreadable file is logged and another image drawn); ``stream=None`` streams sets of more
    than ``STREAM_OVER`` images. Streaming pools give ``crop`` and ``resized_crop``, not ``patch``.
    """

    def __init__(self, roots: str | list[str], side: int | None = None, reporter: ProgressReporter | None = None,
                 stream: bool | None = False):
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        refs = [ref for root in roots for ref in scan_images(root)]
        self.side, self.reporter = side, reporter
        self.stream = len(refs) > STREAM_OVER if stream is None else stream
        self.images, self.skipped = [], []
        if self.stream:
            self.images = [ref.path for ref in refs]
        else:
            for ref in refs:
                try:
                    self.images.append(self._decode(ref.path))
                except BadImageError as exc:
                    self._skip(exc)
        self._fitting: dict[int, list[int]] = {}
        if not self.images:
            raise UsageError(f"no readable images under {', '.join(map(str, roots))}")

    def __len__(self) -> int:
        return len(self.images)

    def _decode(self, path: Path) -> torch.Tensor:
        rgb = load_rgb(path)
        return torch.from_numpy(resize_rgb(rgb, target_size(*rgb.shape[:2], self.side))).permute(2, 0, 1)

    def _skip(self, exc: BadImageError) -> None:
        self.skipped.append(str(exc))
        if self.reporter:
            self.reporter.log(f"skipped {exc}")

    def _draw(self, g: torch.Generator) -> torch.Tensor:
        """A random image, uint8 (3, H, W)."""
        for _ in range(100):
            image = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
            if not self.stream:
                return image
            try:
                return self._decode(image)
            except BadImageError as exc:
                self._skip(exc)
        raise UsageError(f"100 images drawn in a row were unreadable (last: {self.skipped[-1]})")

    def crop(self, g: torch.Generator, size: tuple[int, int]) -> torch.Tensor:
        """A random image, resized so ``size`` fits, randomly cropped to ``size``; float (3, H, W) in [0, 1]."""
        img = self._draw(g)
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
        if self.stream:
            raise ValueError("a streaming ImagePool draws crops, not patches")
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

    def resized_crop(self, g: torch.Generator, size: int, scale: tuple[float, float] = (0.2, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
        """Inception-style random resized crop of a random image (area share in ``scale``, aspect in ``ratio``;
        a centre crop if ten draws do not fit), resized to ``size`` square and mirrored at random;
        float (3, size, size) in [0, 1]."""
        img = self._draw(g)
        H, W = img.shape[1:]
        uniform = lambda lo, hi: lo + (hi - lo) * float(torch.rand((), generator=g))  # noqa: E731
        for _ in range(10):
            area = H * W * uniform(*scale)
            aspect = math.exp(uniform(math.log(ratio[0]), math.log(ratio[1])))
            h, w = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
            if 0 < h <= H and 0 < w <= W:
                top = int(torch.randint(H - h + 1, (1,), generator=g))
                left = int(torch.randint(W - w + 1, (1,), generator=g))
                break
        else:
            h = w = min(H, W)
            top, left = (H - h) // 2, (W - w) // 2
        crop = img[None, :, top:top + h, left:left + w].float()
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        if float(torch.rand((), generator=g)) < 0.5:
            crop = crop.flip(2)
        return crop.clamp(0, 255) / 255
