"""A long run's guarantees: non-finite steps are skipped and counted, preemption checkpoints and
resumes exactly, a kill mid-checkpoint never corrupts `latest`, a streamed run resumes from its saved
position, bad rows are skipped and counted (or named in an error), the saved LoRA reloads as trained,
and sampling decodes in the VAE's own precision."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from trainer_runs import reset_accelerate, tiny_run_flags

from diffusion_dpo import synthetic
from diffusion_dpo.training import checkpoint as ckpt
from diffusion_dpo.training.config import parse_config
from diffusion_dpo.training.guards import PreemptionSignals, RunStopped, share_clearly_exceeds
from diffusion_dpo.training.loop import train

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def pairs_path(tmp_path_factory):
    return synthetic.write_pair_dataset(tmp_path_factory.mktemp("pairs") / "pairs.parquet", 24, seed=0)


def _argv(model, data, out, **overrides):
    # the trainer's default weight decay here
    return tiny_run_flags(model, data, out, **{"max_train_steps": 4, "adam_weight_decay": 1e-2, **overrides})


def _run(*args, **overrides):
    reset_accelerate()
    return train(parse_config(_argv(*args, **overrides)))


def _cli(*args, **overrides) -> list[str]:
    return [sys.executable, str(ROOT / "train_sd.py"), *_argv(*args, **overrides)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def _same_state(path_a: Path, path_b: Path, name: str) -> bool:
    a = torch.load(path_a / name, weights_only=False)
    b = torch.load(path_b / name, weights_only=False)
    return repr(a) == repr(b) if not isinstance(a, dict) else _equal(a, b)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# ---- non-finite steps -------------------------------------------------------------------------


def test_a_nan_loss_skips_its_step_and_leaves_weights_optimizer_and_schedule_untouched(
    tmp_path, tiny_sd_path, pairs_path, monkeypatch
):
    import diffusion_dpo.training.loop as loop

    real, calls = loop.compute_batch_loss, {"n": 0}

    def nan_at_step_3(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # as a real NaN would: in the loss and in what is logged of it
            loss, metrics = loss * float("nan"), {**metrics, "loss": metrics["loss"] * float("nan")}
        return loss, metrics

    monkeypatch.setattr(loop, "compute_batch_loss", nan_at_step_3)
    out = tmp_path / "out"
    # warm-up over the whole run: the lr changes every step, so a scheduler step would show
    summary = _run(tiny_sd_path, pairs_path, out, checkpointing_steps=1, lr_warmup_steps=10)
    c2, c3, c4 = (out / f"checkpoint-{s}" for s in (2, 3, 4))
    assert _max_diff(load_file(c2 / "model.safetensors"), load_file(c3 / "model.safetensors")) == 0
    assert _same_state(c2, c3, "optimizer.bin")
    assert _same_state(c2, c3, "scheduler.bin")
    assert _max_diff(load_file(c3 / "model.safetensors"), load_file(c4 / "model.safetensors")) > 0
    rows = _rows(out)
    assert [r["train/skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert rows[2]["loss"] is None  # NaN is not JSON: written as null
    assert rows[2]["lr"] == rows[1]["lr"] < rows[3]["lr"]  # the schedule did not advance on step 3
    assert summary["train/skipped_steps"] == 1


def test_non_finite_steps_in_a_row_stop_with_a_checkpoint_and_advice(tmp_path, tiny_sd_path, pairs_path):
    """An absurd learning rate: step 1 blows the weights up, every later loss is NaN, the steps are
    skipped, and after --max_nonfinite_steps in a row the run stops with a checkpoint."""
    out = tmp_path / "out"
    result = subprocess.run(
        _cli(tiny_sd_path, pairs_path, out, learning_rate=1e30, max_train_steps=20, max_nonfinite_steps=3,
             mixed_precision="no"),
        capture_output=True, text=True, env=_env(), timeout=600,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "3 optimizer steps in a row with a NaN/Inf loss or gradient" in result.stderr
    assert "lower --learning_rate" in result.stderr and "Traceback" not in result.stderr
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["train/skipped_steps"] for r in rows] == [0, 1, 2, 3]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-4"]
    state = json.loads((out / "checkpoint-4" / ckpt.STATE_FILE).read_text())
    assert state["nonfinite"] == {"skipped": 3, "consecutive": 3}


# ---- preemption and crashes --------------------------------------------------------------------


def _wait_for(predicate, process, timeout=300.0):
    start = time.time()
    while not predicate():
        assert process.poll() is None, process.stderr.read()[-3000:] if process.stderr else "exited"
        assert time.time() - start < timeout, "timed out"
        time.sleep(0.05)


def _metrics_rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def test_sigterm_checkpoints_and_the_resumed_run_ends_with_the_uninterrupted_weights(
    tmp_path, tiny_sd_path, pairs_path
):
    common = dict(max_train_steps=12, train_batch_size=2, checkpointing_steps=100, lr_warmup_steps=4)
    straight = tmp_path / "straight"
    subprocess.run(
        _cli(tiny_sd_path, pairs_path, straight, **common), check=True, capture_output=True, env=_env()
    )

    out = tmp_path / "preempted"
    with open(tmp_path / "stderr.txt", "w") as err:
        process = subprocess.Popen(_cli(tiny_sd_path, pairs_path, out, **common), stderr=err, env=_env())
        _wait_for(lambda: _metrics_rows(out) >= 3, process)
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=300)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert code == 128 + signal.SIGTERM, stderr[-3000:]
    assert "preempted: stopped cleanly at step" in stderr and "Traceback" not in stderr
    saved = ckpt.list_checkpoints(out)
    assert len(saved) == 1 and 3 <= int(saved[0].name.split("-")[1]) < 12
    assert _metrics_rows(out) == int(saved[0].name.split("-")[1])  # the step it finished, then stopped

    resumed = subprocess.run(
        _cli(tiny_sd_path, pairs_path, out, resume_from_checkpoint="latest", **common),
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _max_diff(load_file(straight / UNET), load_file(out / UNET)) < 1e-6
    assert [r["loss"] for r in _rows(out)] == pytest.approx([r["loss"] for r in _rows(straight)], rel=1e-5)


KILL_WHILE_SAVING = """
import os, sys, time
import accelerate
marker, train_args = sys.argv[1], sys.argv[2:]
real = accelerate.Accelerator.save_state
def save_state(self, output_dir=None, **kw):
    real(self, output_dir, **kw)  # the model, optimizer and RNG files are written ...
    if output_dir.endswith("checkpoint-4.tmp"):  # ... but the checkpoint is not complete yet
        open(marker, "w").close()
        time.sleep(600)
accelerate.Accelerator.save_state = save_state
sys.path.insert(0, {root!r})
import train_sd
train_sd.main(train_args)
"""


def test_a_kill_while_a_checkpoint_is_written_leaves_latest_on_the_last_complete_one(
    tmp_path, tiny_sd_path, pairs_path
):
    common = dict(max_train_steps=6, train_batch_size=2, checkpointing_steps=2)
    straight = tmp_path / "straight"
    subprocess.run(
        _cli(tiny_sd_path, pairs_path, straight, **common), check=True, capture_output=True, env=_env()
    )

    out, marker = tmp_path / "killed", tmp_path / "writing-checkpoint-4"
    driver = [sys.executable, "-c", KILL_WHILE_SAVING.format(root=str(ROOT)), str(marker)]
    process = subprocess.Popen(
        driver + _cli(tiny_sd_path, pairs_path, out, **common)[2:], stderr=subprocess.PIPE, env=_env()
    )
    _wait_for(marker.exists, process)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert (out / "checkpoint-4.tmp" / "model.safetensors").is_file()  # a half-written checkpoint ...
    assert ckpt.resolve_resume_path("latest", out) == out / "checkpoint-2"  # ... that latest ignores

    resumed = subprocess.run(
        _cli(tiny_sd_path, pairs_path, out, resume_from_checkpoint="latest", **common),
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _max_diff(load_file(straight / UNET), load_file(out / UNET)) < 1e-6
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


def test_sigint_sets_the_stop_flag_and_a_second_sigint_stops_at_once():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; ignored in a shell's background job
    with PreemptionSignals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # Python runs the handler between bytecodes
        assert signals.received == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before  # restored


# ---- streaming resume --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stream_folder(tmp_path_factory):
    """Pairs in three parquet files: a stream with three shards."""
    folder = tmp_path_factory.mktemp("stream")
    for i in range(3):
        synthetic.write_pair_dataset(folder / f"train-{i:05d}.parquet", 10, seed=10 + i, tie_fraction=0.0)
    return folder


def test_streaming_resume_continues_from_the_saved_position_without_rereading(
    tmp_path, tiny_sd_path, stream_folder, monkeypatch, caplog
):
    from diffusion_dpo.data.stream import ShuffledStream

    common = dict(
        streaming=True, shuffle_buffer_size=4, train_batch_size=2, max_train_steps=6, checkpointing_steps=3
    )
    straight = _run(tiny_sd_path, stream_folder, tmp_path / "straight", **common)["models"].unet.state_dict()
    _run(tiny_sd_path, stream_folder, tmp_path / "resumed", **{**common, "max_train_steps": 3})

    decoded, real_example = [], ShuffledStream._example

    def recording(self, row, index):
        decoded.append(index)
        return real_example(self, row, index)

    monkeypatch.setattr(ShuffledStream, "_example", recording)
    with caplog.at_level("INFO"):
        resumed = _run(
            tiny_sd_path, stream_folder, tmp_path / "resumed", resume_from_checkpoint="latest", **common
        )
    assert "resuming the stream of epoch 0 from its saved position" in caplog.text
    # the first 3 steps consumed the rows with index 0..5 (one reader: index = its row count);
    # the resumed run decodes none of them, only the 6 rows of steps 4..6
    assert sorted(decoded) == list(range(6, 12))
    b = resumed["models"].unet.state_dict()
    assert max((straight[k] - b[k]).abs().max().item() for k in straight) < 1e-6


# ---- bad rows through train_sd.py ---------------------------------------------------------------


def _png(mode: str, color) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (40, 36), color).save(buffer, format="PNG" if mode != "CMYK" else "JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def broken_pairs(tmp_path_factory):
    """16 good pairs, then one row per case of item 5 (bad) and per convertible image mode (good)."""
    folder = tmp_path_factory.mktemp("broken")
    good = synthetic.write_pair_dataset(folder / "good.parquet", 16, seed=0, tie_fraction=0.0)
    rows = pq.read_table(good).to_pylist()
    ok = rows[0]
    truncated = ok["jpg_0"][: len(ok["jpg_0"]) // 2]
    cases = [
        ("corrupt bytes", {"jpg_0": b"\x89PNG not really"}),
        ("truncated", {"jpg_1": truncated}),
        ("missing caption", {"caption": None}),
        ("label 0.7", {"label_0": 0.7, "label_1": 0.3}),
        ("empty caption: trained", {"caption": ""}),
        ("grayscale: converted", {"jpg_0": _png("L", 90)}),
        ("RGBA: converted", {"jpg_0": _png("RGBA", (255, 0, 0, 128))}),
        ("palette: converted", {"jpg_1": _png("P", 3)}),
        ("CMYK: converted", {"jpg_1": _png("CMYK", (0, 255, 255, 0))}),
    ]
    for _, change in cases:
        rows.append({**ok, **change})
    path = folder / "broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(good)), path)
    return path


def test_bad_rows_are_skipped_counted_and_listed_in_metrics_and_summary(tmp_path, tiny_sd_path, broken_pairs):
    out = tmp_path / "skip"
    # one epoch of 25 rows (4 bad, one of them dropped at load time for its label)
    result = subprocess.run(
        _cli(tiny_sd_path, broken_pairs, out, train_batch_size=8, max_train_steps=3, max_bad_row_fraction=0.5),
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out)
    assert rows[-1]["data/skipped_rows"] == 4  # corrupt, truncated, no caption (3 epochs' reads) + label
    listed = [r for row in rows for r in row.get("data/bad_rows", [])]
    reasons = " | ".join(r["reason"] for r in listed)
    assert "cannot decode" in reasons and "caption" in reasons
    summary = json.loads((out / "summary.json").read_text())
    assert "4 bad rows" in result.stdout  # the closing words say so too
    assert summary["data/skipped_rows"] == 4
    assert any("label_0" in r["reason"] for r in summary["data/bad_rows"])  # the load-time one
    assert all(r.get("loss") is not None for r in rows)  # converted images and "" trained normally


def test_bad_rows_under_error_stop_naming_the_row(tmp_path, tiny_sd_path, broken_pairs):
    result = subprocess.run(
        _cli(tiny_sd_path, broken_pairs, tmp_path / "error", on_bad_example="error", train_batch_size=8),
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert result.returncode != 0
    assert "label_0" in result.stderr and "row 19" in result.stderr  # the bad label, at load time
    assert "Traceback" not in result.stderr


def test_too_many_bad_rows_stop_the_run_with_examples(tmp_path, tiny_sd_path, pairs_path):
    rows = pq.read_table(pairs_path).to_pylist()
    for row in rows[::2]:
        row["jpg_0"] = b"broken"
    path = tmp_path / "half_broken.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(pairs_path)), path)
    out = tmp_path / "out"
    result = subprocess.run(
        _cli(tiny_sd_path, path, out, train_batch_size=4, max_train_steps=50), capture_output=True, text=True,
        env=_env(),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "more than --max_bad_row_fraction 0.01" in result.stderr
    assert "row " in result.stderr and "cannot decode image" in result.stderr
    assert ckpt.list_checkpoints(out)  # nothing trained so far is lost


def test_missing_image_files_are_skipped_and_counted(tmp_path, tiny_sd_path):
    from PIL import Image

    folder = tmp_path / "jsonl"
    (folder / "images").mkdir(parents=True)
    lines = []
    for i in range(8):
        Image.new("RGB", (32, 32), (30 * i, 0, 0)).save(folder / "images" / f"{i}.png")
        lines.append(
            {"caption": "a red circle", "image_w": f"images/{i}.png", "image_l": f"images/{(i + 1) % 8}.png"}
        )
    lines[3]["image_l"] = "images/nope.png"
    (folder / "pairs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    summary = _run(
        tiny_sd_path,
        folder / "pairs.jsonl",
        out,
        train_batch_size=4,
        max_train_steps=2,
        max_bad_row_fraction=0.5,
    )
    assert summary["data/skipped_rows"] == 1
    assert "nope.png" in summary["data/bad_rows"][0]["reason"] and summary["data/bad_rows"][0]["index"] == 3


def test_the_bad_row_share_needs_evidence_before_it_stops_a_run():
    """Hand-derived: n·KL(q‖p) against ln(1e6) = 13.8. One bad row in ten: 10·KL(0.1‖0.01) = 1.44;
    six in twelve: 12·KL(0.5‖0.01) = 19.4; 2% of 3000 rows: 3000·KL(0.02‖0.01) = 11.7 < 13.8 (a
    share twice the limit needs some thousands of rows before it stops a run)."""
    assert not share_clearly_exceeds(1, 10, 0.01)
    assert share_clearly_exceeds(6, 12, 0.01)
    assert not share_clearly_exceeds(60, 3000, 0.01)
    assert share_clearly_exceeds(80, 4000, 0.01)  # 4000·KL(0.02‖0.01) = 15.6
    assert not share_clearly_exceeds(0, 0, 0.01) and not share_clearly_exceeds(1, 200, 0.01)


# ---- outputs -------------------------------------------------------------------------------------


def test_saved_lora_reloads_at_alpha_over_rank(tmp_path, tiny_sd_path, pairs_path):
    """--lora_alpha 16 with --rank 4 trains at scale 4; the saved file must reload at that scale."""
    from diffusers import DiffusionPipeline

    out = tmp_path / "lora"
    summary = _run(
        tiny_sd_path,
        pairs_path,
        out,
        use_lora=True,
        rank=4,
        lora_alpha=16,
        max_train_steps=2,
        learning_rate=1e-2,
    )
    trained = summary["models"].unet.eval()
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(out)
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(1, 4, 4, 4, generator=g), torch.tensor([500])
    hidden = torch.randn(1, 16, 32, generator=g)
    with torch.no_grad():
        expected = trained(sample, t, hidden).sample
        reloaded = pipe.unet(sample, t, hidden).sample
        trained.disable_adapters()
        base = trained(sample, t, hidden).sample
    assert (expected - base).abs().max() > 1e-4  # the adapters matter ...
    torch.testing.assert_close(reloaded, expected, rtol=1e-4, atol=1e-5)  # ... and reload as trained


def test_sampling_decodes_outside_autocast_in_the_vae_dtype(tiny_sd_path, tmp_path, monkeypatch):
    """In a bf16 run the denoiser samples under bf16 autocast; the VAE must decode in its own dtype
    (fp32 for SDXL's original VAE), not under autocast's reduced precision."""
    from diffusers import DiffusionPipeline

    from diffusion_dpo.training.saving import sample_images

    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    seen = {}
    real_decode = pipe.vae.decode

    def decode(latents, *args, **kwargs):
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["dtype"] = latents.dtype
        return real_decode(latents, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", decode)
    paths = sample_images(pipe, ["a red circle"], tmp_path, 32, 2, seed=0, autocast_dtype=torch.bfloat16)
    assert paths[0].is_file()
    assert seen == {"autocast": False, "dtype": torch.float32}


def test_run_stopped_carries_its_exit_status():
    stop = RunStopped("preempted", exit_code=128 + signal.SIGTERM)
    assert stop.exit_code == 143 and str(stop) == "preempted"


def test_final_samples_come_from_the_saved_model_in_the_run_precision(
    tmp_path, tiny_sd_path, pairs_path, monkeypatch
):
    """The final samples are drawn with the saved model loaded back on the training device in the
    run's precision (they used to be drawn on the CPU in fp32 after a GPU run)."""
    import diffusion_dpo.training.saving as saving

    seen = {}
    real = saving.sample_images

    def spy(pipe, *args, **kwargs):
        seen[kwargs.get("autocast_dtype")] = (pipe.unet.dtype, pipe.unet.device.type, pipe.vae.dtype)
        return real(pipe, *args, **kwargs)

    monkeypatch.setattr(saving, "sample_images", spy)
    _run(
        tiny_sd_path, pairs_path, tmp_path / "out", max_train_steps=1, mixed_precision="bf16",
        validation_prompts="circle", validation_steps=1, num_inference_steps=2,
    )  # fmt: skip
    assert seen[torch.bfloat16] == (
        torch.float32,
        "cpu",
        torch.bfloat16,
    )  # validation: fp32 UNet under autocast
    assert seen[None] == (torch.bfloat16, "cpu", torch.bfloat16)  # final: the saved model, in bf16
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 1
