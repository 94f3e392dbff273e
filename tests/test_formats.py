"""Pair formats: a mini-dataset in each published schema (docs/data.md cites the cards) loads, whole and
streamed, as the rows that were written (caption, which image won, p), trains through the trainer, and
the rows the trainer sees are those rows."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from trainer_runs import tiny_run_flags

from diffusion_dpo.data.formats import FORMATS, position_coin
from diffusion_dpo.data.pairs import PairConverter, PairStats, column_names, load_pair_dataset, load_rows
from diffusion_dpo.data.transforms import decode_image
from diffusion_dpo.training import loop
from diffusion_dpo.training.config import parse_config

pytestmark = pytest.mark.usefixtures("one_thread")

#: (caption, P(image 0 preferred)) of the pairs every fixture writes: decided both ways, split votes, a tie.
PAIRS = [
    ("a red cube", 1.0),
    ("a blue cone", 0.0),
    ("a green ball", 0.7),
    ("a grey ring", 0.25),
    ("a tie", 0.5),
]


def colour(i: int, side: int) -> tuple[int, int, int]:
    return (40 * i + 20, 200 if side == 0 else 60, 30 * side + 10)


def png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def expected_rows(pairs=PAIRS, keep_ties=False):
    """What the loader must give: (caption, winner's colour, p = P(winner preferred))."""
    out = []
    for i, (caption, p0) in enumerate(pairs):
        if p0 == 0.5 and not keep_ties:
            continue
        winner = 0 if p0 >= 0.5 else 1
        out.append((caption, colour(i, winner), max(p0, 1 - p0)))
    return out


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _votes(p0, n=20):
    return round(p0 * n), n - round(p0 * n)


# --- one writer per published schema ---------------------------------------------------------------


def pickapic(tmp_path):
    # Pick-a-Pic v2 / liuhuohuo2/pick-a-pic-v2 columns; only 0, 0.5, 1 are Pick-a-Pic labels
    pairs = [p for p in PAIRS if p[1] in (0.0, 0.5, 1.0)]
    rows = [
        {"caption": c, "jpg_0": png(colour(i, 0)), "jpg_1": png(colour(i, 1)), "label_0": p0, "label_1": 1 - p0,
         "model_0": "sdxl", "model_1": "dreamlike", "best_image_uid": "x", "user_id": 7}
        for i, (c, p0) in enumerate(pairs)
    ]  # fmt: skip
    return write_parquet(tmp_path / "pickapic.parquet", rows), {}, pairs


def columns_csv(tmp_path):
    (tmp_path / "img").mkdir(parents=True)
    lines = ["caption,image_0,image_1,label_0"]
    for i, (c, p0) in enumerate(PAIRS):
        for side in (0, 1):
            (tmp_path / "img" / f"{i}_{side}.png").write_bytes(png(colour(i, side)))
        lines.append(f"{c},img/{i}_0.png,img/{i}_1.png,{p0}")
    path = tmp_path / "pairs.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, {}, PAIRS


def columns_jsonl(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i, (c, p0) in enumerate(PAIRS):
        for side in (0, 1):
            (tmp_path / "img" / f"{i}_{side}.png").write_bytes(png(colour(i, side)))
        rows.append({"caption": c, "image_0": f"img/{i}_0.png", "image_1": f"img/{i}_1.png", "label_0": p0})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, {}, PAIRS


def hpdv3(tmp_path):
    # MizzenAI/HPDv3 train.json: a JSON list of {prompt, path1, path2, choice_dist, ...}, paths relative
    # to the folder the image archive is extracted into (here the JSON's own folder, as on the card)
    records = []
    for i, (c, p0) in enumerate(PAIRS):
        for side in (0, 1):
            folder = tmp_path / "images" / "flux" / f"p{i}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{side}.jpg").write_bytes(
                png(colour(i, side))
            )  # PNG bytes under .jpg: decoded by content
        # the Discord / HPDv2 pairs have choice_dist null and the winner in path1
        dist = None if p0 == 1.0 else list(_votes(p0))
        records.append({"prompt": c, "path1": f"images/flux/p{i}/0.jpg", "path2": f"images/flux/p{i}/1.jpg",
                        "model1": "flux", "model2": "kolors", "choice_dist": dist, "confidence": 0.9})  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    return path, {}, [(c, p0 if p0 == 1.0 else _votes(p0)[0] / 20) for c, p0 in PAIRS]


def hpdv3_plusplus(tmp_path):
    # Junjun2333/HPDv3-PlusPlus train_aes.json: path1 preferred, no votes; images elsewhere (--image_root)
    root = tmp_path / "HPDv3pp"
    records = []
    decided = [(c, p0) for c, p0 in PAIRS if p0 != 0.5]
    for i, (c, p0) in enumerate(decided):
        folder = root / "images" / "qwen_image" / f"prompt_{i:06d}"
        folder.mkdir(parents=True)
        win, lose = (0, 1) if p0 >= 0.5 else (1, 0)
        (folder / "6.jpg").write_bytes(png(colour(i, win)))
        (folder / "2.jpg").write_bytes(png(colour(i, lose)))
        records.append({"prompt": c, "path1": f"images/qwen_image/prompt_{i:06d}/6.jpg",
                        "path2": f"images/qwen_image/prompt_{i:06d}/2.jpg"})  # fmt: skip
    (tmp_path / "labels").mkdir()
    path = tmp_path / "labels" / "train_aes.json"
    path.write_text(json.dumps(records))
    # winner first: the expected winner is the one stored first, p = 1
    return path, {"image_root": str(root)}, [(c, 1.0 if p0 >= 0.5 else 0.0) for c, p0 in decided]


def imagereward(tmp_path):
    tmp_path.mkdir(parents=True, exist_ok=True)
    # zai-org/ImageRewardDB 8k_pair, converted to parquet: prompt, img_better, img_worse (+ ids)
    decided = [(c, p0) for c, p0 in PAIRS if p0 != 0.5]
    rows = []
    for i, (c, p0) in enumerate(decided):
        win, lose = (0, 1) if p0 >= 0.5 else (1, 0)
        rows.append({"prompt_id": f"id{i}", "prompt": c, "classification": "people",
                     "img_better": png(colour(i, win)), "img_worse": png(colour(i, lose))})  # fmt: skip
    return write_parquet(tmp_path / "ir.parquet", rows), {}, [(c, float(p0 >= 0.5)) for c, p0 in decided]


def oip_binarized(tmp_path):
    # data-is-better-together/open-image-preferences-v1-binarized: prompt, chosen, rejected
    decided = [(c, p0) for c, p0 in PAIRS if p0 != 0.5]
    rows = []
    for i, (c, p0) in enumerate(decided):
        win, lose = (0, 1) if p0 >= 0.5 else (1, 0)
        rows.append({"id": i, "prompt": c, "chosen": png(colour(i, win)), "rejected": png(colour(i, lose)),
                     "chosen_model": "flux-dev", "rejected_model": "sd3.5-large"})  # fmt: skip
    return write_parquet(tmp_path / "oip.parquet", rows), {}, [(c, float(p0 >= 0.5)) for c, p0 in decided]


def oip_votes(tmp_path):
    # Rapidata/open-image-preferences-v1-more-results: both images and the votes for each
    rows = []
    for i, (c, p0) in enumerate(PAIRS):
        v0, v1 = _votes(p0)
        rows.append({"prompt": c, "image1": png(colour(i, 0)), "image2": png(colour(i, 1)),
                     "votes_image1": v0, "votes_image2": v1, "model1": "flux", "model2": "sd"})  # fmt: skip
    return write_parquet(tmp_path / "votes.parquet", rows), {}, [(c, _votes(p0)[0] / 20) for c, p0 in PAIRS]


def _add(tar, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def webdataset(tmp_path):
    # two shards of samples KEY.jpg_0.png, KEY.jpg_1.png, KEY.json {"caption", "label_0"}
    folder = tmp_path / "shards"
    folder.mkdir()
    for shard, part in enumerate((PAIRS[:3], PAIRS[3:])):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for c, p0 in part:
                i = PAIRS.index((c, p0))
                key = f"{i:06d}"
                _add(tar, f"{key}.jpg_0.png", png(colour(i, 0)))
                _add(tar, f"{key}.jpg_1.png", png(colour(i, 1)))
                _add(tar, f"{key}.json", json.dumps({"caption": c, "label_0": p0}).encode())
    return folder, {}, PAIRS


WRITERS = {
    "pickapic": pickapic, "columns_csv": columns_csv, "columns_jsonl": columns_jsonl, "hpdv3": hpdv3,
    "hpdv3_plusplus": hpdv3_plusplus, "imagereward": imagereward, "open_image_preferences": oip_binarized,
    "open_image_preferences_votes": oip_votes, "webdataset": webdataset,
}  # fmt: skip
FORMAT_OF = {"columns_csv": "columns", "columns_jsonl": "columns", "hpdv3_plusplus": "hpdv3"}


def _seen(rows):
    out = []
    for r in rows:
        rgb = decode_image(r["image_w"]).convert("RGB").getpixel((0, 0))
        out.append((r["caption"], tuple(rgb), pytest.approx(r["p"])))
    return sorted(out)


@pytest.mark.parametrize("kind", list(WRITERS))
def test_each_format_loads_the_rows_written_whole_and_streamed(kind, tmp_path):
    source, options, pairs = WRITERS[kind](tmp_path)
    stats = PairStats()
    whole = load_pair_dataset(source, stats=stats, cache_dir=str(tmp_path / "c"), **options)
    assert stats.dataset_format == FORMAT_OF.get(kind, kind)
    assert _seen(whole) == sorted(expected_rows(pairs))
    # named explicitly too, and streamed: the same rows
    named = load_pair_dataset(
        source, dataset_format=stats.dataset_format, cache_dir=str(tmp_path / "c"), **options
    )
    assert _seen(named) == _seen(whole)
    streamed = load_pair_dataset(source, streaming=True, cache_dir=str(tmp_path / "c"), **options)
    assert _seen(streamed) == _seen(whole)
    # ties kept (soft labels): at p = 0.5, in stored order
    kept = load_pair_dataset(source, keep_ties=True, cache_dir=str(tmp_path / "c"), **options)
    assert _seen(kept) == sorted(expected_rows(pairs, keep_ties=True))
    # near-ties dropped: margins |2·p0 − 1| below 0.45 (0.7 → 0.4, 0.5 → 0), kept 0.25 → 0.5
    margin = load_pair_dataset(source, min_label_margin=0.45, cache_dir=str(tmp_path / "c"), **options)
    assert _seen(margin) == sorted(r for r in expected_rows(pairs) if abs(2 * r[2] - 1) >= 0.45)


def test_winner_first_sources_get_their_positions_from_a_seeded_coin(tmp_path):
    """HPDv3++ always stores the winner in path1: in the positional view image 0 wins about half the
    time, the same pair gets the same positions in every run, and another seed gives other positions."""
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(400):
        records.append({"prompt": f"prompt {i}", "path1": f"images/{i}_w.jpg", "path2": f"images/{i}_l.jpg"})
    (tmp_path / "train_tf.json").write_text(json.dumps(records))
    source = load_rows(tmp_path / "train_tf.json")
    fmt = FORMATS["hpdv3"]
    rows = list(source.rows)
    first = [PairConverter(fmt, str(root), seed=0).positional(r) for r in rows]
    again = [PairConverter(fmt, str(root), seed=0).positional(r) for r in rows]
    other = [PairConverter(fmt, str(root), seed=1).positional(r) for r in rows]
    image_0_wins = np.array([p["label_0"] == 1.0 for p in first])
    assert 0.42 < image_0_wins.mean() < 0.58  # a fair coin: 400 flips, ±4 standard deviations
    assert first == again and first != other
    for p, r in zip(first, rows):  # the winner is still the winner
        winner = p["image_0"] if p["label_0"] == 1.0 else p["image_1"]
        assert winner.endswith(r["path1"])
    assert position_coin(0, "c", "a.jpg", "b.jpg") == position_coin(0, "c", "a.jpg", "b.jpg")


def test_an_unknown_schema_names_the_columns_found_and_the_formats_supported(tmp_path):
    path = write_parquet(tmp_path / "odd.parquet", [{"text": "x", "left": b"", "right": b"", "winner": 0}])
    with pytest.raises(ValueError) as err:
        load_pair_dataset(path)
    message = str(err.value)
    assert "found columns ['left', 'right', 'text', 'winner']" in message and str(path) in message
    for name in FORMATS:
        assert name in message
    with pytest.raises(
        ValueError, match=r"missing columns \['prompt', 'path1', 'path2'\] for --dataset_format hpdv3"
    ):
        load_pair_dataset(path, dataset_format="hpdv3")
    with pytest.raises(ValueError, match="--dataset_format 'nope' is not one of"):
        load_pair_dataset(path, dataset_format="nope")


def test_relative_image_paths_without_a_root_fail_up_front(tmp_path):
    rows = [{"prompt": "c", "path1": "images/a.jpg", "path2": "images/b.jpg", "choice_dist": None}]
    path = write_parquet(tmp_path / "hpd.parquet", rows)
    with pytest.raises(ValueError, match="pass --image_root"):
        load_pair_dataset(path)


def test_bad_vote_shares_are_bad_rows_named_by_row(tmp_path):
    rows = [
        {"caption": "ok", "image_0": png((1, 2, 3)), "image_1": png((4, 5, 6)), "label_0": 0.6},
        {"caption": "bad", "image_0": png((1, 2, 3)), "image_1": png((4, 5, 6)), "label_0": 1.5},
    ]
    path = write_parquet(tmp_path / "p.parquet", rows)
    with pytest.raises(ValueError, match=r"row 1: label_0 1.5 is not a number in \[0, 1\]"):
        load_pair_dataset(path)
    stats = PairStats()
    assert len(load_pair_dataset(path, on_bad_example="skip", stats=stats)) == 1 and stats.bad_labels == 1


def test_webdataset_shards_split_over_two_processes_cover_every_row_once(tmp_path):
    from diffusion_dpo.data.stream import ShuffledStream
    from diffusion_dpo.data.transforms import PairTransform

    source, _, pairs = webdataset(tmp_path)
    assert "__key__" in column_names(load_rows(source, streaming=True))
    seen = []
    for rank in (0, 1):
        stream = ShuffledStream(
            load_pair_dataset(source, streaming=True, keep_ties=True), PairTransform(resolution=8), seed=0,
            buffer_size=2, num_processes=2, process_index=rank,
        )  # fmt: skip
        seen += [(e["caption"], e["p"]) for e in stream]
    assert sorted(seen) == sorted((c, max(p0, 1 - p0)) for c, p0 in pairs)


#: Trained through in the default suite (each run is a few seconds); the others under -m slow.
FAST = ("pickapic", "hpdv3", "webdataset")


@pytest.mark.parametrize(
    "kind", [k if k in FAST else pytest.param(k, marks=pytest.mark.slow) for k in WRITERS]
)
def test_the_trainer_sees_the_rows_written(kind, tmp_path, tiny_sd_path, monkeypatch, streaming=False):
    """A step of DPO through the trainer on each format: the captions, winners and p of the batch it
    trains on are the rows written (soft labels, so ties arrive at p = 0.5)."""
    source, options, pairs = WRITERS[kind](tmp_path)
    if streaming:
        options = {**options, "streaming": True, "shuffle_buffer_size": 64}
    batches = []
    real = loop.compute_batch_loss

    def recording(models, batch, cfg, **kw):
        batches.append(batch)
        return real(models, batch, cfg, **kw)

    monkeypatch.setattr(loop, "compute_batch_loss", recording)
    expected = sorted(expected_rows(pairs, keep_ties=True))
    n = len(expected)
    argv = tiny_run_flags(
        tiny_sd_path, source, tmp_path / "out", train_batch_size=n, max_train_steps=1, label_mode="soft",
        proportion_empty_prompts=0.0, no_hflip=True, no_audit_pairs=True, **options,
    )  # fmt: skip
    loop.train(parse_config(argv))
    seen = []
    for batch in batches:
        pixels = batch["pixel_values_w"]  # [B, 3, R, R] uint8
        for caption, image, p in zip(batch["captions"], pixels, batch["label_p"].tolist()):
            seen.append((caption, tuple(int(v) for v in image[:, 0, 0]), pytest.approx(p)))
    assert sorted(seen) == expected


def test_streamed_and_whole_loads_count_the_same(tmp_path):
    for writer in (imagereward, columns_csv):
        source, options, _ = writer(tmp_path / writer.__name__)
        whole, streamed = PairStats(), PairStats()
        load_pair_dataset(source, stats=whole, **options)
        list(load_pair_dataset(source, streaming=True, stats=streamed, **options))
        assert (whole.seen, whole.ties, whole.swapped, whole.split_votes) == (
            streamed.seen, streamed.ties, streamed.swapped, streamed.split_votes,
        )  # fmt: skip


@pytest.mark.parametrize("kind", ["webdataset", "hpdv3", "open_image_preferences"])
def test_a_streamed_format_resumes_at_any_batch_exactly(kind, tmp_path):
    from test_stream import _run

    source, options, _ = WRITERS[kind](tmp_path)
    rows = load_pair_dataset(source, streaming=True, keep_ties=True, **options)
    full = _run(rows)[0]
    assert full
    for k in range(len(full) + 1):
        head, position, _, _ = _run(rows, stop_after=k)
        assert head + _run(rows, position=position)[0] == full, k


def test_the_trainer_sees_the_rows_written_when_streaming(tmp_path, tiny_sd_path, monkeypatch):
    test_the_trainer_sees_the_rows_written("webdataset", tmp_path, tiny_sd_path, monkeypatch, streaming=True)
