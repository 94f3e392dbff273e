"""Shared fixtures: tiny SD-shaped pipelines saved to disk once per test session."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_runs import reset_accelerate

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
logging.getLogger("diffusers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory):
    from diffusion_dpo.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), sdxl=False, seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory):
    from diffusion_dpo.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), sdxl=True, seed=0)


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory):
    from diffusion_dpo.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3"), arch="sd3", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory):
    from diffusion_dpo.models.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_flux"), arch="flux", seed=0)


@pytest.fixture(scope="session")
def embedded_default_run(tmp_path_factory):
    """The README's first command, exactly as a new user runs it, from a fresh directory: it builds the
    tiny base model and the data, then trains (about 5 minutes of CPU time on one core). Returns the
    directory it ran in and the finished process; tests that need the built assets copy them."""
    root = Path(__file__).resolve().parents[1]
    cwd = tmp_path_factory.mktemp("embedded_default")
    result = subprocess.run(
        [sys.executable, str(root / "train_sd.py"), "--config", str(root / "configs/tiny.yaml")],
        cwd=cwd, capture_output=True, text=True,
    )  # fmt: skip
    return cwd, result


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models gain nothing from a second, and on a machine whose
    2 cores are shared with other jobs, OpenMP threads waiting for each other make runs ~10x slower.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()
