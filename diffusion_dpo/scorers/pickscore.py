"""PickScore (Kirstain et al. 2023, "Pick-a-Pic", arXiv 2305.01569).

A CLIP-H/14 fine-tuned on Pick-a-Pic preferences. Score of a pair, exactly as the authors' README
computes it: ``logit_scale.exp() · cos(E_img, E_txt)`` with ``E`` the projected embeddings of the
transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` (``logit_scale.exp()`` ≈ 100). SD1.5/SDXL
images land around 20–23; differences of a fraction of a point are meaningful (``softmax`` of two
scores is the predicted preference probability).

Preprocessing is the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (PickScore_v1 ships
none): shortest side to 224 with PIL bicubic (the transformers-4 processor the authors used; see
``clip_score.load_clip_preprocessing``), centre crop 224, CLIP normalisation; prompts padded and
truncated to 77 tokens (``min(77, max_position_embeddings)`` for smaller test models).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .base import MODEL_WEIGHTS, WeightFiles, load_pretrained
from .clip_score import (
    CLIP_IMAGE_PROCESSOR_FILES,
    CLIP_TOKENIZER_FILES,
    CLIPScore,
    load_clip_preprocessing,
)

DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"

# A local folder "has a processor" when it holds both a tokenizer and an image-processor config.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class PickScore(CLIPScore):
    """``logit_scale.exp() · cos(image, prompt)`` of the PickScore CLIP model."""

    name = "pickscore"

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return self.model.logit_scale.float().exp() * self.cosine(images, prompts)


def _has_processor(folder: Path) -> bool:
    return any((folder / f).is_file() for f in _TOKENIZER_FILES) and any(
        (folder / f).is_file() for f in _IMAGE_PROCESSOR_FILES
    )


def _sources(source: str | None) -> tuple[str, str]:
    """(model source, processor source): the processor comes from a local folder only if it has one."""
    folder = Path(source).expanduser() if source is not None else None
    if folder is not None and folder.is_dir() and _has_processor(folder):
        return source, source
    return source or DEFAULT_PICKSCORE_MODEL, DEFAULT_PICKSCORE_PROCESSOR


def required_files(source: str | None) -> list[WeightFiles]:
    """What :func:`load_pickscore` reads: the CLIPModel, and the processor (maybe from another repo)."""
    model_source, processor_source = _sources(source)
    return [
        WeightFiles(model_source, (("config.json",), MODEL_WEIGHTS)),
        WeightFiles(processor_source, (CLIP_IMAGE_PROCESSOR_FILES, CLIP_TOKENIZER_FILES)),
    ]


def load_pickscore(
    source: str | None, *, device="cpu", dtype=torch.float32, batch_size: int = 16
) -> PickScore:
    """PickScore from ``source`` (default ``yuvalkirstain/PickScore_v1``).

    ``source`` is a hub id or a folder with a transformers ``CLIPModel`` (config.json + weights). The
    processor comes from the same folder when it holds one (tokenizer files and
    ``preprocessor_config.json``/``processor_config.json``), otherwise from
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` as in the authors' README.
    """
    from transformers import CLIPModel

    model_source, processor_source = _sources(source)
    model = load_pretrained(CLIPModel, model_source, spec_name="pickscore", what="the PickScore CLIPModel")
    image_processor, tokenizer = load_clip_preprocessing(
        processor_source, spec_name="pickscore", what="the CLIP-H/14"
    )
    return PickScore(model, image_processor, tokenizer, device=device, dtype=dtype, batch_size=batch_size)
