"""Model set-up for training: the frozen parts, the trained UNet (full or LoRA) and its reference."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from diffusion_dpo.models.families import SDFamily
from diffusion_dpo.models.loading import (
    SDComponents,
    encode_prompts,
    load_components,
)
from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
#: SD1.x/2.x and SDXL's UNet targets; each family names its own (``family.lora_target_modules``)
LORA_TARGET_MODULES = list(SDFamily.lora_target_modules)


@dataclass
class Models:
    """What a step needs. ``unet`` is the family's denoiser: a UNet, or SD3's transformer."""

    components: SDComponents  # frozen VAE, text encoders, tokenizers, noise scheduler, family, and the unet
    unet: torch.nn.Module  # the trained denoiser (LoRA-wrapped or full)
    ref_unet: torch.nn.Module | None  # frozen reference; None for LoRA (adapters disabled instead)
    weight_dtype: torch.dtype
    #: the forward process (:mod:`diffusion_dpo.diffusion.processes`); None: the family's default
    process: object | None = None

    def __post_init__(self):
        if self.process is None:
            self.process = self.components.family.process(self.components.noise_scheduler)


def weight_dtype_for(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def reference_runs_in_train_mode(ref_unet: torch.nn.Module) -> bool:
    """Whether the frozen reference should run in train mode, as the policy does.

    diffusers' UNet blocks take slightly different code paths in train and eval mode (ResnetBlock2D
    makes its shortcut input contiguous only when training, so convolutions see another memory
    layout). With β = 5000 the last-bit differences this makes show up as a policy/reference gap
    at step one: in bf16 a step-one loss of 0.62 instead of ln 2, a spurious preference signal of the
    size of the real one. Without dropout (Stable Diffusion's UNets have none) both modes compute the
    same function, so the reference runs in the policy's mode; with active dropout it must not be
    random, and stays in eval mode.
    """
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in ref_unet.modules())


def setup_models(cfg: TrainConfig, device: torch.device | str) -> Models:
    """Load the base model; add LoRA adapters or make the frozen reference copy; move to device.

    Every part is loaded in the dtype it runs in: the frozen parts (and LoRA's frozen base UNet) in the
    weight dtype, except SDXL's original VAE (fp32, it overflows in fp16); a fully fine-tuned UNet in
    fp32, its frozen reference in the weight dtype; LoRA adapters in fp32. Then the speed options:
    gradient checkpointing and xformers attention, channels-last memory format, ``torch.compile``.

    A run from a latent cache (``--latents_cache``) never encodes in its step. Its text encoders (SDXL's:
    about 1.6 GB in bf16; SD3.5's with T5: about 11 GB) are not loaded at all unless validation needs
    them (``--validation_prompts``, ``--validation_dataset_name``; a full fine-tune's saved pipeline
    takes them from the base model), and its VAE and any text encoders stay in CPU memory, visiting
    ``device`` only to encode held-out pairs or sample validation images (:func:`encoders_on`).
    """
    if cfg.enable_xformers_memory_efficient_attention:
        check_xformers(device)
    weight_dtype = weight_dtype_for(cfg.mixed_precision)
    components = load_components(
        cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.vae_model_name_or_path,
        frozen_dtype=weight_dtype, unet_dtype=weight_dtype if cfg.use_lora else torch.float32,
        load_text_encoders=encodes_captions(cfg), family_options=cfg.family_options(),
    )  # fmt: skip
    family = components.family
    family.check_resolution(cfg.resolution, components.vae.config)
    unet = components.unet
    if cfg.latents_cache:
        logger.info(
            "training from a latent cache: %s",
            "the VAE and text encoders stay in CPU memory" if components.text_encoders
            else "no text encoder loaded (nothing encodes captions); the VAE stays in CPU memory",
        )  # fmt: skip
    for module in _encoders(components):
        module.to("cpu" if cfg.latents_cache else device)

    ref_unet = None
    if cfg.use_lora:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.to(device)
        unet.add_adapter(
            LoraConfig(
                r=cfg.rank,
                lora_alpha=cfg.lora_alpha or cfg.rank,
                init_lora_weights="gaussian",
                target_modules=list(family.lora_target_modules),
            )
        )
        for p in unet.parameters():  # trainable adapters in fp32, as the diffusers LoRA scripts do
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.to(device)
        unet.requires_grad_(True)
        if cfg.effective_objective not in ("sft", "mapo"):  # objectives trained without a reference
            ref_unet = family.load_denoiser(
                cfg.pretrained_model_name_or_path, weight_dtype, cfg.revision, cfg.variant
            )
            ref_unet.requires_grad_(False)
            ref_unet.train(reference_runs_in_train_mode(ref_unet))
            ref_unet.to(device)
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if cfg.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
        if ref_unet is not None:
            ref_unet.enable_xformers_memory_efficient_attention()
    if cfg.channels_last:  # both UNets alike: the reference must compute what the policy computes at step one
        for module in (unet, ref_unet):
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if cfg.compile_unet:
        # in place (nn.Module.compile): the module, its state_dict keys and the wrappers around it stay
        # as they are; a LoRA run compiles a second graph for its adapters-disabled reference pass
        unet.compile()
    return Models(components=components, unet=unet, ref_unet=ref_unet, weight_dtype=weight_dtype)


def encodes_captions(cfg: TrainConfig) -> bool:
    """Whether a run encodes captions: from images at every step; from a latent cache only to validate
    (held-out pairs are read from images, validation prompts are sampled)."""
    return not cfg.latents_cache or bool(cfg.validation_prompts) or bool(cfg.validation_dataset_name)


def _encoders(components: SDComponents) -> list[torch.nn.Module]:
    return [components.vae, *components.text_encoders]


@contextlib.contextmanager
def encoders_on(models: Models, device):
    """The VAE and text encoders on ``device`` inside the block, back where they were after it (a no-op
    where they already are: every run but one from a latent cache)."""
    modules = _encoders(models.components)
    homes = [next(m.parameters()).device for m in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, home in zip(modules, homes, strict=True):
            module.to(home)


def check_xformers(device: torch.device | str) -> None:
    """Raise ``ValueError`` saying why ``--enable_xformers_memory_efficient_attention`` cannot run here."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        raise ValueError(
            "--enable_xformers_memory_efficient_attention needs the xformers package (pip install xformers, "
            "on a CUDA machine); without it drop the flag: PyTorch's scaled-dot-product attention is the "
            "default and needs nothing"
        )
    if torch.device(device).type != "cuda":
        raise ValueError(
            "--enable_xformers_memory_efficient_attention runs on CUDA GPUs only, and this run is on "
            f"{torch.device(device).type}; drop the flag (PyTorch's attention is used)"
        )


def conditioning(models: Models, captions: list[str], device) -> tuple[Tensor, Tensor | None]:
    """Captions → (encoder hidden states in the weight dtype, pooled embeddings (SDXL, SD3) or None)."""
    hidden, pooled = encode_prompts(models.components, captions, device)
    return hidden.to(models.weight_dtype), pooled
