"""The shared preference-loss core: pure functions, per-example outputs (docs/objectives.md).

Imports nothing of the package: everything else builds on it.
"""

from diffusion_dpo.losses.kto import kto_loss
from diffusion_dpo.losses.mapo import check_mapo_args, mapo_loss, mapo_score
from diffusion_dpo.losses.metrics import masked_mean, preference_metrics
from diffusion_dpo.losses.pairwise import (
    PAIRWISE_LOSSES,
    check_pairwise_args,
    dpo_loss,
    pairwise_loss_from_logratios,
)
from diffusion_dpo.losses.reference_free import orpo_loss, simpo_loss
from diffusion_dpo.losses.safeguard import (
    loser_gradient_scale,
    pairwise_logratio_gradients,
    safeguard_terms,
    scale_gradient,
)
from diffusion_dpo.losses.soft_labels import expected_pairwise_loss

__all__ = [
    "PAIRWISE_LOSSES",
    "check_mapo_args",
    "check_pairwise_args",
    "dpo_loss",
    "expected_pairwise_loss",
    "kto_loss",
    "loser_gradient_scale",
    "mapo_loss",
    "mapo_score",
    "masked_mean",
    "orpo_loss",
    "pairwise_logratio_gradients",
    "pairwise_loss_from_logratios",
    "preference_metrics",
    "safeguard_terms",
    "scale_gradient",
    "simpo_loss",
]
