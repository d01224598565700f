"""Finding images in a folder and decoding them to 8-bit RGB.

Every decode failure becomes ``BadImageError(path, reason)`` with a short reason, so a batch job can
record it and go on. One decompression-bomb limit: Pillow's hard one, ``2 * Image.MAX_IMAGE_PIXELS`` (about 179
Mpx); Pillow's warning between 1x and 2x (valid 90-179 Mpx photos) is not an error.
"""

from __future__ import annotations

import io
import math
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import BadImageError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


@dataclass(frozen=True)
class ImageRef:
    path: Path  # absolute
    rel: str  # POSIX path relative to the scanned root; unique within a scan


def scan_images(root: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[ImageRef]:
    """All files under ``root`` (recursively) with an image extension, in ``rel`` order.

    ``exclude``: a folder inside ``root`` to leave out, e.g. the command's output folder: its previews or results
    must not become inputs of the next run (``root`` itself is never left out).

    Extensions match case-insensitively. Broken symlinks and unreadable files are kept so that
    ``load_rgb`` reports them. Anything that is not a regular file (a FIFO, socket or device, also behind a link)
    is skipped with a one-line warning and never opened: reading a FIFO can block forever. Symlinked folders are
    followed, but a folder reached twice (a link loop, or two links to one folder) is listed only the first time.
    """
    root = Path(os.path.abspath(os.path.expanduser(root)))
    if not root.exists():
        raise UsageError(f"image folder {str(root)!r} does not exist")
    if not root.is_dir():
        raise UsageError(f"{str(root)!r} is not a folder")

    refs = []
    seen_dirs = {os.path.realpath(exclude)} - {os.path.realpath(root)} if exclude is not None else set()
    def unreadable(err: OSError) -> None:  # e.g. a root-only lost+found: warn, do not stop the scan
        warnings.warn(f"cannot read folder {err.filename} ({err.strerror}); its images are left out", RuntimeWarning,
                      stacklevel=3)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames.clear()
            continue
        seen_dirs.add(real)
        dirnames.sort()  # walk order decides which of two links to one folder is kept
        for name in filenames:
            if not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = Path(dirpath, name)
            if _special_file(path):
                warnings.warn(f"skipping {str(path)!r}: not a regular file", RuntimeWarning, stacklevel=2)
                continue
            refs.append(ImageRef(path=path, rel=path.relative_to(root).as_posix()))
    return sorted(refs, key=lambda ref: ref.rel)


def collect_images(sources, files_from: str | os.PathLike | None = None, include=(), exclude=(),
                   skip: str | os.PathLike | None = None) -> tuple[Path, list[ImageRef]]:
    """The inputs of a job: ``(root, refs)``, the refs sorted by ``rel``, their path relative to ``root``, the
    common folder of all sources (a folder given alone is the root; a file given alone, its folder).

    ``sources``: files, folders (scanned recursively by :func:`scan_images`, leaving out ``skip``, e.g. the output
    folder) and glob patterns (``*``, ``?``, ``[...]``, ``**``; expanded here, so a quoted pattern works as a
    shell's would; the files they match must have an image extension). ``files_from``: a file listing one path
    per line (``-``: standard input), relative to the list's folder (to the working folder for stdin) or
    absolute; a listed file that is missing stays an input, reported when it is read. ``include`` / ``exclude``:
    glob patterns on ``rel`` (``train/*``); an input is kept if it matches one of ``include`` (when given) and
    none of ``exclude``. A path given twice is listed once. Raises ``UsageError`` for a missing source, a
    pattern that matches nothing, or no input left."""
    import fnmatch
    import glob
    import sys

    files: dict[str, tuple[Path, Path | None]] = {}  # absolute path -> (path, the folder it was found in)
    folders: list[Path] = []

    def add(path: Path, named: bool, listed: bool = False) -> None:
        path = Path(os.path.abspath(path))
        if path.is_dir():
            folders.append(path)
            for ref in scan_images(path, skip):
                files.setdefault(str(ref.path), (ref.path, path))
        elif path.is_file() or listed:
            if named or path.name.lower().endswith(IMAGE_EXTENSIONS):
                files.setdefault(str(path), (path, None))
        elif named:
            raise UsageError(f"{str(path)!r} does not exist")

    for source in [sources] if isinstance(sources, (str, os.PathLike)) else list(sources or ()):
        text = os.path.expanduser(str(source))
        if glob.has_magic(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise UsageError(f"{text!r}: no file or folder matches this pattern")
            for match in matches:
                add(Path(match), named=False)
        else:
            add(Path(text), named=True)
    if files_from is not None:
        if str(files_from) == "-":
            lines, base = sys.stdin.read().splitlines(), Path.cwd()
        else:
            try:
                lines, base = Path(files_from).read_text(encoding="utf-8").splitlines(), Path(files_from).parent
            except (OSError, UnicodeDecodeError) as err:
                raise UsageError(f"--files-from {str(files_from)!r}: cannot read it ({err})") from None
        for line in lines:
            if line.strip():
                add(base / os.path.expanduser(line.strip()), named=True, listed=True)
    if not files:
        raise UsageError(f"no images found in {', '.join(map(str, sources or [files_from]))} (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    parents = folders + [path.parent for path, found_in in files.values() if found_in is None]
    root = Path(os.path.commonpath([str(p) for p in parents]))
    refs = [ImageRef(path=path, rel=path.relative_to(root).as_posix()) for path, _ in files.values()]
    refs = [ref for ref in refs if (not include or any(fnmatch.fnmatchcase(ref.rel, pat) for pat in include))
            and not any(fnmatch.fnmatchcase(ref.rel, pat) for pat in exclude or ())]
    if not refs:
        raise UsageError(f"--include {list(include or [])} / --exclude {list(exclude or [])} leave no image of the "
                         f"{len(files)} found")
    return root, sorted(refs, key=lambda ref: ref.rel)


def _special_file(path: Path) -> bool:
    """Whether ``path`` (followed through links) is a FIFO, socket or device; ``False`` where it cannot be stat'ed."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable_name(name: str) -> str:
    """``name`` with control characters (a newline, a tab, ESC) escaped as ``\\xNN``, for one-line logs."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", name)


def load_rgb(path: str | os.PathLike, data: bytes | None = None) -> np.ndarray:
    """Decode ``path`` (or ``data``, the bytes of the file named ``path``) fully to ``uint8 (H, W, 3)`` RGB,
    upright per EXIF, first frame only.

    Transparency is composited over white; 16-bit data is scaled (not clipped) to 8 bits; 32-bit float data in
    [0, 1] is scaled, any other float range stretched.
    """
    with _decoding(path, data), Image.open(path if data is None else io.BytesIO(data)) as img:
        img.load()  # full decode now, so truncation shows up here
        return _to_rgb_array(ImageOps.exif_transpose(img))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(H, W)`` after EXIF orientation, read from the header only."""
    with _decoding(path), Image.open(path) as img:
        w, h = img.size
        if img.getexif().get(_EXIF_ORIENTATION) in _SWAPS_AXES:
            h, w = w, h
        return h, w


def target_size(h: int, w: int, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """``(H, W)`` with the shorter side equal to ``size`` and the aspect kept; ``None`` keeps ``(h, w)``; an
    ``(H, W)`` pair is the size itself (every image alike, aspect not kept)."""
    if size is None:
        return h, w
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    if size <= 0:
        raise UsageError(f"image size must be a positive integer, got {size}")

    def scaled(side: int) -> int:
        return max(1, math.floor(side * size / min(h, w) + 0.5))

    return (size, scaled(w)) if h <= w else (scaled(h), size)


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bicubic resize of ``uint8 (H, W, 3)`` to ``size=(H, W)`` (Pillow antialiases when shrinking)."""
    h, w = size
    if arr.shape[:2] == (h, w):
        return arr
    return np.array(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    if img.mode == "F":  # 32-bit float (scientific TIFFs): [0, 1] as is, any other range stretched to 0..255
        values = np.nan_to_num(np.asarray(img, dtype=np.float64))
        low, high = (0.0, 1.0) if values.min() >= 0 and values.max() <= 1 else (values.min(), values.max())
        gray = np.rint((values - low) * (255 / max(high - low, 1e-12))).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert("RGB") clips 16-bit values at 255; scale 0..65535 to 0..255 instead.
        values = np.asarray(img).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) * (255 / 65535)).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
    # RGB (48-bit PNGs arrive here already reduced to 8 bits by Pillow), L, P, 1, CMYK, YCbCr, ...
    return np.array(img.convert("RGB"))


@contextmanager
def _decoding(path: str | os.PathLike, data: bytes | None = None) -> Iterator[None]:
    """Turn whatever decoding ``path`` (or ``data``, its bytes) raises into ``BadImageError(path, short reason)``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        numbers = re.findall(r"\d+", str(err))
        pixels = f"{numbers[0]} pixels" if numbers else "too many pixels"
        raise BadImageError(path, f"decompression bomb: {pixels} > limit {2 * Image.MAX_IMAGE_PIXELS}") from None
    except FileNotFoundError:
        reason = "missing file (broken symlink)" if os.path.islink(path) else "missing file"
        raise BadImageError(path, reason) from None
    except PermissionError:
        raise BadImageError(path, "permission denied") from None
    except IsADirectoryError:
        raise BadImageError(path, "is a folder, not a file") from None
    except UnidentifiedImageError:
        empty = (len(data) if data is not None else os.path.getsize(path)) == 0
        raise BadImageError(path, "empty file" if empty else "not an image (cannot identify format)") from None
    except (OSError, EOFError) as err:
        truncated = isinstance(err, EOFError) or "truncated" in str(err).lower()
        raise BadImageError(path, "truncated" if truncated else f"cannot decode: {err}") from None
    except Exception as err:  # noqa: BLE001 -- Pillow's plugins raise SyntaxError, ValueError, struct.error, ... on bad data
        raise BadImageError(path, f"cannot decode: {type(err).__name__}: {err}") from None


DEFAULT_SIZE = 448  # --size: the output's shorter side


def parse_size(value: str | int | tuple | None) -> int | tuple[int, int] | None:
    """``--size``: a positive int (the shorter side, aspect kept), ``HxW`` (every output that size, for
    batching), or "original"."""
    if value is None or value == "original":
        return None
    message = f"--size must be a positive integer, HxW (e.g. 448x640) or 'original', got {value!r}"
    try:
        if isinstance(value, (tuple, list)) or "x" in str(value):
            parts = value if isinstance(value, (tuple, list)) else str(value).lower().split("x")
            size = tuple(int(p) for p in parts)
            if len(size) != 2:
                raise ValueError
        else:
            size = int(value)
    except (TypeError, ValueError):
        raise UsageError(message) from None
    if min(size if isinstance(size, tuple) else (size,)) < 1:
        raise UsageError(message)
    return size
