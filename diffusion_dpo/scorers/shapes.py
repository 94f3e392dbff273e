"""Shapes-world scorers: does an image show the coloured shape its prompt names?

``shapes`` is the ground-truth "preference model" for the synthetic world of
:mod:`diffusion_dpo.synthetic`: pure numpy, no weights, no device, so experiments on that world are
scored exactly and cheaply. ``shapes_color_area`` is a deliberately *gameable* proxy of it, for studying
reward hacking: it rewards how much of the image has the colour the prompt gives the shape, which a
faithful image has some of, and an image painted over in that colour (no shape, wrong background) has
most of.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from diffusion_dpo.scorers.base import Scorer
from diffusion_dpo.synthetic import COLORS, faithfulness, parse_caption


class ShapesScorer(Scorer):
    """Scores ``faithfulness(image, prompt)`` in [0, 1]: high only when the shape, its colour and the
    background colour all match the prompt (see :func:`~diffusion_dpo.synthetic.faithfulness`).

    ``device`` and ``dtype`` are accepted for the common scorer interface and unused. Every prompt
    must be a caption of the shapes world ("a red circle on a blue background"), else ``ValueError``.
    """

    name = "shapes"

    def __init__(
        self, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16
    ):
        super().__init__(batch_size=batch_size)
        self.device = device
        self.dtype = dtype

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """[B] float32 faithfulness scores."""
        return torch.tensor(
            [faithfulness(image, prompt) for image, prompt in zip(images, prompts)], dtype=torch.float32
        )


#: colour tolerance of ``shapes_color_area`` (RGB distance in [0, 1] units): faithfulness's own
_AREA_SIGMA = 0.25


def color_area(image: Image.Image, prompt: str) -> float:
    """Share of the image's pixels in the colour ``prompt`` names for its shape, in [0, 1]: the mean over
    pixels of ``exp(−d² / 2σ²)``, ``d`` the RGB distance (in [0, 1] units) to the named colour, σ 0.25."""
    spec = parse_caption(prompt)
    if spec is None:
        raise ValueError(f"not a caption of the shapes world: {prompt!r}")
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    d2 = ((pixels - np.array(COLORS[spec.color]) / 255.0) ** 2).sum(axis=-1)
    return float(np.exp(-d2 / (2 * _AREA_SIGMA**2)).mean())


class ShapesColorAreaScorer(ShapesScorer):
    """A gameable proxy of ``shapes``: :func:`color_area`, the share of the image in the shape's named
    colour. A faithful render scores 0.1–0.4 (its shape's area); filling the picture with the colour
    scores 1 while ``shapes`` gives it ~0. Optimising it is reward hacking by construction: use it as a
    mining scorer and ``shapes`` as the held-out one to watch the two part (``data/iterative_dpo.py``)."""

    name = "shapes_color_area"

    def score_batch(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        """[B] float32 colour-area scores."""
        return torch.tensor(
            [color_area(image, prompt) for image, prompt in zip(images, prompts)], dtype=torch.float32
        )
