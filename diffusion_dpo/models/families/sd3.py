"""Stable Diffusion 3 / 3.5: an MMDiT transformer (``SD3Transformer2DModel``), rectified flow, and
three text encoders: two CLIPs (penultimate states and pooled projections) and an optional T5.

The prompt embedding is what ``StableDiffusion3Pipeline.encode_prompt`` makes: the CLIP states
concatenated on the feature axis and zero-padded to T5's width, followed on the sequence axis by T5's
``max_sequence_length`` states (zeros without T5: ``--drop_t5``); the pooled projection is both CLIPs'
pooled outputs concatenated. Latents are ``(z − shift_factor)·scaling_factor`` (the VAE's config).
"""

from __future__ import annotations

import torch

from diffusion_dpo.models.families.base import ModelFamily, _has, clip_token_ids
from diffusion_dpo.models.pretrained import dtype_kwargs

Tensor = torch.Tensor

#: diffusers' SD3 training scripts' default (the pipeline samples with 256)
DEFAULT_MAX_SEQUENCE_LENGTH = 77


def sd3_call(model, noisy: Tensor, timesteps: Tensor, hidden: Tensor, cond: dict) -> Tensor:
    """An ``SD3Transformer2DModel``: timesteps are the schedule's σ·1000, the pooled text goes in ``cond``."""
    return model(
        hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden,
        pooled_projections=cond["pooled_projections"], return_dict=False,
    )[0]  # fmt: skip


class SD3Family(ModelFamily):
    name = "sd3"
    label = "SD3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_subfolder = "transformer"
    denoiser_class_name = "SD3Transformer2DModel"
    denoiser_label = "transformer"
    # diffusers' SD3 LoRA scripts: the attention projections of both the image and the text stream
    lora_target_modules = (
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
        "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
    )  # fmt: skip

    def __init__(self, *, drop_t5: bool = False, max_sequence_length: int | None = None, **process_options):
        self.drop_t5 = drop_t5
        self.max_sequence_length = max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH
        self.process_options = process_options
        self.joint_attention_dim: int | None = None  # T5's width in the transformer; read at load

    @classmethod
    def matches(cls, index: dict) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name or (
            _has(index, "transformer") and "text_encoder_3" in index
        )

    def load_noise_scheduler(self, source, revision=None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(
            source, subfolder="scheduler", revision=revision
        )

    def noise_scheduler_from_config(self, config):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def load_text_encoders(self, source, revision=None, variant=None, dtype=torch.float32):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        kw = dict(revision=revision, variant=variant, **dtype_kwargs(dtype, "transformers"))
        tokenizers = [
            AutoTokenizer.from_pretrained(source, subfolder=f, revision=revision)
            for f in ("tokenizer", "tokenizer_2")
        ]
        encoders = [
            CLIPTextModelWithProjection.from_pretrained(source, subfolder=f, **kw)
            for f in ("text_encoder", "text_encoder_2")
        ]
        self.joint_attention_dim = self.denoiser_class().load_config(
            source, subfolder=self.denoiser_subfolder, revision=revision
        )["joint_attention_dim"]
        if not self.drop_t5:
            tokenizers.append(
                AutoTokenizer.from_pretrained(source, subfolder="tokenizer_3", revision=revision)
            )
            encoders.append(T5EncoderModel.from_pretrained(source, subfolder="text_encoder_3", **kw))
        return tokenizers, encoders

    def encode_prompts(self, components, captions, device):
        clip_hidden, pooled = [], []
        for tokenizer, encoder in zip(components.tokenizers[:2], components.text_encoders[:2], strict=True):
            out = encoder(clip_token_ids(tokenizer, captions, device), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(clip_hidden, dim=-1)
        if len(components.text_encoders) == 3:
            ids = components.tokenizers[2](
                captions, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                add_special_tokens=True, return_tensors="pt",
            ).input_ids.to(device)  # fmt: skip
            t5 = components.text_encoders[2](ids)[0].to(clip.dtype)
        else:  # what the pipeline feeds the transformer without T5
            t5 = clip.new_zeros(len(captions), self.max_sequence_length, self.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def text_encoding_settings(self):
        return {"t5": not self.drop_t5, "max_sequence_length": self.max_sequence_length}

    def added_conditioning(self, pooled, batch, suffixes, resolution, dtype, device):
        return {"pooled_projections": torch.cat([pooled] * len(suffixes)).to(dtype)}

    def lora_layers(self, peft_state):
        # diffusers' SD3 LoRA scripts save peft's keys as they are (the UNet conversion renames the
        # attention projections to a format SD3's loader does not map back)
        return peft_state

    def process(self, noise_scheduler):
        from diffusion_dpo.diffusion.processes import FlowMatchProcess

        return FlowMatchProcess(noise_scheduler, sd3_call, **self.process_options)

    def pipeline_parts(self, components, denoiser, cast):
        parts = super().pipeline_parts(components, denoiser, cast)
        return {**parts, **self.pipeline_load_kwargs()}

    def pipeline_load_kwargs(self, index=None):
        # trained without T5: sampled and saved without it, as trained (the pipeline feeds zeros); a
        # folder saved without it lists T5 as null, which diffusers loads only when told
        no_t5 = self.drop_t5 or (index is not None and not _has(index, "text_encoder_3"))
        return {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}

    def sampling_kwargs(self):
        return {"max_sequence_length": self.max_sequence_length}
