"""The synthetic shapes world, and everything built on it: ``from diffusion_dpo import synthetic``.

- the world: prompts naming a coloured shape on a coloured background (:mod:`.world`), renders
  (:mod:`.rendering`), the programmatic faithfulness that plays the human (:mod:`.faithfulness`), the
  imperfect world's flawed images and noisy annotators (:mod:`.imperfect`), and its datasets in the
  project's formats (:mod:`.writers`). These import nothing of the package but
  :mod:`diffusion_dpo.data`'s parquet writers, so anything may use them: the tiny test models
  (:mod:`diffusion_dpo.models.tiny`), the ``shapes`` scorer, the tests. This package's namespace is
  the world's public API.
- the pretrained base model of the embedded default and the study (:mod:`.base`, :mod:`.vae`): a VAE
  fitted on the renders and a tiny UNet/MMDiT pretrained on captions with the trainer itself. These
  sit above :mod:`diffusion_dpo.training` and are imported only by the scripts (``train_sd.py``,
  ``data/synthetic_experiment.py``, ``data/iterative_dpo.py``) and the tests, never by this
  ``__init__``.
- the study's library (:mod:`.results`, :mod:`.plots`): results tables with intervals
  (:mod:`diffusion_dpo.evaluation.stats`) and the figures of ``data/synthetic_experiment.py``.
"""

from diffusion_dpo.synthetic.faithfulness import faithfulness, faithfulness_terms
from diffusion_dpo.synthetic.imperfect import (
    ERROR_PROBS,
    PICKAPIC_AGREEMENT,
    annotator_agreement,
    annotator_score,
    calibrate_temperature,
    generate_imperfect_pairs,
    with_errors,
)
from diffusion_dpo.synthetic.rendering import encode_png, render
from diffusion_dpo.synthetic.world import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_FRACTION,
    SHAPES,
    VOCABULARY,
    Spec,
    all_specs,
    caption,
    corrupt,
    heldout_prompts,
    parse_caption,
    sample_spec,
    specs_for,
    split_specs,
    validation_split,
)
from diffusion_dpo.synthetic.writers import (
    generate_captioned_images,
    generate_pairs,
    generate_unpaired,
    write_caption_dataset,
    write_imperfect_pair_dataset,
    write_pair_dataset,
    write_unpaired_dataset,
)

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "ERROR_PROBS",
    "HELDOUT_FRACTION",
    "PICKAPIC_AGREEMENT",
    "SHAPES",
    "VOCABULARY",
    "Spec",
    "all_specs",
    "annotator_agreement",
    "annotator_score",
    "calibrate_temperature",
    "caption",
    "corrupt",
    "encode_png",
    "faithfulness",
    "faithfulness_terms",
    "generate_captioned_images",
    "generate_imperfect_pairs",
    "generate_pairs",
    "generate_unpaired",
    "heldout_prompts",
    "parse_caption",
    "render",
    "sample_spec",
    "specs_for",
    "split_specs",
    "validation_split",
    "with_errors",
    "write_caption_dataset",
    "write_imperfect_pair_dataset",
    "write_pair_dataset",
    "write_unpaired_dataset",
]
