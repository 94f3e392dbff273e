"""What every model family answers, so that the loop, the objective, validation, data set-up and
evaluation never ask which family they run.

A family is recognised from a pipeline's ``model_index.json`` and knows how to: load its noise
scheduler, text encoders and denoiser; turn captions into the denoiser's conditioning; build the
forward process (noising, target, timestep draw, denoiser call:
:mod:`diffusion_dpo.diffusion.processes`); and name its pipeline class and the parts to hand it for
sampling and saving. Families hold no weights; :class:`~diffusion_dpo.models.loading.SDComponents`
does.
"""

from __future__ import annotations

import torch

from diffusion_dpo.models.pretrained import dtype_kwargs

Tensor = torch.Tensor


class ModelFamily:
    """Defaults shared by the UNet families (SD1.x/2.x); subclasses override what differs."""

    #: short name (configs, logs, latent-cache manifests)
    name = "sd"
    label = "SD"
    pipeline_class_name = "StableDiffusionPipeline"
    #: pipeline subfolder and diffusers class of the trained denoiser
    denoiser_subfolder = "unet"
    denoiser_class_name = "UNet2DConditionModel"
    denoiser_label = "UNet"  # in logs
    #: batches carry each image's original size and crop (SDXL's micro-conditioning)
    micro_conditioning = False
    #: peft LoRA targets (diffusers' LoRA training scripts for this family)
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")

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
                f"--drop_t5: {self.label} models have no T5 text encoder (it applies to SD3 only)"
            )
        flux_only_options(self.label, guidance_scale, resolution_shift)
        self.process_options = process_options

    @classmethod
    def matches(cls, index: dict) -> bool:
        """Whether a ``model_index.json`` describes this family."""
        return index.get("_class_name") == cls.pipeline_class_name or _has(index, "unet")

    @classmethod
    def refusal(cls, index: dict) -> str | None:
        """Why a relative of this family (a pipeline it recognises but cannot train) is refused; None
        for every other ``model_index.json``."""
        return None

    # -- loading ------------------------------------------------------------------------------------

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def load_denoiser(self, source, dtype: torch.dtype, revision=None, variant=None) -> torch.nn.Module:
        return self.denoiser_class().from_pretrained(
            source,
            subfolder=self.denoiser_subfolder,
            revision=revision,
            variant=variant,
            **dtype_kwargs(dtype),
        )

    def load_noise_scheduler(self, source, revision=None):
        """The training process's scheduler: DDPM defines the forward process q whatever sampler is saved."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(source, subfolder="scheduler", revision=revision)

    def noise_scheduler_from_config(self, config):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(config)

    def load_text_encoders(
        self, source, revision=None, variant=None, dtype=torch.float32
    ) -> tuple[list, list]:
        from transformers import AutoTokenizer, CLIPTextModel

        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", revision=revision, variant=variant,
            **dtype_kwargs(dtype, "transformers"),
        )  # fmt: skip
        return [tokenizer], [encoder]

    def check_resolution(self, resolution: int, vae_config) -> None:
        """Raise ``ValueError`` when images of side ``resolution`` cannot be trained (FLUX.1's packing);
        every multiple of the VAE's factor works for the UNet families and SD3."""

    def load_vae(self, source, revision=None, variant=None, dtype=torch.float32) -> torch.nn.Module:
        """The checkpoint's own VAE, as the trainer uses it (``encode(pixels).latent_dist``, ``config``'s
        ``scaling_factor``/``shift_factor``): an ``AutoencoderKL`` for every family but Qwen-Image's."""
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(
            source, subfolder="vae", variant=variant, revision=revision, **dtype_kwargs(dtype)
        )

    def trainer_vae(self, vae: torch.nn.Module) -> torch.nn.Module:
        """A pipeline's own VAE as :meth:`load_vae` returns it (the same module, but for Qwen-Image)."""
        return vae

    def vae_dtype(self, frozen_dtype: torch.dtype, own_vae: bool) -> torch.dtype:
        """The VAE's dtype: the frozen parts' (``own_vae``: the checkpoint's VAE, not a swapped one)."""
        return frozen_dtype

    # -- conditioning and the process ---------------------------------------------------------------

    def encode_prompts(self, components, captions: list[str], device) -> tuple[Tensor, Tensor | None]:
        """Captions → ``(encoder_hidden_states [B, L, D], pooled [B, D] or None)``: the last hidden
        state of the one CLIP text encoder."""
        ids = clip_token_ids(components.tokenizers[0], captions, device)
        return components.text_encoders[0](ids)[0], None

    def text_encoding_settings(self) -> dict:
        """What, beyond the model, decides the text embeddings of a caption (a latent cache records it and
        the trainer compares it): nothing for the UNet families."""
        return {}

    def added_conditioning(self, pooled, batch: dict | None, suffixes, resolution: int, dtype, device):
        """The denoiser's extra inputs for ``len(suffixes)`` images per row (None: there are none).
        ``pooled`` ``[B, D]`` from :meth:`encode_prompts`; ``batch`` holds SDXL's sizes and crops."""
        return None

    def process(self, noise_scheduler):
        from diffusion_dpo.diffusion.processes import DDPMProcess

        return DDPMProcess(noise_scheduler)

    # -- pipelines ----------------------------------------------------------------------------------

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def pipeline_parts(self, components, denoiser, cast) -> dict:
        """The in-memory modules to hand to ``Pipeline.from_pretrained`` instead of loading them again
        (``cast`` puts a frozen module in the wanted dtype)."""
        parts = {self.denoiser_subfolder: denoiser, "vae": cast(components.vae)}
        for i, (tokenizer, encoder) in enumerate(
            zip(components.tokenizers, components.text_encoders, strict=True)
        ):
            suffix = "" if i == 0 else f"_{i + 1}"
            parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tokenizer, cast(encoder)
        return parts

    def pipeline_load_kwargs(self, index: dict | None = None) -> dict:
        """Extra keywords of ``from_pretrained`` for a pipeline of this family (``index``: its
        ``model_index.json``): SD3 without T5 must be told so."""
        return {}

    def sampling_kwargs(self) -> dict:
        """Extra keywords of the pipeline call when sampling."""
        return {}

    def default_sampling_kwargs(self) -> dict:
        """What the family is always sampled with, trained here or not (Qwen-Image's real CFG)."""
        return {}

    def lora_save_kwargs(self, peft_state: dict, metadata: dict) -> dict:
        """``save_lora_weights`` keywords for the denoiser's LoRA layers (``peft_state``: peft's state dict
        of the adapters) and their adapter config."""
        prefix = self.denoiser_subfolder
        return {
            f"{prefix}_lora_layers": self.lora_layers(peft_state),
            f"{prefix}_lora_adapter_metadata": metadata,
        }

    def lora_layers(self, peft_state: dict) -> dict:
        """The UNet's LoRA layers in diffusers' key format, as its LoRA scripts save them."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return convert_state_dict_to_diffusers(peft_state)


def flux_only_options(label: str, guidance_scale: float | None, resolution_shift: int | None) -> None:
    """Refuse FLUX.1's ``--resolution_shift`` (its resolution-dependent σ shift) for another family.
    ``guidance_scale`` is accepted: for a family without a guidance embedding it is only the classifier-free
    guidance of sampling (validation images, and eval/evaluate.py's default), never part of training."""
    if resolution_shift is not None:
        raise ValueError(
            f"--resolution_shift: {label} models sample on a fixed schedule, not one shifted by image size "
            "(it applies to FLUX.1)"
        )


def _has(index: dict, key: str) -> bool:
    return key in index and index[key] is not None and index[key][0] is not None


def clip_token_ids(tokenizer, captions: list[str], device) -> Tensor:
    """Token ids padded to the tokenizer's ``model_max_length`` (77 for CLIP), as the pipelines make them."""
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)  # fmt: skip
