"""End to end: eval/evaluate.py and eval/relabel.py on tiny pipelines and the shapes world.

Two tiny random SD pipelines (and a LoRA on the first) render 3 shapes prompts × 2 seeds at 32 px in
2 steps; the shapes scorer (no weights) scores them. Checks the written files against independent
recomputation from the per-image CSV, the HTML's links, the image cache, and clear CLI errors.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
]
CATEGORIES = ["round", "angular", "angular"]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"eval_{name}", REPO / "eval" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluate():
    return _load_script("evaluate")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny pipelines (seeds 0 and 1) and a LoRA output folder trained (randomly) on the first."""
    import yaml
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffusion_dpo.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    base = save_tiny_pipeline(root / "base", seed=0)
    other = save_tiny_pipeline(root / "other", seed=1)
    pipe = StableDiffusionPipeline.from_pretrained(base)
    # init_lora_weights=False: random B, so the adapter changes the output (trained LoRAs do too)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    lora = root / "lora_run"
    StableDiffusionPipeline.save_lora_weights(
        lora, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    )
    (lora / "training_config.yaml").write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(base)}))
    return {"base": base, "other": other, "lora": lora}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Prompt", "Category"])
        w.writerows(zip(PROMPTS, CATEGORIES))
    return path


def _argv(models, prompt_file, out, *extra):
    return [
        "--model", f"base={models['base']}",
        "--model", f"other={models['other']}",
        "--model", f"lora={models['lora']}",
        "--prompts", str(prompt_file),
        "--scorer", "shapes",
        "--output_dir", str(out),
        "--num_images_per_prompt", "2",
        "--seed", "7",
        "--num_inference_steps", "2",
        "--guidance_scale", "5.0",
        "--resolution", "32",
        "--batch_size", "4",
        "--device", "cpu",
        "--n_bootstrap", "500",
        "--no_progress",
        *extra,
    ]  # fmt: skip


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        for key, value in attrs:
            if key in ("src", "href") and value:
                self.links.append(value)


@pytest.fixture(scope="module")
def run(evaluate, models, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    summary = evaluate.main(_argv(models, prompt_file, out))
    return out, summary


def test_summary_fields_match_the_per_image_csv(run):
    out, returned = run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["baseline"] == "base"
    assert summary["models"] == ["base", "other", "lora"]
    assert summary["scorers"] == ["shapes"]
    assert summary["n_prompts"] == 3 and summary["seeds"] == [7, 8]
    assert summary["settings"]["num_inference_steps"] == 2 and summary["settings"]["resolution"] == 32
    assert summary["generation"] == {m: {"generated": 6, "cached": 0} for m in ("base", "other", "lora")}
    assert summary["settings"]["model_specs"]["lora"]["kind"] == "lora"

    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 3 * 2
    assert set(rows[0]) == {"model", "prompt_index", "prompt", "seed", "category", "image", "shapes"}
    table = {(r["model"], int(r["prompt_index"]), int(r["seed"])): float(r["shapes"]) for r in rows}
    for r in rows:
        assert r["prompt"] == PROMPTS[int(r["prompt_index"])]
        assert r["category"] == CATEGORIES[int(r["prompt_index"])]
        assert (out / r["image"]).is_file()

    def grid(model):  # [P, S] from the CSV
        return np.array([[table[(model, p, s)] for s in (7, 8)] for p in range(3)])

    base = grid("base")
    for model in ("base", "other", "lora"):
        x = grid(model)
        stats = summary["scores"][model]["shapes"]
        assert stats["mean"] == pytest.approx(x.mean())
        assert stats["median"] == pytest.approx(np.median(x))
        assert stats["sem"] == pytest.approx(x.std(ddof=1) / np.sqrt(6))
        assert stats["n"] == 6
        if model == "base":
            assert model not in summary["win_rates"]
            continue
        wr = summary["win_rates"][model]["shapes"]
        expected = np.mean(np.where(x > base, 1.0, np.where(x == base, 0.5, 0.0)))
        assert wr["win_rate"] == pytest.approx(expected)
        assert wr["n"] == 6 and wr["n_prompts"] == 3
        assert 0.0 <= wr["ci_low"] <= wr["win_rate"] <= wr["ci_high"] <= 1.0
        # per category: "round" is prompt 0 alone, "angular" prompts 1 and 2
        cat = summary["per_category"]["angular"]["win_rates"][model]["shapes"]
        exp_cat = np.mean(np.where(x[1:] > base[1:], 1.0, np.where(x[1:] == base[1:], 0.5, 0.0)))
        assert cat["win_rate"] == pytest.approx(exp_cat) and cat["n"] == 4
    assert summary["per_category"]["round"]["n_prompts"] == 1
    # three models → Bradley–Terry strengths, baseline anchored at 0
    bt = summary["bradley_terry"]["shapes"]
    assert bt["base"]["s"] == 0.0 and bt["base"]["p_beats_baseline"] == pytest.approx(0.5)
    assert (
        returned["win_rates"]["other"]["shapes"]["win_rate"]
        == summary["win_rates"]["other"]["shapes"]["win_rate"]
    )


def test_lora_changes_images_and_models_share_seeds(run):
    out, _ = run
    with (out / "scores.csv").open() as f:
        rows = list(csv.DictReader(f))
    images = {(r["model"], r["prompt_index"], r["seed"]): np.asarray(_open(out / r["image"])) for r in rows}
    key = ("0", "7")
    assert images[("base", *key)].shape == (32, 32, 3)
    assert not np.array_equal(images[("base", *key)], images[("lora", *key)])  # the adapter is applied
    assert not np.array_equal(images[("base", "0", "7")], images[("base", "0", "8")])  # seeds differ


def _open(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def test_html_links_exist_and_plots_are_pngs(run):
    out, _ = run
    page = (out / "report.html").read_text()
    parser = _Links()
    parser.feed(page)
    assert parser.links, "the report references no images"
    for link in parser.links:
        assert not link.startswith("/") and "://" not in link, f"not a relative link: {link}"
        assert (out / link).is_file(), f"report.html links to a missing file {link}"
    plots = sorted((out / "plots").glob("*.png"))
    # a difference histogram per non-baseline model, a category bar chart per scorer, the win-rate intervals
    assert {p.name for p in plots} == {
        "diff_other_shapes.png", "diff_lora_shapes.png", "category_shapes.png", "win_rates.png",
    }  # fmt: skip
    for p in plots:
        data = p.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
        assert f"plots/{p.name}" in parser.links
        _open(p)  # decodes
    for prompt in PROMPTS:
        assert prompt in page
    # the page opens with one verdict per model and scorer, before the tables
    for model in ("other", "lora"):
        assert re.search(rf"{model} (beats|is beaten by|ties with) base on shapes: {model} wins", page)
    assert page.index(" base on shapes: ") < page.index("<table")


def test_rerun_hits_the_cache(run, evaluate, models, prompt_file, monkeypatch):
    out, first = run
    images = sorted((out / "images").rglob("*.png"))
    assert len(images) == 18
    mtimes = {p: p.stat().st_mtime_ns for p in images}

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline was loaded although every image is cached")

    monkeypatch.setattr("diffusion_dpo.evaluation.generate.load_pipeline", no_loading)
    summary = evaluate.main(_argv(models, prompt_file, out))
    assert summary["generation"] == {m: {"generated": 0, "cached": 6} for m in ("base", "other", "lora")}
    assert {p: p.stat().st_mtime_ns for p in sorted((out / "images").rglob("*.png"))} == mtimes
    assert summary["scores"] == first["scores"] and summary["win_rates"] == first["win_rates"]
    assert not list((out / "images").rglob(".tmp-*")), "a temp file was left behind"


def test_per_image_generators_make_batching_irrelevant(run, models, tmp_path):
    # Each image has its own seeded generator, so an image does not depend on its batch companions:
    # regenerated alone (batch size 1), prompt 0 gives the pixels it got in the run's batches of 4
    # (the pairing across models relies on this).
    from diffusion_dpo.evaluation.generate import GenerationSettings, generate_images, resolve_model

    out, _ = run
    with (out / "scores.csv").open() as f:
        in_run = {
            int(r["seed"]): out / r["image"]
            for r in csv.DictReader(f)
            if r["model"] == "base" and r["prompt_index"] == "0"
        }
    spec = resolve_model("base", str(models["base"]))
    settings = GenerationSettings(num_inference_steps=2, guidance_scale=5.0, resolution=32)
    alone, n = generate_images(spec, PROMPTS[:1], [7, 8], settings, tmp_path, batch_size=1, progress=False)
    assert n == 2
    assert [p.name for p in alone[0]] == [in_run[7].name, in_run[8].name]  # same cache key
    for seed, path in zip((7, 8), alone[0]):
        np.testing.assert_allclose(
            np.asarray(_open(path), float), np.asarray(_open(in_run[seed]), float), atol=2
        )


def test_cache_key_depends_on_weights_prompt_seed_and_settings(models):
    import os

    from diffusion_dpo.evaluation.generate import GenerationSettings, image_key, model_identity, resolve_model

    spec = resolve_model("base", str(models["base"]))
    ident = model_identity(spec)
    s = GenerationSettings(num_inference_steps=2, resolution=32)
    key = image_key(ident, "p", 0, s)
    assert key == image_key(model_identity(resolve_model("renamed", str(models["base"]))), "p", 0, s)
    assert key != image_key(ident, "q", 0, s)
    assert key != image_key(ident, "p", 1, s)
    for change in (
        dict(num_inference_steps=3), dict(guidance_scale=1.0), dict(resolution=64),
        dict(negative_prompt="blurry"), dict(dtype="bf16"), dict(device_type="cuda"),
    ):  # fmt: skip
        assert key != image_key(ident, "p", 0, GenerationSettings(**{**s.__dict__, **change}))
    assert key != image_key(model_identity(resolve_model("o", str(models["other"]))), "p", 0, s)
    lora = model_identity(resolve_model("l", str(models["lora"])))
    assert lora["base"] == ident  # the LoRA's identity includes its base's weights
    # touching a weights file (a retrained model in the same folder) changes the identity
    weights = next((models["base"] / "unet").glob("*.safetensors"))
    st = weights.stat()
    try:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert model_identity(spec) != ident
    finally:
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_bad_specs_are_clear_errors(evaluate, models, prompt_file, tmp_path, capsys):
    def fails(argv, message):
        with pytest.raises(SystemExit):
            evaluate.main(argv)
        assert re.search(message, capsys.readouterr().err), message

    common = ["--prompts", str(prompt_file), "--output_dir", str(tmp_path / "o"), "--no_progress"]
    fails(["--model", str(models["base"]), "--scorer", "shapes", *common], "expected NAME=PATH_OR_ID")
    fails(["--model", f"a={tmp_path / 'nope'}", "--scorer", "shapes", *common], "does not exist")
    fails(["--model", f"a={tmp_path}", "--scorer", "shapes", *common], "model_index.json")
    fails(["--model", f"a={models['base']}", "--model", f"a={models['other']}", "--scorer", "shapes", *common],
          "unique")  # fmt: skip
    fails(["--model", f"a={models['base']}", "--scorer", "no_such_scorer", *common], "no_such_scorer")
    fails(["--model", f"a={models['base']}", "--scorer", "shapes", "--prompt_column", "text", *common],
          "prompt column 'text' not found")  # fmt: skip
    assert not (tmp_path / "o" / "images").exists()  # nothing was generated


def test_implicit_accuracy_is_reported(evaluate, models, prompt_file, tmp_path):
    from diffusion_dpo.synthetic import write_pair_dataset

    pairs = write_pair_dataset(tmp_path / "pairs.parquet", n_pairs=4, seed=0)
    argv = _argv(
        models, prompt_file, tmp_path / "out", "--implicit_pairs", str(pairs), "--implicit_max_pairs", "4"
    )
    summary = evaluate.main(argv)
    acc = summary["implicit_accuracy"]
    assert set(acc) == {"other", "lora"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["implicit_accuracy"] == acc


# ----------------------------------------------------------------------------------------------------
# prompt sets


def test_prompt_sources(tmp_path):
    from diffusion_dpo.evaluation.prompts import load_prompts

    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt  \n")
    got = load_prompts(tmp_path / "p.txt")
    assert got.prompts == ["first prompt", "second prompt"] and got.categories is None

    (tmp_path / "p.jsonl").write_text('{"text2": "x", "caption": "a"}\n{"text2": "y", "caption": "b"}\n')
    assert load_prompts(tmp_path / "p.jsonl").prompts == ["a", "b"]  # auto-detected "caption"
    assert load_prompts(tmp_path / "p.jsonl", prompt_column="text2").prompts == ["x", "y"]

    (tmp_path / "p.json").write_text(json.dumps({"anime": ["u", "v"], "photo": ["w"]}))
    got = load_prompts(tmp_path / "p.json", max_prompts=2)
    assert got.prompts == ["u", "v"] and got.categories == ["anime", "anime"]

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"Prompt": ["p0", "p1", "p2"], "Category": ["A", "B", "A"], "Note": ["", "", ""]})
    pq.write_table(table, tmp_path / "parti.parquet")
    got = load_prompts(tmp_path / "parti.parquet")
    assert got.prompts == ["p0", "p1", "p2"] and got.categories == ["A", "B", "A"]
    # a folder of parquet files (hub-dataset layout) goes through datasets
    (tmp_path / "folder").mkdir()
    pq.write_table(table, tmp_path / "folder" / "train-00000.parquet")
    got = load_prompts(tmp_path / "folder", category_column="Category")
    assert got.prompts == ["p0", "p1", "p2"] and got.categories == ["A", "B", "A"]


def test_prompt_errors(tmp_path):
    from diffusion_dpo.evaluation.prompts import load_prompts

    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.txt")
    (tmp_path / "p.csv").write_text("prompt,x\nfine,1\n,2\n")
    with pytest.raises(ValueError, match="empty prompt in row 1"):
        load_prompts(tmp_path / "p.csv")
    (tmp_path / "q.csv").write_text("words,x\nfine,1\n")
    with pytest.raises(ValueError, match="no prompt column"):
        load_prompts(tmp_path / "q.csv")
    with pytest.raises(ValueError, match="category column 'Cat'"):
        load_prompts(tmp_path / "p.csv", category_column="Cat")
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")
    # a library's error (encoding, JSON, parquet) becomes a ValueError that names the file
    (tmp_path / "binary.txt").write_bytes(b"\x89\xff\xfe\x00")
    with pytest.raises(ValueError, match=r"cannot read prompts from .*binary.txt: UnicodeDecodeError"):
        load_prompts(tmp_path / "binary.txt")
    (tmp_path / "broken.json").write_text('{"photo": ["a cat",')
    with pytest.raises(ValueError, match=r"cannot read prompts from .*broken.json: JSONDecodeError"):
        load_prompts(tmp_path / "broken.json")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"cannot read prompts from .*broken.parquet"):
        load_prompts(tmp_path / "broken.parquet")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(tmp_path / "empty.json")


# ----------------------------------------------------------------------------------------------------
# report details


def test_report_escapes_prompts(tmp_path):
    from PIL import Image

    from diffusion_dpo.evaluation.report import EvalResults, summarize_results, write_report

    img = tmp_path / "img" / "x.png"
    img.parent.mkdir()
    Image.new("RGB", (8, 8)).save(img)
    evil = '<script>alert("x")</script> & friends'
    results = EvalResults(
        models=["a", "b"],
        scorers=["s"],
        prompts=[evil, "plain"],
        seeds=[0],
        scores={"a": {"s": np.array([[0.0], [1.0]])}, "b": {"s": np.array([[1.0], [1.0]])}},
        image_paths={"a": [[img], [img]], "b": [[img], [img]]},
    )
    summary = summarize_results(results, n_boot=100)
    assert summary["win_rates"]["b"]["s"]["win_rate"] == pytest.approx(0.75)  # a win and a tie
    page = write_report(results, summary, tmp_path / "out")["html"].read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp; friends" in page
    assert summary["bradley_terry"] is None and summary["per_category"] is None


# ----------------------------------------------------------------------------------------------------
# relabelling (AI feedback: docs/objectives.md)


def test_relabel_with_the_shapes_scorer(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from diffusion_dpo.synthetic import Spec, caption, encode_png, render

    relabel = _load_script("relabel")
    rng = np.random.default_rng(0)
    good = [Spec("circle", "red", "blue"), Spec("square", "green", "white"), Spec("cross", "black", "yellow")]
    bad = [
        Spec("circle", "yellow", "blue"),
        Spec("triangle", "green", "white"),
        Spec("cross", "black", "red"),
    ]
    # jpg_0 always follows the caption; the "human" labels agree, disagree, and tie
    table = pa.table(
        {
            "caption": [caption(s) for s in good],
            "jpg_0": [encode_png(render(s, rng)) for s in good],
            "jpg_1": [encode_png(render(s, rng)) for s in bad],
            "label_0": [1.0, 0.0, 0.5],
            "label_1": [0.0, 1.0, 0.5],
            "ranking_id": [10, 11, 12],
        }
    )
    src = tmp_path / "pairs.parquet"
    pq.write_table(table, src)
    out = tmp_path / "relabelled.parquet"
    result = relabel.main(
        ["--dataset", str(src), "--scorer", "shapes", "--output", str(out), "--batch_size", "2"]
    )
    assert result["changes"] == {"kept": 1, "flipped": 1, "to_tie": 0, "from_tie": 1, "tie_kept": 0}
    got = pq.read_table(out).to_pydict()
    assert got["label_0"] == [1.0, 1.0, 1.0] and got["label_1"] == [0.0, 0.0, 0.0]
    assert got["original_label_0"] == [1.0, 0.0, 0.5]
    assert got["ranking_id"] == [10, 11, 12] and got["jpg_0"] == table["jpg_0"].to_pylist()
    assert all(s0 > s1 for s0, s1 in zip(got["score_0"], got["score_1"]))
    assert not list(tmp_path.glob(".tmp-*")), "the atomic write left its temp file"

    # a margin wider than every score gap makes every pair a tie; --max_rows keeps the first rows
    result = relabel.main(
        [
            "--dataset",
            str(src),
            "--scorer",
            "shapes",
            "--output",
            str(out),
            "--tie_margin",
            "2",
            "--max_rows",
            "2",
        ]
    )
    assert result["rows"] == 2 and result["ties"] == 2
    assert pq.read_table(out).to_pydict()["label_0"] == [0.5, 0.5]


def test_relabel_label_rules():
    relabel = _load_script("relabel")
    l0, l1 = relabel.labels_from_scores([1.0, 0.0, 0.5, 0.2], [0.0, 1.0, 0.5, 0.25], tie_margin=0.1)
    np.testing.assert_array_equal(l0, [1.0, 0.0, 0.5, 0.5])
    np.testing.assert_array_equal(l1, [0.0, 1.0, 0.5, 0.5])
    changes = relabel.count_changes([1, 0, 0.5, 1], [0, 1, 0.5, 0], [0, 0, 0.5, 0.5], [1, 1, 0.5, 0.5])
    assert changes == {"kept": 1, "flipped": 1, "to_tie": 1, "from_tie": 0, "tie_kept": 1}
    with pytest.raises(ValueError, match="tie_margin"):
        relabel.labels_from_scores([0.0], [0.0], tie_margin=-1.0)


def test_relabel_ordered_pairs_with_image_paths(tmp_path, capsys):
    from diffusion_dpo.synthetic import Spec, caption, render

    relabel = _load_script("relabel")
    rng = np.random.default_rng(1)
    good, bad = Spec("square", "red", "green"), Spec("circle", "red", "green")
    (tmp_path / "img").mkdir()
    render(good, rng).save(tmp_path / "img" / "good.png")
    render(bad, rng).save(tmp_path / "img" / "bad.png")
    # row 0: the human winner follows the caption; row 1: the human picked the wrong image
    rows = [
        {"caption": caption(good), "image_w": "img/good.png", "image_l": "img/bad.png"},
        {"caption": caption(good), "image_w": "img/bad.png", "image_l": "img/good.png"},
    ]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.parquet"
    result = relabel.main(["--dataset", str(src), "--scorer", "shapes", "--output", str(out)])
    assert result["changes"] == {"kept": 1, "flipped": 1, "to_tie": 0, "from_tie": 0, "tie_kept": 0}
    assert "flipped 1" in capsys.readouterr().out
    import pyarrow.parquet as pq

    got = pq.read_table(out).to_pydict()
    assert got["label_0"] == [1.0, 0.0] and got["image_w"] == ["img/good.png", "img/bad.png"]
    with pytest.raises(SystemExit):
        relabel.main(["--dataset", str(src), "--scorer", "no_such_scorer", "--output", str(out)])
    assert "unknown scorer" in capsys.readouterr().err


def test_shapes_prompt_sets_and_repeats_dropped(evaluate):
    from diffusion_dpo import synthetic
    from diffusion_dpo.evaluation.prompts import PromptSet, load_prompts

    heldout = load_prompts("shapes:heldout")
    train = {synthetic.caption(s) for s in synthetic.specs_for(False)}
    assert len(heldout) == len(set(heldout.prompts)) == 24 and not train & set(heldout.prompts)
    assert set(load_prompts("shapes:train").prompts) == train and len(load_prompts("shapes:all")) == 120
    with pytest.raises(ValueError, match="shapes:heldout, shapes:train or shapes:all"):
        load_prompts("shapes:test")
    # a repeated prompt would render the same images from the same seeds and count one pair twice
    got = evaluate.distinct_prompts(PromptSet(["a", "b", "a", "c", "b"], ["x", "y", "z", "w", "v"], "s"))
    assert got.prompts == ["a", "b", "c"] and got.categories == ["x", "y", "w"]


def test_sampling_defaults_come_from_what_the_trained_models_recorded(evaluate, tmp_path, caplog):
    """--num_inference_steps/--guidance_scale left out: the values every trainer output among the models
    recorded in training_config.yaml (a hub id or plain pipeline records none); a flag given wins;
    models that disagree fall back to 50 and 7.5 with a warning naming them."""
    import argparse

    import yaml

    from diffusion_dpo.evaluation.generate import ModelSpec

    def output(name, **recorded):
        (tmp_path / name).mkdir()
        (tmp_path / name / "training_config.yaml").write_text(yaml.safe_dump(recorded))
        return ModelSpec(name, str(tmp_path / name), "pipeline")

    base = output("base", num_inference_steps=20, guidance_scale=3.0)
    dpo = output("dpo", num_inference_steps=20, guidance_scale=3.0, beta_dpo=5000)
    hub = ModelSpec("hub", "runwayml/stable-diffusion-v1-5", "hub")

    def resolve(models, **flags):
        args = argparse.Namespace(num_inference_steps=None, guidance_scale=None, **{})
        vars(args).update(flags)
        where = evaluate._sampling_defaults(args, models)
        return args.num_inference_steps, args.guidance_scale, where

    assert resolve([base, dpo, hub]) == (
        20,
        3.0,
        "num_inference_steps 20 as base, dpo recorded; guidance_scale 3.0 as base, dpo recorded",
    )
    assert resolve([base, dpo], guidance_scale=7.0)[:2] == (20, 7.0)
    assert resolve([hub]) == (50, 7.5, "num_inference_steps 50 by default; guidance_scale 7.5 by default")
    other = output("old", num_inference_steps=25)  # recorded before guidance was: steps differ, no guidance
    with caplog.at_level("WARNING"):
        assert resolve([other, dpo])[:2] == (50, 3.0)
    assert "different num_inference_steps (old 25, dpo 20)" in caplog.text
