"""Precomputed latents and text embeddings: a pair dataset encoded once by the VAE and text encoder(s).

The trainer otherwise runs the VAE on both images and the text encoder(s) on the caption of every
pair at every step. :func:`~.latent_cache_writer.write_latent_cache` (``data/precompute_latents.py``) runs them once and
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
    collate_common,
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
SHARD = "shard-{:05d}.arrow"
SUFFIXES = ("_w", "_l")
#: Bad rows named in the manifest and the log.
NAMED_BAD_ROWS = 10

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _stored_numpy_dtype(name: str, format_version: int = FORMAT_VERSION) -> np.dtype:
    # numpy has no bfloat16: bf16 values are stored as their 16 bits (int16), exactly and in half the
    # space of format 1's fp32 copy
    if name == "bfloat16":
        return np.dtype("int16") if format_version >= 2 else np.dtype("float32")
    return np.dtype("float16") if name == "float16" else np.dtype("float32")


def to_bytes(tensor: Tensor, dtype_name: str) -> bytes:
    tensor = tensor.detach().cpu().to(_DTYPES[dtype_name]).contiguous()
    if dtype_name == "bfloat16":
        return tensor.view(torch.int16).numpy().tobytes()
    return tensor.numpy().tobytes()


def from_bytes(
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
    """Open a cache folder written by :func:`~.latent_cache_writer.write_latent_cache`, with a clear error when it is not one or
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
                else from_bytes(row[key], self.dtypes["text"], shape, self.format_version)
            )  # fmt: skip
        for suffix in SUFFIXES:
            _top, _left, flip_draw = rng.random(3)  # transform_image's draws; crops are center crops
            orientation = int(self.random_flip and flip_draw < 0.5)
            stats = from_bytes(
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
        for suffix in SUFFIXES:
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
