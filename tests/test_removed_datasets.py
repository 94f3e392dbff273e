"""No shipped recipe or example command names a dataset that is gone; a gone id fails in one line."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from trainer_runs import tiny_run_flags

from diffusion_dpo.data.pairs import load_pair_dataset
from diffusion_dpo.data.removed import REMOVED_DATASETS, RemovedDatasetError, removed_reason
from diffusion_dpo.training.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
REMOVED = re.compile("|".join(re.escape(name) for name in REMOVED_DATASETS), re.IGNORECASE)
#: A line may name a removed id to say that it is gone (and what replaces it), never to use it.
SAYS_GONE = re.compile(r"removed|is gone|were taken down", re.IGNORECASE)
DATASET_KEYS = ("dataset_name", "validation_dataset_name")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_config_names_a_removed_dataset(path):
    values = yaml.safe_load(path.read_text()) or {}
    for key in DATASET_KEYS:
        assert removed_reason(values.get(key)) is None, f"{path.name}: {key} {values[key]} is gone"
    # and the recipe loads (its config check would refuse a removed id)
    parse_config(["--config", str(path)])


def _example_files():
    yield ROOT / "README.md"
    yield from sorted((ROOT / "docs").rglob("*.md"))
    for folder in ("data", "eval", "examples"):
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield ROOT / "train_sd.py"
    yield from sorted((ROOT / "diffusion_dpo").rglob("*.py"))


def test_no_example_command_names_a_removed_dataset():
    """README and docs commands, script help texts and docstrings: every use of a removed id is gone."""
    found = []
    for path in _example_files():
        if path.name == "removed.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if REMOVED.search(line) and not SAYS_GONE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "removed dataset ids in use:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "name", ["yuvalkirstain/pickapic_v2", "yuvalkirstain/pickapic_v1", "datasets/YuvalKirstain/PickaPic_V2"]
)
def test_a_removed_id_fails_in_one_line_naming_alternatives(name):
    with pytest.raises(RemovedDatasetError) as err:
        parse_config(tiny_run_flags("some/model", name, "out"))
    message = str(err.value)
    assert "\n" not in message and message.startswith("--dataset_name:")
    assert "is gone" in message and "liuhuohuo2/pick-a-pic-v2" in message and "docs/data.md" in message
    # the loader says the same (every script goes through it), without asking the hub
    with pytest.raises(RemovedDatasetError, match="is gone"):
        load_pair_dataset(name)
    assert removed_reason("liuhuohuo2/pick-a-pic-v2") is None


def test_the_trainer_refuses_a_removed_id_before_loading_a_model(tmp_path):
    # the base model path does not exist: the dataset check must come first, and say it in one line
    argv = tiny_run_flags(tmp_path / "no_model", "yuvalkirstain/pickapic_v2", tmp_path / "out")
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), *argv], capture_output=True, text=True
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "pickapic_v2' is gone" in lines[0], result.stderr


def test_a_local_copy_saved_under_a_removed_name_still_loads(tmp_path, monkeypatch):
    from diffusion_dpo import synthetic

    monkeypatch.chdir(tmp_path)
    synthetic.write_pair_dataset(
        Path("yuvalkirstain/pickapic_v2") / "train-00000.parquet", 4, seed=0, tie_fraction=0.0
    )
    assert removed_reason("yuvalkirstain/pickapic_v2") is None
    assert len(load_pair_dataset("yuvalkirstain/pickapic_v2")) == 4
    parse_config(tiny_run_flags("some/model", "yuvalkirstain/pickapic_v2", "out"))
