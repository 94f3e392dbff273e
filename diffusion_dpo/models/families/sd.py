"""Stable Diffusion 1.x/2.x: one CLIP text encoder, a UNet, DDPM (epsilon or v-prediction)."""

from __future__ import annotations

from diffusion_dpo.models.families.base import ModelFamily


class SDFamily(ModelFamily):
    """Everything is :class:`~diffusion_dpo.models.families.base.ModelFamily`'s default."""
