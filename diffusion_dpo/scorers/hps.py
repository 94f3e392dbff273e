"""Human Preference Score v2 / v2.1 (Wu et al. 2023, "Human Preference Score v2", arXiv 2306.09341).

An open_clip ViT-H-14 fine-tuned on HPD v2. Two released weights, never to be mixed: ``hpsv2.0``
(``HPS_v2_compressed.pt``) and ``hpsv2.1`` (``HPS_v2.1_compressed.pt``), both in the hub repo
``xswu/HPSv2``, each a ``{"state_dict": ...}`` for open_clip's ``CLIP`` with the ``ViT-H-14`` config.

Score of a pair: ``100 · cos(E_img, E_txt)`` of the normalised open_clip embeddings. The HPSv2
package's ``score()`` returns the bare cosine (≈0.2–0.3); its benchmark (``evaluation.py``) and the
paper's tables report it ×100, the scale used here (SD images ≈ 25–30).

Preprocessing follows HPSv2's validation transform (their open_clip fork, ``image_transform(...,
resize_longest_max=True)``): convert to RGB, ``ToTensor``, resize the **longest** side to 224
(bicubic, on the float tensor, so antialiased on torchvision ≥ 0.17), pad the short side with zeros
(black) centred as ``[pad_w//2, pad_h//2, pad_w - pad_w//2, pad_h - pad_h//2]``, CLIP normalisation.
The fork skips resize *and* pad when the longest side is already 224; here the pad is always applied
(it is zero for square images, and a non-square unpadded image would not fit the model anyway).
Prompts: open_clip's ``SimpleTokenizer`` (lower-cased, 77 tokens).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from .base import CLIP_MEAN, CLIP_STD, Scorer, WeightFiles, load_torch_file, resolve_weights_file

logger = logging.getLogger(__name__)

HPS_REPO = "xswu/HPSv2"
#: scorer name -> weights file in ``xswu/HPSv2`` (HPSv2's ``hps_version_map``).
HPS_FILES = {"hpsv2.0": "HPS_v2_compressed.pt", "hpsv2.1": "HPS_v2.1_compressed.pt"}
HPS_ARCH = "ViT-H-14"
#: Optional file next to the checkpoint that overrides the architecture (open_clip's hub format).
OPEN_CLIP_CONFIG = "open_clip_config.json"


def hps_preprocess(image: Image.Image, size: int) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize`` transform: ``[3, size, size]`` normalised pixels, longest side = ``size``."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    pixels = TF.to_tensor(image.convert("RGB"))  # [3, H, W] in [0, 1]
    height, width = pixels.shape[-2:]
    scale = size / max(height, width)
    new_h, new_w = round(height * scale), round(width * scale)
    if (new_h, new_w) != (height, width):
        pixels = TF.resize(pixels, [new_h, new_w], interpolation=InterpolationMode.BICUBIC, antialias=True)
    pad_h, pad_w = size - new_h, size - new_w
    pixels = TF.pad(pixels, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0.0)
    return TF.normalize(pixels, CLIP_MEAN, CLIP_STD)


class HPSv2(Scorer):
    """``100 · cos(image, prompt)`` of an HPSv2 / HPSv2.1 open_clip model."""

    def __init__(
        self, model, tokenizer, *, name: str, device="cpu", dtype=torch.float32, batch_size: int = 16
    ):
        super().__init__(batch_size)
        if name not in HPS_FILES:
            raise ValueError(f"name must be one of {sorted(HPS_FILES)}, got {name!r}")
        self.name = name
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        image_size = self.model.visual.image_size
        self.image_size = int(image_size[0] if isinstance(image_size, (tuple, list)) else image_size)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([hps_preprocess(image, self.image_size) for image in images])  # [B, 3, S, S]
        tokens = self.tokenizer(prompts)  # [B, 77]
        image_emb = self.model.encode_image(pixels.to(device=self.device, dtype=self.dtype), normalize=True)
        text_emb = self.model.encode_text(tokens.to(self.device), normalize=True)
        return 100.0 * (image_emb.float() * text_emb.float()).sum(dim=-1)


def _model_config(weights: Path, spec_name: str) -> dict:
    """ViT-H-14's open_clip config, or the ``model_cfg`` of an ``open_clip_config.json`` beside ``weights``."""
    import open_clip

    config_file = weights.parent / OPEN_CLIP_CONFIG
    if not config_file.is_file():
        return open_clip.get_model_config(HPS_ARCH)
    config = json.loads(config_file.read_text())
    if "model_cfg" not in config:
        raise ValueError(f"{spec_name}: {config_file} has no 'model_cfg' key (open_clip's hub config format)")
    logger.info("%s: architecture from %s instead of %s", spec_name, config_file, HPS_ARCH)
    return config["model_cfg"]


def build_hps_model(model_cfg: dict, state_dict: dict[str, torch.Tensor], *, source: str):
    """open_clip ``CLIP`` (plain ViT image and text towers) from ``model_cfg`` with ``state_dict`` loaded."""
    from open_clip.model import CLIP

    known = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
    if not known.issuperset(model_cfg) or not {"embed_dim", "vision_cfg", "text_cfg"}.issubset(model_cfg):
        raise ValueError(
            f"{source}: HPS needs a plain open_clip CLIP config with keys {sorted(known)}, got {sorted(model_cfg)}"
        )
    model = CLIP(**model_cfg, output_dict=True)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{source}: checkpoint does not fit open_clip CLIP {model_cfg.get('vision_cfg')}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def required_files(source: str | None, *, version: str) -> list[WeightFiles]:
    """What :func:`load_hps` reads: the version's checkpoint (the architecture is built in)."""
    return [WeightFiles(source or HPS_REPO, ((HPS_FILES[version],),))]


def load_hps(
    source: str | None, *, version: str, device="cpu", dtype=torch.float32, batch_size: int = 16
) -> HPSv2:
    """HPS ``version`` ("hpsv2.0" or "hpsv2.1") from ``source``.

    ``source``: None (download the version's file from ``xswu/HPSv2``), the ``.pt`` file itself, a hub
    repo id holding that file, or a folder holding it under its published name
    (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``). An ``open_clip_config.json``
    (``{"model_cfg": {...}}``) next to the file replaces the ViT-H-14 architecture (used by tests).
    """
    import open_clip

    if version not in HPS_FILES:
        raise ValueError(f"version must be one of {sorted(HPS_FILES)}, got {version!r}")
    weights = resolve_weights_file(source, HPS_FILES[version], default_repo=HPS_REPO, spec_name=version)
    checkpoint = load_torch_file(weights, spec_name=version)
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{version}: {weights} holds no state dict")
    model_cfg = _model_config(weights, version)
    model = build_hps_model(model_cfg, state_dict, source=str(weights))
    tokenizer = open_clip.tokenizer.SimpleTokenizer(
        context_length=model_cfg["text_cfg"].get("context_length", 77)
    )
    return HPSv2(model, tokenizer, name=version, device=device, dtype=dtype, batch_size=batch_size)
