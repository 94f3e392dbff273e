"""The benchmark's model architectures, built locally with random weights: nothing is downloaded.

Speed and memory do not depend on the weights, so a diffusers folder holding the published
architecture with random weights is timed exactly like the real checkpoint: the trainer loads it
with the same ``from_pretrained`` calls. The configs below are copied from the published
``config.json`` files (UNet, VAE, CLIP text encoders, noise schedule) of
``runwayml/stable-diffusion-v1-5`` and ``stabilityai/stable-diffusion-xl-base-1.0``. The tokenizer is
the project's tiny CLIP BPE tokenizer padded to 77 tokens: the text encoder sees sequences of the real
length, and its cost does not depend on which token ids they hold.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: runwayml/stable-diffusion-v1-5 unet/config.json
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)

#: runwayml/stable-diffusion-v1-5 vae/config.json (SDXL's differs in sample size and scaling factor)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

#: CLIP ViT-L/14's text encoder: SD1.5's text_encoder and SDXL's first one (text_encoder/config.json)
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    bos_token_id=0,
    eos_token_id=2,  # the legacy value: the pooled state is taken at the highest token id (the end token)
    pad_token_id=1,
)

#: stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=2048,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    conv_in_kernel=3,
    conv_out_kernel=3,
    resnet_time_scale_shift="default",
    time_embedding_type="positional",
)

#: stabilityai/stable-diffusion-xl-base-1.0 vae/config.json
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

#: OpenCLIP ViT-bigG/14's text encoder: SDXL's text_encoder_2/config.json
CLIP_G_TEXT = dict(
    vocab_size=49408,
    hidden_size=1280,
    intermediate_size=5120,
    projection_dim=1280,
    num_hidden_layers=32,
    num_attention_heads=20,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    dropout=0.0,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

#: the training noise schedule of both (scheduler/scheduler_config.json)
SD_SCHEDULE = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)

#: name -> (SDXL-shaped, default resolution, what it is)
ARCHS = {
    "tiny": (False, 64, "the test model: tiny SD1.5-shaped UNet/VAE/CLIP (diffusion_dpo.models.tiny)"),
    "tiny_sdxl": (True, 64, "the test model, SDXL-shaped: two tiny CLIP encoders, add_time_ids"),
    "sd15": (False, 512, "Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L text encoder, random weights"),
    "sdxl": (True, 1024, "SDXL base 1.0's UNet, VAE and CLIP ViT-L + bigG text encoders, random weights"),
}


def is_sdxl(arch: str) -> bool:
    return ARCHS[arch][0]


def default_resolution(arch: str) -> int:
    return ARCHS[arch][1]


def _tokenizer(path: Path, max_length: int):
    from transformers import CLIPTokenizer

    from diffusion_dpo.models.tiny import write_tiny_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_tiny_clip_tokenizer(path))
    tokenizer.model_max_length = max_length
    return tokenizer


def build_pipeline(arch: str, seed: int = 0):
    """The ``arch`` pipeline with random weights, in memory (fp32, on CPU)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from diffusion_dpo.models.tiny import build_tiny_pipeline

    if arch in ("tiny", "tiny_sdxl"):
        return build_tiny_pipeline(sdxl=arch == "tiny_sdxl", seed=seed)
    import tempfile

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp), 77)
    scheduler = DDPMScheduler(**SD_SCHEDULE)
    if arch == "sd15":
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=AutoencoderKL(**SD15_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**SD15_UNET),
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if arch == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=AutoencoderKL(**SDXL_VAE),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=UNet2DConditionModel(**SDXL_UNET),
            scheduler=scheduler,
        )
    raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {arch!r}")


def ensure_model(arch: str, model_dir: str | Path) -> Path:
    """A diffusers folder of ``arch`` with random weights under ``model_dir`` (built once, then reused).

    The large ones are saved in bf16 (half the disk and load time; the trainer loads each part in the
    dtype it runs in, as it does for real checkpoints).
    """
    from diffusion_dpo.models.loading import quiet_loading

    path = Path(model_dir) / arch
    marker = path / "bench_arch.json"
    if marker.is_file():
        return path
    logger.info("building the %s model with random weights in %s (once)", arch, path)
    pipe = build_pipeline(arch)
    if arch in ("sd15", "sdxl"):
        pipe.to(torch.bfloat16)
    with quiet_loading():
        pipe.save_pretrained(path)
    if is_sdxl(arch):
        # the trainer keeps SDXL's own VAE in fp32 (it overflows in fp16); runs with an fp16-safe VAE
        # pass it separately, as configs/sdxl_lora.yaml does: this copy stands in for it
        with quiet_loading():
            pipe.vae.save_pretrained(path / "vae_fp16_safe")
    marker.write_text(json.dumps({"arch": arch, "what": ARCHS[arch][2]}) + "\n")
    return path
