"""diffusion-dpo: preference alignment for diffusion and text models."""

__version__ = "0.1.0"
