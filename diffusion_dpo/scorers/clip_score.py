"""CLIP score (Hessel et al. 2021, "CLIPScore", arXiv 2104.08718), as torchmetrics' ``CLIPScore`` defines it.

Per pair: ``100 · max(cos(E_img, E_txt), 0)`` with ``E`` the projected CLIP embeddings of a
transformers ``CLIPModel``; range [0, 100], typically ~25–35 for SD images with
``openai/clip-vit-large-patch14``. (The paper's CLIP-S uses weight 2.5 instead of 100 and ViT-B/32;
torchmetrics' scale is the one diffusion papers report.)

Preprocessing is the model's own processor (shortest side resized with PIL bicubic, centre crop, CLIP
normalisation; prompts tokenized with padding), as torchmetrics does with transformers 4 (see
``load_clip_preprocessing`` for transformers 5). One deliberate difference:
prompts longer than the text tower (77 tokens) are truncated by the tokenizer, which keeps the
end-of-text token the embedding is pooled from; torchmetrics cuts ``input_ids`` after tokenizing,
which drops that token. Prompts that fit score identically.

torchmetrics clamps the *mean* over its inputs at 0; here every pair is clamped on its own, which is
what torchmetrics returns for a single pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from .base import MODEL_WEIGHTS, Scorer, WeightFiles, load_pretrained, pooled

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
#: A saved CLIP processor: its image-processor config (transformers 5 writes processor_config.json)
#: and its tokenizer (fast tokenizer.json or slow vocab.json), one of each.
CLIP_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
CLIP_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def clip_pair_cosine(
    model,
    image_processor,
    tokenizer,
    images: list[Image.Image],
    prompts: list[str],
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_length: int,
) -> torch.Tensor:
    """Cosine ``[B]`` (float32) between the projected embeddings of ``images[i]`` and ``prompts[i]``.

    ``model`` is a transformers ``CLIPModel``; text is padded to the longest prompt of the batch and
    truncated at ``max_length`` tokens.
    """
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    text = tokenizer(prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    image_emb = pooled(model.get_image_features(pixel_values=pixel_values.to(device=device, dtype=dtype)))
    text_emb = pooled(
        model.get_text_features(
            input_ids=text["input_ids"].to(device), attention_mask=text["attention_mask"].to(device)
        )
    )
    image_emb = F.normalize(image_emb.float(), dim=-1)  # [B, D]
    text_emb = F.normalize(text_emb.float(), dim=-1)  # [B, D]
    return (image_emb * text_emb).sum(dim=-1)


def load_clip_preprocessing(source: str, *, spec_name: str, what: str):
    """(PIL-based ``CLIPImageProcessor``, tokenizer) saved at ``source``.

    The published scores were computed with transformers 4's ``CLIPImageProcessor``, which resizes
    with PIL; transformers 5 made a torchvision (tensor) resize the default and moved the PIL one to
    ``CLIPImageProcessorPil`` (pixels differ by up to ~0.015 after normalisation), so that one is used.
    """
    from transformers import AutoTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers >= 5
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor

    image_processor = load_pretrained(
        ImageProcessor, source, spec_name=spec_name, what=f"{what} image processor"
    )
    tokenizer = load_pretrained(AutoTokenizer, source, spec_name=spec_name, what=f"{what} tokenizer")
    return image_processor, tokenizer


def text_max_length(model, cap: int = 77) -> int:
    """Longest token sequence the text tower takes: ``min(cap, max_position_embeddings)``."""
    return min(cap, int(model.config.text_config.max_position_embeddings))


class CLIPScore(Scorer):
    """``100 · max(cos, 0)`` on a transformers CLIP model (torchmetrics' ``CLIPScore`` per pair)."""

    name = "clip_score"

    def __init__(
        self, model, image_processor, tokenizer, *, device="cpu", dtype=torch.float32, batch_size: int = 16
    ):
        super().__init__(batch_size)
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.image_processor, self.tokenizer = image_processor, tokenizer
        self.max_length = text_max_length(self.model)

    def cosine(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """``[N]`` cosine similarity of each image with its prompt."""
        return clip_pair_cosine(
            self.model,
            self.image_processor,
            self.tokenizer,
            images,
            prompts,
            device=self.device,
            dtype=self.dtype,
            max_length=self.max_length,
        )

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        return 100.0 * self.cosine(images, prompts).clamp(min=0.0)


def required_files(source: str | None) -> list[WeightFiles]:
    """What :func:`load_clip_score` reads: model and processor files, all from one folder or repo."""
    groups = (("config.json",), MODEL_WEIGHTS, CLIP_IMAGE_PROCESSOR_FILES, CLIP_TOKENIZER_FILES)
    return [WeightFiles(source or DEFAULT_CLIP_MODEL, groups)]


def load_clip_score(
    source: str | None, *, device="cpu", dtype=torch.float32, batch_size: int = 16
) -> CLIPScore:
    """CLIP score with the ``CLIPModel`` and ``CLIPProcessor`` of ``source`` (default ``openai/clip-vit-large-patch14``).

    ``source`` is a hub id or a folder written by ``CLIPModel.save_pretrained`` plus
    ``CLIPProcessor.save_pretrained`` (config.json, model weights, tokenizer files and the
    image-processor config).
    """
    from transformers import CLIPModel

    source = source or DEFAULT_CLIP_MODEL
    model = load_pretrained(CLIPModel, source, spec_name="clip_score", what="a transformers CLIPModel")
    image_processor, tokenizer = load_clip_preprocessing(source, spec_name="clip_score", what="the CLIP")
    return CLIPScore(model, image_processor, tokenizer, device=device, dtype=dtype, batch_size=batch_size)
