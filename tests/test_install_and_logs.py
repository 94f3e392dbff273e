"""A first run's output holds what a user should read: each model part is loaded in the dtype it runs
in (casting after loading made diffusers warn "should be kept in float32" at every load), and the
loads and saves a run makes for itself show no progress bars."""

import json
import logging
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusion_dpo.models.pretrained import quiet_loading
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.models import setup_models
from diffusion_dpo.training.saving import load_trained_pipeline

ROOT = Path(__file__).resolve().parents[1]
CAST_WARNING = "should be kept in float32"


def _dtypes(module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


@contextmanager
def _library_warnings():
    """The warnings diffusers and transformers log (to their own handlers, which pytest does not see)."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Collect(level=logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)  # conftest silences diffusers below ERROR
        lg.addHandler(handler)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)


def test_first_run_prints_no_cast_warnings_or_internal_progress_bars(tmp_path, embedded_default_run):
    """The README's first command in bf16, shortened, on the tiny base and data it built: set-up,
    validation sampling, the final save and the final samples. stderr keeps the training bar and our
    log lines."""
    built = embedded_default_run[0] / "outputs/tiny"
    (tmp_path / "outputs/tiny").mkdir(parents=True)
    shutil.copytree(built / "base_model", tmp_path / "outputs/tiny/base_model")
    for data in ("pairs_train.parquet", "pairs_heldout.parquet"):
        shutil.copy(built / data, tmp_path / "outputs/tiny" / data)
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), "--config", str(ROOT / "configs/tiny.yaml"),
         "--max_train_steps", "2", "--validation_steps", "2", "--checkpointing_steps", "2",
         "--num_validation_pairs", "8", "--num_inference_steps", "2", "--mixed_precision", "bf16"],
        cwd=tmp_path, capture_output=True, text=True,
    )  # fmt: skip
    err = result.stderr
    assert result.returncode == 0, err[-3000:]
    assert CAST_WARNING not in err, err
    assert "`torch_dtype` is deprecated" not in err, err
    # pipeline and weight loads and saves inside the run ("Generating train split" still comes from
    # datasets' first read of a file)
    assert "Loading pipeline components" not in err and "Loading weights" not in err, err
    assert "Writing model shards" not in err, err
    assert "accelerate.checkpointing" not in err, err  # one line of ours per checkpoint, not four
    assert "steps: 100%" in err  # the training progress bar
    for line in ("UNet in float32, text encoder in bfloat16, VAE in bfloat16", "training dpo (full)",
                 "wrote 3 validation images", "saved the full result"):  # fmt: skip
        assert line in err, err
    assert json.loads((tmp_path / "outputs/tiny/dpo/summary.json").read_text())["global_step"] == 2

    out = tmp_path / "outputs/tiny/dpo"
    for part in ("unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"):
        with safe_open(out / f"{part}.safetensors", "pt") as f:  # the saved pipeline is fp32
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}, part
    assert len(list((out / "samples").glob("*.png"))) == 3


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_bf16_parts_are_loaded_in_the_dtype_they_run_in(tiny_sd_path, tiny_sdxl_path, sdxl, use_lora):
    """bf16: text encoders and the reference UNet in bf16; the fully trained UNet in fp32; LoRA's frozen
    base in bf16 with fp32 adapters; the VAE in bf16, except SDXL's own VAE (fp32). No cast warning."""
    argv = [
        "--pretrained_model_name_or_path", str(tiny_sdxl_path if sdxl else tiny_sd_path),
        "--dataset_name", "unused.parquet", "--output_dir", "unused", "--mixed_precision", "bf16",
        "--use_lora", str(use_lora).lower(), "--rank", "4",
    ]  # fmt: skip
    with _library_warnings() as warnings:
        models = setup_models(parse_config(argv), "cpu")
    assert not warnings, [r.getMessage() for r in warnings]
    bf16, fp32 = torch.bfloat16, torch.float32
    comps = models.components
    assert all(_dtypes(encoder) == {bf16} for encoder in comps.text_encoders)
    assert _dtypes(comps.vae) == ({fp32} if sdxl else {bf16})
    trained = {p.dtype for p in models.unet.parameters() if p.requires_grad}
    frozen = {p.dtype for p in models.unet.parameters() if not p.requires_grad}
    if use_lora:
        assert (trained, frozen, models.ref_unet) == ({fp32}, {bf16}, None)
    else:
        assert (trained, frozen, _dtypes(models.ref_unet)) == ({fp32}, set(), {bf16})


def test_sdxl_final_samples_load_the_vae_in_fp32(tiny_sdxl_path):
    """SDXL's own VAE is loaded in fp32 (exactly the saved weights), not loaded in bf16 and cast up."""
    from diffusers import AutoencoderKL

    with _library_warnings() as warnings:
        pipe = load_trained_pipeline(tiny_sdxl_path, torch.bfloat16, vae_dtype=torch.float32)
    assert not [r for r in warnings if CAST_WARNING in r.getMessage()]
    assert _dtypes(pipe.unet) == _dtypes(pipe.text_encoder_2) == {torch.bfloat16}
    saved = AutoencoderKL.from_pretrained(tiny_sdxl_path, subfolder="vae").state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in pipe.vae.state_dict().items())


def test_quiet_loading_hides_library_bars_but_not_downloads():
    """diffusers' and transformers' bars off inside, hub download bars as they were (transformers'
    switch turns those off too); everything as before afterwards."""
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    def state():
        return (
            diffusers_logging.is_progress_bar_enabled(),
            transformers_logging.is_progress_bar_enabled(),
            are_progress_bars_disabled(),
        )

    before = state()
    with quiet_loading():
        assert state() == (False, False, before[2])
    assert state() == before
