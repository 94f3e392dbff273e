"""Many processes: 2 CPU processes (gloo) launched by `accelerate launch` train the weights that one
process trains on the same global batch, and write metrics, checkpoints and the model once.

Why this can fail: processes that draw the same noise (a `set_seed(seed)` on every rank), a KTO
reference point taken per process, a held-out accuracy counted per process, data sharded so that
the global batch differs, or a process left waiting when its micro-batch holds only skipped rows.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import load_file
from trainer_runs import flags

from diffusion_dpo import synthetic

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.safetensors"
#: docs/monitors.md: functions of the gathered means, so equal for any split of the global batch
MONITORS = (
    "monitors/chosen_vs_ref", "monitors/rejected_vs_ref", "monitors/negative_margins", "monitors/grad_factor",
    "monitors/pred_norm_ratio", "monitors/chosen_rel_trend", "safeguard/loser_scale", "train/beta",
)  # fmt: skip


#: --validation_scorer: prompts split across processes, scores gathered (docs/monitors.md)
WIN_RATE = ("eval/win_rate", "eval/win_rate_ci_low", "eval/win_rate_ci_high", "eval/score_policy",
            "eval/score_reference")  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(processes: int, config_file: str | None = None, **values) -> subprocess.CompletedProcess:
    """`train_sd.py` in 1 process, or in N CPU processes through `accelerate launch` (gloo), with
    the flags of the multi-GPU launcher or with one of `configs/accelerate/`."""
    script = [str(ROOT / "train_sd.py"), *flags(values)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    launch += ["--main_process_port", str(_free_port())]
    if processes == 1:
        cmd = [sys.executable, *script]
    elif config_file is not None:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed's CPU accelerator
        cmd = [*launch, "--config_file", str(ROOT / "configs" / "accelerate" / config_file), *script]
    else:
        # without a GPU accelerate needs ACCELERATE_USE_CPU=1 to set up gloo (the README says so)
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [
            *launch, "--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *script,
        ]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_same_training(base_unet: Path, one: Path, two: Path, weights: str = UNET) -> None:
    base, a, b = (load_file(p) for p in (base_unet, one / weights, two / weights))
    update = max((a[k] - base[k]).abs().max().item() for k in a)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert update > 1e-5, "training did not move the weights"
    # float summation order only: the two runs differ by orders of magnitude less than they moved
    assert diff < 1e-3 * update, (diff, update)
    rows_one, rows_two = _rows(one), _rows(two)
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one]  # logged once, not per process
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        for key in (
            "loss",
            "rewards/accuracies",
            "kto/kl",
            "data/skipped_rows",
            "eval/implicit_acc",
            *WIN_RATE,
            *MONITORS,
        ):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-3, abs=1e-4), (r1["step"], key)


@pytest.fixture(scope="module")
def pairs_with_bad_rows(tmp_path_factory):
    """24 pairs, 3 with an undecodable image: with one row per process, some micro-steps give one
    process nothing but a placeholder, which must neither hang it nor change the result."""
    folder = tmp_path_factory.mktemp("dist_data")
    path = synthetic.write_pair_dataset(folder / "pairs.parquet", 24, seed=0, tie_fraction=0.0)
    table = pq.read_table(path).to_pylist()
    for i in (2, 9, 17):
        table[i]["jpg_0"] = b"not an image"
    import pyarrow as pa

    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(path)), path)
    heldout = synthetic.write_pair_dataset(folder / "heldout.parquet", 8, seed=1, tie_fraction=0.0)
    return path, heldout


def test_two_processes_train_what_one_process_trains_dpo(tmp_path, tiny_sd_path, pairs_with_bad_rows):
    data, heldout = pairs_with_bad_rows
    # Adam's first steps move each weight by ±lr whatever its gradient's size, so gradients that differ
    # in the 7th digit (float summation order) can flip tiny updates; a large ε makes the update
    # proportional to the gradient, and the comparison then measures the training, not the rounding.
    common = dict(
        pretrained_model_name_or_path=tiny_sd_path, dataset_name=data, resolution=32, max_train_steps=4,
        gradient_accumulation_steps=2, learning_rate=1e-2, adam_epsilon=1.0, lr_warmup_steps=0,
        checkpointing_steps=2, seed=0, max_bad_row_fraction=0.5, validation_dataset_name=heldout,
        num_validation_pairs=7, validation_steps=2, validation_scorer="shapes", num_validation_images=2,
        num_inference_steps=2,
    )  # fmt: skip
    _train(1, output_dir=tmp_path / "one", train_batch_size=2, **common)
    _train(2, output_dir=tmp_path / "two", train_batch_size=1, **common)
    _assert_same_training(Path(tiny_sd_path) / UNET, tmp_path / "one", tmp_path / "two")
    rows = _rows(tmp_path / "two")
    assert rows[-1]["data/skipped_rows"] >= 1  # some placeholders were met
    assert "eval/implicit_acc" in rows[1] and "eval/implicit_acc" in rows[3]
    assert all(key in rows[1] and key in rows[3] for key in WIN_RATE)
    two = tmp_path / "two"
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    state = json.loads((two / "checkpoint-4" / "training_state.json").read_text())
    assert state["position"] == {"rows_done": 16}  # 4 steps × 2 micro-batches × 2 processes × 1 row
    assert {p.name for p in (two / "checkpoint-4").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert (two / "model_index.json").is_file()


@pytest.mark.slow  # two more launches (about a minute on 2 free cores)
def test_two_processes_share_the_safeguard_scale_and_the_adapted_beta(
    tmp_path, tiny_sd_path, pairs_with_bad_rows
):
    """--winner_safeguard's λ is one per global micro-batch (its terms summed over processes) and
    --auto_beta's β comes from gathered margins: 2 processes log and train what 1 process does."""
    data, _ = pairs_with_bad_rows
    common = dict(
        pretrained_model_name_or_path=tiny_sd_path, dataset_name=data, resolution=32, max_train_steps=3,
        learning_rate=1e-2, adam_epsilon=1.0, lr_warmup_steps=0, checkpointing_steps=100, seed=0,
        max_bad_row_fraction=0.5, beta_dpo=50, winner_safeguard=True, auto_beta=True,
    )  # fmt: skip
    _train(1, output_dir=tmp_path / "one", train_batch_size=4, **common)
    _train(2, output_dir=tmp_path / "two", train_batch_size=2, **common)
    _assert_same_training(Path(tiny_sd_path) / UNET, tmp_path / "one", tmp_path / "two")
    rows = _rows(tmp_path / "two")
    assert all(0.0 <= r["safeguard/loser_scale"] <= 1.0 for r in rows) and rows[-1]["train/beta"] != 50


def test_two_processes_train_what_one_process_trains_kto(tmp_path, tiny_sd_path):
    """KTO's reference point is the mean log-ratio of the global batch: averaged over processes."""
    data = synthetic.write_unpaired_dataset(tmp_path / "kto.parquet", 24, seed=0)
    common = dict(
        pretrained_model_name_or_path=tiny_sd_path, dataset_name=data, objective="kto", resolution=32,
        max_train_steps=3, learning_rate=1e-2, adam_epsilon=1.0, lr_warmup_steps=0, beta_dpo=500,
        checkpointing_steps=100, seed=0,
    )  # fmt: skip
    _train(1, output_dir=tmp_path / "one", train_batch_size=4, **common)
    _train(2, output_dir=tmp_path / "two", train_batch_size=2, **common)
    _assert_same_training(Path(tiny_sd_path) / UNET, tmp_path / "one", tmp_path / "two")
    # from step 2 on the policy differs from the reference: the reference point is not trivially 0
    assert any(r["kto/kl"] > 0 for r in _rows(tmp_path / "two")[1:])


def test_each_row_draws_its_own_noise_whatever_the_batching():
    """The training draws are a function of (seed, epoch, row): distinct across the rows of different
    processes, identical for a row wherever it lands."""
    from diffusion_dpo.diffusion import draw_for_rows

    whole = draw_for_rows(0, 0, [0, 1, 2, 3], (4, 4, 4), 1000, images_per_row=2)
    halves = [draw_for_rows(0, 0, rows, (4, 4, 4), 1000, images_per_row=2) for rows in ([0, 1], [2, 3])]
    torch.testing.assert_close(whole.noise, torch.cat([h.noise for h in halves]), rtol=0, atol=0)
    torch.testing.assert_close(whole.timesteps, torch.cat([h.timesteps for h in halves]), rtol=0, atol=0)
    torch.testing.assert_close(
        whole.posterior, torch.cat([h.posterior for h in halves], dim=1), rtol=0, atol=0
    )
    assert not torch.equal(whole.noise[0], whole.noise[2])  # what rank 0 and rank 1 draw differs
    assert not torch.equal(whole.posterior[0], whole.posterior[1])  # winner and loser posteriors differ
    other_epoch = draw_for_rows(0, 1, [0], (4, 4, 4), 1000, images_per_row=2)
    assert not torch.equal(other_epoch.noise[0], whole.noise[0])


def test_two_processes_train_the_sd3_transformer_that_one_process_trains(tmp_path, tiny_sd3_path):
    """A flow model's σ is drawn per row from (seed, epoch, row), like its noise: 2 processes with 1
    row each draw the σ that 1 process with 2 rows draws, so they train the same transformer and log
    the same losses. A σ tied to a row's place in its micro-batch, or to the process, would differ."""
    data = synthetic.write_pair_dataset(tmp_path / "pairs.parquet", 8, seed=0, tie_fraction=0.0)
    common = dict(
        pretrained_model_name_or_path=tiny_sd3_path, dataset_name=data, resolution=32, max_train_steps=2,
        learning_rate=1e-2, adam_epsilon=1.0, lr_warmup_steps=0, checkpointing_steps=100, seed=0,
        proportion_empty_prompts=0.0,
    )  # fmt: skip
    _train(1, output_dir=tmp_path / "one", train_batch_size=2, **common)
    _train(2, output_dir=tmp_path / "two", train_batch_size=1, **common)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    _assert_same_training(Path(tiny_sd3_path) / weights, tmp_path / "one", tmp_path / "two", weights)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed (pip install deepspeed)")
def test_deepspeed_zero3_shards_the_reference_and_resumes_exactly(tmp_path, tiny_sd_path):
    """ZeRO-3 on 2 CPU processes (DeepSpeed's CPU accelerator, gloo): the trained UNet and the frozen
    reference are both sharded; step one is exactly policy = reference (loss ln 2); 2 steps + resume +
    2 steps equal 4 straight steps; the saved model holds the fp32 master weights."""
    data = synthetic.write_pair_dataset(tmp_path / "pairs.parquet", 24, seed=0, tie_fraction=0.0)
    common = dict(
        pretrained_model_name_or_path=tiny_sd_path, dataset_name=data, resolution=32, train_batch_size=2,
        learning_rate=1e-2, adam_epsilon=1.0, lr_warmup_steps=0, checkpointing_steps=2, seed=0,
        mixed_precision="bf16",
    )  # fmt: skip
    _train(2, "deepspeed_zero3.yaml", output_dir=tmp_path / "straight", max_train_steps=4, **common)
    _train(2, "deepspeed_zero3.yaml", output_dir=tmp_path / "resumed", max_train_steps=2, **common)
    _train(
        2, "deepspeed_zero3.yaml", output_dir=tmp_path / "resumed", max_train_steps=4,
        resume_from_checkpoint="latest", **common,
    )  # fmt: skip
    straight, resumed = load_file(tmp_path / "straight" / UNET), load_file(tmp_path / "resumed" / UNET)
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) == 0
    assert next(iter(straight.values())).dtype == torch.float32
    base = load_file(Path(tiny_sd_path) / UNET)
    assert max((straight[k] - base[k]).abs().max().item() for k in straight) > 1e-5
    rows = _rows(tmp_path / "straight")
    assert rows[0]["loss"] == pytest.approx(0.693147, abs=1e-6)


def test_two_processes_stream_uneven_shards_without_waiting_for_each_other(tmp_path, tiny_sd_path):
    """A stream's readers run dry at different times (3 shards of 10, 5 and 9 rows over 2 processes):
    the epoch ends for both when one has no batch, nobody hangs in a collective, and training goes on
    into the next epochs; the checkpoint holds both processes' reader states."""
    folder = tmp_path / "shards"
    folder.mkdir()
    for i, n in enumerate((10, 5, 9)):
        synthetic.write_pair_dataset(folder / f"train-{i:05d}.parquet", n, seed=i, tie_fraction=0.0)
    out = tmp_path / "out"
    _train(
        2, pretrained_model_name_or_path=tiny_sd_path, dataset_name=folder, streaming=True, resolution=32,
        train_batch_size=2, max_train_steps=8, learning_rate=1e-4, lr_warmup_steps=0, shuffle_buffer_size=4,
        checkpointing_steps=8, output_dir=out,
    )  # fmt: skip
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9))
    state = json.loads((out / "checkpoint-8" / "training_state.json").read_text())
    assert state["epoch"] >= 1  # 2-3 steps per epoch: several epochs went by
    assert state["position"]["num_processes"] == 2 and len(state["position"]["last_reader"]) == 2


@pytest.mark.parametrize(
    "name, engine",
    [("ddp", "MULTI_GPU"), ("ddp_multinode", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"),
     ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")],
)  # fmt: skip
def test_every_accelerate_config_loads_as_documented(name, engine):
    """Each launch config in configs/accelerate/ loads with accelerate's own loader, selects its
    engine, and leaves gradient accumulation to the trainer (set there, accelerate would export it
    and override the trainer's --gradient_accumulation_steps)."""
    from accelerate.commands.config.config_args import load_config_from_file

    path = ROOT / "configs" / "accelerate" / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.distributed_type.name == engine
    raw = yaml.safe_load(path.read_text())
    assert "gradient_accumulation_steps" not in raw
    assert "gradient_accumulation_steps" not in raw.get("deepspeed_config", {})
    assert f"--config_file configs/accelerate/{name}.yaml" in path.read_text()  # the header says how
    if name == "deepspeed_zero3":
        assert (
            config.deepspeed_config["zero_stage"] == 3 and config.deepspeed_config["zero3_init_flag"] is False
        )
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
