import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from upcli.errors import BadImageError, UsageError
from upcli.io.images import image_size, load_rgb, resize_rgb, scan_images, target_size


def _noise(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _touch_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_noise(4, 4)).save(path, format="PNG")


# --- scanning ---------------------------------------------------------------------------------------------


def test_scan_is_recursive_sorted_case_insensitive_and_keeps_broken_links(tmp_path):
    for rel in ["b.png", "A.JPG", "sub/b.png", "sub/deeper/c.Jpeg", "dir.png/inside.webp"]:
        _touch_image(tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "b.png.bak").write_text("not an image either")
    (tmp_path / "broken.png").symlink_to(tmp_path / "does-not-exist.png")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path)  # a link loop must not hang the scan

    refs = scan_images(tmp_path)

    expected = ["A.JPG", "b.png", "broken.png", "dir.png/inside.webp", "sub/b.png", "sub/deeper/c.Jpeg"]
    assert [r.rel for r in refs] == expected
    assert all(r.path.is_absolute() for r in refs)
    assert refs[1].path != refs[4].path and refs[1].path.name == refs[4].path.name
    assert scan_images(tmp_path) == refs


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs mkfifo")
def test_scan_skips_fifos_and_never_opens_them(tmp_path):
    _touch_image(tmp_path / "a.png")
    os.mkfifo(tmp_path / "fifo.png")  # opening it for reading would block until a writer comes
    (tmp_path / "link.png").symlink_to(tmp_path / "fifo.png")
    _touch_image(tmp_path / "z.png")
    with pytest.warns(RuntimeWarning, match="skipping .*fifo.png': not a regular file") as caught:
        refs = scan_images(tmp_path)
    assert [r.rel for r in refs] == ["a.png", "z.png"]
    assert len(caught) == 2 and all("\n" not in str(w.message) for w in caught)


def test_scan_bad_root(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        scan_images(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"")
    with pytest.raises(UsageError, match="not a folder"):
        scan_images(tmp_path / "file.png")


# --- decoding: orientation and modes ----------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((40, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)  # left half red
    arr[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)

    out = load_rgb(path)

    assert out.shape == (60, 40, 3)
    assert image_size(path) == (60, 40)
    assert out[:25, :, 0].mean() > 200 and out[35:, :, 2].mean() > 200  # the left half is now on top


def _save(img, path, **kwargs):
    img.save(path, **kwargs)
    return path


def test_grayscale_and_one_bit(tmp_path):
    gray = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    out = load_rgb(_save(Image.fromarray(gray, "L"), tmp_path / "l.png"))
    assert out.dtype == np.uint8 and out.shape == (4, 6, 3)
    assert (out == gray[:, :, None]).all()

    bits = Image.new("1", (5, 3), 0)
    bits.putpixel((2, 1), 1)
    out = load_rgb(_save(bits, tmp_path / "one.png"))
    assert out[1, 2].tolist() == [255, 255, 255] and out.sum() == 3 * 255


def test_palette_with_transparency_composites_over_white(tmp_path):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.putpixel((3, 1), 1)
    out = load_rgb(_save(img, tmp_path / "p.png", transparency=0))
    assert out[0, 0].tolist() == [255, 255, 255]  # index 0: transparent red -> white
    assert out[1, 3].tolist() == [0, 255, 0]


def test_alpha_modes_composite_over_white(tmp_path):
    rgba = np.array([[[255, 0, 0, 0], [0, 0, 255, 255], [0, 0, 0, 128]]], np.uint8)
    out = load_rgb(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "rgba.png"))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1].tolist() == [0, 0, 255]
    assert all(abs(v - 127) <= 1 for v in out[0, 2])

    la = np.array([[[0, 0], [50, 255]]], np.uint8)
    out = load_rgb(_save(Image.fromarray(la, "LA"), tmp_path / "la.png"))
    assert out[0].tolist() == [[255, 255, 255], [50, 50, 50]]


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    img.putpixel((1, 0), (255, 0, 0, 0))
    out = load_rgb(_save(img, tmp_path / "cmyk.tif"))
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 255]]


SIXTEEN_BIT = np.array([[0, 257, 32896, 65535]], np.uint16)
EIGHT_BIT = [0, 1, 128, 255]  # scaled by 255/65535, not clipped at 255


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path, suffix):
    path = _save(Image.fromarray(SIXTEEN_BIT), tmp_path / f"gray16{suffix}")
    assert Image.open(path).mode.startswith("I")
    out = load_rgb(path)
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == EIGHT_BIT and (out == out[:, :, :1]).all()


def _write_rgb48_png(path, pixels):
    """Pillow cannot write 16-bit-per-channel RGB, so build the PNG by hand."""
    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_rgb48_png(tmp_path):
    pixels = np.array([[[0, 257, 32896], [65535, 2570, 0]]], np.uint16)
    out = load_rgb(_write_rgb48_png(tmp_path / "rgb48.png", pixels))
    assert out.dtype == np.uint8
    assert out[0].tolist() == [[0, 1, 128], [255, 10, 0]]


@pytest.mark.parametrize("suffix", [".gif", ".tif"])
def test_first_frame_of_animations_and_multipage(tmp_path, suffix):
    frames = [Image.new("RGB", (6, 4), colour) for colour in [(255, 0, 0), (0, 0, 255)]]
    path = _save(frames[0], tmp_path / f"multi{suffix}", save_all=True, append_images=frames[1:])
    out = load_rgb(path)
    assert out.shape == (4, 6, 3)
    assert out[0, 0].tolist() == [255, 0, 0]


# --- decoding: bad files ----------------------------------------------------------------------------------


def _assert_bad(path, reason_part):
    with pytest.raises(BadImageError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert reason_part in info.value.reason
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _assert_bad(tmp_path / "empty.jpg", "empty file")
    with pytest.raises(BadImageError, match="empty file"):
        image_size(tmp_path / "empty.jpg")


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_truncated(tmp_path, suffix):
    whole = _save(Image.fromarray(_noise(64, 64)), tmp_path / f"whole{suffix}")
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    _assert_bad(cut, "truncated")


def test_text_named_jpg(tmp_path):
    (tmp_path / "notes.jpg").write_text("just some text\n")
    _assert_bad(tmp_path / "notes.jpg", "not an image")


def test_broken_symlink(tmp_path):
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    _assert_bad(tmp_path / "link.png", "missing file")


def test_decompression_bomb_has_one_limit(tmp_path, monkeypatch):
    path = _save(Image.fromarray(_noise(64, 80)), tmp_path / "big.png")  # 5120 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # between 1x and 2x: Pillow only warns; a valid photo
    assert load_rgb(path).shape == (64, 80, 3) and image_size(path) == (64, 80)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # above 2x: refused, naming the one limit
    _assert_bad(path, "decompression bomb: 5120 pixels > limit 4000")
    with pytest.raises(BadImageError, match="decompression bomb: 5120 pixels > limit 4000"):
        image_size(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_permission_denied(tmp_path):
    path = _save(Image.fromarray(_noise()), tmp_path / "secret.png")
    path.chmod(0)
    try:
        _assert_bad(path, "permission denied")
    finally:
        path.chmod(0o644)


# --- sizes ------------------------------------------------------------------------------------------------


def test_target_size():
    assert target_size(480, 640, None) == (480, 640)
    assert target_size(480, 640, 448) == (448, 597)
    assert target_size(640, 480, 448) == (597, 448)
    assert target_size(100, 100, 32) == (32, 32)
    with pytest.raises(UsageError):
        target_size(480, 640, 0)


def test_resize_rgb():
    arr = _noise(30, 40)
    assert resize_rgb(arr, (30, 40)) is arr
    out = resize_rgb(arr, (15, 21))
    assert out.shape == (15, 21, 3) and out.dtype == np.uint8
    flat = np.full((30, 40, 3), 77, np.uint8)
    assert (resize_rgb(flat, (11, 13)) == 77).all()


def test_an_unreadable_subfolder_is_a_warning_and_the_scan_goes_on(tmp_path, monkeypatch):
    import os

    for sub in ("ok", "locked"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / sub / "a.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(RuntimeWarning, match="cannot read folder .*locked \\(Permission denied\\); its images are left out"):
        refs = scan_images(tmp_path)
    assert [ref.rel for ref in refs] == ["ok/a.png"]


def test_float_tiffs_keep_their_contrast(tmp_path):
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(ramp, mode="F").save(tmp_path / "unit.tif")
    Image.fromarray(ramp * 4000 - 1000, mode="F").save(tmp_path / "wide.tif")
    for name in ("unit.tif", "wide.tif"):
        rgb = load_rgb(tmp_path / name)
        assert rgb.shape == (8, 8, 3) and rgb.min() == 0 and rgb.max() == 255, name
        assert np.all(np.diff(rgb[..., 0].ravel().astype(int)) >= 0), name  # the ramp stays a ramp


def test_printable_name_escapes_control_characters_only():
    from upcli.io.images import printable_name

    assert printable_name("a\nb\tc\x1b[31m é.png") == "a\\x0ab\\x09c\\x1b[31m é.png"
    assert printable_name("plain/name.png") == "plain/name.png"
