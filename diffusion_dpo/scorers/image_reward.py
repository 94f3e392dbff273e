"""ImageReward (Xu et al. 2023, "ImageReward", arXiv 2304.05977), on transformers' BLIP modules.

The model: BLIP's ViT-L/16 image encoder (224 px), BLIP's BERT-base text encoder with cross-attention
to all image tokens in every layer, and a linear head ``768→1024→128→64→16→1`` (``PreferenceMLP``) on
the text encoder's ``[CLS]`` output. Score of a pair, as ``ImageReward.score`` computes it:
``(head(h_CLS) − 0.16717362830052426) / 1.0333394966054072``, i.e. standardised with the mean and
std of the head's output that ImageReward publishes (so 0 is an average image of its data).

Same computation as the reference (``THUDM/ImageReward``, ``ImageReward/ImageReward.py``):
- image: OpenAI CLIP's transform at 224 (``clip_center_crop``: shortest side bicubic, centre crop,
  RGB, CLIP normalisation); the ViT's last hidden states (after its final LayerNorm, all 1 + 196
  tokens) are the cross-attention keys, with an all-ones mask;
- text: BLIP's tokenizer (``bert-base-uncased`` + ``[DEC]`` bos + ``[ENC]`` special tokens), padded to
  ``max_length=35`` and truncated there; the text encoder runs bidirectionally ("multimodal" mode) with
  the padding mask; the first (``[CLS]``) token is kept — ImageReward does not swap in ``[ENC]``.

The checkpoint ``ImageReward.pt`` (hub ``THUDM/ImageReward``) is BLIP's own module layout; its keys
are renamed onto ``BlipVisionModel`` / ``BlipTextModel`` (same architecture; the ViT's LayerNorm eps is
BLIP's 1e-6). The ViT's size is read from the checkpoint (depth, width, patch, image size) with BLIP's
64-d attention heads; the text encoder's size from ``med_config.json`` (same hub repo).
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch
from PIL import Image

from .base import (
    PreferenceMLP,
    Scorer,
    WeightFiles,
    clip_center_crop,
    load_pretrained,
    load_torch_file,
    resolve_weights_file,
)

logger = logging.getLogger(__name__)

IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
#: BLIP's ``init_tokenizer`` loads 'bert-base-uncased' (now hosted as google-bert/bert-base-uncased).
BERT_TOKENIZER = "google-bert/bert-base-uncased"
#: ImageReward's published normalisation of the head output (``ImageReward.__init__``).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_TEXT_LENGTH = 35
BLIP_VIT_HEAD_DIM = 64  # ViT-B/16 (768/12) and ViT-L/16 (1024/16) in BLIP's create_vit
BLIP_VIT_LAYER_NORM_EPS = 1e-6  # BLIP's VisionTransformer: partial(nn.LayerNorm, eps=1e-6)

_VISION_PREFIX = "blip.visual_encoder."
_TEXT_PREFIX = "blip.text_encoder."
_HEAD_PREFIX = "mlp."
# BLIP VisionTransformer (timm layout) -> transformers BlipVisionModel.
_VIT_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
)


def _rename_vit_key(key: str) -> str:
    for pattern, replacement in _VIT_RENAMES:
        if re.search(pattern, key):
            return re.sub(pattern, replacement, key)
    raise ValueError(f"image_reward: unexpected key in the BLIP ViT: {_VISION_PREFIX}{key}")


def split_image_reward_state_dict(
    state_dict: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """ImageReward.pt → (``BlipVisionModel`` state dict, ``BlipTextModel`` state dict, head state dict).

    Keys outside the three parts that scoring uses (``blip.vision_proj``, ``blip.text_proj``) are
    dropped, as is the text embeddings' ``position_ids`` buffer.
    """
    vision, text, head, ignored = {}, {}, {}, []
    for key, value in state_dict.items():
        if key.startswith(_VISION_PREFIX):
            vision[_rename_vit_key(key.removeprefix(_VISION_PREFIX))] = value
        elif key.startswith(_TEXT_PREFIX):
            name = key.removeprefix(_TEXT_PREFIX)
            if name != "embeddings.position_ids":
                text[name] = value
        elif key.startswith(_HEAD_PREFIX):
            head[key.removeprefix(_HEAD_PREFIX)] = value
        else:
            ignored.append(key)
    if not vision or not text or not head:
        raise ValueError(
            "image_reward: checkpoint lacks one of the parts "
            f"{_VISION_PREFIX}*, {_TEXT_PREFIX}*, {_HEAD_PREFIX}* (found {len(vision)}, {len(text)}, {len(head)} keys)"
        )
    if ignored:
        logger.debug(
            "image_reward: ignoring %d checkpoint keys not used for scoring: %s", len(ignored), ignored[:4]
        )
    return vision, text, head


def blip_vision_config(vision_state_dict: dict[str, torch.Tensor]):
    """``BlipVisionConfig`` of BLIP's ViT with the sizes read off its (renamed) weights."""
    from transformers import BlipVisionConfig

    width = int(vision_state_dict["embeddings.class_embedding"].shape[-1])
    patch = int(vision_state_dict["embeddings.patch_embedding.weight"].shape[-1])
    grid = math.isqrt(int(vision_state_dict["embeddings.position_embedding"].shape[1]) - 1)
    depth = 1 + max(int(k.split(".")[2]) for k in vision_state_dict if k.startswith("encoder.layers."))
    if width % BLIP_VIT_HEAD_DIM:
        raise ValueError(
            f"image_reward: ViT width {width} is not a multiple of BLIP's head size {BLIP_VIT_HEAD_DIM}"
        )
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=int(vision_state_dict["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=depth,
        num_attention_heads=width // BLIP_VIT_HEAD_DIM,
        image_size=grid * patch,
        patch_size=patch,
        hidden_act="gelu",
        layer_norm_eps=BLIP_VIT_LAYER_NORM_EPS,
        attention_dropout=0.0,
    )


def blip_text_config(med_config: dict, encoder_width: int):
    """``BlipTextConfig`` of BLIP's text encoder from its ``med_config.json`` (BERT config keys)."""
    from transformers import BlipTextConfig

    if med_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError("image_reward: only absolute position embeddings are supported (med_config.json)")
    return BlipTextConfig(
        vocab_size=int(med_config["vocab_size"]),
        hidden_size=int(med_config["hidden_size"]),
        encoder_hidden_size=encoder_width,  # BLIP sets med_config.encoder_width = vision width
        intermediate_size=int(med_config["intermediate_size"]),
        num_hidden_layers=int(med_config["num_hidden_layers"]),
        num_attention_heads=int(med_config["num_attention_heads"]),
        max_position_embeddings=int(med_config["max_position_embeddings"]),
        hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=float(med_config.get("layer_norm_eps", 1e-12)),
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=int(med_config.get("pad_token_id", 0)),
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        is_decoder=True,  # builds the cross-attention layers; forward runs with is_decoder=False
        use_cache=False,
    )


class ImageReward(Scorer):
    """Standardised ImageReward score of (image, prompt) pairs."""

    name = "image_reward"

    def __init__(
        self,
        vision_model,
        text_model,
        head: PreferenceMLP,
        tokenizer,
        *,
        device="cpu",
        dtype=torch.float32,
        batch_size: int = 16,
    ):
        super().__init__(batch_size)
        self.device, self.dtype = torch.device(device), dtype
        self.vision_model = vision_model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.text_model = text_model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.head = head.to(device=self.device, dtype=torch.float32).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(self.vision_model.config.image_size)

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([clip_center_crop(image, self.image_size) for image in images])  # [B, 3, S, S]
        image_embeds = self.vision_model(pixel_values=pixels.to(device=self.device, dtype=self.dtype))
        image_embeds = image_embeds.last_hidden_state  # [B, 1 + N, W]
        text = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH, return_tensors="pt"
        )
        out = self.text_model(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long, device=self.device),
            is_decoder=False,
        )
        cls = out.last_hidden_state[:, 0, :].float()  # [B, 768]
        return (self.head(cls) - REWARD_MEAN) / REWARD_STD


def _sources(source: str | None) -> tuple[str | None, str]:
    """(where ``med_config.json`` comes from, where the tokenizer comes from) for a scorer ``source``.

    ``med_config.json`` and ``vocab.txt`` are taken from beside a checkpoint file or from the folder
    when they are there; ``None`` means the default repo.
    """
    config_source, folder = source, None
    local = Path(source).expanduser() if source is not None else None
    if local is not None and local.is_file():
        sibling = local.parent / MED_CONFIG_FILE
        config_source = str(sibling) if sibling.is_file() else None
    if local is not None and local.exists():
        folder = local if local.is_dir() else local.parent
    tokenizer = str(folder) if folder is not None and (folder / "vocab.txt").is_file() else BERT_TOKENIZER
    return config_source, tokenizer


def required_files(source: str | None) -> list[WeightFiles]:
    """What :func:`load_image_reward` reads: the checkpoint, ``med_config.json`` and BERT's vocabulary."""
    config_source, tokenizer_source = _sources(source)
    return [
        WeightFiles(source or IMAGE_REWARD_REPO, ((IMAGE_REWARD_FILE,),)),
        WeightFiles(config_source or IMAGE_REWARD_REPO, ((MED_CONFIG_FILE,),)),
        WeightFiles(tokenizer_source, (("vocab.txt",),)),
    ]


def _bert_tokenizer(source: str):
    """BLIP's tokenizer: bert-base-uncased (a folder with ``vocab.txt`` or the hub) + [DEC] and [ENC]."""
    from transformers import BertTokenizer

    tokenizer = load_pretrained(
        BertTokenizer, source, spec_name="image_reward", what="the bert-base-uncased tokenizer"
    )
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def load_image_reward(
    source: str | None, *, device="cpu", dtype=torch.float32, batch_size: int = 16
) -> ImageReward:
    """ImageReward from ``source``.

    - None: ``ImageReward.pt`` and ``med_config.json`` from ``THUDM/ImageReward``, tokenizer
      ``google-bert/bert-base-uncased``.
    - a folder: ``ImageReward.pt`` and ``med_config.json`` (both required); the BERT tokenizer from the
      same folder if it has ``vocab.txt``, otherwise from the hub.
    - the ``.pt`` file: ``med_config.json`` (and ``vocab.txt``) next to it if present, else from the hub.
    - a hub repo id: both files from that repo.
    """
    from transformers import BlipTextModel, BlipVisionModel

    weights = resolve_weights_file(
        source, IMAGE_REWARD_FILE, default_repo=IMAGE_REWARD_REPO, spec_name="image_reward"
    )
    config_source, tokenizer_source = _sources(source)
    med_file = resolve_weights_file(
        config_source, MED_CONFIG_FILE, default_repo=IMAGE_REWARD_REPO, spec_name="image_reward"
    )
    checkpoint = load_torch_file(weights, spec_name="image_reward")
    vision_sd, text_sd, head_sd = split_image_reward_state_dict(checkpoint)

    vision_config = blip_vision_config(vision_sd)
    vision_model = BlipVisionModel(vision_config)
    text_config = blip_text_config(json.loads(med_file.read_text()), vision_config.hidden_size)
    text_model = BlipTextModel(text_config, add_pooling_layer=False)
    for part, model, state_dict in (("ViT", vision_model, vision_sd), ("text encoder", text_model, text_sd)):
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as err:  # missing/unexpected keys, or med_config.json sizes that do not fit
            raise ValueError(f"image_reward: the {part} weights in {weights} do not fit: {err}") from err
    head = PreferenceMLP.from_state_dict(head_sd, source=str(weights))

    tokenizer = _bert_tokenizer(tokenizer_source)
    return ImageReward(
        vision_model, text_model, head, tokenizer, device=device, dtype=dtype, batch_size=batch_size
    )
