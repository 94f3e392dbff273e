"""Preference-pair and unpaired data: sources, tie/swap handling, transforms, collate, bad rows."""

from __future__ import annotations

import io
import json
import logging

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffusion_dpo.data import (
    BadRowError,
    PairStats,
    PairTransform,
    UnpairedStats,
    UnpairedTransform,
    collate_pairs,
    collate_unpaired,
    load_caption_dataset,
    load_pair_dataset,
    load_unpaired_dataset,
    make_torch_dataset,
    pairs_to_unpaired,
    row_rng,
)
from diffusion_dpo.data.transforms import TransformedDataset, TransformedIterableDataset
from diffusion_dpo.models.loading import to_unit_range

datasets.disable_progress_bars()

# Six pairs in Pick-a-Pic order: two won by the first image, two by the second, two ties.
LABELS = [1.0, 0.0, 0.5, 1.0, 0.0, 0.5]
WINNER_RED, LOSER_BLUE = 200, 200


def solid_png(rgb, size=(12, 10)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, tuple(rgb)).save(buffer, format="PNG")
    return buffer.getvalue()


def winner_rgb(i):  # the preferred image of pair i: red, green channel encodes i
    return (WINNER_RED, 10 * i, 0)


def loser_rgb(i):
    return (0, 10 * i, LOSER_BLUE)


def pickapic_rows(labels=LABELS):
    """Pick-a-Pic rows whose winner (by label_0) is red and loser blue; ties have a red first image."""
    rows = []
    for i, label in enumerate(labels):
        first, second = (winner_rgb(i), loser_rgb(i)) if label >= 0.5 else (loser_rgb(i), winner_rgb(i))
        rows.append(
            {
                "caption": f"pair {i}",
                "jpg_0": solid_png(first),
                "jpg_1": solid_png(second),
                "label_0": label,
                "label_1": 1.0 - label,
            }
        )
    return rows


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return path


def mean_rgb(value) -> tuple[int, ...]:
    if isinstance(value, dict):
        value = value["bytes"] if value.get("bytes") is not None else value["path"]
    image = Image.open(io.BytesIO(value) if isinstance(value, bytes) else value).convert("RGB")
    return tuple(int(round(c)) for c in np.asarray(image).reshape(-1, 3).mean(0))


def as_triples(ds):
    return [(r["caption"], mean_rgb(r["image_w"]), mean_rgb(r["image_l"])) for r in ds]


EXPECTED = [(f"pair {i}", winner_rgb(i), loser_rgb(i)) for i, label in enumerate(LABELS) if label != 0.5]


# ---------------------------------------------------------------------------------------------
# Sources


def make_source(kind, tmp_path):
    """The same six pairs in each supported local format; returns what to pass to load_pair_dataset."""
    rows = pickapic_rows()
    if kind == "parquet_file":
        return write_parquet(tmp_path / "pairs.parquet", rows)
    if kind == "parquet_folder":
        write_parquet(tmp_path / "folder" / "train-00000-of-00002.parquet", rows[:3])
        write_parquet(tmp_path / "folder" / "train-00001-of-00002.parquet", rows[3:])
        return tmp_path / "folder"
    if kind == "save_to_disk":
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
        return tmp_path / "saved"
    if kind == "save_to_disk_dict":
        split = datasets.Dataset.from_list(rows)
        datasets.DatasetDict(train=split, test=split.select([0])).save_to_disk(str(tmp_path / "saved_dict"))
        return tmp_path / "saved_dict"
    # Ordered pairs with image paths relative to the file's folder.
    (tmp_path / "images").mkdir()
    ordered = []
    for i, label in enumerate(LABELS):
        if label == 0.5:
            continue
        for name, rgb in ((f"w{i}.png", winner_rgb(i)), (f"l{i}.png", loser_rgb(i))):
            (tmp_path / "images" / name).write_bytes(solid_png(rgb))
        ordered.append({"caption": f"pair {i}", "image_w": f"images/w{i}.png", "image_l": f"images/l{i}.png"})
    if kind == "jsonl":
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in ordered))
        return path
    path = tmp_path / "pairs.csv"
    path.write_text(
        "caption,image_w,image_l\n"
        + "".join(f"{r['caption']},{r['image_w']},{r['image_l']}\n" for r in ordered)
    )
    return path


@pytest.mark.parametrize(
    "kind", ["parquet_file", "parquet_folder", "save_to_disk", "save_to_disk_dict", "jsonl", "csv"]
)
def test_every_format_loads_the_same_winner_first_pairs(kind, tmp_path):
    source = make_source(kind, tmp_path)
    ds = load_pair_dataset(source, cache_dir=str(tmp_path / "cache"))
    assert len(ds) == 4
    assert as_triples(ds) == EXPECTED


def test_ties_dropped_counted_logged_and_second_winner_swapped(tmp_path, caplog):
    path = write_parquet(tmp_path / "pairs.parquet", pickapic_rows())
    stats = PairStats()
    with caplog.at_level(logging.INFO, logger="diffusion_dpo.data.pairs"):
        ds = load_pair_dataset(path, stats=stats, cache_dir=str(tmp_path / "cache"))
    assert (stats.seen, stats.ties, stats.swapped) == (6, 2, 2)
    assert "dropped 2 ties of 6 pairs" in caplog.text
    # Pixel content: every image_w is the red winner, every image_l the blue loser.
    assert as_triples(ds) == EXPECTED


def test_keep_ties_keeps_them_in_stored_order(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", pickapic_rows())
    ds = load_pair_dataset(path, keep_ties=True, cache_dir=str(tmp_path / "cache"))
    assert [r["caption"] for r in ds] == [f"pair {i}" for i in range(6)]
    assert mean_rgb(ds[2]["image_w"]) == winner_rgb(2)  # a tie: jpg_0 stays first


def test_max_train_samples_is_a_seeded_random_subset_after_tie_removal(tmp_path):
    labels = [0.5 if i % 4 == 0 else float(i % 2) for i in range(40)]  # 10 ties
    path = write_parquet(tmp_path / "pairs.parquet", pickapic_rows(labels))
    non_ties = [i for i, label in enumerate(labels) if label != 0.5]

    def captions(**kwargs):
        return [r["caption"] for r in load_pair_dataset(path, cache_dir=str(tmp_path / "cache"), **kwargs)]

    # The paper's dataset.shuffle(seed).select(range(N)): N random non-tie rows, here in stored order.
    expected = sorted(np.random.default_rng(7).permutation(len(non_ties))[:10])
    assert captions(max_train_samples=10, seed=7) == [f"pair {non_ties[i]}" for i in expected]
    assert captions(max_train_samples=10, seed=7) != [f"pair {i}" for i in non_ties[:10]]
    assert captions(max_train_samples=10, seed=8) != captions(max_train_samples=10, seed=7)
    assert set(captions(max_train_samples=5, seed=7)) < set(captions(max_train_samples=10, seed=7))
    assert len(captions(max_train_samples=100)) == 30  # more than there are: all of them
    # A stream keeps its first N rows (its subset is the streaming loader's business).
    stream = load_pair_dataset(path, streaming=True, max_train_samples=3)
    assert [r["caption"] for r in stream] == ["pair 1", "pair 2", "pair 3"]


def test_unpaired_and_caption_max_train_samples_are_seeded_random_subsets(tmp_path):
    rows = [{"caption": f"img {i}", "image": b"x", "label": i % 3 == 0} for i in range(30)]
    path = write_parquet(tmp_path / "kto.parquet", rows)
    expected = [f"img {i}" for i in sorted(np.random.default_rng(3).permutation(30)[:8])]
    stats = UnpairedStats()
    ds = load_unpaired_dataset(path, max_train_samples=8, seed=3, stats=stats, cache_dir=str(tmp_path / "c"))
    assert [r["caption"] for r in ds] == expected
    # The label counts are those of the rows kept (KTO's class weights depend on them).
    assert (stats.seen, stats.desirable) == (8, sum(int(c[4:]) % 3 == 0 for c in expected))
    captions = load_caption_dataset(path, max_train_samples=8, seed=3, cache_dir=str(tmp_path / "c"))
    assert [r["caption"] for r in captions] == expected


def test_streaming_yields_the_same_pairs_and_counts_ties_as_they_pass(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", pickapic_rows())
    eager = load_pair_dataset(path, cache_dir=str(tmp_path / "cache"))
    stats = PairStats()
    stream = load_pair_dataset(path, streaming=True, stats=stats)
    assert isinstance(stream, datasets.IterableDataset)
    assert stats.seen == 0  # nothing read yet
    streamed = list(stream)
    assert [(r["caption"], r["image_w"], r["image_l"]) for r in streamed] == [
        (r["caption"], r["image_w"], r["image_l"]) for r in eager
    ]
    assert (stats.seen, stats.ties, stats.swapped) == (6, 2, 2)


def test_streaming_tie_counts_are_logged_as_rows_pass(caplog):
    labels = [0.5 if i % 10 == 0 else float(i % 2) for i in range(1000)]
    rows = [
        {"caption": f"p{i}", "jpg_0": b"a", "jpg_1": b"b", "label_0": label} for i, label in enumerate(labels)
    ]
    stats = PairStats()
    stream = load_pair_dataset(datasets.Dataset.from_list(rows), streaming=True, stats=stats)
    with caplog.at_level(logging.INFO, logger="diffusion_dpo.data.pairs"):
        kept = list(stream)
    assert len(kept) == 900 and (stats.seen, stats.ties, stats.swapped) == (
        1000,
        100,
        400,
    )  # 100 ties; 400 even non-multiples of 10 swapped
    assert "dropped 100 ties of the first 1000 pairs" in caplog.text
    assert all(r["image_w"] == (b"a" if labels[int(r["caption"][1:])] == 1.0 else b"b") for r in kept)


def test_streaming_through_dataloader_matches_map_style_tensors(tmp_path):
    path = write_parquet(tmp_path / "pairs.parquet", pickapic_rows())
    transform = PairTransform(resolution=8, seed=3)
    eager = make_torch_dataset(load_pair_dataset(path, cache_dir=str(tmp_path / "cache")), transform)
    stream = make_torch_dataset(load_pair_dataset(path, streaming=True), transform)
    assert isinstance(eager, TransformedDataset) and isinstance(stream, TransformedIterableDataset)
    a = next(iter(torch.utils.data.DataLoader(eager, batch_size=4, collate_fn=collate_pairs)))
    b = next(iter(torch.utils.data.DataLoader(stream, batch_size=4, collate_fn=collate_pairs)))
    assert torch.equal(a["pixel_values_w"], b["pixel_values_w"])
    assert torch.equal(a["pixel_values_l"], b["pixel_values_l"])
    assert a["captions"] == b["captions"]
    # A one-shard stream read by two workers (one idles) numbers its rows as a single process does.
    c = next(iter(torch.utils.data.DataLoader(stream, batch_size=4, collate_fn=collate_pairs, num_workers=2)))
    assert torch.equal(a["indices"], c["indices"]) and torch.equal(a["pixel_values_l"], c["pixel_values_l"])


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_columns_error_names_missing_found_and_source(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "label_0"} for r in pickapic_rows()]
    path = write_parquet(tmp_path / "nolabel.parquet", rows)
    with pytest.raises(ValueError) as error:
        load_pair_dataset(path, cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert "missing columns ['label_0']" in message
    assert "jpg_0" in message and "label_1" in message  # found columns
    assert str(path) in message

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps({"caption": "x", "image_w": "a.png", "winner": "b.png"}) + "\n")
    with pytest.raises(ValueError, match=r"missing columns \['image_l'\].*winner.*pairs\.jsonl"):
        load_pair_dataset(jsonl, cache_dir=str(tmp_path / "cache"))


def test_wrong_paths_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pair_dataset(tmp_path / "nope.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pair_dataset(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ValueError, match="holds neither a dataset written by save_to_disk .* nor parquet files"
    ):
        load_pair_dataset(tmp_path / "empty")
    (tmp_path / "pairs.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported extension '.txt'"):
        load_pair_dataset(tmp_path / "pairs.txt")
    source = make_source("save_to_disk_dict", tmp_path)
    with pytest.raises(ValueError, match=r"split 'validation'.*'test', 'train'"):
        load_pair_dataset(source, split="validation")


def test_corrupt_image_raises_naming_the_row_or_becomes_a_counted_placeholder(tmp_path, caplog):
    rows = pickapic_rows([1.0, 1.0, 1.0])
    rows[1]["jpg_0"] = b"\x89PNG this is not an image"
    path = write_parquet(tmp_path / "pairs.parquet", rows)
    ds = load_pair_dataset(path, cache_dir=str(tmp_path / "cache"))  # loading does not decode
    strict = make_torch_dataset(ds, PairTransform(resolution=8))
    assert strict[0]["bad"] is None
    with pytest.raises(BadRowError, match="row 1, image_w: cannot decode image"):
        strict[1]

    lenient = make_torch_dataset(ds, PairTransform(resolution=8), on_bad_example="skip")
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo.data.transforms"):
        placeholder = lenient[1]
    assert "row 1, image_w: cannot decode image" in caplog.text
    assert placeholder["bad"].startswith("row 1, image_w") and lenient.num_skipped == 1
    # A placeholder keeps the batch's size and shapes; valid and bad_rows say which row it stands for.
    loader = torch.utils.data.DataLoader(lenient, batch_size=3, collate_fn=collate_pairs)
    batch = next(iter(loader))
    assert batch["indices"].tolist() == [0, 1, 2]
    assert batch["valid"].tolist() == [True, False, True] and batch["valid"].dtype == torch.bool
    assert batch["num_skipped"] == 1 and [r["index"] for r in batch["bad_rows"]] == [1]
    assert "cannot decode image" in batch["bad_rows"][0]["reason"]
    assert batch["pixel_values_w"].shape == batch["pixel_values_l"].shape == (3, 3, 8, 8)
    assert torch.all(batch["pixel_values_w"][1] == 0) and batch["captions"][1] == ""
    with pytest.raises(ValueError, match="on_bad_example must be one of"):
        make_torch_dataset(ds, PairTransform(resolution=8), on_bad_example="ignore")
    with pytest.raises(TypeError, match="placeholder"):  # skipping needs something to skip to
        make_torch_dataset(ds, lambda row, **kwargs: row, on_bad_example="skip")


def test_placeholders_have_the_keys_dtypes_and_shapes_of_real_examples():
    row = {"caption": "c", "image_w": gradient_png(), "image_l": gradient_png()}
    unpaired_row = {"caption": "c", "image": gradient_png(), "desirable": True}
    for transform, good_row in (
        (PairTransform(resolution=8), row),
        (PairTransform(resolution=8, sdxl=True), row),
        (UnpairedTransform(resolution=8, sdxl=True), {"caption": "c", "image": gradient_png()}),
        (UnpairedTransform(resolution=8, labelled=True), unpaired_row),
        (UnpairedTransform(resolution=8, labelled=True, sdxl=True), unpaired_row),
    ):
        good, bad = transform(good_row, index=3), transform.placeholder(5, "row 5: broken")
        assert good.keys() == bad.keys(), transform
        for key, value in good.items():
            assert key == "bad" or type(bad[key]) is type(value), key
            if isinstance(value, torch.Tensor):
                assert bad[key].shape == value.shape and bad[key].dtype == value.dtype and not bad[key].any()
        assert (good["bad"], bad["bad"], bad["index"], bad["caption"]) == (None, "row 5: broken", 5, "")
        if transform.sdxl:
            assert bad[[k for k in bad if k.startswith("original_size")][0]] == (8, 8)
            assert bad[[k for k in bad if k.startswith("crop_top_left")][0]] == (0, 0)
        if getattr(transform, "labelled", False):
            assert bad["desirable"] is False
    # A transform that disagrees with its rows about labels says so instead of dropping them.
    with pytest.raises(ValueError, match="labelled=True"):
        UnpairedTransform(resolution=8)(unpaired_row, index=0)


def test_missing_caption_raises_naming_the_row_but_an_empty_one_trains_unconditionally(tmp_path):
    (tmp_path / "w.png").write_bytes(solid_png((255, 0, 0)))
    (tmp_path / "l.png").write_bytes(solid_png((0, 0, 255)))
    path = tmp_path / "pairs.csv"
    path.write_text("caption,image_w,image_l\nfine,w.png,l.png\n,w.png,l.png\n")  # row 1: empty cell
    ds = make_torch_dataset(
        load_pair_dataset(path, cache_dir=str(tmp_path / "cache")), PairTransform(resolution=8)
    )
    assert ds[0]["caption"] == "fine"
    with pytest.raises(BadRowError, match="row 1: caption is missing"):  # CSV reads an empty cell as None
        ds[1]
    transform = PairTransform(resolution=8)
    image = solid_png((1, 2, 3))
    # Empty and blank captions are unconditional examples (as caption dropout makes), trained as "".
    for caption in ("", "   ", "\n"):
        assert transform({"caption": caption, "image_w": image, "image_l": image}, index=7)["caption"] == ""
    with pytest.raises(BadRowError, match="row 7: caption is a float \\(nan\\), not a string"):
        transform({"caption": float("nan"), "image_w": image, "image_l": image}, index=7)
    with pytest.raises(BadRowError, match="row 7: caption is an? int"):
        transform({"caption": 3, "image_w": image, "image_l": image}, index=7)
    with pytest.raises(BadRowError, match="row 3, image_l: image is missing"):
        transform({"caption": "x", "image_w": image, "image_l": None}, index=3)


# ---------------------------------------------------------------------------------------------
# Transforms and collate


def test_caption_dropout_is_decided_once_per_pair_from_the_row_rng():
    image = solid_png((9, 9, 9), size=(8, 8))
    row = {"caption": "keep me", "image_w": image, "image_l": image}
    transform = PairTransform(resolution=8, proportion_empty_prompts=0.5, seed=11)
    dropped = [transform(row, index=i, epoch=2)["caption"] == "" for i in range(400)]
    assert 0.4 < np.mean(dropped) < 0.6
    # The decision is the row generator's first draw, made once for both images of the pair.
    assert dropped == [row_rng(11, 2, i).random() < 0.5 for i in range(400)]
    assert all(
        PairTransform(resolution=8, proportion_empty_prompts=1.0)(row, index=i)["caption"] == ""
        for i in range(5)
    )
    assert all(PairTransform(resolution=8)(row, index=i)["caption"] == "keep me" for i in range(5))
    with pytest.raises(ValueError, match="proportion_empty_prompts"):
        PairTransform(proportion_empty_prompts=1.5)


def gradient_png(width=24, height=12) -> bytes:
    """An asymmetric image: red grows left to right, green top to bottom."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    array = np.stack([x, y, np.full_like(x, 77)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_same_seed_epoch_index_gives_identical_tensors_and_epochs_differ():
    row = {"caption": "c", "image_w": gradient_png(), "image_l": gradient_png()}
    transform = PairTransform(resolution=8, proportion_empty_prompts=0.3, seed=5)
    a = [transform(row, index=i, epoch=1) for i in range(20)]
    # Same (seed, epoch, index) in any order (as after a resume, or in another worker): same tensors.
    b = {i: transform(row, index=i, epoch=1) for i in reversed(range(20))}
    for i in range(20):
        assert torch.equal(a[i]["pixel_values_w"], b[i]["pixel_values_w"])
        assert torch.equal(a[i]["pixel_values_l"], b[i]["pixel_values_l"])
        assert a[i]["caption"] == b[i]["caption"]
    other_epoch = [transform(row, index=i, epoch=2)["pixel_values_w"] for i in range(20)]
    assert any(not torch.equal(x["pixel_values_w"], y) for x, y in zip(a, other_epoch))
    # Winner and loser are cropped and flipped independently (Diffusion-DPO's per-image transform).
    assert any(not torch.equal(x["pixel_values_w"], x["pixel_values_l"]) for x in a)


def test_set_epoch_changes_the_wrapped_dataset_transforms():
    rows = [{"caption": "c", "image_w": gradient_png(), "image_l": gradient_png()}] * 8
    ds = make_torch_dataset(rows, PairTransform(resolution=8, seed=1))
    first = torch.stack([ds[i]["pixel_values_w"] for i in range(8)])
    ds.set_epoch(1)
    second = torch.stack([ds[i]["pixel_values_w"] for i in range(8)])
    ds.set_epoch(0)
    assert torch.equal(first, torch.stack([ds[i]["pixel_values_w"] for i in range(8)]))
    assert not torch.equal(first, second)


def test_center_crop_matches_an_independent_resize_and_crop():
    row = {"caption": "c", "image_w": gradient_png(24, 12), "image_l": gradient_png(24, 12)}
    out = PairTransform(resolution=8, center_crop=True, random_flip=False, sdxl=True)(row, index=0)
    # Shorter side 12 -> 8: 24x12 becomes 16x8, the center 8x8 crop starts at left 4.
    reference = (
        Image.open(io.BytesIO(row["image_w"])).resize((16, 8), Image.Resampling.BILINEAR).crop((4, 0, 12, 8))
    )
    expected = torch.from_numpy(np.asarray(reference, dtype=np.uint8).copy()).permute(2, 0, 1)
    assert out["pixel_values_w"].dtype == torch.uint8 and torch.equal(out["pixel_values_w"], expected)
    assert out["original_size_w"] == (12, 24) and out["crop_top_left_w"] == (0, 4)
    # what the step feeds the VAE: [-1, 1]
    scaled = to_unit_range(out["pixel_values_w"])
    assert torch.equal(scaled, expected.float() / 127.5 - 1) and scaled.min() >= -1 and scaled.max() <= 1


def test_random_crop_and_flip_follow_the_row_rng():
    row = {"caption": "c", "image_w": gradient_png(24, 12), "image_l": gradient_png(24, 12)}
    transform = PairTransform(resolution=8, center_crop=False, random_flip=True, sdxl=True, seed=4)
    resized = Image.open(io.BytesIO(row["image_w"])).resize((16, 8), Image.Resampling.BILINEAR)
    flips = set()
    for index in range(12):
        out = transform(row, index=index)
        rng = row_rng(4, 0, index)
        rng.random()  # caption dropout draw
        top_draw, left_draw, flip_draw = rng.random(3)
        left = int(left_draw * 9)  # 16 - 8 + 1 possible offsets
        assert out["crop_top_left_w"] == (0, left)
        # The flip comes first, the crop's corner is in the flipped image.
        seen = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip_draw < 0.5 else resized
        expected = torch.from_numpy(np.asarray(seen.crop((left, 0, left + 8, 8)), dtype=np.uint8).copy())
        flips.add(bool(flip_draw < 0.5))
        assert torch.equal(out["pixel_values_w"], expected.permute(2, 0, 1))
    assert flips == {True, False}


def test_collate_pairs_layout_with_sdxl_fields():
    rows = [
        {
            "caption": f"c{i}",
            "image_w": solid_png((255, 0, 0), (20 + i, 10)),
            "image_l": solid_png((0, 0, 255), (10, 30)),
        }
        for i in range(3)
    ]
    transform = PairTransform(resolution=8, center_crop=True, sdxl=True)
    batch = collate_pairs([transform(r, index=i) for i, r in enumerate(rows)])
    assert batch["pixel_values_w"].shape == batch["pixel_values_l"].shape == (3, 3, 8, 8)
    assert batch["pixel_values_w"].dtype == torch.uint8  # scaled to [-1, 1] by the step, on the device
    assert torch.equal(to_unit_range(batch["pixel_values_w"])[:, 0], torch.ones(3, 8, 8))  # red: R = +1
    assert torch.equal(to_unit_range(batch["pixel_values_l"])[:, 2], torch.ones(3, 8, 8))
    assert batch["captions"] == ["c0", "c1", "c2"]
    assert batch["indices"].tolist() == [0, 1, 2] and batch["num_skipped"] == 0
    assert batch["valid"].tolist() == [True] * 3 and batch["bad_rows"] == []
    assert batch["original_sizes_w"].tolist() == [[10, 20], [10, 21], [10, 22]]
    assert batch["original_sizes_l"].tolist() == [[30, 10]] * 3
    # winner: 20x10 -> 16x8, center left 4; 21x10 -> int(8*21/10)=16 wide; 22x10 -> 17 wide, left round(4.5)=4
    assert batch["crop_top_lefts_w"].tolist() == [[0, 4], [0, 4], [0, 4]]
    assert batch["crop_top_lefts_l"].tolist() == [[8, 0]] * 3  # 10x30 -> 8x24, top 8
    for key in ("original_sizes_w", "original_sizes_l", "crop_top_lefts_w", "crop_top_lefts_l"):
        assert batch[key].dtype == torch.long and batch[key].shape == (3, 2)
    plain = collate_pairs([PairTransform(resolution=8)(r, index=i) for i, r in enumerate(rows)])
    assert "original_sizes_w" not in plain


# ---------------------------------------------------------------------------------------------
# Unpaired (Diffusion-KTO)


def test_unpaired_labels_in_every_spelling_and_collate(tmp_path):
    labels = [True, 1, "desirable", "Undesirable", 0, False]
    rows = []
    for i, label in enumerate(labels):
        (tmp_path / f"{i}.png").write_bytes(solid_png((i, 0, 0)))
        rows.append(
            {
                "caption": f"img {i}",
                "image": f"{i}.png",
                "label": label if isinstance(label, str) else int(label),
            }
        )
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = UnpairedStats()
    ds = load_unpaired_dataset(path, stats=stats, cache_dir=str(tmp_path / "cache"))
    assert [r["desirable"] for r in ds] == [True, True, True, False, False, False]
    assert (stats.seen, stats.desirable, stats.undesirable) == (6, 3, 3)
    torch_ds = make_torch_dataset(ds, UnpairedTransform(resolution=8, sdxl=True, labelled=True))
    batch = collate_unpaired([torch_ds[i] for i in range(6)])
    assert batch["pixel_values"].shape == (6, 3, 8, 8)
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [True] * 3 + [False] * 3
    assert batch["captions"] == [f"img {i}" for i in range(6)]
    assert batch["original_sizes"].tolist() == [[10, 12]] * 6 and batch["crop_top_lefts"].shape == (6, 2)
    streamed = list(load_unpaired_dataset(path, streaming=True))
    assert [r["desirable"] for r in streamed] == [True, True, True, False, False, False]

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"caption": "x", "image": "0.png", "label": "maybe"}) + "\n")
    with pytest.raises(ValueError, match="row 0: label 'maybe'"):
        load_unpaired_dataset(bad, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"missing columns \['label'\]"):
        load_unpaired_dataset(
            write_parquet(tmp_path / "x.parquet", [{"caption": "x", "image": b""}]),
            cache_dir=str(tmp_path / "cache"),
        )


def test_pairs_to_unpaired_marks_images_that_won_at_least_once(tmp_path):
    a, b, c, d = (solid_png(rgb) for rgb in [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)])
    pairs = [
        {"caption": "p0", "image_w": a, "image_l": b},  # A beats B
        {"caption": "p1", "image_w": b, "image_l": c},  # B beats C: B won once, so desirable
        {"caption": "p2", "image_w": d, "image_l": a},  # A lost here but won p0
    ]
    ds = pairs_to_unpaired(pairs)
    by_image = {row["image"]: (row["caption"], row["label"]) for row in ds}
    assert len(ds) == 4  # A and B appear twice in pairs, once here
    assert by_image == {a: ("p0", True), b: ("p0", True), c: ("p1", False), d: ("p2", True)}

    # From a loaded Pick-a-Pic source (ties dropped, swaps applied) to a parquet file and back.
    source = write_parquet(tmp_path / "pairs.parquet", pickapic_rows())
    out = pairs_to_unpaired(
        load_pair_dataset(source, cache_dir=str(tmp_path / "cache")), tmp_path / "kto.parquet"
    )
    reloaded = load_unpaired_dataset(tmp_path / "kto.parquet", cache_dir=str(tmp_path / "cache"))
    assert len(out) == len(reloaded) == 8
    for row in reloaded:
        assert row["desirable"] == (mean_rgb(row["image"])[0] == WINNER_RED)


def test_sdxl_crop_corner_is_recorded_in_the_flipped_image():
    # Non-square in both directions so that top and left both vary; a random crop of a flipped image
    # must be crop(flip(resized)) at the recorded (top, left), as SDXL's micro-conditioning expects.
    for width, height in ((40, 12), (12, 30)):
        row = {"caption": "c", "image_w": gradient_png(width, height), "image_l": gradient_png(width, height)}
        transform = PairTransform(resolution=8, center_crop=False, random_flip=True, sdxl=True, seed=9)
        resized = Image.open(io.BytesIO(row["image_w"])).resize(
            (8 * width // min(width, height), 8 * height // min(width, height)), Image.Resampling.BILINEAR
        )
        flipped = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        seen_flips = set()
        for index in range(16):
            out = transform(row, index=index)
            rng = row_rng(9, 0, index)
            rng.random()  # caption dropout draw
            flip = bool(rng.random(3)[2] < 0.5)
            seen_flips.add(flip)
            top, left = out["crop_top_left_w"]
            expected = np.asarray((flipped if flip else resized).crop((left, top, left + 8, top + 8)))
            expected = torch.from_numpy(expected.copy()).permute(2, 0, 1)
            assert torch.equal(out["pixel_values_w"], expected), (width, height, index, flip)
        assert seen_flips == {True, False}
