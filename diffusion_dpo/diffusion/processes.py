"""Forward processes: how a model family noises latents, what its denoiser is trained to predict, how
training draws a timestep, and how the denoiser is called.

The objective (:mod:`diffusion_dpo.diffusion.objective`) only ever asks a process; it never knows which
family it trains. A timestep is always an integer index ``t ∈ {0, …, T−1}`` where larger means noisier,
so held-out scoring at fixed timesteps (100, 300, …) means the same thing for every family.

- :class:`DDPMProcess` (SD1.x/2.x, SDXL): ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``, target ``ε`` or the
  velocity, ``t ~ U{0..T−1}``: exactly what diffusers' ``DDPMScheduler`` does.
- :class:`FlowMatchProcess` (SD3/SD3.5; room for Flux): rectified flow, ``x_σ = (1−σ)·x0 + σ·ε``,
  velocity target ``ε − x0`` (diffusers' ``FlowMatchEulerDiscreteScheduler`` convention), σ looked up
  in the checkpoint's own shifted schedule at a position drawn as in diffusers' SD3 training scripts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Tensor = torch.Tensor

#: ``call(model, noisy, model_timesteps, encoder_hidden_states, added_cond) -> prediction``
DenoiserCall = Callable[..., Tensor]

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
#: Per-sample weights of the flow denoising error (docs/sd3.md#sigma-weighting): none (constant β, as
#: public flow-DPO code does), epsilon ((1−σ)²: the error measured in ε-space, as SD1.5's DPO does), or
#: scheme (diffusers' SD3 loss weight of the weighting_scheme: sigma_sqrt → σ⁻², cosmap).
ERROR_WEIGHTINGS = ("none", "epsilon", "scheme")


def unet_call(model, noisy: Tensor, timesteps: Tensor, hidden: Tensor, cond: dict | None) -> Tensor:
    """A diffusers ``UNet2DConditionModel`` (SDXL's pooled text and time ids go in ``cond``)."""
    return model(noisy, timesteps, hidden, added_cond_kwargs=cond).sample


class DDPMProcess:
    """The DDPM forward process of a diffusers scheduler (``add_noise``, ``get_velocity``)."""

    def __init__(self, scheduler, call: DenoiserCall = unet_call):
        self.scheduler = scheduler
        self.call = call
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)

    def sample_timestep(self, generator: torch.Generator) -> Tensor:
        """``[1]`` long, uniform over the T training timesteps."""
        return torch.randint(0, self.num_train_timesteps, (1,), generator=generator)

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """What the UNet is trained to predict: ``ε`` (epsilon) or the velocity (v-prediction)."""
        prediction_type = self.scheduler.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(
            f"scheduler prediction_type={prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'"
        )

    def predict(self, model, noisy: Tensor, timesteps: Tensor, hidden: Tensor, cond: dict | None) -> Tensor:
        return self.call(model, noisy, timesteps, hidden, cond)

    def error_weights(self, timesteps: Tensor) -> Tensor | None:
        """Per-sample weights of the denoising error; None: unweighted (the paper's objective)."""
        return None


class FlowMatchProcess:
    """Rectified flow on a diffusers ``FlowMatchEulerDiscreteScheduler``'s training schedule.

    The scheduler must be as loaded from the checkpoint (never ``set_timesteps``): its ``sigmas`` and
    ``timesteps`` hold the T shifted training levels, noisiest first. Index ``t`` is position
    ``T − 1 − t`` there, so ``t = 0`` is the least noisy level, as for DDPM.
    """

    def __init__(
        self,
        scheduler,
        call: DenoiserCall,
        *,
        weighting_scheme: str = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        mode_scale: float = 1.29,
        error_weighting: str = "none",
    ):
        if weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"weighting_scheme {weighting_scheme!r}: choose one of {', '.join(WEIGHTING_SCHEMES)}"
            )
        if error_weighting not in ERROR_WEIGHTINGS:
            raise ValueError(
                f"error weighting {error_weighting!r}: choose one of {', '.join(ERROR_WEIGHTINGS)}"
            )
        self.scheduler = scheduler
        self.call = call
        self.weighting_scheme = weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.error_weighting = error_weighting
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        sigmas = scheduler.sigmas.float()[: self.num_train_timesteps]
        if len(sigmas) != self.num_train_timesteps:
            raise ValueError(
                f"the flow-matching scheduler holds {len(sigmas)} sigmas for num_train_timesteps="
                f"{self.num_train_timesteps}: it was set to sampling timesteps; load it from the checkpoint"
            )
        # index t (0 = least noise) → σ and the transformer's timestep (σ·T on the shifted schedule)
        self.sigmas = sigmas.flip(0)
        self.model_timesteps = scheduler.timesteps.float()[: self.num_train_timesteps].flip(0)

    def sample_timestep(self, generator: torch.Generator) -> Tensor:
        """``[1]`` long: ``u`` from the weighting scheme's density (diffusers'
        ``compute_density_for_timestep_sampling``), position ``⌊u·T⌋`` in the noisiest-first schedule."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            self.weighting_scheme, 1, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, generator=generator,
        )  # fmt: skip
        position = (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)
        return self.num_train_timesteps - 1 - position

    def sigma(self, timesteps: Tensor, like: Tensor) -> Tensor:
        """σ of each index, shaped ``[N, 1, 1, 1]`` like ``like``'s batch, in its dtype."""
        sigma = self.sigmas.to(timesteps.device)[timesteps.long()]
        return sigma.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        sigma = self.sigma(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The velocity ``ε − x0`` (``d x_σ / d σ``)."""
        return noise - latents

    def predict(self, model, noisy: Tensor, timesteps: Tensor, hidden: Tensor, cond: dict | None) -> Tensor:
        model_t = self.model_timesteps.to(noisy.device)[timesteps.long()]
        return self.call(model, noisy, model_t, hidden, cond)

    def error_weights(self, timesteps: Tensor) -> Tensor | None:
        if self.error_weighting == "none":
            return None
        sigma = self.sigmas.to(timesteps.device)[timesteps.long()]
        if self.error_weighting == "epsilon":  # ε̂ − ε = (1 − σ)(v̂ − v)
            return (1.0 - sigma) ** 2
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting_scheme, sigma).float()


def as_process(process_or_scheduler):
    """A process as is; a bare diffusers DDPM-style scheduler as the UNet's :class:`DDPMProcess`."""
    if isinstance(process_or_scheduler, (DDPMProcess, FlowMatchProcess)):
        return process_or_scheduler
    return DDPMProcess(process_or_scheduler)
