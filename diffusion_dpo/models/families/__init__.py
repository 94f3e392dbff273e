"""One small module per model family (SD1.x/2.x, SDXL, SD3/3.5, Qwen-Image): see :mod:`.base` for what
each knows.

Flux (``FluxPipeline``) is recognised and refused with what it still needs (docs/sd3.md#flux).

Adding a family is one new module here (a :class:`~.base.ModelFamily` subclass) and its entry in
:data:`FAMILIES`; the loop, the step, the objective and evaluation do not change. May import:
:mod:`diffusion_dpo.models.pretrained`, :mod:`diffusion_dpo.diffusion.processes`,
:mod:`diffusion_dpo.transfer`; never :mod:`diffusion_dpo.models.loading`, which imports this package.
"""

from __future__ import annotations

from pathlib import Path

from diffusion_dpo.models.families.base import ModelFamily
from diffusion_dpo.models.families.qwen_image import QwenImageFamily
from diffusion_dpo.models.families.sd import SDFamily
from diffusion_dpo.models.families.sd3 import SD3Family
from diffusion_dpo.models.families.sdxl import SDXLFamily
from diffusion_dpo.models.pretrained import read_model_index

#: most specific first: an SDXL index also has a UNet
FAMILIES: tuple[type[ModelFamily], ...] = (QwenImageFamily, SD3Family, SDXLFamily, SDFamily)


def family_for_index(index: dict, where: str = "the model", **options) -> ModelFamily:
    """The family of a pipeline's ``model_index.json``, built with its options (``drop_t5``,
    ``max_sequence_length``, and the flow process's: ``weighting_scheme`` …)."""
    name = index.get("_class_name", "")
    if name.startswith("Flux"):
        raise ValueError(
            f"{where} is a {name}: Flux is not supported yet (its transformer takes packed 2×2 latent "
            "patches, image/text position ids and a guidance embedding); SD1.x/2.x, SDXL and SD3/SD3.5 are"
        )
    if name.startswith("QwenImage") and name != QwenImageFamily.pipeline_class_name:
        raise ValueError(
            f"{where} is a {name}: of the Qwen-Image pipelines only the text-to-image QwenImagePipeline is "
            "supported (edit, inpainting and ControlNet ones take condition images)"
        )
    for family in FAMILIES:
        if family.matches(index):
            return family(**options)
    raise ValueError(
        f"{where} is a {name or 'pipeline'} with parts {sorted(k for k in index if not k.startswith('_'))}: "
        "not a Stable Diffusion 1.x/2.x, SDXL or SD3 pipeline"
    )


def pipeline_load_kwargs(source, options: dict | None = None, revision=None) -> dict:
    """Extra ``from_pretrained`` keywords to load the pipeline at ``source`` as it was trained (SD3
    without T5); {} where there are none or ``source``'s index cannot be read."""
    if not Path(str(source)).exists() and not (options or {}).get("drop_t5"):
        return {}  # a hub pipeline saved by its authors has every part
    try:
        index = read_model_index(str(source), revision)
        family = family_for_index(index, str(source), **(options or {}))
    except (FileNotFoundError, ValueError):  # the loader that follows says what is wrong
        return {}
    return family.pipeline_load_kwargs(index)


def family_for_pipeline(pipe, **options) -> ModelFamily:
    """The family of a loaded diffusers pipeline."""
    return family_for_index(
        {"_class_name": type(pipe).__name__, **pipe.config}, type(pipe).__name__, **options
    )


__all__ = [
    "FAMILIES",
    "ModelFamily",
    "QwenImageFamily",
    "SD3Family",
    "SDFamily",
    "SDXLFamily",
    "family_for_index",
    "family_for_pipeline",
    "pipeline_load_kwargs",
]
