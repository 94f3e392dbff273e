"""What the sharding engines (FSDP, DeepSpeed ZeRO) need beyond DDP, in one place.

Under DDP or a single process every function here is a no-op, so the loop reads the same for all
engines. The configs in ``configs/accelerate/`` launch each engine; their comments say when to use
which. Facts these functions rest on (accelerate 1.15, DeepSpeed 0.19, torch 2.14):

- accelerate selects FSDP only on GPUs: on a CPU-only machine an FSDP config silently runs DDP.
- Under ZeRO-3, accelerate registers its DeepSpeed config with transformers, whose ``from_pretrained``
  then partitions the frozen CLIP text encoders at load time, leaving them unusable outside an engine
  (accelerate#3170, diffusers#10743); diffusers models are never partitioned at load.
- DeepSpeed owns the optimizer step (``accelerator.backward`` runs it), clips at its own
  ``gradient_clipping`` and skips non-finite steps itself; it needs the micro-batch size when no data
  loader is prepared, and its model weights are bf16/fp16 (fp32 master weights live in its checkpoint).
- A frozen model cannot be prepared a second time (FSDP2 and ZeRO-2 refuse a model without optimizer;
  ZeRO-3 accepts it and then fails to save); it is sharded directly instead, as TRL does.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

import torch

from diffusion_dpo.training.config import TrainConfig

logger = logging.getLogger(__name__)


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons, so that the next run in this process (the tiny base
    build then DPO, the synthetic experiment's stages, the tests) starts from a fresh state."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def engine(accelerator) -> str:
    """``"fsdp"``, ``"deepspeed"``, ``"ddp"`` (any other multi-process data parallelism) or ``"single"``."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "fsdp"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return "deepspeed"
    return "ddp" if accelerator.num_processes > 1 else "single"


def _zero_stage(accelerator) -> int | None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


def params_sharded(accelerator) -> bool:
    """True when no process holds the whole trained UNet (FSDP, ZeRO-3): a forward must then run on
    every process, and a full state dict must be gathered."""
    return engine(accelerator) == "fsdp" or _zero_stage(accelerator) == 3


def check_launch(accelerator, cfg: TrainConfig) -> None:
    """Refuse launches that would run, but not as asked."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:  # each process would train alone on the same data
        raise ValueError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes}: without a "
            "GPU, multi-process runs need ACCELERATE_USE_CPU=1 (gloo backend), e.g. "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 train_sd.py ...`"
        )
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true")
    if wants_fsdp and engine(accelerator) != "fsdp":
        raise ValueError(
            "the accelerate config asks for FSDP, but accelerate set up "
            f"{accelerator.distributed_type}: FSDP runs on GPUs only (on CPU accelerate falls back to DDP)"
        )
    if engine(accelerator) == "fsdp":
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 1 and not plugin.use_orig_params:
            raise ValueError(
                "FSDP1 needs fsdp_use_orig_params: true here (the optimizer is built before prepare); "
                "or use fsdp_version: 2 as configs/accelerate/fsdp.yaml does"
            )
        if plugin.fsdp_version == 1 and cfg.use_lora and cfg.mixed_precision != "no":
            raise ValueError(
                "FSDP1 flattens each unit into one tensor of one dtype, so LoRA's fp32 adapters on a "
                f"{cfg.mixed_precision} base cannot be wrapped; use fsdp_version: 2 (configs/accelerate/fsdp.yaml)"
            )


@contextlib.contextmanager
def frozen_parts_loading(accelerator):
    """Load the models with transformers' ZeRO-3 hook off, so the frozen text encoders stay whole."""
    if _zero_stage(accelerator) != 3:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()  # as accelerate had set it


def configure_engine(accelerator, cfg: TrainConfig) -> None:
    """Before ``accelerator.prepare``: DeepSpeed's micro-batch size (it reads it from a prepared data
    loader, and ours is not prepared) and its clipping norm (accelerate's "auto" is 1.0, not ours)."""
    if engine(accelerator) != "deepspeed":
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = cfg.max_grad_norm


def prepare_reference(accelerator, ref_unet: torch.nn.Module | None):
    """After ``accelerator.prepare``: shard the frozen reference as the engine shards the trained UNet
    (FSDP: the same wrapping policy; ZeRO-3: an optimizer-less stage-3 engine). Elsewhere it stays a
    replica in the weight dtype (ZeRO-1/2 and DDP replicate the trained weights too)."""
    if ref_unet is None:
        return None
    training = ref_unet.training  # the mode models.setup_models chose for it
    if engine(accelerator) == "fsdp":
        plugin = accelerator.state.fsdp_plugin
        plugin.set_auto_wrap_policy(ref_unet)
        if plugin.fsdp_version == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            ref_unet = FullyShardedDataParallel(
                ref_unet, sharding_strategy=plugin.sharding_strategy or plugin.reshard_after_forward, cpu_offload=plugin.cpu_offload,
                auto_wrap_policy=plugin.auto_wrap_policy, mixed_precision=plugin.mixed_precision_policy,
                use_orig_params=plugin.use_orig_params, device_id=accelerator.device,
            )  # fmt: skip
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            kw = dict(
                reshard_after_forward=plugin.reshard_after_forward,
                mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy(),
            )
            policy = plugin.auto_wrap_policy
            # blocks first, then the root, as accelerate shards the trained model
            for name, module in reversed(list(ref_unet.named_modules())):
                if name and policy is not None and policy(module, recurse=False, nonwrapped_numel=0):
                    fully_shard(module, **kw)
            fully_shard(ref_unet, **kw)
        ref_unet.train(training)
        return ref_unet
    if _zero_stage(accelerator) == 3:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        ref_engine, *_ = deepspeed.initialize(model=ref_unet, config=config)
        ref_engine.train(training)  # DeepSpeedEngine.train/eval return None, not the engine
        return ref_engine
    return ref_unet


def process_group_kwargs() -> list:
    """gloo for multi-process runs without CUDA (DeepSpeed on CPU leaves the backend unset otherwise)."""
    if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def final_state_dict(accelerator, unet: torch.nn.Module, last_checkpoint: Path) -> dict | None:
    """The trained UNet's full fp32 state dict where the processes do not hold it whole, on the main
    process (None elsewhere, and None under DDP: take the unwrapped module as it is). Every process
    must call this.

    DeepSpeed's module weights are bf16/fp16 even under ZeRO-1/2, too coarse to hold a fine-tune's
    small updates: its fp32 master weights are read from the final checkpoint instead."""
    accelerator.wait_for_everyone()
    if engine(accelerator) == "deepspeed":
        if not accelerator.is_main_process:
            return None
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(last_checkpoint))
    if engine(accelerator) == "fsdp":
        state = accelerator.get_state_dict(unet)
        return state if accelerator.is_main_process else None
    return None
