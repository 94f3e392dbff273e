"""Helpers for tests that run the trainer in this process."""

from diffusion_dpo.training.distributed import reset_accelerate_state as reset_accelerate  # noqa: F401


def flags(values: dict) -> list[str]:
    """``{"use_lora": True, "validation_timesteps": (1, 2)}`` → ``["--use_lora", "true",
    "--validation_timesteps", "1", "2"]``, as ``train_sd.py`` parses them."""
    argv = []
    for key, value in values.items():
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, list | tuple):
            argv += [f"--{key}", *map(str, value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def tiny_run_flags(model, data, out, **overrides) -> list[str]:
    """Flags of a short in-process run on a tiny model (3 steps of 4 pairs at 32 px, lr 1e-3, no weight
    decay so that "every weight changed" comes from gradients), ``overrides`` on top."""
    values = dict(
        pretrained_model_name_or_path=model, dataset_name=data, output_dir=out, resolution=32,
        train_batch_size=4, max_train_steps=3, learning_rate=1e-3, lr_warmup_steps=0,
        adam_weight_decay=0.0, checkpointing_steps=100, seed=0,
    )  # fmt: skip
    return flags({**values, **overrides})


def load_synthetic_experiment(monkeypatch):
    """``data/synthetic_experiment.py`` imported as a module (it is a script, not part of the package)."""
    import importlib.util
    import sys
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "synthetic_experiment", Path(__file__).resolve().parents[1] / "data/synthetic_experiment.py"
    )
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
