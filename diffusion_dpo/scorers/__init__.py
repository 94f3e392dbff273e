"""Image–text scorers of the evaluation suite: ``load_scorer("NAME")`` or ``load_scorer("NAME=PATH_OR_ID")``.

Every scorer is called as ``scorer(images: list[PIL.Image], prompts: list[str]) -> [N] float32`` (CPU)
and keeps its authors' preprocessing and scale, so numbers are comparable with published ones but
never across scorers:

==============  =====================================================  ===============================
name            score                                                  default weights
==============  =====================================================  ===============================
pickscore       logit_scale.exp() · cos  (SD ≈ 20–23)                  yuvalkirstain/PickScore_v1
hpsv2.0         100 · cos  (SD ≈ 25–30)                                xswu/HPSv2 HPS_v2_compressed.pt
hpsv2.1         100 · cos                                              xswu/HPSv2 HPS_v2.1_compressed.pt
clip_score      100 · max(cos, 0)  (torchmetrics CLIPScore)            openai/clip-vit-large-patch14
aesthetic       LAION aesthetic predictor v2, 1–10 rating scale        sac+logos+ava1-l14-linearMSE.pth
image_reward    ImageReward, standardised (mean 0, std 1)              THUDM/ImageReward ImageReward.pt
shapes          programmatic faithfulness on the synthetic shapes      (no weights)
shapes_color_   share of the image in the shape's named colour: a      (no weights)
area            deliberately gameable proxy of ``shapes``
==============  =====================================================  ===============================

Heavy libraries (transformers, open_clip) are imported only when a scorer is loaded.
``check_scorer("NAME[=PATH]")`` checks that every file a scorer needs is local or downloadable without
loading anything (``load_scorer`` runs it first), so a missing file is named before hours of work.

May import: the synthetic world (the ``shapes`` scorers); nothing above it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import MissingWeightsError, Scorer, WeightFiles, check_weight_files, parse_spec

__all__ = [
    "REQUIRED_FILES",
    "SCORERS",
    "MissingWeightsError",
    "Scorer",
    "WeightFiles",
    "check_scorer",
    "load_scorer",
    "missing_scorer_weights",
    "parse_spec",
    "required_files",
]


def _pickscore(source, **kw):
    from .pickscore import load_pickscore

    return load_pickscore(source, **kw)


def _hps(version: str):
    def load(source, **kw):
        from .hps import load_hps

        return load_hps(source, version=version, **kw)

    return load


def _clip_score(source, **kw):
    from .clip_score import load_clip_score

    return load_clip_score(source, **kw)


def _aesthetic(source, **kw):
    from .aesthetic import load_aesthetic

    return load_aesthetic(source, **kw)


def _image_reward(source, **kw):
    from .image_reward import load_image_reward

    return load_image_reward(source, **kw)


def _shapes(source, **kw):
    from .shapes import ShapesScorer

    return ShapesScorer(**kw)


def _shapes_color_area(source, **kw):
    from .shapes import ShapesColorAreaScorer

    return ShapesColorAreaScorer(**kw)


#: scorer name -> loader ``(source: str | None, *, device, dtype, batch_size) -> Scorer``.
SCORERS: dict[str, Callable[..., Scorer]] = {
    "pickscore": _pickscore,
    "hpsv2.0": _hps("hpsv2.0"),
    "hpsv2.1": _hps("hpsv2.1"),
    "clip_score": _clip_score,
    "aesthetic": _aesthetic,
    "image_reward": _image_reward,
    "shapes": _shapes,
    "shapes_color_area": _shapes_color_area,
}


def _files(name: str):
    def files(source):
        from importlib import import_module

        module = import_module(f"{__name__}.{name}")
        return module.required_files(source)

    return files


def _hps_files(version: str):
    def files(source):
        from .hps import required_files

        return required_files(source, version=version)

    return files


#: scorer name -> ``(source: str | None) -> list[WeightFiles]``: what its loader reads.
REQUIRED_FILES: dict[str, Callable[[str | None], list[WeightFiles]]] = {
    "pickscore": _files("pickscore"),
    "hpsv2.0": _hps_files("hpsv2.0"),
    "hpsv2.1": _hps_files("hpsv2.1"),
    "clip_score": _files("clip_score"),
    "aesthetic": _files("aesthetic"),
    "image_reward": _files("image_reward"),
    "shapes": lambda source: [],
    "shapes_color_area": lambda source: [],
}

#: scorers computed by code alone: they take no ``=PATH``
PROGRAMMATIC = ("shapes", "shapes_color_area")


def _parse(spec: str) -> tuple[str, str | None]:
    name, source = parse_spec(spec)
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r} in spec {spec!r}; available: {', '.join(SCORERS)}")
    if name in PROGRAMMATIC and source is not None:
        raise ValueError(f"the '{name}' scorer is programmatic and takes no weights; got '{spec}'")
    return name, source


def required_files(spec: str) -> list[WeightFiles]:
    """The files the scorer ``spec`` reads (see :class:`WeightFiles`), without reading them."""
    name, source = _parse(spec)
    return REQUIRED_FILES[name](source)


def check_scorer(spec: str) -> None:
    """Check that every file the scorer ``spec`` needs is local, cached or downloadable; load nothing.

    Files found on the hub are downloaded into the cache now. Raises ``ValueError`` for an unknown name
    or a malformed spec and one ``MissingWeightsError`` naming every missing file, the
    ``NAME=/path/to/folder`` option and the Hugging Face cache and environment variables.
    """
    name, _ = _parse(spec)
    check_weight_files(name, required_files(spec))


def missing_scorer_weights(specs: list[str]) -> list[str]:
    """:func:`check_scorer` for every spec of a run, before any work: raises ``ValueError`` naming the
    ``--scorer`` whose spec is malformed or unknown, and returns the message of each scorer whose weight
    files are missing (empty when all are there), so one error can name them all."""
    missing = []
    for spec in specs:
        try:
            check_scorer(spec)
        except MissingWeightsError as err:
            missing.append(str(err))
        except ValueError as err:
            raise ValueError(f"--scorer {spec!r}: {err}") from err
    return missing


def load_scorer(
    spec: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 16,
) -> Scorer:
    """Load a scorer from ``"NAME"`` (default weights) or ``"NAME=PATH_OR_ID"`` (local folder/file or hub id).

    Args:
        spec: e.g. ``"pickscore"``, ``"hpsv2.1=/models/hps"``, ``"clip_score=openai/clip-vit-base-patch32"``.
        device: where the model runs; scores always come back on the CPU.
        dtype: dtype of the backbone (small linear heads stay float32); scores are float32.
        batch_size: pairs per forward pass.

    Raises:
        ValueError: unknown name (the message lists ``SCORERS``) or malformed spec.
        MissingWeightsError: weights not found locally and not downloadable (says which file and how).
    """
    check_scorer(spec)  # one message naming every missing file, before a partial load
    name, source = _parse(spec)
    return SCORERS[name](source, device=device, dtype=dtype, batch_size=batch_size)
