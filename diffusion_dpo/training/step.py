"""The forward pass and loss of one micro-batch: Diffusion-DPO (any pairwise loss), SFT, Diffusion-KTO,
MaPO.

:func:`compute_batch_loss` is what the loop calls and what the tests call. Two rules make it right
with many processes:

- every random draw (timestep, noise, VAE posterior sample) belongs to a row, keyed by
  ``(seed, epoch, row index)`` (:mod:`diffusion_dpo.diffusion.draws`);
- the loss is the sum of the valid rows' losses divided by the nominal batch size B, so a row
  skipped as bad (a placeholder, ``valid`` False) contributes nothing, shapes stay fixed, and N
  processes averaging their gradients compute exactly what one process with N·B rows computes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusion_dpo.diffusion import (
    denoising_errors,
    draw_for_rows,
    logratios_from_errors,
    sft_losses,
)
from diffusion_dpo.diffusion.objective import pair_denoising_outputs, pair_model_errors
from diffusion_dpo.losses import (
    kto_loss,
    loser_gradient_scale,
    mapo_loss,
    masked_mean,
    pairwise_logratio_gradients,
    pairwise_loss_from_logratios,
    preference_metrics,
    safeguard_terms,
    scale_gradient,
)
from diffusion_dpo.models.loading import encode_images, latent_shape, posterior_latents
from diffusion_dpo.training.config import TrainConfig
from diffusion_dpo.training.models import Models, conditioning
from diffusion_dpo.training.monitors import pair_monitor_metrics
from diffusion_dpo.transfer import to_device

Tensor = torch.Tensor


def _summed_over_valid(losses: Tensor, valid: Tensor) -> Tensor:
    # divided by the nominal batch size, not the valid count: see the module docstring
    return torch.where(valid, losses, 0.0).sum() / losses.shape[0]


def label_metrics(label_p: Tensor, valid: Tensor) -> dict[str, Tensor]:
    """The label distribution of a batch's valid pairs (whatever ``--label_mode`` trains with):
    ``labels/p_mean`` (mean P(winner preferred)), ``labels/tie_share`` (p = 0.5), ``labels/split_share``
    (0.5 < p < 1: split votes)."""
    p = label_p.float()
    return {
        "labels/p_mean": masked_mean(p, valid),
        "labels/tie_share": masked_mean((p == 0.5).float(), valid),
        "labels/split_share": masked_mean(((p > 0.5) & (p < 1.0)).float(), valid),
    }


def _latent_shape(vae, batch: dict, suffix: str) -> tuple[int, int, int]:
    """``(C, h, w)`` of one image's latents in ``batch``: cached, or what the VAE makes of its pixels."""
    if f"latents_mean{suffix}" in batch:
        return tuple(batch[f"latents_mean{suffix}"].shape[1:])
    return latent_shape(vae, *batch[f"pixel_values{suffix}"].shape[-2:])


def _unet_inputs(
    models: Models, batch: dict, suffixes: list[str], posterior_noise: Tensor, device
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(latents [K·B, C, h, w] winners first, hidden [B, L, D], SDXL pooled [B, D] or None)`` of a batch.

    A batch of pixels and captions goes through the VAE (one pass for winners and losers) and the text
    encoder(s); a batch read from a latent cache (``--latents_cache``, :mod:`diffusion_dpo.data.latent_cache`)
    carries the VAE posteriors' mean and std and the text embeddings, and runs neither. Both make the
    posterior sample with the same ``posterior_noise`` ``[K·B, C, h, w]`` through ``posterior_latents``.
    """
    if "prompt_embeds" in batch:  # cached
        mean = torch.cat([to_device(batch[f"latents_mean{s}"], device) for s in suffixes])
        std = torch.cat([to_device(batch[f"latents_std{s}"], device) for s in suffixes])
        vae_config = models.components.vae.config
        latents = posterior_latents(
            mean, std, posterior_noise, vae_config.scaling_factor, getattr(vae_config, "shift_factor", None)
        )
        hidden = to_device(batch["prompt_embeds"], device, models.weight_dtype)
        pooled = to_device(batch["pooled_prompt_embeds"], device) if "pooled_prompt_embeds" in batch else None
    else:
        pixels = torch.cat([to_device(batch[f"pixel_values{s}"], device) for s in suffixes])  # [K·B, 3, H, W]
        latents = encode_images(models.components.vae, pixels, posterior_noise)
        hidden, pooled = conditioning(models, batch["captions"], device)
    return latents.to(models.weight_dtype), hidden, pooled


def compute_batch_loss(
    models: Models,
    batch: dict,
    cfg: TrainConfig,
    *,
    all_reduce_sum: Callable[[Tensor], Tensor] | None = None,
    beta: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and loss of one micro-batch. Returns the scalar loss to backpropagate and detached
    0-dim metrics averaged over the batch's valid rows.

    Pair batches (dpo, mapo, sft): ``pixel_values_w``/``pixel_values_l`` ``[B, 3, H, W]``, ``captions``,
    ``indices`` ``[B]``; SDXL adds ``original_sizes_w/_l`` and ``crop_top_lefts_w/_l`` ``[B, 2]``. From a
    latent cache, ``latents_mean_w/_l``, ``latents_std_w/_l`` ``[B, C, h, w]`` and ``prompt_embeds``
    ``[B, L, D]`` (SDXL: ``pooled_prompt_embeds`` ``[B, D]``) replace pixels and captions' encodings.
    KTO batches: ``pixel_values`` ``[B, 3, H, W]``, ``captions``, ``indices``, ``desirable`` ``[B]``
    bool (and SDXL sizes). Optional: ``valid`` ``[B]`` bool (False: a placeholder for a skipped bad
    row) and ``epoch`` (keys the rows' draws with their indices; 0 if absent).

    ``all_reduce_sum``: sums a tensor over processes (KTO's reference point is the mean over the
    whole global batch, docs/objectives.md#kto; the winner safeguard's λ is one per global micro-batch);
    None in a single process. ``beta``: the β of this step under ``--auto_beta`` (default ``cfg.beta_dpo``).
    """
    comps, process = models.components, models.process
    device = next(models.unet.parameters()).device
    objective = cfg.effective_objective
    T = process.num_train_timesteps
    n = len(batch["captions"])
    valid = (
        to_device(batch["valid"], device)
        if "valid" in batch
        else torch.ones(n, dtype=torch.bool, device=device)
    )

    if objective in ("dpo", "mapo"):
        suffixes = ["_w", "_l"]
    else:
        # KTO images; SFT: the winners of pairs, or the images of a plain caption/image dataset
        suffixes = ["" if "pixel_values" in batch else "_w"]
    draws = draw_for_rows(
        cfg.seed, batch.get("epoch", 0), batch["indices"], _latent_shape(comps.vae, batch, suffixes[0]), T,
        images_per_row=len(suffixes), sample_timestep=process.sample_timestep,
    ).to(device, models.weight_dtype)  # fmt: skip
    latents, hidden, pooled = _unet_inputs(models, batch, suffixes, draws.posterior.flatten(0, 1), device)
    # SDXL's pooled text and size/crop ids, SD3's pooled projections: [K·B, ...], winners first
    cond = comps.family.added_conditioning(
        pooled, batch, suffixes, cfg.resolution, models.weight_dtype, device
    )

    if objective == "sft":
        losses = sft_losses(models.unet, process, latents, hidden, draws.noise, draws.timesteps, cond)
        mean = masked_mean(losses.detach(), valid)
        return _summed_over_valid(losses, valid), {"loss": mean, "mse/model_chosen": mean}

    if objective == "kto":
        model_err, ref_err = denoising_errors(
            models.unet, models.ref_unet, process, latents, hidden, draws.noise,
            draws.timesteps, cond,
        )  # fmt: skip
        logratios = logratios_from_errors(model_err, ref_err)  # [B]
        # docs/objectives.md#diffusion-kto: the reference point is the mean log-ratio of the global batch, detached (kto_loss
        # clamps it at 0); with β in this project's scale β_core = 2·β_DiffusionKTO.
        total = torch.stack([torch.where(valid, logratios.detach(), 0.0).sum(), valid.sum().float()])
        if all_reduce_sum is not None:
            total = all_reduce_sum(total)
        reference_point = total[0] / total[1].clamp(min=1)
        desirable = to_device(batch["desirable"], device)
        losses, rewards = kto_loss(
            logratios, torch.zeros_like(logratios), desirable, reference_point,
            beta=cfg.beta_dpo, desirable_weight=cfg.kto_desirable_weight,
            undesirable_weight=cfg.kto_undesirable_weight,
        )  # fmt: skip
        metrics = {
            "loss": masked_mean(losses.detach(), valid),
            "kto/kl": reference_point.clamp(min=0),
            "rewards/chosen": masked_mean(rewards, valid & desirable),
            "rewards/rejected": masked_mean(rewards, valid & ~desirable),
            "mse/model": masked_mean(model_err.detach(), valid),
            "mse/ref": masked_mean(ref_err.detach(), valid),
        }
        return _summed_over_valid(losses, valid), metrics

    latents_w, latents_l = latents[:n], latents[n:]
    if objective == "mapo":
        # docs/objectives.md#mapo: no reference forward at all (a LoRA run does not run its adapters-disabled base)
        model_err = pair_model_errors(
            models.unet, process, latents_w, latents_l, hidden, draws.noise, draws.timesteps,
            cond,
        )  # fmt: skip
        losses, chosen_scores, rejected_scores = mapo_loss(
            model_err[:n], model_err[n:], beta_mapo=cfg.beta_mapo, snr_value=cfg.snr_value,
            num_train_timesteps=T,
        )  # fmt: skip
        model_err = model_err.detach()
        # rewards/* are the scores s(L): rewards/margins is the mean log-odds, rewards/accuracies the
        # share of pairs with L_w < L_l (s is strictly decreasing)
        metrics = {
            "loss": masked_mean(losses.detach(), valid),
            **preference_metrics(chosen_scores, rejected_scores, mask=valid),
            "mapo/margin_loss": masked_mean(losses.detach() - model_err[:n], valid),
            "mse/model_chosen": masked_mean(model_err[:n], valid),
            "mse/model_rejected": masked_mean(model_err[n:], valid),
        }
        return _summed_over_valid(losses, valid), metrics

    out = pair_denoising_outputs(
        models.unet, models.ref_unet, process, latents_w, latents_l, hidden, draws.noise,
        draws.timesteps, cond,
    )  # fmt: skip
    model_err, ref_err = out.model_errors, out.ref_errors
    beta = cfg.beta_dpo if beta is None else beta
    # P(winner preferred) of each pair [B]: 1 unless the data carries vote shares (docs/data.md#soft-labels)
    label_p = to_device(batch["label_p"], device) if "label_p" in batch else torch.ones(n, device=device)
    loss_args = dict(
        beta=beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
        label_p=label_p if cfg.label_mode == "soft" else None,
    )  # fmt: skip
    extra = {}
    if cfg.winner_safeguard:
        scale = _loser_scale(out, valid, n, loss_args, cfg.winner_safeguard_mu, all_reduce_sum)
        model_err = torch.cat([model_err[:n], scale_gradient(model_err[n:], scale)])  # same values
        extra["safeguard/loser_scale"] = scale
    logratios = logratios_from_errors(model_err, ref_err)  # [2B], winners first
    losses, chosen_rewards, rejected_rewards = pairwise_loss_from_logratios(
        logratios[:n], logratios[n:], **loss_args
    )
    metrics = {
        "loss": masked_mean(losses.detach(), valid),
        **preference_metrics(chosen_rewards, rejected_rewards, mask=valid),
        **label_metrics(label_p, valid),
        **pair_monitor_metrics(logratios[:n], logratios[n:], beta, out.model_sq, out.ref_sq, valid),
        **extra,
    }
    model_err, ref_err = model_err.detach(), ref_err.detach()
    metrics.update(
        {
            "mse/model_chosen": masked_mean(model_err[:n], valid),
            "mse/model_rejected": masked_mean(model_err[n:], valid),
            "mse/ref_chosen": masked_mean(ref_err[:n], valid),
            "mse/ref_rejected": masked_mean(ref_err[n:], valid),
        }
    )
    return _summed_over_valid(losses, valid), metrics


def _loser_scale(out, valid: Tensor, n: int, loss_args: dict, mu: float, all_reduce_sum) -> Tensor:
    """Diffusion-SDPO's λ for this micro-batch (:mod:`diffusion_dpo.losses.safeguard`), from the
    output-space terms summed over every process's pairs (one λ for the global micro-batch)."""
    logratios = logratios_from_errors(out.model_errors.detach(), out.ref_errors)
    grad_c, grad_r = pairwise_logratio_gradients(logratios[:n], logratios[n:], valid.float(), **loss_args)
    # the convention logratio = −0.5·(eθ − eref): ∂L/∂e = −0.5·∂L/∂logratio
    terms = safeguard_terms(-0.5 * grad_c, -0.5 * grad_r, out.winner_sq, out.winner_loser_dot)
    if all_reduce_sum is not None:
        terms = all_reduce_sum(terms)
    return loser_gradient_scale(terms, mu)
