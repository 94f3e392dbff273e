"""The training order: the shared shuffled order of map-style data across processes, and the
shuffled, sharded stream that resumes from a saved position without reading the stream again."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffusion_dpo.data.order import ShardedBatchSampler
from diffusion_dpo.data.stream import ShuffledStream, StreamCollate, rotation_after

SHARD_SIZES = (7, 5, 9)  # uneven on purpose: readers run dry at different times


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    import datasets

    folder = tmp_path_factory.mktemp("shards")
    for f, n in enumerate(SHARD_SIZES):
        table = pa.table({"caption": [f"f{f}r{i}" for i in range(n)]})
        pq.write_table(table, folder / f"train-{f:05d}.parquet", row_group_size=3)
    return datasets.load_dataset("parquet", data_dir=str(folder), split="train", streaming=True)


class _Identity:
    """A transform that records what it was asked to decode."""

    def __init__(self):
        self.decoded = []

    def __call__(self, row, *, index, epoch):
        self.decoded.append(row["caption"])
        return {"caption": row["caption"], "index": index}

    def placeholder(self, index, reason):
        return {"caption": "", "index": index}


def _collate(examples):
    return {"captions": [e["caption"] for e in examples], "indices": [e["index"] for e in examples]}


def _run(source, *, workers=0, epoch=0, stop_after=None, position=None, processes=1, rank=0, **kw):
    """Iterate like the trainer: keep each consumed batch's reader state; optionally stop after k
    batches. Returns (batches as caption tuples, the position a checkpoint would save, the stream)."""
    transform = _Identity()
    stream = ShuffledStream(
        source, transform, seed=3, buffer_size=4, num_processes=processes, process_index=rank, **kw
    )
    stream.set_epoch(epoch)
    if position is not None:
        rotation = rotation_after(position["last"], rank, max(workers, 1))
        stream.resume(epoch, position["readers"], rotation)
    loader = torch.utils.data.DataLoader(
        stream, batch_size=2, collate_fn=StreamCollate(_collate), num_workers=workers, drop_last=True
    )
    batches, readers, last = [], {}, None
    for i, batch in enumerate(loader):
        if stop_after is not None and i == stop_after:
            break
        batches.append(tuple(batch["captions"]))
        readers[batch["stream"]["reader"]], last = batch["stream"]["state"], batch["stream"]["reader"]
    return batches, {"readers": readers, "last": last}, stream, transform


def test_stream_is_shuffled_seeded_and_reshuffled_each_epoch(source):
    rows = [c for b in _run(source)[0] for c in b]
    in_file_order = [f"f{f}r{i}" for f, n in enumerate(SHARD_SIZES) for i in range(n)]
    assert len(set(rows)) == len(rows) == 20  # 21 rows, the reader's incomplete last batch dropped
    assert set(rows) <= set(in_file_order)
    assert rows != in_file_order[: len(rows)]  # not read in file order (the defect this replaces)
    assert rows == [c for b in _run(source)[0] for c in b]  # same seed, same order
    epoch1 = [c for b in _run(source, epoch=1)[0] for c in b]
    assert epoch1 != rows and set(epoch1) <= set(in_file_order)


@pytest.mark.parametrize("workers", [0, 2], ids=["main-process", "2-workers"])
def test_resume_at_any_batch_continues_exactly(source, workers):
    """Every stop position, including after a reader ran dry near the epoch's end: the resumed
    iteration yields exactly the rest of the uninterrupted one, in the same order."""
    full = _run(source, workers=workers)[0]
    for k in range(len(full) + 1):
        head, position, _, _ = _run(source, workers=workers, stop_after=k)
        tail = _run(source, workers=workers, position=position)[0]
        assert head + tail == full, k


def test_resume_reads_nothing_before_the_saved_block_and_decodes_only_new_rows(source):
    full, _, _, _ = _run(source)
    head, position, _, _ = _run(source, stop_after=5)
    _, _, stream, transform = _run(source, position=position)
    trained_before = {c for b in head for c in b}
    assert not trained_before & set(transform.decoded)  # no row already trained on is decoded again
    rows_after = sum(len(b) for b in full) - sum(len(b) for b in head)
    # raw rows pulled from the source: the rest of the epoch, plus at most the saved block re-read
    # (≤ buffer_size) and the dropped tail; never the ~10 rows before the position
    assert stream.rows_read <= rows_after + 4 + 1


def test_processes_read_disjoint_rows(source):
    seen = [{c for b in _run(source, processes=2, rank=r)[0] for c in b} for r in range(2)]
    assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_fewer_shards_than_readers_strides_rows(source):
    # 3 shards, 4 readers: each reads every shard and keeps one row in four
    seen = [{c for b in _run(source, processes=4, rank=r)[0] for c in b} for r in range(4)]
    assert all(seen) and sum(map(len, seen)) == len(set().union(*seen))


def test_max_rows_is_the_same_subset_every_epoch(source):
    epochs = [[c for b in _run(source, epoch=e, max_rows=6)[0] for c in b] for e in range(3)]
    assert all(len(e) == 6 for e in epochs)
    assert set(epochs[0]) == set(epochs[1]) == set(epochs[2])


def test_sharded_sampler_n_processes_equal_one_process_with_n_times_the_batch():
    one = list(ShardedBatchSampler(23, 4, seed=5))
    parts = [list(ShardedBatchSampler(23, 2, num_processes=2, process_index=r, seed=5)) for r in range(2)]
    assert [a + b for a, b in zip(*parts, strict=True)] == one
    assert sorted(i for b in one for i in b) != list(range(20))  # shuffled
    resumed = ShardedBatchSampler(23, 2, num_processes=2, process_index=1, seed=5)
    resumed.set_start(8)  # two groups of 4 rows consumed
    assert list(resumed) == parts[1][2:]
    # a resume with another number of processes starts at the same row of the same order
    other = ShardedBatchSampler(23, 4, seed=5)
    other.set_start(8)
    assert list(other) == one[2:]
    epoch1 = ShardedBatchSampler(23, 4, seed=5)
    epoch1.set_epoch(1)
    assert list(epoch1) != one
