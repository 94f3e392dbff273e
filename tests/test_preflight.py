"""A run checks every path and hub id before it builds or loads anything, writes nothing on a failed
start, and the embedded default's builder writes only inside ./outputs/."""

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_runs import tiny_run_flags

from diffusion_dpo.synthetic.base import ensure_tiny_assets
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.preflight import is_embedded_asset_path, source_problems

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny.yaml")


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _train_sd():
    spec = importlib.util.spec_from_file_location("train_sd_under_test", ROOT / "train_sd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_dataset_with_the_tiny_config_is_named_and_nothing_is_created(tmp_path):
    """The issue's case: `--dataset_name /nonexistent/path` with the tiny config created that path (a
    synthetic parquet). Now: an error naming it, exit 1, no file or folder anywhere, in seconds."""
    cwd, missing = tmp_path / "cwd", tmp_path / "nonexistent" / "path"
    cwd.mkdir()
    started = time.time()
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), "--config", TINY, "--dataset_name", str(missing)],
        cwd=cwd, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    elapsed = time.time() - started
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"--dataset_name {missing}: does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "nonexistent").exists()  # neither the path nor its parent
    assert _tree(cwd) == []  # no outputs/tiny/base_model, no outputs/tiny/dpo, nothing
    assert _tree(tmp_path) == ["cwd"]
    # the base build alone takes over a minute; a failed check returns after the imports
    assert elapsed < 60, elapsed


def test_missing_dataset_is_refused_before_any_model_is_built_or_loaded(tmp_path, monkeypatch):
    """In this process, with every way to load or build a model made to fail loudly: the check
    comes first."""
    import diffusers
    import transformers

    from diffusion_dpo.synthetic import base as tiny_assets

    loaded = []

    def refuse(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("a model was loaded")

    for cls in (diffusers.ModelMixin, diffusers.DiffusionPipeline, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(tiny_assets, "build_tiny_base", refuse)
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "elsewhere" / "pairs.parquet"
    with pytest.raises(FileNotFoundError, match=f"--dataset_name {missing}: does not exist"):
        _train_sd().main(["--config", TINY, "--dataset_name", str(missing)])
    assert loaded == [] and _tree(tmp_path) == []


def test_hub_ids_that_cannot_be_resolved_offline_are_one_line_each(tmp_path):
    """Offline (no network in tests): a hub model, VAE and dataset that are not in the local cache,
    and a missing local file, all named in one error before anything is loaded or written."""
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), "--pretrained_model_name_or_path", "nobody/no-such-model",
         "--vae_model_name_or_path", "nobody/no-such-vae", "--dataset_name", "nobody/no-such-data",
         "--validation_dataset_name", "./missing.parquet", "--output_dir", str(out)],
        cwd=tmp_path, capture_output=True, text=True, env=_env(HF_HUB_OFFLINE="1"),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0] == "error: 4 inputs cannot be read (nothing was loaded or written):", lines
    for i, name in enumerate(
        [
            "--pretrained_model_name_or_path nobody/no-such-model:",
            "--vae_model_name_or_path nobody/no-such-vae:",
            "--dataset_name nobody/no-such-data:",
            "--validation_dataset_name ./missing.parquet: does not exist",
        ]
    ):
        assert lines[1 + i].strip().startswith(name), lines
    assert len(lines) == 5 and "Traceback" not in result.stderr
    assert not out.exists()


def test_local_sources_are_checked_for_what_the_loaders_read(tmp_path, tiny_sd_path):
    data = tmp_path / "pairs.txt"
    data.write_text("x")
    (tmp_path / "empty").mkdir()
    cfg = parse_config(
        tiny_run_flags(tmp_path / "empty", data, tmp_path / "o", validation_dataset_name=tmp_path / "empty")
        + ["--latents_cache", str(tmp_path / "nocache"), "--resume_from_checkpoint", str(tmp_path)]
    )
    problems = source_problems(cfg)
    assert [p.split(":")[0] for p in problems] == [
        f"--pretrained_model_name_or_path {tmp_path / 'empty'}",
        f"--validation_dataset_name {tmp_path / 'empty'}",
        f"--latents_cache {tmp_path / 'nocache'}",
        f"--resume_from_checkpoint {tmp_path}",
    ]  # --dataset_name is not read when training from a latent cache
    assert "no model_index.json" in problems[0]
    cfg = parse_config(tiny_run_flags(tiny_sd_path, data, tmp_path / "o"))
    assert source_problems(cfg) == [f"--dataset_name {data}: unsupported file type '.txt' (expected one "
                                    "of ['.parquet', '.jsonl', '.json', '.csv'])"]  # fmt: skip


def test_the_tiny_asset_builder_builds_only_inside_outputs(tmp_path, monkeypatch):
    assert is_embedded_asset_path("outputs/tiny/pairs_train.parquet", "dataset")
    assert is_embedded_asset_path("./outputs/tiny/base_model", "model")
    for path in ("/nonexistent/path", "/tmp/outputs/x.parquet", "outputs/../x.parquet", "data/x.parquet",
                 "~/outputs/x.parquet", "outputs/tiny/pairs.jsonl", "outputs"):  # fmt: skip
        assert not is_embedded_asset_path(path, "dataset"), path
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(["--config", TINY, "--dataset_name", str(tmp_path / "mine.parquet")])
    assert source_problems(cfg, build_missing=True) == [
        f"--dataset_name {tmp_path / 'mine.parquet'}: does not exist (no such file or folder); "
        "create_tiny_assets builds missing paths only inside ./outputs/ (the embedded default's)"
    ]
    with pytest.raises(FileNotFoundError, match="builds only inside ./outputs/"):
        ensure_tiny_assets(cfg)  # the builder's own guard, under the preflight check
    assert _tree(tmp_path) == []
    # the shipped config's own paths are buildable: nothing to complain about before they exist
    assert source_problems(parse_config(["--config", TINY]), build_missing=True) == []


def test_a_failed_start_leaves_no_empty_output_folder(tmp_path, tiny_sd_path, monkeypatch):
    """The sources exist but the model cannot be loaded (its UNet weights are gone): the run fails
    after the output folder was made, and removes it (and the parent it made) again."""
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_path, model)
    for weights in (model / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    data = tmp_path / "pairs.parquet"
    from diffusion_dpo import synthetic

    synthetic.write_pair_dataset(data, 8, seed=0)
    out = tmp_path / "runs" / "first"
    with pytest.raises(OSError):
        _train_sd().main(tiny_run_flags(model, data, out))
    assert not (tmp_path / "runs").exists()
