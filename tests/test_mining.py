"""On-policy pair mining and correction pairs (diffusion_dpo/curation/mining.py, data/mine_pairs.py,
data/correction_pairs.py).

The selection rules on hand-made scores; then the scripts end to end on the tiny random SD pipeline
(3 shapes prompts x 4 seeds at 32 px in 2 steps, the weightless ``shapes`` scorer): the written
dataset loads as training pairs, every chosen image really scores higher when its written bytes are
scored again, the pairs are the ones the rules pick from independently recomputed scores, a rerun
samples and scores nothing, and train_sd trains on the result.
"""

from __future__ import annotations

import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_dpo import synthetic
from diffusion_dpo.curation import mining
from diffusion_dpo.data.pairs import load_pair_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
PROMPTS = synthetic.heldout_prompts()[:3]
K = 4
GENERATION = ["--num_inference_steps", "2", "--resolution", "32", "--batch_size", "6", "--device", "cpu"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"data_{name}", REPO / "data" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Selection rules on hand-made scores


def test_best_worst_pairs_the_extremes_if_the_margin_allows():
    scores = [0.25, 1.0, 0.0, 0.5]
    assert mining.select_pairs(scores, "best_worst") == [(1, 2)]  # (chosen, rejected)
    assert mining.select_pairs(scores, "best_worst", min_margin=1.0) == [(1, 2)]  # margin 1.0 >= 1.0
    assert mining.select_pairs(scores, "best_worst", min_margin=1.5) == []
    # equal extremes: the first of them, in index order
    assert mining.select_pairs([0.0, 1.0, 1.0, 0.0], "best_worst") == [(1, 0)]


def test_all_pairs_above_the_margin_largest_first_and_capped():
    # margins: (3,0) 1.0, (2,0) 0.75, (1,0) 0.5, (3,1) 0.5, (2,1) 0.25, (3,2) 0.25
    scores = [0.0, 0.5, 0.75, 1.0]
    assert mining.select_pairs(scores, "all", min_margin=0.5) == [(3, 0), (2, 0), (1, 0), (3, 1)]
    assert mining.select_pairs(scores, "all", min_margin=0.5, max_pairs=2) == [(3, 0), (2, 0)]
    assert len(mining.select_pairs(scores, "all")) == 6  # every two images of K = 4
    # the chosen image is the higher-scored one whatever the index order
    assert mining.select_pairs([1.0, 0.0], "all") == [(0, 1)]
    assert mining.select_pairs([0.0, 1.0], "all") == [(1, 0)]


def test_ties_never_become_pairs():
    assert mining.select_pairs([0.5, 0.5, 0.5], "best_worst") == []
    assert mining.select_pairs([0.5, 0.5, 0.5], "all") == []
    # the two tied images are each paired with the third, never with each other
    assert mining.select_pairs([0.5, 0.5, 0.25], "all") == [(0, 2), (1, 2)]
    assert mining.select_pairs([0.5], "all") == []  # one image: nothing to compare


def test_prompt_spread_filter_and_pairs_per_prompt_cap():
    scores = np.array(
        [
            [0.0, 0.05, 0.02, 0.01],  # spread 0.05 < 0.1: dropped
            [0.0, 1.0, 0.5, 0.25],  # spread 1.0: paired
            [0.3, 0.3, 0.3, 0.3],  # spread 0: dropped (all alike)
        ]
    )
    mined = mining.mine(scores, "all", pairs_per_prompt=2, min_prompt_spread=0.1)
    assert mined.dropped == [0, 2] and mined.unpaired == []
    assert mined.pairs == [(1, 1, 0), (1, 1, 3)]  # margins 1.0 and 0.75, the two largest of six
    # without the filter the constant prompt is kept but gives no pair (all ties)
    mined = mining.mine(scores, "best_worst")
    assert mined.dropped == [] and mined.unpaired == [2]
    assert mined.pairs == [(0, 1, 0), (1, 1, 0)]
    # a margin no pair of prompt 0 reaches
    mined = mining.mine(scores, "best_worst", min_margin=0.1)
    assert mined.unpaired == [0, 2] and mined.pairs == [(1, 1, 0)]


def test_weighted_scorer_combination():
    """Two scorers of one prompt's two images: A = [1, 3] (prefers image 1), B = [10, 0] (prefers
    image 0, on a 5x wider scale).

    Raw ("none"), weights (1, 1): [11, 3], B's scale decides (image 0).
    z-scores: A has mean 2, std 1 -> [-1, 1]; B mean 5, std 5 -> [1, -1]. Weights (1, 1): [0, 0], a
    tie; (2, 1): [-1, 1] (image 1); (1, 2): [1, -1] (image 0).
    """
    a, b = np.array([[1.0, 3.0]]), np.array([[10.0, 0.0]])
    raw, stats = mining.combine_scores([a, b], [1, 1], "none")
    np.testing.assert_allclose(raw, [[11.0, 3.0]])
    assert stats == [{"mean": 0.0, "std": 1.0}] * 2
    z, stats = mining.combine_scores([a, b], [1, 1], "zscore")
    np.testing.assert_allclose(z, [[0.0, 0.0]])
    assert stats == [{"mean": 2.0, "std": 1.0}, {"mean": 5.0, "std": 5.0}]
    assert mining.select_pairs(z[0]) == []  # the tie is not a pair
    np.testing.assert_allclose(mining.combine_scores([a, b], [2, 1], "zscore")[0], [[-1.0, 1.0]])
    np.testing.assert_allclose(mining.combine_scores([a, b], [1, 2], "zscore")[0], [[1.0, -1.0]])
    # auto: one scorer stays raw (margins in its units), several are z-scored
    np.testing.assert_allclose(mining.combine_scores([a], [1], "auto")[0], a)
    np.testing.assert_allclose(mining.combine_scores([a, b], [2, 1], "auto")[0], [[-1.0, 1.0]])
    # a constant scorer adds nothing
    const = np.array([[5.0, 5.0]])
    np.testing.assert_allclose(mining.combine_scores([a, const], [1, 1], "zscore")[0], [[-1.0, 1.0]])
    with pytest.raises(ValueError, match="finite"):
        mining.combine_scores([np.array([[np.nan, 1.0]])], [1], "none")


def test_weights_columns_and_positions():
    assert mining.parse_weights(None, 2) == [1.0, 1.0]
    assert mining.parse_weights("1,0.5", 2) == [1.0, 0.5]
    for bad in ("1", "1,x", "0,0", "1,inf"):
        with pytest.raises(ValueError, match="--scorer_weights"):
            mining.parse_weights(bad, 2)
    assert mining.score_columns(["pickscore", "hpsv2.1", "pickscore"]) == [
        "score_pickscore", "score_hpsv2_1", "score_pickscore_2",
    ]  # fmt: skip
    # a fair coin per pair, the same every time
    flips = [mining.chosen_first(0, p, 1, 0) for p in range(400)]
    assert flips == [mining.chosen_first(0, p, 1, 0) for p in range(400)]
    assert 150 < sum(flips) < 250


# ---------------------------------------------------------------------------------------------
# data/mine_pairs.py end to end


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join([PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[2]]) + "\n")  # one repeat
    return path


def _mine_argv(model, prompts, out, *extra):
    return [
        "--model", str(model), "--prompts", str(prompts), "--scorer", "shapes",
        "--num_images_per_prompt", str(K), "--seed", "3", "--output", str(out), "--no_progress",
        *GENERATION, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def mine_script():
    return _load_script("mine_pairs")


@pytest.fixture(scope="module")
def mined(mine_script, tiny_sd_path, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("mined")
    result = mine_script.main(
        _mine_argv(tiny_sd_path, prompt_file, out, "--pairing", "all", "--pairs_per_prompt", "2")
    )
    return out, result


def _decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def test_mined_dataset_schema_and_manifest(mined):
    out, result = mined
    assert result["output"] == str(out)
    table = pq.read_table(out / "train.parquet")
    assert table.column_names == [
        "caption", "jpg_0", "jpg_1", "label_0", "label_1", "score_0", "score_1",
        "score_shapes_0", "score_shapes_1", "seed_0", "seed_1", "prompt_index",
    ]  # fmt: skip
    assert (
        table.schema.field("jpg_0").type == pa.binary() and table.schema.field("label_0").type == pa.float64()
    )
    rows = table.to_pylist()
    assert len(rows) == result["num_pairs"] > 0
    assert result["num_prompts"] == 3 and result["num_images"] == 3 * K  # the repeated prompt mined once
    assert result["images_generated"] == 3 * K and result["scores_computed"] == 3 * K
    for row in rows:
        assert {row["label_0"], row["label_1"]} == {0.0, 1.0}
        assert (
            row["prompt_index"] in (0, 1, 3)
            and row["caption"] == [*PROMPTS[:2], None, PROMPTS[2]][row["prompt_index"]]
        )
        assert {row["seed_0"], row["seed_1"]} <= set(range(3, 3 + K)) and row["seed_0"] != row["seed_1"]
        assert row["score_0"] == row["score_shapes_0"]  # one scorer: the raw score
    for p in (0, 1, 3):
        assert sum(r["prompt_index"] == p for r in rows) <= 2  # --pairs_per_prompt
    manifest = json.loads((out / "mining.json").read_text())
    counts = manifest["counts"]
    assert counts["pairs"] == len(rows) and counts["repeated_prompts_left_out"] == 1
    assert counts["prompts_dropped"] == result["prompts_dropped"] == 0
    chosen = [max(r["score_0"], r["score_1"]) for r in rows]
    rejected = [min(r["score_0"], r["score_1"]) for r in rows]
    assert result["mean_chosen_score"] == pytest.approx(np.mean(chosen))
    assert result["mean_rejected_score"] == pytest.approx(np.mean(rejected))
    assert counts["mean_margin"] == pytest.approx(np.mean(chosen) - np.mean(rejected))
    assert manifest["selection"] == {
        "pairing": "all", "min_margin": 0.0, "pairs_per_prompt": 2, "min_prompt_spread": 0.0,
    }  # fmt: skip


def test_mined_pairs_load_and_the_chosen_image_scores_higher(mined, tiny_sd_path):
    """Rescore the written bytes, and recompute which pairs the rules pick from every image's score."""
    from diffusion_dpo.evaluation.generate import GenerationSettings, generate_images, resolve_model
    from diffusion_dpo.scorers.shapes import ShapesScorer

    out, result = mined
    pairs = load_pair_dataset(out)  # what train_sd.py --dataset_name reads
    assert len(pairs) == result["num_pairs"]
    rows = pq.read_table(out / "train.parquet").to_pylist()
    scorer = ShapesScorer()
    for loaded, row in zip(pairs, rows):
        assert loaded["caption"] == row["caption"]
        winner, loser = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        assert loaded["image_w"] == row[winner] and loaded["image_l"] == row[loser]
        w, lo = scorer([_decode(row[winner]), _decode(row[loser])], [row["caption"]] * 2).tolist()
        assert w > lo
        suffix = winner[-1], loser[-1]
        assert w == pytest.approx(row[f"score_{suffix[0]}"], rel=1e-6)
        assert lo == pytest.approx(row[f"score_{suffix[1]}"], rel=1e-6)

    # every image of every prompt, from the cache (nothing generated), scored afresh
    settings = GenerationSettings(num_inference_steps=2, resolution=32)
    seeds = list(range(3, 3 + K))
    paths, n_new = generate_images(
        resolve_model("m", str(tiny_sd_path)), PROMPTS, seeds, settings, out / "cache", progress=False
    )
    assert n_new == 0
    for p, prompt_index in enumerate((0, 1, 3)):
        scores = scorer([_decode(path.read_bytes()) for path in paths[p]], [PROMPTS[p]] * K).numpy()
        expected = {(seeds[c], seeds[r]) for c, r in mining.select_pairs(scores, "all", max_pairs=2)}
        written = {
            (r["seed_0"], r["seed_1"]) if r["label_0"] == 1.0 else (r["seed_1"], r["seed_0"])
            for r in rows
            if r["prompt_index"] == prompt_index
        }
        assert written == expected
        for r in rows:  # the bytes written are the cached PNGs
            if r["prompt_index"] == prompt_index:
                assert r["jpg_0"] == paths[p][seeds.index(r["seed_0"])].read_bytes()


def test_rerun_samples_and_scores_nothing(mined, mine_script, tiny_sd_path, prompt_file, monkeypatch):
    out, _ = mined
    before = sorted(p for p in (out / "cache").rglob("*") if p.is_file())
    sizes = {p: p.stat().st_size for p in before}

    def refuse(*args, **kwargs):
        raise AssertionError("a cached rerun must not load a pipeline or a scorer")

    monkeypatch.setattr("diffusion_dpo.evaluation.generate.load_pipeline", refuse)
    monkeypatch.setattr("diffusion_dpo.scorers.load_scorer", refuse)
    # other selection settings: the same images and scores, other pairs
    result = mine_script.main(_mine_argv(tiny_sd_path, prompt_file, out, "--pairing", "best_worst"))
    assert result["images_generated"] == 0 and result["scores_computed"] == 0
    assert result["num_pairs"] == 3  # one per prompt (random images never tie here)
    after = sorted(p for p in (out / "cache").rglob("*") if p.is_file())
    assert after == before and all(p.stat().st_size == sizes[p] for p in after)
    # restore the first dataset for the tests that follow in this module
    mine_script.main(
        _mine_argv(tiny_sd_path, prompt_file, out, "--pairing", "all", "--pairs_per_prompt", "2")
    )


def test_prompt_filter_and_weighted_scorers_in_the_script(
    mined, mine_script, tiny_sd_path, prompt_file, tmp_path
):
    out, _ = mined
    cache = ["--cache_dir", str(out / "cache")]
    rows = pq.read_table(out / "train.parquet").to_pylist()
    # a prompt's spread is its best pair's margin (the largest one, always written)
    spread = {}
    for r in rows:
        spread[r["prompt_index"]] = max(spread.get(r["prompt_index"], 0.0), abs(r["score_0"] - r["score_1"]))
    low, high = sorted(spread.values())[:2]
    result = mine_script.main(
        _mine_argv(
            tiny_sd_path,
            prompt_file,
            tmp_path / "filtered",
            "--min_prompt_spread",
            str((low + high) / 2),
            *cache,
        )
    )
    assert result["prompts_dropped"] == 1 and result["num_pairs"] == 2  # best_worst: one per kept prompt
    kept = {r["prompt_index"] for r in pq.read_table(tmp_path / "filtered" / "train.parquet").to_pylist()}
    assert kept == {p for p, s in spread.items() if s > low}
    # a threshold above every spread, into the same folder: no pairs, the means NaN (null in the
    # manifest), and the earlier run's train.parquet removed rather than left to be trained on
    result = mine_script.main(
        _mine_argv(
            tiny_sd_path,
            prompt_file,
            tmp_path / "filtered",
            "--min_prompt_spread",
            str(2 * max(spread.values())),
            *cache,
        )
    )
    assert result["prompts_dropped"] == 3 and result["num_pairs"] == 0
    assert np.isnan(result["mean_chosen_score"])
    assert (
        json.loads((tmp_path / "filtered" / "mining.json").read_text())["counts"]["mean_chosen_score"] is None
    )
    assert result["dataset_file"] is None and not (tmp_path / "filtered" / "train.parquet").exists()
    # two scorers (the same one twice, weights 1 and 3): z-scored, combined = 4 z; columns for each
    result = mine_script.main(
        _mine_argv(
            tiny_sd_path,
            prompt_file,
            tmp_path / "two",
            "--scorer",
            "shapes",
            "--scorer_weights",
            "1,3",
            *cache,
        )
    )
    assert result["images_generated"] == 0 and result["scores_computed"] == 0
    manifest = json.loads((tmp_path / "two" / "mining.json").read_text())
    mean, std = manifest["scorers"][0]["mean"], manifest["scorers"][0]["std"]
    for row in pq.read_table(tmp_path / "two" / "train.parquet").to_pylist():
        assert row["score_shapes_0"] == row["score_shapes_2_0"]
        assert row["score_0"] == pytest.approx(4 * (row["score_shapes_0"] - mean) / std)


def test_bad_mining_arguments_are_named(mine_script, tiny_sd_path, prompt_file, tmp_path, capsys):
    cases = [
        (["--num_images_per_prompt", "1"], "must be >= 2"),
        (["--scorer_weights", "1,2"], "2 weights for 1 scorers"),
        (["--scorer", "nosuch"], "unknown scorer"),
        (["--min_margin", "-1"], "must be >= 0"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            mine_script.main([*_mine_argv(tiny_sd_path, prompt_file, tmp_path / "x"), *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mine_script.main(_mine_argv(tmp_path / "no_model", prompt_file, tmp_path / "x"))
    assert "does not exist" in capsys.readouterr().err


def test_train_sd_trains_on_mined_pairs_and_mines_from_its_lora(
    mined, mine_script, prompt_file, tiny_sd_path, tmp_path
):
    """The loop an iterative driver runs: mine -> train (LoRA, 1 step) -> mine from the LoRA folder."""
    from trainer_runs import tiny_run_flags

    from diffusion_dpo.training.config import parse_config
    from diffusion_dpo.training.loop import train

    out, _ = mined
    run = tmp_path / "run"
    flags = tiny_run_flags(
        tiny_sd_path, out, run, max_train_steps=1, train_batch_size=2, use_lora=True, rank=4
    )
    summary = train(parse_config(flags))
    assert np.isfinite(summary["last_metrics"]["loss"])
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    result = mine_script.main(
        _mine_argv(
            run, prompt_file, tmp_path / "round2", "--num_images_per_prompt", "2", "--max_prompts", "2"
        )
    )
    assert result["num_prompts"] == 2 and result["images_generated"] == 4
    assert json.loads((tmp_path / "round2" / "mining.json").read_text())["model"]["kind"] == "lora"


# ---------------------------------------------------------------------------------------------
# data/correction_pairs.py


@pytest.fixture(scope="module")
def correction_script():
    return _load_script("correction_pairs")


def _correction_argv(model, dataset, out, *extra):
    return [
        "--model", str(model), "--dataset", str(dataset), "--output", str(out), "--samples_per_caption", "2",
        "--seed", "5", "--no_progress", *GENERATION, *extra,
    ]  # fmt: skip


def test_correction_pairs_choose_the_given_image(correction_script, tiny_sd_path, tmp_path, monkeypatch):
    data = synthetic.write_caption_dataset(tmp_path / "captions.parquet", 4, seed=0)
    given = pq.read_table(data).to_pylist()
    result = correction_script.main(_correction_argv(tiny_sd_path, data, tmp_path / "out"))
    assert result["num_pairs"] == 8 and result["num_rows"] == 4
    assert result["images_generated"] == 2 * result["num_prompts"]
    rows = pq.read_table(tmp_path / "out" / "train.parquet").to_pylist()
    assert [r["row_index"] for r in rows] == [0, 0, 1, 1, 2, 2, 3, 3]
    firsts = set()
    for r in rows:
        first = r["label_0"] == 1.0
        firsts.add(first)
        chosen, rejected = (r["jpg_0"], r["jpg_1"]) if first else (r["jpg_1"], r["jpg_0"])
        assert chosen == given[r["row_index"]]["image"]  # byte for byte
        assert rejected != chosen and _decode(rejected).size == (32, 32)
        assert r["caption"] == given[r["row_index"]]["caption"]
        given_seed, sample_seed = (r["seed_0"], r["seed_1"]) if first else (r["seed_1"], r["seed_0"])
        assert given_seed is None and sample_seed in (5, 6)
        assert first == mining.chosen_first(5, r["row_index"], sample_seed - 5)
    assert firsts == {True, False}  # both positions occur: no position bias built in
    assert len(load_pair_dataset(tmp_path / "out")) == 8

    # a rerun samples nothing
    monkeypatch.setattr("diffusion_dpo.evaluation.generate.load_pipeline", lambda *a, **k: 1 / 0)
    again = correction_script.main(_correction_argv(tiny_sd_path, data, tmp_path / "out"))
    assert again["images_generated"] == 0
    assert pq.read_table(tmp_path / "out" / "train.parquet").to_pylist() == rows


def test_correction_input_errors_name_the_row(correction_script, tiny_sd_path, tmp_path, capsys):
    good = pq.read_table(synthetic.write_caption_dataset(tmp_path / "good.parquet", 3, seed=0)).to_pylist()

    def write(name, rows):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        return path

    cases = [
        (
            write("no_caption", [{"text": r["caption"], "image": r["image"]} for r in good]),
            "missing columns ['caption']",
        ),
        (write("empty", [good[0], {**good[1], "caption": "  "}, good[2]]), "row 1"),
        (write("broken", [good[0], good[1], {**good[2], "image": b"not an image"}]), "row 2"),
        (tmp_path / "nowhere.parquet", "does not exist"),
    ]
    for dataset, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            correction_script.main(_correction_argv(tiny_sd_path, dataset, tmp_path / "out"))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert message in err, err
    assert not (tmp_path / "out").exists()  # checked before anything was generated or written


@pytest.mark.parametrize("arch", ["flux", "qwen_image"])
def test_mining_samples_and_scores_the_flow_families(arch, mine_script, prompt_file, tmp_path):
    """Mining works from FLUX.1 and Qwen-Image pipelines as from SD: every prompt's images are sampled
        through the family's pipeline, and the written pairs load as training pairs whose chosen image scores
        higher when its written bytes are scored again (the colour-area scorer: the tiny random models' images
    all fail the shapes judge alike, so only a continuous score tells them apart)."""
    from diffusion_dpo.models.tiny import save_tiny_pipeline
    from diffusion_dpo.scorers import load_scorer

    model = save_tiny_pipeline(tmp_path / arch, arch=arch, seed=0)
    out = tmp_path / "mined"
    argv = _mine_argv(model, prompt_file, out, "--pairing", "best_worst")
    argv[argv.index("--scorer") + 1] = "shapes_color_area"
    result = mine_script.main(argv)
    assert result["num_prompts"] == 3 and result["images_generated"] == 3 * K
    rows = pq.read_table(out / "train.parquet").to_pylist()
    assert len(rows) == result["num_pairs"] > 0
    pairs = load_pair_dataset(out)  # what train_sd.py --dataset_name reads
    assert len(pairs) == len(rows)
    scorer = load_scorer("shapes_color_area")
    for loaded, row in zip(pairs, rows):
        winner, loser = ("jpg_0", "jpg_1") if row["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        assert loaded["image_w"] == row[winner] and loaded["image_l"] == row[loser]
        w, lo = scorer([_decode(row[winner]), _decode(row[loser])], [row["caption"]] * 2).tolist()
        assert w > lo
