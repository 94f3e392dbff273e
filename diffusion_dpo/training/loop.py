"""The training loop: one explicit loop on accelerate, readable top to bottom.

Side paths are small named functions elsewhere: model set-up (:mod:`.models`), the rows of this
process (:mod:`.data_setup`), the loss of one micro-batch (:mod:`.step`), held-out accuracy
(:mod:`.validation`), checkpoints (:mod:`.checkpoint`), outputs (:mod:`.saving`) and the guards of
a long run (:mod:`.guards`).

Per optimizer step the loop does one collective: the metric sums, the rows read and skipped, a
non-finite flag and a stop flag of every process, summed together. So every process agrees, before
the optimizer steps, on whether the step is skipped (NaN/Inf) and whether the run stops (a signal
reached any of them).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_dpo.training import checkpoint as ckpt
from diffusion_dpo.training import distributed as dist
from diffusion_dpo.training.config import TrainConfig
from diffusion_dpo.training.guards import BadRows, NonFiniteSteps, PreemptionSignals, RunStopped
from diffusion_dpo.training.models import encoders_on, setup_models
from diffusion_dpo.training.monitors import RunMonitors
from diffusion_dpo.training.optim import make_optimizer
from diffusion_dpo.training.saving import final_samples, save_final_model, validation_images
from diffusion_dpo.training.step import compute_batch_loss
from diffusion_dpo.training.validation import encode_heldout_pairs, heldout_accuracy

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

__all__ = ["compute_batch_loss", "setup_models", "train"]


# ----------------------------------------------------------------------------------------------
# metrics.jsonl


def _append_metrics(path: Path, row: dict) -> None:
    # NaN/Inf are not JSON: a non-finite value is written as null (the log says which step it was)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with path.open("a") as f:
        f.write(json.dumps(clean) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    # After a resume, rows logged past the checkpoint by the interrupted run would be duplicated.
    if path.is_file():
        rows = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
        ]
        path.write_text("".join(r + "\n" for r in rows))


# ----------------------------------------------------------------------------------------------
# one optimizer step's worth of micro-batches


class StepWindow:
    """Sums what the micro-batches of one optimizer step report, then reduces it over processes once."""

    def __init__(self):
        self.sums: dict[str, Tensor] = {}
        self.valid = self.rows = self.skipped = 0
        self.nonfinite: Tensor | bool = False  # a tensor once added to: no host sync per micro-batch
        self.bad_rows: list[dict] = []

    def add(self, loss: Tensor, metrics: dict[str, Tensor], batch: dict) -> None:
        n = len(batch["captions"])
        valid = int(batch["valid"].sum()) if "valid" in batch else n
        for k, v in metrics.items():  # metrics are means over the valid rows: weight them by their count
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float() * valid
        self.valid += valid
        self.rows += n
        self.skipped += n - valid
        self.bad_rows.extend(batch.get("bad_rows", []))
        self.nonfinite = ~torch.isfinite(loss.detach()) | self.nonfinite

    def reduce(self, accelerator, stop: bool, grad_norm: Tensor | float | None = None) -> dict:
        """All processes' totals: ``metrics`` (means over valid rows; None where no row was valid),
        ``rows``, ``skipped``, ``nonfinite`` (any process), ``stop`` (any process), and this process's
        ``grad_norm`` (NaN if None), read in the same host sync."""
        keys = sorted(self.sums)
        device = accelerator.device
        packed = torch.stack(
            [torch.as_tensor(self.sums[k], device=device, dtype=torch.float32) for k in keys]
            + [torch.tensor(float(x), device=device) for x in (self.valid, self.rows, self.skipped)]
            + [
                torch.as_tensor(self.nonfinite, device=device).float(),
                torch.tensor(float(stop), device=device),
            ]
        )
        if accelerator.num_processes > 1:
            packed = accelerator.reduce(packed, reduction="sum")
        norm = torch.as_tensor(float("nan") if grad_norm is None else grad_norm, device=device)
        # the one host sync of the step: nothing before it in the step reads a value off the device
        values = torch.cat([packed, norm.detach().float().reshape(1)]).tolist()
        valid, rows, skipped, nonfinite, stop_any, norm_value = values[len(keys) :]
        metrics = {k: (values[i] / valid if valid else None) for i, k in enumerate(keys)}
        return {
            "metrics": metrics, "rows": int(rows), "skipped": int(skipped), "nonfinite": nonfinite > 0,
            "stop": stop_any > 0, "grad_norm": norm_value,
        }  # fmt: skip


def _monitor_postfix(row: dict) -> dict:
    # the progress bar's monitors: the winner's error vs the reference (relative trend), the gradient factor
    shown = {}
    if row.get("monitors/chosen_rel_trend") is not None:
        shown["w_err"] = f"{row['monitors/chosen_rel_trend']:+.1%}"
    if row.get("monitors/grad_factor") is not None:
        shown["gf"] = f"{row['monitors/grad_factor']:.2f}"
    return shown


def _gather_bad_rows(accelerator, local: list[dict]) -> list[dict]:
    if accelerator.num_processes == 1:
        return local
    from accelerate.utils import gather_object

    return gather_object(local)


def _stream_position(accelerator, data, reader_states: dict, last_reader) -> dict:
    """The stream position of all processes (a collective: every process calls it)."""
    mine = [{"readers": reader_states, "last_reader": last_reader}]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    readers = {}
    for part in mine:
        readers.update({str(r): s for r, s in part["readers"].items()})
    return {
        "readers": readers, "last_reader": [part["last_reader"] for part in mine],
        "num_processes": accelerator.num_processes, "num_workers": data.num_workers,
    }  # fmt: skip


def _synchronized(loader, accelerator, streaming: bool):
    """The loader's batches while every process has one. Map-style data gives every process the same
    number of batches by construction; streams run dry at different times, and a process that went on
    alone would wait forever in the next gradient all-reduce, so the epoch ends for all together."""
    if not streaming or accelerator.num_processes == 1:
        yield from loader
        return
    iterator = iter(loader)
    while True:
        batch = next(iterator, None)
        have = torch.tensor([float(batch is not None)], device=accelerator.device)
        if accelerator.reduce(have, reduction="sum").item() < accelerator.num_processes:
            return
        yield batch


# ----------------------------------------------------------------------------------------------
# the loop


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (final step, last metrics, counts, seconds, the models).

    Raises :class:`~diffusion_dpo.training.guards.RunStopped` after saving a checkpoint when the run
    stops early on purpose (a signal, non-finite steps in a row, too many bad rows).
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from diffusion_dpo.training.data_setup import (
        build_train_data,
        build_validation_dataloader,
        open_fitting_cache,
    )

    started = time.time()
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        kwargs_handlers=dist.process_group_kwargs(),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # accelerate logs four lines per checkpoint (weights, optimizer, scheduler, RNG); ours logs one
    logging.getLogger("accelerate.checkpointing").setLevel(logging.WARNING)
    dist.check_launch(accelerator, cfg)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
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
    unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    models.unet = unet
    models.ref_unet = dist.prepare_reference(accelerator, models.ref_unet)
    # after prepare: sharding engines replace the parameters, and clip the ones the model holds now
    params = list(unet.parameters())
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

    nonfinite = NonFiniteSteps(cfg.max_nonfinite_steps)
    bad = BadRows(cfg.max_bad_row_fraction)
    monitors = RunMonitors(cfg)  # docs/monitors.md: warnings, --auto_beta, --stop_on_degradation
    stats = data.stats
    if stats is not None and getattr(stats, "bad_labels", 0):
        bad.set_load_time(
            stats.seen, stats.bad_labels,
            [{"index": i, "reason": r} for i, r in getattr(stats, "bad_label_rows", [])],
        )  # fmt: skip

    global_step, epoch, position = 0, 0, None
    resume_path = ckpt.resolve_resume_path(cfg.resume_from_checkpoint, out)
    if resume_path is not None:
        state = ckpt.load_checkpoint(accelerator, resume_path)
        global_step, epoch = state["global_step"], state["epoch"]
        position = state.get("position")
        if position is None and "batches_done" in state:  # a checkpoint of an earlier version
            position = {"rows_done": state["batches_done"] * cfg.train_batch_size * accelerator.num_processes}
        if "nonfinite" in state:
            nonfinite.skipped, nonfinite.consecutive = (
                state["nonfinite"]["skipped"],
                state["nonfinite"]["consecutive"],
            )
        if "bad_rows" in state:
            bad.load_state_dict(state["bad_rows"])
        if "monitors" in state:
            monitors.load_state_dict(state["monitors"])
        logger.info("resumed from %s at step %d (epoch %d)", resume_path, global_step, epoch)
        if accelerator.is_main_process:
            _truncate_metrics(out / "metrics.jsonl", global_step)
    elif accelerator.is_main_process:
        # a fresh run: metrics of an earlier run in the same output_dir are not continued
        _truncate_metrics(out / "metrics.jsonl", 0)
        if ckpt.list_checkpoints(out):
            logger.warning(
                "%s already holds checkpoints of an earlier run; pass --resume_from_checkpoint latest to continue it",
                out,
            )
    if bad.too_many():
        raise ValueError(bad.message())

    total_batch = cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    logger.info(
        "training %s (%s%s) for %d steps on %d process(es); total batch %d, lr %.3g",
        cfg.effective_objective, "LoRA" if cfg.use_lora else "full",
        "" if models.components.family.label == "SD" else f", {models.components.family.label}",
        cfg.max_train_steps, accelerator.num_processes, total_batch, lr,
    )  # fmt: skip
    progress = tqdm(
        total=cfg.max_train_steps,
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    group = cfg.train_batch_size * accelerator.num_processes  # rows all processes read per micro-batch

    def save(step_state: dict) -> Path:
        if data.streaming:
            step_state["position"] = _stream_position(accelerator, data, reader_states, last_reader)
        else:
            step_state["position"] = {"rows_done": rows_done}
        step_state.update(
            nonfinite={"skipped": nonfinite.skipped, "consecutive": nonfinite.consecutive},
            bad_rows=bad.state_dict(),
            monitors=monitors.state_dict(),
        )
        return ckpt.save_checkpoint(accelerator, out, global_step, step_state, cfg.checkpoints_total_limit)

    window = StepWindow()
    last_row: dict = {}
    all_reduce_sum = (
        (lambda t: accelerator.reduce(t, reduction="sum")) if accelerator.num_processes > 1 else None
    )
    with PreemptionSignals() as signals:
        while global_step < cfg.max_train_steps:
            resumed_mid_epoch = position is not None
            note = data.start_epoch(epoch, position)
            if note:
                logger.info(note)
            rows_done = position["rows_done"] if position and not data.streaming else 0
            reader_states = dict(position["readers"]) if position and data.streaming else {}
            reader_states = {int(r): s for r, s in reader_states.items()}
            last_reader = (
                position["last_reader"][accelerator.process_index] if position and data.streaming else None
            )
            position = None
            batches = 0
            for batch in _synchronized(data.loader, accelerator, data.streaming):
                batches += 1
                batch["epoch"] = epoch
                if data.streaming:
                    stream = batch.pop("stream")
                    reader_states[stream["reader"]], last_reader = stream["state"], stream["reader"]
                else:
                    rows_done += group
                with accelerator.accumulate(unet):
                    loss, metrics = compute_batch_loss(
                        models, batch, cfg, all_reduce_sum=all_reduce_sum, beta=monitors.beta
                    )
                    accelerator.backward(loss)
                window.add(loss, metrics, batch)
                if not accelerator.sync_gradients:
                    continue

                # ---- one optimizer step: agree on it, then step (or skip) -------------------------
                # clip first, so that the norm is read in the same host sync as the metrics and flags
                norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                totals = window.reduce(accelerator, stop=signals.received is not None, grad_norm=norm)
                grad_norm = totals["grad_norm"]
                if owns_step:  # DeepSpeed already stepped, or skipped a non-finite step itself
                    finite = not accelerator.optimizer_step_was_skipped
                    if finite:
                        lr_scheduler.step()
                else:
                    finite = not totals["nonfinite"] and math.isfinite(grad_norm)
                    if finite:
                        optimizer.step()
                        lr_scheduler.step()
                    elif accelerator.scaler is not None:
                        optimizer.step()  # fp16: the GradScaler sees the overflow, skips, lowers its scale
                optimizer.zero_grad(set_to_none=True)
                global_step += 1
                progress.update(1)
                too_many_nonfinite = nonfinite.record(finite)
                new_bad = _gather_bad_rows(accelerator, window.bad_rows) if totals["skipped"] else []
                bad.add(totals["rows"], totals["skipped"], new_bad)
                window = StepWindow()

                row = {"step": global_step, **totals["metrics"], "grad_norm": grad_norm}
                row["lr"] = lr_scheduler.get_last_lr()[0]
                row["train/skipped_steps"] = nonfinite.skipped
                row["data/skipped_rows"] = bad.total_skipped
                if new_bad:
                    row["data/bad_rows"] = new_bad[:10]
                if not finite:
                    logger.warning(
                        "step %d: non-finite loss or gradient (loss %s, grad norm %s): optimizer step skipped "
                        "(%d in a row, %d in all)",
                        global_step, row.get("loss"), grad_norm, nonfinite.consecutive, nonfinite.skipped,
                    )  # fmt: skip
                if heldout is not None and (
                    global_step % cfg.validation_steps == 0 or global_step == cfg.max_train_steps
                ):
                    row["eval/implicit_acc"] = heldout_accuracy(
                        models, heldout, cfg.validation_timesteps, cfg.seed, accelerator=accelerator
                    )
                monitors.after_step(global_step, row)  # same gathered values, same state on every process
                if accelerator.is_main_process:
                    _append_metrics(out / "metrics.jsonl", row)
                    progress.set_postfix(
                        loss=f"{row['loss']:.4f}" if row.get("loss") is not None else "n/a",
                        acc=f"{row.get('rewards/accuracies') or float('nan'):.2f}",
                        **_monitor_postfix(row),
                    )
                # trackers take numbers only (not the lists of bad rows, not a missing value)
                accelerator.log(
                    {k: v for k, v in row.items() if isinstance(v, int | float)}, step=global_step
                )
                last_row = row

                # ---- stop early, checkpoint, sample --------------------------------------------
                if too_many_nonfinite:
                    path = save({"global_step": global_step, "epoch": epoch})
                    raise RunStopped(
                        f"stopped at step {global_step} after {nonfinite.consecutive} optimizer steps in a row "
                        f"with a NaN/Inf loss or gradient (weights untouched since step "
                        f"{global_step - nonfinite.consecutive}; checkpoint {path}). Try: "
                        f"{nonfinite.advice(cfg.mixed_precision)}; then resume with "
                        "--resume_from_checkpoint latest.",
                        exit_code=1, checkpoint=path,
                    )  # fmt: skip
                if bad.too_many():
                    path = save({"global_step": global_step, "epoch": epoch})
                    raise RunStopped(f"{bad.message()} (checkpoint {path})", exit_code=1, checkpoint=path)
                degraded = monitors.stop_reason(global_step)
                if degraded:
                    path = save({"global_step": global_step, "epoch": epoch})
                    raise RunStopped(
                        f"{degraded} Checkpoint {path}; change the settings, then resume with "
                        "--resume_from_checkpoint latest.",
                        exit_code=1, checkpoint=path,
                    )  # fmt: skip
                if totals["stop"]:
                    path = save({"global_step": global_step, "epoch": epoch})
                    signum = signals.received or 15  # another process got the signal
                    raise RunStopped(
                        f"preempted: stopped cleanly at step {global_step} and saved {path}; rerun the same "
                        "command with --resume_from_checkpoint latest to continue exactly where it stopped.",
                        exit_code=128 + signum, checkpoint=path,
                    )  # fmt: skip
                if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                    save({"global_step": global_step, "epoch": epoch})
                sample_now = cfg.validation_prompts and global_step % cfg.validation_steps == 0
                if sample_now and not dist.params_sharded(accelerator):
                    if accelerator.is_main_process:
                        with encoders_on(models, accelerator.device):
                            validation_images(
                                cfg, models, accelerator.unwrap_model(unet), global_step, accelerator.device
                            )
                    accelerator.wait_for_everyone()
                if global_step >= cfg.max_train_steps:
                    break
            else:
                # an empty epoch would loop forever; a resumed one may just have had nothing left
                if batches == 0 and not resumed_mid_epoch:
                    raise ValueError(
                        f"{cfg.dataset_name} gave no complete batch of --train_batch_size {cfg.train_batch_size} "
                        "(too few usable rows after dropping ties and bad rows?)"
                    )
                if bad.too_many(epoch_done=True):
                    path = save({"global_step": global_step, "epoch": epoch})
                    raise RunStopped(f"{bad.message()} (checkpoint {path})", exit_code=1, checkpoint=path)
                epoch += 1
    progress.close()

    accelerator.wait_for_everyone()
    full_state = dist.final_state_dict(accelerator, unet, out / f"checkpoint-{global_step}")
    trained_unet = accelerator.unwrap_model(unet)
    # the optimizer state (2× the trained weights for AdamW) is not needed to save and sample
    optimizer.zero_grad(set_to_none=True)
    accelerator.free_memory()
    del optimizer, lr_scheduler
    gc.collect()
    if accelerator.is_main_process:
        save_final_model(cfg, models, trained_unet, full_state)
        if cfg.validation_prompts:
            final_samples(cfg, models, accelerator.device)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    models.unet = trained_unet
    return {
        "global_step": global_step,
        "last_metrics": last_row,
        "train/skipped_steps": nonfinite.skipped,
        **bad.summary(),
        **monitors.summary(),
        "seconds": time.time() - started,
        "is_main_process": accelerator.is_main_process,
        "models": models,
    }
