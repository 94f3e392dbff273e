"""End-to-end tests of the Diffusion-DPO trainer on tiny SD1.5- and SDXL-shaped models."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from diffusers import DiffusionPipeline, UNet2DConditionModel
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.loop import setup_models, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return synthetic.write_pair_dataset(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 24, seed=0)


def _argv(model, data, out, **overrides):
    return tiny_run_flags(model, data, out, **overrides)


def _run(*args, **overrides):
    return train(parse_config(_argv(*args, **overrides)))


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("sdxl", [False, True], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("use_lora", [False, True], ids=["full", "lora"])
def test_train_save_load(tmp_path, tiny_sd_path, tiny_sdxl_path, pairs_path, sdxl, use_lora):
    model = tiny_sdxl_path if sdxl else tiny_sd_path
    base = _state(UNet2DConditionModel.from_pretrained(model, subfolder="unet"))
    out = tmp_path / "out"
    argv = _argv(model, pairs_path, out, use_lora=use_lora, rank=4)
    set_seed(0)  # train() seeds the same way before it builds the models: same LoRA init
    initial = {
        k: p.detach().clone() for k, p in setup_models(parse_config(argv), "cpu").unet.named_parameters()
    }
    summary = train(parse_config(argv))
    models = summary["models"]
    trained = dict(models.unet.named_parameters())

    if use_lora:
        assert models.ref_unet is None
        # the reference = the base weights under the adapters: bit-identical to the saved base UNet
        base_after = {
            k.replace(".base_layer", ""): v for k, v in models.unet.state_dict().items() if "lora_" not in k
        }
        assert set(base_after) == set(base)
        assert all(torch.equal(base_after[k].float(), base[k].float()) for k in base)
        assert {k for k, p in trained.items() if p.requires_grad} == {k for k in trained if "lora_" in k}
    else:
        ref = _state(models.ref_unet)
        assert all(torch.equal(ref[k], base[k]) for k in base), "the frozen reference changed"
    trainable = {k: p for k, p in trained.items() if p.requires_grad}
    assert trainable
    unchanged = [k for k, p in trainable.items() if torch.equal(p.detach().float(), initial[k].float())]
    assert not unchanged, f"trainable weights that did not change: {unchanged[:5]}"

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "mse/model_chosen",
        "mse/model_rejected",
        "mse/ref_chosen",
        "mse/ref_rejected",
        "grad_norm",
        "lr",
    ):
        assert all(key in r for r in rows), key
    assert (out / "checkpoint-3" / "training_state.json").is_file()

    # the result loads where users load it, and produces an image
    if use_lora:
        assert (out / "pytorch_lora_weights.safetensors").is_file()
        pipe = DiffusionPipeline.from_pretrained(model)
        image_base = _image(pipe)
        pipe.load_lora_weights(out)
        image_lora = _image(pipe)
        assert image_lora.shape == (32, 32, 3)
        assert not torch.equal(image_base, image_lora), "loading the LoRA weights changed nothing"
    else:
        pipe = DiffusionPipeline.from_pretrained(out)
        assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
        saved = pipe.unet.state_dict()
        assert all(torch.equal(saved[k], v.detach().cpu()) for k, v in models.unet.state_dict().items())
        assert _image(pipe).shape == (32, 32, 3)


def _image(pipe):
    gen = torch.Generator().manual_seed(0)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        "a red circle on a blue background",
        num_inference_steps=2,
        height=32,
        width=32,
        generator=gen,
        output_type="pt",
    ).images[0]
    return out.permute(1, 2, 0)


def test_resume_gives_the_same_weights(tmp_path, tiny_sd_path, pairs_path):
    """N steps straight == N/2 steps + resume from the checkpoint + N/2 steps (STYLE.md §8)."""
    common = dict(max_train_steps=4, checkpointing_steps=2, train_batch_size=2, gradient_accumulation_steps=2)
    straight = _run(tiny_sd_path, pairs_path, tmp_path / "straight", **common)["models"].unet
    # the interrupted run: same config, stopped after step 2 (its checkpoint-2 is what a crash leaves)
    _run(tiny_sd_path, pairs_path, tmp_path / "resumed", **{**common, "max_train_steps": 2})
    reset_accelerate()
    resumed = _run(tiny_sd_path, pairs_path, tmp_path / "resumed", resume_from_checkpoint="latest", **common)
    resumed_unet = resumed["models"].unet
    a, b = straight.state_dict(), resumed_unet.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    straight_rows = [
        json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[3]["loss"] == pytest.approx(straight_rows[3]["loss"], rel=1e-4)


def test_training_raises_implicit_accuracy_on_its_pairs(tmp_path, tiny_sd_path):
    """A real learning signal: after training on a fixed set of pairs, the implicit reward prefers
    the winner on most of them (it is exactly 0.5 at the start, where policy = reference)."""
    data = synthetic.write_pair_dataset(tmp_path / "few.parquet", 16, seed=3, tie_fraction=0.0)
    summary = _run(
        tiny_sd_path, data, tmp_path / "out", validation_dataset_name=data, num_validation_pairs=16,
        validation_steps=1000, max_train_steps=50, train_batch_size=16, learning_rate=1e-4,
        proportion_empty_prompts=0.0, no_hflip=True,
    )  # fmt: skip
    final = summary["last_metrics"]["eval/implicit_acc"]
    assert final >= 0.75, final


def test_sft_and_kto_objectives_run(tmp_path, tiny_sd_path, pairs_path):
    sft = _run(tiny_sd_path, pairs_path, tmp_path / "sft", sft=True, max_train_steps=2)
    assert sft["models"].ref_unet is None  # SFT needs no reference
    assert set(sft["last_metrics"]) >= {"loss", "mse/model_chosen"}
    unpaired = synthetic.write_unpaired_dataset(tmp_path / "kto.parquet", 16, seed=0)
    reset_accelerate()
    kto = _run(tiny_sd_path, unpaired, tmp_path / "kto", objective="kto", max_train_steps=2, use_lora=True)
    assert set(kto["last_metrics"]) >= {"loss", "kto/kl", "rewards/chosen", "rewards/rejected"}
    assert (tmp_path / "kto" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = parse_config(["--config", str(path)])
    assert cfg.pretrained_model_name_or_path and cfg.dataset_name


def test_flags_override_yaml_and_bad_input_is_named(tmp_path):
    cfg = parse_config(["--config", str(ROOT / "configs/sd15_dpo.yaml"), "--beta_dpo", "2500", "--use_lora"])
    assert cfg.beta_dpo == 2500 and cfg.use_lora and cfg.gradient_accumulation_steps == 128
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrained_model_name_or_path: x\ndataset_name: y\nbeta: 3\n")
    with pytest.raises(ValueError, match=r"unknown keys \['beta'\]"):
        parse_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="label_smoothing"):
        parse_config(_argv("x", "y", "o", loss_type="exo_pair"))
    with pytest.raises(ValueError, match="--train_batch_size must be > 0"):
        parse_config(_argv("x", "y", "o", train_batch_size=0))
    # a full SFT fine-tune has no reference, so no held-out implicit accuracy: refused up front
    with pytest.raises(ValueError, match="full --objective sft fine-tune has none"):
        parse_config(_argv("x", "y", "o", sft=True, validation_dataset_name="z"))


def test_cli_help_and_clear_errors(tmp_path, tiny_sd_path):
    help_text = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for flag in (
        "--pretrained_model_name_or_path",
        "--beta_dpo",
        "--loss_type",
        "--resume_from_checkpoint",
        "--proportion_empty_prompts",
        "--checkpoints_total_limit",
        "--use_lora",
        "--rank",
    ):
        assert flag in help_text
    # a wrong dataset path: one line naming it, no stack trace
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), *_argv(tiny_sd_path, tmp_path / "nope.parquet", tmp_path / "o")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode != 0
    assert "nope.parquet" in result.stderr and "Traceback" not in result.stderr


def test_embedded_default_learns_and_says_so(embedded_default_run):
    """The README's first command, unshortened: from a fresh directory it builds the tiny base and the
    data, trains Diffusion-DPO, and ends with held-out implicit-reward accuracy clearly above chance, a
    loss that came down, samples, a loadable model and closing words that say all of it."""
    cwd, result = embedded_default_run
    assert result.returncode == 0, result.stderr[-3000:]
    out = cwd / "outputs/tiny/dpo"
    assert (out / "model_index.json").is_file()
    assert len(list((out / "samples").glob("*.png"))) == 3
    assert not list((cwd / "outputs/tiny/base_model").glob("checkpoint-*"))  # a base, not a run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["global_step"] == 150
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    accuracies = [r["eval/implicit_acc"] for r in rows if "eval/implicit_acc" in r]
    # 240 held-out pairs without ties (standard error about 0.032): 0.55 is above chance; measured 0.595
    # (seed 0) and 0.630 (seed 1) at β 1000, which trades accuracy (0.79 at β 50) for images that
    # beat the base's (the next test)
    assert accuracies[-1] >= 0.55, accuracies
    margins = [r["rewards/margins"] for r in rows]
    assert sum(margins[-15:]) / 15 > sum(margins[:15]) / 15 > -1, (margins[:15], margins[-15:])
    # the closing words a newcomer reads: accuracy start -> end, loss trend (and why it may rise), where
    # everything is and how to evaluate it
    words = result.stdout
    assert "held-out implicit-reward accuracy: 0.50 at the start" in words
    assert f"-> {accuracies[-1]:.2f} at step 150" in words
    assert "(down)" in words or "can rise while the model learns" in words
    assert "model: outputs/tiny/dpo" in words and "samples: 3 images" in words
    # the base build's own saves and loads and the checkpoints print no library chatter
    assert "Writing model shards" not in result.stderr and "accelerate.checkpointing" not in result.stderr
    pipe = DiffusionPipeline.from_pretrained(out)  # as the closing words say to load it
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    # logged from the first line (the base build's), and no `nan` in the progress bars
    assert (
        "INFO diffusion_dpo.synthetic.base: building the tiny SD1.5 base model"
        in (result.stderr.splitlines()[0])
    )
    assert "=nan" not in result.stderr
    # the model card: the run's facts, read back by huggingface_hub
    from huggingface_hub import ModelCard

    facts = ModelCard.load(out / "README.md").data.to_dict()["diffusion_dpo"]
    assert (
        facts["steps"] == 150
        and facts["beta"] == 1000
        and facts["heldout_implicit_accuracy"] == pytest.approx(accuracies[-1], abs=1e-4)
    )

    # the same command again: the finished run is shown and kept, not retrained over
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = subprocess.run(
        [sys.executable, str(ROOT / "train_sd.py"), "--config", str(ROOT / "configs/tiny.yaml")],
        cwd=cwd, capture_output=True, text=True,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    assert "outputs/tiny/dpo already holds this run, finished with the same options" in again.stdout
    assert f"-> {accuracies[-1]:.2f} at step 150" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == stamps


def readme_evaluation_command() -> str:
    """The README's command that evaluates the embedded default (base vs DPO, local paths)."""
    lines = [ln.strip() for ln in (ROOT / "README.md").read_text().splitlines()]
    found = [
        ln.split(" #")[0].strip()
        for ln in lines
        if ln.startswith("python eval/evaluate.py --model base=outputs/tiny/")
    ]
    assert len(found) == 1, (
        f"README.md should have one evaluation command of the embedded default, has {found}"
    )
    return found[0]


def test_embedded_default_beats_its_base_in_images(embedded_default_run):
    """The README's evaluation command on the README's first run, as a user runs it: DPO's images follow
    held-out prompts better than the base's, with a 95% interval above 0.5 (24 prompts never trained on
    × 8 seeds, the faithfulness scorer), sampled with the steps and guidance the run recorded. The run's
    closing lines give the same command."""
    import shlex

    cwd, result = embedded_default_run
    assert result.returncode == 0, result.stderr[-3000:]
    command = readme_evaluation_command()
    assert command in result.stdout, result.stdout[-2000:]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "eval/evaluate.py"]
    run = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:], "--no_progress"], cwd=cwd,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = cwd / argv[argv.index("--output_dir") + 1]
    summary = json.loads((out / "summary.json").read_text())
    recorded = yaml.safe_load((cwd / "outputs/tiny/dpo/training_config.yaml").read_text())
    assert summary["settings"]["num_inference_steps"] == recorded["num_inference_steps"]
    assert summary["settings"]["guidance_scale"] == recorded["guidance_scale"]
    assert summary["n_prompts"] == 24 and len(summary["seeds"]) == 8
    wr = summary["win_rates"]["dpo"]["shapes"]
    assert wr["ci_low"] > 0.5, (wr, run.stdout)
    assert summary["scores"]["dpo"]["shapes"]["mean"] > summary["scores"]["base"]["shapes"]["mean"]
    assert "dpo beats base on shapes" in (out / "report.html").read_text()


def test_closing_words_give_the_evaluation_command(tiny_sd_path, pairs_path, tmp_path):
    """A run's closing words end with the evaluate.py command comparing it with its base: for the
    embedded default its world's held-out prompts and scorer, for any other run a prompt file to fill
    in; held-out pairs, when the run had them, for the implicit accuracy. Steps and guidance are left
    to what the run recorded."""
    from diffusion_dpo.training.summary import evaluate_command

    cfg = parse_config(["--config", str(ROOT / "configs/tiny.yaml")])
    assert evaluate_command(cfg) == (
        "python eval/evaluate.py --model base=outputs/tiny/base_model --model dpo=outputs/tiny/dpo "
        "--prompts shapes:heldout --scorer shapes --num_images_per_prompt 8 "
        "--implicit_pairs outputs/tiny/pairs_heldout.parquet --output_dir outputs/tiny/dpo_eval"
    )
    lora = parse_config(_argv(tiny_sd_path, pairs_path, tmp_path / "run", use_lora=True, objective="sft"))
    command = evaluate_command(lora)
    assert f"--model base={tiny_sd_path} --model sft={tmp_path / 'run'}" in command
    assert "--prompts PROMPTS.txt --scorer pickscore" in command and "--implicit_pairs" not in command
    assert "--num_inference_steps" not in command and "--guidance_scale" not in command


def test_streaming_dataset_and_checkpoint_rotation(tmp_path, tiny_sd_path, pairs_path):
    """--streaming reads the parquet as a stream; --checkpoints_total_limit keeps the newest N."""
    out = tmp_path / "out"
    summary = _run(
        tiny_sd_path, pairs_path, out, streaming=True, max_train_steps=3, train_batch_size=2,
        checkpointing_steps=1, checkpoints_total_limit=2,
    )  # fmt: skip
    assert summary["global_step"] == 3
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
