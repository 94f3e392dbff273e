"""Build the training rows of this process (and the held-out loader), resumable at a saved position."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)


def _load_rows_and_transform(
    dataset_name,
    *,
    split: str,
    resolution: int,
    sdxl: bool,
    seed: int,
    train: bool,
    kto: bool,
    images_only: bool,
    random_crop: bool,
    hflip: bool,
    proportion_empty_prompts: float,
    streaming: bool,
    keep_ties: bool,
    max_samples: int | None,
    cache_dir: str | None,
    on_bad_example: str,
    pair_options: dict | None = None,
):
    """(rows, transform, collate, load-time stats) of a pair, unpaired (KTO) or caption/image source.
    ``pair_options``: more ``load_pair_dataset`` arguments for a pair source (``dataset_format``,
    ``image_root``, ``min_label_margin``)."""
    from diffusion_dpo.data.pairs import PairStats, load_pair_dataset
    from diffusion_dpo.data.transforms import PairTransform, collate_pairs

    transform_args = dict(
        resolution=resolution,
        center_crop=not (random_crop and train),
        random_flip=hflip and train,
        proportion_empty_prompts=proportion_empty_prompts if train else 0.0,
        sdxl=sdxl,
        seed=seed,
    )
    # a stream's subset is chosen by the stream itself (ShuffledStream's max_rows)
    load_args = dict(
        split=split, streaming=streaming, max_train_samples=None if streaming else max_samples,
        cache_dir=cache_dir, seed=seed, on_bad_example=on_bad_example,
    )  # fmt: skip
    if kto or images_only:
        from diffusion_dpo.data.unpaired import (
            UnpairedStats,
            UnpairedTransform,
            collate_unpaired,
            load_caption_dataset,
            load_unpaired_dataset,
        )

        if kto:
            stats = UnpairedStats()
            rows = load_unpaired_dataset(dataset_name, stats=stats, **load_args)
        else:
            stats = None
            rows = load_caption_dataset(dataset_name, **load_args)
        return rows, UnpairedTransform(**transform_args, labelled=kto), collate_unpaired, stats
    stats = PairStats()
    rows = load_pair_dataset(
        dataset_name, keep_ties=keep_ties, stats=stats, **load_args, **(pair_options or {})
    )
    return rows, PairTransform(**transform_args), collate_pairs, stats


def make_loader(
    dataset_name,
    *,
    split: str = "train",
    resolution: int,
    batch_size: int,
    sdxl: bool,
    seed: int = 0,
    kto: bool = False,
    images_only: bool = False,
    keep_ties: bool = False,
    max_samples: int | None = None,
    cache_dir: str | None = None,
    num_workers: int = 0,
    on_bad_example: str = "error",
) -> torch.utils.data.DataLoader:
    """A DataLoader of held-out pairs (or unpaired images with ``kto``) in stored order: center crops, no
    flips, no caption dropout, every complete and incomplete batch."""
    from diffusion_dpo.data.transforms import make_torch_dataset

    rows, transform, collate, _ = _load_rows_and_transform(
        dataset_name, split=split, resolution=resolution, sdxl=sdxl, seed=seed, train=False, kto=kto,
        images_only=images_only, random_crop=False, hflip=False, proportion_empty_prompts=0.0,
        streaming=False, keep_ties=keep_ties, max_samples=max_samples, cache_dir=cache_dir,
        on_bad_example=on_bad_example,
    )  # fmt: skip
    dataset = make_torch_dataset(rows, transform, on_bad_example=on_bad_example)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, collate_fn=collate, num_workers=num_workers
    )


def is_caption_image_dataset(dataset_name: str, split: str = "train", cache_dir: str | None = None) -> bool:
    """True for a plain ``caption, image`` dataset (no pair columns, no KTO label)."""
    from diffusion_dpo.data.pairs import column_names, load_rows

    names = set(column_names(load_rows(dataset_name, split, streaming=True, cache_dir=cache_dir)))
    return "image" in names and not names & {"jpg_0", "image_w", "label"}


def open_fitting_cache(cfg: TrainConfig):
    """``(cache, family)``: the run's latent cache (``--latents_cache``), opened and checked against the
    run's model, text encoding, resolution and data, and the model's family. Cheap (manifests only), so
    the loop calls it before loading any model: a wrong cache is refused before minutes of loading."""
    from diffusion_dpo.data import latent_cache
    from diffusion_dpo.models.families import family_for_index
    from diffusion_dpo.models.pretrained import read_model_index

    cache = latent_cache.open_latent_cache(cfg.latents_cache)
    family = family_for_index(
        read_model_index(cfg.pretrained_model_name_or_path, cfg.revision), cfg.pretrained_model_name_or_path,
        **cfg.family_options(),
    )  # fmt: skip
    latent_cache.check_cache_fits(
        cache, resolution=cfg.resolution, text_encoding=family.text_encoding_settings(),
        keep_ties=cfg.keep_ties, hflip=not cfg.no_hflip,
        model=latent_cache.model_identity(
            cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.vae_model_name_or_path
        ),
        dataset_name=cfg.dataset_name, split=cfg.dataset_split,
    )  # fmt: skip
    return cache, family


def _load_cached_rows(cfg: TrainConfig):
    """(rows, transform, collate, load-time stats) of a latent cache (``--latents_cache``): the rows of the
    source it was made from, in the same positions, so that everything after is as for images."""
    from diffusion_dpo.data import latent_cache
    from diffusion_dpo.data.pairs import PairStats, bad_label_error, sample_rows
    from diffusion_dpo.training.models import weight_dtype_for

    cache, family = open_fitting_cache(cfg)
    weight = weight_dtype_for(cfg.mixed_precision)
    vae = family.vae_dtype(weight, own_vae=not cfg.vae_model_name_or_path)  # SDXL's own VAE: fp32
    expected = {"latents": str(vae).removeprefix("torch."), "text": str(weight).removeprefix("torch.")}
    if cache.settings["dtypes"] != expected:
        logger.warning(
            "latent cache %s was encoded in %s; encoding on the fly in this run would use %s (--mixed_precision "
            "%s): the cached values differ from those by rounding only",
            cfg.latents_cache, cache.settings["dtypes"], expected, cfg.mixed_precision,
        )  # fmt: skip
    counts = cache.manifest["stats"]
    stats = PairStats(
        seen=counts["pairs_read"], ties=counts["ties"], swapped=counts["swapped"],
        bad_labels=counts["bad_labels"], bad_label_rows=[tuple(r) for r in counts["bad_label_rows"]],
    )  # fmt: skip
    if stats.bad_labels and cfg.on_bad_example == "error":  # loading the images would have refused them
        raise bad_label_error(
            stats.bad_label_rows, "pairs", f"the source of latent cache {cfg.latents_cache}"
        )
    rows = cache.rows(streaming=cfg.streaming)
    if not cfg.streaming:  # the source's seeded subset (a stream's is chosen by ShuffledStream)
        kept = sample_rows(len(rows), cfg.max_train_samples, cfg.seed)
        if len(kept) < len(rows):
            rows = rows.select(kept)
    transform = latent_cache.CachedPairTransform(
        cache,
        seed=cfg.seed,
        random_flip=not cfg.no_hflip,
        proportion_empty_prompts=cfg.proportion_empty_prompts,
    )
    logger.info(
        "training from latent cache %s: %d pairs of %s encoded by %s",
        cfg.latents_cache, cache.num_rows, cache.settings["source"]["dataset_name"],
        cache.settings["model"]["pretrained_model_name_or_path"],
    )  # fmt: skip
    return rows, transform, latent_cache.collate_cached_pairs, stats


def _log_labels(cfg: TrainConfig, stats) -> None:
    """Say what the labels hold and what this run does with them (split votes thrown away by hard labels)."""
    decided = stats.seen - stats.bad_labels
    if not decided:
        return
    logger.info(
        "labels of %s (%s format): %d pairs, %d ties (%s), %d with split votes, %d near-ties dropped; "
        "--label_mode %s%s",
        cfg.dataset_name, stats.dataset_format, decided, stats.ties,
        "kept" if cfg.effective_keep_ties else "dropped", stats.split_votes, stats.near_ties, cfg.label_mode,
        " (split votes train as p = 1: --label_mode soft keeps them)"
        if cfg.label_mode == "hard" and stats.split_votes else "",
    )  # fmt: skip


@dataclass
class TrainData:
    """The training rows of this process: its DataLoader, and how to start an epoch at a position.

    A position (what a checkpoint saves) is ``{"rows_done": n}`` for a map-style dataset (rows of the
    epoch's order consumed by all processes together) or, for a stream, ``{"readers": {reader id:
    state}, "last_reader": [one per process], "num_processes": N, "num_workers": W}``.
    """

    loader: torch.utils.data.DataLoader
    dataset: torch.utils.data.Dataset
    sampler: object | None  # ShardedBatchSampler (map-style) or None (stream)
    #: Load-time counts (PairStats / UnpairedStats: ties, bad labels), None for caption datasets.
    stats: object | None
    streaming: bool
    num_processes: int
    process_index: int
    num_workers: int

    def start_epoch(self, epoch: int, position: dict | None = None) -> str | None:
        """Prepare ``epoch``'s iteration from ``position`` (None: its start); returns a log line
        saying where a resumed epoch continues."""
        self.dataset.set_epoch(epoch)
        if not self.streaming:
            self.sampler.set_epoch(epoch)
            rows_done = position["rows_done"] if position else 0
            self.sampler.set_start(rows_done)
            if position:
                return (
                    f"resuming at row {rows_done} of epoch {epoch}'s shuffled order "
                    "(the rows before it are skipped by index, never loaded)"
                )
            return None
        if not position:
            return None
        from diffusion_dpo.data.stream import rotation_after

        # 0 and 1 DataLoader workers both make one reader per process
        saved = (position["num_processes"], max(1, position["num_workers"]))
        if saved != (self.num_processes, max(1, self.num_workers)):
            raise ValueError(
                f"the checkpoint's stream position was saved by {saved[0]} processes × {saved[1]} "
                f"DataLoader workers, and each reader's place in the stream depends on that layout; "
                f"resume with --dataloader_num_workers {saved[1]} on {saved[0]} processes"
            )
        workers = max(1, self.num_workers)
        mine = range(self.process_index * workers, (self.process_index + 1) * workers)
        states = {int(r): s for r, s in position["readers"].items() if int(r) in mine}
        last = position["last_reader"][self.process_index]
        self.dataset.resume(epoch, states, rotation_after(last, self.process_index, workers))
        where = ", ".join(
            f"reader {r}: shard {s['shard']} block {s['block']} row {s['taken']}"
            for r, s in sorted(states.items())
        )
        return (
            f"resuming the stream of epoch {epoch} from its saved position ({where or 'start'}); the data "
            "before each block is skipped by the datasets library, not read again"
        )


def build_train_data(
    cfg: TrainConfig,
    micro_conditioning: bool = False,
    num_processes: int = 1,
    process_index: int = 0,
    *,
    is_sdxl: bool | None = None,
    pin_memory: bool = False,
) -> TrainData:
    """This process's training rows: shuffled pairs (or unpaired images for ``objective: kto``; for
    ``sft`` also plain ``caption, image`` datasets, e.g. to pretrain a base model), map-style or streamed;
    from the images, or from a latent cache (``--latents_cache``) whose batches carry latents and text
    embeddings instead of pixels. ``micro_conditioning`` (the family's; ``is_sdxl`` is its older name):
    rows also carry each image's original size and crop (SDXL). ``pin_memory`` (training on CUDA): batches
    arrive in page-locked memory, which the step copies to the GPU without blocking
    (:func:`~diffusion_dpo.transfer.to_device`)."""
    is_sdxl = micro_conditioning if is_sdxl is None else is_sdxl
    from diffusion_dpo.data.order import ShardedBatchSampler
    from diffusion_dpo.data.stream import ShuffledStream, StreamCollate
    from diffusion_dpo.data.transforms import make_torch_dataset

    objective = cfg.effective_objective
    if cfg.latents_cache:
        rows, transform, collate, stats = _load_cached_rows(cfg)
    else:
        images_only = objective == "sft" and is_caption_image_dataset(
            cfg.dataset_name, cfg.dataset_split, cfg.cache_dir
        )
        rows, transform, collate, stats = _load_rows_and_transform(
            cfg.dataset_name, split=cfg.dataset_split, resolution=cfg.resolution, sdxl=is_sdxl, seed=cfg.seed,
            train=True, kto=objective == "kto", images_only=images_only, random_crop=cfg.random_crop,
            hflip=not cfg.no_hflip, proportion_empty_prompts=cfg.proportion_empty_prompts,
            streaming=cfg.streaming, keep_ties=cfg.effective_keep_ties, max_samples=cfg.max_train_samples,
            cache_dir=cfg.cache_dir, on_bad_example=cfg.on_bad_example,
            pair_options=dict(
                dataset_format=cfg.dataset_format, image_root=cfg.image_root, min_label_margin=cfg.min_label_margin
            ),
        )  # fmt: skip
        if stats is not None and hasattr(stats, "split_votes") and process_index == 0:
            _log_labels(cfg, stats)
        if not cfg.no_audit_pairs and process_index == 0:
            from diffusion_dpo.curation.audit import startup_audit

            startup_audit(rows, stats, dataset_name=cfg.dataset_name)  # warns; never raises
            if cfg.audit_scorers:
                from diffusion_dpo.curation.label_quality import startup_label_quality

                startup_label_quality(rows, cfg.audit_scorers, dataset_name=cfg.dataset_name)  # never raises
    common = dict(
        stats=stats, streaming=cfg.streaming, num_processes=num_processes, process_index=process_index,
        num_workers=cfg.dataloader_num_workers,
    )  # fmt: skip
    if cfg.streaming:
        dataset = ShuffledStream(
            rows, transform, seed=cfg.seed, buffer_size=cfg.shuffle_buffer_size, num_processes=num_processes,
            process_index=process_index, max_rows=cfg.max_train_samples, on_bad_example=cfg.on_bad_example,
        )  # fmt: skip
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.train_batch_size, collate_fn=StreamCollate(collate),
            num_workers=cfg.dataloader_num_workers, drop_last=True, pin_memory=pin_memory,
        )  # fmt: skip
        return TrainData(loader=loader, dataset=dataset, sampler=None, **common)
    dataset = make_torch_dataset(rows, transform, on_bad_example=cfg.on_bad_example)
    sampler = ShardedBatchSampler(
        len(dataset), cfg.train_batch_size, num_processes=num_processes, process_index=process_index,
        seed=cfg.seed,
    )  # fmt: skip
    if len(sampler) == 0:
        raise ValueError(
            f"{cfg.latents_cache or cfg.dataset_name} has {len(dataset)} usable rows, fewer than one batch of "
            f"--train_batch_size {cfg.train_batch_size} × {num_processes} processes (too few rows after "
            "dropping ties and bad rows?)"
        )
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.dataloader_num_workers,
        pin_memory=pin_memory,
    )  # fmt: skip
    return TrainData(loader=loader, dataset=dataset, sampler=sampler, **common)


def build_validation_dataloader(cfg: TrainConfig, is_sdxl: bool) -> torch.utils.data.DataLoader:
    """Held-out pairs in a fixed order, center-cropped, no flips, no caption dropout; a bad held-out
    row is an error (held-out numbers must mean the same from run to run). ``is_sdxl``: the family's
    micro-conditioning (rows carry sizes and crops)."""
    return make_loader(
        cfg.validation_dataset_name, split=cfg.validation_split, resolution=cfg.resolution,
        batch_size=cfg.train_batch_size, sdxl=is_sdxl, seed=cfg.seed, cache_dir=cfg.cache_dir,
    )  # fmt: skip
