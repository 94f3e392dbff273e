"""The synthetic shapes world: vocabulary, captions, split, rendering, faithfulness, writers, scorer, CLI."""

from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from diffusion_dpo import synthetic
from diffusion_dpo.data import load_caption_dataset, load_pair_dataset, load_unpaired_dataset
from diffusion_dpo.models.tiny import TINY_WORDS, write_tiny_clip_tokenizer
from diffusion_dpo.scorers.shapes import ShapesScorer
from diffusion_dpo.synthetic import (
    COLORS,
    SHAPES,
    VOCABULARY,
    Spec,
    all_specs,
    caption,
    corrupt,
    faithfulness,
    faithfulness_terms,
    heldout_prompts,
    parse_caption,
    render,
    sample_spec,
    split_specs,
)

datasets.disable_progress_bars()
REPO = Path(__file__).resolve().parents[1]


def decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def test_every_caption_word_is_one_tiny_tokenizer_token(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp_path / "tok"))
    assert set(VOCABULARY) <= set(TINY_WORDS)
    for word in VOCABULARY:
        assert len(tokenizer.tokenize(word)) == 1, word
    for spec in all_specs():
        words = caption(spec).split()
        assert len(tokenizer.tokenize(caption(spec))) == len(words) == 7


@pytest.mark.parametrize("sdxl", [False, True])
def test_tiny_text_encoders_tell_caption_words_apart(sdxl):
    """A UNet can only follow captions its text encoder separates. At transformers' default init the
    tiny random CLIP gave cosine 0.92 (shape colour) and 0.98 (background) between the states of
    captions differing in that one word, and the base model of the synthetic experiment ignored its
    captions; the tiny models re-draw the word embeddings so that each word stays visible."""
    from diffusion_dpo.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(sdxl=sdxl)
    captions = [
        "a red circle on a blue background",
        "a green circle on a blue background",  # shape colour changed (token 2)
        "a red circle on a green background",  # background changed (token 6)
        "a blue circle on a red background",  # the two colours swapped
    ]
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if sdxl else [])
    for encoder in encoders:
        ids = pipe.tokenizer(captions, padding="max_length", max_length=16, return_tensors="pt").input_ids
        with torch.no_grad():
            states = encoder(ids, output_hidden_states=True).hidden_states[-2 if sdxl else -1]

        def cos(a, b):
            return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

        assert cos(states[0, 2], states[1, 2]) < 0.8
        assert cos(states[0, 6], states[2, 6]) < 0.8
        assert max(cos(states[0, 2], states[3, 2]), cos(states[0, 6], states[3, 6])) < 0.8  # word order


def test_caption_round_trip_and_rejections():
    specs = all_specs()
    assert len(specs) == len(SHAPES) * len(COLORS) * (len(COLORS) - 1) == 120
    assert caption(Spec("circle", "red", "blue")) == "a red circle on a blue background"
    for spec in specs:
        assert parse_caption(caption(spec)) == spec
    assert parse_caption("  A Red circle on a Blue background. ") == Spec("circle", "red", "blue")
    for text in [
        "a red circle on a red background",
        "a red dog on a blue background",
        "a red circle",
        "",
        None,
        3,
    ]:
        assert parse_caption(text) is None
    with pytest.raises(ValueError, match="invisible"):
        Spec("circle", "red", "red")
    with pytest.raises(ValueError, match="shape must be one of"):
        Spec("hexagon", "red", "blue")


def test_heldout_split_is_fixed_disjoint_and_compositional():
    train, heldout = split_specs()
    assert split_specs() == (train, heldout)
    assert len(heldout) == 24 and len(train) == 96
    assert set(train) | set(heldout) == set(all_specs()) and not set(train) & set(heldout)
    for spec in heldout:  # every attribute pair of a held-out prompt is seen in training
        assert any(s.color == spec.color and s.shape == spec.shape for s in train)
        assert any(s.color == spec.color and s.background == spec.background for s in train)
        assert any(s.shape == spec.shape and s.background == spec.background for s in train)
    assert heldout_prompts() == [caption(s) for s in heldout]
    rng = np.random.default_rng(0)
    assert all(sample_spec(rng) in train for _ in range(200))


def test_corrupt_changes_an_attribute_in_every_mode():
    rng = np.random.default_rng(1)
    changed = set()
    for _ in range(300):
        spec = sample_spec(rng)
        bad = corrupt(spec, rng)
        assert bad != spec and bad.color != bad.background
        changed.add((bad.color != spec.color, bad.shape != spec.shape, bad.background != spec.background))
    assert changed == {(True, False, False), (False, True, False), (False, False, True), (True, True, False)}


def test_render_is_seeded_sized_and_has_the_named_background():
    spec = Spec("triangle", "yellow", "blue")
    a = render(spec, np.random.default_rng(3), 32)
    b = render(spec, np.random.default_rng(3), 32)
    assert a.size == (32, 32) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    corner = np.asarray(a)[0, 0].astype(int)
    assert np.abs(corner - np.array(COLORS["blue"])).max() <= 8  # colour jitter is at most 8
    assert render(spec, np.random.default_rng(0), 48).size == (48, 48)


def test_faithfulness_high_for_matching_low_for_corrupted():
    rng = np.random.default_rng(7)
    matching, corrupted, margins = [], [], []
    for _ in range(120):
        spec = sample_spec(rng, all_specs())
        good = faithfulness(render(spec, rng), caption(spec))
        bad = faithfulness(render(corrupt(spec, rng), rng), caption(spec))
        matching.append(good)
        corrupted.append(bad)
        margins.append(good - bad)
    assert np.mean(matching) > 0.8 and min(matching) > 0.5
    assert np.mean(corrupted) < 0.1
    assert np.mean(np.array(margins) > 0.3) > 0.95
    assert all(0.0 <= s <= 1.0 for s in matching + corrupted)
    assert len(set(matching)) == len(matching)  # continuous: renders do not tie


@pytest.mark.parametrize("attribute", ["shape", "color", "background"])
def test_each_wrong_attribute_alone_is_caught_by_its_term(attribute):
    rng = np.random.default_rng(2)
    spec = Spec("square", "red", "white")
    changed = {
        "shape": Spec("circle", "red", "white"),
        "color": Spec("square", "green", "white"),
        "background": Spec("square", "red", "black"),
    }[attribute]
    terms = faithfulness_terms(render(changed, rng), spec)
    assert terms[attribute] < 0.2
    assert all(value > 0.8 for name, value in terms.items() if name != attribute)
    assert faithfulness(render(changed, rng), spec) < 0.2


def test_faithfulness_degrades_monotonically_with_noise_and_blur():
    rng = np.random.default_rng(4)
    specs = [sample_spec(rng) for _ in range(40)]
    images = [np.asarray(render(s, rng), dtype=np.float64) / 255.0 for s in specs]

    def mean_score(degrade):
        return np.mean([faithfulness(degrade(x), s) for x, s in zip(images, specs)])

    noise_rng = np.random.default_rng(0)
    noise = [
        mean_score(lambda x, sd=sd: np.clip(x + noise_rng.normal(0, sd, x.shape), 0, 1))
        for sd in (0, 0.1, 0.2, 0.35)
    ]
    assert noise[0] > 0.8 and all(a > b for a, b in zip(noise, noise[1:])), noise

    def blur(radius):
        return lambda x: Image.fromarray((x * 255).round().astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(radius)
        )

    blurred = [mean_score(blur(r)) for r in (0.01, 1.0, 2.0, 3.0)]
    assert blurred[1] > 0.8  # a mildly blurry image of the right thing still scores high
    assert all(a > b for a, b in zip(blurred, blurred[1:])), blurred


def test_faithfulness_of_a_blank_image_and_invalid_captions():
    blank = Image.new("RGB", (32, 32), COLORS["blue"])
    assert faithfulness(blank, "a red circle on a blue background") == 0.0
    image = render(Spec("cross", "white", "black"), np.random.default_rng(0))
    as_uint8, as_float = np.asarray(image), np.asarray(image) / 255.0
    assert faithfulness(image, "a white cross on a black background") > 0.8
    assert faithfulness(as_uint8, "a white cross on a black background") == faithfulness(
        image, "a white cross on a black background"
    )
    assert faithfulness(as_float, "a white cross on a black background") == pytest.approx(
        faithfulness(image, "a white cross on a black background")
    )
    with pytest.raises(ValueError, match="not a caption of the shapes world"):
        faithfulness(blank, "a photo of a cat")


def test_shapes_scorer_matches_faithfulness():
    rng = np.random.default_rng(5)
    specs = [sample_spec(rng) for _ in range(5)]
    images = [render(s, rng) for s in specs]
    prompts = [caption(s) for s in specs]
    scorer = ShapesScorer(device="cuda", dtype=torch.float16, batch_size=2)  # both ignored
    scores = scorer(images, prompts)
    assert ShapesScorer.name == "shapes"
    assert scores.shape == (5,) and scores.dtype == torch.float32
    assert torch.allclose(scores, torch.tensor([faithfulness(i, p) for i, p in zip(images, prompts)]))
    with pytest.raises(ValueError, match="shapes: got 2 images but 1 prompts"):
        scorer(images[:2], prompts[:1])


def test_pair_writer_round_trips_with_winner_first_and_ties(tmp_path):
    path = synthetic.write_pair_dataset(tmp_path / "pairs.parquet", 60, seed=1, tie_fraction=0.1)
    raw = datasets.load_dataset("parquet", data_files=str(path), split="train", cache_dir=str(tmp_path / "c"))
    assert raw.column_names == ["caption", "jpg_0", "jpg_1", "label_0", "label_1"]
    labels = raw["label_0"]
    assert {0.0, 0.5, 1.0} == set(labels)  # winners at both positions, and ties
    assert all(a + b == 1.0 for a, b in zip(labels, raw["label_1"]))
    pairs = load_pair_dataset(path, cache_dir=str(tmp_path / "c"))
    assert len(pairs) == sum(label != 0.5 for label in labels)
    for row in pairs:
        assert decode(row["image_w"]).size == (32, 32)
        assert faithfulness(decode(row["image_w"]), row["caption"]) > faithfulness(
            decode(row["image_l"]), row["caption"]
        )
    assert all(parse_caption(c) in split_specs()[0] for c in raw["caption"])


def test_heldout_writers_use_only_heldout_prompts(tmp_path):
    path = synthetic.write_pair_dataset(tmp_path / "test.parquet", 20, seed=2, heldout=True)
    pairs = load_pair_dataset(path, keep_ties=True, cache_dir=str(tmp_path / "c"))
    assert {r["caption"] for r in pairs} <= set(heldout_prompts())


def test_caption_writer_noise_and_unpaired_writer_labels(tmp_path):
    cache = str(tmp_path / "c")
    clean = load_caption_dataset(
        synthetic.write_caption_dataset(tmp_path / "clean.parquet", 30, seed=3), cache_dir=cache
    )
    noisy = load_caption_dataset(
        synthetic.write_caption_dataset(tmp_path / "noisy.parquet", 30, seed=3, caption_noise=1.0),
        cache_dir=cache,
    )
    assert all(faithfulness(decode(r["image"]), r["caption"]) > 0.5 for r in clean)
    assert all(faithfulness(decode(r["image"]), r["caption"]) < 0.5 for r in noisy)
    unpaired = load_unpaired_dataset(
        synthetic.write_unpaired_dataset(tmp_path / "kto.parquet", 40, seed=4), cache_dir=cache
    )
    desirable = [r["desirable"] for r in unpaired]
    assert 0 < sum(desirable) < 40
    for row in unpaired:
        assert (faithfulness(decode(row["image"]), row["caption"]) > 0.5) == row["desirable"]


def test_cli_writes_loadable_train_and_heldout_splits(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "make_synthetic_dataset", REPO / "data" / "make_synthetic_dataset.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(
        ["--output_dir", str(tmp_path / "shapes"), "--n_pairs", "30", "--seed", "3", "--tie_fraction", "0"]
    )
    train = load_pair_dataset(out, split="train", cache_dir=str(tmp_path / "c"))
    test = load_pair_dataset(out, split="test", cache_dir=str(tmp_path / "c"))
    assert (len(train), len(test)) == (30, 3)
    assert {r["caption"] for r in test} <= set(heldout_prompts())
    assert (out / "heldout_prompts.txt").read_text().split("\n")[:-1] == heldout_prompts()
    module.main(
        [
            "--output_dir",
            str(tmp_path / "kto"),
            "--kind",
            "unpaired",
            "--n_images",
            "10",
            "--resolution",
            "16",
        ]
    )
    rows = load_unpaired_dataset(tmp_path / "kto", cache_dir=str(tmp_path / "c"))
    assert len(rows) == 10 and decode(rows[0]["image"]).size == (16, 16)
