"""The training loop: one explicit loop on accelerate, readable top to bottom.

Side paths (model set-up, the loss of one batch, validation, saving) are small named functions; the
tests call :func:`compute_batch_loss` directly.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from diffusion_dpo.diffusion import (
    denoising_errors,
    logratios_from_errors,
    pair_denoising_errors,
    sample_noise_and_timesteps,
    sft_losses,
)
from diffusion_dpo.losses import kto_loss, pairwise_loss_from_logratios, preference_metrics
from diffusion_dpo.models.loading import (
    SDComponents,
    encode_images,
)
from diffusion_dpo.training import checkpoint as ckpt
from diffusion_dpo.training.config import TrainConfig
from diffusion_dpo.training.models import Models, conditioning, sdxl_cond, setup_models
from diffusion_dpo.training.validation import encode_heldout_pairs, heldout_accuracy

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
CONFIG_FILE = "training_config.yaml"


def compute_batch_loss(models: Models, batch: dict, cfg: TrainConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and loss of one micro-batch. Returns the scalar loss and detached 0-dim metrics.

    Pair batches (dpo, sft): ``pixel_values_w``/``pixel_values_l`` ``[B, 3, H, W]``, ``captions``;
    SDXL adds ``original_sizes_w/_l`` and ``crop_top_lefts_w/_l`` ``[B, 2]``. KTO batches:
    ``pixel_values`` ``[B, 3, H, W]``, ``captions``, ``desirable`` ``[B]`` bool (and SDXL sizes).
    """
    comps = models.components
    device = next(models.unet.parameters()).device
    objective = cfg.effective_objective
    T = comps.noise_scheduler.config.num_train_timesteps
    hidden, pooled = conditioning(models, batch["captions"], device)

    if objective == "kto":
        latents = encode_images(comps.vae, batch["pixel_values"].to(device)).to(models.weight_dtype)
        noise, timesteps = sample_noise_and_timesteps(latents, T)
        cond = None
        if comps.is_sdxl:
            cond = sdxl_cond(
                pooled, batch["original_sizes"].to(device), batch["crop_top_lefts"].to(device),
                cfg.resolution, models.weight_dtype,
            )  # fmt: skip
        model_err, ref_err = denoising_errors(
            models.unet, models.ref_unet, comps.noise_scheduler, latents, hidden, noise, timesteps, cond
        )
        logratios = logratios_from_errors(model_err, ref_err)  # [B]
        # MATH.md §5: the reference point is the batch mean of the log-ratios, detached (kto_loss
        # detaches and clamps it); with β in this project's scale β_core = 2·β_DiffusionKTO.
        desirable = batch["desirable"].to(device)
        losses, rewards = kto_loss(
            logratios, torch.zeros_like(logratios), desirable, logratios.detach().mean(),
            beta=cfg.beta_dpo, desirable_weight=cfg.kto_desirable_weight,
            undesirable_weight=cfg.kto_undesirable_weight,
        )  # fmt: skip
        d, u = desirable.float(), (~desirable).float()
        metrics = {
            "loss": losses.mean().detach(),
            "kto/kl": logratios.detach().mean().clamp(min=0),
            "rewards/chosen": (rewards * d).sum() / d.sum().clamp(min=1),
            "rewards/rejected": (rewards * u).sum() / u.sum().clamp(min=1),
            "mse/model": model_err.detach().mean(),
            "mse/ref": ref_err.detach().mean(),
        }
        return losses.mean(), metrics

    if objective == "sft":
        # winners of pairs, or the images of a plain caption/image dataset
        suffix = "" if "pixel_values" in batch else "_w"
        latents = encode_images(comps.vae, batch[f"pixel_values{suffix}"].to(device)).to(models.weight_dtype)
        noise, timesteps = sample_noise_and_timesteps(latents, T)
        cond = None
        if comps.is_sdxl:
            cond = sdxl_cond(
                pooled, batch[f"original_sizes{suffix}"].to(device), batch[f"crop_top_lefts{suffix}"].to(device),
                cfg.resolution, models.weight_dtype,
            )  # fmt: skip
        losses = sft_losses(models.unet, comps.noise_scheduler, latents, hidden, noise, timesteps, cond)
        return losses.mean(), {"loss": losses.mean().detach(), "mse/model_chosen": losses.detach().mean()}

    px_w = batch["pixel_values_w"].to(device)
    px_l = batch["pixel_values_l"].to(device)
    bsz = px_w.shape[0]
    # One VAE pass for winners and losers: [2B, 3, H, W] -> [2B, 4, h, w]
    latents = encode_images(comps.vae, torch.cat([px_w, px_l])).to(models.weight_dtype)
    latents_w, latents_l = latents[:bsz], latents[bsz:]
    noise, timesteps = sample_noise_and_timesteps(latents_w, T)  # shared by both images of a pair

    cond = None
    if comps.is_sdxl:
        # per-image micro-conditioning: [2B, ...], winners first
        sizes = torch.cat([batch["original_sizes_w"], batch["original_sizes_l"]]).to(device)
        crops = torch.cat([batch["crop_top_lefts_w"], batch["crop_top_lefts_l"]]).to(device)
        cond = sdxl_cond(torch.cat([pooled, pooled]), sizes, crops, cfg.resolution, models.weight_dtype)
    model_err, ref_err = pair_denoising_errors(
        models.unet,
        models.ref_unet,
        comps.noise_scheduler,
        latents_w,
        latents_l,
        hidden,
        noise,
        timesteps,
        cond,
    )
    logratios = logratios_from_errors(model_err, ref_err)
    losses, chosen_rewards, rejected_rewards = pairwise_loss_from_logratios(
        logratios[:bsz], logratios[bsz:], beta=cfg.beta_dpo, loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
    )  # fmt: skip
    metrics = {"loss": losses.mean().detach(), **preference_metrics(chosen_rewards, rejected_rewards)}
    model_err, ref_err = model_err.detach(), ref_err.detach()
    metrics.update(
        {
            "mse/model_chosen": model_err[:bsz].mean(),
            "mse/model_rejected": model_err[bsz:].mean(),
            "mse/ref_chosen": ref_err[:bsz].mean(),
            "mse/ref_rejected": ref_err[bsz:].mean(),
        }
    )
    return losses.mean(), metrics


# ----------------------------------------------------------------------------------------------
# validation and saving


def _pipeline_class(components: SDComponents):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if components.is_sdxl else StableDiffusionPipeline


def _pipeline_parts(comps: SDComponents, unet: torch.nn.Module, dtype: torch.dtype | None = None) -> dict:
    """The in-memory modules to hand to ``Pipeline.from_pretrained`` instead of loading them again."""

    def cast(module):
        if dtype is not None and next(module.parameters()).dtype != dtype:
            module.to(dtype)
        return module

    parts = {"unet": unet, "vae": cast(comps.vae)}
    for i, (tokenizer, encoder) in enumerate(zip(comps.tokenizers, comps.text_encoders, strict=True)):
        suffix = "" if i == 0 else "_2"
        parts[f"tokenizer{suffix}"], parts[f"text_encoder{suffix}"] = tokenizer, cast(encoder)
    return parts


def save_final_model(cfg: TrainConfig, models: Models, unet: torch.nn.Module) -> Path:
    """Write the result in diffusers format to ``output_dir``.

    Full fine-tune: a whole pipeline folder (``from_pretrained(output_dir)``). LoRA:
    ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(output_dir)``). Both get
    ``training_config.yaml``, which names the base model.
    """
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pipeline_cls = _pipeline_class(models.components)
    if cfg.use_lora:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        pipeline_cls.save_lora_weights(out, unet_lora_layers=lora_state, safe_serialization=True)
    else:
        # the saved pipeline is fp32, whatever precision the frozen parts were run in
        parts = _pipeline_parts(models.components, unet.to(torch.float32), torch.float32)
        pipe = pipeline_cls.from_pretrained(cfg.pretrained_model_name_or_path, revision=cfg.revision, **parts)
        pipe.save_pretrained(out)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    logger.info("saved the %s result to %s", "LoRA" if cfg.use_lora else "full", out)
    return out


def load_trained_pipeline(output_dir: str | Path, torch_dtype: torch.dtype = torch.float32):
    """Load what :func:`save_final_model` wrote: a pipeline folder, or the base + LoRA weights."""
    from diffusers import DiffusionPipeline

    out = Path(output_dir)
    # diffusers >= 0.36 prefers `dtype=`; pass a dtype only when it is not the default fp32
    kw = {} if torch_dtype == torch.float32 else {"torch_dtype": torch_dtype}
    if (out / "model_index.json").is_file():
        return DiffusionPipeline.from_pretrained(out, **kw)
    if not (out / "pytorch_lora_weights.safetensors").is_file():
        raise FileNotFoundError(
            f"{out} holds neither a pipeline (model_index.json) nor pytorch_lora_weights.safetensors"
        )
    base = yaml.safe_load((out / CONFIG_FILE).read_text())["pretrained_model_name_or_path"]
    pipe = DiffusionPipeline.from_pretrained(base, **kw)
    pipe.load_lora_weights(out)
    return pipe


@torch.no_grad()
def sample_images(pipe, prompts, out_dir: Path, resolution: int, steps: int, seed: int) -> list[Path]:
    """Generate one image per prompt with a fixed seed and write PNGs to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    paths = []
    for i, prompt in enumerate(prompts):
        gen = torch.Generator(device="cpu").manual_seed(seed + i)
        image = pipe(
            prompt, num_inference_steps=steps, height=resolution, width=resolution, generator=gen
        ).images[0]
        path = out_dir / f"{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# the loop


def _append_metrics(path: Path, row: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    # After a resume, rows logged past the checkpoint by the interrupted run would be duplicated.
    if path.is_file():
        rows = [
            line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= last_step
        ]
        path.write_text("".join(r + "\n" for r in rows))


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns a summary (final step, last metrics, wall-clock seconds, the models)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler

    from diffusion_dpo.training.data_setup import build_train_dataloader, build_validation_dataloader

    started = time.time()
    out = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        # a seedable sampler makes the shuffling order a function of (seed, epoch): exact resume
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    models = setup_models(cfg, accelerator.device)
    train_loader = build_train_dataloader(cfg, models.components.is_sdxl)
    params = [p for p in models.unet.parameters() if p.requires_grad]
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    optimizer = torch.optim.AdamW(
        params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
    )  # fmt: skip
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer,
        # accelerate steps a prepared scheduler once per process per optimizer step
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )  # fmt: skip
    unet, optimizer, train_loader, lr_scheduler = accelerator.prepare(
        models.unet, optimizer, train_loader, lr_scheduler
    )
    models.unet = unet
    if accelerator.is_main_process and cfg.report_to != "none":
        accelerator.init_trackers("diffusion-dpo", config=cfg.to_dict())

    heldout = None
    if cfg.validation_dataset_name:
        heldout = encode_heldout_pairs(
            models, build_validation_dataloader(cfg, models.components.is_sdxl), cfg.num_validation_pairs,
            cfg.resolution,
        )  # fmt: skip

    global_step, epoch, batches_done = 0, 0, 0  # batches_done: micro-batches consumed in `epoch`
    resume_path = ckpt.resolve_resume_path(cfg.resume_from_checkpoint, out)
    if resume_path is not None:
        state = ckpt.load_checkpoint(accelerator, resume_path)
        global_step, epoch, batches_done = state["global_step"], state["epoch"], state["batches_done"]
        logger.info(
            "resumed from %s at step %d (epoch %d, batch %d)", resume_path, global_step, epoch, batches_done
        )
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

    total_batch = cfg.train_batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
    logger.info(
        "training %s (%s%s) for %d steps; total batch %d pairs, lr %.3g",
        cfg.effective_objective, "LoRA" if cfg.use_lora else "full", "" if not models.components.is_sdxl else ", SDXL",
        cfg.max_train_steps, total_batch, lr,
    )  # fmt: skip
    progress = tqdm(
        total=cfg.max_train_steps,
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    sums: dict[str, Tensor] = {}  # metrics summed over the micro-batches of one optimizer step
    n_micro = 0
    last_row: dict = {}
    while global_step < cfg.max_train_steps:
        train_loader.set_epoch(epoch)
        if hasattr(train_loader.dataset, "set_epoch"):  # per-row augmentation RNG is (seed, epoch, index)
            train_loader.dataset.set_epoch(epoch)
        loader = train_loader
        if batches_done:
            # skips at the sampler level: the skipped batches are never loaded or decoded
            loader = accelerator.skip_first_batches(train_loader, batches_done)
        for batch in loader:
            batches_done += 1
            if batch is None:  # every row of this batch was a skipped bad row
                continue
            with accelerator.accumulate(unet):
                loss, metrics = compute_batch_loss(models, batch, cfg)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            n_micro += 1
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0) + v
            if not accelerator.sync_gradients:
                continue

            global_step += 1
            progress.update(1)
            # average over the accumulated micro-batches, then over processes; one sync per step
            means = {k: accelerator.reduce(v / n_micro, reduction="mean") for k, v in sums.items()}
            sums, n_micro = {}, 0
            row = {"step": global_step, **{k: v.item() for k, v in means.items()}}
            row["grad_norm"] = float(grad_norm) if grad_norm is not None else None
            row["lr"] = lr_scheduler.get_last_lr()[0]
            if heldout is not None and (
                global_step % cfg.validation_steps == 0 or global_step == cfg.max_train_steps
            ):
                row["eval/implicit_acc"] = heldout_accuracy(
                    models, heldout, cfg.validation_timesteps, cfg.seed
                )
            if accelerator.is_main_process:
                _append_metrics(out / "metrics.jsonl", row)
                progress.set_postfix(
                    loss=f"{row['loss']:.4f}", acc=f"{row.get('rewards/accuracies', float('nan')):.2f}"
                )
            accelerator.log(row, step=global_step)
            last_row = row
            if not math.isfinite(row["loss"]):
                logger.warning("step %d: non-finite loss %s", global_step, row["loss"])

            if global_step % cfg.checkpointing_steps == 0 or global_step == cfg.max_train_steps:
                ckpt.save_checkpoint(
                    accelerator, out, global_step,
                    {"global_step": global_step, "epoch": epoch, "batches_done": batches_done},
                    cfg.checkpoints_total_limit,
                )  # fmt: skip
            if (
                cfg.validation_prompts
                and global_step % cfg.validation_steps == 0
                and accelerator.is_main_process
            ):
                log_validation_images(cfg, models, accelerator, global_step)
            if global_step >= cfg.max_train_steps:
                break
        else:
            if batches_done == 0:  # an empty epoch would loop forever
                raise ValueError(
                    f"{cfg.dataset_name} gave no complete batch of --train_batch_size {cfg.train_batch_size} "
                    "(too few usable rows after dropping ties?)"
                )
            epoch, batches_done = epoch + 1, 0
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final_model(cfg, models, accelerator.unwrap_model(unet))
        if cfg.validation_prompts:
            pipe = load_trained_pipeline(out)
            sample_images(
                pipe,
                cfg.validation_prompts,
                out / "samples",
                cfg.resolution,
                cfg.num_inference_steps,
                cfg.seed,
            )
    accelerator.end_training()
    return {
        "global_step": global_step,
        "last_metrics": last_row,
        "seconds": time.time() - started,
        "models": models,
    }


def log_validation_images(cfg: TrainConfig, models: Models, accelerator, step: int) -> None:
    """Sample the validation prompts with the current weights into ``output_dir/validation/step-N``."""
    comps = models.components
    parts = _pipeline_parts(comps, accelerator.unwrap_model(models.unet))
    pipe = _pipeline_class(comps).from_pretrained(
        cfg.pretrained_model_name_or_path, revision=cfg.revision, **parts
    )
    was_training = parts["unet"].training
    parts["unet"].eval()
    with torch.autocast(accelerator.device.type, enabled=cfg.mixed_precision != "no"):
        paths = sample_images(
            pipe, cfg.validation_prompts, Path(cfg.output_dir) / "validation" / f"step-{step}",
            cfg.resolution, cfg.num_inference_steps, cfg.seed,
        )  # fmt: skip
    parts["unet"].train(was_training)
    logger.info("step %d: wrote %d validation images to %s", step, len(paths), paths[0].parent)
