"""The order of a map-style training set across processes: one seeded permutation per epoch, shared.

accelerate's prepared data loaders shard batches by process, but they resume by counting batches per
process (wrong after a change of GPU count) and end an epoch with an extra, partial accumulation step.
This sampler makes the order a function of ``(seed, epoch)`` and the position a single number, the
rows consumed by all processes together, so that

- N processes with B rows per micro-batch read exactly the rows one process with N·B rows reads, in
  the same groups (process ``r`` takes slice ``r`` of each group of N·B rows);
- a resume starts at any row position, with any number of processes, without loading the rows before
  it (the DataLoader never sees their indices).
"""

from __future__ import annotations

import numpy as np
import torch

#: Separates the epoch permutation's seed from the per-row generators of the same seed.
_PURPOSE_ORDER = 0x0DE7


class ShardedBatchSampler(torch.utils.data.Sampler):
    """This process's micro-batches of a seeded, per-epoch permutation shared by all processes.

    Args:
        num_rows: rows in the dataset.
        batch_size: rows per process per micro-batch (B).
        num_processes, process_index: N and this process's rank.
        seed: with the epoch, seeds the permutation (``shuffle``) — the same on every process.
        shuffle: False reads the rows in stored order (held-out evaluation).

    Each ``__iter__`` yields lists of B row indices, group after group of N·B rows, from the row
    position set by :meth:`set_start` (0 by default) to the last complete group of the epoch.
    """

    def __init__(
        self,
        num_rows: int,
        batch_size: int,
        *,
        num_processes: int = 1,
        process_index: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if batch_size < 1 or num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(
                f"batch_size {batch_size}, num_processes {num_processes}, process_index {process_index}"
            )
        self.num_rows = int(num_rows)
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start = 0

    @property
    def group_size(self) -> int:
        """Rows all processes consume per micro-step (N·B)."""
        return self.batch_size * self.num_processes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def set_start(self, rows_done: int) -> None:
        """Start the next iteration after ``rows_done`` rows of the epoch's order (all processes)."""
        self.start = int(rows_done)

    def order(self) -> np.ndarray:
        """The epoch's row order ``[num_rows]``."""
        if not self.shuffle:
            return np.arange(self.num_rows)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, _PURPOSE_ORDER]))
        return rng.permutation(self.num_rows)

    def __len__(self) -> int:
        return max(0, (self.num_rows - self.start) // self.group_size)

    def __iter__(self):
        order = self.order()
        first = self.process_index * self.batch_size
        for group in range(self.start, self.num_rows - self.group_size + 1, self.group_size):
            yield order[group + first : group + first + self.batch_size].tolist()
