"""``--auto_beta``: β adapted to a target gradient factor (SimpleTuner's ``auto_beta`` idea).

The DPO gradient of a pair is ``−β·σ(−βδ)`` (MATH.md §2): with β too small the loss is nearly linear
and every pair pulls as hard however well it is learned; with β too large the sigmoid saturates and
learned pairs stop teaching. After each optimizer step, β is set so that a pair with the typical
margin, an EMA of the global batch's mean |δ|, has the gradient factor ``σ(−β·|δ|) = target``:

    β = logit(1 − target) / EMA(mean |δ|),   clamped to [β_min, β_max].

The batch mean |δ| is ``monitors/abs_margin / β`` of the step, a value the loop's one collective has
already gathered: every process computes the same β with no extra sync, and the state (β, the EMA)
is saved in each checkpoint, so a resumed run continues with exactly the β it had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class AutoBeta:
    beta: float
    target: float = 0.2
    decay: float = 0.99
    low: float = 0.0
    high: float = math.inf
    ema: float | None = None  # of the batch mean |δ|; None until a step had a margin

    def update(self, abs_margin: float | None, beta_used: float) -> float:
        """Fold one step's ``monitors/abs_margin`` (mean |βδ| at ``beta_used``) in; returns the β of the
        next step. A step with no margin (the first one: the policy equals its reference) changes nothing."""
        if abs_margin is None or not math.isfinite(abs_margin) or abs_margin <= 0:
            return self.beta
        delta = abs_margin / beta_used
        self.ema = delta if self.ema is None else self.decay * self.ema + (1 - self.decay) * delta
        wanted = math.log((1 - self.target) / self.target) / self.ema
        self.beta = min(self.high, max(self.low, wanted))
        return self.beta

    def state_dict(self) -> dict:
        return {"beta": self.beta, "ema": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.beta, self.ema = state["beta"], state["ema"]
