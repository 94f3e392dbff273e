"""Bad rows never kill a run and are never silent: what is a bad row, what is converted instead.

Every bad value becomes a :class:`BadRowError` naming the row and the column; with
``on_bad_example="skip"`` it trains as a counted placeholder. Unusual but valid images (grayscale,
16-bit, CMYK, transparent, palette, rotated by EXIF) are converted to upright RGB; the expected
pixels are derived by hand in each test.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffusion_dpo.data import BadRowError, PairTransform, decode_image


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_pixels(value) -> np.ndarray:
    """The decoded image as an [H, W, 3] int array."""
    image = decode_image(value)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# ---------------------------------------------------------------------------------------------
# Converted, not skipped


def test_grayscale_and_bilevel_become_gray_rgb():
    gray = Image.new("L", (2, 1), 77)
    gray.putpixel((1, 0), 200)
    assert rgb_pixels(encode(gray)).tolist() == [[[77, 77, 77], [200, 200, 200]]]
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert rgb_pixels(encode(bilevel)).tolist() == [[[0, 0, 0], [255, 255, 255]]]


def test_16_bit_and_integer_grayscale_are_scaled_not_clipped():
    # 16-bit white is 65535 -> 255; 32896 = 128 * 257 -> 128; 257 -> 1. PIL's convert("RGB") would
    # clip everything above 255 to white.
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    png16 = encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(png16)).mode == "I;16"
    assert rgb_pixels(png16)[..., 0].tolist() == [[0, 1, 128, 255]]
    assert (rgb_pixels(png16) == rgb_pixels(png16)[..., :1]).all()  # gray: R = G = B
    # Mode "I" (32-bit; e.g. 16-bit data in TIFF) on the same 16-bit scale, clipped beyond it.
    wide = Image.fromarray(np.array([[0, 257, 32896, 65535, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    assert rgb_pixels(encode(wide, "TIFF"))[..., 0].tolist() == [[0, 1, 128, 255, 255]]


def test_float_grayscale_is_scaled_from_zero_one():
    # 0.5 * 255 = 127.5, which rounds to 128; out of [0, 1] is clipped, NaN is black.
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0, np.nan]], dtype=np.float32)
    assert rgb_pixels(encode(Image.fromarray(values), "TIFF"))[..., 0].tolist() == [[0, 128, 255, 255, 0, 0]]


def test_cmyk_becomes_rgb():
    cmyk = Image.new("CMYK", (3, 1), (0, 0, 0, 0))  # no ink: white
    cmyk.putpixel((0, 0), (255, 0, 0, 0))  # full cyan: no red
    cmyk.putpixel((1, 0), (0, 0, 0, 255))  # full black
    assert rgb_pixels(encode(cmyk, "TIFF")).tolist() == [[[0, 255, 255], [0, 0, 0], [255, 255, 255]]]
    assert rgb_pixels(encode(cmyk, "JPEG", quality=100)).shape == (1, 3, 3)


def test_alpha_is_composited_onto_white():
    # out = alpha * colour + (1 - alpha) * 255. Half-transparent red, alpha 128/255:
    # R = 255, G = B = 255 * 127/255 = 127 (128 with alpha 127) -> (255, 128, 128) +- 1.
    rgba = Image.new("RGBA", (3, 1), (255, 0, 0, 128))
    rgba.putpixel((1, 0), (0, 255, 0, 0))  # invisible green: white, not green
    rgba.putpixel((2, 0), (0, 0, 255, 255))  # opaque blue stays blue
    pixels = rgb_pixels(encode(rgba))
    assert np.abs(pixels[0, 0] - [255, 128, 128]).max() <= 1
    assert pixels[0, 1].tolist() == [255, 255, 255] and pixels[0, 2].tolist() == [0, 0, 255]
    # Gray with alpha: 0 at alpha 128 -> 255 * 127/255 = 127.
    gray_alpha = Image.new("LA", (2, 1), (0, 128))
    gray_alpha.putpixel((1, 0), (50, 255))
    pixels = rgb_pixels(encode(gray_alpha))
    assert np.abs(pixels[0, 0] - 127).max() <= 1 and pixels[0, 1].tolist() == [50, 50, 50]


def test_palette_images_with_and_without_transparency():
    palette = Image.new("P", (2, 1), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])  # index 0 red, 1 green
    palette.putpixel((1, 0), 1)
    assert rgb_pixels(encode(palette)).tolist() == [[[255, 0, 0], [0, 255, 0]]]
    # Index 1 transparent (a PNG tRNS chunk): white where it is.
    assert rgb_pixels(encode(palette, transparency=1)).tolist() == [[[255, 0, 0], [255, 255, 255]]]
    # A GIF's transparent index too.
    assert rgb_pixels(encode(palette, "GIF", transparency=0)).tolist() == [[[255, 255, 255], [0, 255, 0]]]
    # Grayscale with a transparent gray value (tRNS on an L image).
    gray = Image.new("L", (2, 1), 7)
    gray.putpixel((1, 0), 9)
    assert rgb_pixels(encode(gray, transparency=7)).tolist() == [[[255, 255, 255], [9, 9, 9]]]


def test_exif_orientation_makes_phone_photos_upright():
    # Stored 4 wide, 2 tall, red at the top-left. EXIF orientation 6 says: rotate 90 degrees
    # clockwise to display; the displayed image is 2 wide, 4 tall, and the stored top-left pixel
    # (x=0, y=0) lands at (x = H - 1 - y, y = x) = (1, 0), the top-right.
    stored = Image.new("RGB", (4, 2), (0, 0, 255))
    stored.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = decode_image(encode(stored, exif=exif))
    assert upright.size == (2, 4)
    assert upright.getpixel((1, 0)) == (255, 0, 0) and upright.getpixel((0, 0)) == (0, 0, 255)


# ---------------------------------------------------------------------------------------------
# Bad images: a BadRowError naming the row and the column


def red_png() -> bytes:
    return encode(Image.new("RGB", (16, 16), (255, 0, 0)))


def noisy(fmt: str) -> bytes:
    """A 32x32 noise image: its compressed pixel data fills most of the file, so cutting the file in
    half cuts the pixels (a tiny solid PNG cut short may still hold its whole pixel stream)."""
    rng = np.random.default_rng(0)
    return encode(Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), fmt)


def bad_image_cases(tmp_path) -> dict:
    """Each bad image cell and a fragment of the message it must produce."""
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    return {
        "corrupt bytes": (b"\x89PNG this is not an image", "cannot decode image"),
        "truncated png": (noisy("PNG")[: len(noisy("PNG")) // 2], "cannot decode image"),
        "truncated jpeg": (noisy("JPEG")[: len(noisy("JPEG")) // 2], "cannot decode image"),
        "zero bytes": (b"", "image is empty (0 bytes)"),
        "zero-byte file": (str(tmp_path / "empty.png"), "image is empty (0 bytes)"),
        "corrupt file": (str(tmp_path / "garbage.png"), "cannot decode image"),
        "missing file": (str(tmp_path / "nope.png"), f"image file '{tmp_path / 'nope.png'}' does not exist"),
        "missing file in a dict": (
            {"bytes": None, "path": str(tmp_path / "nope.png")},
            f"image file '{tmp_path / 'nope.png'}' does not exist",
        ),
        "dict with neither": ({"bytes": None, "path": None}, "image dict has neither 'bytes' nor 'path'"),
        "None": (None, "image is missing (None)"),
        "a number": (3.5, "cannot read an image from a float"),
    }


def test_every_kind_of_bad_image_names_the_row_and_column(tmp_path):
    transform = PairTransform(resolution=8)
    for name, (value, message) in bad_image_cases(tmp_path).items():
        with pytest.raises(BadRowError) as error:
            transform({"caption": "c", "image_w": red_png(), "image_l": value}, index=41)
        assert f"row 41, image_l: {message}" in str(error.value), name


@pytest.mark.parametrize(
    "error",
    [
        struct.error("unpack requires a buffer of 4 bytes"),
        IndexError("list index out of range"),
        ValueError("tile cannot extend outside image"),
        OSError("broken data stream"),
        SyntaxError("not a TIFF file"),
        TypeError("unsupported operand"),
        EOFError(),
        zlib.error("Error -3 while decompressing data"),
        Image.DecompressionBombError("Image size exceeds limit"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_anything_pil_raises_on_hostile_bytes_becomes_a_bad_row(error, monkeypatch):
    def hostile_open(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image, "open", hostile_open)
    with pytest.raises(BadRowError, match=f"row 2, image_w: cannot decode image \\({type(error).__name__}"):
        PairTransform(resolution=8)({"caption": "c", "image_w": b"x", "image_l": b"x"}, index=2)


@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit, MemoryError])
def test_interrupts_and_memory_errors_are_not_swallowed(error, monkeypatch):
    def open_and_fail(*args, **kwargs):
        raise error()

    monkeypatch.setattr(Image, "open", open_and_fail)
    with pytest.raises(error):
        decode_image(b"x")


def test_a_real_decompression_bomb_is_a_bad_row(monkeypatch):
    # PIL refuses images of more than 2 * MAX_IMAGE_PIXELS; make a 16x16 PNG exceed it.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(BadRowError, match="row 0, image: cannot decode image \\(DecompressionBombError"):
        decode_image(red_png(), where="row 0, image")
