"""The imperfect-winners world (both images flawed, noisy Bradley–Terry annotators), the validation
split for honest hyperparameters, and the multi-seed aggregation of the synthetic experiment."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from trainer_runs import load_synthetic_experiment

from diffusion_dpo import synthetic
from diffusion_dpo.synthetic import imperfect, results, world

ROOT = Path(__file__).resolve().parents[1]


def test_validation_split_is_disjoint_from_training_and_heldout_and_covered_by_training():
    train, validation = synthetic.validation_split()
    heldout = set(synthetic.specs_for(True))
    assert (len(train), len(validation), len(heldout)) == (72, 24, 24)
    assert not set(train) & set(validation) and not (set(train) | set(validation)) & heldout
    seen = set().union(*(world._pairs(s) for s in train))
    assert all(world._pairs(s) <= seen for s in validation)  # new compositions of seen parts


@pytest.mark.parametrize("k", [0, 1, 2])
def test_with_errors_changes_exactly_k_attributes_within_the_allowed_combinations(k):
    rng = np.random.default_rng(k)
    train = set(synthetic.validation_split()[0])
    for spec in sorted(train, key=str)[:30]:
        wrong = synthetic.with_errors(spec, k, rng, train)
        changed = sum(getattr(wrong, a) != getattr(spec, a) for a in ("color", "shape", "background"))
        assert changed == k and wrong in train


def test_annotator_agreement_limits_and_a_hand_value():
    gaps = np.array([0.3, -0.3])
    assert synthetic.annotator_agreement(gaps, 1e6) == pytest.approx(0.5)  # coin flips
    assert synthetic.annotator_agreement(gaps, 1e-6) == pytest.approx(1.0)  # deterministic
    p = 1 / (1 + math.exp(-0.3 / 0.3))  # σ(1) = 0.731; agreement p² + (1 − p)² = 0.607
    assert synthetic.annotator_agreement(gaps, 0.3) == pytest.approx(p**2 + (1 - p) ** 2)


def test_the_calibrated_annotators_agree_as_often_as_pick_a_pic_users_on_fresh_pairs():
    temperature = synthetic.calibrate_temperature()
    rng = np.random.default_rng(99)  # pairs other than the calibration sample
    specs = synthetic.specs_for(False)
    gaps = []
    for _ in range(600):
        spec = synthetic.sample_spec(rng, specs)
        a, b = (imperfect._flawed_render(spec, rng, 32, None, synthetic.ERROR_PROBS)[1] for _ in range(2))
        gaps.append(a - b)
    assert synthetic.annotator_agreement(np.array(gaps), temperature) == pytest.approx(0.68, abs=0.03)


def test_imperfect_pairs_mostly_have_flawed_winners_and_noisy_but_informative_labels():
    train = synthetic.validation_split()[0]
    rows = list(synthetic.generate_imperfect_pairs(400, seed=0, specs=train))
    allowed = {synthetic.caption(s) for s in train}
    assert all(r["caption"] in allowed for r in rows)
    won_first = np.array([r["label_0"] == 1.0 for r in rows])
    errors = np.array([[r["errors_0"], r["errors_1"]] for r in rows])
    winner_errors = np.where(won_first, errors[:, 0], errors[:, 1])
    loser_errors = np.where(won_first, errors[:, 1], errors[:, 0])
    assert np.mean(winner_errors > 0) > 0.6  # most winners are themselves wrong
    assert np.mean(winner_errors < loser_errors) > 3 * np.mean(winner_errors > loser_errors)  # signal
    assert np.mean(winner_errors > loser_errors) > 0.03  # and noise: some winners are the worse image
    assert {r["label_0"] for r in rows} == {0.0, 1.0}  # no ties; winners at both positions


def _write_scores(path, scores: dict[str, np.ndarray]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "prompt_index", "prompt", "seed", "category", "image", "shapes"])
        for model, grid in scores.items():
            for p, row in enumerate(grid):
                for s, value in enumerate(row):
                    writer.writerow([model, p, f"prompt {p}", s, "", f"{model}-{p}-{s}.png", value])


def test_head_to_head_counts_paired_wins_and_ties(tmp_path):
    # 2 prompts x 2 seeds: dpo wins 2, ties 1, loses 1 → (2 + 0.5) / 4 = 0.625
    path = tmp_path / "scores.csv"
    _write_scores(
        path, {"dpo": np.array([[0.9, 0.5], [0.3, 0.1]]), "sft": np.array([[0.2, 0.5], [0.4, 0.0]])}
    )
    h2h = results.head_to_head(path, "dpo", "sft")
    assert h2h["win_rate"] == pytest.approx(0.625) and h2h["n"] == 4 and h2h["n_prompts"] == 2
    pooled = results.pooled_head_to_head([path, path], "dpo", "sft")
    assert pooled["win_rate"] == pytest.approx(0.625) and pooled["n"] == 8 and pooled["n_prompts"] == 4


def test_seed_aggregation_reports_mean_spread_and_each_seeds_interval(tmp_path):
    def record(w, score, acc):
        entry = {
            "win_rate": w,
            "ci_low": w - 0.1,
            "ci_high": w + 0.1,
            "mean_score": score,
            "n": 10,
            "n_prompts": 2,
        }
        return {
            "dpo": {**entry, "implicit_accuracy": acc},
            "sft": {**entry, "implicit_accuracy": None},
            "base": {"mean_score": 0.1},
            "dpo_vs_sft": {"win_rate": w, "ci_low": w - 0.2, "ci_high": w + 0.2},
        }

    records = {0: record(0.6, 0.3, 0.7), 1: record(0.8, 0.5, 0.8)}
    agg = results.aggregate_seeds(records, ("dpo", "sft"))
    dpo = agg["methods"]["dpo"]
    assert dpo["win_rate"]["mean"] == pytest.approx(0.7) and dpo["win_rate"]["sd"] == pytest.approx(
        0.1414, abs=1e-4
    )
    assert dpo["intervals"] == [
        [pytest.approx(0.5), pytest.approx(0.7)],
        [pytest.approx(0.7), pytest.approx(0.9)],
    ]
    assert "implicit_accuracy" not in agg["methods"]["sft"]  # SFT has no reference
    text = results.seeds_markdown(agg, ("dpo", "sft"))
    assert "| Diffusion-DPO | 0.700 ± 0.141 | 0.600 [0.500, 0.700], 0.800 [0.700, 0.900] |" in text
    assert "head to head" in text and "0.700 ± 0.141" in text.split("head to head")[1]


def test_tuning_gives_every_method_the_same_trials_and_never_sees_the_heldout_prompts(tmp_path, monkeypatch):
    """--tune trains SEARCH's trials from the base and ranks them on the validation prompts only: no
    trial's arguments and no evaluation of the tuning names a held-out file, every method gets the same
    number of trials, and the trial with the best validation win rate is the one chosen."""
    exp = load_synthetic_experiment(monkeypatch)
    data = exp.data_paths(tmp_path / "data")
    models = {"base": tmp_path / "models/base"}
    trained, evaluated = [], []
    monkeypatch.setattr(exp, "train_stage", lambda *args: trained.append(args) or {})
    wanted = {m: len(trials) - 1 for m, trials in exp.SEARCH.items()}  # the last trial scores best

    def fake_evaluate(candidates, data_, out, scale, seed, device, split="heldout"):
        evaluated.append((dict(candidates), split))
        out.mkdir(parents=True)
        rates = {}
        for name in candidates:
            if name != "base":
                m, i = name.rsplit("-", 1)
                rates[name] = {"shapes": {"win_rate": 0.5 + 0.1 * (int(i) == wanted[m]), "ci_low": 0.4,
                                          "ci_high": 0.7, "n": 96, "n_prompts": 24}}  # fmt: skip
        (out / "summary.json").write_text(json.dumps({"win_rates": rates}))

    monkeypatch.setattr(exp, "evaluate", fake_evaluate)
    args = exp.parse_args(["--output_dir", str(tmp_path), "--world", "imperfect", "--tune", "--quick"])
    chosen = exp.tune(args, 0, tmp_path, exp.QUICK, data, models)

    methods = exp.WORLD_METHODS["imperfect"]
    assert chosen == {m: exp.SEARCH[m][wanted[m]] for m in methods}
    counts = {m: sum(1 for call in trained if call[0] == m) for m in methods}
    assert set(counts.values()) == {4}, counts
    heldout = {str(data["heldout_pairs"]), str(data["heldout_prompts"])}
    for call in trained:
        assert not heldout & {str(a) for a in (*call[:4], *call[6])}, call
        if call[0] in ("dpo", "ipo", "kto"):  # the implicit accuracy on the validation pairs
            assert str(data["validation_pairs"]) in call[6]
    ((candidates, split),) = evaluated
    assert split == "validation" and len(candidates) == 1 + sum(counts.values())
    record = json.loads((tmp_path / "tuning.json").read_text())
    assert record["split"] == "validation" and len(record["trials"]) == 20
    assert [t["method"] for t in record["trials"] if t["chosen"]] == list(methods)


def test_attribute_scores_say_which_attribute_a_model_gets_wrong(tmp_path):
    """A model whose images have the wrong colour scores low on colour and on "all three right", and
    the same on shape and background as one whose images are right."""
    rng = np.random.default_rng(0)
    spec = synthetic.Spec("circle", "red", "blue")
    wrong = synthetic.Spec("circle", "green", "blue")
    (tmp_path / "images").mkdir()
    rows = []
    for i in range(4):
        for model, shown in (("right", spec), ("wrong_colour", wrong)):
            name = f"images/{model}-{i}.png"
            synthetic.render(shown, rng, 32).save(tmp_path / name)
            rows.append({"model": model, "prompt_index": 0, "prompt": synthetic.caption(spec), "seed": i,
                         "category": "", "image": name, "shapes": 0.0})  # fmt: skip
    with (tmp_path / "scores.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    scores = results.attribute_scores(tmp_path, ("right", "wrong_colour"))
    assert scores["right"]["all_right"] == 1.0 and scores["wrong_colour"]["all_right"] == 0.0
    assert scores["right"]["color"] > 0.9 > 0.1 > scores["wrong_colour"]["color"]
    for key in ("shape", "background", "presence"):
        assert scores["wrong_colour"][key] == pytest.approx(scores["right"][key], abs=0.05), key
    table = results.attributes_markdown({0: scores, 1: scores}, ("right", "wrong_colour"))
    assert "| wrong_colour |" in table and "| 0.000 |" in table
    with pytest.raises(ValueError, match="no images of"):
        results.attribute_scores(tmp_path, ("right", "absent"))
