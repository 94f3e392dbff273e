"""The tiny SD3-shaped pipeline: it saves and loads like real SD3 weights, generates, and its text side
has SD3's shapes (two CLIP encoders padded to T5's width, then T5 tokens; pooled CLIP projections).

Shapes expected by hand: CLIP states are [1, TEXT_MAX_LENGTH, 2 × TEXT_HIDDEN] = [1, 16, 64] and T5's
[1, max_sequence_length, T5_HIDDEN] = [1, 16, 64]; SD3 joins them along the token axis → [1, 32, 64].
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline
from PIL import Image
from transformers import AutoTokenizer, T5TokenizerFast

from diffusion_dpo import synthetic
from diffusion_dpo.models.tiny import (
    T5_HIDDEN,
    TEXT_HIDDEN,
    TEXT_MAX_LENGTH,
    build_tiny_sd3_pipeline,
    save_tiny_pipeline,
    write_tiny_t5_tokenizer,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTION = synthetic.caption(synthetic.Spec(shape="circle", color="red", background="blue"))
T5_LENGTH = 16


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3"), arch="sd3", seed=0)


@pytest.fixture(scope="module")
def sd3_pipe(sd3_path):
    return StableDiffusion3Pipeline.from_pretrained(sd3_path)


def _generate(pipe) -> Image.Image:
    out = pipe(
        CAPTION,
        num_inference_steps=2,
        height=32,
        width=32,
        max_sequence_length=T5_LENGTH,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    )
    return out.images[0]


def test_loads_through_model_index(sd3_path):
    model_index = json.loads((sd3_path / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusion3Pipeline"
    pipe = DiffusionPipeline.from_pretrained(sd3_path)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    assert pipe.text_encoder_3 is not None and pipe.tokenizer_3 is not None


def test_generates_a_32px_image(sd3_pipe):
    # The default size is the transformer's sample_size × the VAE's downsampling: the resolution built for.
    assert sd3_pipe.default_sample_size * sd3_pipe.vae_scale_factor == 32
    image = _generate(sd3_pipe)
    assert isinstance(image, Image.Image) and image.size == (32, 32)


def test_vae_has_sd3_latents_normalised_on_synthetic_images(sd3_path, sd3_pipe):
    config = json.loads((sd3_path / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 16
    assert config["shift_factor"] not in (None, 0.0)
    assert config["scaling_factor"] != 0.18215  # AutoencoderKL's default
    # (z - shift) * scale has about zero mean and unit std on the images the factors were fitted on.
    rng = np.random.default_rng(0)
    images = [synthetic.render(synthetic.sample_spec(rng), rng, 32) for _ in range(8)]
    pixels = torch.stack(
        [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
    )
    with torch.no_grad():
        z = sd3_pipe.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(0))
    z = (z - config["shift_factor"]) * config["scaling_factor"]
    assert z.shape == (8, 16, 16, 16)
    assert abs(float(z.mean())) < 0.2 and 0.8 < float(z.std()) < 1.2


def test_transformer_widths_match_the_text_encoders(sd3_pipe):
    config = sd3_pipe.transformer.config
    projections = [
        encoder.config.projection_dim for encoder in (sd3_pipe.text_encoder, sd3_pipe.text_encoder_2)
    ]
    assert config.pooled_projection_dim == sum(projections) == 2 * TEXT_HIDDEN
    assert config.joint_attention_dim == sd3_pipe.text_encoder_3.config.d_model == T5_HIDDEN
    assert config.caption_projection_dim == config.num_attention_heads * config.attention_head_dim
    # T5 at least as wide as both CLIP encoders, so encode_prompt pads their states rather than crops them.
    assert T5_HIDDEN >= 2 * TEXT_HIDDEN


@pytest.mark.parametrize("cls", [T5TokenizerFast, AutoTokenizer])
def test_t5_tokenizer_round_trips_a_caption(tmp_path, cls):
    tokenizer = cls.from_pretrained(write_tiny_t5_tokenizer(tmp_path))
    ids = tokenizer(CAPTION).input_ids
    # One token per word of the synthetic world, then T5's appended </s>.
    assert len(ids) == len(CAPTION.split()) + 1 and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTION
    padded = tokenizer(CAPTION, padding="max_length", max_length=T5_LENGTH).input_ids
    assert padded == ids + [tokenizer.pad_token_id] * (T5_LENGTH - len(ids))
    # An unseen word falls back to characters instead of <unk>.
    assert tokenizer.unk_token_id not in tokenizer("a zebra").input_ids


def test_encode_prompt_has_sd3_shapes(sd3_pipe):
    clip_length = sd3_pipe.tokenizer.model_max_length
    assert clip_length == TEXT_MAX_LENGTH
    with torch.no_grad():
        prompt_embeds, negative, pooled, negative_pooled = sd3_pipe.encode_prompt(
            CAPTION,
            prompt_2=None,
            prompt_3=None,
            max_sequence_length=T5_LENGTH,
            device="cpu",
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        other = sd3_pipe.encode_prompt(
            CAPTION.replace("red", "green"), None, None, max_sequence_length=T5_LENGTH, device="cpu",
            do_classifier_free_guidance=False,
        )[0]  # fmt: skip
    width = sd3_pipe.transformer.config.joint_attention_dim
    assert prompt_embeds.shape == (1, clip_length + T5_LENGTH, width) == (1, 32, 64)
    assert pooled.shape == (1, 2 * TEXT_HIDDEN)
    assert negative is None and negative_pooled is None
    # Both CLIP encoders' states survive (neither half cropped nor zero), and T5 sees the caption.
    clip, t5 = prompt_embeds[0, :clip_length], prompt_embeds[0, clip_length:]
    assert clip[:, :TEXT_HIDDEN].abs().sum() > 0 and clip[:, TEXT_HIDDEN:].abs().sum() > 0
    assert t5.abs().sum() > 0
    # "red" vs "green" is T5 token 1; the random encoder keeps the two apart.
    assert torch.nn.functional.cosine_similarity(t5[1], other[0, clip_length + 1], dim=0) < 0.5


def test_pipeline_without_t5(tmp_path):
    build_tiny_sd3_pipeline(t5=False).save_pretrained(tmp_path)
    # As for SD3 without T5, from_pretrained needs the missing components named: model_index.json holds
    # them as [null, null], which diffusers does not treat as optional.
    pipe = StableDiffusion3Pipeline.from_pretrained(tmp_path, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    with torch.no_grad():
        prompt_embeds = pipe.encode_prompt(
            CAPTION,
            None,
            None,
            max_sequence_length=T5_LENGTH,
            device="cpu",
            do_classifier_free_guidance=False,
        )[0]
    assert prompt_embeds.shape == (1, TEXT_MAX_LENGTH + T5_LENGTH, T5_HIDDEN)
    assert prompt_embeds[:, TEXT_MAX_LENGTH:].abs().sum() == 0  # zeros in place of T5 states
    assert _generate(pipe).size == (32, 32)


def test_save_tiny_pipeline_rejects_unknown_archs(tmp_path):
    with pytest.raises(ValueError, match="arch must be one of"):
        save_tiny_pipeline(tmp_path, arch="sd2")
    with pytest.raises(ValueError, match="contradicts"):
        save_tiny_pipeline(tmp_path, sdxl=True, arch="sd3")
