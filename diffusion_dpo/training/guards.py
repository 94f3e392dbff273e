"""What keeps a long run safe: preemption signals, non-finite steps, and the share of bad rows.

Each guard only keeps counts and decides; the loop acts (skips a step, saves a checkpoint, stops) and
raises :class:`RunStopped`, which ``train_sd.py`` turns into a message and an exit status.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

#: Rows with their reasons kept for the summary and the error message.
MAX_BAD_ROW_EXAMPLES = 10


class RunStopped(RuntimeError):
    """The run stopped on purpose after saving a checkpoint; the message says why and what to do.

    ``exit_code``: 128 + the signal number after SIGTERM/SIGINT (what a process killed by that signal
    reports, so job schedulers and launchers treat the job as preempted and requeue or restart it);
    1 for a run that should not simply be restarted (non-finite steps, bad data).
    """

    def __init__(self, message: str, exit_code: int = 1, checkpoint=None):
        super().__init__(message)
        self.exit_code = exit_code
        self.checkpoint = checkpoint


class PreemptionSignals:
    """While active, SIGTERM and SIGINT only set :attr:`received`; the loop then finishes its optimizer
    step, saves a checkpoint and stops. A second SIGINT (Ctrl-C twice) stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        logger.warning(
            "received %s: finishing the current optimizer step, then saving a checkpoint and stopping",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():  # Python handles signals there only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@dataclass
class NonFiniteSteps:
    """Counts optimizer steps skipped because the loss or the gradient was NaN/Inf."""

    max_consecutive: int
    skipped: int = 0
    consecutive: int = 0

    def record(self, finite: bool) -> bool:
        """Count one optimizer step; True when ``max_consecutive`` non-finite steps came in a row."""
        if finite:
            self.consecutive = 0
            return False
        self.skipped += 1
        self.consecutive += 1
        return self.consecutive >= self.max_consecutive

    def advice(self, mixed_precision: str) -> str:
        tips = ["lower --learning_rate (or a longer --lr_warmup_steps)", "check the data for extreme images"]
        if mixed_precision == "fp16":
            tips.insert(0, "use --mixed_precision bf16 instead of fp16 (fp16 overflows where bf16 does not)")
            tips.append(
                "for SDXL use the fp16-fixed VAE (--vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix)"
            )
        return "; ".join(tips)


def share_clearly_exceeds(bad: int, rows: int, max_fraction: float, alpha: float = 1e-6) -> bool:
    """True when ``bad`` of ``rows`` is strong evidence that the true share of bad rows exceeds
    ``max_fraction``: the Chernoff bound ``exp(−n·KL(bad/n ‖ max_fraction))`` on the chance of seeing
    that many bad rows if the share were only ``max_fraction`` is below ``alpha``. The run checks
    after every step, so ``alpha`` is tiny: a run whose data is within the limit is not stopped by a
    bad streak, while a mostly broken data set stops within a few batches."""
    if rows == 0 or bad / rows <= max_fraction:
        return False
    if max_fraction <= 0:
        return True
    q, p = bad / rows, max_fraction
    kl = q * math.log(q / p) + ((1 - q) * math.log((1 - q) / (1 - p)) if q < 1 else -math.log(1 - p))
    return rows * kl > math.log(1 / alpha)


@dataclass
class BadRows:
    """Rows skipped as bad (``--on_bad_example skip``): counts and the first few, across processes.

    ``rows`` counts every row training read (skipped ones included). The share is judged by
    :meth:`too_many`: a run stops once the rows read are strong evidence of more bad rows than
    ``max_fraction`` (:func:`share_clearly_exceeds`: a few bad rows among the first hundred do not stop
    a 335 GB run, while a data set that is mostly broken stops early), or when a whole epoch's share
    exceeds it. Rows dropped
    when the dataset is loaded (labels outside {0, 0.5, 1}) are counted apart: the load sees them all.
    """

    max_fraction: float
    rows: int = 0
    skipped: int = 0
    examples: list[dict] = field(default_factory=list)
    #: Load time: rows the loader looked at, rows it dropped as bad, the first of them.
    rows_at_load: int = 0
    skipped_at_load: int = 0
    load_examples: list[dict] = field(default_factory=list)

    def add(self, rows: int, skipped: int, examples: list[dict]) -> None:
        """Count rows read by training (all processes) and keep the first bad ones."""
        self.rows += rows
        self.skipped += skipped
        self.examples.extend(examples[: max(0, MAX_BAD_ROW_EXAMPLES - len(self.examples))])

    def set_load_time(self, rows: int, skipped: int, examples: list[dict]) -> None:
        self.rows_at_load, self.skipped_at_load = rows, skipped
        self.load_examples = list(examples[:MAX_BAD_ROW_EXAMPLES])

    @property
    def total_skipped(self) -> int:
        return self.skipped + self.skipped_at_load

    def first_examples(self) -> list[dict]:
        return (self.load_examples + self.examples)[:MAX_BAD_ROW_EXAMPLES]

    def too_many(self, epoch_done: bool = False) -> bool:
        if self.rows_at_load and self.skipped_at_load / self.rows_at_load > self.max_fraction:
            return True
        if epoch_done and self.rows and self.skipped / self.rows > self.max_fraction:
            return True
        return share_clearly_exceeds(self.skipped, self.rows, self.max_fraction)

    def message(self) -> str:
        shown = "; ".join(f"row {e['index']}: {e['reason']}" for e in self.first_examples()[:5])
        return (
            f"{self.total_skipped} bad rows skipped ({self.skipped} of {self.rows} rows read in training, "
            f"{self.skipped_at_load} of {self.rows_at_load} at load time): more than "
            f"--max_bad_row_fraction {self.max_fraction}. First ones: {shown or 'none recorded'}. "
            "Fix or filter the data, or raise --max_bad_row_fraction."
        )

    def summary(self) -> dict:
        return {
            "data/skipped_rows": self.total_skipped,
            "data/rows_read": self.rows,
            "data/bad_rows": self.first_examples(),
        }

    def state_dict(self) -> dict:
        # load-time counts are recomputed when the resumed run loads the data again
        return {"rows": self.rows, "skipped": self.skipped, "examples": self.examples}

    def load_state_dict(self, state: dict) -> None:
        self.rows, self.skipped, self.examples = state["rows"], state["skipped"], list(state["examples"])
