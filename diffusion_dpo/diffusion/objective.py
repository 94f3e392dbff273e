"""Diffusion-DPO / SFT / Diffusion-KTO objectives on denoising errors (docs/objectives.md); MaPO's
reference-free errors (§9).

The project convention lives here and nowhere else: for an image ``x`` noised to ``x_t`` with noise
``ε`` at timestep ``t``,

    logratio(x) = −0.5 · (eθ − eref),   eθ = mean over C×H×W of (fθ(x_t, t) − target)²

where ``target`` is ``ε`` for epsilon-prediction, the velocity for v-prediction models and ``ε − x0``
for flow-matching models (SD3), and ``eref`` is the same error under the frozen reference. How a
family noises, what it predicts and how its denoiser is called is its process's business
(:mod:`diffusion_dpo.diffusion.processes`): every ``noise_scheduler`` argument below takes a process,
or a bare DDPM-style diffusers scheduler for a UNet. With it, the shared core's sigmoid loss at
``β = beta_dpo`` is exactly the loss of the Diffusion-DPO paper's ``train.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from diffusion_dpo.diffusion.adapters import adapters_disabled
from diffusion_dpo.diffusion.draws import heldout_noise
from diffusion_dpo.diffusion.processes import as_process

Tensor = torch.Tensor


def denoising_target(noise_scheduler, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
    """What the denoiser is trained to predict: ``ε`` (epsilon), the velocity (v-prediction), or the flow
    velocity ``ε − x0`` (flow matching). ``noise_scheduler``: a process or a DDPM-style scheduler."""
    return as_process(noise_scheduler).target(latents, noise, timesteps)


def per_sample_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``[N, C, H, W]`` × 2 → ``[N]``: mean squared error per sample, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


def logratios_from_errors(model_errors: Tensor, ref_errors: Tensor) -> Tensor:
    """The diffusion log-ratio surrogate ``−0.5·(eθ − eref)`` (``[N]`` → ``[N]``)."""
    return -0.5 * (model_errors - ref_errors)


def _reference_prediction(process, unet, ref_unet, noisy, timesteps, hidden, cond) -> Tensor:
    with torch.no_grad():
        if ref_unet is None:
            # adapters are switched on the inner module, the call goes through the wrapper: a sharded
            # engine (FSDP) can only run the module through it
            with adapters_disabled(unet):
                return process.predict(unet, noisy, timesteps, hidden, cond)
        # The frozen reference may be kept in the low-precision weight dtype to save memory.
        dtype = next(ref_unet.parameters()).dtype
        ref_cond = None if cond is None else {k: v.to(dtype) for k, v in cond.items()}
        return process.predict(ref_unet, noisy.to(dtype), timesteps, hidden.to(dtype), ref_cond)


def _weighted(errors: Tensor, process, timesteps: Tensor) -> Tensor:
    # a flow process may weight the error by σ (off by default: docs/sd3.md#sigma-weighting)
    weights = process.error_weights(timesteps)
    return errors if weights is None else errors * weights.to(errors.device, errors.dtype)


def denoising_errors(
    unet: torch.nn.Module,
    ref_unet: torch.nn.Module | None,
    noise_scheduler,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Model and reference denoising errors per image (used as is by Diffusion-KTO).

    ``latents``/``noise`` ``[N, C, h, w]``, ``encoder_hidden_states`` ``[N, L, D]``, ``timesteps``
    ``[N]``. Returns ``(model_errors, ref_errors)``, each ``[N]`` float32; the reference is run under
    ``no_grad`` on identical inputs (``ref_unet=None``: the same UNet with LoRA adapters disabled).
    """
    process, pred, ref_pred, target = _predictions(
        unet, ref_unet, noise_scheduler, latents, encoder_hidden_states, noise, timesteps, added_cond_kwargs
    )
    return (
        _weighted(per_sample_mse(pred, target), process, timesteps),
        _weighted(per_sample_mse(ref_pred, target), process, timesteps),
    )


def _predictions(unet, ref_unet, noise_scheduler, latents, hidden, noise, timesteps, cond):
    process = as_process(noise_scheduler)
    noisy = process.add_noise(latents, noise, timesteps)
    target = process.target(latents, noise, timesteps)
    pred = process.predict(unet, noisy, timesteps, hidden, cond)
    ref_pred = _reference_prediction(process, unet, ref_unet, noisy, timesteps, hidden, cond)
    return process, pred, ref_pred, target


class PairOutputs(NamedTuple):
    """What one forward of winners stacked on losers yields (:func:`pair_denoising_outputs`). Only
    ``model_errors`` carries a gradient; the rest are detached float32 statistics of the same forward,
    read by the training monitors and the winner safeguard (docs/monitors.md)."""

    model_errors: Tensor  # [2B] eθ, winners first
    ref_errors: Tensor  # [2B] eref
    model_sq: Tensor  # [2B] mean over C×H×W of the policy's prediction², for the norm ratio
    ref_sq: Tensor  # [2B] the same for the reference's prediction
    winner_sq: (
        Tensor  # [B] mean of w²·r_w², r = prediction − target, w the error weight (1 unless σ-weighted)
    )
    winner_loser_dot: Tensor  # [B] mean of w²·r_w·r_l: how the loser's residual aligns with the winner's


def pair_denoising_outputs(
    unet: torch.nn.Module,
    ref_unet: torch.nn.Module | None,
    noise_scheduler,
    latents_w: Tensor,
    latents_l: Tensor,
    encoder_hidden_states: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> PairOutputs:
    """:func:`pair_denoising_errors` plus detached statistics of the same two forwards (no extra pass):
    the mean squared predictions of policy and reference, and per pair the winner's squared residual
    and its inner product with the loser's, both per element (the output-space terms of
    Diffusion-SDPO's safeguard, :func:`diffusion_dpo.losses.loser_gradient_scale`). The errors equal
    :func:`pair_denoising_errors`' bit for bit."""
    batch = latents_w.shape[0]
    latents, hidden, noise2, t2, cond = _stack_pair(
        latents_w, latents_l, encoder_hidden_states, noise, timesteps, added_cond_kwargs
    )
    process, pred, ref_pred, target = _predictions(
        unet, ref_unet, noise_scheduler, latents, hidden, noise2, t2, cond
    )
    with torch.no_grad():
        residual = (pred.detach().float() - target.float()).flatten(1)  # [2B, D]
        weights = process.error_weights(timesteps)
        w2 = 1.0 if weights is None else weights.to(residual.device, residual.dtype).pow(2)
        r_w, r_l = residual[:batch], residual[batch:]
        stats = dict(
            model_sq=pred.detach().float().pow(2).flatten(1).mean(dim=1),
            ref_sq=ref_pred.detach().float().pow(2).flatten(1).mean(dim=1),
            winner_sq=w2 * r_w.pow(2).mean(dim=1),
            winner_loser_dot=w2 * (r_w * r_l).mean(dim=1),
        )
    return PairOutputs(
        _weighted(per_sample_mse(pred, target), process, t2),
        _weighted(per_sample_mse(ref_pred, target), process, t2),
        **stats,
    )


def _repeat_for_pair(x: Tensor, batch: int) -> Tensor:
    # Conditioning may be given once per pair [B, ...] (same caption) or per image [2B, ...].
    if x.shape[0] == batch:
        return torch.cat([x, x], dim=0)
    if x.shape[0] == 2 * batch:
        return x
    raise ValueError(f"conditioning has batch size {x.shape[0]}; expected {batch} (per pair) or {2 * batch}")


def pair_denoising_errors(
    unet: torch.nn.Module,
    ref_unet: torch.nn.Module | None,
    noise_scheduler,
    latents_w: Tensor,
    latents_l: Tensor,
    encoder_hidden_states: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Model and reference denoising errors for winners stacked on losers.

    Winner and loser of a pair share the noise and the timestep (the paper's ``train.py``).

    Args:
        unet: the trained UNet (may be wrapped by accelerate).
        ref_unet: the frozen reference UNet, or ``None`` for "``unet`` with its LoRA adapters disabled".
        noise_scheduler: a diffusers scheduler with ``add_noise`` (and ``get_velocity`` for v-prediction).
        latents_w, latents_l: ``[B, C, h, w]`` latents of the preferred and the rejected images.
        encoder_hidden_states: ``[B, L, D]`` (one caption per pair) or ``[2B, L, D]``.
        noise: ``[B, C, h, w]``, shared by both images of a pair.
        timesteps: ``[B]`` long, shared by both images of a pair.
        added_cond_kwargs: SDXL's ``{"text_embeds": [B or 2B, D], "time_ids": [B or 2B, 6]}``.

    Returns:
        ``(model_errors, ref_errors)``, each ``[2B]`` float32: winners first, then losers; the
        reference errors carry no gradient.
    """
    stacked = _stack_pair(latents_w, latents_l, encoder_hidden_states, noise, timesteps, added_cond_kwargs)
    return denoising_errors(unet, ref_unet, noise_scheduler, *stacked)


def pair_model_errors(
    unet: torch.nn.Module,
    noise_scheduler,
    latents_w: Tensor,
    latents_l: Tensor,
    encoder_hidden_states: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> Tensor:
    """The trained model's denoising errors for winners stacked on losers, with no reference run
    (MaPO). Same arguments as :func:`pair_denoising_errors` less ``ref_unet``; the same stacking, so
    the errors equal that function's ``model_errors`` bit for bit. Returns ``[2B]`` float32, winners
    first."""
    stacked = _stack_pair(latents_w, latents_l, encoder_hidden_states, noise, timesteps, added_cond_kwargs)
    return sft_losses(unet, noise_scheduler, *stacked)


def _stack_pair(latents_w, latents_l, encoder_hidden_states, noise, timesteps, added_cond_kwargs):
    # winners stacked on losers; both images of a pair get the same noise and timestep
    if latents_w.shape != latents_l.shape or noise.shape != latents_w.shape:
        raise ValueError(
            f"latents_w {tuple(latents_w.shape)}, latents_l {tuple(latents_l.shape)} and noise "
            f"{tuple(noise.shape)} must have the same shape"
        )
    batch = latents_w.shape[0]
    latents = torch.cat([latents_w, latents_l], dim=0)  # [2B, C, h, w]
    noise2 = torch.cat([noise, noise], dim=0)
    t2 = torch.cat([timesteps, timesteps], dim=0)  # [2B]
    hidden = _repeat_for_pair(encoder_hidden_states, batch)
    cond = None
    if added_cond_kwargs is not None:
        cond = {k: _repeat_for_pair(v, batch) for k, v in added_cond_kwargs.items()}
    return latents, hidden, noise2, t2, cond


def pair_logratios(
    unet: torch.nn.Module,
    ref_unet: torch.nn.Module | None,
    noise_scheduler,
    latents_w: Tensor,
    latents_l: Tensor,
    encoder_hidden_states: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Diffusion log-ratio surrogates of the chosen and the rejected image of each pair.

    Same arguments as :func:`pair_denoising_errors`. Returns ``(chosen_logratios,
    rejected_logratios)``, each ``[B]`` float32, with ``logratio = −0.5·(eθ − eref)``; feed them to
    :func:`diffusion_dpo.losses.pairwise_loss_from_logratios` with ``beta = beta_dpo``.
    """
    model_errors, ref_errors = pair_denoising_errors(
        unet,
        ref_unet,
        noise_scheduler,
        latents_w,
        latents_l,
        encoder_hidden_states,
        noise,
        timesteps,
        added_cond_kwargs,
    )
    logratios = logratios_from_errors(model_errors, ref_errors)
    batch = latents_w.shape[0]
    return logratios[:batch], logratios[batch:]


@torch.no_grad()
def implicit_reward_scores(
    unet: torch.nn.Module,
    ref_unet: torch.nn.Module | None,
    noise_scheduler,
    latents_w: Tensor,
    latents_l: Tensor,
    encoder_hidden_states: Tensor,
    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900),
    seed: int = 0,
    added_cond_kwargs: dict[str, Tensor] | None = None,
    pair_indices: list[int] | None = None,
) -> Tensor:
    """Per pair, the share of the fixed ``timesteps`` at which the implicit reward prefers the winner.

    A pair counts as right at a timestep when its chosen log-ratio exceeds the rejected one (a tie
    counts 0.5). The noise of pair ``i`` at timestep ``t`` is drawn from ``(seed, pair_indices[i], t)``
    (:func:`~diffusion_dpo.diffusion.draws.heldout_noise`), so every model, checkpoint and process
    scores a pair on the same draws, however the pairs are batched or split. Returns ``[B]`` float32.
    """
    batch = latents_w.shape[0]
    indices = list(range(batch)) if pair_indices is None else list(pair_indices)
    if len(indices) != batch:
        raise ValueError(f"pair_indices has {len(indices)} entries for {batch} pairs")
    scores = torch.zeros(batch, device=latents_w.device)
    for t in timesteps:
        noise = heldout_noise(seed, indices, int(t), tuple(latents_w.shape[1:]))
        noise = noise.to(latents_w.device, latents_w.dtype)
        ts = torch.full((batch,), int(t), device=latents_w.device, dtype=torch.long)
        rc, rr = pair_logratios(
            unet, ref_unet, noise_scheduler, latents_w, latents_l, encoder_hidden_states, noise, ts,
            added_cond_kwargs,
        )  # fmt: skip
        scores += (rc > rr).float() + 0.5 * (rc == rr).float()
    return scores / len(timesteps)


@torch.no_grad()
def implicit_reward_accuracy(
    unet: torch.nn.Module,
    ref_unet: torch.nn.Module | None,
    noise_scheduler,
    latents_w: Tensor,
    latents_l: Tensor,
    encoder_hidden_states: Tensor,
    timesteps: tuple[int, ...] = (100, 300, 500, 700, 900),
    seed: int = 0,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Share of pairs whose implicit reward prefers the human winner (the paper's Table 2 metric),
    averaged over pairs and the fixed ``timesteps``: the mean of :func:`implicit_reward_scores`.
    Returns a 0-dim tensor."""
    return implicit_reward_scores(
        unet, ref_unet, noise_scheduler, latents_w, latents_l, encoder_hidden_states, timesteps, seed,
        added_cond_kwargs,
    ).mean()  # fmt: skip


def sft_losses(
    unet: torch.nn.Module,
    noise_scheduler,
    latents: Tensor,
    encoder_hidden_states: Tensor,
    noise: Tensor,
    timesteps: Tensor,
    added_cond_kwargs: dict[str, Tensor] | None = None,
) -> Tensor:
    """Plain denoising MSE on the preferred images (the paper's SFT baseline): ``[B]``."""
    process = as_process(noise_scheduler)
    noisy = process.add_noise(latents, noise, timesteps)
    target = process.target(latents, noise, timesteps)
    pred = process.predict(unet, noisy, timesteps, encoder_hidden_states, added_cond_kwargs)
    return _weighted(per_sample_mse(pred, target), process, timesteps)
