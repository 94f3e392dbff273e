"""Scorers on tiny random models of the real architectures, loaded back via ``load_scorer("NAME=PATH")``.

Each forward is checked against an independent computation: torchmetrics' ``CLIPScore`` (CLIP score),
``logit_scale.exp() · cos`` from the model's own embeddings (PickScore), HPSv2's padded resize done
with ``F.interpolate`` and a zero canvas (HPS), the aesthetic head collapsed to its affine map on
embeddings from transformers' PIL ``CLIPImageProcessorPil`` (aesthetic), and a functional
re-implementation of BLIP's ViT + BERT (``vit.py``/``med.py``) on ImageReward's original checkpoint
keys (ImageReward).

torchmetrics 1.9's ``CLIPScore`` calls ``.norm`` on ``get_image_features``' result, which transformers 5
returns as a model output; ``_FeaturesAsTensors`` hands it the projected tensor, as transformers 4 did.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion_dpo.models.tiny import write_tiny_clip_tokenizer
from diffusion_dpo.scorers import (
    REQUIRED_FILES,
    SCORERS,
    MissingWeightsError,
    check_scorer,
    load_scorer,
    required_files,
)
from diffusion_dpo.scorers.base import CLIP_MEAN, CLIP_STD, pooled

PROMPTS = ["a red circle", "a photo of a blue square", "green triangle on a white background", "a cat", "dog"]
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"


def _images(sizes=((32, 32), (48, 32), (32, 48), (40, 40), (64, 40)), seed=0) -> list[Image.Image]:
    """Random RGB images of the given (width, height); non-square ones exercise crops and pads."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny transformers CLIPModel + CLIPProcessor (28 px, 14 px patches) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny_clip")
    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path))
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2
    )
    text.update(
        max_position_embeddings=16, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2)
    vision.update(image_size=28, patch_size=14)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))  # not the init value, so the test sees it is used
    model.save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    """A tiny open_clip CLIP (same ViT/text tower types as ViT-H-14) saved as HPSv2.1's checkpoint."""
    from open_clip.model import CLIP

    path = tmp_path_factory.mktemp("tiny_hps")
    model_cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    torch.manual_seed(1)
    model = CLIP(**model_cfg, output_dict=True).eval()
    torch.save({"state_dict": model.state_dict()}, path / "HPS_v2.1_compressed.pt")
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    return path, model


@pytest.fixture(scope="module")
def aesthetic_dir(clip_dir, tmp_path_factory):
    """The tiny CLIP's files plus a random head ``16→1024→128→64→16→1`` under the published file name."""
    import shutil

    path = tmp_path_factory.mktemp("tiny_aesthetic")
    for item in clip_dir.iterdir():
        shutil.copy(item, path / item.name)
    gen = torch.Generator().manual_seed(2)
    sizes = [(16, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    head = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes):
        head[f"layers.{index}.weight"] = torch.randn(n_out, n_in, generator=gen) / math.sqrt(n_in)
        head[f"layers.{index}.bias"] = 0.1 * torch.randn(n_out, generator=gen)
    torch.save(head, path / AESTHETIC_FILE)
    return path, head


# ImageReward: BLIP ViT (width 128 → 2 heads of 64, 2 blocks, 16 px patches, 32 px images) and a
# 2-layer BERT with cross-attention, written in ImageReward.pt's own key layout.
_IR_WORDS = (
    "a an the of on in with red green blue white circle square triangle photo cat dog background".split()
)
_IR_MED = dict(
    hidden_size=32,
    num_attention_heads=4,
    num_hidden_layers=2,
    intermediate_size=64,
    max_position_embeddings=40,
    layer_norm_eps=1e-12,
    hidden_act="gelu",
    pad_token_id=0,
    add_cross_attention=True,
    encoder_width=768,  # BLIP overrides it with the ViT width
)


def _image_reward_checkpoint(vocab_size: int, seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return scale * torch.randn(*shape, generator=gen)

    sd = {}
    width, patch, grid, depth = 128, 16, 2, 2
    v = "blip.visual_encoder."
    sd[v + "cls_token"] = rand(1, 1, width)
    sd[v + "pos_embed"] = rand(1, grid * grid + 1, width)
    sd[v + "patch_embed.proj.weight"] = rand(width, 3, patch, patch, scale=0.05)
    sd[v + "patch_embed.proj.bias"] = rand(width)
    for i in range(depth):
        b = f"{v}blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd[b + norm + ".weight"], sd[b + norm + ".bias"] = 1 + rand(width), rand(width)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = (
            rand(3 * width, width, scale=0.1),
            rand(3 * width),
        )
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = rand(width, width, scale=0.1), rand(width)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = rand(4 * width, width, scale=0.1), rand(4 * width)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = rand(width, 4 * width, scale=0.05), rand(width)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = 1 + rand(width), rand(width)

    t = "blip.text_encoder."
    d, inter = _IR_MED["hidden_size"], _IR_MED["intermediate_size"]
    sd[t + "embeddings.word_embeddings.weight"] = rand(vocab_size, d, scale=1.0)
    sd[t + "embeddings.position_embeddings.weight"] = rand(_IR_MED["max_position_embeddings"], d, scale=1.0)
    sd[t + "embeddings.position_ids"] = torch.arange(_IR_MED["max_position_embeddings"])[None]
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = 1 + rand(d), rand(d)
    for i in range(_IR_MED["num_hidden_layers"]):
        for part, kv_width in (("attention", d), ("crossattention", width)):
            b = f"{t}encoder.layer.{i}.{part}."
            sd[b + "self.query.weight"], sd[b + "self.query.bias"] = rand(d, d, scale=0.3), rand(d)
            sd[b + "self.key.weight"], sd[b + "self.key.bias"] = rand(d, kv_width, scale=0.3), rand(d)
            sd[b + "self.value.weight"], sd[b + "self.value.bias"] = rand(d, kv_width, scale=0.3), rand(d)
            sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = rand(d, d), rand(d)
            sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = 1 + rand(d), rand(d)
        b = f"{t}encoder.layer.{i}."
        sd[b + "intermediate.dense.weight"], sd[b + "intermediate.dense.bias"] = rand(inter, d), rand(inter)
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = rand(d, inter), rand(d)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = 1 + rand(d), rand(d)
    # BLIP_Pretrain's contrastive projections: in the checkpoint, unused for the reward.
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = rand(256, width), rand(256)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = rand(256, d), rand(256)
    sizes = [(d, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes):
        sd[f"mlp.layers.{index}.weight"] = rand(n_out, n_in, scale=1 / math.sqrt(n_in))
        sd[f"mlp.layers.{index}.bias"] = rand(n_out)
    return sd


@pytest.fixture(scope="module")
def image_reward_dir(tmp_path_factory):
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("tiny_image_reward")
    (path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_IR_WORDS]) + "\n"
    )
    tokenizer = BertTokenizer.from_pretrained(path)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    med = dict(_IR_MED, vocab_size=len(tokenizer))
    (path / "med_config.json").write_text(json.dumps(med))
    checkpoint = _image_reward_checkpoint(len(tokenizer))
    torch.save(checkpoint, path / "ImageReward.pt")
    return path, checkpoint, med, tokenizer


# ----------------------------------------------------------------------------------------------
# Registry and specs


def test_registry_lists_every_scorer_and_rejects_unknown_names():
    expected = {
        "pickscore", "hpsv2.0", "hpsv2.1", "clip_score", "aesthetic", "image_reward", "shapes",
        "shapes_color_area",
    }  # fmt: skip
    assert set(SCORERS) == expected
    with pytest.raises(ValueError) as err:
        load_scorer("hpsv2")  # ambiguous: the version is part of the name
    assert all(name in str(err.value) for name in expected)
    with pytest.raises(ValueError, match="empty PATH_OR_ID"):
        load_scorer("pickscore=")
    with pytest.raises(ValueError, match="takes no weights"):
        load_scorer("shapes=/some/path")
    with pytest.raises(ValueError, match="takes no weights"):
        load_scorer("shapes_color_area=/some/path")


def test_color_area_is_a_gameable_proxy_of_faithfulness():
    """shapes_color_area: 1 for a picture painted over in the shape's colour (which ``shapes`` scores
    ~0), the shape's share of the image for a faithful render, and the pixel formula by hand."""
    import numpy as np
    from PIL import Image

    from diffusion_dpo import synthetic

    prompt = "a red circle on a blue background"
    proxy, truth = load_scorer("shapes_color_area"), load_scorer("shapes")
    painted = Image.new("RGB", (32, 32), synthetic.COLORS["red"])
    render = synthetic.render(synthetic.parse_caption(prompt), np.random.default_rng(0), 32)
    p_painted, p_render = proxy([painted, render], [prompt] * 2).tolist()
    t_painted, t_render = truth([painted, render], [prompt] * 2).tolist()
    assert p_painted == pytest.approx(1.0)
    assert t_painted < 0.05 and t_render > 0.7  # the proxy's best image is the truth's worst
    assert 0.1 < p_render < 0.5  # a faithful render: about the circle's share of the picture
    # by hand: half the pixels pure red, half at RGB distance 0.25 from red -> (1 + e^-0.5) / 2
    half = np.zeros((2, 2, 3), dtype=np.uint8)
    half[:] = synthetic.COLORS["red"]
    half[1] = np.array(synthetic.COLORS["red"]) + np.array([0, 0, 64])  # 64/255 ≈ 0.251 away in blue
    d = 64 / 255
    expected = (1 + np.exp(-(d**2) / (2 * 0.25**2))) / 2
    assert proxy([Image.fromarray(half)], [prompt]).item() == pytest.approx(expected, rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Each scorer against an independent computation


class _FeaturesAsTensors(torch.nn.Module):
    """transformers-v4 feature API (tensors) over a v5 CLIPModel (model outputs), for torchmetrics 1.9."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values):
        return pooled(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids, attention_mask):
        return pooled(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def _torchmetrics_clip_scores(path, images, prompts) -> torch.Tensor:
    """torchmetrics' CLIPScore of each pair on its own (per-pair values, clamped at 0 as it does)."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    # The PIL image processor: what torchmetrics' CLIPProcessor.from_pretrained gave with transformers 4.
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil.from_pretrained(path),
        tokenizer=CLIPTokenizer.from_pretrained(path),
    )
    metric = CLIPScore(
        model_name_or_path=lambda: (_FeaturesAsTensors(CLIPModel.from_pretrained(path).eval()), processor)
    )
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            pixels = torch.from_numpy(np.array(image)).permute(
                2, 0, 1
            )  # uint8 [3, H, W], as torchmetrics takes
            expected.append(metric(pixels, prompt).item())
    return torch.tensor(expected)


def test_clip_score_matches_torchmetrics(clip_dir, tmp_path):
    from transformers import CLIPModel

    images = _images()
    expected = _torchmetrics_clip_scores(clip_dir, images, PROMPTS)
    assert (expected > 0).all()
    torch.testing.assert_close(
        load_scorer(f"clip_score={clip_dir}")(images, PROMPTS), expected, atol=1e-4, rtol=1e-5
    )

    # The same model with its text projection negated has cos -> -cos: every score is clamped to 0.
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        model.text_projection.weight.neg_()
    model.save_pretrained(tmp_path)
    for item in clip_dir.iterdir():
        if item.suffix in (".json", ".txt") and item.name != "config.json":
            (tmp_path / item.name).write_bytes(item.read_bytes())
    expected = _torchmetrics_clip_scores(tmp_path, images, PROMPTS)
    assert (expected == 0).all()
    torch.testing.assert_close(load_scorer(f"clip_score={tmp_path}")(images, PROMPTS), expected)


def test_pickscore_is_logit_scale_times_cosine(clip_dir):
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    images = _images()
    scorer = load_scorer(f"pickscore={clip_dir}")
    scores = scorer(images, PROMPTS)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    image_processor, tokenizer = (
        CLIPImageProcessorPil.from_pretrained(clip_dir),
        CLIPTokenizer.from_pretrained(clip_dir),
    )
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            pixel_values = image_processor(images=[image], return_tensors="pt")["pixel_values"]
            image_emb = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)[
                0
            ]
            tokens = tokenizer([prompt], return_tensors="pt")  # unpadded: independent of the batch
            text_emb = model.text_projection(model.text_model(**tokens).pooler_output)[0]
            cosine = image_emb @ text_emb / (image_emb.norm() * text_emb.norm())
            expected.append(50.0 * cosine)  # logit_scale = log(50) in the fixture
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-4, rtol=1e-5)
    assert scorer.name == "pickscore"


def _hps_pixels_by_hand(image: Image.Image, size: int) -> torch.Tensor:
    """Longest side to ``size`` (bicubic, antialiased), pasted centred on a black canvas, normalised."""
    x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float() / 255.0
    height, width = x.shape[-2:]
    new_h, new_w = round(height * size / max(height, width)), round(width * size / max(height, width))
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)[
            0
        ]
    canvas = torch.zeros(3, size, size)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = x
    return (canvas - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def test_hps_is_100_cosine_with_padded_resize(hps_dir):
    import open_clip

    path, model = hps_dir
    images = _images()
    scorer = load_scorer(f"hpsv2.1={path}")
    assert scorer.name == "hpsv2.1"
    scores = scorer(images, PROMPTS)

    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            image_emb = model.encode_image(_hps_pixels_by_hand(image, 28)[None])[0]
            text_emb = model.encode_text(open_clip.tokenize([prompt]))[0]
            expected.append(100.0 * image_emb @ text_emb / (image_emb.norm() * text_emb.norm()))
    torch.testing.assert_close(scores, torch.stack(expected), atol=1e-4, rtol=1e-5)

    # The versions are separate scorers: v2.0 does not silently take the v2.1 file.
    with pytest.raises(MissingWeightsError, match="HPS_v2_compressed.pt"):
        load_scorer(f"hpsv2.0={path}")


def test_hps_preprocessing_pads_the_short_side_with_black():
    from diffusion_dpo.scorers.hps import hps_preprocess

    color = (200, 100, 50)
    pixels = hps_preprocess(Image.new("RGB", (56, 28), color), 28)  # wide: 56x28 -> 28x14, 7 rows above/below
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    inside = (torch.tensor(color) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert pixels.shape == (3, 28, 28)
    torch.testing.assert_close(pixels[:, :7, :], black[:, None, None].expand(3, 7, 28))
    torch.testing.assert_close(pixels[:, 21:, :], black[:, None, None].expand(3, 7, 28))
    torch.testing.assert_close(pixels[:, 7:21, :], inside[:, None, None].expand(3, 14, 28), atol=1e-5, rtol=0)


def test_aesthetic_is_the_affine_head_on_normalised_clip_embeddings(aesthetic_dir):
    from transformers import CLIPImageProcessorPil, CLIPModel

    path, head = aesthetic_dir
    images = _images(sizes=((32, 32), (40, 40), (28, 28), (57, 57)))  # square: crop offsets cannot differ
    scores = load_scorer(f"aesthetic={path}")(images, ["ignored"] * len(images))

    # No nonlinearity in the published head: it collapses to w·x + b.
    weight, bias = head["layers.0.weight"], head["layers.0.bias"]
    for index in (2, 4, 6, 7):
        weight = head[f"layers.{index}.weight"] @ weight
        bias = head[f"layers.{index}.weight"] @ bias + head[f"layers.{index}.bias"]
    model = CLIPModel.from_pretrained(path).eval()
    pixel_values = CLIPImageProcessorPil.from_pretrained(path)(images=images, return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        emb = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    expected = (emb @ weight.T + bias).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)


def _blip_vit_reference(sd: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP ``VisionTransformer.forward`` (models/vit.py): pre-norm blocks, eps 1e-6, 64-d heads."""

    def g(key):
        return sd["blip.visual_encoder." + key]

    patch = g("patch_embed.proj.weight").shape[-1]
    x = F.conv2d(pixels, g("patch_embed.proj.weight"), g("patch_embed.proj.bias"), stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([g("cls_token").expand(len(x), -1, -1), x], dim=1) + g("pos_embed")
    batch, tokens, width = x.shape
    heads = width // 64
    i = 0
    while f"blip.visual_encoder.blocks.{i}.norm1.weight" in sd:
        b = f"blocks.{i}."
        h = F.layer_norm(x, (width,), g(b + "norm1.weight"), g(b + "norm1.bias"), eps=1e-6)
        qkv = F.linear(h, g(b + "attn.qkv.weight"), g(b + "attn.qkv.bias"))
        q, k, v = qkv.reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(batch, tokens, width)
        x = x + F.linear(h, g(b + "attn.proj.weight"), g(b + "attn.proj.bias"))
        h = F.layer_norm(x, (width,), g(b + "norm2.weight"), g(b + "norm2.bias"), eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, g(b + "mlp.fc1.weight"), g(b + "mlp.fc1.bias"))), g(b + "mlp.fc2.weight")
        )
        x = x + h + g(b + "mlp.fc2.bias")
        i += 1
    return F.layer_norm(x, (width,), g("norm.weight"), g("norm.bias"), eps=1e-6)


def _blip_bert_reference(sd: dict, med: dict, ids, mask, image_embeds) -> torch.Tensor:
    """BLIP ``BertModel.forward`` (models/med.py), mode "multimodal": post-norm layers with cross-attention."""

    def g(key):
        return sd["blip.text_encoder." + key]

    dim, heads, eps = med["hidden_size"], med["num_attention_heads"], med["layer_norm_eps"]

    def ln(x, key):
        return F.layer_norm(x, (dim,), g(key + ".weight"), g(key + ".bias"), eps=eps)

    def attention(prefix, hidden, context, additive_mask):
        def project(name, inp):
            out = F.linear(inp, g(f"{prefix}self.{name}.weight"), g(f"{prefix}self.{name}.bias"))
            return out.reshape(len(inp), -1, heads, dim // heads).transpose(1, 2)

        q, k, v = project("query", hidden), project("key", context), project("value", context)
        scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads) + additive_mask
        ctx = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(hidden.shape)
        out = F.linear(ctx, g(prefix + "output.dense.weight"), g(prefix + "output.dense.bias"))
        return ln(out + hidden, prefix + "output.LayerNorm")

    positions = g("embeddings.position_embeddings.weight")[: ids.shape[1]]
    x = ln(g("embeddings.word_embeddings.weight")[ids] + positions, "embeddings.LayerNorm")
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0  # BERT's extended attention mask
    for i in range(med["num_hidden_layers"]):
        b = f"encoder.layer.{i}."
        x = attention(b + "attention.", x, x, self_mask)
        x = attention(b + "crossattention.", x, image_embeds, 0.0)  # all image tokens attended
        h = F.gelu(F.linear(x, g(b + "intermediate.dense.weight"), g(b + "intermediate.dense.bias")))
        x = ln(
            F.linear(h, g(b + "output.dense.weight"), g(b + "output.dense.bias")) + x, b + "output.LayerNorm"
        )
    return x


def test_image_reward_matches_a_functional_blip_on_the_original_checkpoint(image_reward_dir):
    from torchvision import transforms as T

    path, sd, med, tokenizer = image_reward_dir
    images = _images()
    long_prompt = " ".join(["a red circle with a blue square"] * 6)  # 42 words: truncated at 35 tokens
    prompts = PROMPTS[:-1] + [long_prompt]
    scores = load_scorer(f"image_reward={path}")(images, prompts)

    preprocess = T.Compose(  # ImageReward's _transform(n_px), at this checkpoint's 32 px
        [
            T.Resize(32, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(32),
            lambda image: image.convert("RGB"),
            T.ToTensor(),
            T.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    expected = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts):
            image_embeds = _blip_vit_reference(sd, preprocess(image)[None])
            text = tokenizer(
                prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
            )
            hidden = _blip_bert_reference(sd, med, text["input_ids"], text["attention_mask"], image_embeds)
            reward = hidden[:, 0]
            for index in (0, 2, 4, 6, 7):
                reward = F.linear(reward, sd[f"mlp.layers.{index}.weight"], sd[f"mlp.layers.{index}.bias"])
            expected.append((reward[0, 0] - 0.16717362830052426) / 1.0333394966054072)
    expected = torch.stack(expected)
    assert expected.std() > 1e-2, "images/prompts should move the reward"
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# Shared behaviour


@pytest.fixture(scope="module")
def specs(clip_dir, hps_dir, aesthetic_dir, image_reward_dir):
    return {
        "clip_score": f"clip_score={clip_dir}",
        "pickscore": f"pickscore={clip_dir}",
        "hpsv2.1": f"hpsv2.1={hps_dir[0]}",
        "aesthetic": f"aesthetic={aesthetic_dir[0]}",
        "image_reward": f"image_reward={image_reward_dir[0]}",
    }


@pytest.mark.parametrize("name", ["clip_score", "pickscore", "hpsv2.1", "aesthetic", "image_reward"])
def test_batching_gives_the_same_scores_as_one_by_one(specs, name):
    images = _images(seed=5)
    batched = load_scorer(specs[name], batch_size=2)(images, PROMPTS)  # batches of 2, 2, 1
    single = load_scorer(specs[name], batch_size=1)
    one_by_one = torch.cat([single([image], [prompt]) for image, prompt in zip(images, PROMPTS)])
    assert batched.shape == (5,) and batched.dtype == torch.float32 and batched.device.type == "cpu"
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_dtype_is_respected_and_scores_stay_float32(specs):
    images = _images()
    scorer64 = load_scorer(specs["clip_score"], dtype=torch.float64)
    assert scorer64.model.dtype == torch.float64
    scores64 = scorer64(images, PROMPTS)
    assert scores64.dtype == torch.float32
    torch.testing.assert_close(
        scores64, load_scorer(specs["clip_score"])(images, PROMPTS), atol=1e-4, rtol=1e-5
    )


def test_inputs_are_validated(specs):
    scorer = load_scorer(specs["aesthetic"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(_images()[:2], ["a cat"])
    assert scorer([], []).shape == (0,)


@pytest.fixture
def offline_empty_cache(monkeypatch, tmp_path):
    """The firewall situation: no hub, an empty Hugging Face cache (the user's default weights missing)."""
    import huggingface_hub.constants

    cache = tmp_path / "empty_cache"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


#: What the message for each scorer's default weights must name: hub repos and files.
DEFAULT_WEIGHTS = {
    "pickscore": ["yuvalkirstain/PickScore_v1", "config.json", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"],
    "hpsv2.0": ["xswu/HPSv2", "HPS_v2_compressed.pt"],
    "hpsv2.1": ["xswu/HPSv2", "HPS_v2.1_compressed.pt"],
    "clip_score": ["openai/clip-vit-large-patch14", "config.json", "model.safetensors"],
    "aesthetic": ["camenduru/improved-aesthetic-predictor", AESTHETIC_FILE, "openai/clip-vit-large-patch14"],
    "image_reward": [
        "THUDM/ImageReward",
        "ImageReward.pt",
        "med_config.json",
        "google-bert/bert-base-uncased",
        "vocab.txt",
    ],
}


@pytest.mark.parametrize("name", sorted(DEFAULT_WEIGHTS))
def test_missing_default_weights_are_named_with_the_fix(offline_empty_cache, name):
    # check_scorer (what eval/evaluate.py runs before generating) and load_scorer give the same line.
    messages = []
    for call in (check_scorer, load_scorer):
        with pytest.raises(MissingWeightsError) as err:
            call(name)
        messages.append(str(err.value))
    assert messages[0] == messages[1]
    message = messages[0]
    assert "\n" not in message  # the CLI prints it as one line
    for needed in DEFAULT_WEIGHTS[name]:
        assert needed in message, f"{needed!r} not named in: {message}"
    assert f"--scorer {name}=/path/to/folder" in message
    assert "HF_HOME" in message and "HF_HUB_OFFLINE" in message and str(offline_empty_cache) in message


def test_missing_local_files_are_named(offline_empty_cache, clip_dir, tmp_path):
    import shutil

    # A folder without its weights: the check names the file before anything is loaded.
    broken = tmp_path / "clip_without_weights"
    shutil.copytree(clip_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(
        MissingWeightsError, match=r"model\.safetensors \(or pytorch_model\.bin\) in the folder"
    ):
        check_scorer(f"clip_score={broken}")
    check_scorer(f"clip_score={clip_dir}")  # the complete folder passes

    # A head file alone still needs the default CLIP backbone, which is not cached here.
    head_only = tmp_path / AESTHETIC_FILE
    torch.save(_zero_head(768), head_only)
    with pytest.raises(MissingWeightsError, match="openai/clip-vit-large-patch14") as err:
        load_scorer(f"aesthetic={head_only}")
    assert AESTHETIC_FILE not in str(err.value)  # the head itself was found

    with pytest.raises(MissingWeightsError, match="does not exist"):
        load_scorer(f"pickscore={tmp_path / 'no' / 'such' / 'folder'}")


def test_every_scorer_lists_its_files(specs):
    # The tiny folders hold exactly what the loaders read, so the check passes on each of them.
    assert set(REQUIRED_FILES) == set(SCORERS)
    for spec in specs.values():
        check_scorer(spec)
    assert required_files("shapes") == []
    with pytest.raises(ValueError, match="unknown scorer"):
        check_scorer("hpsv2")


def _zero_head(input_size: int) -> dict[str, torch.Tensor]:
    sizes = [(input_size, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    head = {}
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), sizes):
        head[f"layers.{index}.weight"] = torch.zeros(n_out, n_in)
        head[f"layers.{index}.bias"] = torch.zeros(n_out)
    return head
