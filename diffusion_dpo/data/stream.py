"""A streamed training set (``--streaming``): shuffled, split across processes and DataLoader workers,
and resumable from a saved position without reading the stream again.

Pick-a-Pic v2 is ~335 GB: users stream it, train on it for days, and get preempted. The datasets
library can save an iterable dataset's position, but its shuffle buffer is lost on resume (a resumed
run then differs from the uninterrupted one), and with DataLoader workers the position lives in the
workers. This module keeps the order a pure function of the seed and the epoch, with a small state:

- **readers**: every DataLoader worker of every process is one reader (``R = processes × workers``);
  reader ``r`` is worker ``w`` of process ``p``, ``r = p·W + w``.
- **shards**: the source's shards (parquet files, or row groups after ``reshard()``) are permuted by
  ``(seed, epoch)`` and dealt round-robin to the readers. With fewer shards than readers, every
  reader reads every shard and keeps every R-th row (correct, but each row is read R times; a
  warning says so).
- **blocks**: a reader reads its rows in blocks of ``buffer_size`` and yields each block in a
  permutation drawn from ``(seed, epoch, reader, shard, block)``: a shuffle as local as a buffer of
  that size, but exactly reproducible.
- **state** (carried by each example, kept by the training loop for the batches it consumed): the
  reader's shard, the datasets-library state of that shard at the start of the current block, the
  block number and how many of its rows were yielded. A resume loads the shard state (the datasets
  library skips everything before it without handing out rows), re-reads at most one block of raw,
  undecoded rows, and skips the ones already trained on without decoding them.
- **row index** (the key of a row's augmentation and noise): ``rows yielded by the reader × R + r``,
  unique within an epoch.

With ``max_rows`` (``--max_train_samples``) every epoch reads the same rows: the shard order is then
seeded by the seed alone, and each reader stops after its share of ``max_rows``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from diffusion_dpo.data.transforms import TransformedRows

logger = logging.getLogger(__name__)

_PURPOSE_SHARDS = 0x5A4D
_PURPOSE_BLOCK = 0xB10C
#: Key under which each example carries its reader and the reader's state after it.
STREAM_KEY = "_stream"


class ShuffledStream(TransformedRows, torch.utils.data.IterableDataset):
    """Transformed training rows from a ``datasets.IterableDataset`` (see the module docstring).

    Args:
        source: the normalised rows (e.g. from ``load_pair_dataset(..., streaming=True)``).
        transform: ``transform(row, index=, epoch=) -> example``; a :class:`BadRowError` becomes
            ``transform.placeholder(index, reason)`` with ``on_bad_example="skip"``.
        seed: seeds the shard order and the block permutations.
        buffer_size: rows per shuffled block (memory: one block of encoded rows per reader).
        num_processes, process_index: this process's place among the training processes.
        max_rows: read at most this many rows per epoch, the same rows every epoch.
        on_bad_example: ``"error"`` or ``"skip"``.
    """

    def __init__(
        self,
        source,
        transform: Callable[..., dict],
        *,
        seed: int = 0,
        buffer_size: int = 1000,
        num_processes: int = 1,
        process_index: int = 0,
        max_rows: int | None = None,
        on_bad_example: str = "error",
    ):
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        super().__init__(source, transform, on_bad_example=on_bad_example)
        self.seed = seed
        self.buffer_size = buffer_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.max_rows = max_rows
        self.resume_states: dict[int, dict] = {}
        self.rotation = 0
        #: Raw rows this process pulled from the source (with num_workers=0; for tests and logs).
        self.rows_read = 0

    # ---- configuration ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.resume_states, self.rotation = {}, 0  # a saved position belongs to its epoch
        self.epoch = int(epoch)

    def resume(self, epoch: int, states: dict[int, dict], rotation: int = 0) -> None:
        """Continue ``epoch`` from the readers' saved ``states`` (reader id → state, as carried by the
        examples). ``rotation``: which of this process's readers is due first (the one after the reader
        of the last consumed batch; DataLoader workers take turns)."""
        self.epoch = int(epoch)
        self.resume_states = {int(k): v for k, v in states.items()}
        self.rotation = int(rotation)

    # ---- the order ----------------------------------------------------------------------------
    def _shard_order(self) -> np.ndarray:
        epoch = 0 if self.max_rows is not None else self.epoch  # a fixed subset: a fixed shard order
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _PURPOSE_SHARDS]))
        return rng.permutation(self.source.num_shards)

    def _plan(self, reader: int, num_readers: int) -> tuple[list[int], int, int]:
        """(shards this reader reads, in order; keep every `stride`-th row; starting at `offset`)."""
        order = self._shard_order().tolist()
        if len(order) >= num_readers:
            return order[reader::num_readers], 1, 0
        return order, num_readers, reader

    def _quota(self, reader: int, num_readers: int) -> int | None:
        """Rows this reader reads per epoch (its share of ``max_rows``), or None for all."""
        if self.max_rows is None:
            return None
        return self.max_rows // num_readers + (reader < self.max_rows % num_readers)

    # ---- iteration ----------------------------------------------------------------------------
    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        num_workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        num_readers = self.num_processes * num_workers
        reader = self.process_index * num_workers + (worker_id + self.rotation) % num_workers
        shards, stride, offset = self._plan(reader, num_readers)
        if stride > 1 and reader == 0:
            logger.warning(
                "the stream has %d shards for %d readers (processes × DataLoader workers): every reader "
                "reads every shard and keeps 1 row in %d; split the data into more files for speed",
                len(shards), num_readers, stride,
            )  # fmt: skip
        state = self.resume_states.get(reader)
        quota = self._quota(reader, num_readers)
        yielded = state["yielded"] if state else 0
        read = state["read"] if state else 0  # kept rows read before the current block
        for k in range(state["shard"] if state else 0, len(shards)):
            resuming = state is not None and k == state["shard"]
            blocks = self._blocks(shards[k], stride, offset, state if resuming else None, quota, read)
            for block_no, block_state, position, read_before, rows in blocks:
                order = np.random.default_rng(
                    np.random.SeedSequence(
                        [self.seed, self.epoch, reader, shards[k], block_no, _PURPOSE_BLOCK]
                    )
                ).permutation(len(rows))
                taken = state["taken"] if resuming and block_no == state["block"] else 0
                for j in range(taken, len(rows)):
                    index = yielded * num_readers + reader
                    yielded += 1
                    example = self._example(rows[order[j]], index)
                    example[STREAM_KEY] = {
                        "reader": reader,
                        "state": {
                            "epoch": self.epoch, "shard": k, "source": block_state, "position": position,
                            "read": read_before, "block": block_no, "taken": j + 1, "yielded": yielded,
                        },
                    }  # fmt: skip
                    yield example
                read = read_before + len(rows)
            if quota is not None and read >= quota:
                return

    def _blocks(
        self, shard_id: int, stride: int, offset: int, state: dict | None, quota: int | None, read: int
    ):
        """Blocks of up to ``buffer_size`` kept rows of one shard: ``(block number, datasets state at the
        block's start, row position at the block's start, kept rows read before it, rows)``; from
        ``state``'s block if given. With a ``quota``, stops once ``quota`` kept rows were read."""
        shard = self.source.shard(num_shards=self.source.num_shards, index=shard_id)
        block_no, position, block_state = 0, 0, None
        if state is not None:
            block_no, position, block_state, read = (
                state["block"],
                state["position"],
                state["source"],
                state["read"],
            )
            if block_state is not None:
                shard.load_state_dict(block_state)
        # iter(batch_size=1) reads the shard in this process, not split again across DataLoader workers
        rows_iter = shard.iter(batch_size=1)
        try:
            while quota is None or read < quota:
                size = self.buffer_size if quota is None else min(self.buffer_size, quota - read)
                rows, start_position = [], position
                for batch in rows_iter:
                    self.rows_read += 1
                    keep = position % stride == offset
                    position += 1
                    if keep:
                        rows.append({key: values[0] for key, values in batch.items()})
                        if len(rows) == size:
                            break
                if not rows:
                    return
                yield block_no, block_state, start_position, read, rows
                read += len(rows)
                # the next block starts where this one ended: the shard's state now
                block_no, block_state = block_no + 1, shard.state_dict()
        finally:
            rows_iter.close()


class StreamCollate:
    """Wraps a collate function: removes each example's stream state and attaches the last one to the
    batch as ``batch["stream"] = {"reader": r, "state": {...}}`` (a batch comes from one reader)."""

    def __init__(self, collate: Callable[[list[dict]], dict]):
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict:
        states = [e.pop(STREAM_KEY) for e in examples]
        batch = self.collate(examples)
        batch["stream"] = states[-1]
        return batch


def rotation_after(last_reader: int | None, process_index: int, num_workers: int) -> int:
    """Which worker's turn it is after the batch of ``last_reader`` (see :meth:`ShuffledStream.resume`)."""
    if last_reader is None or num_workers <= 1:
        return 0
    return (last_reader - process_index * num_workers + 1) % num_workers
