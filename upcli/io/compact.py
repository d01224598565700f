"""Compact feature stores: per image, the backbone's low-res features and the bytes of the image file; the dense
map is rendered when it is read (:class:`~upcli.io.store.FeatureStore`), by the upsampler the store keeps.

``upcli upsample --store compact`` writes, per image, in the shards of a full store's layout:

    /features/KEY   (C, h, w) low-res features in the stored dtype; a full store's attrs (source, orig_size,
                    size = the (H, W) that ``store[name]`` renders, backbone, layer, upsampler, dtype) and
                    store = "compact", upsampler_args (JSON), upsampler_checkpoint (its path in the store, "" when
                    the upsampler has none: bilinear, bilateral) and upsampler_sha256, guidance ("resized": the
                    image resized to the output size, as ``upsample`` guides; "original": as ``fit-image`` does)
    /images/KEY     uint8 [n]: the image file's exact bytes, decoded at read time as the job decoded them
                    (upright per EXIF, then bicubic to the size asked)

The checkpoint lives in the store: ``upsamplers/<sha256>.safetensors`` for ``upsample`` (a copy: the store stays
readable after the file it came from changes or goes), ``fields/<image>.safetensors`` for ``fit-image`` (each
image's fitted field, as ``--save-field`` keeps it). One that is missing or altered is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import BadImageError, StoreError
from .store import write_atomic

STORES = ("full", "compact")  # the kinds of feature store (``--store``)
CHECKPOINTS = "upsamplers"  # the folder of a compact store's upsampler copies


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def upsampler_checkpoint(name: str, backbone) -> Path | None:
    """The checkpoint file that ``create_upsampler(name, backbone)`` loads, or None for an upsampler without one."""
    from ..checkpoints import names_checkpoint_file
    from ..upsamplers import list_upsamplers, shipped_checkpoint, upsampler_class

    if names_checkpoint_file(name, list_upsamplers()):
        return Path(name)
    if upsampler_class(name).checkpointed:
        return Path(shipped_checkpoint(name, backbone))
    return None


def keep_checkpoint(source: Path, sha256: str):
    """A side-file writer (``Output.files``) that copies the upsampler's checkpoint into the store once."""

    def write(path: Path) -> None:
        if not path.is_file() or file_sha256(path) != sha256:
            data = Path(source).read_bytes()
            if hashlib.sha256(data).hexdigest() != sha256:
                raise StoreError(f"{source}: changed while the job ran (sha256 is no longer {sha256}); re-run")
            write_atomic(path, data)

    return write


class Renderer:
    """Renders the dense maps of one compact store; its upsamplers are built once per process and device."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._upsamplers: dict[tuple, object] = {}

    def upsampler(self, attrs: dict, dim: int, device):
        """The upsampler that wrote these attrs' image, checked against the store's copy of its checkpoint."""
        from ..upsamplers import create_upsampler

        sha, checkpoint = str(attrs.get("upsampler_sha256", "")), str(attrs.get("upsampler_checkpoint", ""))
        args = json.loads(attrs.get("upsampler_args", "{}"))
        recipe = (str(attrs["upsampler"]), sha, json.dumps(args, sort_keys=True), dim, str(device))
        if recipe not in self._upsamplers:
            backbone = SimpleNamespace(name=str(attrs["backbone"]), layer=str(attrs["layer"]), dim=dim)
            if checkpoint:
                path = self.root / checkpoint
                if not path.is_file():
                    raise StoreError(f"{self.root}: the upsampler checkpoint with sha256 {sha} is missing "
                                     f"({checkpoint}); this compact store cannot be rendered")
                if file_sha256(path) != sha:
                    raise StoreError(f"{self.root}: {checkpoint} is altered (its sha256 is not {sha}); this compact "
                                     f"store cannot be rendered")
                up = create_upsampler(str(path), backbone=backbone)
            else:
                up = create_upsampler(str(attrs["upsampler"]), backbone=backbone, **args)
            if len(self._upsamplers) >= 8:  # fit-image stores have one per image: keep the latest few
                self._upsamplers.pop(next(iter(self._upsamplers)))
            self._upsamplers[recipe] = up.to(device).eval()
        return self._upsamplers[recipe]

    def render(self, source: str, attrs: dict, low, data: np.ndarray, size: tuple[int, int] | None, device, dtype):
        """The dense map of ``source`` at ``size`` (default: the size the job was asked for) as ``dtype``, made
        as ``upsample`` makes a full store's (from float32 features, rounded once at the end)."""
        import torch

        from ..upsamplers import upsample_features
        from .images import load_rgb, resize_rgb

        size = tuple(int(s) for s in (size if size is not None else attrs["size"]))
        try:
            rgb = load_rgb(source, data.tobytes())
        except BadImageError as err:
            raise StoreError(f"{self.root}: the stored image of {source!r} cannot be decoded ({err.reason})") from None
        original = attrs.get("guidance", "resized") == "original"
        pixels = torch.from_numpy(rgb if original else resize_rgb(rgb, size)).to(device)
        images = pixels.permute(2, 0, 1)[None].float().div_(255).contiguous()
        up = self.upsampler(attrs, low.shape[0], device)
        return upsample_features(up, low[None].to(device).float(), images, size, device, dtype)[0]
