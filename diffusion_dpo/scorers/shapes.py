"""Shapes-world faithfulness scorer: does an image show the coloured shape its prompt names?

A ground-truth "preference model" for the synthetic world of :mod:`diffusion_dpo.data.synthetic`:
pure numpy, no weights, no device, so experiments on that world are scored exactly and cheaply.
"""

from __future__ import annotations

import torch
from PIL import Image

from diffusion_dpo.data.synthetic import faithfulness
from diffusion_dpo.scorers.base import Scorer


class ShapesScorer(Scorer):
    """Scores ``faithfulness(image, prompt)`` in [0, 1]: high only when the shape, its colour and the
    background colour all match the prompt (see :func:`~diffusion_dpo.data.synthetic.faithfulness`).

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
