"""train_sd.py's --help a person scans (groups, one line per flag with its default, every supported
family named), and "did you mean" for a mistyped flag or YAML key."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffusion_dpo.models.families import FAMILIES
from diffusion_dpo.training import cli_help
from diffusion_dpo.training.config import TrainConfig, build_parser, parse_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_option_is_in_exactly_one_group_with_a_short_help():
    grouped = [name for _, names in cli_help.GROUPS for name in names]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(grouped) == sorted(fields), set(grouped) ^ set(fields)
    assert len(grouped) == len(set(grouped))
    for f in dataclasses.fields(TrainConfig):
        text = cli_help.one_line(f.name, f.metadata["help"])
        assert len(text) <= cli_help.ONE_LINE and text.endswith((".", "...")), (f.name, text)
    assert not set(cli_help.SHORT_HELP) - set(fields)  # no help for an option that is gone


def test_help_shows_the_groups_in_order_with_defaults():
    env = {"COLUMNS": "120", "PATH": "/usr/bin:/bin"}
    text = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), "--help"], capture_output=True, text=True, check=True,
        env={**__import__("os").environ, **env},
    ).stdout  # fmt: skip
    titles = re.findall(r"^(\S[^:\n]*):$", text, flags=re.M)
    assert titles == ["options", *[title for title, _ in cli_help.GROUPS], "examples"]
    assert [t for t, _ in cli_help.GROUPS] == [
        "model", "data", "objective", "optimisation", "speed and memory", "runs and checkpoints",
        "validation", "output, logging and the Hub",
    ]  # fmt: skip
    assert text.startswith("usage: python train_sd.py [--config FILE] [--FLAG VALUE ...]\n\nPreference")
    # one line per flag: its help beside it, with its default
    assert re.search(r"^  --rank N +LoRA rank\. \[default: 8\]$", text, flags=re.M)
    assert re.search(r"^  --learning_rate X +Learning rate .*\[default: 1e-08\]$", text, flags=re.M)
    flag_lines = [line for line in text.splitlines() if line.startswith("  --")]
    assert len(flag_lines) == len(dataclasses.fields(TrainConfig)) + 2  # + --config, --help_all
    # the description is written from the family registry: every family is named
    description = " ".join(text.split("\n\n")[1].split())
    for family in FAMILIES:
        assert cli_help.FAMILY_NAMES.get(family.name, family.label) in description
    assert "Stable Diffusion 1.x/2.x, SDXL and SD3/SD3.5" in description


def test_help_all_has_the_whole_descriptions(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--help_all"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the same rows every epoch" in text  # the rest of --max_train_samples's description


def test_did_you_mean_for_a_flag(capsys):
    with pytest.raises(SystemExit) as info:
        parse_config(["--pretrained_model_name_or_path", "m", "--lerning_rate", "1e-4"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "unrecognized arguments: --lerning_rate 1e-4; --lerning_rate (did you mean --learning_rate?)" in err
    )
    with pytest.raises(SystemExit):
        parse_config(["--beta_dop=100"])
    assert "--beta_dop (did you mean --beta_dpo?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_config(["--zzzz", "1"])
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess


def test_did_you_mean_for_a_yaml_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrained_model_name_or_path: x\ndataset_name: y\nbeta: 3\nlearning_rat: 1.0\nqqq: 1\n")
    with pytest.raises(ValueError) as info:
        parse_config(["--config", str(bad)])
    message = str(info.value)
    assert "unknown keys ['beta', 'learning_rat', 'qqq']" in message
    assert "(did you mean: beta -> beta_dpo, learning_rat -> learning_rate?)" in message
