"""tools/side_by_side.py's own machinery, without the reference scripts (no mirror, no network): the
runner's per-step timestamps on a stand-in script with known sleeps, the run-time patches and their
undoing, the shared parquet that ``datasets.load_dataset`` and our loader both read, the flags our
trainer gets, reading a script from a git repository, and the statistics and table on hand-made numbers.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "side_by_side.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("side_by_side", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["side_by_side"] = module
    spec.loader.exec_module(module)
    return module


sbs = _load_tool()

#: A stand-in training script: one optimizer step after each sleep given on its command line.
STAND_IN = textwrap.dedent(
    """
    import sys, time
    import torch

    sleeps, code = [float(s) for s in sys.argv[2:]], int(sys.argv[1])
    weights = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weights], lr=0.1)
    for seconds in sleeps:
        time.sleep(seconds)
        weights.grad = torch.ones(3)
        optimizer.step()
    sys.exit(code)
    """
)


@pytest.fixture
def stand_in(tmp_path) -> Path:
    path = tmp_path / "stand_in.py"
    path.write_text(STAND_IN)
    return path


def test_the_runner_recovers_the_gaps_between_optimizer_steps(stand_in, tmp_path):
    import torch

    sleeps = [0.12, 0.12, 0.03, 0.06, 0.03, 0.06, 0.03]  # two slow warm-up steps, then 0.03 / 0.06
    argv_before = list(sys.argv)
    record = sbs.run_script(stand_in, ["0", *map(str, sleeps)], tmp_path / "steps.json")
    assert record["exit_code"] == 0 and len(record["stamps"]) == len(sleeps)
    assert record["optimizers"][0]["class"] == "SGD"
    assert record["optimizers"][0]["trainable_parameters"] == 3
    gaps = sbs.step_gaps(record["stamps"], warmup=2)
    assert len(gaps) == 5
    for gap, slept in zip(gaps, sleeps[2:], strict=True):
        assert slept <= gap < slept + 0.03  # the sleep, plus one tiny SGD step and scheduling noise
    assert 0.03 <= sbs.run_median(record["stamps"], warmup=2, steps=5) < 0.06
    with pytest.raises(ValueError, match="fewer than the 2 warm-up"):
        sbs.run_median(record["stamps"], warmup=2, steps=6)
    # the hook and argv are undone: a later step of another optimizer is not recorded
    assert sys.argv == argv_before
    other = torch.nn.Parameter(torch.zeros(1))
    other.grad = torch.ones(1)
    torch.optim.SGD([other], lr=1.0).step()
    assert len(record["stamps"]) == len(sleeps)


def test_the_runner_command_writes_its_record_and_passes_the_exit_code_on(stand_in, tmp_path):
    out = tmp_path / "steps.json"
    cmd = [sys.executable, str(TOOL), "--_run", str(out), "--_threads", "1", "--_patches", ""]
    result = subprocess.run([*cmd, "--", str(stand_in), "3", "0.01", "0.01"], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    import json

    record = json.loads(out.read_text())
    assert record["exit_code"] == 3 and len(record["stamps"]) == 2
    assert record["optimizers"][0]["threads"] == 1 and record["patches"] == []


def test_step_statistics_and_the_table_on_hand_made_numbers():
    # steps 1 and 2 warm up; steps 3, 4 and 5 took 2, 3 and 4 s
    assert sbs.step_gaps([0.0, 1.0, 3.0, 6.0, 10.0], warmup=2) == [2.0, 3.0, 4.0]
    assert sbs.run_median([0.0, 1.0, 3.0, 6.0, 10.0], warmup=2, steps=2) == 2.5
    assert sbs.run_median([0.0, 1.0, 3.0, 6.0, 10.0], warmup=2, steps=3) == 3.0
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        sbs.step_gaps([0.0, 1.0], warmup=0)
    summary = sbs.summarize(
        {
            "paper": [0.10, 0.30, 0.20],
            "ours_full": [0.20, 0.10, 0.15],
            "diffusers": [0.40, 0.40, 0.50],
            "ours_lora": [0.50, 0.60, 0.45],
        }
    )
    assert summary["trainers"]["paper"]["median_s_per_step"] == pytest.approx(0.20)
    assert summary["trainers"]["ours_full"]["run_medians"] == [0.20, 0.10, 0.15]
    assert summary["ratios"] == {
        "ours_full/paper": pytest.approx(0.75),
        "ours_lora/diffusers": pytest.approx(1.25),
    }
    table = sbs.markdown_table(summary)
    assert (
        "| the paper's `train.py` (full fine-tune, frozen reference) | 0.2000 | 0.1000 0.3000 0.2000 |"
        in table
    )
    assert "ours_full / paper: **0.750** (-25.0%; 95% interval over rounds " in table
    assert "ours_lora / diffusers: **1.250** (+25.0%; 95% interval over rounds " in table
    for key, (low, high) in summary["ratio_intervals"].items():
        assert low <= summary["ratios"][key] <= high
    # a ratio needs both of its trainers; one round has no interval
    assert sbs.summarize({"paper": [0.1], "ours_lora": [0.2]})["ratios"] == {}
    one_round = sbs.summarize({"paper": [0.1], "ours_full": [0.2]})
    assert one_round["ratio_intervals"] == {}
    assert "ours_full / paper: **2.000** (+100.0%)" in sbs.markdown_table(one_round)


def test_ratio_interval_by_hand():
    # 2 rounds, ours 1 and 3 s, theirs 2 and 2 s: the 4 resamples of the rounds give the ratios
    # 1/2 (round 0 twice), 3/2 (round 1 twice) and 2/2 (one of each, twice): 0.5, 1, 1, 1.5
    assert sbs.ratio_interval([1.0, 3.0], [2.0, 2.0]) == (0.5, 1.5)
    assert sbs.ratio_interval([1.0, 3.0], [2.0, 2.0], level=0.5) == (0.5, 1.0)
    # rounds stay paired: ours 0.9x theirs in every round is 0.9 in every resample, however the
    # rounds vary (8 rounds: the seeded draws)
    theirs = [0.4, 0.9, 0.5, 0.6, 0.45, 0.8, 0.55, 0.7]
    low, high = sbs.ratio_interval([0.9 * t for t in theirs], theirs)
    assert low == pytest.approx(0.9) and high == pytest.approx(0.9)
    with pytest.raises(ValueError, match="same number"):
        sbs.ratio_interval([1.0, 2.0], [1.0])


def test_each_round_rotates_the_order():
    orders = sbs.round_orders(["a", "b", "c", "d"], 5)
    assert orders == [list("abcd"), list("bcda"), list("cdab"), list("dabc"), list("abcd")]
    for position in range(4):  # over 4 rounds each trainer runs once in each position
        assert {order[position] for order in orders[:4]} == set("abcd")


def test_the_shared_pairs_load_in_datasets_and_in_our_loader(tmp_path):
    import io

    import datasets
    from PIL import Image

    from diffusion_dpo.data.pairs import PairStats, load_pair_dataset

    work = sbs.Work(resolution=32, batch_size=2, warmup=1, steps=2)
    folder = sbs.write_pairs(work, tmp_path / "pairs")
    assert work.num_pairs == 12  # twice what the run reads
    theirs = datasets.load_dataset(str(folder), cache_dir=str(tmp_path / "cache"))["train"]
    assert len(theirs) == 12 and {"caption", "jpg_0", "jpg_1", "label_0"} <= set(theirs.column_names)
    row = theirs[0]
    assert isinstance(row["jpg_0"], bytes) and isinstance(row["caption"], str) and row["caption"]
    assert Image.open(io.BytesIO(row["jpg_1"])).size == (32, 32)
    assert set(theirs["label_0"]) <= {0.0, 1.0}  # decided pairs only
    stats = PairStats()
    ours = load_pair_dataset(folder, stats=stats, cache_dir=str(tmp_path / "cache"))
    assert stats.dataset_format == "pickapic" and len(ours) == 12


def test_our_trainer_gets_the_same_work(tmp_path):
    from diffusion_dpo.training.config import parse_config

    work = sbs.Work()
    scripts = {"paper": tmp_path / "paper.py", "diffusers": tmp_path / "diffusers.py"}
    commands = sbs.trainer_commands(work, tmp_path / "model", tmp_path / "pairs", scripts)
    assert list(commands) == list(sbs.TRAINERS)
    for name in ("ours_full", "ours_lora"):
        args = [a.replace("{OUT}", str(tmp_path / "out")) for a in commands[name]["args"]]
        cfg = parse_config(args)
        assert (cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.resolution) == (4, 1, 64)
        assert cfg.max_train_steps == 22 and cfg.beta_dpo == 5000.0 and cfg.mixed_precision == "no"
        assert cfg.checkpointing_steps > cfg.max_train_steps and cfg.validation_steps > cfg.max_train_steps
        assert cfg.use_lora == (name == "ours_lora") and (not cfg.use_lora or cfg.rank == 4)
    # diffusers' β is in half the paper's scale and an int
    assert "--beta_dpo=2500" in commands["diffusers"]["args"]
    assert "--beta_dpo=5000" in commands["paper"]["args"]
    with pytest.raises(ValueError, match="integer β"):
        sbs.trainer_commands(sbs.Work(beta_dpo=5001), tmp_path, tmp_path, scripts)


def test_a_reference_script_is_read_from_a_git_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args, cwd=repo):
        subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)

    git("init", "-q")
    (repo / "train.py").write_text("print('first')\n")
    git("add", "train.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    first = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    (repo / "train.py").write_text("print('second')\n")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "two")
    git("clone", "-q", "--bare", str(repo), str(tmp_path / "bare.git"), cwd=tmp_path)

    path, origin = sbs.script_from_git(repo, "train.py", first, tmp_path / "cache", "paper")
    assert path.read_text() == "print('first')\n" and origin["commit"] == first
    path, origin = sbs.script_from_git(tmp_path / "bare.git", "train.py", "HEAD", tmp_path / "cache", "paper")
    assert path.read_text() == "print('second')\n" and origin["commit"] != first
    with pytest.raises(ValueError, match="no_such.py"):
        sbs.script_from_git(repo, "no_such.py", "HEAD", tmp_path / "cache", "paper")


def test_the_patches_work_and_are_undone():
    import accelerate

    applied: list[str] = []
    with pytest.raises(ValueError):  # without the patch, accelerate refuses an unknown tracker
        accelerate.Accelerator(log_with="no_such_tracker", cpu=True)
    with sbs.PATCHES["no_trackers"](applied):
        assert accelerate.Accelerator(log_with="no_such_tracker", cpu=True).trackers == []
    assert applied and accelerate.Accelerator.__init__.__name__ == "__init__"
    with pytest.raises(ValueError):
        accelerate.Accelerator(log_with="no_such_tracker", cpu=True)

    if sbs._xformers_usable():
        pytest.skip("xformers runs here: the paper's script needs no patch")
    import diffusers.utils.import_utils as import_utils

    before, module_before = import_utils.is_xformers_available(), sys.modules.get("xformers")
    with sbs.PATCHES["xformers_noop"](applied):
        assert import_utils.is_xformers_available() and sys.modules["xformers"].__version__
        unet_class = sys.modules["diffusers"].UNet2DConditionModel
        assert unet_class.enable_xformers_memory_efficient_attention(object()) is None
    assert import_utils.is_xformers_available() == before
    assert sys.modules.get("xformers") is module_before

    if importlib.util.find_spec("wandb") is None:
        with sbs.PATCHES["wandb_stub"](applied):
            import wandb  # noqa: F401

            assert importlib.util.find_spec("wandb") is not None
        assert "wandb" not in sys.modules


def test_the_defaults_are_the_documented_measurement():
    args = sbs.parse_args([])
    assert (args.rounds, args.warmup, args.steps, args.threads) == (5, 2, 20, 2)
    assert (args.resolution, args.batch_size, args.rank, args.beta_dpo) == (64, 4, 4, 5000.0)
    assert args.trainers.split(",") == list(sbs.TRAINERS)
    assert Path(args.output_dir) == ROOT / "outputs" / "side_by_side"
    with pytest.raises(SystemExit):
        sbs.parse_args(["--warmup", "0"])
