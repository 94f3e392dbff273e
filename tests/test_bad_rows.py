"""Bad rows never kill a run and are never silent: what is a bad row, what is converted instead.

Every bad value becomes a :class:`BadRowError` naming the row and the column; with
``on_bad_example="skip"`` it trains as a counted placeholder. Unusual but valid images (grayscale,
16-bit, CMYK, transparent, palette, rotated by EXIF) are converted to upright RGB; the expected
pixels are derived by hand in each test.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib

import datasets
import hypothesis.strategies as st
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from PIL import Image

from diffusion_dpo.data import (
    BadRowError,
    PairStats,
    PairTransform,
    UnpairedStats,
    UnpairedTransform,
    collate_pairs,
    collate_unpaired,
    decode_image,
    load_caption_dataset,
    load_pair_dataset,
    load_unpaired_dataset,
    make_torch_dataset,
    pairs_to_unpaired,
)
from diffusion_dpo.data.pairs import label_problem

datasets.disable_progress_bars()


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


# ---------------------------------------------------------------------------------------------
# Bad labels: checked at load time when loaded whole, marked for the transform when streamed


def pickapic_dataset(labels, captions=None) -> datasets.Dataset:
    """Pick-a-Pic rows with valid images; ``label_0`` and ``caption`` may hold values of any type
    (a JSON feature, as ``datasets`` stores a mixed-type JSONL column)."""
    image = encode(Image.new("RGB", (12, 10), (255, 0, 0)))
    captions = captions if captions is not None else [f"pair {i}" for i in range(len(labels))]
    rows = [{"caption": c, "jpg_0": image, "jpg_1": image, "label_0": v} for c, v in zip(captions, labels)]
    features = datasets.Features(
        caption=datasets.Json(),
        jpg_0=datasets.Value("binary"),
        jpg_1=datasets.Value("binary"),
        label_0=datasets.Json(),
    )
    return datasets.Dataset.from_list(rows, features=features)


def test_label_problem_accepts_0_half_1_in_any_numeric_type_and_nothing_else():
    for good in (0, 1, 0.0, 0.5, 1.0, True, np.float32(0.5), np.int64(1), np.float64(0.0)):
        assert label_problem(good) is None, good
    for bad in (0.7, 2, -1, float("nan"), float("inf"), None, "1", "abc", b"1", [1]):
        assert "is not 0, 0.5 or 1" in label_problem(bad), bad


def test_bad_pair_labels_raise_at_load_naming_rows_or_are_left_out_and_counted(tmp_path):
    labels = [1.0, 0.75, 0.0, 2, 0.5, "abc", None, 1]  # 0.75: exact in the JSON feature's round trip
    with pytest.raises(ValueError) as error:
        load_pair_dataset(pickapic_dataset(labels))
    message = str(error.value)
    assert message.startswith("4 pairs of in-memory Dataset have a bad label")
    for row, value in ((1, "0.75"), (3, "2"), (5, "'abc'"), (6, "None")):
        assert f"row {row}: label_0 {value} is not 0, 0.5 or 1" in message
    assert "on_bad_example='skip'" in message

    stats = PairStats()
    ds = load_pair_dataset(pickapic_dataset(labels), on_bad_example="skip", stats=stats)
    assert [r["caption"] for r in ds] == ["pair 0", "pair 2", "pair 7"]  # bad labels and the tie left out
    assert (stats.seen, stats.ties, stats.swapped, stats.bad_labels) == (8, 1, 1, 4)
    assert [row for row, _ in stats.bad_label_rows] == [1, 3, 5, 6]
    # A NaN in a float column (as parquet stores a missing label) is bad too.
    path = tmp_path / "nan.parquet"
    pq.write_table(
        pa.Table.from_pylist([{"caption": "c", "jpg_0": b"", "jpg_1": b"", "label_0": float("nan")}]), path
    )
    with pytest.raises(ValueError, match="row 0: label_0 nan is not 0, 0.5 or 1"):
        load_pair_dataset(path, cache_dir=str(tmp_path / "cache"))


def test_streamed_bad_pair_labels_pass_marked_and_become_placeholders():
    labels = [1.0, 0.75, 0.0, 0.5, "abc", 1]
    stats = PairStats()
    stream = load_pair_dataset(pickapic_dataset(labels), streaming=True, stats=stats)
    rows = list(stream)
    assert [r["caption"] for r in rows] == ["pair 0", "pair 1", "pair 2", "pair 4", "pair 5"]  # tie dropped
    assert [r["bad"] for r in rows] == [
        None,
        "row 1 of in-memory IterableDataset: label_0 0.75 is not 0, 0.5 or 1",
        None,
        "row 4 of in-memory IterableDataset: label_0 'abc' is not 0, 0.5 or 1",
        None,
    ]
    assert (stats.seen, stats.ties, stats.swapped, stats.bad_labels) == (6, 1, 1, 2)
    assert [row for row, _ in stats.bad_label_rows] == [1, 4]
    with pytest.raises(BadRowError, match="row 1 of in-memory IterableDataset: label_0 0.75"):
        PairTransform(resolution=8)(rows[1], index=1)
    lenient = make_torch_dataset(stream, PairTransform(resolution=8), on_bad_example="skip")
    batch = next(iter(torch.utils.data.DataLoader(lenient, batch_size=5, collate_fn=collate_pairs)))
    assert batch["valid"].tolist() == [True, False, True, False, True] and batch["num_skipped"] == 2
    assert "label_0 'abc'" in batch["bad_rows"][1]["reason"] and batch["bad_rows"][1]["index"] == 3


def test_pairs_to_unpaired_ignores_pairs_streamed_with_a_bad_label():
    red, blue, green = (encode(Image.new("RGB", (4, 4), c)) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0)))
    source = datasets.Dataset.from_list(
        [
            {"caption": "p0", "jpg_0": red, "jpg_1": blue, "label_0": 1.0},
            {"caption": "p1", "jpg_0": green, "jpg_1": red, "label_0": 0.75},  # says nothing
        ]
    )
    unpaired = pairs_to_unpaired(load_pair_dataset(source, streaming=True))
    assert [(r["caption"], r["image"], r["label"]) for r in unpaired] == [
        ("p0", red, True),
        ("p0", blue, False),
    ]


def test_bad_kto_labels_at_load_and_when_streamed():
    image = encode(Image.new("RGB", (12, 10), (0, 255, 0)))
    labels = [True, "maybe", 0, 2, None, "undesirable"]
    rows = [{"caption": f"img {i}", "image": image, "label": v} for i, v in enumerate(labels)]
    features = datasets.Features(
        caption=datasets.Value("string"), image=datasets.Value("binary"), label=datasets.Json()
    )
    source = datasets.Dataset.from_list(rows, features=features)
    with pytest.raises(
        ValueError, match=r"3 rows of in-memory Dataset have a bad label \(row 1: label 'maybe'"
    ):
        load_unpaired_dataset(source)
    stats = UnpairedStats()
    ds = load_unpaired_dataset(source, on_bad_example="skip", stats=stats)
    assert [(r["caption"], r["desirable"]) for r in ds] == [
        ("img 0", True),
        ("img 2", False),
        ("img 5", False),
    ]
    assert (stats.seen, stats.desirable, stats.undesirable, stats.bad_labels) == (3, 1, 2, 3)
    assert [row for row, _ in stats.bad_label_rows] == [1, 3, 4]

    stats = UnpairedStats()
    stream = load_unpaired_dataset(source, streaming=True, stats=stats)
    lenient = make_torch_dataset(
        stream, UnpairedTransform(resolution=8, labelled=True), on_bad_example="skip"
    )
    batch = next(iter(torch.utils.data.DataLoader(lenient, batch_size=6, collate_fn=collate_unpaired)))
    assert batch["valid"].tolist() == [True, False, True, False, False, True]
    assert batch["desirable"].tolist() == [True, False, False, False, False, False]
    assert batch["bad_rows"][0] == {
        "index": 1,
        "reason": "row 1 of in-memory IterableDataset: label 'maybe' is not desirable/undesirable "
        "(expected a bool, 1/0, or 'desirable'/'undesirable')",
    }
    assert (stats.seen, stats.desirable, stats.undesirable, stats.bad_labels) == (3, 1, 2, 3)
    strict = make_torch_dataset(stream, UnpairedTransform(resolution=8, labelled=True))
    with pytest.raises(BadRowError, match="row 1 of in-memory IterableDataset: label 'maybe'"):
        list(strict)


def test_skipped_rows_are_logged_by_name_then_every_1000th(caplog):
    rows = [{"caption": "c", "image_w": None, "image_l": None}] * 2500
    ds = make_torch_dataset(rows, PairTransform(resolution=8), on_bad_example="skip")
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo.data.transforms"):
        examples = [ds[i] for i in range(len(rows))]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 12 and ds.num_skipped == 2500  # rows 0-9 by name, then the 1000th and 2000th
    assert messages[0].endswith("row 0, image_w: image is missing (None)")
    assert "from now on only every 1000th is logged" in messages[9]
    assert messages[10].startswith("1000 bad rows") and messages[11].startswith("2000 bad rows")
    assert all(e["bad"] for e in examples)


# ---------------------------------------------------------------------------------------------
# Property: whatever a row holds, it is trained on or becomes a counted placeholder


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "F":
        return Image.fromarray(rng.random((height, width), dtype=np.float32))
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)


#: Modes and the formats that store them.
IMAGE_FORMATS = {
    "RGB": ("PNG", "JPEG"),
    "RGBA": ("PNG",),
    "L": ("PNG", "JPEG"),
    "LA": ("PNG",),
    "P": ("PNG", "GIF"),
    "1": ("PNG",),
    "I;16": ("PNG",),
    "F": ("TIFF",),
    "CMYK": ("JPEG", "TIFF"),
}


@st.composite
def image_cells(draw) -> tuple[object, str]:
    """(an image cell, "good" | "bad" | "unknown"): valid images of random modes and sizes, the same
    truncated (which may or may not still decode), random bytes, empty bytes, None."""
    kind = draw(st.sampled_from(["valid", "valid", "truncated", "random", "empty", "none"]))
    if kind == "none":
        return None, "bad"
    if kind == "empty":
        return b"", "bad"
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=64)), "unknown"
    mode = draw(st.sampled_from(sorted(IMAGE_FORMATS)))
    size = draw(st.tuples(st.integers(1, 20), st.integers(1, 20)))
    data = encode(
        make_image(mode, *size, draw(st.integers(0, 99))), draw(st.sampled_from(IMAGE_FORMATS[mode]))
    )
    if kind == "valid":
        return data, "good"
    return data[: draw(st.integers(0, len(data) - 1))], "unknown"


captions = st.one_of(st.none(), st.just(""), st.text(max_size=8), st.floats(), st.integers())
pair_labels = st.one_of(
    st.sampled_from([0, 1, 0.0, 0.5, 1.0, 0.7, 2, -1, None, "1", "abc"]), st.floats(allow_nan=False)
)


def worst(*qualities: str) -> str:
    return next(q for q in ("bad", "unknown", "good") if q in qualities)


def as_source(rows: list[dict], columns: dict) -> tuple[datasets.Dataset, list[dict]]:
    """A dataset of ``rows`` (caption and label as JSON features: any type, as ``datasets`` stores a
    mixed-type JSONL column) and its rows as loading sees them: the JSON feature reads a string that
    is valid JSON back parsed ("1" -> 1), so expectations come from the stored values."""
    source = datasets.Dataset.from_list(rows, features=datasets.Features(columns))
    stored = source[:]
    return source, [{k: stored[k][i] for k in stored} for i in range(len(rows))]


PAIR_COLUMNS = {
    "caption": datasets.Json(),
    "jpg_0": datasets.Value("binary"),
    "jpg_1": datasets.Value("binary"),
    "label_0": datasets.Json(),
}


def check_batches(torch_dataset, collate, expected: list[str]) -> None:
    """Every row comes out exactly once, in full batches, valid or a named and counted placeholder."""
    valid = {}
    for batch in torch.utils.data.DataLoader(torch_dataset, batch_size=4, collate_fn=collate):
        size = len(batch["captions"])
        assert batch["valid"].shape == batch["indices"].shape == (size,)
        assert batch["num_skipped"] == len(batch["bad_rows"]) == int((~batch["valid"]).sum())
        assert {r["index"] for r in batch["bad_rows"]} == set(batch["indices"][~batch["valid"]].tolist())
        for r in batch["bad_rows"]:
            assert r["reason"].startswith("row "), r
        valid.update(zip(batch["indices"].tolist(), batch["valid"].tolist()))
    assert sorted(valid) == list(range(len(expected)))
    for index, quality in enumerate(expected):
        if quality != "unknown":
            assert valid[index] == (quality == "good"), (index, quality)


SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(st.data())
def test_any_pair_row_trains_or_becomes_a_counted_placeholder(data):
    rows, image_qualities = [], []
    for _ in range(data.draw(st.integers(1, 6))):
        (image_0, quality_0), (image_1, quality_1) = data.draw(image_cells()), data.draw(image_cells())
        caption, label = data.draw(captions), data.draw(pair_labels)
        rows.append({"caption": caption, "jpg_0": image_0, "jpg_1": image_1, "label_0": label})
        image_qualities.append(worst(quality_0, quality_1))
    source, stored = as_source(rows, PAIR_COLUMNS)
    label_ok = [label_problem(r["label_0"]) is None for r in stored]
    tie = [ok and float(r["label_0"]) == 0.5 for r, ok in zip(stored, label_ok)]
    # 'good': must train; 'bad': must be a placeholder; 'unknown': truncated bytes may still decode.
    quality = [
        worst(q, "good" if ok and isinstance(r["caption"], str) else "bad")
        for r, q, ok in zip(stored, image_qualities, label_ok)
    ]
    transform = PairTransform(resolution=8, sdxl=data.draw(st.booleans()))

    # Loaded whole: bad labels and ties left out at load time, every other row trains or is a placeholder.
    stats = PairStats()
    loaded = load_pair_dataset(source, on_bad_example="skip", stats=stats)
    kept = [i for i in range(len(rows)) if label_ok[i] and not tie[i]]
    assert len(loaded) == len(kept) and stats.bad_labels == label_ok.count(False)
    check_batches(
        make_torch_dataset(loaded, transform, on_bad_example="skip"),
        collate_pairs,
        [quality[i] for i in kept],
    )
    # Streamed: bad labels are placeholders too.
    streamed = load_pair_dataset(source, streaming=True)
    passed = [i for i in range(len(rows)) if not tie[i]]
    check_batches(
        make_torch_dataset(streamed, transform, on_bad_example="skip"),
        collate_pairs,
        [quality[i] for i in passed],
    )

    # on_bad_example="error": a bad row raises, naming the row.
    if not all(label_ok):
        with pytest.raises(ValueError, match=f"row {label_ok.index(False)}: label_0"):
            load_pair_dataset(source)
    strict = make_torch_dataset(loaded, transform)
    for index, i in enumerate(kept):
        try:
            strict[index]
        except BadRowError as error:
            assert quality[i] != "good" and str(error).startswith(f"row {index}")
        else:
            assert quality[i] != "bad"
    strict_stream = iter(make_torch_dataset(streamed, transform))
    for i in passed:
        try:
            next(strict_stream)
        except BadRowError as error:
            assert quality[i] != "good" and str(error).startswith("row ")
            break  # a generator that raised is finished
        else:
            assert quality[i] != "bad"


kto_labels = st.sampled_from([True, False, 1, 0, "desirable", "Undesirable", "maybe", 2, None, 0.5])


@SETTINGS
@given(st.data())
def test_any_kto_row_trains_or_becomes_a_counted_placeholder(data):
    rows, image_qualities = [], []
    for _ in range(data.draw(st.integers(1, 6))):
        image, image_quality = data.draw(image_cells())
        rows.append({"caption": data.draw(captions), "image": image, "label": data.draw(kto_labels)})
        image_qualities.append(image_quality)
    columns = {"caption": datasets.Json(), "image": datasets.Value("binary"), "label": datasets.Json()}
    source, stored = as_source(rows, columns)
    label_ok = [r["label"] in (True, False, 1, 0, "desirable", "Undesirable") for r in stored]
    caption_ok = [isinstance(r["caption"], str) for r in stored]
    transform = UnpairedTransform(resolution=8, labelled=True)

    loaded = load_unpaired_dataset(source, on_bad_example="skip")
    kept = [i for i in range(len(rows)) if label_ok[i]]
    assert len(loaded) == len(kept)
    expected = [worst(image_qualities[i], "good" if caption_ok[i] else "bad") for i in kept]
    check_batches(make_torch_dataset(loaded, transform, on_bad_example="skip"), collate_unpaired, expected)
    streamed = load_unpaired_dataset(source, streaming=True)
    expected = [
        worst(q, "good" if c and ok else "bad") for q, c, ok in zip(image_qualities, caption_ok, label_ok)
    ]
    check_batches(make_torch_dataset(streamed, transform, on_bad_example="skip"), collate_unpaired, expected)
    if not all(label_ok):
        with pytest.raises(ValueError, match=f"row {label_ok.index(False)}: label"):
            load_unpaired_dataset(source)
    # Captioned images without labels (SFT) go through the same transform.
    captions_only, _ = as_source(
        [{"caption": r["caption"], "image": r["image"]} for r in rows],
        {"caption": datasets.Json(), "image": datasets.Value("binary")},
    )
    expected = [worst(q, "good" if c else "bad") for q, c in zip(image_qualities, caption_ok)]
    check_batches(
        make_torch_dataset(
            load_caption_dataset(captions_only), UnpairedTransform(resolution=8), on_bad_example="skip"
        ),
        collate_unpaired,
        expected,
    )
