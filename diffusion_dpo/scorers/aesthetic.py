"""LAION aesthetic predictor v2 ("improved aesthetic predictor", Schuhmann 2022).

A linear head trained (MSE) on SAC + LAION-Logos + AVA ratings, on top of OpenAI CLIP ViT-L/14 image
embeddings. Score of an image (the prompt is ignored): ``head(E / ‖E‖)`` with ``E`` the projected
768-d CLIP image embedding, on the 1–10 rating scale (SD images ≈ 5–6.5; LAION-Aesthetics uses > 6
as "aesthetic").

- Head: ``sac+logos+ava1-l14-linearMSE.pth`` from github.com/christophschuhmann/improved-aesthetic-predictor
  (``PreferenceMLP``: 768→1024→128→64→16→1, no nonlinearity, so one affine map). It is fetched from
  the hub mirror ``camenduru/improved-aesthetic-predictor`` (same file name); the file from the GitHub
  repo can be given instead as ``aesthetic=/path/to/sac+logos+ava1-l14-linearMSE.pth``.
- Backbone: OpenAI CLIP ViT-L/14 as the transformers port ``openai/clip-vit-large-patch14``
  (its projected image embedding: the same weights as ``clip.load("ViT-L/14")``, which the
  reference ``simple_inference.py`` uses), run in the requested dtype; the head runs in float32 as in
  the reference.
- Preprocessing: OpenAI CLIP's own transform (``clip_center_crop``: shortest side to 224 bicubic,
  centre crop, RGB, CLIP normalisation), done with torchvision on the PIL image as ``clip.load``'s
  ``preprocess`` does, rather than a transformers image processor (transformers 5's default one
  resizes tensors and is ~0.015 off after normalisation; its PIL variant equals this on square images
  and may differ by a pixel of crop offset on others).
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from .base import (
    MODEL_WEIGHTS,
    PreferenceMLP,
    Scorer,
    WeightFiles,
    clip_center_crop,
    load_pretrained,
    load_torch_file,
    pooled,
    resolve_weights_file,
)

AESTHETIC_REPO = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"


class AestheticPredictor(Scorer):
    """``head(E/‖E‖)`` on CLIP ViT-L/14 image embeddings; prompts are accepted and ignored."""

    name = "aesthetic"

    def __init__(
        self, clip_model, head: PreferenceMLP, *, device="cpu", dtype=torch.float32, batch_size: int = 16
    ):
        super().__init__(batch_size)
        self.device, self.dtype = torch.device(device), dtype
        self.clip_model = clip_model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.head = head.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        config = self.clip_model.config
        if int(config.projection_dim) != head.input_size:
            raise ValueError(
                f"aesthetic: CLIP embeddings are {config.projection_dim}-d but the head takes {head.input_size}-d"
            )
        self.image_size = int(getattr(config, "vision_config", config).image_size)

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected CLIP image embeddings ``[B, D]`` (CLIPModel or CLIPVisionModelWithProjection)."""
        if hasattr(self.clip_model, "get_image_features"):
            return pooled(self.clip_model.get_image_features(pixel_values=pixel_values))
        return self.clip_model(pixel_values=pixel_values).image_embeds

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([clip_center_crop(image, self.image_size) for image in images])  # [B, 3, S, S]
        emb = self.image_embeddings(pixels.to(device=self.device, dtype=self.dtype)).float()  # [B, 768]
        norm = emb.norm(dim=-1, keepdim=True)
        emb = emb / torch.where(norm == 0, torch.ones_like(norm), norm)  # the reference's `normalized`
        return self.head(emb)  # [B]


def _clip_source(source: str | None) -> str:
    """The CLIP backbone: a transformers model saved in the ``source`` folder, else ViT-L/14 from the hub."""
    folder = Path(source).expanduser() if source is not None else None
    if folder is not None and folder.is_dir() and (folder / "config.json").is_file():
        return str(folder)
    return AESTHETIC_CLIP


def required_files(source: str | None) -> list[WeightFiles]:
    """What :func:`load_aesthetic` reads: the head file and the CLIP backbone."""
    return [
        WeightFiles(source or AESTHETIC_REPO, ((AESTHETIC_FILE,),)),
        WeightFiles(_clip_source(source), (("config.json",), MODEL_WEIGHTS)),
    ]


def load_aesthetic(
    source: str | None, *, device="cpu", dtype=torch.float32, batch_size: int = 16
) -> AestheticPredictor:
    """The aesthetic predictor; ``source`` says where the head (and optionally the CLIP model) are.

    - None: head ``sac+logos+ava1-l14-linearMSE.pth`` from ``camenduru/improved-aesthetic-predictor``,
      CLIP from ``openai/clip-vit-large-patch14``.
    - a file: the head (``layers.*`` state dict); CLIP from ``openai/clip-vit-large-patch14``.
    - a folder: must hold ``sac+logos+ava1-l14-linearMSE.pth``; if it also holds a transformers CLIP
      model (``config.json`` + weights, a ``CLIPModel`` or ``CLIPVisionModelWithProjection``), that is
      the backbone, otherwise ``openai/clip-vit-large-patch14``.
    - a hub repo id: the head file from that repo; CLIP from ``openai/clip-vit-large-patch14``.
    """
    from transformers import AutoConfig, CLIPModel, CLIPVisionModelWithProjection

    head_file = resolve_weights_file(
        source, AESTHETIC_FILE, default_repo=AESTHETIC_REPO, spec_name="aesthetic"
    )
    head = PreferenceMLP.from_state_dict(
        load_torch_file(head_file, spec_name="aesthetic"), source=str(head_file)
    )
    clip_source = _clip_source(source)
    what = "the CLIP ViT-L/14 model"
    config = load_pretrained(AutoConfig, clip_source, spec_name="aesthetic", what=what)
    # A vision-only checkpoint loads as such; a full CLIPModel keeps its top-level projection_dim.
    cls = CLIPVisionModelWithProjection if config.model_type == "clip_vision_model" else CLIPModel
    clip_model = load_pretrained(cls, clip_source, spec_name="aesthetic", what=what)
    return AestheticPredictor(clip_model, head, device=device, dtype=dtype, batch_size=batch_size)
