"""The soft-label study's data: K annotators' vote shares over the imperfect world's pairs."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffusion_dpo import synthetic
from diffusion_dpo.data.pairs import PairStats, load_pair_dataset

ROOT = Path(__file__).resolve().parents[1]


def _study(monkeypatch):
    spec = importlib.util.spec_from_file_location("soft_label_study", ROOT / "data" / "soft_label_study.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_vote_shares_follow_the_annotator_model_and_load_as_soft_labels(tmp_path, monkeypatch):
    study = _study(monkeypatch)
    pairs = synthetic.write_imperfect_pair_dataset(tmp_path / "pairs.parquet", 300, seed=0)
    counts = study.write_vote_shares(pairs, tmp_path / "votes.parquet", annotators=5, seed=0)
    assert counts["pairs"] == 300 and counts["ties"] == 0  # 5 annotators never tie
    assert counts["unanimous"] + counts["split"] == 300 and counts["split"] > 0
    stored = pq.read_table(pairs).to_pylist()
    shares = np.array(pq.read_table(tmp_path / "votes.parquet").column("label_0").to_pylist())
    assert set(np.round(shares * 5, 6)) <= {0, 1, 2, 3, 4, 5}
    # the share follows the annotator's Bradley–Terry probability: more faithful image 0, more votes
    gap = np.array([r["faithfulness_0"] - r["faithfulness_1"] for r in stored])
    assert shares[gap > 0].mean() > 0.6 > 0.4 > shares[gap < 0].mean()
    stats = PairStats()
    rows = load_pair_dataset(tmp_path / "votes.parquet", stats=stats)
    assert stats.dataset_format == "columns" and stats.split_votes == counts["split"]
    assert {round(r["p"], 6) for r in rows} <= {0.6, 0.8, 1.0}
