"""Can the data loader feed the step? ``python -m diffusion_dpo.bench --preset data`` times it.

The training step consumes pairs at the rate the compare rows report; the DataLoader has to deliver at
least that many, or the GPU waits. These rows time the trainer's own loader, built by
:func:`~diffusion_dpo.training.data_setup.build_train_data` as a run builds it: JPEG pairs decoded,
resized, center-cropped, flipped and collated (map-style and ``--streaming``), or rows read from a
latent cache, each with ``--dataloader_num_workers`` 0 and the counts asked for. A row's rate is the
pairs of ``steps`` batches over the time they took after ``warmup`` batches (the workers' start and
first batches are not counted). Nothing else runs meanwhile, so the rate is the loader's alone; a
training process shares the CPU with its own host-side work. A stream's shuffle buffer is one batch
here: its size decides memory and mixing, not the steady rate, which is one row read per row taken.

The images are JPEGs (quality 90) of ``source_size`` pixels, textured so that they compress like
photographs rather than flat drawings, about the size of Pick-a-Pic's; decoding cost grows with the
source size, so pass your data's (``--source_size``).
"""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np

from diffusion_dpo.bench.rows import select_rows


def write_jpeg_pairs(path: str | Path, n_pairs: int, size: int, seed: int = 0) -> Path:
    """A Pick-a-Pic-columned parquet file of ``n_pairs`` pairs of ``size``² JPEGs (no ties)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size] / size

    def jpeg() -> bytes:
        # smooth colour fields plus grain: JPEG sizes and decode times of photographs, not of flat shapes
        phase = rng.uniform(0, 2 * np.pi, (3, 2))
        freq = rng.uniform(2, 12, (3, 2))
        field = np.stack(
            [np.sin(freq[c, 0] * xs + phase[c, 0]) * np.cos(freq[c, 1] * ys + phase[c, 1]) for c in range(3)],
            axis=-1,
        )
        pixels = 127.5 + 90 * field + rng.normal(0, 12, (size, size, 3))
        buffer = io.BytesIO()
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        return buffer.getvalue()

    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n_pairs):
        rows["caption"].append(f"a photograph of scene number {i}, highly detailed, soft light")
        rows["jpg_0"].append(jpeg())
        rows["jpg_1"].append(jpeg())
        label = float(rng.random() < 0.5)
        rows["label_0"].append(label)
        rows["label_1"].append(1.0 - label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows), path)
    return path


def time_loader(cfg, micro_conditioning: bool, warmup: int, steps: int) -> dict:
    """Pairs per second of ``cfg``'s training DataLoader over ``steps`` batches after ``warmup`` ones;
    also how long its first batch took (worker start-up, dataset opening)."""
    from diffusion_dpo.training.data_setup import build_train_data

    data = build_train_data(cfg, micro_conditioning)
    data.start_epoch(0)
    started = time.perf_counter()
    batches = iter(data.loader)
    next(batches)
    first = time.perf_counter() - started
    for _ in range(max(warmup - 1, 0)):
        next(batches)
    t0 = time.perf_counter()
    pairs = 0
    for _ in range(steps):
        batch = next(batches)
        pairs += len(batch["captions"])
    seconds = time.perf_counter() - t0
    del batches  # stops the workers
    return {"pairs_per_s": pairs / seconds, "seconds": seconds, "first_batch_seconds": first, "pairs": pairs}


def worker_counts(spec: str | None) -> list[int]:
    """``--workers`` ("0,2,4"), or by default 0 and the powers of two up to this machine's CPU count."""
    import os

    if spec:
        counts = [int(w) for w in spec.split(",") if w.strip()]
        if not counts or min(counts) < 0:
            raise ValueError(f"--workers must list worker counts >= 0, e.g. 0,2,4; got {spec!r}")
        return counts
    cpus = os.cpu_count() or 1
    return [0] + [w for w in (1, 2, 4, 8, 16) if w <= cpus]


def data_rows(args, workers: list[int]) -> list[dict]:
    """The rows of ``--preset data``: for each worker count, images loaded whole, images streamed, and
    a latent cache; ``--rows`` picks some by name (``images_w2``, ``images_streaming_w0``, ``cache_w4``)."""
    rows = []
    for w in workers:
        rows += [
            {"name": f"images_w{w}", "source": "images", "streaming": False, "workers": w},
            {"name": f"images_streaming_w{w}", "source": "images", "streaming": True, "workers": w},
            {"name": f"cache_w{w}", "source": "cache", "streaming": False, "workers": w},
        ]
    return select_rows(rows, args.rows, [r["name"] for r in rows])


def run(args, device: str, environment: dict) -> list[dict]:
    """Time each row's DataLoader; rows as dicts (``name``, ``config``, ``pairs_per_s``, ...)."""
    import logging
    import tempfile

    from diffusion_dpo.bench import archs
    from diffusion_dpo.training.config import TrainConfig

    logger = logging.getLogger("diffusion_dpo.bench")
    arch = archs.ARCHS[args.arch]
    micro_conditioning = archs.family(args.arch).micro_conditioning
    rows = data_rows(args, worker_counts(args.workers))
    source_size = args.source_size or args.resolution
    most = max(r["workers"] for r in rows)
    # enough batches for the timed ones, what the workers prefetch (2 each), and each streaming
    # reader's last partial batch and shuffle buffer
    n_pairs = args.batch_pairs * (args.warmup + args.steps + 4 + 3 * most)
    results = []
    with tempfile.TemporaryDirectory(prefix="dpo-bench-data-") as tmp:
        source = Path(tmp) / "pairs"
        shards = min(max(8, most), n_pairs)  # a stream deals its files to its readers
        logger.info("writing %d JPEG pairs of %d px in %d files", n_pairs, source_size, shards)
        for s in range(shards):
            part = range(s * n_pairs // shards, (s + 1) * n_pairs // shards)
            write_jpeg_pairs(source / f"train-{s:05d}.parquet", len(part), source_size, seed=s)
        cache, model = None, "(not loaded: images only)"
        if any(r["source"] == "cache" for r in rows):
            model = str(archs.ensure_model(args.arch, args.model_dir))
            cache = _write_cache(args, device, model, source, Path(tmp) / "cache", max(1, n_pairs // shards))
        for i, row in enumerate(rows, 1):
            cfg = TrainConfig(
                pretrained_model_name_or_path=model, dataset_name=None if row["source"] == "cache" else str(source),
                latents_cache=cache if row["source"] == "cache" else None, resolution=args.resolution,
                train_batch_size=args.batch_pairs, dataloader_num_workers=row["workers"],
                streaming=row["streaming"], shuffle_buffer_size=args.batch_pairs, no_audit_pairs=True, seed=0,
                **arch.train_options,
            )  # fmt: skip
            config = {
                "arch": args.arch, "source": row["source"], "streaming": row["streaming"],
                "dataloader_num_workers": row["workers"], "resolution": args.resolution,
                "source_size": source_size, "train_batch_size": args.batch_pairs,
            }  # fmt: skip
            logger.info("[%d/%d] timing %s", i, len(rows), row["name"])
            out = {"name": row["name"], "config": config, "environment": environment}
            try:
                out.update(status="ok", **time_loader(cfg, micro_conditioning, args.warmup, args.steps))
            except (RuntimeError, OSError, ValueError) as err:  # a worker killed, a file unreadable
                out.update(status="failed", error=f"{type(err).__name__}: {err}")
            results.append(out)
    return results


def _write_cache(args, device: str, model: str, source: Path, out: Path, shard_size: int) -> str:
    """A latent cache of the source, encoded by the arch's model on ``device`` in the run's precision
    (on CPU, minutes for the full-size archs)."""
    from diffusion_dpo.bench import archs
    from diffusion_dpo.data.latent_cache_writer import write_latent_cache
    from diffusion_dpo.models.pretrained import quiet_loading

    precision = (
        args.mixed_precision if args.mixed_precision != "auto" else ("bf16" if device == "cuda" else "no")
    )
    options = archs.ARCHS[args.arch].train_options
    with quiet_loading():
        write_latent_cache(
            out, pretrained_model_name_or_path=model, dataset_name=str(source), resolution=args.resolution,
            mixed_precision=precision, batch_size=args.batch_pairs, shard_size=shard_size, device=device,
            drop_t5=options.get("drop_t5", False), max_sequence_length=options.get("max_sequence_length"),
        )  # fmt: skip
    return str(out)


def format_table(results: list[dict], args) -> str:
    """The data rows as a text table, with what each read and the machine."""
    first = results[0]
    env, cfg = first["environment"], first["config"]
    lines = [
        f"Data loading of the trainer's DataLoader, {args.arch}: {cfg['train_batch_size']} pairs per batch, "
        f"{cfg['resolution']} px from {cfg['source_size']} px JPEGs (quality 90) or a latent cache",
        f"pairs/s over {args.steps} batches after {args.warmup}; {env['cpu_count']} CPUs; torch {env['torch']}; "
        f"{env['date']}",
        "",
        f"{'row':<24} {'workers':>7} {'pairs/s':>9} {'first batch':>12}  source",
    ]
    lines.append("-" * len(lines[-1]))
    for r in results:
        c = r["config"]
        what = ("latent cache" if c["source"] == "cache" else "images") + (
            ", streamed" if c["streaming"] else ""
        )
        if r["status"] != "ok":
            lines.append(f"{r['name']:<24} {c['dataloader_num_workers']:>7} {r['status']}: {r['error']}")
            continue
        lines.append(
            f"{r['name']:<24} {c['dataloader_num_workers']:>7} {r['pairs_per_s']:>9.1f} "
            f"{r['first_batch_seconds']:>11.2f}s  {what}"
        )
    lines += ["", "The loader keeps up when its pairs/s is above the step's (the compare rows' pairs/s)."]
    return "\n".join(lines)
