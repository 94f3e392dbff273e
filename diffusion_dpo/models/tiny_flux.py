"""A tiny FLUX.1-shaped pipeline with random weights, built locally (no downloads).

The real architecture at toy size, as diffusers' own Flux tests build it: a one-double-block,
one-single-block ``FluxTransformer2DModel`` with the guidance embedding (FLUX.1 dev; ``guidance_embeds=False``
is schnell's layout), the 16-channel VAE with a latent shift and scale, a ``CLIPTextModel`` whose pooled
output is the pooled projection, T5 for the token states, and FLUX.1's scheduler config (dynamic
shifting). Text encoders, tokenizers and the VAE are the tiny SD3 pipeline's (:mod:`.tiny`).
"""

from __future__ import annotations

import torch

from diffusion_dpo.models.tiny import T5_HIDDEN, TEXT_HIDDEN

#: FLUX.1 dev/schnell's ``scheduler/scheduler_config.json``: with ``use_dynamic_shifting`` the saved
#: training sigmas are the unshifted t/1000 grid; the pipeline shifts by μ(image size) when sampling.
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip


def tiny_flux_transformer_config(guidance_embeds: bool = True) -> dict:
    """A 1+1-block FluxTransformer2DModel config (≈0.2M parameters) for packed 16-channel latents.

    Packed 2×2 patches of 16 channels are 64 input features (``patch_size`` 1, as FLUX.1). The rotary
    axes (index, row, column) must sum to the head width and be even; the text width is T5's, the
    pooled width CLIP's hidden size (``CLIPTextModel.pooler_output``).
    """
    return dict(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_HIDDEN, pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip


def build_tiny_flux_pipeline(seed: int = 0, resolution: int = 32, guidance_embeds: bool = True):
    """Build a tiny FLUX.1-shaped ``FluxPipeline`` (dev; ``guidance_embeds=False``: schnell-shaped)."""
    import tempfile

    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5TokenizerFast

    from diffusion_dpo.models.tiny import (
        _build_tiny_sd3_vae,
        _separate_word_embeddings,
        _text_config,
        _tiny_t5_encoder,
        write_tiny_clip_tokenizer,
        write_tiny_t5_tokenizer,
    )

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_2 = T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(tmp))
    text_encoder = CLIPTextModel(_text_config(len(tokenizer)))
    _separate_word_embeddings(text_encoder)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=_build_tiny_sd3_vae(resolution),  # 16 channels, (z − shift)·scale as FLUX.1's VAE
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=_tiny_t5_encoder(tokenizer_2),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**tiny_flux_transformer_config(guidance_embeds)),
    )
