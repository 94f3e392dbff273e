"""The training loop: one explicit loop on accelerate, readable top to bottom in :func:`train`.

:func:`train` is the loop itself; each thing it does once or per step is a named function below it,
in the order it runs: :func:`set_up` (accelerator, models, data, optimizer, held-out pairs, guards),
:func:`resume`, per epoch :func:`start_epoch`, per micro-batch :func:`take_position` and the loss, per
optimizer step :func:`optimizer_step`, :func:`log_step`, :func:`stop_if_asked`,
:func:`checkpoint_and_sample`, then :func:`end_epoch` and :func:`finish`. Side paths are small modules
beside it: model set-up (:mod:`.models`), the rows of this process (:mod:`.data_setup`), the loss of
one micro-batch (:mod:`.step`), what processes exchange (:mod:`.collectives`), held-out accuracy
(:mod:`.validation`), checkpoints (:mod:`.checkpoint`), outputs (:mod:`.saving`), ``metrics.jsonl``
(:mod:`.metrics_file`) and the guards of a long run (:mod:`.guards`).

Per optimizer step the loop does one collective: the metric sums, the rows read and skipped, a
non-finite flag and a stop flag of every process, summed together (``window.reduce`` in :func:`train`).
So every process agrees, before the optimizer steps, on whether the step is skipped (NaN/Inf) and
whether the run stops (a signal reached any of them).

Why ~500 lines in one module: the loop and the functions it calls read in the order they run, on
what they share (:class:`Run`, :class:`Position`); tests reach the set-up and the step through this
module (``loop.setup_models``, ``loop.compute_batch_loss``).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from diffusion_dpo.evaluation.stats import wilson_interval
from diffusion_dpo.training import checkpoint as ckpt
from diffusion_dpo.training import distributed as dist
from diffusion_dpo.training.collectives import StepWindow, gather_bad_rows, stream_position, synchronized
from diffusion_dpo.training.config import TrainConfig
from diffusion_dpo.training.console import progress_fields, setup_logging
from diffusion_dpo.training.guards import BadRows, NonFiniteSteps, PreemptionSignals, RunStopped
from diffusion_dpo.training.metrics_file import append_metrics, truncate_metrics
from diffusion_dpo.training.model_card import write_model_card
from diffusion_dpo.training.models import encoders_on, setup_models
from diffusion_dpo.training.monitors import RunMonitors
from diffusion_dpo.training.optim import make_optimizer
from diffusion_dpo.training.preflight import check_sources
from diffusion_dpo.training.previous_run import start_over
from diffusion_dpo.training.saving import final_samples, save_final_model, validation_images
from diffusion_dpo.training.step import compute_batch_loss
from diffusion_dpo.training.validation import encode_heldout_pairs, heldout_accuracy
from diffusion_dpo.training.win_rate import SampleWinRate, validation_prompts

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["StepWindow", "compute_batch_loss", "setup_models", "train"]


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (final step, last metrics, counts, seconds, the models).

    Raises :class:`~diffusion_dpo.training.guards.RunStopped` after saving a checkpoint when the run
    stops early on purpose (a signal, non-finite steps in a row, too many bad rows).
    """
    started = time.time()
    run = set_up(cfg)
    at = resume(run)
    accelerator, models = run.accelerator, run.models
    bar = tqdm(
        total=cfg.max_train_steps, initial=at.global_step, desc="steps",
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    window, last_row = StepWindow(), {}
    all_reduce_sum = (
        (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None
    )
    with PreemptionSignals() as signals:
        while at.global_step < cfg.max_train_steps:
            resumed_mid_epoch = start_epoch(run, at)
            batches = 0
            for batch in synchronized(run.data.loader, accelerator, run.data.streaming):
                batches += 1
                take_position(run, at, batch)
                with accelerator.accumulate(models.unet):
                    loss, metrics = compute_batch_loss(
                        models, batch, cfg, all_reduce_sum=all_reduce_sum, beta=run.monitors.beta
                    )
                    accelerator.backward(loss)
                window.add(loss, metrics, batch)
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step: agree on it (the one collective), then step (or skip) --------
                # clip first, so that the norm is read in the same host sync as the metrics and flags
                norm = accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm)
                totals = window.reduce(accelerator, stop=signals.received is not None, grad_norm=norm)
                finite = optimizer_step(run, totals)
                at.global_step += 1
                bar.update(1)
                too_many_nonfinite = run.nonfinite.record(finite)
                new_bad = gather_bad_rows(accelerator, window.bad_rows) if totals["skipped"] else []
                run.bad.add(totals["rows"], totals["skipped"], new_bad)
                window = StepWindow()
                last_row = log_step(run, at, totals, finite, new_bad, bar)

                # ---- stop early, checkpoint, sample --------------------------------------------
                stop_if_asked(run, at, too_many_nonfinite, totals["stop"], signals.received)
                checkpoint_and_sample(run, at)
                if at.global_step >= cfg.max_train_steps:
                    break
            else:
                end_epoch(run, at, batches, resumed_mid_epoch)
    bar.close()
    return finish(run, at, last_row, started)


# ----------------------------------------------------------------------------------------------
# set-up and resume


@dataclass
class Run:
    """What the loop works with, made once by :func:`set_up`: the models (``models.unet`` prepared by
    accelerate), this process's data, the optimizer and its schedule, the held-out pairs, the guards."""

    cfg: TrainConfig
    out: Path
    accelerator: Any
    models: Any  # training.models.TrainModels
    data: Any  # training.data_setup.TrainData
    optimizer: Any
    lr_scheduler: Any
    lr: float
    params: list  # what the gradient clip reads: after prepare, as sharding engines replace them
    owns_step: bool  # DeepSpeed steps (or skips) the optimizer inside accelerator.backward
    heldout: Any
    nonfinite: NonFiniteSteps
    bad: BadRows
    monitors: RunMonitors  # docs/monitors.md: warnings, --auto_beta, --stop_on_degradation
    win_rate: SampleWinRate | None = None  # --validation_scorer: samples vs the reference's


@dataclass
class Position:
    """Where the run is: step, epoch, and this process's place in the epoch's data, which checkpoints
    keep (map-style data: the rows all processes read; a stream: each reader's state)."""

    global_step: int = 0
    epoch: int = 0
    resumed: dict | None = None  # a checkpoint's place in its epoch, until that epoch starts again
    rows_done: int = 0
    reader_states: dict = field(default_factory=dict)
    last_reader: Any = None


def set_up(cfg: TrainConfig) -> Run:
    """The accelerator, the models, this process's data, the optimizer, the held-out pairs, the guards."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from diffusion_dpo.training.data_setup import (
        build_train_data,
        build_validation_dataloader,
        open_fitting_cache,
    )

    check_sources(cfg)  # every path and hub id the run reads, before anything is created or loaded
    if cfg.validation_scorer:
        from diffusion_dpo.scorers import check_scorer

        check_scorer(cfg.validation_scorer)  # its weight files, named before the models load
    out = Path(cfg.output_dir)
    accelerator = _accelerator(cfg, out)
    # Seeds model initialisation (LoRA adapters) alike on every process. The training draws do not use
    # the global RNG: noise, timesteps and augmentation come from each row's own generator.
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    if cfg.latents_cache:
        open_fitting_cache(cfg)  # a cache of another model or setting: refused before the models load
    with dist.frozen_parts_loading(accelerator):
        models = setup_models(cfg, accelerator.device)
    data = build_train_data(
        cfg, models.components.family.micro_conditioning, accelerator.num_processes, accelerator.process_index,
        pin_memory=accelerator.device.type == "cuda",
    )  # fmt: skip
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    optimizer = make_optimizer(
        cfg, [p for p in models.unet.parameters() if p.requires_grad], lr, accelerator.device
    )
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer,
        # accelerate steps a prepared scheduler once per process per optimizer step
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    # The data loader is not prepared: its order and sharding are ours (data.order, data.stream).
    dist.configure_engine(accelerator, cfg)
    models.unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    models.ref_unet = dist.prepare_reference(accelerator, models.ref_unet)
    # after prepare: sharding engines replace the parameters, and clip the ones the model holds now
    params = list(models.unet.parameters())
    owns_step = dist.engine(accelerator) == "deepspeed"  # DeepSpeed steps inside accelerator.backward
    if cfg.validation_prompts and dist.params_sharded(accelerator):
        logger.warning(
            "%s shards the UNet, so validation images are not sampled during training (one process cannot "
            "run it alone); the final samples are made from the saved model",
            dist.engine(accelerator),
        )
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("diffusion-dpo", config=cfg.to_dict())

    heldout = None
    if cfg.validation_dataset_name:
        with encoders_on(models, accelerator.device):
            heldout = encode_heldout_pairs(
                models, build_validation_dataloader(cfg, models.components.family.micro_conditioning),
                cfg.num_validation_pairs, cfg.resolution,
            )  # fmt: skip

    win = None
    if cfg.validation_scorer and dist.params_sharded(accelerator):
        logger.warning(
            "%s shards the UNet, so --validation_scorer's win rate is not measured during training (one "
            "process cannot sample alone); run eval/evaluate.py on the saved model",
            dist.engine(accelerator),
        )
    elif cfg.validation_scorer:
        win = SampleWinRate(cfg, validation_prompts(cfg, heldout), accelerator.device)

    bad = BadRows(cfg.max_bad_row_fraction)
    stats = data.stats
    if stats is not None and getattr(stats, "bad_labels", 0):
        bad.set_load_time(
            stats.seen, stats.bad_labels,
            [{"index": i, "reason": r} for i, r in getattr(stats, "bad_label_rows", [])],
        )  # fmt: skip
    return Run(
        cfg=cfg, out=out, accelerator=accelerator, models=models, data=data, optimizer=optimizer,
        lr_scheduler=lr_scheduler, lr=lr, params=params, owns_step=owns_step, heldout=heldout,
        nonfinite=NonFiniteSteps(cfg.max_nonfinite_steps), bad=bad, monitors=RunMonitors(cfg), win_rate=win,
    )  # fmt: skip


def _accelerator(cfg: TrainConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        kwargs_handlers=dist.process_group_kwargs(),
    )
    setup_logging()
    dist.check_launch(accelerator, cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    return accelerator


def resume(run: Run) -> Position:
    """The position of ``--resume_from_checkpoint`` (the guards' counts restored with it), or of a fresh
    run; then say what is trained."""
    cfg, accelerator, out = run.cfg, run.accelerator, run.out
    at = Position()
    resume_path = ckpt.resolve_resume_path(cfg.resume_from_checkpoint, out)
    if resume_path is not None:
        state = ckpt.load_checkpoint(accelerator, resume_path)
        at.global_step, at.epoch = state["global_step"], state["epoch"]
        at.resumed = state.get("position")
        if at.resumed is None and "batches_done" in state:  # a checkpoint of an earlier version
            at.resumed = {
                "rows_done": state["batches_done"] * cfg.train_batch_size * accelerator.num_processes
            }
        if "nonfinite" in state:
            run.nonfinite.skipped, run.nonfinite.consecutive = (
                state["nonfinite"]["skipped"],
                state["nonfinite"]["consecutive"],
            )
        if "bad_rows" in state:
            run.bad.load_state_dict(state["bad_rows"])
        if "monitors" in state:
            run.monitors.load_state_dict(state["monitors"])
        logger.info("resumed from %s at step %d (epoch %d)", resume_path, at.global_step, at.epoch)
        if accelerator.is_main_process:
            truncate_metrics(out / "metrics.jsonl", at.global_step)
    elif accelerator.is_main_process:
        # a fresh run: metrics of an earlier run in the same output_dir are not continued
        truncate_metrics(out / "metrics.jsonl", 0)
        if note := start_over(cfg):  # an earlier run there: say that this one replaces it
            logger.warning(note)
    if run.bad.too_many():
        raise ValueError(run.bad.message())

    total_batch = cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    family = run.models.components.family.label
    logger.info(
        "training %s (%s%s) for %d steps on %d process(es); total batch %d, lr %.3g",
        cfg.effective_objective, "LoRA" if cfg.use_lora else "full", "" if family == "SD" else f", {family}",
        cfg.max_train_steps, accelerator.num_processes, total_batch, run.lr,
    )  # fmt: skip
    return at


# ----------------------------------------------------------------------------------------------
# the epoch's data, the step, logging


def start_epoch(run: Run, at: Position) -> bool:
    """Start epoch ``at.epoch`` (where a checkpoint left it, if it is the resumed one); True if resumed."""
    resumed = at.resumed
    note = run.data.start_epoch(at.epoch, resumed)
    if note:
        logger.info(note)
    streaming = run.data.streaming
    at.rows_done = resumed["rows_done"] if resumed and not streaming else 0
    reader_states = dict(resumed["readers"]) if resumed and streaming else {}
    at.reader_states = {int(r): s for r, s in reader_states.items()}
    at.last_reader = resumed["last_reader"][run.accelerator.process_index] if resumed and streaming else None
    at.resumed = None
    return resumed is not None


def take_position(run: Run, at: Position, batch: dict) -> None:
    """Count ``batch`` into the position a checkpoint saves."""
    batch["epoch"] = at.epoch
    if run.data.streaming:
        stream = batch.pop("stream")
        at.reader_states[stream["reader"]], at.last_reader = stream["state"], stream["reader"]
    else:
        at.rows_done += run.cfg.train_batch_size * run.accelerator.num_processes  # rows all processes read


def optimizer_step(run: Run, totals: dict) -> bool:
    """Step the optimizer and the schedule unless the step is non-finite (all processes agree: ``totals``
    are reduced); False when skipped."""
    accelerator, optimizer, lr_scheduler = run.accelerator, run.optimizer, run.lr_scheduler
    if run.owns_step:  # DeepSpeed already stepped, or skipped a non-finite step itself
        finite = not accelerator.optimizer_step_was_skipped
        if finite:
            lr_scheduler.step()
    else:
        finite = not totals["nonfinite"] and math.isfinite(totals["grad_norm"])
        if finite:
            optimizer.step()
            lr_scheduler.step()
        elif accelerator.scaler is not None:
            optimizer.step()  # fp16: the GradScaler sees the overflow, skips, lowers its scale
    optimizer.zero_grad(set_to_none=True)
    return finite


def log_step(run: Run, at: Position, totals: dict, finite: bool, new_bad: list[dict], bar) -> dict:
    """The step's row of metrics.jsonl and the trackers (TRL's names), with the held-out accuracy when due."""
    cfg, accelerator, step = run.cfg, run.accelerator, at.global_step
    grad_norm = totals["grad_norm"]
    row = {"step": step, **totals["metrics"], "grad_norm": grad_norm}
    row["lr"] = run.lr_scheduler.get_last_lr()[0]
    row["train/skipped_steps"] = run.nonfinite.skipped
    row["data/skipped_rows"] = run.bad.total_skipped
    if new_bad:
        row["data/bad_rows"] = new_bad[:10]
    if not finite:
        logger.warning(
            "step %d: non-finite loss or gradient (loss %s, grad norm %s): optimizer step skipped "
            "(%d in a row, %d in all)",
            step, row.get("loss"), grad_norm, run.nonfinite.consecutive, run.nonfinite.skipped,
        )  # fmt: skip
    validate = step % cfg.validation_steps == 0 or step == cfg.max_train_steps
    if run.heldout is not None and validate:
        row["eval/implicit_acc"] = heldout_accuracy(
            run.models, run.heldout, cfg.validation_timesteps, cfg.seed, accelerator=accelerator
        )
        # its 95% interval's upper end: the monitor warns when the accuracy is *significantly* below chance
        # (with 64 or 128 pairs a healthy run's accuracy dips under 0.5 by noise alone)
        pairs = run.heldout.latents_w.shape[0]
        row["eval/implicit_acc_ci_high"] = wilson_interval(row["eval/implicit_acc"] * pairs, pairs)[1]
    if run.win_rate is not None and validate:
        started = time.time()
        with encoders_on(run.models, accelerator.device):
            row.update(run.win_rate.measure(run.models, accelerator))
        logger.info(
            "step %d: win rate of samples vs the reference %.3f [%.3f, %.3f] (%s, %d prompts x %d seeds, %.1f s)",
            step, row["eval/win_rate"], row["eval/win_rate_ci_low"], row["eval/win_rate_ci_high"],
            cfg.validation_scorer, len(run.win_rate.prompts), len(run.win_rate.seeds), time.time() - started,
        )  # fmt: skip
    run.monitors.after_step(step, row)  # the gathered values: the same state on every process
    if accelerator.is_main_process:
        append_metrics(run.out / "metrics.jsonl", row)
        # no `nan` for a value that does not exist (yet); drawn at the bar's next refresh (tqdm redraws
        # at most every 0.1 s, and at the end), not on every step
        bar.set_postfix(progress_fields(row) | _monitor_postfix(row), refresh=False)
    # trackers take numbers only (not the lists of bad rows, not a missing value)
    accelerator.log({k: v for k, v in row.items() if isinstance(v, int | float)}, step=step)
    return row


def _monitor_postfix(row: dict) -> dict:
    # the progress bar's monitors: the winner's error vs the reference (relative trend), the gradient factor
    shown = {}
    if row.get("monitors/chosen_rel_trend") is not None:
        shown["w_err"] = f"{row['monitors/chosen_rel_trend']:+.1%}"
    if row.get("monitors/grad_factor") is not None:
        shown["gf"] = f"{row['monitors/grad_factor']:.2f}"
    return shown


# ----------------------------------------------------------------------------------------------
# checkpoints, stopping, the end


def save(run: Run, at: Position) -> Path:
    """A checkpoint of the step: weights, optimizer, RNG (accelerate), the data position, the guards."""
    step_state = {"global_step": at.global_step, "epoch": at.epoch}
    if run.data.streaming:
        step_state["position"] = stream_position(run.accelerator, run.data, at.reader_states, at.last_reader)
    else:
        step_state["position"] = {"rows_done": at.rows_done}
    step_state.update(
        nonfinite={"skipped": run.nonfinite.skipped, "consecutive": run.nonfinite.consecutive},
        bad_rows=run.bad.state_dict(),
        monitors=run.monitors.state_dict(),
    )
    return ckpt.save_checkpoint(
        run.accelerator, run.out, at.global_step, step_state, run.cfg.checkpoints_total_limit
    )


def stop_if_asked(run: Run, at: Position, too_many_nonfinite: bool, stop: bool, signum: int | None) -> None:
    """Save and raise :class:`RunStopped` after too many non-finite steps in a row, too many bad rows, or
    a monitor past its threshold for ``--stop_on_degradation`` checks, or a signal on any process (``stop``:
    all processes agree on it, it was reduced with the metrics)."""
    step = at.global_step
    if too_many_nonfinite:
        path = save(run, at)
        raise RunStopped(
            f"stopped at step {step} after {run.nonfinite.consecutive} optimizer steps in a row "
            f"with a NaN/Inf loss or gradient (weights untouched since step "
            f"{step - run.nonfinite.consecutive}; checkpoint {path}). Try: "
            f"{run.nonfinite.advice(run.cfg.mixed_precision)}; then resume with "
            "--resume_from_checkpoint latest.",
            exit_code=1, checkpoint=path,
        )  # fmt: skip
    if run.bad.too_many():
        path = save(run, at)
        raise RunStopped(f"{run.bad.message()} (checkpoint {path})", exit_code=1, checkpoint=path)
    degraded = run.monitors.stop_reason(step)
    if degraded:
        path = save(run, at)
        raise RunStopped(
            f"{degraded} Checkpoint {path}; change the settings, then resume with --resume_from_checkpoint latest.",
            exit_code=1, checkpoint=path,
        )  # fmt: skip
    if stop:
        path = save(run, at)
        signum = signum or 15  # another process got the signal
        raise RunStopped(
            f"preempted: stopped cleanly at step {step} and saved {path}; rerun the same "
            "command with --resume_from_checkpoint latest to continue exactly where it stopped.",
            exit_code=128 + signum, checkpoint=path,
        )  # fmt: skip


def checkpoint_and_sample(run: Run, at: Position) -> None:
    """The periodic checkpoint (and the last step's), and validation images when due."""
    cfg, accelerator, step = run.cfg, run.accelerator, at.global_step
    if step % cfg.checkpointing_steps == 0 or step == cfg.max_train_steps:
        save(run, at)
    sample_now = cfg.validation_prompts and step % cfg.validation_steps == 0
    if sample_now and not dist.params_sharded(accelerator):
        if accelerator.is_main_process:
            with encoders_on(run.models, accelerator.device):
                unet = accelerator.unwrap_model(run.models.unet)
                validation_images(cfg, run.models, unet, step, accelerator.device)
        accelerator.wait_for_everyone()


def end_epoch(run: Run, at: Position, batches: int, resumed_mid_epoch: bool) -> None:
    """Refuse an empty epoch (it would loop forever; a resumed one may just have had nothing left), stop on
    too many bad rows at the epoch's end, and go on to the next."""
    cfg = run.cfg
    if batches == 0 and not resumed_mid_epoch:
        raise ValueError(
            f"{cfg.dataset_name} gave no complete batch of --train_batch_size {cfg.train_batch_size} "
            "(too few usable rows after dropping ties and bad rows?)"
        )
    if run.bad.too_many(epoch_done=True):
        path = save(run, at)
        raise RunStopped(f"{run.bad.message()} (checkpoint {path})", exit_code=1, checkpoint=path)
    at.epoch += 1


def finish(run: Run, at: Position, last_row: dict, started: float) -> dict:
    """Save the trained model in diffusers format (and its samples), end the run, and sum it up."""
    accelerator, models, unet = run.accelerator, run.models, run.models.unet
    accelerator.wait_for_everyone()
    full_state = dist.final_state_dict(accelerator, unet, run.out / f"checkpoint-{at.global_step}")
    trained_unet = accelerator.unwrap_model(unet)
    # the optimizer state (2× the trained weights for AdamW) is not needed to save and sample
    run.optimizer.zero_grad(set_to_none=True)
    accelerator.free_memory()
    run.optimizer = run.lr_scheduler = None
    gc.collect()
    if accelerator.is_main_process:
        save_final_model(run.cfg, models, trained_unet, full_state)
        if run.cfg.validation_prompts:
            final_samples(run.cfg, models, accelerator.device)
        family = models.components.family.name  # README.md: base, method, data, steps, held-out accuracy
        write_model_card(run.cfg, at.global_step, family_name=family, num_processes=accelerator.num_processes)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    models.unet = trained_unet
    return {
        "global_step": at.global_step,
        "last_metrics": last_row,
        "train/skipped_steps": run.nonfinite.skipped,
        **run.bad.summary(),
        **run.monitors.summary(),
        "seconds": time.time() - started,
        "is_main_process": accelerator.is_main_process,
        "models": models,
    }
