"""Label quality: agreement of the labels with scorers and among scorers, near-ties, and the pairs every
scorer calls the other way (diffusion_dpo/curation/label_quality.py, data/audit_pairs.py --scorer)."""

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffusion_dpo import synthetic
from diffusion_dpo.curation.label_quality import headline, label_quality, startup_label_quality
from diffusion_dpo.data.pairs import load_pair_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_agreement_near_ties_and_pairs_against_every_scorer_by_hand():
    # 10 decided pairs (image 0 won the first 6, image 1 the last 4), 2 ties, 1 bad label
    labels = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0.5, 0.5, np.nan]
    # scorer a agrees on 8 of 10: wrong on pairs 4 and 8
    a_calls = [1, 1, 1, 1, -1, 1, -1, -1, 1, -1, 1, -1, 1]
    # scorer b: agrees on 5, no call on pair 0 (0.5), wrong on 4, 5, 8, 9
    b_calls = [0, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, 1]
    scores = {
        name: np.stack([np.array(c, float), np.zeros(13)], axis=1)
        for name, c in (("a", a_calls), ("b", b_calls))
    }
    report = label_quality(labels, scores, rows=range(100, 113), captions=[f"c{i}" for i in range(13)])
    assert (report["labelled"], report["decided"]) == (12, 10)
    a, b = report["agreement"]["a"], report["agreement"]["b"]
    assert a["share"] == pytest.approx(0.8) and a["n"] == 10
    assert a["interval"] == pytest.approx([0.490, 0.943], abs=1e-3)  # Wilson, 8 of 10
    assert b["share"] == pytest.approx(5.5 / 10) and b["undecided"] == 1
    # a vs b over the 11 labelled pairs both call (pair 0 has no b call; 12 has no label): same call on
    # 1,2,3,4,6,7,8,10 = 8 of 11
    among = report["agreement_among_scorers"]["a vs b"]
    assert (among["n"], among["share"]) == (11, pytest.approx(8 / 11))
    # near-ties: the 2 ties of 12 labelled pairs
    assert report["near_ties"]["share"] == pytest.approx(2 / 12) and report["near_ties"]["ties"] == 2
    # both scorers call pairs 4 and 8 the other way
    against = report["against_every_scorer"]
    assert against["rows"] == [104, 108] and against["share"] == pytest.approx(0.2)
    assert against["examples"][0] == {
        "row": 104,
        "caption": "c4",
        "label_0": 1.0,
        "scores": {"a": [-1.0, 0.0], "b": [-1.0, 0.0]},
    }
    lines = headline(report)
    assert lines[0] == "labels agree with a on 80% of 10 decided pairs (95% [0.49, 0.94])"
    assert any("2 decided pairs (20%) are called the other way by every scorer" in line for line in lines)


def test_vote_shares_count_as_labels_and_set_near_ties():
    labels = [0.9, 0.55, 0.45, 0.2]
    scores = {"s": np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])}
    report = label_quality(labels, scores, near_tie=0.2)
    assert report["agreement"]["s"]["share"] == pytest.approx(0.5)  # right on 0.9 and 0.55
    assert report["near_ties"]["share"] == pytest.approx(0.5)  # 0.55 and 0.45 have margin 0.1


@pytest.fixture(scope="module")
def flipped_pairs(tmp_path_factory):
    """Synthetic shapes pairs (the winner follows the caption) with every 4th label flipped."""
    folder = tmp_path_factory.mktemp("lq")
    path = synthetic.write_pair_dataset(folder / "pairs.parquet", 24, seed=0, tie_fraction=0.0)
    rows = pq.read_table(path).to_pylist()
    for i in range(0, len(rows), 4):
        rows[i]["label_0"], rows[i]["label_1"] = 1 - rows[i]["label_0"], 1 - rows[i]["label_1"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(path)), path)
    return path


def test_audit_pairs_reports_label_quality_with_examples(tmp_path, flipped_pairs, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "data"))
    import audit_pairs

    monkeypatch.setattr(sys, "argv", ["audit_pairs.py"])
    report = audit_pairs.main(
        ["--dataset", str(flipped_pairs), "--output", str(tmp_path / "audit"), "--max_pairs", "0",
         "--scorer", "shapes", "--scorer", "shapes_color_area"]
    )  # fmt: skip
    quality = report["label_quality"]
    shapes = quality["agreement"]["shapes"]
    # a quarter of the labels flipped: the faithfulness scorer agrees with about 3 in 4
    assert 0.55 < shapes["share"] < 0.9 and shapes["n"] == 24
    flipped = set(range(0, 24, 4))
    assert set(quality["against_every_scorer"]["rows"]) <= flipped
    assert quality["against_every_scorer"]["rows"], "no flipped pair was caught by both scorers"
    saved = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert saved["label_quality"]["agreement"]["shapes"]["n"] == 24
    page = (tmp_path / "audit" / "audit.html").read_text()
    assert "<h2>Label quality</h2>" in page and "labels agree with shapes" in page
    first = quality["against_every_scorer"]["rows"][0]
    assert f"row {first}:" in page and "labelled winner" in page


def test_the_trainer_start_up_check_says_how_often_labels_agree(flipped_pairs, caplog):
    rows = load_pair_dataset(flipped_pairs)
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo.curation.label_quality"):
        report = startup_label_quality(rows, ["shapes"], dataset_name=str(flipped_pairs))
    assert report["agreement"]["shapes"]["n"] == 24
    assert "start-up label check of 24 pairs" in caplog.text and "labels agree with shapes on" in caplog.text
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo.curation.label_quality"):
        assert startup_label_quality(rows, ["no_such_scorer"], dataset_name="x") is None
    assert "start-up label check skipped" in caplog.text  # advice only: never raises


def test_the_trainer_runs_the_label_check_when_a_scorer_is_configured(flipped_pairs, caplog):
    from trainer_runs import tiny_run_flags

    from diffusion_dpo.training.config import parse_config
    from diffusion_dpo.training.data_setup import build_train_data

    cfg = parse_config([*tiny_run_flags("m", flipped_pairs, "o"), "--audit_scorers", "shapes"])
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo.curation.label_quality"):
        build_train_data(cfg)
    assert "labels agree with shapes on" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo.curation.label_quality"):
        build_train_data(parse_config(tiny_run_flags("m", flipped_pairs, "o")))
    assert "label check" not in caplog.text  # no scorer configured: no check


def test_audit_pairs_reads_vote_shares_of_any_format(tmp_path, flipped_pairs, monkeypatch):
    """An HPDv3-style source with vote shares: the audit reads it, and label quality uses the shares."""
    monkeypatch.syspath_prepend(str(ROOT / "data"))
    import audit_pairs

    rows = pq.read_table(flipped_pairs).to_pylist()
    (tmp_path / "images").mkdir()
    records = []
    for i, r in enumerate(rows):
        for side in (0, 1):
            (tmp_path / "images" / f"{i}_{side}.png").write_bytes(r[f"jpg_{side}"])
        votes = [7, 3] if r["label_0"] == 1.0 else [3, 7]
        records.append({"prompt": r["caption"], "path1": f"images/{i}_0.png", "path2": f"images/{i}_1.png",
                        "choice_dist": votes})  # fmt: skip
    (tmp_path / "train.json").write_text(json.dumps(records))
    report = audit_pairs.main(
        ["--dataset", str(tmp_path / "train.json"), "--output", str(tmp_path / "audit"), "--max_pairs", "0",
         "--scorer", "shapes", "--near_tie", "0.5"]
    )  # fmt: skip
    assert report["schema"] == "hpdv3" and report["pairs"] == 24 and report["bad_labels"]["count"] == 0
    assert report["usable_pairs"] == 24
    quality = report["label_quality"]
    assert quality["decided"] == 24 and quality["agreement"]["shapes"]["n"] == 24
    assert quality["near_ties"]["share"] == pytest.approx(1.0)  # margins 0.4 < 0.5: every pair
