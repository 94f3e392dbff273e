"""Shared fixtures: tiny SD-shaped pipelines saved to disk once per test session."""

import logging

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


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    reset_accelerate()
