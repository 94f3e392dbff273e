"""FLUX.1 (dev, schnell): a ``FluxTransformer2DModel`` on packed 2×2 latent patches, rectified flow, a
CLIP-L text encoder for the pooled projection and T5 for the token states (docs/flux.md).

What differs from SD3 is all inside the denoiser call and the text encoding, as diffusers'
``train_dreambooth_lora_flux.py`` does it:

- the prompt embedding is T5's last hidden state at ``max_sequence_length`` tokens (default 512, no
  attention mask: the padding is attended, so sampling must use the same length), the pooled projection
  ``CLIPTextModel.pooler_output``; text position ids are zeros (``FluxPipeline.encode_prompt``);
- latents ``[N, C, h, w]`` are packed into ``[N, h·w/4, 4C]`` tokens with their (0, row, column) image ids
  (``FluxPipeline._pack_latents``, ``_prepare_latent_image_ids``) and the prediction unpacked again, so
  the objective's per-image mean over C×h×w is a mean over the packed tokens: β means what it means for SD3;
- the transformer takes σ (it multiplies by 1000 itself), not σ·1000, and FLUX.1 dev's guidance
  embedding takes ``guidance_scale`` (default 3.5) for the policy, the reference and sampling alike.

σ is drawn on the checkpoint's own training schedule (FLUX.1's scheduler has ``use_dynamic_shifting``,
so its saved sigmas are the unshifted t/1000 grid, which the diffusers script trains on).
"""

from __future__ import annotations

import logging

import torch

from diffusion_dpo.models.families.base import ModelFamily, clip_token_ids

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

#: diffusers' Flux training scripts and ``FluxPipeline``'s default T5 length
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: diffusers' Flux training scripts' ``--guidance_scale`` ("FLUX.1 dev is a guidance distilled model")
#: and ``FluxPipeline``'s default
DEFAULT_GUIDANCE_SCALE = 3.5

#: Relatives that are recognised and refused, with what they would need.
REFUSED = {
    "FluxKontext": "FLUX.1 Kontext edits an input image: its transformer also takes the packed latents of a "
    "condition image (image ids with index 1) and each pair would need that reference image",
    "FluxFill": "FLUX.1 Fill inpaints: its transformer takes the masked image's latents and the mask "
    "(384 input channels) next to the noisy latents, so each pair would need a mask and a masked image",
    "FluxControlNet": "a FLUX.1 ControlNet pipeline: its ControlNet needs a control image per pair; train "
    "the base FLUX.1 checkpoint (a FluxPipeline) instead",
    "FluxControl": "FLUX.1 Canny/Depth (Control) takes the control image's latents as extra input channels "
    "(128 in all), so each pair would need a control image",
    "FluxPriorRedux": "FLUX.1 Redux is an image-embedding prior with no transformer to train",
    "Flux2": "FLUX.2 has another transformer (Flux2Transformer2DModel), VAE (AutoencoderKLFlux2 with "
    "batch-norm latent statistics) and text encoder (Mistral 3; Qwen3 for klein), so it needs its own family",
}


def flux_call(model, noisy: Tensor, timesteps: Tensor, hidden: Tensor, cond: dict) -> Tensor:
    """A ``FluxTransformer2DModel`` on ``noisy`` ``[N, C, h, w]``: packed 2×2, called with σ (``timesteps``
    are the schedule's σ·1000) and, when it has a guidance embedding, ``cond["guidance"]`` ``[N]``;
    returns the prediction unpacked to ``[N, C, h, w]``."""
    from accelerate.utils import extract_model_from_parallel
    from diffusers import FluxPipeline

    n, c, h, w = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
    txt_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
    guidance = cond.get("guidance") if extract_model_from_parallel(model).config.guidance_embeds else None
    pred = model(
        hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
        pooled_projections=cond["pooled_projections"], encoder_hidden_states=hidden, txt_ids=txt_ids,
        img_ids=img_ids, return_dict=False,
    )[0]  # fmt: skip
    # _unpack_latents takes the image size and VAE factor: a factor of 1 makes the size the latents'
    return FluxPipeline._unpack_latents(pred, h, w, 1)


def resolution_shifted(scheduler, image_tokens: int):
    """The training scheduler whose σ are those ``FluxPipeline`` samples on for ``image_tokens`` packed
    tokens: its exponential time shift by μ = ``calculate_shift(image_tokens, …)`` (the scheduler's
    config) is the static shift ``e^μ·s / (1 + (e^μ − 1)·s)`` of the unshifted grid s."""
    import math

    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler.config
    mu = calculate_shift(
        image_tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
    )
    logger.info("σ drawn on FLUX.1's sampling schedule for %d image tokens: μ %.3f, shift %.3f", image_tokens,
                mu, math.exp(mu))  # fmt: skip
    return FlowMatchEulerDiscreteScheduler.from_config(
        {**config, "use_dynamic_shifting": False, "shift": math.exp(mu)}
    )


def refusal(index: dict) -> str | None:
    """Why a Flux relative's ``model_index.json`` cannot be trained as FLUX.1; None for FLUX.1 itself
    (and for any other pipeline)."""
    name = index.get("_class_name") or ""
    if not name.startswith("Flux") or name == FluxFamily.pipeline_class_name:
        return None
    for prefix, reason in REFUSED.items():
        if name.startswith(prefix):
            return reason
    return "only FLUX.1 text-to-image checkpoints (a FluxPipeline's model_index.json) can be trained"


class FluxFamily(ModelFamily):
    name = "flux"
    label = "FLUX.1"
    pipeline_class_name = "FluxPipeline"
    denoiser_subfolder = "transformer"
    denoiser_class_name = "FluxTransformer2DModel"
    denoiser_label = "transformer"
    # diffusers' train_dreambooth_lora_flux.py: both streams' attention and feed-forward projections of
    # the double blocks; by suffix also the single blocks' attn.to_q/k/v (not their proj_mlp/proj_out)
    lora_target_modules = (
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2",
    )  # fmt: skip

    def __init__(
        self,
        *,
        drop_t5: bool = False,
        max_sequence_length: int | None = None,
        guidance_scale: float | None = None,
        resolution_shift: int | None = None,
        **process_options,
    ):
        if drop_t5:
            raise ValueError(
                "--drop_t5: FLUX.1's token states are all T5's (CLIP gives only the pooled projection), so "
                "it cannot be trained without T5; cache the text embeddings instead (data/precompute_latents.py)"
            )
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        if self.max_sequence_length > 512:
            raise ValueError(
                f"--max_sequence_length {self.max_sequence_length}: FluxPipeline takes at most 512 T5 tokens"
            )
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else float(guidance_scale)
        #: the resolution whose sampling schedule training draws σ on (None: the unshifted one)
        self.resolution_shift = resolution_shift
        self.process_options = process_options

    @classmethod
    def matches(cls, index: dict) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    @classmethod
    def refusal(cls, index: dict) -> str | None:
        return refusal(index)

    # -- loading ------------------------------------------------------------------------------------

    def load_noise_scheduler(self, source, revision=None):
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
            source, subfolder="scheduler", revision=revision
        )
        if self.resolution_shift is None:
            return scheduler
        vae = AutoencoderKL.load_config(source, subfolder="vae", revision=revision)
        tokens = (self.resolution_shift // (2 * 2 ** (len(vae["block_out_channels"]) - 1))) ** 2
        return resolution_shifted(scheduler, tokens)

    def noise_scheduler_from_config(self, config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def load_denoiser(self, source, dtype, revision=None, variant=None):
        model = super().load_denoiser(source, dtype, revision, variant)
        config = model.config
        if config.in_channels != (config.out_channels or config.in_channels):
            raise ValueError(
                f"{source}: its transformer takes {config.in_channels} input channels for "
                f"{config.out_channels} output channels, so it expects condition channels next to the "
                "latents (FLUX.1 Fill or Control); only FLUX.1 text-to-image transformers can be trained"
            )
        if not config.guidance_embeds:
            logger.warning(
                "%s has no guidance embedding: it is FLUX.1 schnell (or shaped like it), a timestep-distilled "
                "model that samples in 1-4 steps; preference training on the flow objective treats it as "
                "an ordinary flow model and can undo its distillation (--guidance_scale is not used)",
                source,
            )
        return model

    def load_text_encoders(self, source, revision=None, variant=None, dtype=torch.float32):
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        from diffusion_dpo.models.pretrained import dtype_kwargs

        kw = dict(revision=revision, variant=variant, **dtype_kwargs(dtype, "transformers"))
        tokenizers = [
            AutoTokenizer.from_pretrained(source, subfolder=f, revision=revision)
            for f in ("tokenizer", "tokenizer_2")
        ]
        encoders = [
            CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw),
            T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", **kw),
        ]
        return tokenizers, encoders

    def check_resolution(self, resolution: int, vae_config) -> None:
        # FluxPipeline packs 2×2 latent patches: image sides must be multiples of twice the VAE's factor
        multiple = 2 * 2 ** (len(vae_config.block_out_channels) - 1)
        if resolution % multiple:
            lower = max(multiple, resolution - resolution % multiple)
            raise ValueError(
                f"--resolution {resolution}: FLUX.1 packs 2×2 latent patches and its VAE downsamples "
                f"{multiple // 2}×, so image sides must be multiples of {multiple}; {lower} or "
                f"{lower + multiple} would work"
            )

    # -- conditioning and the process ---------------------------------------------------------------

    def encode_prompts(self, components, captions, device):
        """``(T5 last hidden state [B, max_sequence_length, D], CLIP pooled output [B, D_clip])``."""
        clip_tok, t5_tok = components.tokenizers
        clip, t5 = components.text_encoders
        pooled = clip(clip_token_ids(clip_tok, captions, device)).pooler_output
        ids = t5_tok(
            captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)  # fmt: skip
        return t5(ids)[0], pooled

    def text_encoding_settings(self):
        return {"max_sequence_length": self.max_sequence_length}

    def added_conditioning(self, pooled, batch, suffixes, resolution, dtype, device):
        pooled = torch.cat([pooled] * len(suffixes)).to(device, dtype)
        # the guidance embedding's input, the same for every image (flux_call drops it for schnell)
        guidance = torch.full((pooled.shape[0],), self.guidance_scale, device=device, dtype=dtype)
        return {"pooled_projections": pooled, "guidance": guidance}

    def lora_layers(self, peft_state):
        # diffusers' Flux LoRA script saves peft's keys as they are (FluxLoraLoaderMixin reads them)
        return peft_state

    def process(self, noise_scheduler):
        from diffusion_dpo.diffusion.processes import FlowMatchProcess

        return FlowMatchProcess(noise_scheduler, flux_call, **self.process_options)

    def sampling_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length, "guidance_scale": self.guidance_scale}
