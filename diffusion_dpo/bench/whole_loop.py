"""Measure one whole-loop row: :func:`~diffusion_dpo.training.loop.train` itself, timed per optimizer step.

Run as ``python -m diffusion_dpo.bench.whole_loop SPEC.json RESULT.json`` by the benchmark, one fresh
process per row, as :mod:`diffusion_dpo.bench.measure` runs a step row. The step rows time
``compute_batch_loss`` + backward + clip + the step's one host sync + ``optimizer.step`` on a batch
already collated; this row runs the loop a user runs, on a Pick-a-Pic-format parquet file of JPEG pairs
written here (:func:`~diffusion_dpo.bench.loading.write_jpeg_pairs`, ``source_size`` pixels), so every
optimizer step also holds the DataLoader (decode, resize, crop, flip, collate, in the main process at
the default ``--dataloader_num_workers 0``), the learning-rate schedule, ``zero_grad``, the guards, the
monitors, the ``metrics.jsonl`` row, the progress bar and the tracker call. ``whole loop − step`` of
the same configuration is the loop's own cost per step.

How it times: torch's global optimizer hook (``register_optimizer_step_post_hook``) records
``time.perf_counter()`` after every ``optimizer.step()`` (on CUDA after ``torch.cuda.synchronize()``,
so that a gap holds the device work it waited for); a step's time is the gap between its hook and the
previous one: everything the loop does between two optimizer updates. The median of the ``steps`` gaps
after ``warmup`` optimizer steps (at least one: the first gap needs a step before it) is the row's
s/step. The hook stops ``train()`` right after the last measured step (an exception of this module's
own), so no checkpoint or final model is written: the run's last steps are not what is measured.

On CUDA one more step runs after the timed ones with ``torch.cuda.set_sync_debug_mode("warn")``: its
host syncs (as torch reports them) are the row's ``host_syncs_per_step``, as the step rows count them.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


class _Measured(Exception):
    """Raised by the hook after the last measured optimizer step: ends ``train()`` there."""


def run(spec: dict) -> dict:
    """Write the pairs, run ``train()`` for the warm-up and timed optimizer steps, and return the row's
    measurements (the keys of a step row's, plus ``optimizer_steps`` and ``metrics_rows``)."""
    import accelerate  # noqa: F401  (imported before the baseline of resident memory is read)
    import diffusers  # noqa: F401
    import peft  # noqa: F401

    from diffusion_dpo.bench.loading import write_jpeg_pairs
    from diffusion_dpo.bench.measure import _current_rss, cpu_peak_memory, memory_breakdown
    from diffusion_dpo.training import loop
    from diffusion_dpo.training.config import TrainConfig

    rss_before = _current_rss()
    cuda = spec["device"] == "cuda"
    if not cuda:  # as `accelerate launch --cpu`: a row asked for on CPU stays there on a GPU machine
        os.environ["ACCELERATE_USE_CPU"] = "1"
    warmup, steps = max(1, spec["warmup"]), spec["steps"]
    total = warmup + steps + (1 if cuda else 0)  # CUDA: one more step, whose host syncs are counted
    train_values = dict(spec["train"])
    batch = train_values["train_batch_size"] * train_values.get("gradient_accumulation_steps", 1)

    # the models train() set up (memory_breakdown reads them), by wrapping the loop's own set-up call
    held: dict = {}
    setup_models = loop.setup_models

    def holding_setup_models(*args, **kwargs):
        held["models"] = setup_models(*args, **kwargs)
        return held["models"]

    stamps: list[float] = []
    result: dict = {}
    syncs: dict = {}

    def after_optimizer_step(optimizer, args, kwargs) -> None:
        if "catcher" in syncs:  # the counted step ended: stop counting before synchronizing
            torch.cuda.set_sync_debug_mode(0)
            syncs["catcher"].__exit__(None, None, None)
            syncs["count"] = sum("synchroniz" in str(w.message) for w in syncs.pop("caught"))
            raise _Measured
        if cuda:
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        n = len(stamps)
        if n == warmup and cuda:
            torch.cuda.reset_peak_memory_stats()
        if n == warmup + steps:
            result["memory_breakdown_bytes"] = memory_breakdown(held["models"], optimizer)
            if cuda:
                result.update(
                    peak_memory_bytes=torch.cuda.max_memory_allocated(),
                    peak_memory_kind="torch.cuda.max_memory_allocated over the timed steps",
                    peak_reserved_bytes=torch.cuda.max_memory_reserved(),
                )
                syncs["catcher"] = warnings.catch_warnings(record=True)
                syncs["caught"] = syncs["catcher"].__enter__()
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            else:
                result.update(cpu_peak_memory(rss_before))
                raise _Measured

    with tempfile.TemporaryDirectory(prefix="dpo-bench-loop-") as tmp:
        # one epoch holds every step (a new epoch's loader start is not a per-step cost), no ties
        data = write_jpeg_pairs(
            Path(tmp) / "pairs.parquet",
            batch * (total + 1),
            spec.get("source_size") or train_values["resolution"],
        )
        train_values.update(dataset_name=str(data), output_dir=str(Path(tmp) / "run"), max_train_steps=total)
        cfg = TrainConfig(**train_values)
        started = time.perf_counter()
        handle = register_optimizer_step_post_hook(after_optimizer_step)
        loop.setup_models = holding_setup_models
        try:
            loop.train(cfg)
        except _Measured:
            pass
        finally:
            handle.remove()
            loop.setup_models = setup_models
        metrics_path = Path(cfg.output_dir) / "metrics.jsonl"
        metrics_rows = len(metrics_path.read_text().splitlines()) if metrics_path.is_file() else 0
    if len(stamps) < warmup + steps:
        raise RuntimeError(
            f"train() made {len(stamps)} optimizer steps of the {warmup + steps} measured "
            "(non-finite steps skip the optimizer)"
        )
    times = [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]
    result.update(
        setup_seconds=stamps[0] - started,  # train()'s set-up and its first step
        step_seconds=times,
        step_seconds_median=statistics.median(times),
        pairs_per_s=batch / statistics.median(times),
        nonfinite_steps=0,
        optimizer_steps=len(stamps) + (1 if cuda else 0),
        metrics_rows=metrics_rows,
        torch_threads=torch.get_num_threads(),
        device_name=torch.cuda.get_device_name() if cuda else "cpu",
    )
    if cuda:
        result["host_syncs_per_step"] = syncs.get("count")
    return result


def main(argv: list[str] | None = None) -> None:
    from diffusion_dpo.bench.measure import run_spec_file

    run_spec_file(run, argv)


if __name__ == "__main__":
    main()
