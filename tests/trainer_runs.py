"""Helpers for tests that run the trainer in this process."""

from accelerate.state import AcceleratorState, GradientState, PartialState


def reset_accelerate() -> None:
    """accelerate keeps process-wide singletons: each in-process run must start from scratch."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


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
