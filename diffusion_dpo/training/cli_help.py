"""How ``train_sd.py``'s options are shown: ``--help`` in groups, one line per flag with its default,
``--help_all`` with each flag's full description, and "did you mean" for an unknown flag or YAML key.

The groups name every :class:`~diffusion_dpo.training.config.TrainConfig` field once (a test checks it),
so a new option must be placed in one. A field's one-line help is its description's first sentence,
or :data:`SHORT_HELP`'s where that is longer than :data:`ONE_LINE` characters (a test checks both).
"""

from __future__ import annotations

import argparse
import difflib
import re
import textwrap

#: --help's groups, in order: (title, field names); a field in none is shown under OTHER (and a test fails)
GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("model", (
        "pretrained_model_name_or_path", "revision", "variant", "vae_model_name_or_path", "use_lora", "rank",
        "lora_alpha", "drop_t5", "max_sequence_length",
    )),
    ("data", (
        "dataset_name", "dataset_split", "dataset_format", "image_root", "label_mode", "min_label_margin",
        "latents_cache", "streaming", "keep_ties", "max_train_samples",
        "cache_dir", "resolution", "random_crop", "no_hflip", "proportion_empty_prompts",
        "dataloader_num_workers", "shuffle_buffer_size", "on_bad_example", "max_bad_row_fraction",
        "no_audit_pairs", "audit_scorers",
    )),
    ("objective", (
        "objective", "sft", "beta_dpo", "loss_type", "label_smoothing", "kto_desirable_weight",
        "kto_undesirable_weight", "beta_mapo", "snr_value", "weighting_scheme", "logit_mean", "logit_std",
        "mode_scale", "flow_error_weighting", "resolution_shift",
    )),
    ("optimisation", (
        "seed", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate",
        "scale_lr", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay",
        "adam_epsilon", "max_grad_norm", "use_adafactor", "max_nonfinite_steps",
    )),
    ("guards and monitors", (
        "stop_on_degradation", "winner_safeguard", "winner_safeguard_mu", "auto_beta", "auto_beta_target",
        "auto_beta_decay", "auto_beta_min", "auto_beta_max",
    )),
    ("speed and memory", (
        "mixed_precision", "gradient_checkpointing", "enable_xformers_memory_efficient_attention",
        "allow_tf32", "channels_last", "compile_unet", "adam_implementation", "use_8bit_adam",
    )),
    ("runs and checkpoints", (
        "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "overwrite_output_dir",
        "create_tiny_assets",
    )),
    ("validation", (
        "validation_dataset_name", "validation_split", "num_validation_pairs", "validation_timesteps",
        "validation_steps", "validation_prompts", "num_inference_steps", "guidance_scale",
        "validation_scorer", "num_validation_images",
    )),
    ("output, logging and the Hub", (
        "output_dir", "report_to", "logging_dir", "push_to_hub", "hub_model_id", "hub_token",
    )),
)  # fmt: skip

#: --help's text of the fields whose description's first sentence is longer than ONE_LINE characters
SHORT_HELP = {
    "pretrained_model_name_or_path": "Base model: a hub id or a local diffusers folder.",
    "vae_model_name_or_path": "Another VAE (SDXL in fp16: madebyollin/sdxl-vae-fp16-fix).",
    "drop_t5": "SD3/SD3.5: train and sample without the T5 text encoder.",
    "max_sequence_length": "SD3/SD3.5, FLUX.1: T5 tokens per caption (also when sampling).",
    "num_inference_steps": "Sampling steps of validation images (eval's default too).",
    "guidance_scale": "Sampling guidance (FLUX.1 dev: its embedding's, 3.5).",
    "resolution_shift": "FLUX.1: draw σ on FluxPipeline's schedule at --resolution.",
    "dataset_name": "Pairs: a hub id, parquet, save_to_disk folder, JSONL or CSV.",
    "dataset_format": "Schema of --dataset_name: auto, pickapic, hpdv3, webdataset, ...",
    "image_root": "Folder that relative image paths resolve against.",
    "label_mode": "hard (the winner is preferred) or soft (train on vote shares).",
    "min_label_margin": "Drop pairs whose vote margin is below this (near-ties).",
    "audit_scorers": "Scorers whose agreement with the labels the audit reports.",
    "stop_on_degradation": "Stop when a training monitor stays past its threshold this long.",
    "winner_safeguard": "Diffusion-SDPO: keep an update from raising the winner's error.",
    "winner_safeguard_mu": "μ of the safeguard: the share of the winner's decrease kept.",
    "auto_beta": "Adapt β each step to a target gradient factor (SimpleTuner's).",
    "latents_cache": "Train from data/precompute_latents.py's latents instead.",
    "streaming": "Stream the dataset instead of downloading it first.",
    "max_train_samples": "Train on a seeded random subset of N rows.",
    "proportion_empty_prompts": "Share of pairs whose caption is replaced by '' (paper: 0.2).",
    "shuffle_buffer_size": "--streaming: rows per shuffled block of each reader.",
    "on_bad_example": "A corrupt image, missing caption or bad label: skip or stop.",
    "max_bad_row_fraction": "Stop (with a checkpoint) once more than this share is bad.",
    "no_audit_pairs": "Skip the start-up audit for shortcuts to the winner.",
    "objective": "dpo, sft (winners), kto (unpaired) or mapo (no reference).",
    "beta_mapo": "MaPO: the margin term's weight against the MSE on winners.",
    "snr_value": "MaPO: γ of the score s(L) = γL/(exp(γL) − 1).",
    "weighting_scheme": "Flow models (SD3): how training draws σ (diffusers' schemes).",
    "flow_error_weighting": "Flow models: weight of each velocity error (docs/sd3.md).",
    "output_dir": "Checkpoints, metrics.jsonl, the final model and its card.",
    "seed": "Seed of init, noise, timesteps, data order and augmentation.",
    "learning_rate": "Learning rate (× the total batch size with --scale_lr).",
    "scale_lr": "Multiply the lr by the total batch size (the paper does).",
    "lr_scheduler": "A diffusers scheduler: constant_with_warmup, cosine, ...",
    "max_nonfinite_steps": "Stop after this many skipped NaN/Inf steps in a row.",
    "use_lora": "Train LoRA adapters (the reference: adapters disabled).",
    "mixed_precision": "Precision of the run (unset: accelerate's setting, else no).",
    "gradient_checkpointing": "Recompute activations in the backward pass to save memory.",
    "enable_xformers_memory_efficient_attention": "xformers attention (CUDA, optional) instead of PyTorch's.",
    "adam_implementation": "AdamW kernels: auto, fused, foreach or for_loop.",
    "use_8bit_adam": "8-bit AdamW (bitsandbytes, CUDA): a quarter of the state.",
    "use_adafactor": "Adafactor instead of AdamW: almost no optimizer state.",
    "channels_last": "Channels-last UNets (often faster convolutions on GPUs).",
    "compile_unet": "torch.compile the trained UNet (faster steps on GPU).",
    "validation_steps": "Every N steps: held-out accuracy, images, the win rate.",
    "validation_dataset_name": "Held-out pairs for the implicit-reward accuracy.",
    "validation_scorer": "Log the samples' win rate vs the reference under this scorer.",
    "num_validation_images": "--validation_scorer: images per prompt (the same seeds).",
    "overwrite_output_dir": "Train again over a finished run of the same options.",
    "push_to_hub": "Upload the model, its card and samples to the Hub at the end.",
    "hub_model_id": "Hub repo to push to (default: the output folder's name).",
    "hub_token": "Hub token (default: `hf auth login`'s); never written out.",
    "create_tiny_assets": "Build missing paths inside ./outputs/ (the embedded default).",
}
#: the longest one-line help: with its default it fits beside the flag in a 120-column terminal
ONE_LINE = 64

OTHER = "other options"

#: how --help names the supported families (``family.name``); a family not listed shows its label
FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "sd3": "SD3/SD3.5", "flux": "FLUX.1"}

_SENTENCE_END = re.compile(r"(?<!e\.g)(?<!i\.e)\.(?:\s|$)")


def one_line(name: str, text: str) -> str:
    if name in SHORT_HELP:
        return SHORT_HELP[name]
    return _SENTENCE_END.split(text, maxsplit=1)[0].rstrip(".") + "."


def supported_families() -> str:
    """``Stable Diffusion 1.x/2.x, SDXL and SD3/SD3.5``: every family of the registry, oldest first."""
    from diffusion_dpo.models.families import FAMILIES

    names = [FAMILY_NAMES.get(f.name, f.label) for f in reversed(FAMILIES)]
    return ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]


def description() -> str:
    return textwrap.fill(
        "Preference fine-tuning of text-to-image diffusion models: Diffusion-DPO, SFT, Diffusion-KTO or "
        f"MaPO, full or LoRA, for {supported_families()} pipelines in diffusers format. Flags override "
        "the --config YAML, whose keys are the flag names without the dashes.",
        width=100,
    )


EPILOG = (
    "examples:\n"
    "  python train_sd.py --config configs/tiny.yaml                 # the embedded default, CPU, minutes\n"
    "  accelerate launch train_sd.py --config configs/sd15_dpo.yaml  # the paper's SD1.5 run\n"
    "  python train_sd.py --help_all                                 # every flag's full description"
)


def default_text(value) -> str | None:
    """How a default is shown; None (not shown) for None, False and empty lists."""
    if value is None or value is False or value == ():
        return None
    if value is True:
        return "true"
    if isinstance(value, tuple | list):
        return " ".join(map(str, value))
    return str(value)


def suggestion(name: str, known) -> str | None:
    """The closest known name to a mistyped one (difflib), or None."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


class Formatter(argparse.RawDescriptionHelpFormatter):
    """One line per flag where the terminal allows: the help column a little further right."""

    def __init__(self, prog, **kwargs):
        super().__init__(prog, max_help_position=36, **kwargs)


class Parser(argparse.ArgumentParser):
    """An argument parser whose "unrecognized arguments" error names the closest flag."""

    def parse_args(self, args=None, namespace=None):
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
            hints = []
            for item in unknown:
                flag = item.split("=", 1)[0]
                close = suggestion(flag, known) if flag.startswith("--") else None
                if close:
                    hints.append(f"{flag} (did you mean {close}?)")
            self.error(
                f"unrecognized arguments: {' '.join(unknown)}" + (f"; {'; '.join(hints)}" if hints else "")
            )
        return parsed


class HelpAll(argparse.Action):
    """``--help_all``: every flag with its whole description."""

    def __init__(self, option_strings, dest, build, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.build = build

    def __call__(self, parser, namespace, values, option_string=None):
        self.build(full_help=True).print_help()
        parser.exit()
