"""Held-out implicit-reward accuracy (the Diffusion-DPO paper's Table 2 metric) for training and eval.

During training the held-out pairs are encoded once (:func:`encode_heldout_pairs`) and scored at every
``--validation_steps``; :func:`heldout_implicit_accuracy` does the same for a saved checkpoint against
a reference model, for ``eval/evaluate.py --implicit_pairs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffusion_dpo.diffusion import implicit_reward_scores
from diffusion_dpo.models.loading import SDComponents, scaled_latents, to_unit_range
from diffusion_dpo.training.models import Models, conditioning

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class HeldOutPairs:
    """Held-out pairs encoded once: latents and conditioning for the implicit-reward accuracy."""

    latents_w: Tensor  # [N, C, h, w]
    latents_l: Tensor
    hidden: Tensor  # [N, L, D]
    cond: dict[str, Tensor] | None
    captions: list[str] = field(default_factory=list)  # [N]: what --validation_scorer samples


@torch.no_grad()
def encode_heldout_pairs(models: Models, loader, max_pairs: int, resolution: int) -> HeldOutPairs:
    """Encode up to ``max_pairs`` pairs once (VAE posterior mean, so every evaluation sees the same latents)."""
    comps = models.components
    family = comps.family
    device = next(models.unet.parameters()).device
    shift = getattr(comps.vae.config, "shift_factor", None)
    parts: dict[str, list] = {"w": [], "l": [], "h": [], "cond_w": [], "cond_l": [], "captions": []}
    n = 0
    for batch in loader:
        dtype = next(comps.vae.parameters()).dtype
        for key, px in (("w", batch["pixel_values_w"]), ("l", batch["pixel_values_l"])):
            dist = comps.vae.encode(to_unit_range(px.to(device)).to(dtype)).latent_dist
            latents = scaled_latents(dist.mean, comps.vae.config.scaling_factor, shift)
            parts[key].append(latents.to(models.weight_dtype))
        hidden, pooled = conditioning(models, batch["captions"], device)
        parts["captions"].extend(batch["captions"])
        parts["h"].append(hidden)
        for suffix in ("_w", "_l"):  # the family's extra inputs (SDXL, SD3), per image
            cond = family.added_conditioning(pooled, batch, [suffix], resolution, models.weight_dtype, device)
            if cond is not None:
                parts[f"cond{suffix}"].append(cond)
        n += len(batch["captions"])
        if n >= max_pairs:
            break
    if n == 0:
        raise ValueError("the validation dataset yielded no pairs")
    cat = {k: torch.cat(v)[:max_pairs] for k, v in parts.items() if k in ("w", "l", "h")}
    cond = None
    if parts["cond_w"]:  # [2N, ...]: winners then losers
        cond = {
            key: torch.cat([torch.cat([c[key] for c in parts[f"cond{s}"]])[:max_pairs] for s in ("_w", "_l")])
            for key in parts["cond_w"][0]
        }
    return HeldOutPairs(cat["w"], cat["l"], cat["h"], cond, list(parts["captions"][:max_pairs]))


def heldout_accuracy(
    models: Models,
    pairs: HeldOutPairs,
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    batch_size: int = 16,
    accelerator=None,
) -> float:
    """Implicit-reward accuracy of the current model on the encoded held-out pairs.

    With an ``accelerator`` the pairs are split across its processes and the counts summed, so each
    pair is scored once; every process runs the same number of forward passes (the last slice is
    padded and the padding not counted), as sharded engines (FSDP, ZeRO-3) require. A pair's noise
    depends on its index only, so the result does not depend on the number of processes.
    """
    # policy and reference in the same (eval) mode, so that a model equal to its reference scores 0.5
    modes = [(m, m.training) for m in (models.unet, models.ref_unet) if m is not None]
    for module, _ in modes:
        module.eval()
    n = pairs.latents_w.shape[0]
    processes, rank = (accelerator.num_processes, accelerator.process_index) if accelerator else (1, 0)
    per_process = -(-n // processes)
    mine = [min(i, n - 1) for i in range(rank * per_process, (rank + 1) * per_process)]  # padded
    counted = torch.tensor([rank * per_process + k < n for k in range(per_process)])
    device = pairs.latents_w.device
    total = torch.zeros(2, device=device)  # [sum of scores, pairs]
    for start in range(0, per_process, batch_size):
        idx = mine[start : start + batch_size]
        cond = None
        if pairs.cond is not None:  # conditioning is [2N]: winners then losers
            rows = torch.tensor(idx + [n + i for i in idx])
            cond = {k: v[rows.to(v.device)] for k, v in pairs.cond.items()}
        with torch.autocast(device.type, enabled=False):
            scores = implicit_reward_scores(
                models.unet, models.ref_unet, models.process,
                pairs.latents_w[idx], pairs.latents_l[idx], pairs.hidden[idx],
                timesteps=tuple(timesteps), seed=seed, added_cond_kwargs=cond, pair_indices=idx,
            )  # fmt: skip
        keep = counted[start : start + batch_size].to(device)
        total += torch.stack([torch.where(keep, scores, 0.0).sum(), keep.sum().float()])
    if accelerator is not None and processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    for module, training in modes:
        module.train(training)
    return (total[0] / total[1]).item()


def _components_from_pipeline(pipe, family) -> SDComponents:
    names = ["", "_2", "_3"]
    tokenizers = [getattr(pipe, f"tokenizer{s}") for s in names if getattr(pipe, f"tokenizer{s}", None)]
    encoders = [getattr(pipe, f"text_encoder{s}") for s in names if getattr(pipe, f"text_encoder{s}", None)]
    denoiser = getattr(pipe, family.denoiser_subfolder)
    for module in (pipe.vae, *encoders, denoiser):
        module.requires_grad_(False).eval()
    if getattr(family, "joint_attention_dim", 0) is None:  # SD3 without T5 pads its states with zeros
        family.joint_attention_dim = denoiser.config.joint_attention_dim
    return SDComponents(
        unet=denoiser,
        vae=family.trainer_vae(pipe.vae),
        noise_scheduler=family.noise_scheduler_from_config(pipe.scheduler.config),
        tokenizers=tokenizers,
        text_encoders=encoders,
        family=family,
    )


@torch.no_grad()
def heldout_implicit_accuracy(
    model: str | Path,
    pairs: str,
    *,
    reference: str | Path | None = None,
    resolution: int | None = None,
    max_pairs: int = 200,
    timesteps: tuple[int, ...] = DEFAULT_TIMESTEPS,
    seed: int = 0,
    device: str = "cpu",
    batch_size: int = 8,
    split: str = "train",
) -> float:
    """Implicit-reward accuracy of a saved checkpoint on held-out preference pairs.

    Args:
        model: a trainer output folder (full pipeline, or LoRA weights + ``training_config.yaml``) or
            any diffusers pipeline folder / hub id.
        pairs: a pair dataset in any format ``load_pair_dataset`` reads (ties are dropped).
        reference: the reference pipeline (folder or hub id). ``None``: the model's own UNet with its
            LoRA adapters disabled (LoRA outputs only).
        resolution: image size; default: the UNet's ``sample_size`` × the VAE's scale factor.
        max_pairs, timesteps, seed: which pairs, at which fixed timesteps, with which seeded noise.
    """
    from diffusers import DiffusionPipeline

    from diffusion_dpo.models.families import family_for_pipeline
    from diffusion_dpo.training.data_setup import make_loader
    from diffusion_dpo.training.saving import load_trained_pipeline, trained_family_options

    pipe = load_trained_pipeline(model)
    family = family_for_pipeline(pipe, **trained_family_options(model))
    components = _components_from_pipeline(pipe, family)
    ref_unet = None
    if reference is not None:
        ref_index = DiffusionPipeline.load_config(str(reference))
        if family.denoiser_subfolder not in ref_index:
            raise ValueError(
                f"reference {reference} is not a pipeline with a {family.denoiser_subfolder} like {model}'s"
            )
        ref_unet = family.load_denoiser(reference, torch.float32).to(device).eval()
    elif not getattr(components.unet, "_hf_peft_config_loaded", False):
        raise ValueError(f"{model} is not a LoRA output, so a reference model must be given (reference=...)")
    for module in (components.unet, components.vae, *components.text_encoders):
        module.to(device)
    models = Models(
        components=components, unet=components.unet, ref_unet=ref_unet, weight_dtype=torch.float32
    )
    if resolution is None:
        if getattr(components.unet.config, "sample_size", None) is None:  # Qwen-Image's transformer
            raise ValueError(
                f"{model}'s {family.denoiser_label} has no default image size: pass a resolution"
            )
        resolution = components.unet.config.sample_size * (
            2 ** (len(components.vae.config.block_out_channels) - 1)
        )
    loader = make_loader(
        pairs,
        split=split,
        resolution=resolution,
        batch_size=batch_size,
        sdxl=family.micro_conditioning,
        seed=seed,
    )
    encoded = encode_heldout_pairs(models, loader, max_pairs, resolution)
    return heldout_accuracy(models, encoded, timesteps, seed, batch_size)
