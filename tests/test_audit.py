"""The shortcut audit (diffusion_dpo/curation/audit.py, data/audit_pairs.py) and the trainer's start-up check.

Planted shortcuts are the synthetic pairs with every winner changed (re-encoded as JPEG quality 30, or
resized) while losers stay as written; clean pairs are write_pair_dataset's. Hand-computed values are
derived in each test's docstring.
"""

import importlib.util
import io
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_dpo.curation import audit
from diffusion_dpo.curation.report import format_table
from diffusion_dpo.curation.rules import categorical_rule, numeric_rule
from diffusion_dpo.curation.traits import header_traits, laplacian_variance, mean_saturation, pixel_traits
from diffusion_dpo.evaluation.stats import wilson_interval
from diffusion_dpo.synthetic import write_pair_dataset

REPO = Path(__file__).resolve().parents[1]
N_PAIRS = 300


def _load_script():
    spec = importlib.util.spec_from_file_location("data_audit_pairs", REPO / "data" / "audit_pairs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(rgb, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(data: bytes, quality: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _resized(data: bytes, side: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).resize((side, side), Image.Resampling.BICUBIC).save(buffer, format="PNG")
    return buffer.getvalue()


def _rewrite(source: Path, target: Path, change_winner=None, label_for=None) -> Path:
    """``source``'s rows with each non-tied winner's bytes passed through ``change_winner``, or the
    winner moved to position ``label_for(i)`` (1: image 0, 0: image 1)."""
    table = pq.read_table(source)
    rows = table.to_pylist()
    for i, row in enumerate(rows):
        if row["label_0"] == 0.5:
            continue
        winner, loser = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        if change_winner is not None:
            row[winner] = change_winner(row[winner])
        if label_for is not None:
            w, ell, label = row[winner], row[loser], float(label_for(i))
            row["jpg_0"], row["jpg_1"] = (w, ell) if label == 1.0 else (ell, w)
            row["label_0"], row["label_1"] = label, 1.0 - label
    pq.write_table(table.from_pylist(rows, schema=table.schema), target)
    return target


@pytest.fixture(scope="module")
def clean_pairs(tmp_path_factory):
    return write_pair_dataset(
        tmp_path_factory.mktemp("audit") / "clean.parquet", N_PAIRS, seed=0, resolution=32
    )


@pytest.fixture(scope="module")
def jpeg_winners(clean_pairs):
    return _rewrite(clean_pairs, clean_pairs.with_name("jpeg_winners.parquet"), lambda b: _jpeg(b, 30))


@pytest.fixture(scope="module")
def resized_winners(clean_pairs):
    return _rewrite(clean_pairs, clean_pairs.with_name("resized_winners.parquet"), _resized)


def _trait(report: dict, name: str) -> dict:
    return next(t for t in report["traits"] if t["trait"] == name)


# ----------------------------------------------------------------------------------------------
# Pure functions against hand-computed values


def test_wilson_interval_known_values():
    """8 of 10, z = 1.96: p = 0.8, z² = 3.8416; centre (0.8 + 0.19208) / 1.38416 = 0.71674, half-width
    1.96·sqrt(0.016 + 0.009604) / 1.38416 = 0.22658, so (0.4902, 0.9433), the textbook value. Nothing
    observed: (0, 1); the interval of n - k mirrors that of k."""
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=2e-4) and high == pytest.approx(0.9433, abs=2e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    mirrored = wilson_interval(2, 10)
    assert mirrored[0] == pytest.approx(1 - high) and mirrored[1] == pytest.approx(1 - low)


def test_pixel_traits_of_constant_and_checkerboard_images():
    """A constant (200, 100, 50) image: luma 0.299·200 + 0.587·100 + 0.114·50 = 124.2, saturation
    (200 − 50) / 200 = 0.75, a zero Laplacian. A 0/255 checkerboard: each interior pixel's Laplacian is
    ±4·255 = ±1020 in equal numbers, so its variance is 1020² = 1040400; mean luma 127.5."""
    constant = np.zeros((8, 8, 3), dtype=np.uint8) + np.array([200, 100, 50], dtype=np.uint8)
    traits = pixel_traits(Image.fromarray(constant))
    assert traits["brightness"] == pytest.approx(124.2)
    assert traits["saturation"] == pytest.approx(0.75)
    assert traits["sharpness"] == 0.0
    board = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    assert laplacian_variance(board) == pytest.approx(1020.0**2)
    assert pixel_traits(Image.fromarray(board).convert("RGB"))["brightness"] == pytest.approx(127.5)
    assert mean_saturation(np.zeros((2, 2, 3))) == 0.0  # black: no division by zero


def test_header_traits_and_jpeg_quality():
    """PIL writes libjpeg's tables, so the estimate is exact; PNG has none. bytes_per_pixel is the
    file's length over the pixel count."""
    rgb = np.random.default_rng(0).integers(0, 256, (24, 40, 3))
    png = _png(rgb)
    for quality in (10, 30, 75, 95):
        traits = header_traits(_jpeg(png, quality))
        assert traits["format"] == "JPEG" and traits["jpeg_quality"] == quality
    traits = header_traits(png)
    assert traits["format"] == "PNG" and traits["jpeg_quality"] is None
    assert (traits["width"], traits["height"], traits["size"]) == (40, 24, "40x24")
    assert traits["aspect_ratio"] == pytest.approx(40 / 24)
    assert traits["bytes_per_pixel"] == pytest.approx(len(png) / (40 * 24))


def test_numeric_and_categorical_rules_by_hand():
    """Chosen 3, 2, 1, 5 against rejected 1, 2, 2, 4: "higher wins" scores 1, 0.5, 0, 1, so 2.5/4 =
    0.625; it differs in 3 pairs and is right in 2 of them. Formats: JPEG chosen 3 times against PNG, one
    pair PNG/PNG: "JPEG wins" scores 1, 1, 1, 0.5 = 0.875."""
    rule = numeric_rule([3, 2, 1, 5], [1, 2, 2, 4])
    assert rule["direction"] == "higher" and rule["accuracy"] == pytest.approx(0.625)
    assert rule["differs"] == 3 and rule["accuracy_where_different"] == pytest.approx(2 / 3)
    assert rule["interval"] == pytest.approx(list(wilson_interval(2.5, 4))) and not rule["flag"]
    assert numeric_rule([1, 1], [2, 3])["direction"] == "lower"
    fmt = categorical_rule(["JPEG", "JPEG", "JPEG", "PNG"], ["PNG", "PNG", "PNG", "PNG"])
    assert fmt["value"] in ("JPEG", "PNG") and fmt["accuracy"] == pytest.approx(0.875)
    assert fmt["differs"] == 3 and fmt["accuracy_where_different"] == 1.0


def test_position_bias_ties_identical_duplicates_and_unreadable_rows():
    """Ten hand-made pairs: image 0 wins 6 of the 8 non-tied, 2 ties (share 0.2); pair 3 shows the same
    picture twice; row 4 repeats row 0's two files (with the other winner); row 9 holds bytes that are
    no image. Position: 6/8 with Wilson (0.409, 0.929)."""
    rng = np.random.default_rng(1)
    pictures = [_png(rng.integers(0, 256, (8, 8, 3))) for _ in range(20)]
    labels = [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.5, 0.5, 1.0]
    pairs = [{"row": i, "caption": "a red circle", "image_0": pictures[2 * i], "image_1": pictures[2 * i + 1],
              "label_0": label} for i, label in enumerate(labels)]  # fmt: skip
    pairs[3]["image_1"] = pairs[3]["image_0"]
    pairs[4]["image_0"], pairs[4]["image_1"] = pictures[0], pictures[1]
    pairs[9]["image_1"] = b"not an image"
    report = audit.summarize([audit.measure_pair(p) for p in pairs])
    position = report["position"]
    assert (position["image_0_wins"], position["decided"]) == (6, 8)
    assert position["interval_image_0"] == pytest.approx([0.409, 0.929], abs=1e-3) and not position["biased"]
    assert report["ties"]["count"] == 2 and report["ties"]["share"] == pytest.approx(0.2)
    assert report["identical_pairs"]["count"] == 1 and report["identical_pairs"]["rows"] == [3]
    duplicates = report["duplicates"]
    # 19 readable images; pair 3's copy and row 4's two files are extra copies
    assert duplicates["images"] == 19 and duplicates["duplicate_files"] == 3
    assert duplicates["repeated_pairs"] == 1 and duplicates["conflicting_repeated_pairs"] == 1
    assert duplicates["repeated_pair_rows"] == [[0, 4]]
    assert report["undecodable"]["rows"] == 1 and report["undecodable"]["examples"][0][:2] == [9, "image_1"]
    assert report["usable_pairs"] == 7  # 8 non-tied, less the unreadable row 9


def test_position_bias_is_flagged(clean_pairs, tmp_path):
    """Winners put at position 0 in 80% of the pairs (every fifth pair at 1): flagged and biased."""
    biased = _rewrite(clean_pairs, tmp_path / "biased.parquet", label_for=lambda i: i % 5 != 0)
    report = _load_script().main(["--dataset", str(biased), "--output", str(tmp_path / "out")])
    position = report["position"]
    assert position["share_image_0"] == pytest.approx(0.8, abs=0.02)
    assert position["biased"] and position["flag"] and "position" in report["flagged"]
    assert position["rule"] == "image 0 wins"


# ----------------------------------------------------------------------------------------------
# Whole datasets through the command


def test_clean_synthetic_pairs_are_not_flagged(clean_pairs, tmp_path):
    report = _load_script().main(["--dataset", str(clean_pairs), "--output", str(tmp_path)])
    assert report["flagged"] == [], format_table(report)
    assert report["pairs"] == N_PAIRS and report["pixels"]
    assert all(t["accuracy"] is None or t["interval"][0] <= 0.6 for t in report["traits"])
    assert report["identical_pairs"]["count"] == 0 and report["duplicates"]["duplicate_files"] == 0
    assert report["undecodable"]["images"] == 0
    ties = pq.read_table(clean_pairs).column("label_0").to_numpy() == 0.5
    assert report["ties"]["count"] == int(ties.sum())
    assert json.loads((tmp_path / "audit.json").read_text())["flagged"] == []
    assert "Nothing flagged" in (tmp_path / "audit.html").read_text()


def test_jpeg_winners_are_flagged_with_examples(jpeg_winners, tmp_path, capsys):
    report = _load_script().main(["--dataset", str(jpeg_winners), "--output", str(tmp_path)])
    for name in ("format", "jpeg_quality"):
        trait = _trait(report, name)
        assert trait["flag"] and trait["accuracy"] >= 0.95, trait
    assert _trait(report, "format")["rule"] in ("JPEG wins", "PNG loses")
    assert _trait(report, "jpeg_quality")["rule"] == "lower wins"
    assert "format" in report["flagged"] and "FLAG" in capsys.readouterr().out
    page = (tmp_path / "audit.html").read_text()
    assert "<h2>format</h2>" in page and page.count("data:image/png;base64,") >= 2 * 4
    assert "jpeg_quality = 30" in page


def test_resized_winners_are_flagged(resized_winners, tmp_path):
    report = _load_script().main(["--dataset", str(resized_winners), "--output", str(tmp_path)])
    for name in ("width", "height", "size"):
        trait = _trait(report, name)
        assert trait["flag"] and trait["accuracy"] >= 0.95, trait
    assert _trait(report, "width")["rule"] == "higher wins"
    assert not _trait(report, "format")["flag"]


def test_clear_errors_for_a_wrong_path_and_a_missing_column(clean_pairs, tmp_path):
    script = _load_script()
    missing = tmp_path / "nope.parquet"
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        script.main(["--dataset", str(missing), "--output", str(tmp_path)])
    table = pq.read_table(clean_pairs).drop_columns(["label_0"])
    pq.write_table(table, tmp_path / "no_label.parquet")
    with pytest.raises(ValueError, match=r"missing columns \['label_0'\].*no_label.parquet"):
        script.main(["--dataset", str(tmp_path / "no_label.parquet"), "--output", str(tmp_path)])


def test_ordered_jsonl_pairs_have_no_position(tmp_path):
    """caption, image_w, image_l: the winner is known to be first, so no position or tie rows; the
    paths are resolved against the file's folder, and a missing file is an unreadable image."""
    rng = np.random.default_rng(2)
    lines = []
    for i in range(6):
        for side in ("w", "l"):
            (tmp_path / f"{i}_{side}.png").write_bytes(_png(rng.integers(0, 256, (8, 8, 3))))
        lines.append(json.dumps({"caption": "a cat", "image_w": f"{i}_w.png", "image_l": f"{i}_l.png"}))
    lines.append(json.dumps({"caption": "a dog", "image_w": "gone.png", "image_l": "0_l.png"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    report, _, _ = audit.audit_dataset(tmp_path / "pairs.jsonl")
    assert report["schema"] == "ordered" and report["position"] is None and report["ties"] is None
    assert report["usable_pairs"] == 6 and report["undecodable"]["rows"] == 1
    row, side, why = report["undecodable"]["examples"][0]
    assert (row, side) == (6, "image_0") and "gone.png" in why


# ----------------------------------------------------------------------------------------------
# The trainer's start-up check


def _cfg(dataset, **overrides):
    from diffusion_dpo.training.config import TrainConfig

    return TrainConfig(
        pretrained_model_name_or_path="unused", dataset_name=str(dataset), resolution=32, **overrides
    )


def test_trainer_start_up_warns_about_a_planted_shortcut(jpeg_winners, clean_pairs, caplog):
    from diffusion_dpo.training.data_setup import build_train_data

    with caplog.at_level(logging.INFO, logger="diffusion_dpo.curation.audit"):
        build_train_data(_cfg(jpeg_winners), is_sdxl=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "- format:" in warnings[0] and "- jpeg_quality:" in warnings[0]
    assert "python data/audit_pairs.py" in warnings[0] and "--no_audit_pairs" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffusion_dpo.curation.audit"):
        build_train_data(_cfg(jpeg_winners, no_audit_pairs=True), is_sdxl=False)
        build_train_data(_cfg(clean_pairs), is_sdxl=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("no size, format" in r.getMessage() for r in caplog.records)  # the clean run's one line


def test_start_up_audit_uses_the_loader_counts_and_leaves_streams_alone(
    clean_pairs, tmp_path, caplog, monkeypatch
):
    from diffusion_dpo.data.pairs import PairStats, load_pair_dataset

    biased = _rewrite(clean_pairs, tmp_path / "biased.parquet", label_for=lambda i: i % 5 != 0)
    stats = PairStats()
    rows = load_pair_dataset(str(biased), stats=stats)
    assert audit.startup_audit(rows, stats, dataset_name="biased") == ["position"]

    stream_stats = PairStats()
    stream = load_pair_dataset(str(biased), streaming=True, stats=stream_stats)
    with caplog.at_level(logging.INFO, logger="diffusion_dpo.curation.audit"):
        assert audit.startup_audit(stream, stream_stats, dataset_name="biased") == []
    assert stream_stats.seen == 0 and "streamed" in caplog.text  # not a row read
    assert audit.startup_audit(rows, object(), dataset_name="x") == []  # not pairs: nothing to say

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(audit, "summarize", broken)
    with caplog.at_level(logging.INFO, logger="diffusion_dpo.curation.audit"):
        assert audit.startup_audit(rows, stats, dataset_name="x") == []  # a failure is logged, not raised
    assert "RuntimeError: boom" in caplog.text


def test_no_audit_pairs_flag_and_yaml_key(tmp_path):
    from diffusion_dpo.training.config import parse_config

    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d"]
    assert parse_config(base).no_audit_pairs is False
    assert parse_config([*base, "--no_audit_pairs"]).no_audit_pairs is True
    (tmp_path / "c.yaml").write_text("no_audit_pairs: true\n")
    assert parse_config([*base, "--config", str(tmp_path / "c.yaml")]).no_audit_pairs is True
