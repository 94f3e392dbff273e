"""What the processes of a run exchange: one optimizer step's sums, reduced once (:class:`StepWindow`,
the loop's one collective per step), the bad rows gathered when there are some, the stream positions
gathered for a checkpoint, and the end of a stream's epoch agreed (:func:`synchronized`).

Every function here is a collective where more than one process runs: every process calls it, in the
same order.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class StepWindow:
    """Sums what the micro-batches of one optimizer step report, then reduces it over processes once.

    Per optimizer step this is the loop's only exchange with the device: the metrics of each
    micro-batch are stacked into one vector on the device (one stack, one multiply, one add, whatever
    their number), the row counts and the stop flag stay Python numbers (sent along only where the
    processes must sum them), and :meth:`reduce` reads everything in one ``tolist``."""

    def __init__(self):
        self.keys: list[str] | None = None  # the metrics' names, sorted, from the first micro-batch
        self.sums: Tensor | float = 0.0  # [len(keys)]: each metric's sum over valid rows
        self.valid = self.rows = self.skipped = 0
        self.nonfinite: Tensor | bool = False  # a tensor once added to: no host sync per micro-batch
        self.bad_rows: list[dict] = []

    def add(self, loss: Tensor, metrics: dict[str, Tensor], batch: dict) -> None:
        n = len(batch["captions"])
        valid = int(batch["valid"].sum()) if "valid" in batch else n
        keys = sorted(metrics)
        if self.keys is None:
            self.keys = keys
        elif keys != self.keys:
            raise ValueError(f"a micro-batch reported the metrics {keys}, the step's first {self.keys}")
        # metrics are means over the valid rows: weight them by their count
        self.sums = self.sums + torch.stack([metrics[k].detach().float() for k in keys]) * valid
        self.valid += valid
        self.rows += n
        self.skipped += n - valid
        self.bad_rows.extend(batch.get("bad_rows", []))
        self.nonfinite = ~torch.isfinite(loss.detach()) | self.nonfinite

    def reduce(self, accelerator, stop: bool, grad_norm: Tensor | float | None = None) -> dict:
        """All processes' totals: ``metrics`` (means over valid rows; None where no row was valid),
        ``rows``, ``skipped``, ``nonfinite`` (any process), ``stop`` (any process), and this process's
        ``grad_norm`` (NaN if None), read in the same host sync."""
        keys = self.keys or []
        device = accelerator.device
        sums = torch.as_tensor(self.sums, device=device, dtype=torch.float32).reshape(-1)[: len(keys)]
        nonfinite = torch.as_tensor(self.nonfinite, device=device).float().reshape(1)
        norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, device=device)
        counts = [float(self.valid), float(self.rows), float(self.skipped), float(stop)]
        if accelerator.num_processes > 1:  # the counts and the stop flag are summed with the metrics
            host = torch.tensor(counts, dtype=torch.float32)
            packed = torch.cat([sums, nonfinite, host.to(device)])
            packed = accelerator.reduce(packed, reduction="sum")
            # the one host sync of the step: nothing before it in the step reads a value off the device
            values = torch.cat([packed, norm.detach().float().reshape(1)]).tolist()
            nonfinite_any, (valid, rows, skipped, stop_any, norm_value) = values[len(keys)], values[-5:]
        else:  # one process: its counts are the totals, on the host already
            values = torch.cat([sums, nonfinite, norm.detach().float().reshape(1)]).tolist()
            nonfinite_any, norm_value = values[len(keys)], values[-1]
            valid, rows, skipped, stop_any = counts
        metrics = {k: (values[i] / valid if valid else None) for i, k in enumerate(keys)}
        return {
            "metrics": metrics, "rows": int(rows), "skipped": int(skipped), "nonfinite": nonfinite_any > 0,
            "stop": stop_any > 0, "grad_norm": norm_value,
        }  # fmt: skip


def gather_bad_rows(accelerator, local: list[dict]) -> list[dict]:
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return gather_object(local)


def stream_position(accelerator, data, reader_states: dict, last_reader) -> dict:
    """The stream position of all processes (a collective: every process calls it)."""
    mine = [{"readers": reader_states, "last_reader": last_reader}]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    readers = {}
    for part in mine:
        readers.update({str(r): s for r, s in part["readers"].items()})
    return {
        "readers": readers, "last_reader": [part["last_reader"] for part in mine],
        "num_processes": accelerator.num_processes, "num_workers": data.num_workers,
    }  # fmt: skip


def synchronized(loader, accelerator, streaming: bool):
    """The loader's batches while every process has one. Map-style data gives every process the same
    number of batches by construction; streams run dry at different times, and a process that went on
    alone would wait forever in the next gradient all-reduce, so the epoch ends for all together."""
    if not streaming or accelerator.num_processes == 1:
        yield from loader
        return
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        have = torch.tensor([float(batch is not None)], device=accelerator.device)
        if accelerator.reduce(have, reduction="sum").item() < accelerator.num_processes:
            return
        yield batch
