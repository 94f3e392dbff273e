"""Held-out implicit-reward accuracy (the Diffusion-DPO paper's Table 2 metric) for training and eval.

During training the held-out pairs are encoded once (:func:`encode_heldout_pairs`) and scored at every
``--validation_steps``; :func:`heldout_implicit_accuracy` does the same for a saved checkpoint against
a reference model, for ``eval/evaluate.py --implicit_pairs``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from diffusion_dpo.diffusion import implicit_reward_scores
from diffusion_dpo.models.loading import SDComponents
from diffusion_dpo.training.models import Models, conditioning, sdxl_cond

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
DEFAULT_TIMESTEPS = (100, 300, 500, 700, 900)


@dataclass
class HeldOutPairs:
    """Held-out pairs encoded once: latents and conditioning for the implicit-reward accuracy."""

    latents_w: Tensor  # [N, 4, h, w]
    latents_l: Tensor
    hidden: Tensor  # [N, L, D]
    cond: dict[str, Tensor] | None


@torch.no_grad()
def encode_heldout_pairs(models: Models, loader, max_pairs: int, resolution: int) -> HeldOutPairs:
    """Encode up to ``max_pairs`` pairs once (VAE posterior mean, so every evaluation sees the same latents)."""
    comps = models.components
    device = next(models.unet.parameters()).device
    parts: dict[str, list] = {"w": [], "l": [], "h": [], "p": [], "sizes": [], "crops": []}
    n = 0
    for batch in loader:
        dtype = next(comps.vae.parameters()).dtype
        for key, px in (("w", batch["pixel_values_w"]), ("l", batch["pixel_values_l"])):
            dist = comps.vae.encode(px.to(device, dtype)).latent_dist
            parts[key].append((dist.mean * comps.vae.config.scaling_factor).to(models.weight_dtype))
        hidden, pooled = conditioning(models, batch["captions"], device)
        parts["h"].append(hidden)
        if comps.is_sdxl:
            parts["p"].append(pooled)
            parts["sizes"].append(torch.cat([batch["original_sizes_w"], batch["original_sizes_l"]], dim=1))
            parts["crops"].append(torch.cat([batch["crop_top_lefts_w"], batch["crop_top_lefts_l"]], dim=1))
        n += len(batch["captions"])
        if n >= max_pairs:
            break
    if n == 0:
        raise ValueError("the validation dataset yielded no pairs")
    cat = {k: torch.cat(v)[:max_pairs] if v else None for k, v in parts.items()}
    cond = None
    if comps.is_sdxl:
        sizes = torch.cat([cat["sizes"][:, :2], cat["sizes"][:, 2:]]).to(device)  # [2N, 2], winners first
        crops = torch.cat([cat["crops"][:, :2], cat["crops"][:, 2:]]).to(device)
        cond = sdxl_cond(torch.cat([cat["p"], cat["p"]]), sizes, crops, resolution, models.weight_dtype)
    return HeldOutPairs(cat["w"], cat["l"], cat["h"], cond)


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
                models.unet, models.ref_unet, models.components.noise_scheduler,
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


def _components_from_pipeline(pipe) -> SDComponents:
    from diffusers import DDPMScheduler

    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if getattr(pipe, "tokenizer_2", None) else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])
    for module in (pipe.vae, *encoders, pipe.unet):
        module.requires_grad_(False).eval()
    return SDComponents(
        unet=pipe.unet,
        vae=pipe.vae,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        tokenizers=tokenizers,
        text_encoders=encoders,
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
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from diffusion_dpo.training.data_setup import make_loader
    from diffusion_dpo.training.saving import load_trained_pipeline

    pipe = load_trained_pipeline(model)
    components = _components_from_pipeline(pipe)
    ref_unet = None
    if reference is not None:
        ref_index = DiffusionPipeline.load_config(str(reference))
        if "unet" not in ref_index:
            raise ValueError(f"reference {reference} is not a pipeline with a UNet")
        ref_unet = UNet2DConditionModel.from_pretrained(reference, subfolder="unet").to(device).eval()
    elif not getattr(components.unet, "_hf_peft_config_loaded", False):
        raise ValueError(f"{model} is not a LoRA output, so a reference model must be given (reference=...)")
    for module in (components.unet, components.vae, *components.text_encoders):
        module.to(device)
    models = Models(
        components=components, unet=components.unet, ref_unet=ref_unet, weight_dtype=torch.float32
    )
    if resolution is None:
        resolution = components.unet.config.sample_size * (
            2 ** (len(components.vae.config.block_out_channels) - 1)
        )
    loader = make_loader(
        pairs, split=split, resolution=resolution, batch_size=batch_size, sdxl=components.is_sdxl, seed=seed
    )
    encoded = encode_heldout_pairs(models, loader, max_pairs, resolution)
    return heldout_accuracy(models, encoded, timesteps, seed, batch_size)
