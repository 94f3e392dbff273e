"""Forward passes and one-batch loss for preference-tuning a causal LM with the shared loss core.

Batches come from :mod:`diffusion_dpo.lm.logps`: a paired batch stacks chosen rows on rejected rows
(``[2B, T]``), a KTO batch holds unpaired rows plus their mismatched ``kl_*`` rows.

Dropout makes the policy's and (for a PEFT reference) the reference's log-probs random; as TRL does
by default, build or configure the model with dropout 0 for preference training.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping

import torch

from diffusion_dpo.lm.logps import completion_token_counts, sequence_logps
from diffusion_dpo.losses import (
    PAIRWISE_LOSSES,
    check_pairwise_args,
    dpo_loss,
    kto_loss,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)

Tensor = torch.Tensor

#: Reference-free losses that :func:`preference_step` also accepts (no reference forward).
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
#: Losses that use per-token averaged log-probs (IPO as TRL computes it; SimPO; ORPO).
AVERAGED_LOSSES = ("ipo", "simpo", "orpo")


def _require(batch: Mapping[str, Tensor], keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; it has {sorted(batch)}")


def _logps(model, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, average: bool) -> Tensor:
    """One forward of ``model`` on ``[N, T]`` inputs; returns ``[N]`` completion log-probs."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return sequence_logps(logits, labels, average=average)


def create_reference_model(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model``: same weights, ``eval()`` mode, no parameter requires grad."""
    return copy.deepcopy(model).eval().requires_grad_(False)


@contextlib.contextmanager
def _reference(model: torch.nn.Module, ref_model: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """Yield the module whose forward is the reference: ``ref_model``, or ``model`` with its adapter off."""
    if ref_model is not None:
        yield ref_model
        return
    from peft import PeftModel  # imported here: only this path needs peft

    # accelerate/DDP wrap the PeftModel in `.module`; the wrapper's forward still reaches it.
    inner = getattr(model, "module", model)
    if not isinstance(inner, PeftModel):
        raise ValueError(
            "ref_model is None but the model is not a peft.PeftModel, so there is no adapter to disable "
            f"for the reference forward (got {type(inner).__name__}); pass ref_model="
            "create_reference_model(model) before training, or wrap the model with peft.get_peft_model"
        )
    with inner.disable_adapter():
        yield model


def concatenated_forward(
    model: torch.nn.Module, batch: Mapping[str, Tensor], *, average: bool = False
) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Chosen and rejected log-probs from one forward over the stacked batch.

    One forward of ``2B`` rows instead of two of ``B`` (as in TRL): one kernel launch per layer, and
    with FSDP/ZeRO one parameter gather instead of two.

    Args:
        model: a causal LM returning ``.logits``.
        batch: ``input_ids``, ``attention_mask``, ``labels``, each ``[2B, T]``: rows ``0..B-1`` chosen,
            ``B..2B-1`` rejected (see :func:`diffusion_dpo.lm.tokenize_preference_pairs`).
        average: per-token averaged log-probs instead of sums.

    Returns:
        ``(chosen_logps [B], rejected_logps [B], extras)``; ``extras`` holds ``chosen_num_tokens`` and
        ``rejected_num_tokens`` ``[B]``, the number of completion tokens scored.
    """
    _require(batch, ("input_ids", "attention_mask", "labels"))
    n = batch["input_ids"].shape[0]
    if n % 2:
        raise ValueError(f"batch['input_ids'] must stack chosen on rejected rows ([2B, T]); got {n} rows")
    logps = _logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], average)
    counts = completion_token_counts(batch["labels"])
    b = n // 2
    extras = {"chosen_num_tokens": counts[:b], "rejected_num_tokens": counts[b:]}
    return logps[:b], logps[b:], extras


def reference_logps(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    *,
    ref_model: torch.nn.Module | None = None,
    average: bool = False,
) -> tuple[Tensor, Tensor]:
    """Reference chosen and rejected log-probs ``[B]`` each, under ``torch.no_grad()``.

    The reference is ``ref_model`` (a frozen copy, see :func:`create_reference_model`) or, when
    ``ref_model is None``, the PEFT policy itself inside ``model.disable_adapter()``: the base model
    without a second copy in memory.
    """
    with torch.no_grad(), _reference(model, ref_model) as ref:
        chosen, rejected, _ = concatenated_forward(ref, batch, average=average)
    return chosen, rejected


def preference_step(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    *,
    ref_model: torch.nn.Module | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma_beta_ratio: float = 0.5,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and loss of one paired batch: DPO and its variants, SimPO or ORPO.

    Args:
        model: the policy (a causal LM, optionally a ``peft.PeftModel``).
        batch: a paired batch ``[2B, T]`` (see :func:`concatenated_forward`); an optional ``label_p``
            ``[B]`` (P(chosen preferred)) trains the pairwise losses on soft labels.
        ref_model: frozen reference; ``None`` uses the PEFT policy with its adapter disabled. Must be
            ``None`` for the reference-free ``simpo`` and ``orpo``.
        loss_type: a pairwise loss of :data:`diffusion_dpo.losses.PAIRWISE_LOSSES` (``sigmoid`` is
            DPO), or ``simpo`` / ``orpo``. ``ipo``, ``simpo`` and ``orpo`` use per-token averaged
            log-probs, the others sums. KTO is unpaired: use :func:`kto_step`.
        beta: β of the pairwise losses (0.1 is the LM default); SimPO's β (the paper uses 2–10);
            ORPO's λ (0.1 in the paper).
        label_smoothing: ε for ``sigmoid``, ``robust``, ``exo_pair`` and ``simpo``.
        simpo_gamma_beta_ratio: SimPO's γ/β (0.5 in the paper).

    Returns:
        ``(loss, metrics)``: the batch-mean loss (0-dim, with gradient) and detached 0-dim metrics:
        ``loss``, ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
        ``logps/chosen``, ``logps/rejected`` (the log-probs the loss used: averaged for ``ipo``,
        ``simpo``, ``orpo``), plus ``nll_loss`` for ``orpo``. Gather them across processes and call
        ``.item()`` only when logging.
    """
    if loss_type == "kto":
        raise ValueError("loss_type='kto' is unpaired and needs a KL estimate; call kto_step instead")
    if loss_type in REFERENCE_FREE_LOSSES:
        if ref_model is not None:
            raise ValueError(f"loss_type={loss_type!r} is reference-free; pass ref_model=None")
        if loss_type == "orpo" and label_smoothing != 0.0:
            raise ValueError(f"label_smoothing={label_smoothing!r} has no meaning for loss_type='orpo'")
    elif loss_type in PAIRWISE_LOSSES:
        check_pairwise_args(loss_type, beta, label_smoothing)  # fail before the forward passes
    else:
        raise ValueError(
            f"loss_type={loss_type!r} is not supported; choose one of "
            f"{sorted(PAIRWISE_LOSSES) + list(REFERENCE_FREE_LOSSES)} (or kto_step for 'kto')"
        )

    average = loss_type in AVERAGED_LOSSES
    chosen, rejected, _ = concatenated_forward(model, batch, average=average)
    extra_metrics = {}
    if loss_type == "simpo":
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen,
            rejected,
            beta=beta,
            gamma_beta_ratio=simpo_gamma_beta_ratio,
            label_smoothing=label_smoothing,
        )
    elif loss_type == "orpo":
        # ORPO's SFT term: per-token averaged NLL of the chosen completion.
        losses, chosen_rewards, rejected_rewards = orpo_loss(chosen, rejected, -chosen, lam=beta)
        extra_metrics["nll_loss"] = (-chosen).detach().mean()
    else:
        ref_chosen, ref_rejected = reference_logps(model, batch, ref_model=ref_model, average=average)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            label_p=batch.get("label_p"),  # soft labels when the batch carries them (losses/soft_labels.py)
        )
    loss = losses.mean()
    metrics = {
        "loss": loss.detach(),
        **preference_metrics(chosen_rewards, rejected_rewards, chosen, rejected),
    }
    metrics.update(extra_metrics)
    return loss, metrics


def kto_kl_estimate(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    *,
    ref_model: torch.nn.Module | None = None,
    accelerator=None,
) -> Tensor:
    """KTO's KL estimate ``mean(log πθ − log πref)`` over the batch's mismatched pairs (arXiv 2402.01306).

    Computed under ``torch.no_grad()`` on ``kl_input_ids``, ``kl_attention_mask``, ``kl_labels``
    (prompt ``i`` with completion ``(i + 1) mod B``, see :func:`diffusion_dpo.lm.tokenize_kto_batch`);
    summed log-probs, as TRL. The result is not clamped: :func:`diffusion_dpo.losses.kto_loss` takes
    ``max(0, ·)`` after any averaging.

    In distributed training every process must use the same reference point: average the estimate
    across processes before passing it to ``kto_loss``, e.g. ``accelerator.reduce(kl, "mean")`` (or
    ``accelerator.gather(kl[None]).mean()``). Passing ``accelerator`` here does exactly that.

    Returns:
        0-dim float32 tensor, no gradient.
    """
    _require(batch, ("kl_input_ids", "kl_attention_mask", "kl_labels"))
    with torch.no_grad():
        policy = _logps(model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"], False)
        with _reference(model, ref_model) as ref:
            reference = _logps(
                ref, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_labels"], False
            )
        kl = (policy - reference).mean()
        if accelerator is not None:
            kl = accelerator.reduce(kl, reduction="mean")
    return kl


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # NaN when the batch has no row of this kind (no device sync to check it); log it as "absent".
    return (values * mask).sum() / mask.sum()


def kto_step(
    model: torch.nn.Module,
    batch: Mapping[str, Tensor],
    *,
    ref_model: torch.nn.Module | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl: Tensor | float | None = None,
    accelerator=None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and KTO loss of one unpaired batch (Ethayarajh et al. 2024; docs/objectives.md#kto).

    Args:
        model: the policy; ``ref_model`` as in :func:`preference_step`.
        batch: from :func:`diffusion_dpo.lm.tokenize_kto_batch`: ``input_ids``, ``attention_mask``,
            ``labels`` ``[B, T]``, ``desirable`` ``[B]`` bool, and ``kl_*`` mismatched rows.
        beta, desirable_weight, undesirable_weight: as in :func:`diffusion_dpo.losses.kto_loss`.
        kl: a precomputed KL estimate; ``None`` computes it with :func:`kto_kl_estimate` (averaged over
            processes when ``accelerator`` is given).

    Returns:
        ``(loss, metrics)``: batch-mean loss and detached 0-dim metrics ``loss``, ``kl``,
        ``rewards/chosen`` and ``logps/chosen`` (means over desirable rows), ``rewards/rejected`` and
        ``logps/rejected`` (undesirable rows), ``rewards/margins`` (their difference). A kind absent
        from the batch gives NaN for its means.
    """
    _require(batch, ("input_ids", "attention_mask", "labels", "desirable"))
    desirable = batch["desirable"]
    if kl is None:
        kl = kto_kl_estimate(model, batch, ref_model=ref_model, accelerator=accelerator)
    policy = _logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], False)
    with torch.no_grad(), _reference(model, ref_model) as ref:
        reference = _logps(ref, batch["input_ids"], batch["attention_mask"], batch["labels"], False)
    losses, rewards = kto_loss(
        policy,
        reference,
        desirable,
        kl,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
    )
    loss = losses.mean()
    d, u = desirable.float(), (~desirable).float()
    logps = policy.detach()
    metrics = {
        "loss": loss.detach(),
        "kl": torch.as_tensor(kl, dtype=torch.float32, device=loss.device).detach(),
        "rewards/chosen": _masked_mean(rewards, d),
        "rewards/rejected": _masked_mean(rewards, u),
        "logps/chosen": _masked_mean(logps, d),
        "logps/rejected": _masked_mean(logps, u),
    }
    metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics
