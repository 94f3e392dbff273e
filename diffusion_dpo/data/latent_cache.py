"""Precomputed latents and text embeddings: a pair dataset encoded once by the VAE and text encoder(s).

The trainer otherwise runs the VAE on both images and the text encoder(s) on the caption of every
pair at every step. :func:`write_latent_cache` (``data/precompute_latents.py``) runs them once and
writes a folder that ``train_sd.py --latents_cache DIR`` reads instead of the images:

- ``shard-00000.arrow``, ...: the rows, memory-mapped when read. **Row i is row i of**
  ``load_pair_dataset(source)`` (ties dropped unless ``keep_ties``; rows with a bad ``label_0`` left
  out, as loading with ``on_bad_example="skip"`` does), so the trainer's order, resume position,
  process sharding and per-row draws apply unchanged;
- ``empty_prompt.safetensors``: the embeddings of the empty caption, for caption dropout;
- ``manifest.json``: what made the cache (model and family, how captions were encoded, resolution,
  flips, source, dtypes, shapes, counts). The trainer refuses a cache made with another model,
  resolution, text encoding (SD3's T5 and its length) or tie policy.

Each row holds the VAE posterior's **mean and std**, not a sample: the trainer draws each row's
posterior noise from ``(seed, epoch, row)`` (:mod:`diffusion_dpo.diffusion.draws`) and forms
``(mean + std · noise) · scaling_factor`` with :func:`~diffusion_dpo.models.loading.posterior_latents`,
the function the on-the-fly path uses. Random horizontal flips: both orientations of each image are
encoded (a flip of the latents is not the latents of the flipped image), and the row's own generator
picks one exactly as :class:`~diffusion_dpo.data.transforms.PairTransform` would. Crops are center
crops: a random crop has one encoding per position, so ``--random_crop`` is refused with a cache.

Row columns: ``caption`` (str, as the trainer would use it: a blank caption is ``""``), ``bad`` (None,
or why the row cannot be used: an image that does not decode, a caption that is not a string),
``latents_w``/``latents_l`` (bytes of ``[2 (mean, std), K, C, h, w]``, K = 2 orientations, unflipped
first, or 1 with ``hflip=False``), ``prompt_embeds`` (bytes of ``[L, D]``), for families with a pooled
text embedding (SDXL, SD3) ``pooled_prompt_embeds`` (bytes of ``[D]``), and for SDXL's
micro-conditioning ``original_size_w``/``_l`` (h, w) and ``crop_top_left_w``/``_l`` (``[K, 2]``). A bad
row's byte columns are empty; the trainer treats it as the image path treats a bad row (a placeholder
with ``on_bad_example="skip"``, else an error). Arrays are stored in the dtype they were computed in
(bf16 as its 16 bits; format 1 stored it as fp32) and turned back into it when read, so that a cached
batch is the on-the-fly batch up to the batching of the encoders.

Bytes per pair with ``--mixed_precision bf16``, both orientations: SD1.5 at 512 px 0.38 MB (latents
0.26, text 0.12); SDXL at 1024 px 1.4 MB (2.4 MB with its own VAE, which runs in fp32); SD3 at 1024 px
5.5 MB (16-channel latents 4.2, text of 77 CLIP + 77 T5 positions × 4096 1.3). ``--no_hflip`` halves
the latents.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from diffusion_dpo.data.transforms import (
    BadRowError,
    check_caption,
    collate_common,
    crop_image,
    decode_image,
    raise_if_marked_bad,
    row_rng,
)

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

#: 2: bf16 arrays stored as their 16 bits (1: as fp32), the model's family named in the settings
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
EMPTY_PROMPT = "empty_prompt.safetensors"
_SHARD = "shard-{:05d}.arrow"
_SUFFIXES = ("_w", "_l")
#: Bad rows named in the manifest and the log.
_NAMED_BAD_ROWS = 10

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _name_of(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_numpy_dtype(name: str, format_version: int = FORMAT_VERSION) -> np.dtype:
    # numpy has no bfloat16: bf16 values are stored as their 16 bits (int16), exactly and in half the
    # space of format 1's fp32 copy
    if name == "bfloat16":
        return np.dtype("int16") if format_version >= 2 else np.dtype("float32")
    return np.dtype("float16") if name == "float16" else np.dtype("float32")


def _to_bytes(tensor: Tensor, dtype_name: str) -> bytes:
    tensor = tensor.detach().cpu().to(_DTYPES[dtype_name]).contiguous()
    if dtype_name == "bfloat16":
        return tensor.view(torch.int16).numpy().tobytes()
    return tensor.numpy().tobytes()


def _from_bytes(
    data: bytes, dtype_name: str, shape: tuple[int, ...], format_version: int = FORMAT_VERSION
) -> Tensor:
    stored = _stored_numpy_dtype(dtype_name, format_version)
    tensor = torch.from_numpy(np.frombuffer(data, dtype=stored).reshape(shape).copy())
    if stored == np.dtype("int16"):
        return tensor.view(torch.bfloat16)
    return tensor.to(_DTYPES[dtype_name])


def normalise_source(name: str | os.PathLike | None) -> str | None:
    """A model or dataset name as the manifest keeps it: an existing local path made absolute (so that
    ``./model`` and ``/abs/model`` compare equal), anything else (a hub id) as given."""
    if name is None:
        return None
    path = Path(os.fspath(name)).expanduser()
    return str(path.resolve()) if path.exists() else os.fspath(name)


def model_identity(
    pretrained_model_name_or_path: str,
    revision: str | None = None,
    variant: str | None = None,
    vae_model_name_or_path: str | None = None,
) -> dict:
    """What names the encoders a cache was made with (compared by the trainer)."""
    return {
        "pretrained_model_name_or_path": normalise_source(pretrained_model_name_or_path),
        "revision": revision,
        "variant": variant,
        "vae_model_name_or_path": normalise_source(vae_model_name_or_path),
    }


def _describe_text(settings: dict) -> str:
    """How a family encodes captions, for errors: SD3's T5 and its length; nothing to say for the others."""
    if not settings:
        return "by the model's text encoder(s)"
    if not settings.get("t5", True):
        return "without T5 (--drop_t5)"
    return f"with T5 at --max_sequence_length {settings['max_sequence_length']}"


def _describe_model(identity: dict) -> str:
    extras = [
        f"{k} {identity[k]}" for k in ("revision", "variant", "vae_model_name_or_path") if identity.get(k)
    ]
    return identity["pretrained_model_name_or_path"] + (f" ({', '.join(extras)})" if extras else "")


# ----------------------------------------------------------------------------------------------
# writing


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
            images = {
                s: decode_image(row.get(f"image{s}"), where=f"row {index}, image{s}") for s in _SUFFIXES
            }
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
        pixels = torch.cat([torch.stack([p[f"pixels{s}"] for p in good]) for s in _SUFFIXES])
        pixels = to_unit_range(pixels.flatten(0, 1).to(device))
        dist = vae.encode(pixels.to(next(vae.parameters()).dtype)).latent_dist
        shape = (2, len(good), k, *dist.mean.shape[1:])
        # [2 (mean, std), 2 (winner, loser), G, K, C, h, w]
        stats = torch.stack([dist.mean.reshape(shape), dist.std.reshape(shape)])
        hidden, pooled = encode_prompts(components, [p["caption"] for p in good], device)
        for g, p in enumerate(good):
            row = rows[p["index"]]
            row.update(caption=p["caption"], prompt_embeds=_to_bytes(hidden[g], dtypes["text"]))
            for j, suffix in enumerate(_SUFFIXES):
                row[f"latents{suffix}"] = _to_bytes(stats[:, j, g], dtypes["latents"])
                row[f"original_size{suffix}"] = p[f"original_size{suffix}"]
                row[f"crop_top_left{suffix}"] = p[f"crop_top_left{suffix}"]
            if pooled is not None:
                row["pooled_prompt_embeds"] = _to_bytes(pooled[g], dtypes["text"])
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
        for suffix in _SUFFIXES:
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
        return (self.output_dir / _SHARD.format(self.shard)).with_suffix(suffix)

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
            while (output_dir / _SHARD.format(done)).is_file():
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
        "latents": _name_of(next(components.vae.parameters()).dtype),
        "text": _name_of(next(components.text_encoders[0].parameters()).dtype),
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
                    if bad_count <= _NAMED_BAD_ROWS:
                        logger.warning("bad row (kept in the cache, marked bad): %s", row["bad"])
                        bad_examples.append(row["bad"])
            writer.write(encoded)
            num_rows += len(batch)
            progress.update(len(batch))
    shard = writer.close()
    manifest.update(
        complete=True,
        num_rows=num_rows,
        shards=[_SHARD.format(i) for i in range(shard)],
        stats={
            "pairs_read": stats.seen,
            "ties": stats.ties,
            "ties_dropped": 0 if keep_ties else stats.ties,
            "swapped": stats.swapped,
            "bad_labels": stats.bad_labels,
            "bad_label_rows": [list(r) for r in stats.bad_label_rows],
            "bad_rows": bad_count,
            "bad_row_examples": bad_examples[:_NAMED_BAD_ROWS],
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
        shard = datasets.Dataset.from_file(str(output_dir / _SHARD.format(i)))
        reasons += [r for r in shard.select_columns(["bad"])["bad"] if r is not None]
    return reasons


# ----------------------------------------------------------------------------------------------
# reading


@dataclass
class LatentCache:
    """An opened cache folder: its manifest and the empty caption's embeddings."""

    path: Path
    manifest: dict

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    @property
    def format_version(self) -> int:
        return self.settings["format"]

    @property
    def micro_conditioning(self) -> bool:
        """Rows carry SDXL's original sizes and crops (format 1 named this ``sdxl``)."""
        model = self.settings["model"]
        return model.get("micro_conditioning", model.get("sdxl", False))

    @property
    def text_encoding(self) -> dict:
        """How captions were encoded beyond the model (SD3: T5 or not, its length); {} for the UNet families."""
        return self.settings["model"].get("text_encoding", {})

    @property
    def model_identity(self) -> dict:
        """The :func:`model_identity` the cache was made with."""
        extra = ("family", "micro_conditioning", "text_encoding", "sdxl")
        return {k: v for k, v in self.settings["model"].items() if k not in extra}

    def rows(self, streaming: bool = False):
        """The rows: a memory-mapped ``datasets.Dataset``, or with ``streaming`` a ``datasets.IterableDataset``
        with one shard per shard file."""
        import datasets

        files = [datasets.Dataset.from_file(str(self.path / name)) for name in self.manifest["shards"]]
        table = datasets.concatenate_datasets(files) if len(files) > 1 else files[0]
        return table.to_iterable_dataset(num_shards=len(files)) if streaming else table

    def empty_prompt(self) -> dict[str, Tensor]:
        import safetensors.torch

        return safetensors.torch.load_file(str(self.path / EMPTY_PROMPT))


def open_latent_cache(path: str | os.PathLike) -> LatentCache:
    """Open a cache folder written by :func:`write_latent_cache`, with a clear error when it is not one or
    its writing did not finish."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        what = "does not exist" if not path.exists() else f"has no {MANIFEST}"
        raise FileNotFoundError(
            f"latent cache {path} {what}; make it with `python data/precompute_latents.py --output_dir {path} ...`"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("settings", {}).get("format") not in READABLE_FORMATS:
        raise ValueError(
            f"latent cache {path} has format {manifest.get('settings', {}).get('format')}, this trainer reads "
            f"formats {', '.join(map(str, READABLE_FORMATS))}: encode the dataset again"
        )
    if not manifest.get("complete"):
        raise ValueError(
            f"latent cache {path} is incomplete (its encoding stopped before the end); rerun the same "
            "data/precompute_latents.py command to finish it"
        )
    missing = [name for name in manifest["shards"] if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"latent cache {path} lacks shard files {missing[:3]}")
    return LatentCache(path, manifest)


def check_cache_fits(
    cache: LatentCache,
    *,
    model: dict,
    resolution: int,
    text_encoding: dict,
    keep_ties: bool,
    hflip: bool,
    dataset_name: str | None = None,
    split: str | None = None,
) -> None:
    """Raise ``ValueError`` naming both sides when the cache was made for another model, text encoding,
    resolution or data than this run's (``model`` from :func:`model_identity`, ``text_encoding`` from
    the run's family: ``ModelFamily.text_encoding_settings``)."""
    settings, where = cache.settings, f"latent cache {cache.path}"
    made_with = cache.model_identity
    if made_with != model:
        raise ValueError(
            f"{where} was encoded with model {_describe_model(made_with)}, but this run trains "
            f"{_describe_model(model)}: latents and text embeddings belong to their VAE and text encoders. "
            "Encode the dataset with this model (data/precompute_latents.py), or train the cache's model"
        )
    if cache.text_encoding != text_encoding:
        raise ValueError(
            f"{where} holds captions encoded {_describe_text(cache.text_encoding)}, but this run encodes them "
            f"{_describe_text(text_encoding)}; encode the dataset again with this run's --drop_t5 and "
            "--max_sequence_length (data/precompute_latents.py takes both), or train with the cache's"
        )
    if settings["resolution"] != resolution:
        raise ValueError(
            f"{where} was encoded at resolution {settings['resolution']}, but this run trains at --resolution "
            f"{resolution}; encode the dataset again with --resolution {resolution}, or train at "
            f"{settings['resolution']}"
        )
    if settings["source"]["keep_ties"] != keep_ties:
        made = "keeps" if settings["source"]["keep_ties"] else "drops"
        raise ValueError(
            f"{where} {made} tied pairs, but this run {'keeps' if keep_ties else 'drops'} them (--keep_ties): its "
            "rows are not this run's rows; encode the dataset again with the same --keep_ties"
        )
    if hflip and not settings["hflip"]:
        raise ValueError(
            f"{where} holds unflipped images only (made with --no_hflip), and this run flips images at random: "
            "train with --no_hflip, or encode the dataset again without --no_hflip"
        )
    source = settings["source"]
    if dataset_name is not None and normalise_source(dataset_name) != source["dataset_name"]:
        raise ValueError(
            f"{where} holds {source['dataset_name']}, but --dataset_name is {dataset_name}; drop "
            "--dataset_name (the cache is the data) or use the cache of that dataset"
        )
    if dataset_name is not None and split is not None and split != source["split"]:
        raise ValueError(
            f"{where} holds split {source['split']!r} of its dataset, not --dataset_split {split!r}"
        )


class CachedPairTransform:
    """A cache row -> a training example, with the draws of :class:`~diffusion_dpo.data.transforms.PairTransform`.

    The row's generator ``row_rng(seed, epoch, index)`` draws, in PairTransform's order: the caption
    dropout, then for each image (winner, loser) the three numbers of ``transform_image`` (crop top, crop
    left, flip). The flip picks the orientation, the dropout the empty caption's embeddings. Returns
    ``latents_mean_w``/``_l`` and ``latents_std_w``/``_l`` ``[C, h, w]``, ``prompt_embeds`` ``[L, D]``,
    ``caption``, ``index``, ``bad`` None, ``pooled_prompt_embeds`` ``[D]`` where the family has one (SDXL,
    SD3) and for SDXL's micro-conditioning ``original_size_w``/``_l``, ``crop_top_left_w``/``_l``.
    """

    def __init__(
        self,
        cache: LatentCache,
        *,
        seed: int = 0,
        random_flip: bool = True,
        proportion_empty_prompts: float = 0.0,
    ):
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts}")
        self.seed = seed
        self.random_flip = random_flip
        self.proportion_empty_prompts = proportion_empty_prompts
        settings, shapes = cache.settings, cache.manifest["shapes"]
        self.micro_conditioning = cache.micro_conditioning
        self.format_version = cache.format_version
        self.resolution = settings["resolution"]
        self.dtypes = settings["dtypes"]
        self.orientations = 2 if settings["hflip"] else 1
        self.latent_shape = tuple(shapes["latents"])
        self.text_shapes = {"prompt_embeds": tuple(shapes["prompt_embeds"])}
        if shapes.get("pooled_prompt_embeds") is not None:
            self.text_shapes["pooled_prompt_embeds"] = tuple(shapes["pooled_prompt_embeds"])
        self.empty = {k: v.to(_DTYPES[self.dtypes["text"]]) for k, v in cache.empty_prompt().items()}

    def __call__(self, row: dict, *, index: int, epoch: int = 0) -> dict:
        raise_if_marked_bad(row)
        rng = row_rng(self.seed, epoch, index)
        dropped = rng.random() < self.proportion_empty_prompts
        out = {"caption": "" if dropped else row["caption"], "index": index, "bad": None}
        for key, shape in self.text_shapes.items():
            out[key] = (
                self.empty[key] if dropped
                else _from_bytes(row[key], self.dtypes["text"], shape, self.format_version)
            )  # fmt: skip
        for suffix in _SUFFIXES:
            _top, _left, flip_draw = rng.random(3)  # transform_image's draws; crops are center crops
            orientation = int(self.random_flip and flip_draw < 0.5)
            stats = _from_bytes(
                row[f"latents{suffix}"], self.dtypes["latents"], (2, self.orientations, *self.latent_shape),
                self.format_version,
            )  # fmt: skip
            out[f"latents_mean{suffix}"] = stats[0, orientation]
            out[f"latents_std{suffix}"] = stats[1, orientation]
            if self.micro_conditioning:
                out[f"original_size{suffix}"] = tuple(row[f"original_size{suffix}"])
                out[f"crop_top_left{suffix}"] = tuple(row[f"crop_top_left{suffix}"][orientation])
        return out

    def placeholder(self, index: int, reason: str) -> dict:
        """A bad row as it trains when skipped: the keys and shapes of ``__call__``, zeros, caption ``""``,
        micro-conditioning sizes (R, R) and crops (0, 0), ``bad`` = ``reason``."""
        zeros = torch.zeros(self.latent_shape, dtype=_DTYPES[self.dtypes["latents"]])
        out = {"caption": "", "index": int(index), "bad": str(reason)}
        out.update({k: torch.zeros_like(v) for k, v in self.empty.items()})
        for suffix in _SUFFIXES:
            out[f"latents_mean{suffix}"], out[f"latents_std{suffix}"] = zeros, zeros
            if self.micro_conditioning:
                out[f"original_size{suffix}"] = (self.resolution, self.resolution)
                out[f"crop_top_left{suffix}"] = (0, 0)
        return out


_TENSOR_KEYS = ("latents_mean_w", "latents_std_w", "latents_mean_l", "latents_std_l", "prompt_embeds")


def collate_cached_pairs(examples: list[dict]) -> dict:
    """Batch :class:`CachedPairTransform` outputs: ``latents_mean_w``/``_l``, ``latents_std_w``/``_l``
    ``[B, C, h, w]``, ``prompt_embeds`` ``[B, L, D]``, the keys of
    :func:`~diffusion_dpo.data.transforms.collate_common`, ``pooled_prompt_embeds`` ``[B, D]`` where
    there is one, and for SDXL ``original_sizes_w``/``_l`` and ``crop_top_lefts_w``/``_l`` ``[B, 2]``
    long (as ``collate_pairs``)."""
    keys = _TENSOR_KEYS + (("pooled_prompt_embeds",) if "pooled_prompt_embeds" in examples[0] else ())
    batch = {key: torch.stack([e[key] for e in examples]) for key in keys}
    batch.update(collate_common(examples))
    if "original_size_w" in examples[0]:
        for key in ("original_size_w", "original_size_l", "crop_top_left_w", "crop_top_left_l"):
            name = key.replace("original_size", "original_sizes").replace("crop_top_left", "crop_top_lefts")
            batch[name] = torch.tensor([e[key] for e in examples], dtype=torch.long)  # [B, 2]
    return batch
