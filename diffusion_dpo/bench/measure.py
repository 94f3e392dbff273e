"""Measure one benchmark configuration: the trainer's own training step, timed.

Run as ``python -m diffusion_dpo.bench.measure SPEC.json RESULT.json`` by the benchmark, one fresh
process per configuration, so that peak memory (CUDA's peak allocation, or on CPU the peak resident
set size) belongs to that configuration alone. The step is the loop's: models from
:func:`~diffusion_dpo.training.models.setup_models`, the optimizer from
:func:`~diffusion_dpo.training.optim.make_optimizer`, both prepared by accelerate, then per optimizer
step ``compute_batch_loss`` + ``accelerator.backward`` + gradient clipping + the loop's one host sync
(:class:`~diffusion_dpo.training.collectives.StepWindow`) + ``optimizer.step``. Batches are synthetic and
already collated, as the DataLoader hands them over, so data loading is not timed.

FLOPs are counted once per shape with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
(:func:`step_flops`): the same models and step, no memory, no kernels, and no gradient-checkpointing
recomputation, so they are *model* FLOPs, as MFU needs.
"""

from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs that ``fn()`` executes, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (matmuls, convolutions and attention, forward and backward; elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far is the best estimate
        return _peak_rss()


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def make_batch(cfg, micro_conditioning: bool, shapes: dict | None = None) -> dict:
    """One collated pair batch of ``cfg.train_batch_size`` rows, as the DataLoader gives it.

    ``micro_conditioning`` (the model family's, SDXL's): each image's original size and crop. With
    ``shapes`` (:func:`cached_shapes`), a batch read from a latent cache (the VAE posteriors' mean and
    std, the text embeddings and, where the family has them, SDXL's and SD3's pooled embeddings)
    instead of pixels and captions.
    """
    cached = shapes is not None
    n, res = cfg.train_batch_size, cfg.resolution
    g = torch.Generator().manual_seed(cfg.seed)
    batch = {
        "captions": ["a photo of a red circle on a blue background, highly detailed"] * n,
        "indices": torch.arange(n),
        "valid": torch.ones(n, dtype=torch.bool),
        "bad_rows": [],
        "num_skipped": 0,
    }
    for s in ("_w", "_l"):
        if cached:
            batch[f"latents_mean{s}"] = torch.randn((n, *shapes["latent"]), generator=g)
            batch[f"latents_std{s}"] = torch.full((n, *shapes["latent"]), 0.01)
        else:
            # uint8, as the loader hands images over (the step scales them on the device)
            batch[f"pixel_values{s}"] = torch.randint(
                0, 256, (n, 3, res, res), generator=g, dtype=torch.uint8
            )
        if micro_conditioning:
            batch[f"original_sizes{s}"] = torch.tensor([[res, res]] * n)
            batch[f"crop_top_lefts{s}"] = torch.zeros((n, 2), dtype=torch.long)
    if cached:
        batch["prompt_embeds"] = torch.randn((n, *shapes["text"]), generator=g)
        if shapes["pooled"] is not None:
            batch["pooled_prompt_embeds"] = torch.randn((n, *shapes["pooled"]), generator=g)
    return batch


def cached_shapes(cfg) -> dict:
    """What a latent cache holds per row for the model of ``cfg``: ``latent`` ``[C, h, w]``, ``text``
    ``[L, D]`` and ``pooled`` ``[D']`` (SDXL, SD3) or None (the family's ``encode_prompts`` has none).

    The text encoders are loaded here, on CPU, to encode the empty caption once: a run from a cache
    loads none, and the benchmark asks this in its own process, so that a row's peak memory holds only
    what the run holds."""
    from diffusion_dpo.models.loading import encode_prompts, latent_shape, load_components

    comps = load_components(
        cfg.pretrained_model_name_or_path, cfg.revision, cfg.variant, cfg.vae_model_name_or_path,
        load_unet=False, family_options=cfg.family_options(),
    )  # fmt: skip
    hidden, pooled = encode_prompts(comps, [""], "cpu")
    return {
        "latent": list(latent_shape(comps.vae, cfg.resolution, cfg.resolution)),
        "text": list(hidden.shape[1:]),
        "pooled": None if pooled is None else list(pooled.shape[1:]),
    }


def step_flops(cfg, cached: bool, shapes: dict | None = None) -> int:
    """Model FLOPs of one training step (forward + backward of one micro-batch) of ``cfg``, counted on
    the meta device: the trainer's models and ``compute_batch_loss`` with no memory and no kernels.
    Options that change how, not what, is computed (precision, checkpointing, compile, xformers,
    channels-last, the optimizer) are left out: the count holds no recomputation."""
    import dataclasses

    from diffusion_dpo.training.models import setup_models
    from diffusion_dpo.training.step import compute_batch_loss

    meta_cfg = dataclasses.replace(
        cfg, gradient_checkpointing=False, compile_unet=False, channels_last=False,
        enable_xformers_memory_efficient_attention=False, use_8bit_adam=False,
        mixed_precision="no",  # counts do not depend on dtypes, and meta tensors have no autocast
    )  # fmt: skip
    models = setup_models(meta_cfg, "meta")
    batch = make_batch(
        meta_cfg,
        models.components.family.micro_conditioning,
        (shapes or cached_shapes(cfg)) if cached else None,
    )

    def step():
        loss, _ = compute_batch_loss(models, batch, meta_cfg)
        loss.backward()

    return count_flops(step)


def memory_breakdown(models, optimizer) -> dict[str, int]:
    """Bytes each part of a set-up holds on the step's device: trained weights, their gradients (as
    large as the trained weights), optimizer states (after a step), reference UNet, frozen parts (VAE,
    text encoders and, for LoRA, the frozen base UNet; not the encoders a run from a latent cache keeps
    in CPU memory)."""

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    trained = [p for p in models.unet.parameters() if p.requires_grad]
    frozen_unet = [p for p in models.unet.parameters() if not p.requires_grad]
    device = next(models.unet.parameters()).device
    encoders = [models.components.vae, *models.components.text_encoders]
    frozen = [p for m in encoders for p in m.parameters() if p.device == device]
    states = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return {
        "trained_weights": nbytes(trained),
        "gradients": nbytes(trained),
        "optimizer_states": nbytes(states),
        "reference_unet": nbytes(models.ref_unet.parameters()) if models.ref_unet is not None else 0,
        "frozen_parts": nbytes(frozen) + nbytes(frozen_unet),
    }


def run(spec: dict) -> dict:
    """Set up, warm up, time ``spec["steps"]`` optimizer steps; the measurements as a dict."""
    import warnings

    # everything a configuration may import, before the baseline of resident memory is read
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from diffusion_dpo.training.collectives import StepWindow
    from diffusion_dpo.training.config import TrainConfig
    from diffusion_dpo.training.models import setup_models
    from diffusion_dpo.training.optim import make_optimizer
    from diffusion_dpo.training.step import compute_batch_loss

    rss_before = _current_rss()
    device = torch.device(spec["device"])
    cfg = TrainConfig(**spec["train"])
    cfg.validate()
    cuda = device.type == "cuda"
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not cuda)
    set_seed(cfg.seed)
    if cfg.allow_tf32 and cuda:
        torch.backends.cuda.matmul.allow_tf32 = True

    started = time.perf_counter()
    models = setup_models(cfg, accelerator.device)
    optimizer = make_optimizer(
        cfg, [p for p in models.unet.parameters() if p.requires_grad], cfg.learning_rate, accelerator.device
    )
    unet, optimizer = accelerator.prepare(models.unet, optimizer)
    models.unet = unet
    params = list(unet.parameters())
    shapes = (spec.get("shapes") or cached_shapes(cfg)) if spec["cached_latents"] else None
    batch = make_batch(cfg, models.components.family.micro_conditioning, shapes)
    if cuda:  # as the trainer's DataLoader hands batches over on CUDA (pin_memory)
        batch = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    setup_seconds = time.perf_counter() - started
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    nonfinite = 0

    def step(i: int) -> None:
        nonlocal nonfinite
        batch["indices"] = torch.arange(cfg.train_batch_size) + i * cfg.train_batch_size  # fresh draws
        window = StepWindow()
        with accelerator.accumulate(unet):
            loss, metrics = compute_batch_loss(models, batch, cfg)
            accelerator.backward(loss)
        window.add(loss, metrics, batch)
        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        totals = window.reduce(accelerator, stop=False, grad_norm=norm)
        if not totals["nonfinite"] and math.isfinite(totals["grad_norm"]):
            optimizer.step()
        else:
            nonfinite += 1
            if accelerator.scaler is not None:
                optimizer.step()  # as the loop does: the GradScaler sees the overflow and lowers its scale
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    for i in range(spec["warmup"]):
        step(i)
    times = []
    for i in range(spec["warmup"], spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)

    result = {
        "setup_seconds": setup_seconds,
        "step_seconds": times,
        "step_seconds_median": statistics.median(times),
        "pairs_per_s": cfg.train_batch_size / statistics.median(times),
        "nonfinite_steps": nonfinite,
        "memory_breakdown_bytes": memory_breakdown(models, optimizer),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        result.update(
            peak_memory_bytes=torch.cuda.max_memory_allocated(),
            peak_memory_kind="torch.cuda.max_memory_allocated over the timed and warm-up steps",
            peak_reserved_bytes=torch.cuda.max_memory_reserved(),
            device_name=torch.cuda.get_device_name(device),
        )
        # host syncs of one more step, as torch reports them (H2D copies of the batch count too)
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step(spec["warmup"] + spec["steps"])
        torch.cuda.set_sync_debug_mode(0)
        result["host_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)
    else:
        result.update(cpu_peak_memory(rss_before), device_name="cpu")
    return result


def cpu_peak_memory(rss_before: int) -> dict:
    """A CPU row's peak memory: the process's peak resident set size minus its size after imports."""
    peak = _peak_rss()
    return dict(
        peak_memory_bytes=peak - rss_before,
        peak_memory_kind="peak resident set size of the process minus its size after imports",
        peak_rss_bytes=peak,
    )


def run_spec_file(measure_row: Callable[[dict], dict], argv: list[str] | None = None) -> None:
    """A row's fresh process: read its spec (JSON), set the threads, measure, write the result (JSON)."""
    spec_path, result_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    Path(result_path).write_text(json.dumps(measure_row(spec)) + "\n")


def main(argv: list[str] | None = None) -> None:
    run_spec_file(run, argv)


if __name__ == "__main__":
    main()
