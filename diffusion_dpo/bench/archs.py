"""The benchmark's model architectures, built locally with random weights: nothing is downloaded.

Speed and memory do not depend on the weights, so a diffusers folder holding the published
architecture with random weights is timed exactly like the real checkpoint: the trainer loads it
with the same ``from_pretrained`` calls. The configs below are copied from the published
``config.json`` files (UNet or transformer, VAE, CLIP text encoders, noise schedule) of
``runwayml/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-xl-base-1.0``,
``stabilityai/stable-diffusion-3.5-medium`` and ``black-forest-labs/FLUX.1-dev``. The tokenizer is the project's tiny CLIP BPE tokenizer
padded to 77 tokens: the text encoder sees sequences of the real length, and its cost does not depend
on which token ids they hold.

SD3.5 Medium is built without its third text encoder, T5-XXL (4.7B parameters, twice the
transformer): the folder has no ``text_encoder_3``, as diffusers allows, and its rows train with
``--drop_t5 --max_sequence_length 77``, so the transformer still sees the real sequence (77 CLIP and
77 T5 positions, zeros in the T5 ones, as the pipeline feeds without T5). Its rows that encode
captions at every step therefore leave out T5's forward (and its memory); the ``cached_latents`` row,
which runs no text encoder, is exactly the real model's step.

Why one module of ~470 lines: it is mostly the published configs themselves (five families' denoisers,
VAEs and text encoders), kept side by side so that a reader checks each against its ``config.json`` in
one place; the code that builds a folder from them is short and shared.
"""

from __future__ import annotations

import dataclasses
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

#: stabilityai/stable-diffusion-3.5-medium transformer/config.json (MMDiT-X: self-attention of the image
#: tokens alongside the joint attention in blocks 0-12, RMS-normed queries and keys; 2.24B parameters)
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)

#: stabilityai/stable-diffusion-3.5-medium vae/config.json: SDXL's VAE layout with 16 latent channels, no
#: quant convolutions, latents normalised as (z − shift_factor)·scaling_factor
SD35_VAE = dict(
    SDXL_VAE,
    latent_channels=16,
    use_quant_conv=False,
    use_post_quant_conv=False,
    scaling_factor=1.5305,
    shift_factor=0.0609,
)

#: stabilityai/stable-diffusion-3.5-medium scheduler/scheduler_config.json (FlowMatchEulerDiscreteScheduler);
#: its text_encoder and text_encoder_2 are CLIP_L_TEXT and CLIP_G_TEXT, both with projection
SD35_SCHEDULE = dict(num_train_timesteps=1000, shift=3.0)

#: Qwen/Qwen-Image transformer/config.json (60 MMDiT blocks, 3072 wide; 20.4B parameters)
QWEN_IMAGE_TRANSFORMER = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)  # fmt: skip

#: Qwen/Qwen-Image vae/config.json: diffusers' AutoencoderKLQwenImage defaults (spatial factor 8, 16
#: channels, per-channel latents_mean/latents_std)
QWEN_IMAGE_VAE = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True],
)  # fmt: skip

#: Qwen/Qwen-Image text_encoder/config.json: Qwen2.5-VL-7B-Instruct (8.3B parameters with its vision tower)
QWEN25_VL_7B = dict(
    text_config=dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=128000, tie_word_embeddings=False,
        rope_scaling={"type": "mrope", "rope_type": "default", "mrope_section": [16, 24, 24]},
    ),
    vision_config=dict(
        depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu",
    ),
    vocab_size=152064, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    vision_end_token_id=151653,
)  # fmt: skip


#: black-forest-labs/FLUX.1-dev transformer/config.json (BFL's flux-dev params: hidden 3072 = 24 × 128,
#: 19 double and 38 single blocks, rotary axes 16/56/56, the guidance embedding; 11.9B parameters)
FLUX1_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

#: black-forest-labs/FLUX.1-dev vae/config.json: SD3.5's VAE layout with FLUX.1's latent shift and scale
FLUX1_VAE = dict(SD35_VAE, scaling_factor=0.3611, shift_factor=0.1159)

#: black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json (dynamic shifting: unshifted training sigmas)
FLUX1_SCHEDULE = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip

#: google/t5-v1_1-xxl's encoder: FLUX.1-dev's text_encoder_2/config.json (4.76B parameters); its
#: text_encoder is CLIP_L_TEXT (CLIPTextModel, pooled output)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    dropout_rate=0.1,
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


@dataclasses.dataclass(frozen=True)
class Arch:
    """An ``--arch``: what it is, and what every one of its rows is run with."""

    #: its model family's name (diffusion_dpo.models.families): "sd", "sdxl", "sd3", "flux" or "qwen_image"
    family: str
    #: the default image size
    resolution: int
    description: str
    #: TrainConfig values every row of this arch runs with: how its folder must be loaded
    train_options: dict = dataclasses.field(default_factory=dict)


ARCHS = {
    "tiny": Arch("sd", 64, "the test model: tiny SD1.5-shaped UNet/VAE/CLIP (diffusion_dpo.models.tiny)"),
    "tiny_sdxl": Arch("sdxl", 64, "the test model, SDXL-shaped: two tiny CLIP encoders, add_time_ids"),
    "tiny_sd3": Arch("sd3", 64, "the test model, SD3-shaped: tiny MMDiT, 16-channel VAE, two CLIPs and a T5"),
    "sd15": Arch("sd", 512, "Stable Diffusion 1.5's UNet, VAE and CLIP ViT-L text encoder, random weights"),
    "sdxl": Arch("sdxl", 1024, "SDXL base 1.0's UNet, VAE and CLIP ViT-L + bigG text encoders, random weights"),
    "sd35_medium": Arch(
        "sd3", 1024,
        "SD3.5 Medium's MMDiT, VAE and CLIP ViT-L + bigG text encoders, random weights; without T5-XXL "
        "(--drop_t5: zeros in its 77 positions), so the uncached rows leave out T5's forward",
        {"drop_t5": True, "max_sequence_length": 77},
    ),
    "tiny_flux": Arch(
        "flux", 64, "the test model, FLUX.1-shaped: tiny transformer on packed latents with the guidance "
        "embedding, 16-channel VAE, CLIP pooled + T5 (diffusion_dpo.models.tiny)",
    ),
    "flux_dev": Arch(
        "flux", 1024,
        "FLUX.1 [dev]'s transformer, VAE, CLIP ViT-L and T5-XXL text encoders, random weights; T5 at 512 "
        "tokens, guidance 3.5 (docs/flux.md)",
    ),
    "tiny_qwen_image": Arch(
        "qwen_image", 64, "the test model, Qwen-Image-shaped: tiny MMDiT on packed latents, Qwen2.5-VL, video VAE",
        {"max_sequence_length": 16},
    ),
    "qwen_image": Arch(
        "qwen_image", 1024,
        "Qwen-Image's 20B MMDiT, VAE and Qwen2.5-VL-7B text encoder, random weights; 128 text tokens "
        "(configs/qwen_image_lora.yaml)",
        {"max_sequence_length": 128},
    ),
}  # fmt: skip


def is_sdxl(arch: str) -> bool:
    return ARCHS[arch].family == "sdxl"


def family(arch: str):
    """The model family class of ``arch`` (what its rows call the denoiser)."""
    from diffusion_dpo.models.families import FAMILIES

    return next(f for f in FAMILIES if f.name == ARCHS[arch].family)


def default_resolution(arch: str) -> int:
    return ARCHS[arch].resolution


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

    from diffusion_dpo.models.tiny import build_tiny_pipeline, build_tiny_sd3_pipeline

    if arch in ("tiny", "tiny_sdxl"):
        return build_tiny_pipeline(sdxl=arch == "tiny_sdxl", seed=seed)
    if arch == "tiny_sd3":  # with its tiny T5: the rows run SD3's whole text path
        return build_tiny_sd3_pipeline(seed=seed)
    if arch == "tiny_flux":
        from diffusion_dpo.models.tiny import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(seed=seed)
    if arch in ("tiny_qwen_image", "qwen_image"):
        return build_qwen_image_pipeline(tiny=arch == "tiny_qwen_image", seed=seed)
    import tempfile

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _tokenizer(Path(tmp), 77)
    if arch == "flux_dev":
        return _flux_dev_pipeline(tokenizer)
    if arch == "sd35_medium":
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER),
            scheduler=FlowMatchEulerDiscreteScheduler(**SD35_SCHEDULE),
            vae=AutoencoderKL(**SD35_VAE),
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L_TEXT)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G_TEXT)),
            tokenizer_2=tokenizer,
            text_encoder_3=None,  # T5-XXL is not built: see the module docstring
            tokenizer_3=None,
        )
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


def _flux_dev_pipeline(tokenizer):
    """FLUX.1 [dev] with random weights; the T5 tokenizer is the project's tiny one, which pads to the real
    512 tokens (T5's cost does not depend on which ids it reads)."""
    import tempfile

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5TokenizerFast

    from diffusion_dpo.models.tiny import write_tiny_t5_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer_2 = T5TokenizerFast.from_pretrained(write_tiny_t5_tokenizer(tmp))
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**FLUX1_DEV_TRANSFORMER),
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX1_SCHEDULE),
        vae=AutoencoderKL(**FLUX1_VAE),
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)),
        tokenizer=tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(**T5_XXL)),
        tokenizer_2=tokenizer_2,
    )


def build_qwen_image_pipeline(tiny: bool, seed: int = 0):
    """The tiny test Qwen-Image pipeline, or the published architecture with random weights. Both use the
    tiny Qwen tokenizer (its template prefix is the 34 tokens the pipeline drops): the text encoder sees
    sequences of the real length whatever ids they hold."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from diffusion_dpo.models.tiny_qwen_image import (
        QWEN_IMAGE_SCHEDULER,
        build_tiny_qwen_image_pipeline,
        build_tiny_qwen_tokenizer,
    )

    if tiny:
        return build_tiny_qwen_image_pipeline(seed=seed)
    torch.manual_seed(seed)
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=AutoencoderKLQwenImage(**QWEN_IMAGE_VAE),
        text_encoder=Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B)),
        tokenizer=build_tiny_qwen_tokenizer(),
        transformer=QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER),
    )


def ensure_model(arch: str, model_dir: str | Path) -> Path:
    """A diffusers folder of ``arch`` with random weights under ``model_dir`` (built once, then reused).

    The large ones are saved in bf16 (half the disk and load time; the trainer loads each part in the
    dtype it runs in, as it does for real checkpoints).
    """
    from diffusion_dpo.models.pretrained import quiet_loading

    path = Path(model_dir) / arch
    marker = path / "bench_arch.json"
    if marker.is_file():
        return path
    logger.info("building the %s model with random weights in %s (once)", arch, path)
    pipe = build_pipeline(arch)
    if not arch.startswith("tiny"):
        pipe.to(torch.bfloat16)
    with quiet_loading():
        pipe.save_pretrained(path)
    if is_sdxl(arch):
        # the trainer keeps SDXL's own VAE in fp32 (it overflows in fp16); runs with an fp16-safe VAE
        # pass it separately, as configs/sdxl_lora.yaml does: this copy stands in for it
        with quiet_loading():
            pipe.vae.save_pretrained(path / "vae_fp16_safe")
    marker.write_text(json.dumps({"arch": arch, "what": ARCHS[arch].description}) + "\n")
    return path
