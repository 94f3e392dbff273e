"""Qwen-Image: an MMDiT transformer (``QwenImageTransformer2DModel``) on 2×2-packed latents, rectified
flow, a Qwen2.5-VL text encoder over the pipeline's chat template, and a (video) VAE with per-channel
latent statistics (``AutoencoderKLQwenImage``). docs/qwen_image.md.

What the trainer sees is what it sees for SD3, so the loop, the objective and evaluation do not change:

- latents ``[N, C, h, w]``, normalised per channel ``(z − latents_mean[c]) / latents_std[c]`` (the
  pipeline's and diffusers' Qwen-Image LoRA script's normalisation); :class:`QwenImageVAE` drops the VAE's
  one-frame axis and applies the statistics, so a posterior sample, the latent cache and the held-out
  latents take the trainer's one path (``posterior_latents`` at scale 1);
- prompt states ``[B, L, D]`` from ``QwenImagePipeline.encode_prompt`` (template applied, its first
  ``prompt_template_encode_start_idx`` tokens dropped, cut at ``max_sequence_length``), zero-padded to
  ``L = max_sequence_length`` so that every batch, cache row and held-out pair has one shape; the mask
  (1 = a real token) is the per-caption second output (where SD3 has its pooled text) and reaches the
  transformer as ``encoder_hidden_states_mask``. The padding is masked out of attention and the text
  positions do not depend on it, so the image prediction is the pipeline's (tests/test_qwen_image.py);
- :func:`qwen_image_call` packs ``[N, C, h, w]`` into ``[N, h·w/4, 4C]`` tokens
  (``QwenImagePipeline._pack_latents``), passes ``img_shapes`` and the timestep in the transformer's units
  (σ = t/1000, not SD3's σ·1000), and unpacks the velocity. The mean squared error over ``[C, h, w]``
  equals the mean over the packed ``[h·w/4, 4C]``, so β means what it means for SD3.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import torch

from diffusion_dpo.models.families.base import ModelFamily
from diffusion_dpo.models.pretrained import dtype_kwargs

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

#: text tokens kept per caption after the template's system prefix. The pipeline samples with 512;
#: the padding is masked, so the length only truncates (and sets the cache's row size)
DEFAULT_MAX_SEQUENCE_LENGTH = 512
#: the pipeline refuses longer (QwenImagePipeline.check_inputs)
MAX_SEQUENCE_LENGTH = 1024
#: how Qwen-Image is sampled (the Qwen/Qwen-Image model card): real classifier-free guidance at 4 against
#: the negative prompt " " (the pipeline's default true_cfg_scale is 4, but acts only with a negative
#: prompt); training conditions on the caption only, as diffusers' Qwen-Image LoRA script does
SAMPLING_TRUE_CFG_SCALE = 4.0
SAMPLING_NEGATIVE_PROMPT = " "


def qwen_image_call(model, noisy: Tensor, timesteps: Tensor, hidden: Tensor, cond: dict) -> Tensor:
    """A ``QwenImageTransformer2DModel`` on ``[N, C, h, w]`` latents: packed 2×2, timestep σ (the schedule's
    ``timesteps / 1000``, as the pipeline and diffusers' LoRA script pass it), the text mask in ``cond``."""
    from diffusers import QwenImagePipeline

    n, c, h, w = noisy.shape
    if h % 2 or w % 2:
        raise ValueError(
            f"Qwen-Image packs 2×2 latent patches and the latents are {h}×{w}: use a --resolution that is a "
            "multiple of twice the VAE's factor (16 for Qwen/Qwen-Image: 512, 768, 1024, …)"
        )
    packed = QwenImagePipeline._pack_latents(noisy, n, c, h, w)
    pred = model(
        hidden_states=packed, timestep=(timesteps / 1000).to(noisy.dtype), encoder_hidden_states=hidden,
        encoder_hidden_states_mask=cond["encoder_hidden_states_mask"].bool(),
        img_shapes=[(1, h // 2, w // 2)] * n, return_dict=False,
    )[0]  # fmt: skip
    # _unpack_latents takes the image size and the VAE factor; at factor 1 the latent size is the image's
    return QwenImagePipeline._unpack_latents(pred, h, w, 1).squeeze(2)


class _Posterior:
    """The normalised posterior ``N((μ − m)/s, (σ/s)²)`` of a batch of images, shaped ``[N, C, h, w]``."""

    def __init__(self, mean: Tensor, std: Tensor):
        self.mean, self.std = mean, std

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class QwenImageVAE(torch.nn.Module):
    """``AutoencoderKLQwenImage`` as the image VAE the trainer uses (``encode(pixels).latent_dist`` with
    ``mean``/``std`` ``[N, C, h, w]``, ``config.scaling_factor``): one frame in, the frame axis dropped, and
    the per-channel normalisation applied to the posterior, so that its sample at scale 1 is the
    pipeline's ``(z − latents_mean) / latents_std``. The pipeline gets the wrapped VAE (``.vae``)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.spatial_compression_ratio = vae.spatial_compression_ratio
        self.config = SimpleNamespace(
            scaling_factor=1.0, shift_factor=None, latent_channels=vae.config.z_dim,
            latents_mean=None, latents_std=None,
        )  # fmt: skip

    def _stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.vae.config.z_dim, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape)
        std = torch.tensor(self.vae.config.latents_std).view(shape)
        return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)

    def encode(self, pixels: Tensor) -> SimpleNamespace:
        """Images ``[N, 3, H, W]`` in [−1, 1] → ``latent_dist`` of the normalised latents."""
        dist = self.vae.encode(pixels.unsqueeze(2)).latent_dist  # [N, C, 1, h, w]
        mean, std = dist.mean.squeeze(2), dist.std.squeeze(2)
        channel_mean, channel_std = self._stats(mean)
        return SimpleNamespace(latent_dist=_Posterior((mean - channel_mean) / channel_std, std / channel_std))


class QwenImageFamily(ModelFamily):
    name = "qwen_image"
    label = "Qwen-Image"
    pipeline_class_name = "QwenImagePipeline"
    denoiser_subfolder = "transformer"
    denoiser_class_name = "QwenImageTransformer2DModel"
    denoiser_label = "transformer"
    # diffusers' Qwen-Image LoRA script (train_dreambooth_lora_qwen_image.py, --lora_layers default): the
    # attention projections of the image stream; peft's suffix match finds them in every block
    lora_target_modules = ("to_k", "to_q", "to_v", "to_out.0")

    def __init__(self, *, drop_t5: bool = False, max_sequence_length: int | None = None, **process_options):
        if drop_t5:
            raise ValueError("--drop_t5: Qwen-Image has no T5 text encoder (it applies to SD3 only)")
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        if not 1 <= self.max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"--max_sequence_length {self.max_sequence_length}: Qwen-Image takes 1 to "
                f"{MAX_SEQUENCE_LENGTH} text tokens (QwenImagePipeline refuses more)"
            )
        self.process_options = process_options

    @classmethod
    def matches(cls, index: dict) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    # -- loading ------------------------------------------------------------------------------------

    def load_noise_scheduler(self, source, revision=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # use_dynamic_shifting=True: the training sigmas are the unshifted t/1000 grid, which is what
        # diffusers' Qwen-Image LoRA script draws from; the resolution shift is the sampler's
        return FlowMatchEulerDiscreteScheduler.from_pretrained(
            source, subfolder="scheduler", revision=revision
        )

    def noise_scheduler_from_config(self, config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def load_text_encoders(self, source, revision=None, variant=None, dtype=torch.float32):
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", revision=revision)
        encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            source, subfolder="text_encoder", revision=revision, variant=variant,
            **dtype_kwargs(dtype, "transformers"),
        )  # fmt: skip
        return [tokenizer], [encoder]

    def load_vae(self, source, revision=None, variant=None, dtype=torch.float32):
        from diffusers import AutoencoderKLQwenImage

        vae = AutoencoderKLQwenImage.from_pretrained(
            source, subfolder="vae", revision=revision, variant=variant, **dtype_kwargs(dtype)
        )
        return QwenImageVAE(vae)

    def trainer_vae(self, vae):
        return vae if isinstance(vae, QwenImageVAE) else QwenImageVAE(vae)

    # -- conditioning and the process ---------------------------------------------------------------

    def text_pipeline(self, components):
        """A ``QwenImagePipeline`` holding only the tokenizer and text encoder: its ``encode_prompt`` is the
        encoding (template, dropped prefix, masks), not a copy of it."""
        from diffusers import QwenImagePipeline

        return QwenImagePipeline(
            scheduler=None, vae=None, transformer=None,
            tokenizer=components.tokenizers[0], text_encoder=components.text_encoders[0],
        )  # fmt: skip

    def encode_prompts(self, components, captions, device):
        """``(states [B, L, D], mask [B, L])`` with ``L = max_sequence_length``: ``encode_prompt``'s states and
        mask (1 = a caption token), zero-padded from its batch's longest caption to L."""
        if next(components.text_encoders[0].parameters()).device.type == "meta":
            return self._meta_encoding(components, captions)
        hidden, mask = self.text_pipeline(components).encode_prompt(
            list(captions), device=device, max_sequence_length=self.max_sequence_length
        )
        if mask is None:  # encode_prompt drops a mask that is all ones
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        pad = self.max_sequence_length - hidden.shape[1]
        return torch.nn.functional.pad(hidden, (0, 0, 0, pad)), torch.nn.functional.pad(mask, (0, pad))

    def _meta_encoding(self, components, captions):
        """The same text-encoder forward on the meta device, where the benchmark counts FLOPs and
        ``encode_prompt``'s data-dependent steps (selecting the masked states, Qwen2.5-VL's position
        index) cannot run: the pipeline's padded template ids, text positions 0…S−1 given, no attention
        mask (the same matrix products), the states after the dropped prefix padded to L."""
        pipe = self.text_pipeline(components)
        drop, n = pipe.prompt_template_encode_start_idx, self.max_sequence_length
        tokens = pipe.tokenizer(
            [pipe.prompt_template_encode.format(c) for c in captions], max_length=pipe.tokenizer_max_length + drop,
            padding=True, truncation=True, return_tensors="pt",
        )  # fmt: skip
        ids = tokens.input_ids.to("meta")
        positions = torch.arange(ids.shape[1], device="meta").expand(3, *ids.shape)  # Qwen2.5-VL's 3 axes
        out = components.text_encoders[0](input_ids=ids, position_ids=positions, output_hidden_states=True)
        hidden = out.hidden_states[-1][:, drop : drop + n]
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, n - hidden.shape[1]))
        lengths = (tokens.attention_mask.sum(dim=1) - drop).clamp(max=n)
        return hidden, (torch.arange(n) < lengths[:, None]).long().to("meta")

    def text_encoding_settings(self):
        return {"max_sequence_length": self.max_sequence_length}

    def added_conditioning(self, pooled, batch, suffixes, resolution, dtype, device):
        # ``pooled`` is the text mask of encode_prompts (or of a latent cache row)
        return {"encoder_hidden_states_mask": torch.cat([pooled] * len(suffixes)).to(device, dtype)}

    def lora_layers(self, peft_state):
        # diffusers' Qwen-Image LoRA script saves peft's keys as they are (as for SD3)
        return peft_state

    def process(self, noise_scheduler):
        from diffusion_dpo.diffusion.processes import FlowMatchProcess

        return FlowMatchProcess(noise_scheduler, qwen_image_call, **self.process_options)

    # -- pipelines ----------------------------------------------------------------------------------

    def pipeline_parts(self, components, denoiser, cast):
        vae = components.vae.vae if isinstance(components.vae, QwenImageVAE) else components.vae
        parts = {"transformer": denoiser, "vae": cast(vae)}
        if components.text_encoders:  # a run from a latent cache may have none: the base's are loaded
            parts.update(tokenizer=components.tokenizers[0], text_encoder=cast(components.text_encoders[0]))
        return parts

    def sampling_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length, **self.default_sampling_kwargs()}

    def default_sampling_kwargs(self):
        return {"true_cfg_scale": SAMPLING_TRUE_CFG_SCALE, "negative_prompt": SAMPLING_NEGATIVE_PROMPT}
