"""SDXL: two CLIP text encoders (penultimate states concatenated, the second one's pooled projection),
a UNet with size/crop micro-conditioning (MATH.md §4), DDPM."""

from __future__ import annotations

import torch

from diffusion_dpo.models.families.base import ModelFamily, _has, clip_token_ids
from diffusion_dpo.models.pretrained import dtype_kwargs
from diffusion_dpo.transfer import to_device

Tensor = torch.Tensor


class SDXLFamily(ModelFamily):
    name = "sdxl"
    label = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    micro_conditioning = True

    @classmethod
    def matches(cls, index: dict) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name or (
            _has(index, "unet") and _has(index, "text_encoder_2")
        )

    def load_text_encoders(self, source, revision=None, variant=None, dtype=torch.float32):
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        tokenizers, encoders = super().load_text_encoders(source, revision, variant, dtype)
        tokenizers.append(AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2", revision=revision))
        encoders.append(
            CLIPTextModelWithProjection.from_pretrained(
                source,
                subfolder="text_encoder_2",
                revision=revision,
                variant=variant,
                **dtype_kwargs(dtype, "transformers"),
            )  # fmt: skip
        )
        return tokenizers, encoders

    def vae_dtype(self, frozen_dtype, own_vae):
        # SDXL's own VAE overflows in fp16 (madebyollin/sdxl-vae-fp16-fix does not)
        return torch.float32 if own_vae else frozen_dtype

    def encode_prompts(self, components, captions, device):
        """The penultimate hidden states of both encoders concatenated on the feature axis, and the
        pooled (projected) output of the second encoder."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(components.tokenizers, components.text_encoders, strict=True):
            out = encoder(clip_token_ids(tokenizer, captions, device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the second encoder)
        return torch.cat(hidden, dim=-1), pooled

    def added_conditioning(self, pooled, batch, suffixes, resolution, dtype, device):
        """``{"text_embeds", "time_ids"}`` for the images of ``suffixes`` stacked (winners first)."""
        sizes = torch.cat([to_device(batch[f"original_sizes{s}"], device) for s in suffixes])  # [K·B, 2]
        crops = torch.cat([to_device(batch[f"crop_top_lefts{s}"], device) for s in suffixes])
        pooled = torch.cat([pooled] * len(suffixes))
        return {
            "text_embeds": pooled.to(dtype),
            "time_ids": sdxl_time_ids(sizes, crops, resolution).to(dtype),
        }


def sdxl_time_ids(original_sizes: Tensor, crop_top_lefts: Tensor, resolution: int) -> Tensor:
    """SDXL micro-conditioning ``[N, 6]``: (original h, w, crop top, left, target h, w)."""
    target = torch.tensor([resolution, resolution], device=original_sizes.device).expand(
        original_sizes.shape[0], 2
    )
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1).float()
