"""Writing a latent cache (``data/precompute_latents.py``): each pair's images decoded, resized and
center-cropped in DataLoader workers, encoded by the VAE (both orientations) and the text encoder(s) in
batches, written as arrow shards with a manifest; an interrupted write resumes with its complete
shards. The format, and reading it back, is :mod:`.latent_cache`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from diffusion_dpo.data.latent_cache import (
    EMPTY_PROMPT,
    FORMAT_VERSION,
    MANIFEST,
    NAMED_BAD_ROWS,
    SHARD,
    SUFFIXES,
    dtype_name,
    model_identity,
    normalise_source,
    to_bytes,
)
from diffusion_dpo.data.transforms import (
    BadRowError,
    check_caption,
    crop_image,
    decode_image,
    raise_if_marked_bad,
)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor


class _PrepareRow:
    """Source row -> decoded, resized, center-cropped pixels of both images in each orientation, or the
    reason the row is bad. Picklable, so it runs in DataLoader workers."""

    def __init__(self, resolution: int, orientations: int):
        self.resolution = resolution
        self.orientations = orientations

    def __call__(self, row: dict, index: int) -> dict:
        try:
            raise_if_marked_bad(row)
            caption = check_caption(row.get("caption"), where=f"row {index}")
            images = {s: decode_image(row.get(f"image{s}"), where=f"row {index}, image{s}") for s in SUFFIXES}
        except BadRowError as error:
            return {"index": index, "bad": str(error)}
        out = {"index": index, "bad": None, "caption": caption}
        for suffix, image in images.items():
            views = [
                crop_image(image, self.resolution, flip=bool(o), center_crop=True)
                for o in range(self.orientations)
            ]
            out[f"pixels{suffix}"] = torch.stack([pixels for pixels, _, _ in views])  # [K, 3, R, R]
            out[f"original_size{suffix}"] = list(views[0][1])
            out[f"crop_top_left{suffix}"] = [list(crop) for _, _, crop in views]
        return out


class _PreparedRows(torch.utils.data.Dataset):
    def __init__(self, rows, prepare: _PrepareRow, start: int):
        self.rows, self.prepare, self.start = rows, prepare, start

    def __len__(self) -> int:
        return len(self.rows) - self.start

    def __getitem__(self, i: int) -> dict:
        return self.prepare(self.rows[self.start + i], self.start + i)


def _batches_of(items, size: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@torch.no_grad()
def _encode_batch(components, prepared: list[dict], device, dtypes: dict) -> list[dict]:
    """Cache rows of prepared rows: one VAE pass over every good row's images and orientations, one text
    encoder pass over their captions."""
    from diffusion_dpo.models.loading import encode_prompts, to_unit_range

    good = [p for p in prepared if p["bad"] is None]
    rows = {p["index"]: {"caption": "", "bad": p["bad"]} for p in prepared}
    if good:
        vae = components.vae
        k = good[0]["pixels_w"].shape[0]
        # [2G, K, 3, R, R]: winners then losers, each in its K orientations
        pixels = torch.cat([torch.stack([p[f"pixels{s}"] for p in good]) for s in SUFFIXES])
        pixels = to_unit_range(pixels.flatten(0, 1).to(device))
        dist = vae.encode(pixels.to(next(vae.parameters()).dtype)).latent_dist
        shape = (2, len(good), k, *dist.mean.shape[1:])
        # [2 (mean, std), 2 (winner, loser), G, K, C, h, w]
        stats = torch.stack([dist.mean.reshape(shape), dist.std.reshape(shape)])
        hidden, pooled = encode_prompts(components, [p["caption"] for p in good], device)
        for g, p in enumerate(good):
            row = rows[p["index"]]
            row.update(caption=p["caption"], prompt_embeds=to_bytes(hidden[g], dtypes["text"]))
            for j, suffix in enumerate(SUFFIXES):
                row[f"latents{suffix}"] = to_bytes(stats[:, j, g], dtypes["latents"])
                row[f"original_size{suffix}"] = p[f"original_size{suffix}"]
                row[f"crop_top_left{suffix}"] = p[f"crop_top_left{suffix}"]
            if pooled is not None:
                row["pooled_prompt_embeds"] = to_bytes(pooled[g], dtypes["text"])
    return [rows[p["index"]] for p in prepared]


def _schema(micro_conditioning: bool, pooled: bool):
    import pyarrow as pa

    fields = [
        ("caption", pa.string()),
        ("bad", pa.string()),
        ("latents_w", pa.binary()),
        ("latents_l", pa.binary()),
        ("prompt_embeds", pa.binary()),
    ]
    if pooled:
        fields += [("pooled_prompt_embeds", pa.binary())]
    if micro_conditioning:
        for suffix in SUFFIXES:
            fields += [
                (f"original_size{suffix}", pa.list_(pa.int64(), 2)),
                (f"crop_top_left{suffix}", pa.list_(pa.list_(pa.int64(), 2))),
            ]
    return pa.schema(fields)


class _ShardWriter:
    """Appends rows to shard files of ``shard_size`` rows, one Arrow record batch per call. A shard is
    written under a temporary name and renamed once full (or at the end), so a shard file that exists is
    complete, and memory holds one batch of rows, not one shard."""

    def __init__(
        self, output_dir: Path, first_shard: int, shard_size: int, micro_conditioning: bool, pooled: bool
    ):
        import pyarrow as pa

        self.output_dir, self.shard, self.shard_size = output_dir, first_shard, shard_size
        self.schema = _schema(micro_conditioning, pooled)
        self.rows_in_shard = 0
        self._sink = self._writer = None
        # what a bad row, which has no arrays, stores in each column
        self._empty = {
            pa.binary(): b"",
            pa.list_(pa.int64(), 2): [0, 0],
            pa.list_(pa.list_(pa.int64(), 2)): [],
        }

    def _path(self, suffix: str = ".arrow") -> Path:
        return (self.output_dir / SHARD.format(self.shard)).with_suffix(suffix)

    def _open(self) -> None:
        import pyarrow as pa

        self._sink = pa.OSFile(str(self._path(".tmp")), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)

    def _finish(self) -> None:
        self._writer.close()
        self._sink.close()
        os.replace(self._path(".tmp"), self._path())
        self.shard, self.rows_in_shard, self._sink, self._writer = self.shard + 1, 0, None, None

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa

        while rows:
            if self._writer is None:
                self._open()
            room = self.shard_size - self.rows_in_shard
            part, rows = rows[:room], rows[room:]
            columns = [
                pa.array([r.get(f.name, self._empty.get(f.type)) for r in part], f.type) for f in self.schema
            ]
            self._writer.write_batch(pa.record_batch(columns, schema=self.schema))
            self.rows_in_shard += len(part)
            if self.rows_in_shard == self.shard_size:
                self._finish()

    def close(self) -> int:
        """Finish the last shard; returns the number of shards (a cache of no rows gets one empty shard)."""
        if self._writer is None and self.shard == 0:
            self._open()
        if self._writer is not None:
            self._finish()
        return self.shard


def _settings(
    *, model: dict, family, resolution: int, hflip: bool, dataset_name, split: str, keep_ties: bool,
    streaming: bool, fingerprint: str | None, dtypes: dict, shard_size: int,
) -> dict:  # fmt: skip
    """What decides a cache's content: an interrupted write resumes only into a cache of equal settings."""
    return {
        "format": FORMAT_VERSION,
        "model": {
            **model,
            "family": family.name,
            "micro_conditioning": family.micro_conditioning,
            "text_encoding": family.text_encoding_settings(),
        },
        "resolution": resolution,
        "center_crop": True,
        "hflip": hflip,
        "source": {
            "dataset_name": normalise_source(dataset_name),
            "split": split,
            "keep_ties": keep_ties,
            "streaming": streaming,
            "fingerprint": fingerprint,
        },
        "dtypes": dtypes,
        "shard_size": shard_size,
    }


def _prepare_output_dir(output_dir: Path, settings: dict, overwrite: bool) -> int:
    """Make ``output_dir`` ready; returns the number of complete shards an interrupted write with the
    same settings left there (they are kept; 0 for a new cache), or -1 when it holds this cache complete."""
    manifest_path = output_dir / MANIFEST
    ours = [
        manifest_path,
        output_dir / EMPTY_PROMPT,
        *output_dir.glob("shard-*.arrow"),
        *output_dir.glob("*.tmp"),
    ]
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        same = old.get("settings") == settings
        if same and not overwrite:
            if old.get("complete"):
                return -1
            done = 0
            while (output_dir / SHARD.format(done)).is_file():
                done += 1
            return done
        if not overwrite:
            before = old.get("settings", {})
            differ = sorted(k for k in {**settings, **before} if settings.get(k) != before.get(k))
            raise ValueError(
                f"{output_dir} holds a latent cache made with other settings (they differ in {differ}); "
                "pass --overwrite to replace it, or choose another --output_dir"
            )
    elif output_dir.is_dir() and any(p not in ours for p in output_dir.iterdir()):
        raise ValueError(
            f"--output_dir {output_dir} exists and is not a latent cache; choose an empty or new folder"
        )
    for path in ours:
        if path.exists():
            path.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    return 0


def write_latent_cache(
    output_dir: str | os.PathLike,
    *,
    pretrained_model_name_or_path: str,
    dataset_name: str | os.PathLike,
    resolution: int,
    split: str = "train",
    revision: str | None = None,
    variant: str | None = None,
    vae_model_name_or_path: str | None = None,
    drop_t5: bool = False,
    max_sequence_length: int | None = None,
    keep_ties: bool = False,
    hflip: bool = True,
    streaming: bool = False,
    cache_dir: str | None = None,
    mixed_precision: str = "no",
    batch_size: int = 16,
    shard_size: int = 2000,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    overwrite: bool = False,
) -> dict:
    """Encode the pairs of ``dataset_name`` (any source :func:`~diffusion_dpo.data.pairs.load_pair_dataset`
    reads) into a latent cache in ``output_dir`` (see the module docstring); returns its manifest.

    ``mixed_precision`` (no, fp16, bf16) picks the dtype the encoders run in, as the trainer's flag of
    that name does (SDXL's own VAE stays fp32). ``drop_t5``, ``max_sequence_length``: SD3's T5, as the
    trainer's flags of those names (a run trains from the cache only with the same). ``batch_size``: pairs
    per encoder pass (the VAE sees
    2 images × 2 orientations of each). ``shard_size``: rows per shard file (a stream deals shards to its
    readers: keep more shards than processes × DataLoader workers). ``num_workers``: processes that
    decode images (map-style sources; a stream is read in order in this process). An interrupted run
    resumes: rerun it and the complete shards are kept; a finished cache is left as it is.
    """
    import safetensors.torch
    from tqdm.auto import tqdm

    from diffusion_dpo.data.pairs import PairStats, load_pair_dataset
    from diffusion_dpo.models.loading import encode_prompts, latent_shape, load_components

    if resolution <= 0 or batch_size <= 0 or shard_size <= 0 or num_workers < 0:
        raise ValueError(
            f"--resolution, --batch_size and --shard_size must be > 0 and --dataloader_num_workers >= 0, got "
            f"{resolution}, {batch_size}, {shard_size}, {num_workers}"
        )
    if streaming and num_workers:
        raise ValueError(
            "--dataloader_num_workers needs a map-style source: a stream is encoded in its order, in one process"
        )
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    if dtype is None:
        raise ValueError(f"--mixed_precision must be one of no, fp16, bf16, got {mixed_precision!r}")
    output_dir = Path(output_dir)
    stats = PairStats()  # the data first: a wrong path fails before the models load
    rows = load_pair_dataset(
        dataset_name, split, streaming=streaming, keep_ties=keep_ties, cache_dir=cache_dir, stats=stats,
        on_bad_example="skip",
    )  # fmt: skip
    components = load_components(
        pretrained_model_name_or_path, revision, variant, vae_model_name_or_path, frozen_dtype=dtype,
        load_unet=False, family_options={"drop_t5": drop_t5, "max_sequence_length": max_sequence_length},
    )  # fmt: skip
    family = components.family
    components.vae.to(device)
    for encoder in components.text_encoders:
        encoder.to(device)
    dtypes = {
        "latents": dtype_name(next(components.vae.parameters()).dtype),
        "text": dtype_name(next(components.text_encoders[0].parameters()).dtype),
    }
    settings = _settings(
        model=model_identity(pretrained_model_name_or_path, revision, variant, vae_model_name_or_path), family=family,
        resolution=resolution, hflip=hflip, dataset_name=dataset_name, split=split, keep_ties=keep_ties,
        streaming=streaming, fingerprint=getattr(rows, "_fingerprint", None), dtypes=dtypes, shard_size=shard_size,
    )  # fmt: skip
    done_shards = _prepare_output_dir(output_dir, settings, overwrite)
    if done_shards < 0:
        logger.info("%s already holds this complete latent cache; nothing to do", output_dir)
        return json.loads((output_dir / MANIFEST).read_text())
    start = done_shards * shard_size
    if done_shards:
        logger.info(
            "resuming an interrupted cache: keeping its %d complete shards (%d rows)", done_shards, start
        )

    empty_hidden, empty_pooled = encode_prompts(components, [""], device)
    empty = {"prompt_embeds": empty_hidden[0].cpu()}
    if empty_pooled is not None:
        empty["pooled_prompt_embeds"] = empty_pooled[0].cpu()
    safetensors.torch.save_file({k: v.contiguous() for k, v in empty.items()}, str(output_dir / EMPTY_PROMPT))
    shapes = {
        "latents": list(latent_shape(components.vae, resolution, resolution)),
        "prompt_embeds": list(empty_hidden.shape[1:]),
        "pooled_prompt_embeds": list(empty_pooled.shape[1:]) if empty_pooled is not None else None,
    }
    manifest = {
        "settings": settings,
        "complete": False,
        "vae_scaling_factor": float(components.vae.config.scaling_factor),
        "shapes": shapes,
    }
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    prepare = _PrepareRow(resolution, 2 if hflip else 1)
    if streaming:
        # rows with a bad label_0 are left out, as loading a dataset whole with on_bad_example="skip" does,
        # so that the cache's row i is row i of the source loaded whole
        labelled = (row for row in rows if row["bad"] is None)
        prepared = (prepare(row, i) for i, row in enumerate(labelled) if i >= start)
        batches, total = _batches_of(prepared, batch_size), None
    else:
        loader = torch.utils.data.DataLoader(
            _PreparedRows(rows, prepare, start),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=list,
        )
        batches, total = iter(loader), len(rows) - start
    writer, num_rows = (
        _ShardWriter(
            output_dir, done_shards, shard_size, family.micro_conditioning, empty_pooled is not None
        ),
        start,
    )
    bad_examples = _bad_rows_of_shards(output_dir, done_shards)
    bad_count = len(bad_examples)
    with tqdm(total=total, initial=0, desc="encoding pairs", unit="pair") as progress:
        for batch in batches:
            encoded = _encode_batch(components, batch, device, dtypes)
            for row in encoded:
                if row["bad"] is not None:
                    bad_count += 1
                    if bad_count <= NAMED_BAD_ROWS:
                        logger.warning("bad row (kept in the cache, marked bad): %s", row["bad"])
                        bad_examples.append(row["bad"])
            writer.write(encoded)
            num_rows += len(batch)
            progress.update(len(batch))
    shard = writer.close()
    manifest.update(
        complete=True,
        num_rows=num_rows,
        shards=[SHARD.format(i) for i in range(shard)],
        stats={
            "pairs_read": stats.seen,
            "ties": stats.ties,
            "ties_dropped": 0 if keep_ties else stats.ties,
            "swapped": stats.swapped,
            "bad_labels": stats.bad_labels,
            "bad_label_rows": [list(r) for r in stats.bad_label_rows],
            "bad_rows": bad_count,
            "bad_row_examples": bad_examples[:NAMED_BAD_ROWS],
        },
    )
    (output_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    logger.info(
        "wrote %d pairs to %s (%d shards); %d bad rows kept as marked rows, %d pairs with a bad label_0 and "
        "%d ties %s",
        num_rows, output_dir, shard, bad_count, stats.bad_labels, stats.ties, "kept" if keep_ties else "left out",
    )  # fmt: skip
    return manifest


def _bad_rows_of_shards(output_dir: Path, num_shards: int) -> list[str]:
    """The reasons of the bad rows in the first ``num_shards`` shards (a resumed write counts them again)."""
    import datasets

    reasons: list[str] = []
    for i in range(num_shards):
        shard = datasets.Dataset.from_file(str(output_dir / SHARD.format(i)))
        reasons += [r for r in shard.select_columns(["bad"])["bad"] if r is not None]
    return reasons
