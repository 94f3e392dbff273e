"""Preference tuning for causal LMs on the shared loss core: log-probs, forwards, one-batch losses.

May import: :mod:`diffusion_dpo.losses` only.
"""

from diffusion_dpo.lm.logps import (
    IGNORE_INDEX,
    completion_token_counts,
    sequence_logps,
    tokenize_kto_batch,
    tokenize_pairs,
    tokenize_preference_pairs,
)
from diffusion_dpo.lm.step import (
    AVERAGED_LOSSES,
    REFERENCE_FREE_LOSSES,
    concatenated_forward,
    create_reference_model,
    kto_kl_estimate,
    kto_step,
    preference_step,
    reference_logps,
)

__all__ = [
    "AVERAGED_LOSSES",
    "IGNORE_INDEX",
    "REFERENCE_FREE_LOSSES",
    "completion_token_counts",
    "concatenated_forward",
    "create_reference_model",
    "kto_kl_estimate",
    "kto_step",
    "preference_step",
    "reference_logps",
    "sequence_logps",
    "tokenize_kto_batch",
    "tokenize_pairs",
    "tokenize_preference_pairs",
]
