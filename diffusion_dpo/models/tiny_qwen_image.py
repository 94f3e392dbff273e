"""A tiny Qwen-Image pipeline with random weights, built locally (no downloads).

The real parts at toy sizes: ``QwenImageTransformer2DModel``, ``AutoencoderKLQwenImage`` (per-channel
``latents_mean``/``latents_std`` fitted to the synthetic images), a ``Qwen2_5_VLForConditionalGeneration``
text encoder built from a config, and a byte-level BPE ``Qwen2Tokenizer`` with the chat tokens of the
pipeline's prompt template. The template's system prefix is exactly the 34 tokens the pipeline drops
(``prompt_template_encode_start_idx``), as with the real tokenizer, so the states that remain are the
caption's and the template's tail, not a cut through the system prompt.
"""

from __future__ import annotations

import logging

import torch

from diffusion_dpo import synthetic

logger = logging.getLogger(__name__)

#: Width of the tiny Qwen2.5-VL text model, and so the transformer's ``joint_attention_dim``.
QWEN_TEXT_HIDDEN = 32
#: The chat tokens of ``QwenImagePipeline.prompt_template_encode`` (and the pad/eos token).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Words of the prompt template, each one BPE token (a leading space is part of a GPT-2-style token).
TEMPLATE_WORDS = (
    "system user assistant Describe the image by detailing color shape size texture quantity text "
    "spatial relationships of objects and background"
).split()
#: How many leading template tokens the pipeline drops (QwenImagePipeline.prompt_template_encode_start_idx).
TEMPLATE_DROP = 34
#: The channels of the tiny VAE's latents (the real one's z_dim).
Z_DIM = 16


def build_tiny_qwen_tokenizer(words: tuple[str, ...] | list[str] = synthetic.VOCABULARY):
    """A ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer) in which every template word and every
    one of ``words`` (default: the synthetic world's) is one token, with or without a leading space; any
    other text falls back to bytes."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    pieces = []
    for word in dict.fromkeys([*TEMPLATE_WORDS, *words]):
        pieces += [byte_level.pre_tokenize_str(text)[0][0] for text in (word, " " + word)]
    vocab_tokens = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte characters
    merges: list[tuple[str, str]] = []

    def add_chain(parts: list[str]) -> None:
        while len(parts) > 1:
            merge = (parts[0], parts[1])
            if merge not in merges:
                merges.append(merge)
                vocab_tokens.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1], *parts[2:]]

    # longer pieces first, then repair: merges of one word can cut across another's (as in
    # tiny.write_tiny_clip_tokenizer); chain what a piece still splits into until every piece is one token
    for piece in sorted(pieces, key=len, reverse=True):
        add_chain(list(piece))

    def build():
        vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_tokens))}
        vocab.update({tok: len(vocab) + i for i, tok in enumerate(SPECIAL_TOKENS)})
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=list(merges), model_max_length=2048)
        tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})
        return tokenizer

    tokenizer = build()
    for _ in range(6):
        broken = [p for p in pieces if len(tokenizer._tokenizer.model.tokenize(p)) > 1]
        if not broken:
            break
        for piece in broken:
            add_chain([t.value for t in tokenizer._tokenizer.model.tokenize(piece)])
        tokenizer = build()
    else:
        raise RuntimeError(f"the tiny Qwen tokenizer could not make {broken[:5]} single tokens")
    return tokenizer


def tiny_qwen_text_config(tokenizer):
    """A 2-layer, 32-wide ``Qwen2_5_VLConfig`` (its vision tower is built but never used: captions only)."""
    from transformers import Qwen2_5_VLConfig

    vocab = len(tokenizer)
    # the vision tokens get ids of their own past the tokenizer's, so no caption token is read as an image
    image, video, start, end = vocab, vocab + 1, vocab + 2, vocab + 3
    return Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=QWEN_TEXT_HIDDEN, intermediate_size=2 * QWEN_TEXT_HIDDEN, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, vocab_size=vocab + 4,
            rope_scaling={"mrope_section": [2, 2, 4], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0, max_position_embeddings=2048,
            bos_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.pad_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=QWEN_TEXT_HIDDEN),
        vocab_size=vocab + 4, image_token_id=image, video_token_id=video, vision_start_token_id=start,
        vision_end_token_id=end,
    )  # fmt: skip


def tiny_qwen_image_transformer_config() -> dict:
    """A two-block ``QwenImageTransformer2DModel`` for 16-channel latents packed 2×2 (64 features a token)."""
    return dict(
        patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2, attention_head_dim=16,
        num_attention_heads=4, joint_attention_dim=QWEN_TEXT_HIDDEN, guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


def tiny_qwen_image_vae_config() -> dict:
    """A one-downsample ``AutoencoderKLQwenImage`` (spatial factor 2: 32 px ↔ 16×16 latents, 64 tokens)."""
    return dict(base_dim=16, z_dim=Z_DIM, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])


#: Qwen-Image's scheduler config (Qwen/Qwen-Image scheduler/scheduler_config.json, as FLUX_QWEN.md notes):
#: training σ on the unshifted grid, a resolution-dependent shift at sampling only.
QWEN_IMAGE_SCHEDULER = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
)  # fmt: skip


@torch.no_grad()
def _build_vae(resolution: int):
    import numpy as np
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(**tiny_qwen_image_vae_config())
    # a nearly deterministic posterior, as the tiny SD VAEs (tiny.build_tiny_pipeline): the log-variance
    # half of the quant convolution
    vae.quant_conv.weight[Z_DIM:].zero_()
    vae.quant_conv.bias[Z_DIM:].fill_(-12.0)
    rng = np.random.default_rng(0)
    images = [synthetic.render(synthetic.sample_spec(rng), rng, resolution) for _ in range(32)]
    pixels = torch.stack(
        [torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images]
    )
    means = vae.encode(pixels.unsqueeze(2)).latent_dist.mean  # [N, C, 1, h, w]
    # Qwen-Image normalises each channel: (z − latents_mean[c]) / latents_std[c]
    vae.register_to_config(
        latents_mean=means.mean(dim=(0, 2, 3, 4)).tolist(), latents_std=means.std(dim=(0, 2, 3, 4)).tolist()
    )
    return vae


def build_tiny_qwen_image_pipeline(seed: int = 0, resolution: int = 32):
    """A tiny ``QwenImagePipeline`` with random weights, in memory."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    tokenizer = build_tiny_qwen_tokenizer()
    text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_qwen_text_config(tokenizer)).eval()
    with torch.no_grad():  # unit-scale token embeddings keep words apart (tiny._separate_word_embeddings)
        text_encoder.get_input_embeddings().weight.normal_(0.0, 1.0)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=_build_vae(resolution),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=QwenImageTransformer2DModel(**tiny_qwen_image_transformer_config()),
    )
