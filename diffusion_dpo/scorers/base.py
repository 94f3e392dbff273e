"""What every scorer shares: the ``Scorer`` interface, spec parsing, weight resolution, common parts.

A scorer maps ``(images, prompts)`` to one float per pair. Each concrete scorer follows its authors'
published preprocessing and scale; those details live in its own module's docstring. This module
holds only what is common:

- ``Scorer``: the base class. ``__call__(images, prompts) -> [N] float32 on CPU``, batched
  internally, run under ``torch.no_grad``; subclasses implement ``score_batch``.
- ``parse_spec``: ``"NAME"`` or ``"NAME=PATH_OR_ID"``.
- ``WeightFiles`` / ``check_weight_files``: the files a scorer reads, checked before anything is
  loaded (so ``eval/evaluate.py`` can fail before hours of generation), with every missing one named
  in a one-line ``MissingWeightsError`` that also says how to provide them.
- ``resolve_weights_file`` / ``load_pretrained``: find weights in a local path or on the Hugging Face
  hub and turn every way of not finding them (offline, missing file, bad id) into a
  ``MissingWeightsError`` that says what is missing and how to provide it.
- ``PreferenceMLP``: the 5-layer linear head (``D→1024→128→64→16→1``) that both the LAION aesthetic
  predictor and ImageReward put on top of their backbones.
- ``clip_center_crop``: OpenAI CLIP's image transform (shortest side to ``size`` bicubic, centre crop,
  RGB, CLIP normalisation), used by the aesthetic predictor and ImageReward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

#: Normalisation constants of OpenAI CLIP (``clip/clip.py``'s ``_transform``); open_clip calls them
#: ``OPENAI_DATASET_MEAN`` / ``OPENAI_DATASET_STD``. ImageReward and HPSv2 use them too.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MissingWeightsError(FileNotFoundError):
    """Weights (or a config/tokenizer file) of a scorer could not be found locally nor fetched."""


class Scorer:
    """Base class of all scorers: ``scorer(images, prompts) -> [N]`` float32 scores on the CPU.

    Subclasses set ``name`` (e.g. ``"hpsv2.1"``) and implement ``score_batch`` for at most
    ``batch_size`` pairs; ``__call__`` validates the inputs, splits them into batches, runs them
    under ``torch.no_grad`` and concatenates the results. Scores of different scorers live on
    different scales (see each scorer's docstring) and must never be mixed.
    """

    name: str = ""

    def __init__(self, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """Scores ``[B]`` of one batch (any device/dtype; ``__call__`` moves them to CPU float32)."""
        raise NotImplementedError

    def __call__(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(
                f"{self.name}: got {len(images)} images but {len(prompts)} prompts; pass one prompt per image"
            )
        for i, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise ValueError(
                    f"{self.name}: images[{i}] is a {type(image).__name__}, expected a PIL image"
                )
        scores = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                batch = self.score_batch(images[start:stop], prompts[start:stop])
                scores.append(batch.detach().reshape(-1).to(device="cpu", dtype=torch.float32))
        if not scores:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(scores)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size})"


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"NAME"`` / ``"NAME=PATH_OR_ID"`` into ``(name, source)``; ``source`` is None for defaults."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"scorer spec must be a non-empty string like 'pickscore' or 'NAME=PATH', got {spec!r}"
        )
    name, sep, source = spec.strip().partition("=")
    name, source = name.strip(), source.strip()
    if sep and not source:
        raise ValueError(f"scorer spec {spec!r} has an empty PATH_OR_ID after '='")
    return name, (source if sep else None)


def _hub_cache_note(unreachable: bool = False) -> str:
    """Where huggingface_hub looked, and the environment variables that change it."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        mode = "HF_HUB_OFFLINE=1, so the hub was not asked"
    elif unreachable:
        mode = "the hub did not answer; HF_HUB_OFFLINE=1 skips its ~25 s of retries"
    else:
        mode = "HF_HUB_OFFLINE unset"
    return f"Hugging Face cache {constants.HF_HUB_CACHE} (set HF_HOME to use another; {mode})"


def _how_to_fix(spec_name: str, what: str) -> str:
    return (
        f"Download {what} while online (huggingface_hub caches them; behind a firewall copy that cache and "
        f"set HF_HOME and HF_HUB_OFFLINE=1), or put them in one local folder and pass the scorer as "
        f"'{spec_name}=/path/to/folder' (--scorer {spec_name}=/path/to/folder)."
    )


def _one_line(err: BaseException) -> str:
    # Library messages span several lines; the CLI prints one. The full error stays chained.
    return " ".join(f"{type(err).__name__}: {err}".split())


#: transformers model weights: one of these must sit next to ``config.json``.
MODEL_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


@dataclass(frozen=True)
class WeightFiles:
    """Files a scorer reads from one place, as its loader will look for them.

    ``source`` is a local file (used as is), a local folder or a hub repo id. ``files`` lists what the
    folder or repo must hold; each entry is a tuple of alternatives, one of which is enough (e.g.
    ``MODEL_WEIGHTS``).
    """

    source: str
    files: tuple[tuple[str, ...], ...]

    def local_files(self) -> list[Path]:
        """The local files this names that exist (for cache keys that change when weights change)."""
        path = Path(self.source).expanduser()
        if path.is_file():
            return [path]
        if not path.is_dir():
            return []
        return [path / name for group in self.files for name in group if (path / name).is_file()]


def _describe(group: tuple[str, ...]) -> str:
    # Two spellings at most: the others are rarer ones (shard indexes) that would only add noise.
    return group[0] + (f" (or {group[1]})" if len(group) > 1 else "")


def _find_on_hub(repo: str, group: tuple[str, ...], offline: bool) -> tuple[bool, str | None]:
    """Whether one of ``group`` is in the cache or downloadable; else why not ("cache", "hub" or a reason)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    why = None
    for name in group:
        try:
            hf_hub_download(repo_id=repo, filename=name, local_files_only=offline)
            return True, None
        except LocalEntryNotFoundError:  # not cached, and the hub not asked or unreachable
            why, offline = "cache", True  # no ~25 s of retries for the other spellings
        except EntryNotFoundError:  # the repo exists but has no such file: try the next spelling
            why = why or "hub"
        except RepositoryNotFoundError:
            return False, "no such repo on the hub (or it is gated or private: log in with `hf auth login`)"
        except (OSError, ValueError) as err:  # bad repo id, server errors
            return False, _one_line(err)
    return False, why


def check_weight_files(spec_name: str, needed: list[WeightFiles]) -> None:
    """Raise one ``MissingWeightsError`` naming every file of ``needed`` that is neither local nor on the hub.

    A hub file found online is downloaded now (the loader would fetch it anyway). Once the hub proves
    unreachable, the remaining files are looked up in the cache only: each lookup would otherwise
    retry for ~25 s.
    """
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE)
    by_source: dict[str, list[tuple[str, ...]]] = {}  # one entry per place, in order
    for need in needed:
        groups = by_source.setdefault(need.source, [])
        groups += [g for g in need.files if g not in groups]
    missing, hub_misses = [], False
    for source, groups in by_source.items():
        path = Path(source).expanduser()
        if path.is_file():
            continue
        if path.is_dir():
            absent = [g for g in groups if not any((path / name).is_file() for name in g)]
            if absent:
                missing.append(f"{', '.join(map(_describe, absent))} in the folder {path}")
            continue
        if _looks_like_local_path(source):
            missing.append(f"{source} (does not exist)")
            continue
        absent = []
        for group in groups:
            found, why = _find_on_hub(source, group, offline)
            if found:
                continue
            if why == "cache":
                offline, hub_misses = True, True
                why = None
            elif why == "hub":
                why = "not in the repo"
            absent.append(_describe(group) + (f" ({why})" if why else ""))
        if absent:
            missing.append(f"{', '.join(absent)} from the hub repo '{source}'")
    if not missing:
        return
    where = f" They are not in the {_hub_cache_note(unreachable=True)}." if hub_misses else ""
    raise MissingWeightsError(
        f"{spec_name}: weights not found: {'; '.join(missing)}.{where} " + _how_to_fix(spec_name, "them")
    )


def _looks_like_local_path(source: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with path syntax is meant as a local path.
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def resolve_weights_file(source: str | None, filename: str, *, default_repo: str, spec_name: str) -> Path:
    """Local path of ``filename`` for a scorer whose weights are one file.

    Args:
        source: None (download ``filename`` from ``default_repo``), a local file (used as is), a local
            folder (must contain ``filename``) or a hub repo id (``filename`` is downloaded from it).
        filename: file name inside the folder / repo, e.g. ``"HPS_v2.1_compressed.pt"``.
        default_repo: hub repo used when ``source`` is None.
        spec_name: the scorer's name, for the error message.

    Raises:
        MissingWeightsError: the file is not there and cannot be fetched (offline, no such repo/file).
    """
    if source is not None:
        path = Path(source).expanduser()
        if path.is_file():
            return path
        if path.is_dir():
            if (path / filename).is_file():
                return path / filename
            raise MissingWeightsError(
                f"{spec_name}: folder {path} has no {filename!r}. Put the file {filename!r} in it "
                f"(published on the Hugging Face hub as {default_repo}/{filename}), or pass the file itself "
                f"as '{spec_name}=/path/to/{filename}'."
            )
        if _looks_like_local_path(source):
            raise MissingWeightsError(f"{spec_name}: local path {source!r} does not exist")
    repo = source if source is not None else default_repo
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except (OSError, ValueError) as err:  # offline / not cached, no such repo or file, bad repo id
        raise MissingWeightsError(
            f"{spec_name}: cannot get {filename!r} from the Hugging Face hub repo {repo!r} ({_one_line(err)}); "
            f"looked in the {_hub_cache_note()}. " + _how_to_fix(spec_name, repr(filename))
        ) from err


def load_pretrained(cls, source: str, *, spec_name: str, what: str, **kwargs):
    """``cls.from_pretrained(source, **kwargs)`` with a ``MissingWeightsError`` that says how to fix it.

    ``what`` names the expected content of ``source`` (e.g. "a transformers CLIPModel").
    """
    path = Path(source).expanduser()
    if path.exists():
        try:
            return cls.from_pretrained(str(path), **kwargs)
        except OSError as err:  # a folder without the expected files
            raise MissingWeightsError(
                f"{spec_name}: cannot load {what} from the local folder {path} ({_one_line(err)}). "
                "The folder should hold the files that save_pretrained writes (config and weights; "
                "tokenizer and image-processor files where the scorer needs them)."
            ) from err
    if _looks_like_local_path(source):
        raise MissingWeightsError(f"{spec_name}: local path {source!r} does not exist")
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:  # offline and not cached, no such repo, bad repo id
        raise MissingWeightsError(
            f"{spec_name}: cannot load {what} from the Hugging Face hub repo {source!r} ({_one_line(err)}); "
            f"looked in the {_hub_cache_note()}. "
            + _how_to_fix(spec_name, f"the files of {source!r} (as written by save_pretrained)")
        ) from err


def load_torch_file(path: Path, *, spec_name: str) -> dict:
    """``torch.load`` of a checkpoint holding only tensors/containers (``weights_only=True``)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; say which file failed
        raise ValueError(
            f"{spec_name}: cannot read the checkpoint {path} as tensors only (torch.load weights_only=True): "
            f"{type(err).__name__}: {err}"
        ) from err


def pooled(features) -> torch.Tensor:
    """Projected embedding from ``get_image_features``/``get_text_features`` (transformers v4 and v5).

    transformers v4 returns the ``[B, D]`` tensor; v5 returns a model output whose ``pooler_output``
    holds the same projected tensor.
    """
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class PreferenceMLP(torch.nn.Module):
    """The linear head ``D→1024→128→64→16→1`` of the LAION improved aesthetic predictor and ImageReward.

    Layer indices (and so state-dict keys ``layers.{0,2,4,6,7}``) follow the published
    ``nn.Sequential``: Linear, Dropout(0.2), Linear, Dropout(0.2), Linear, Dropout(0.1), Linear, Linear.
    There is **no nonlinearity** (the ReLUs are commented out in both reference implementations), so
    in eval mode the head is one affine map ``x ↦ W x + b``. Input ``[B, D]`` → output ``[B]``.
    """

    def __init__(self, input_size: int):
        super().__init__()
        self.input_size = input_size
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], *, source: str) -> PreferenceMLP:
        """Build the head from ``layers.*`` tensors; the input size is read from ``layers.0.weight``."""
        if "layers.0.weight" not in state_dict:
            raise ValueError(
                f"{source}: expected the MLP head's keys 'layers.0.weight' ... 'layers.7.bias', "
                f"found {sorted(state_dict)[:8]}"
            )
        head = cls(int(state_dict["layers.0.weight"].shape[1]))
        try:
            head.load_state_dict(state_dict)
        except RuntimeError as err:  # missing/unexpected keys or wrong hidden sizes
            raise ValueError(f"{source}: not the published 5-layer linear head: {err}") from err
        return head.eval().requires_grad_(False)


def clip_center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """OpenAI CLIP's ``_transform(size)``: ``[3, size, size]`` normalised pixels of one PIL image.

    Same steps in the same order as ``clip/clip.py`` (and ImageReward's copy of it): torchvision
    ``Resize(size, BICUBIC)`` of the shortest side on the PIL image, ``CenterCrop(size)``, convert to
    RGB, ``ToTensor`` ([0, 1]), ``Normalize(CLIP_MEAN, CLIP_STD)``.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, [size, size])
    pixels = TF.to_tensor(image.convert("RGB"))
    return TF.normalize(pixels, CLIP_MEAN, CLIP_STD)
