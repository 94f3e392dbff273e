"""What a run leaves and says: the model card, pushing to the Hub (its upload functions patched: no
network), reusing a finished run, and progress lines without `nan`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.training import hub
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.console import progress_fields
from diffusion_dpo.training.model_card import record_evaluations
from diffusion_dpo.training.previous_run import finished_run, starting_over_note

ROOT = Path(__file__).resolve().parents[1]
BETA = 250.0


def _train_sd():
    spec = importlib.util.spec_from_file_location("train_sd_under_test", ROOT / "train_sd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(model, data, out, **overrides):
    values = dict(
        validation_dataset_name=data, num_validation_pairs=8, validation_steps=3,
        validation_timesteps=(300, 700), beta_dpo=BETA,
    )  # fmt: skip
    return tiny_run_flags(model, data, out, **{**values, **overrides})


class FakeHub:
    """huggingface_hub's create_repo and upload_folder, recorded instead of called."""

    def __init__(self, monkeypatch, events):
        self.events = events
        monkeypatch.setattr(huggingface_hub, "create_repo", self.create_repo)
        monkeypatch.setattr(huggingface_hub, "upload_folder", self.upload_folder)
        monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_saved_token")

    def create_repo(self, repo_id, exist_ok=False, token=None, **kw):
        assert exist_ok
        self.events.append(("create_repo", repo_id, token))
        full = repo_id if "/" in repo_id else f"someone/{repo_id}"
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{full}")

    def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns, token=None, **kw):
        card = ModelCard.load(Path(folder_path) / "README.md")  # the card is written before the upload
        self.events.append(("upload_folder", repo_id, folder_path, commit_message, ignore_patterns, card))
        return None


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory, tiny_sd_path):
    """A 3-step DPO run through train_sd.py with --push_to_hub; returns its output, the recorded Hub
    calls (and when training started among them) and the returned summary."""
    root = tmp_path_factory.mktemp("pushed")
    data = synthetic.write_pair_dataset(root / "pairs.parquet", 16, seed=0)
    out = root / "tiny-dpo"
    events = []
    module = _train_sd()
    real_train = module.train

    def train(cfg):
        events.append(("train",))
        return real_train(cfg)

    with pytest.MonkeyPatch.context() as mp:
        FakeHub(mp, events)
        mp.setattr(module, "train", train)
        argv = _argv(tiny_sd_path, data, out, push_to_hub=True, hub_model_id="me/tiny-dpo")
        summary = module.main(argv)
    reset_accelerate()
    return out, events, summary, argv, data


def test_the_model_card_holds_the_runs_facts(pushed_run):
    out, _, summary, _, data = pushed_run
    card = ModelCard.load(out / "README.md")
    meta = card.data.to_dict()
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    for tag in ("stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers",
                "diffusers-training", "diffusion-dpo", "dpo"):  # fmt: skip
        assert tag in meta["tags"], meta["tags"]
    assert "lora" not in meta["tags"]
    assert "base_model" not in meta  # a local folder is not a Hub id: named in the text only
    facts = meta["diffusion_dpo"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracy = [r["eval/implicit_acc"] for r in rows if "eval/implicit_acc" in r][-1]
    assert facts["objective"] == "dpo" and facts["loss_type"] == "sigmoid" and facts["beta"] == BETA
    assert facts["steps"] == summary["global_step"] == 3 and facts["dataset"] == str(data)
    assert facts["fine_tune"] == "full" and facts["total_batch_size"] == 4
    assert facts["heldout_implicit_accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert facts["heldout_pairs"] == 8
    assert f"**{accuracy:.2f}**" in card.text and "β = 250" in card.text
    assert 'DiffusionPipeline.from_pretrained("me/tiny-dpo")' in card.text  # as pushed
    assert "Not yet compared with its base" in card.text


def test_an_evaluation_adds_its_win_rate_to_the_card(pushed_run, tmp_path):
    """What eval/evaluate.py hands over (its summary, the models' sources) reaches the trainer
    output's card; the baseline and models not made here are left alone."""
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(pushed_run[0], out, ignore=shutil.ignore_patterns("checkpoint-*", "unet", "vae"))
    summary = {
        "baseline": "base", "n_prompts": 24, "seeds": [0, 1, 2, 3],
        "win_rates": {
            "dpo": {"shapes": {"win_rate": 0.71, "ci_low": 0.6, "ci_high": 0.8, "n": 96, "n_prompts": 24}},
            "other": {"shapes": {"win_rate": 0.4, "ci_low": 0.3, "ci_high": 0.5, "n": 96, "n_prompts": 24}},
        },
    }  # fmt: skip
    sources = {"base": str(tmp_path / "base"), "dpo": str(out), "other": "someone/model"}
    assert record_evaluations(summary, sources) == [out / "README.md"]
    card = ModelCard.load(out / "README.md")
    facts = card.data.to_dict()["diffusion_dpo"]
    assert facts["evaluation"] == {
        "baseline": "base", "prompts": 24, "seeds": 4,
        "win_rates": {"shapes": {"win_rate": 0.71, "ci_low": 0.6, "ci_high": 0.8}},
    }  # fmt: skip
    before = ModelCard.load(pushed_run[0] / "README.md").data.to_dict()["diffusion_dpo"]
    assert facts["heldout_implicit_accuracy"] == before["heldout_implicit_accuracy"]
    assert (
        "by the `shapes` scorer: **0.710** (95% interval [0.600, 0.800]) over 24 prompts × 4 seeds, from "
        "`eval/evaluate.py`: its images are preferred" in card.text
    )
    assert "Not yet compared" not in card.text


def test_push_to_hub_creates_the_repo_before_training_and_uploads_the_output(pushed_run):
    out, events, *_ = pushed_run
    assert [e[0] for e in events] == ["create_repo", "train", "upload_folder"]
    assert events[0][1:] == ("me/tiny-dpo", None)  # the saved login's token: huggingface_hub finds it
    _, repo_id, folder, message, ignore, card = events[2]
    assert (repo_id, Path(folder), message) == ("me/tiny-dpo", out, "End of training")
    assert {"checkpoint-*", "logs/*"} <= set(ignore) and (out / "checkpoint-3").is_dir()
    assert "diffusion-dpo" in card.data.tags
    # the token never reaches an output that is uploaded
    assert "hub_token" not in (out / "training_config.yaml").read_text()


def test_hub_argument_errors_come_before_training(tmp_path, monkeypatch):
    events = []
    FakeHub(monkeypatch, events)
    base = ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--push_to_hub"]

    def check(*flags):
        with pytest.raises(ValueError) as info:
            hub.check_hub_args(parse_config([*base, *flags]))
        return str(info.value)

    assert "--hub_token cannot be used with --report_to wandb" in check(
        "--hub_token", "hf_x", "--report_to", "wandb", "--output_dir", "o"
    )
    assert "'my run!' is not a valid Hub repository id" in check("--output_dir", str(tmp_path / "my run!"))
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert "no Hub token" in check("--output_dir", "o")
    hub.check_hub_args(parse_config([*base, "--output_dir", "o", "--hub_token", "hf_x"]))  # a token given

    # through train_sd.py: refused before any source is read or anything trained
    module = _train_sd()
    monkeypatch.setattr(module, "train", lambda cfg: events.append("train"))
    monkeypatch.setattr(module, "check_sources", lambda cfg, build_missing: None)
    with pytest.raises(ValueError, match="no Hub token"):
        module.main([*base, "--output_dir", str(tmp_path / "o")])
    assert events == [] and not (tmp_path / "o").exists()


def test_a_rerun_of_a_finished_run_reuses_it_and_other_options_start_over(pushed_run, tmp_path, capsys):
    out, _, summary, argv, _ = pushed_run
    module = _train_sd()
    trained = []

    def train(cfg):
        trained.append(cfg)
        raise RuntimeError("trained")

    module.train = train
    plain = argv[: argv.index("--push_to_hub")] + argv[argv.index("--hub_model_id") + 2 :]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = module.main(plain)  # without the Hub flags: they do not change what is trained
    words = capsys.readouterr().out
    assert trained == [] and again["global_step"] == 3
    assert f"{out} already holds this run, finished with the same options: nothing to train" in words
    assert "held-out implicit-reward accuracy" in words and "model: " in words
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing rewritten

    other = parse_config([*plain, "--beta_dpo", "100"])
    assert finished_run(other) is None
    assert starting_over_note(other) == (
        f"starting over in {out}: it holds a finished run of other options (beta_dpo 250.0 -> 100.0); this run "
        "replaces its model, metrics and summary, and its checkpoints as this run saves its own"
    )
    with pytest.raises(RuntimeError, match="trained"):
        module.main([*plain, "--overwrite_output_dir"])  # asked to: trains again
    assert len(trained) == 1
    assert "(--overwrite_output_dir)" in starting_over_note(parse_config([*plain, "--overwrite_output_dir"]))
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoint-150").mkdir(parents=True)
    (unfinished / "checkpoint-150" / "training_state.json").write_text("{}")
    note = starting_over_note(parse_config([*plain, "--output_dir", str(unfinished)]))
    assert "did not finish (newest checkpoint-150)" in note and "--resume_from_checkpoint latest" in note


def test_progress_bar_fields_have_no_nan():
    assert progress_fields({"loss": 0.69312, "rewards/accuracies": 0.0}) == {"loss": "0.6931", "acc": "0.00"}
    assert progress_fields({"loss": 0.5}) == {"loss": "0.5000"}  # SFT (the base build): no accuracy
    assert progress_fields({"loss": float("nan"), "rewards/accuracies": None}) == {}


def test_log_lines_start_with_the_first_thing_the_run_does(tmp_path):
    """The embedded default's first minute is the base build: its log line comes first (before, the
    first ~30 s printed nothing). The build is stopped right after it says so."""
    script = (
        "import sys; sys.argv[0] = 'train_sd.py'\n"
        "import diffusion_dpo.synthetic.base as t\n"
        "def stop(*a, **k): raise SystemExit(3)\n"
        "t.build_tiny_base = stop\n"
        "import importlib.util as u\n"
        f"s = u.spec_from_file_location('m', {str(ROOT / 'train_sd.py')!r}); m = u.module_from_spec(s)\n"
        "s.loader.exec_module(m)\n"
        f"m.main(['--config', {str(ROOT / 'configs/tiny.yaml')!r}])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-2000:]
    first = result.stderr.splitlines()[0]
    assert "INFO diffusion_dpo.synthetic.base: building the tiny SD1.5 base model" in first, first
    assert list(tmp_path.iterdir()) == []  # the stopped build left no empty outputs/ folder


def test_a_fresh_run_over_another_runs_output_says_it_starts_over(pushed_run, tmp_path, caplog):
    """Through the loop itself: a finished run of other options in output_dir is named before the first
    step, its summary.json goes at once (the folder no longer claims a finished run), and the new
    run's card replaces the old."""
    import logging
    import shutil

    from diffusion_dpo.training.loop import train

    out = tmp_path / "run"
    shutil.copytree(pushed_run[0], out)
    argv = [*pushed_run[3][: pushed_run[3].index("--push_to_hub")], "--output_dir", str(out)]
    cfg = parse_config([*argv, "--beta_dpo", "100", "--max_train_steps", "1"])
    with caplog.at_level(logging.WARNING, logger="diffusion_dpo.training.loop"):
        train(cfg)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        m.startswith(
            f"starting over in {out}: it holds a finished run of other options (beta_dpo 250.0 -> 100.0"
        )
        for m in warnings
    ), warnings
    assert not (out / "summary.json").exists()  # train() alone: train_sd.py writes the new one
    assert ModelCard.load(out / "README.md").data.to_dict()["diffusion_dpo"]["beta"] == 100.0


def test_card_tags_follow_the_family_and_the_fine_tune():
    from diffusion_dpo.training.model_card import build_model_card

    base = ["--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0"]
    cfg = parse_config([*base, "--dataset_name", "yuvalkirstain/pickapic_v2", "--use_lora", "--rank", "4"])
    card = build_model_card(cfg, "sdxl", 10)
    meta = card.data.to_dict()
    assert (
        meta["tags"][:2] == ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]
        and "lora" in meta["tags"]
    )
    assert meta["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"  # Hub ids go in the metadata
    assert meta["datasets"] == ["yuvalkirstain/pickapic_v2"]
    assert meta["diffusion_dpo"]["fine_tune"] == "LoRA rank 4"
    assert 'pipe.load_lora_weights("outputs/run")' in card.text
    assert build_model_card(cfg, "sd3", 10).data.tags[:2] == ["sd3", "sd3-diffusers"]
    assert build_model_card(cfg, "flux", 10).data.tags[:2] == ["flux", "flux-diffusers"]  # a newer family
    sft = parse_config([*base, "--dataset_name", "d.parquet", "--objective", "sft"])
    facts = build_model_card(sft, "sdxl", 10).data.to_dict()["diffusion_dpo"]
    assert facts["objective"] == "sft" and "beta" not in facts and "loss_type" not in facts
