"""Training configuration: one dataclass mirrored by the YAML files in ``configs/``.

Each field's docstring (the ``help`` metadata) is its ``--help`` text. Names follow the Diffusion-DPO
paper's ``train.py`` and the diffusers training scripts where the concept is the same. Precedence:
dataclass default < YAML < command-line flag. Unknown YAML keys are an error.

Why one module of ~590 lines: it is the one place every flag and YAML key is declared with its help
text, mirroring ``configs/``; most of its length is those fields' documentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from diffusion_dpo.data.formats import DATASET_FORMATS
from diffusion_dpo.losses import PAIRWISE_LOSSES, check_mapo_args, check_pairwise_args
from diffusion_dpo.training import cli_help


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- model ---
    pretrained_model_name_or_path: str = _f(
        None, "Base model: a hub id (e.g. runwayml/stable-diffusion-v1-5) or a local diffusers folder."
    )
    revision: str | None = _f(None, "Hub revision of the base model.")
    variant: str | None = _f(None, "Weight variant of the base model files, e.g. fp16.")
    vae_model_name_or_path: str | None = _f(
        None, "Another VAE, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE is unstable in fp16)."
    )
    drop_t5: bool = _f(
        False,
        "SD3/SD3.5: train (and sample) without the T5 text encoder, whose states become zeros as in the "
        "pipeline without it; saves its memory (4.7B parameters in SD3.5).",
    )
    max_sequence_length: int | None = _f(
        None,
        "SD3/SD3.5 and FLUX.1: T5 tokens per caption, also used when sampling (default: diffusers' training "
        "scripts', SD3 77 (its pipeline samples with 256), FLUX.1 512).",
    )
    guidance_scale: float | None = _f(
        None,
        "Guidance when sampling: classifier-free guidance of validation images for SD1.x/2.x, SDXL, SD3 and "
        "Qwen-Image (default: the pipeline's own), recorded in the output as eval/evaluate.py's default. "
        "FLUX.1 dev: the value fed to its guidance embedding, the same for the policy, the reference and "
        "sampling (default 3.5, as diffusers' Flux scripts; docs/flux.md#guidance says why some pick 1.0).",
    )
    # --- data ---
    dataset_name: str = _f(
        None,
        "Preference data: a hub id (liuhuohuo2/pick-a-pic-v2; docs/data.md lists live sets), a local parquet file/folder, a `datasets` "
        "save_to_disk folder, or a JSONL/CSV of caption,image_w,image_l (KTO: caption,image,label).",
    )
    dataset_split: str = _f("train", "Split of the dataset to train on.")
    latents_cache: str | None = _f(
        None,
        "Train from a folder made by data/precompute_latents.py (each pair's VAE posterior mean/std in both "
        "flips and its caption's text embeddings, encoded once) instead of encoding images and captions at "
        "every step; it replaces --dataset_name. Same rows, order and random draws as training from the "
        "images; center crops only (not with --random_crop); held-out validation still reads images.",
    )
    streaming: bool = _f(False, "Stream the dataset instead of downloading it (for sets too large for disk).")
    keep_ties: bool = _f(False, "Keep tied pairs (label_0 = 0.5). By default they are dropped and counted.")
    dataset_format: str = _f(
        "auto",
        "Schema of --dataset_name: auto (recognised from the columns), pickapic, ordered, columns "
        "(caption,image_0,image_1,label_0), hpdv3 (HPDv3/HPDv3++), imagereward, open_image_preferences, "
        "open_image_preferences_votes or webdataset. docs/data.md lists datasets in each.",
        choices=DATASET_FORMATS,
    )
    image_root: str | None = _f(
        None,
        "Folder that relative image paths resolve against (HPDv3: where images.tar.gz.* was extracted); "
        "default: the JSON/JSONL/CSV file's own folder.",
    )
    label_mode: str = _f(
        "hard",
        "hard: the winner is preferred (p = 1). soft: train on p = P(winner preferred) where the data carries "
        "vote shares (Pick-a-Pic ties, HPDv3 choice_dist, vote counts) with the expected loss "
        "p·ℓ(z) + (1−p)·ℓ(−z); ties are kept at p = 0.5 instead of dropped (docs/data.md#soft-labels).",
        choices=("hard", "soft"),
    )
    min_label_margin: float = _f(
        0.0,
        "Drop near-ties: pairs whose vote margin |P(image 0) − P(image 1)| is below this (0: keep all; "
        "ties have margin 0 and are dropped by any value > 0).",
    )
    max_train_samples: int | None = _f(
        None,
        "Use only N rows: a seeded random subset (the paper's shuffle(seed).select(range(N))); with "
        "--streaming, N rows of a seeded choice of shards, the same rows every epoch.",
    )
    cache_dir: str | None = _f(None, "Where `datasets` and the hub cache downloads.")
    resolution: int = _f(512, "Images are resized (shorter side) and cropped to this size. SDXL: 1024.")
    random_crop: bool = _f(False, "Random instead of center crops.")
    no_hflip: bool = _f(False, "Disable random horizontal flips (the paper flips).")
    proportion_empty_prompts: float = _f(
        0.2, "Probability that a pair's caption is replaced by '' (decided once per pair; paper: 0.2)."
    )
    dataloader_num_workers: int = _f(0, "DataLoader worker processes (0 = load in the main process).")
    shuffle_buffer_size: int = _f(
        1000,
        "--streaming: rows per shuffled block of each reader (memory: one block of encoded rows per "
        "DataLoader worker). Shards are also shuffled per epoch.",
    )
    on_bad_example: str = _f(
        "skip",
        "A corrupt/missing image, a missing caption or a label outside {0, 0.5, 1}: skip the row (it is "
        "counted in metrics.jsonl as data/skipped_rows, with the first row ids) or stop with an error "
        "naming it. Empty captions are trained on (as unconditional examples).",
        choices=("skip", "error"),
    )
    max_bad_row_fraction: float = _f(
        0.01,
        "Stop (with a checkpoint and examples of bad rows) once the rows read are strong evidence that "
        "more than this share of rows is bad, or a whole epoch's share exceeds it.",
    )
    no_audit_pairs: bool = _f(
        False,
        "Skip the start-up shortcut audit, which reads the file headers of up to 256 pairs (a few seconds at "
        "most) and warns when size, format, JPEG quality or bytes per pixel alone predicts the winner, or the "
        "labels favour one position. The full audit: python data/audit_pairs.py --dataset NAME.",
    )
    audit_scorers: list[str] = _f(
        (),
        "Scorers (e.g. pickscore, hpsv2.1, aesthetic; as eval's --scorer) whose agreement with the labels the "
        'start-up audit reports on up to 64 pairs: "labels agree with pickscore on 54% of pairs". Loads '
        "each scorer once; the full report: python data/audit_pairs.py --dataset NAME --scorer NAME.",
    )
    # --- objective ---
    objective: str = _f(
        "dpo",
        "dpo (pairs), sft (denoising MSE on winners), kto (unpaired data) or mapo (pairs, no reference "
        "model: MaPO, Hong et al. 2024).",
        choices=("dpo", "sft", "kto", "mapo"),
    )
    sft: bool = _f(False, "Same as `--objective sft` (the paper's flag).")
    beta_dpo: float = _f(
        5000.0,
        "β in the paper code's scale: loss = −logσ(−0.5·β·(Δθ − Δref)). Paper: 2000 (SD1.5), 5000 (SDXL). "
        "diffusers' research script's β is half of this.",
    )
    loss_type: str = _f("sigmoid", "Pairwise loss of the core.", choices=tuple(sorted(PAIRWISE_LOSSES)))
    label_smoothing: float = _f(0.0, "ε for sigmoid (cDPO), robust and exo_pair.")
    kto_desirable_weight: float = _f(1.0, "λD of Diffusion-KTO.")
    kto_undesirable_weight: float = _f(1.0, "λU of Diffusion-KTO.")
    beta_mapo: float = _f(
        0.1,
        "MaPO: β of loss = L_w − β·logσ(T·(s(L_w) − s(L_l))), the margin term's weight against the "
        "denoising MSE on winners (the authors' --beta_mapo; 0 = SFT on winners).",
    )
    snr_value: float = _f(
        0.5, "MaPO: γ of the score s(L) = γL/(exp(γL) − 1) of a denoising error L (the authors' --snr_value)."
    )
    weighting_scheme: str = _f(
        "logit_normal",
        "Flow models (SD3): how training draws σ, as in diffusers' SD3 scripts: logit_normal or mode; cosmap, "
        "sigma_sqrt and none draw uniformly (cosmap and sigma_sqrt also name the loss weight that "
        "--flow_error_weighting scheme applies).",
        choices=("logit_normal", "mode", "cosmap", "sigma_sqrt", "none"),
    )
    logit_mean: float = _f(0.0, "Flow models: mean of the logit_normal σ draw.")
    logit_std: float = _f(1.0, "Flow models: standard deviation of the logit_normal σ draw.")
    mode_scale: float = _f(1.29, "Flow models: scale of the mode σ draw.")
    flow_error_weighting: str = _f(
        "none",
        "Flow models: weight of each image's velocity error: none (a constant β, as public flow-DPO code "
        "uses), epsilon ((1−σ)², the error in ε-space as for SD1.5), or scheme (diffusers' SD3 loss weight "
        "of --weighting_scheme). docs/sd3.md says why none is the default.",
        choices=("none", "epsilon", "scheme"),
    )
    resolution_shift: bool = _f(
        False,
        "FLUX.1: draw σ on the schedule FluxPipeline samples at --resolution (shifted by e^μ, μ = "
        "calculate_shift of the image's token count), instead of the checkpoint's unshifted training "
        "schedule that diffusers' Flux scripts train on (docs/flux.md#sigma).",
    )
    # --- optimisation ---
    output_dir: str = _f("outputs/run", "Where checkpoints, metrics.jsonl and the final model are written.")
    seed: int = _f(0, "Seed for model init, noise, timesteps, data order and augmentation.")
    train_batch_size: int = _f(1, "Pairs per device per micro-batch.")
    gradient_accumulation_steps: int = _f(1, "Micro-batches per optimizer step.")
    max_train_steps: int = _f(2000, "Optimizer steps to train for.")
    learning_rate: float = _f(1e-8, "Learning rate (multiplied by the total batch size with --scale_lr).")
    scale_lr: bool = _f(False, "lr × train_batch_size × gradient_accumulation_steps × num_processes (paper).")
    lr_scheduler: str = _f(
        "constant_with_warmup",
        "diffusers scheduler name: constant, constant_with_warmup, linear, cosine, ...",
    )
    lr_warmup_steps: int = _f(500, "Warm-up optimizer steps.")
    adam_beta1: float = _f(0.9, "AdamW β1.")
    adam_beta2: float = _f(0.999, "AdamW β2.")
    adam_weight_decay: float = _f(1e-2, "AdamW weight decay.")
    adam_epsilon: float = _f(1e-8, "AdamW ε.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm.")
    max_nonfinite_steps: int = _f(
        10,
        "A NaN/Inf loss or gradient skips its optimizer step (weights, optimizer and lr schedule "
        "untouched; counted as train/skipped_steps); this many in a row stop the run with a checkpoint.",
    )
    # --- guards against a run going wrong (docs/monitors.md) ---
    stop_on_degradation: int = _f(
        0,
        "Stop with a checkpoint and advice when a training monitor (docs/monitors.md) stays past its "
        "threshold for this many checks in a row (steps; validations for the held-out accuracy). 0: only warn.",
    )
    winner_safeguard: bool = _f(
        False,
        "Diffusion-SDPO (arXiv 2511.03317): scale the loser's gradient in closed form so that an update does "
        "not raise the winner's denoising error to first order. Any pairwise --loss_type.",
    )
    winner_safeguard_mu: float = _f(
        0.9,
        "μ of the safeguard: the share of the winner's own decrease that must survive (paper scripts: 0.9).",
    )
    auto_beta: bool = _f(
        False,
        "Adapt β after each step so that a pair with the typical margin |δ| (an EMA over steps) has the "
        "gradient factor σ(−β|δ|) = --auto_beta_target (SimpleTuner's auto_beta); starts at --beta_dpo.",
    )
    auto_beta_target: float = _f(0.2, "--auto_beta: the target gradient factor, in (0, 0.5).")
    auto_beta_decay: float = _f(0.99, "--auto_beta: decay of the EMA of the batch mean |δ|.")
    auto_beta_min: float | None = _f(None, "--auto_beta: smallest β (default --beta_dpo / 10).")
    auto_beta_max: float | None = _f(None, "--auto_beta: largest β (default 10 × --beta_dpo).")
    use_lora: bool = _f(False, "Train LoRA adapters; the reference is the same UNet with adapters disabled.")
    rank: int = _f(8, "LoRA rank.")
    lora_alpha: int | None = _f(None, "LoRA alpha (default: the rank).")
    mixed_precision: str | None = _f(
        None,
        "no, fp16 or bf16. Unset: accelerate's (`accelerate launch --mixed_precision`, or its config file), "
        "else no.",
        choices=("no", "fp16", "bf16"),
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute UNet activations in the backward pass to save memory."
    )
    enable_xformers_memory_efficient_attention: bool = _f(
        False,
        "Use xformers attention (CUDA GPUs, optional package) instead of PyTorch's scaled-dot-product "
        "attention, which is the default and needs nothing.",
    )
    allow_tf32: bool = _f(False, "Allow TF32 matmuls on Ampere+ GPUs.")
    adam_implementation: str = _f(
        "auto",
        "AdamW kernels: auto (fused on CUDA, foreach elsewhere), fused (one kernel for all weights), "
        "foreach (a few batched kernels: PyTorch's choice on CUDA; on CPU the for_loop update bit for bit, "
        "with less Python per weight), for_loop (weight by weight: PyTorch's choice on CPU). Same update "
        "up to float rounding; checkpoints load across them.",
        choices=("auto", "fused", "foreach", "for_loop"),
    )
    use_8bit_adam: bool = _f(
        False,
        "8-bit AdamW from bitsandbytes (CUDA, optional package): optimizer states in 2 bytes per trained "
        "weight instead of 8.",
    )
    use_adafactor: bool = _f(
        False,
        "Adafactor (transformers) instead of AdamW, as the paper's train.py --use_adafactor (its SDXL "
        "runs): factored second moments and no first moment, so almost no optimizer state (AdamW: 8 "
        "bytes per trained weight); the given learning rate (no relative step), update clipping at 1, "
        "weight decay --adam_weight_decay.",
    )
    channels_last: bool = _f(
        False, "Keep the UNets in channels-last memory format (often faster convolutions on recent GPUs)."
    )
    compile_unet: bool = _f(
        False,
        "torch.compile the trained UNet: slower first steps while it compiles, then faster steps on GPU "
        "(single process or DDP).",
    )
    # --- checkpoints, logging, validation ---
    checkpointing_steps: int = _f(500, "Save a resumable checkpoint-N every N optimizer steps.")
    checkpoints_total_limit: int | None = _f(None, "Keep at most this many checkpoint-N folders.")
    resume_from_checkpoint: str | None = _f(None, "A checkpoint-N folder, or `latest` in output_dir.")
    report_to: str = _f("none", "Trackers for accelerate: none, tensorboard, wandb, all.")
    logging_dir: str = _f("logs", "Tracker logs, relative to output_dir.")
    validation_steps: int = _f(
        500,
        "Every N steps: held-out implicit-reward accuracy (and images, and --validation_scorer's win rate).",
    )
    validation_dataset_name: str | None = _f(
        None, "Held-out pairs for implicit-reward accuracy (default: none; same formats as dataset_name)."
    )
    validation_split: str = _f("train", "Split of the validation dataset.")
    num_validation_pairs: int = _f(64, "How many held-out pairs to score.")
    validation_timesteps: list[int] = _f(
        (100, 300, 500, 700, 900), "Fixed timesteps averaged by the implicit-reward accuracy."
    )
    validation_prompts: list[str] = _f((), "Prompts to sample at validation and after training.")
    num_inference_steps: int = _f(
        25, "Sampling steps for validation images; recorded in the output, eval/evaluate.py's default."
    )
    validation_scorer: str | None = _f(
        None,
        "Every --validation_steps, sample held-out prompts with the policy and the reference (same seeds) and "
        "log their win rate under this scorer (eval/evaluate.py's names: shapes, pickscore, hpsv2.1=PATH, "
        "...) with a 95% interval (docs/monitors.md). Prompts: --validation_prompts, else the captions of "
        "--validation_dataset_name's pairs. Default: off (it costs sampling time).",
    )
    num_validation_images: int = _f(
        4, "--validation_scorer: images per prompt (seeds seed..seed+N-1, the same for both models)."
    )
    # --- output and the Hub ---
    overwrite_output_dir: bool = _f(
        False,
        "Train again when output_dir already holds this same run, finished (by default it is reused: its "
        "summary is shown and nothing is retrained).",
    )
    push_to_hub: bool = _f(
        False, "Upload the trained model, its model card and samples to the Hugging Face Hub at the end."
    )
    hub_model_id: str | None = _f(
        None, "Hub repository to push to, owner/name or name (default: the output_dir's folder name)."
    )
    hub_token: str | None = _f(
        None, "Hub token (default: the one `hf auth login` saved); never written to any output."
    )
    # --- embedded default ---
    create_tiny_assets: bool = _f(
        False, "If the model/dataset paths do not exist, build the tiny SD model and synthetic dataset there."
    )

    # ---- derived values (never written back) ----
    @property
    def effective_objective(self) -> str:
        return "sft" if self.sft else self.objective

    @property
    def effective_keep_ties(self) -> bool:
        """Soft labels keep ties at p = 0.5 (they say "no preference", which the expected loss uses)."""
        return self.keep_ties or self.label_mode == "soft"

    @property
    def beta_range(self) -> tuple[float, float]:
        """--auto_beta's bounds: the flags, or a factor 10 either side of --beta_dpo."""
        low = self.beta_dpo / 10 if self.auto_beta_min is None else self.auto_beta_min
        high = self.beta_dpo * 10 if self.auto_beta_max is None else self.auto_beta_max
        return low, high

    def __post_init__(self):
        if self.mixed_precision is None:
            # as diffusers' training scripts and accelerate itself resolve it: `accelerate launch
            # --mixed_precision bf16` (or its config file) sets ACCELERATE_MIXED_PRECISION for the run
            self.mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
            if self.mixed_precision not in ("no", "fp16", "bf16"):
                raise ValueError(
                    f"accelerate's mixed precision is {self.mixed_precision!r} (ACCELERATE_MIXED_PRECISION), "
                    "which this trainer does not run; pass --mixed_precision no, fp16 or bf16"
                )

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending flag."""
        if not self.pretrained_model_name_or_path:
            raise ValueError(
                "--pretrained_model_name_or_path is required (a hub id or a local diffusers folder)"
            )
        if not self.dataset_name and not self.latents_cache:
            raise ValueError(
                "--dataset_name is required (a hub id, a parquet file/folder, or a JSONL/CSV), or "
                "--latents_cache (a folder made by data/precompute_latents.py)"
            )
        from diffusion_dpo.data.removed import check_not_removed

        # before any model loads: a removed hub id fails in one line, not in the hub client minutes later
        check_not_removed(self.dataset_name, flag="--dataset_name")
        check_not_removed(self.validation_dataset_name, flag="--validation_dataset_name")
        if self.latents_cache and self.random_crop:
            raise ValueError(
                "--random_crop cannot be used with --latents_cache: the cache holds center crops (each crop "
                "position would need its own encoding); drop --random_crop, or train from the images"
            )
        if self.latents_cache and self.effective_objective == "kto":
            raise ValueError(
                "--latents_cache holds preference pairs, and --objective kto trains on unpaired images; "
                "train KTO from --dataset_name"
            )
        if self.label_mode == "soft" and self.effective_objective != "dpo":
            raise ValueError(
                f"--label_mode soft weights the pairwise DPO losses; --objective {self.effective_objective} has "
                "no such loss (drop --label_mode soft)"
            )
        if self.label_mode == "soft" and self.latents_cache:
            raise ValueError(
                "--label_mode soft needs each pair's vote share, which a --latents_cache does not hold; train "
                "from --dataset_name"
            )
        if not 0.0 <= self.min_label_margin <= 1.0:
            raise ValueError(f"--min_label_margin must be in [0, 1], got {self.min_label_margin}")
        if self.sft and self.objective not in ("dpo", "sft"):
            raise ValueError(f"--sft contradicts --objective {self.objective}")
        if self.effective_objective == "dpo":
            try:
                check_pairwise_args(self.loss_type, self.beta_dpo, self.label_smoothing)
            except ValueError as err:
                raise ValueError(f"--loss_type/--beta_dpo/--label_smoothing: {err}") from None
        if self.effective_objective == "mapo":
            try:
                check_mapo_args(self.beta_mapo, self.snr_value)
            except ValueError as err:
                raise ValueError(f"--{err}") from None
        if self.effective_objective in ("sft", "mapo") and self.validation_dataset_name and not self.use_lora:
            raise ValueError(
                "--validation_dataset_name scores the implicit reward against a reference model, and a "
                f"full --objective {self.effective_objective} fine-tune has none; drop it or train LoRA "
                "(--use_lora), whose reference is the base under the adapters"
            )
        if (self.winner_safeguard or self.auto_beta) and self.effective_objective != "dpo":
            raise ValueError(
                "--winner_safeguard and --auto_beta act on the pairwise losses of --objective dpo, not on "
                f"--objective {self.effective_objective}"
            )
        if not 0.0 <= self.winner_safeguard_mu <= 1.0:
            raise ValueError(f"--winner_safeguard_mu must be in [0, 1], got {self.winner_safeguard_mu}")
        if not 0.0 < self.auto_beta_target < 0.5:
            raise ValueError(
                f"--auto_beta_target must be in (0, 0.5) (σ(−β|δ|) < 0.5 for β|δ| > 0), got {self.auto_beta_target}"
            )
        if not 0.0 <= self.auto_beta_decay < 1.0:
            raise ValueError(f"--auto_beta_decay must be in [0, 1), got {self.auto_beta_decay}")
        if self.auto_beta and not 0 < self.beta_range[0] <= self.beta_dpo <= self.beta_range[1]:
            raise ValueError(
                f"--auto_beta_min {self.beta_range[0]} <= --beta_dpo {self.beta_dpo} <= --auto_beta_max "
                f"{self.beta_range[1]} must hold, with the minimum > 0"
            )
        if self.validation_scorer is not None:
            self._check_validation_scorer()
        if self.stop_on_degradation < 0:
            raise ValueError(f"--stop_on_degradation must be >= 0 (0: off), got {self.stop_on_degradation}")
        positive = (
            "resolution",
            "train_batch_size",
            "gradient_accumulation_steps",
            "max_train_steps",
            "rank",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.proportion_empty_prompts <= 1.0:
            raise ValueError(
                f"--proportion_empty_prompts must be in [0, 1], got {self.proportion_empty_prompts}"
            )
        if self.checkpointing_steps <= 0 or self.validation_steps <= 0:
            raise ValueError("--checkpointing_steps and --validation_steps must be > 0")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"--checkpoints_total_limit must be >= 1, got {self.checkpoints_total_limit}")
        if self.shuffle_buffer_size < 1 or self.max_nonfinite_steps < 1:
            raise ValueError("--shuffle_buffer_size and --max_nonfinite_steps must be >= 1")
        if not 0.0 <= self.max_bad_row_fraction <= 1.0:
            raise ValueError(f"--max_bad_row_fraction must be in [0, 1], got {self.max_bad_row_fraction}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"--max_train_samples must be >= 1, got {self.max_train_samples}")
        if self.use_8bit_adam and self.adam_implementation != "auto":
            raise ValueError(
                f"--use_8bit_adam brings its own kernels; drop --adam_implementation {self.adam_implementation}"
            )
        if self.use_adafactor and (self.use_8bit_adam or self.adam_implementation != "auto"):
            raise ValueError(
                "--use_adafactor replaces AdamW: drop --use_8bit_adam and --adam_implementation, which choose "
                "AdamW's kernels"
            )
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise ValueError(f"--max_sequence_length must be >= 1, got {self.max_sequence_length}")
        for name in (
            "mixed_precision", "objective", "loss_type", "on_bad_example", "adam_implementation",
            "weighting_scheme", "flow_error_weighting", "dataset_format", "label_mode",
        ):  # fmt: skip
            choices = next(f for f in dataclasses.fields(self) if f.name == name).metadata["choices"]
            if getattr(self, name) not in choices:
                raise ValueError(f"--{name} must be one of {list(choices)}, got {getattr(self, name)!r}")

    def _check_validation_scorer(self) -> None:
        from diffusion_dpo.scorers import SCORERS, parse_spec

        try:
            name = parse_spec(self.validation_scorer)[0]
        except ValueError as err:
            raise ValueError(f"--validation_scorer: {err}") from None
        if name not in SCORERS:
            raise ValueError(
                f"--validation_scorer {self.validation_scorer!r}: unknown scorer {name!r}; available: "
                f"{', '.join(SCORERS)}"
            )
        if not self.validation_prompts and not self.validation_dataset_name:
            raise ValueError(
                "--validation_scorer samples held-out prompts: give --validation_prompts, or "
                "--validation_dataset_name (its pairs' captions are used)"
            )
        if self.effective_objective in ("sft", "mapo") and not self.use_lora:
            raise ValueError(
                "--validation_scorer compares samples with the reference model's, and a full --objective "
                f"{self.effective_objective} fine-tune has none; drop it or train LoRA (--use_lora)"
            )
        if self.num_validation_images < 1:
            raise ValueError(f"--num_validation_images must be >= 1, got {self.num_validation_images}")

    def family_options(self) -> dict:
        """What the model family is built with (:func:`diffusion_dpo.models.families.family_for_index`)."""
        return dict(
            drop_t5=self.drop_t5, max_sequence_length=self.max_sequence_length,
            guidance_scale=self.guidance_scale,
            **({"resolution_shift": self.resolution} if self.resolution_shift else {}),
            weighting_scheme=self.weighting_scheme, logit_mean=self.logit_mean, logit_std=self.logit_std,
            mode_scale=self.mode_scale, error_weighting=self.flow_error_weighting,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """Every option but the Hub token, which must not reach training_config.yaml (uploaded with the
        model) or a tracker's config."""
        return {
            f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in SECRET
        }


#: options never written out (to_dict)
SECRET = ("hub_token",)


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _base_type(annotation):
    """``int | None`` → (int, optional); ``list[int]`` → (list, int)."""
    hint = typing.get_type_hints(TrainConfig)[annotation] if isinstance(annotation, str) else annotation
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)][0]
        return _base_type(inner)
    if typing.get_origin(hint) is list:
        return list, args[0]
    return hint, None


def _str2bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _metavar(name: str, kind) -> str:
    if kind is int:
        return "N"
    if kind is float:
        return "X"
    return (
        "PATH"
        if name.endswith(("_dir", "_path", "_name", "cache")) or name == "resume_from_checkpoint"
        else "TEXT"
    )


def build_parser(full_help: bool = False) -> argparse.ArgumentParser:
    """The command line: one flag per field, in :data:`cli_help.GROUPS`; ``--help`` shows each flag's
    one-line help and default, ``--help_all`` (``full_help``) each field's whole description."""
    parser = cli_help.Parser(
        prog="train_sd.py",
        usage="python train_sd.py [--config FILE] [--FLAG VALUE ...]",
        description=cli_help.description(),
        epilog=cli_help.EPILOG,
        formatter_class=cli_help.Formatter,
    )
    parser.add_argument(
        "--config", type=str, default=None, metavar="FILE", help="YAML file in configs/; flags override it."
    )
    parser.add_argument(
        "--help_all", action=cli_help.HelpAll, build=build_parser, help="Every flag's full description."
    )
    hints = typing.get_type_hints(TrainConfig)
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    grouped = {name for _, names in cli_help.GROUPS for name in names}
    ungrouped = tuple(name for name in fields if name not in grouped)  # never a field without its flag
    for title, names in (*cli_help.GROUPS, (cli_help.OTHER, ungrouped)):
        if not names:
            continue
        group = parser.add_argument_group(title)
        for name in names:
            f = fields[name]
            kind, inner = _base_type(hints[f.name])
            text = f.metadata["help"] if full_help else cli_help.one_line(f.name, f.metadata["help"])
            default = cli_help.default_text(f.default)
            if default is not None:
                text += f" [default: {default}]"
            # argparse %-formats help strings: a literal % must be doubled
            kw: dict = {"help": text.replace("%", "%%"), "default": argparse.SUPPRESS}
            if kind is bool:
                # `--flag` sets True; `--flag false` is accepted too, so YAML values can be overridden.
                kw.update(nargs="?", const=True, type=_str2bool, metavar="BOOL")
            elif kind is list:
                kw.update(nargs="*", type=inner, metavar=_metavar(f.name, inner))
            else:
                kw.update(type=kind, metavar=_metavar(f.name, kind))
            if "choices" in f.metadata:
                kw["choices"] = f.metadata["choices"]
                kw["metavar"] = "{" + ",".join(map(str, f.metadata["choices"])) + "}"
            group.add_argument(f"--{f.name}", **kw)
    return parser


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        hints = [f"{key} -> {close}" for key in unknown if (close := cli_help.suggestion(key, known))]
        hint = f" (did you mean: {', '.join(hints)}?)" if hints else ""
        raise ValueError(
            f"{path}: unknown keys {unknown}{hint}; see `python train_sd.py --help` for the options"
        )
    return data


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults < ``--config`` YAML < command-line flags; validated."""
    args = vars(build_parser().parse_args(argv))
    values = load_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update(args)
    hints = typing.get_type_hints(TrainConfig)
    for name, value in values.items():
        if _base_type(hints[name])[0] is list and value is not None:
            values[name] = tuple(value)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg
