"""Monitors of a preference run going wrong while every number stays finite (docs/monitors.md).

Two halves, split by where they run:

- :func:`pair_monitor_metrics` turns tensors the step already has (log-ratios, the predictions' mean
  squares) into 0-dim device metrics. They join the step's other metrics, so the loop's one
  collective per optimizer step gathers them and its one host sync reads them: no extra forward, no
  extra sync, and N processes report what one process with their global batch reports.
- :func:`derived_monitors` and :class:`MonitorAlarms` work on the host, on those gathered means: the
  winner's and the loser's error relative to the reference, the prediction-norm ratio, trends (EMAs),
  and one warning per monitor the first time its trend crosses its threshold.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from diffusion_dpo.losses import masked_mean
from diffusion_dpo.training.auto_beta import AutoBeta

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

#: EMA decay of the trends (about a 10-step window) and the steps a trend must have seen before it
#: may raise a warning (an EMA over two noisy steps says little).
TREND_DECAY, WARMUP_CHECKS = 0.9, 20


def pair_monitor_metrics(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    beta: float,
    model_sq: Tensor,
    ref_sq: Tensor,
    valid: Tensor,
) -> dict[str, Tensor]:
    """Device metrics of one micro-batch of pairs, means over its valid pairs (0-dim, detached).

    ``chosen_logratios``/``rejected_logratios`` ``[B]`` (rc, rr); ``model_sq``/``ref_sq`` ``[2B]``: the
    mean squared prediction per image of the policy and the reference, winners first; ``valid``
    ``[B]`` bool. With δ = rc − rr:

    - ``monitors/negative_margins``: share of pairs with δ < 0 (an exact tie counts 0);
    - ``monitors/grad_factor``: mean σ(−βδ), the factor of the DPO gradient ``dL/dδ = −β·σ(−βδ)``
      (MATH.md §2): 0.5 at the start, → 0 as pairs saturate, → 1 for pairs the policy gets wrong;
    - ``monitors/abs_margin``: mean |βδ| (what ``--auto_beta`` steers by);
    - ``pred_ms/model``, ``pred_ms/ref``: mean squared prediction (their ratio's square root is the
      norm ratio, :func:`derived_monitors`).
    """
    delta = (chosen_logratios.detach().float() - rejected_logratios.detach().float()).reshape(-1)
    both = torch.cat([valid, valid])
    return {
        "monitors/negative_margins": masked_mean((delta < 0).float(), valid),
        "monitors/grad_factor": masked_mean(torch.sigmoid(-beta * delta), valid),
        "monitors/abs_margin": masked_mean((beta * delta).abs(), valid),
        "pred_ms/model": masked_mean(model_sq.detach(), both),
        "pred_ms/ref": masked_mean(ref_sq.detach(), both),
    }


def derived_monitors(metrics: dict) -> dict[str, float]:
    """Host-side monitors from a step's gathered means (``None`` values and missing keys skipped):

    - ``monitors/chosen_vs_ref`` = ``mse/model_chosen − mse/ref_chosen`` (> 0: the policy denoises the
      preferred images worse than the reference does), ``monitors/rejected_vs_ref`` likewise;
    - ``monitors/pred_norm_ratio`` = √(``pred_ms/model`` / ``pred_ms/ref``): the RMS of the policy's
      prediction over the reference's (NormGuard, arXiv 2606.27771: fine-tuning inflates it).

    Both are functions of means over the global batch, so they do not depend on how it was split."""
    out = {}
    for branch in ("chosen", "rejected"):
        model, ref = metrics.get(f"mse/model_{branch}"), metrics.get(f"mse/ref_{branch}")
        if model is not None and ref is not None:
            out[f"monitors/{branch}_vs_ref"] = model - ref
    model_ms, ref_ms = metrics.get("pred_ms/model"), metrics.get("pred_ms/ref")
    if model_ms is not None and ref_ms is not None and ref_ms > 0:
        out["monitors/pred_norm_ratio"] = math.sqrt(model_ms / ref_ms)
    return out


@dataclass(frozen=True)
class Threshold:
    """When a monitor's value is past its threshold (outside ``[low, high]``), and what to say then."""

    key: str  # the value checked: a trend "…_trend" or a metric
    low: float | None
    high: float | None
    meaning: str
    advice: str

    def past(self, value: float) -> bool:
        return (self.low is not None and value < self.low) or (self.high is not None and value > self.high)

    @property
    def limit(self) -> str:
        return " / ".join(f"{side} {v}" for side, v in (("<", self.low), (">", self.high)) if v is not None)


TRY = "lower --learning_rate, raise --beta_dpo, or enable --winner_safeguard"

#: The thresholds: the embedded default (configs/tiny.yaml) stays inside all of them, a
#: run at 15x its learning rate leaves the first within 20 steps (docs/monitors.md has the values).
THRESHOLDS = (
    # fmt: off
    Threshold(
        "monitors/chosen_rel_trend",
        None,
        0.5,
        "the policy denoises the PREFERRED images {value:.0%} worse than the reference (trend): the margin "
        "can still grow while both errors rise, and samples degrade (Diffusion-SDPO's failure mode)",
        TRY,
    ),
    Threshold(
        "monitors/negative_margins_trend",
        None,
        0.55,
        "{value:.0%} of the training pairs have a negative margin (trend): the policy now prefers the "
        "rejected images of most pairs; the updates overshoot or the labels are noisy",
        "lower --learning_rate, raise --beta_dpo; check the labels (data/audit_pairs.py)",
    ),
    Threshold(
        "monitors/grad_factor_trend",
        0.02,
        None,
        "the mean gradient factor σ(−βδ) fell to {value:.3f} (trend): the margins are so large that the "
        "loss barely teaches any more; the policy has drifted far from the reference",
        "lower --learning_rate or train fewer steps, raise --beta_dpo, or use --auto_beta",
    ),
    Threshold(
        "monitors/pred_norm_ratio_trend",
        0.85,
        1.15,
        "the policy's predictions are {value:.2f}x the reference's in norm (trend): fine-tuning that inflates "
        "(NormGuard) or shrinks them has left the reference's scale, before the samples show it",
        TRY,
    ),
    Threshold(
        "eval/implicit_acc_ci_high",
        0.5,
        None,
        "the held-out implicit-reward accuracy is significantly below chance (its 95% interval ends at "
        "{value:.2f}): the policy learns the training pairs but not the preference",
        "train fewer steps, lower --learning_rate, raise --beta_dpo; check the labels",
    ),
    Threshold(
        "eval/win_rate_ci_high",
        0.5,
        None,
        "the held-out samples lose to the reference's under --validation_scorer: the upper end of the win "
        "rate's 95% interval is {value:.2f}, below 0.5, so the policy's images are significantly worse than "
        "the model it started from",
        "go back to an earlier checkpoint; lower --learning_rate, raise --beta_dpo, or enable "
        "--winner_safeguard; check that the scorer measures what the labels prefer",
    ),
    # fmt: on
)


def _advice_line(threshold: Threshold, step: int, value: float) -> str:
    return f"step {step}: {threshold.meaning.format(value=value)}. Try: {threshold.advice}."


class MonitorAlarms:
    """Trends of the monitors, one warning per monitor (the first time its check is past its
    threshold), and how many checks in a row each has been past it (for ``--stop_on_degradation``).

    A check is one optimizer step for the step monitors and one validation for the held-out accuracy.
    A trend is a bias-corrected EMA (decay :data:`TREND_DECAY`); trends are checked from their
    :data:`WARMUP_CHECKS`-th value on. Everything is a function of the gathered metrics, so every
    process holds the same state; :meth:`state_dict` goes into checkpoints.
    """

    TRENDED = ("monitors/negative_margins", "monitors/grad_factor", "monitors/pred_norm_ratio")

    def __init__(self, thresholds: tuple[Threshold, ...] = THRESHOLDS):
        self.thresholds = thresholds
        self.ema: dict[str, float] = {}
        self.seen: dict[str, int] = {}
        self.consecutive: dict[str, int] = {}
        self.warnings: list[dict] = []

    def _trend(self, key: str, value: float) -> float:
        n = self.seen.get(key, 0) + 1
        self.seen[key] = n
        self.ema[key] = TREND_DECAY * self.ema.get(key, 0.0) + (1 - TREND_DECAY) * value
        return self.ema[key] / (1 - TREND_DECAY**n)

    def observe(self, step: int, row: dict) -> list[str]:
        """Add the trends to ``row`` (a step's metrics, derived monitors included), check the
        thresholds, and return the warnings raised for the first time (also logged and kept)."""
        values: dict[
            str, tuple[float, int]
        ] = {}  # checked key -> (value, how many values its trend has seen)
        for key in self.TRENDED:
            if isinstance(row.get(key), float) and math.isfinite(row[key]):
                row[f"{key}_trend"] = trend = self._trend(key, row[key])
                values[f"{key}_trend"] = (trend, self.seen[key])
        # the winner's error relative to the reference's: the trend of the difference over that of the
        # reference error (a ratio of EMAs: scale-free, and single noisy steps do not dominate)
        diff, ref = row.get("monitors/chosen_vs_ref"), row.get("mse/ref_chosen")
        if isinstance(diff, float) and isinstance(ref, float) and math.isfinite(diff) and math.isfinite(ref):
            row["monitors/chosen_vs_ref_trend"] = trend = self._trend("monitors/chosen_vs_ref", diff)
            ref_trend = self._trend("mse/ref_chosen", ref)
            if ref_trend > 0:
                row["monitors/chosen_rel_trend"] = trend / ref_trend
                values["monitors/chosen_rel_trend"] = (trend / ref_trend, self.seen["mse/ref_chosen"])
        for key in (
            "eval/implicit_acc_ci_high",
            "eval/win_rate_ci_high",
        ):  # a validation is a whole measurement
            if isinstance(row.get(key), float):
                values[key] = (row[key], WARMUP_CHECKS)

        new = []
        fired = {w["monitor"] for w in self.warnings}
        for threshold in self.thresholds:
            key = threshold.key
            if key not in values or values[key][1] < WARMUP_CHECKS:
                continue
            value = values[key][0]
            if not threshold.past(value):
                self.consecutive[key] = 0
                continue
            self.consecutive[key] = self.consecutive.get(key, 0) + 1
            if key not in fired:
                message = _advice_line(threshold, step, value)
                self.warnings.append(
                    {"monitor": key, "step": step, "value": value, "threshold": threshold.limit,
                     "message": message}
                )  # fmt: skip
                logger.warning("monitor %s: %s", key, message)
                new.append(message)
        return new

    def stalled(self, checks: int) -> dict | None:
        """The first monitor past its threshold for ``checks`` checks in a row (``checks`` > 0), as
        ``{"monitor", "checks", "message"}``; None if none (or ``checks`` is 0: off)."""
        if checks <= 0:
            return None
        for threshold in self.thresholds:
            if self.consecutive.get(threshold.key, 0) >= checks:
                first = next(w for w in self.warnings if w["monitor"] == threshold.key)
                return {"monitor": threshold.key, "checks": self.consecutive[threshold.key], **first}
        return None

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "seen": dict(self.seen), "consecutive": dict(self.consecutive),
                "warnings": list(self.warnings)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.ema, self.seen = dict(state["ema"]), dict(state["seen"])
        self.consecutive, self.warnings = dict(state["consecutive"]), list(state["warnings"])


class RunMonitors:
    """What the loop holds for this module: the alarms, ``--auto_beta``'s controller and
    ``--stop_on_degradation``, behind three calls (:meth:`after_step`, :meth:`stop_reason`, the state)."""

    def __init__(self, cfg):
        self.alarms = MonitorAlarms()
        self.stop_after = cfg.stop_on_degradation
        self.auto_beta = None
        if cfg.auto_beta:
            low, high = cfg.beta_range
            self.auto_beta = AutoBeta(
                cfg.beta_dpo, cfg.auto_beta_target, cfg.auto_beta_decay, low=low, high=high
            )

    @property
    def beta(self) -> float | None:
        """β for the next step's loss (None: ``--beta_dpo``)."""
        return None if self.auto_beta is None else self.auto_beta.beta

    def after_step(self, step: int, row: dict) -> None:
        """Add the derived monitors and their trends to a step's ``row``; warn once per monitor; with
        ``--auto_beta``, record the step's β (``train/beta``) and set the next one."""
        row.update(derived_monitors(row))
        if self.auto_beta is not None:
            row["train/beta"] = self.auto_beta.beta
            self.auto_beta.update(row.get("monitors/abs_margin"), self.auto_beta.beta)
        self.alarms.observe(step, row)

    def stop_reason(self, step: int) -> str | None:
        """With ``--stop_on_degradation N``: why the run should stop now, with advice; else None."""
        stalled = self.alarms.stalled(self.stop_after)
        if stalled is None:
            return None
        return (
            f"stopped at step {step}: monitor {stalled['monitor']} has been past its threshold "
            f"({stalled['threshold']}) for {stalled['checks']} checks in a row (--stop_on_degradation "
            f"{self.stop_after}). First warning, {stalled['message']}"
        )

    def summary(self) -> dict:
        return {"monitors/warnings": list(self.alarms.warnings)}

    def state_dict(self) -> dict:
        state = {"alarms": self.alarms.state_dict()}
        if self.auto_beta is not None:
            state["auto_beta"] = self.auto_beta.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.alarms.load_state_dict(state["alarms"])
        # a resumed run (often with changed settings) gets --stop_on_degradation's N checks afresh
        self.alarms.consecutive = {}
        if self.auto_beta is not None and "auto_beta" in state:
            self.auto_beta.load_state_dict(state["auto_beta"])
