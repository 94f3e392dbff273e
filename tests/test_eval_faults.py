"""Evaluation faults: corrupt cached images, interrupted runs, missing scorer weights, bad inputs.

Two tiny random SD pipelines render 3 shapes prompts × 2 seeds at 32 px in 2 steps (batches of 2);
the shapes scorer (no weights) scores them in chunks of 4. Pipeline and scorer calls are counted by
wrapping ``load_pipeline`` / ``load_scorer``; an interruption is an exception raised from inside the
k-th call, or a subprocess killed with SIGKILL while it scores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "a red circle on a blue background",
    "a green square on a white background",
    "a yellow triangle on a black background",
]
N_IMAGES = 2 * len(PROMPTS) * 2  # models × prompts × seeds


class Interrupted(Exception):
    """Stands for a crash or a kill in the middle of a run."""


def _load_evaluate():
    spec = importlib.util.spec_from_file_location("eval_evaluate_faults", REPO / "eval" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluate():
    return _load_evaluate()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusion_dpo.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("fault_models")
    return {
        "base": save_tiny_pipeline(root / "base", seed=0),
        "other": save_tiny_pipeline(root / "other", seed=1),
    }


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fault_prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def _argv(models, prompt_file, out, *extra, scorer="shapes"):
    return [
        "--model", f"base={models['base']}",
        "--model", f"other={models['other']}",
        "--prompts", str(prompt_file),
        "--scorer", scorer,
        "--output_dir", str(out),
        "--num_images_per_prompt", "2",
        "--num_inference_steps", "2",
        "--resolution", "32",
        "--batch_size", "2",
        "--scorer_batch_size", "1",  # chunks of 4 images
        "--device", "cpu",
        "--n_bootstrap", "200",
        "--no_progress",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(evaluate, models, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    evaluate.main(_argv(models, prompt_file, out))
    return out


def _comparable(out: Path) -> tuple[dict, str]:
    """summary.json without what legitimately differs between runs (timings, reuse counts, paths)."""
    summary = json.loads((out / "summary.json").read_text())
    for key in ("generation", "scoring", "elapsed_s"):
        summary.pop(key)
    summary["settings"].pop("cache_dir")
    return summary, (out / "scores.csv").read_text()


def _count_generation(monkeypatch, fail_at_call: int | None = None) -> list[int]:
    """Wrap every loaded pipeline: record each call's batch size; raise ``Interrupted`` at a call."""
    import diffusion_dpo.evaluation.generate as generate

    real_load, calls = getattr(generate.load_pipeline, "real", generate.load_pipeline), []

    def load(*args, **kwargs):
        pipe = real_load(*args, **kwargs)

        def call(**kw):
            if fail_at_call is not None and len(calls) + 1 == fail_at_call:
                raise Interrupted(f"killed in pipeline call {fail_at_call}")
            calls.append(len(kw["prompt"]))
            return pipe(**kw)

        return call

    load.real = real_load  # a second wrapper wraps the real loader, not this one
    monkeypatch.setattr(generate, "load_pipeline", load)
    return calls


def _count_scoring(monkeypatch, fail_at_call: int | None = None, nan_image: int | None = None) -> list[int]:
    """Wrap every loaded scorer: record each call's image count; raise at a call or return one NaN."""
    import torch

    import diffusion_dpo.scorers as scorers

    real_load, calls = getattr(scorers.load_scorer, "real", scorers.load_scorer), []

    def load(spec, **kwargs):
        scorer = real_load(spec, **kwargs)

        def score(images, prompts):
            if fail_at_call is not None and len(calls) + 1 == fail_at_call:
                raise Interrupted(f"killed in scorer call {fail_at_call}")
            before = sum(calls)
            calls.append(len(images))
            values = scorer(images, prompts)
            if nan_image is not None and before <= nan_image < before + len(images):
                values[nan_image - before] = torch.nan
            return values

        return score

    load.real = real_load
    monkeypatch.setattr(scorers, "load_scorer", load)
    return calls


# ----------------------------------------------------------------------------------------------------
# 1. corrupt cached images


def test_corrupt_cached_images_are_regenerated(models, monkeypatch, tmp_path, caplog):
    import io

    from PIL import Image

    from diffusion_dpo.evaluation.generate import (
        GenerationSettings,
        check_cached_image,
        generate_images,
        resolve_model,
    )

    spec = resolve_model("base", str(models["base"]))
    settings = GenerationSettings(num_inference_steps=2, resolution=32)
    seeds = [7, 8]
    paths, n = generate_images(spec, PROMPTS, seeds, settings, tmp_path, batch_size=2, progress=False)
    assert n == 6
    flat = [p for row in paths for p in row]
    original = {p: np.asarray(Image.open(p).convert("RGB"), dtype=float) for p in flat}
    png = flat[1].read_bytes()
    wrong_size = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(wrong_size, format="PNG")
    damage = {
        flat[0]: b"",  # zero bytes (a disk that filled up)
        flat[1]: png[: len(png) // 2],  # truncated
        flat[3]: np.random.default_rng(0).bytes(len(png)),  # random bytes
        flat[4]: wrong_size.getvalue(),  # decodes, but 16x16 (an older run, a file copied in)
    }
    for path, data in damage.items():
        path.write_bytes(data)
    intact = [p for p in flat if p not in damage]
    mtimes = {p: p.stat().st_mtime_ns for p in intact}

    calls = _count_generation(monkeypatch)
    with caplog.at_level("WARNING", logger="diffusion_dpo.evaluation.generate"):
        again, n = generate_images(spec, PROMPTS, seeds, settings, tmp_path, batch_size=2, progress=False)
    assert again == paths and n == 4 and sum(calls) == 4  # only the damaged four
    warned = caplog.text
    for path in damage:
        assert str(path) in warned, f"no warning names {path}"
    assert "does not decode" in warned and "its size is 16x16, expected 32x32" in warned
    assert {p: p.stat().st_mtime_ns for p in intact} == mtimes  # intact images untouched
    for path in flat:
        assert check_cached_image(path, (32, 32)) is None
        # the same image again (other batch companions: within a grey level, see test_evaluate_e2e)
        np.testing.assert_allclose(
            np.asarray(Image.open(path).convert("RGB"), dtype=float), original[path], atol=2
        )


def test_check_cached_image_reasons(tmp_path):
    from PIL import Image

    from diffusion_dpo.evaluation.generate import check_cached_image, default_image_size, resolve_model

    good = tmp_path / "good.png"
    Image.new("RGB", (8, 8), "blue").save(good)
    assert check_cached_image(good, (8, 8)) is None and check_cached_image(good) is None
    flipped = bytearray(good.read_bytes())
    flipped[len(flipped) // 2] ^= 0x10  # bit-rot inside the pixel data: a CRC mismatch
    (tmp_path / "rot.png").write_bytes(bytes(flipped))
    assert "does not decode" in check_cached_image(tmp_path / "rot.png", (8, 8))
    Image.new("L", (8, 8)).save(tmp_path / "gray.png")
    assert "mode is L" in check_cached_image(tmp_path / "gray.png", (8, 8))
    Image.new("RGB", (8, 8)).save(tmp_path / "jpeg.png", format="JPEG")
    assert "JPEG" in check_cached_image(tmp_path / "jpeg.png", (8, 8))
    assert default_image_size(resolve_model("m", "org/hub-model")) is None  # not read from the hub


def test_default_image_size_is_the_pipelines(models, tmp_path):
    from PIL import Image

    from diffusion_dpo.evaluation.generate import (
        GenerationSettings,
        default_image_size,
        generate_images,
        resolve_model,
    )

    spec = resolve_model("base", str(models["base"]))
    settings = GenerationSettings(num_inference_steps=1)  # no resolution: the pipeline's default
    paths, _ = generate_images(spec, PROMPTS[:1], [0], settings, tmp_path, progress=False)
    assert Image.open(paths[0][0]).size == default_image_size(spec) == (32, 32)


# ----------------------------------------------------------------------------------------------------
# 2. interrupted runs resume


def test_interrupted_generation_resumes(evaluate, models, prompt_file, uninterrupted, monkeypatch, tmp_path):
    out = tmp_path / "out"
    _count_generation(monkeypatch, fail_at_call=3)  # batches 1 and 2 of model base are saved
    with pytest.raises(Interrupted):
        evaluate.main(_argv(models, prompt_file, out))
    assert len(list((out / "images").rglob("*.png"))) == 4
    assert not (out / "summary.json").exists()

    calls = _count_generation(monkeypatch)
    summary = evaluate.main(_argv(models, prompt_file, out))
    assert sum(calls) == N_IMAGES - 4
    assert summary["generation"] == {
        "base": {"generated": 2, "cached": 4},
        "other": {"generated": 6, "cached": 0},
    }
    assert _comparable(out) == _comparable(uninterrupted)


def test_interrupted_scoring_resumes(
    evaluate, models, prompt_file, uninterrupted, monkeypatch, tmp_path, caplog
):
    out = tmp_path / "out"
    _count_scoring(monkeypatch, fail_at_call=3)  # chunks 1 and 2 (4 + 2 images of model base) are cached
    with pytest.raises(Interrupted):
        evaluate.main(_argv(models, prompt_file, out))

    gen_calls = _count_generation(monkeypatch)
    score_calls = _count_scoring(monkeypatch)
    with caplog.at_level("INFO"):
        summary = evaluate.main(_argv(models, prompt_file, out))
    assert gen_calls == []  # every image was cached
    assert sum(score_calls) == N_IMAGES - 6
    assert summary["scoring"] == {
        "shapes": {"base": {"scored": 0, "cached": 6}, "other": {"scored": 6, "cached": 0}}
    }
    assert "scorer shapes: 6 of 12 scores cached" in caplog.text
    assert _comparable(out) == _comparable(uninterrupted)

    # a third run reuses everything: no pipeline, no scorer loaded
    calls = _count_scoring(monkeypatch)
    summary = evaluate.main(_argv(models, prompt_file, out))
    assert calls == [] and summary["scoring"]["shapes"]["other"] == {"scored": 0, "cached": 6}


_KILLABLE = """
import importlib.util, os, sys, time
import diffusion_dpo.scorers as scorers

real_load = scorers.load_scorer

def load(spec, **kwargs):
    scorer, calls = real_load(spec, **kwargs), []
    def score(images, prompts):
        calls.append(len(images))
        if len(calls) == 3:  # two chunks are cached: say so, then wait to be killed
            open(os.environ["MARKER"], "w").close()
            time.sleep(600)
        return scorer(images, prompts)
    return score

scorers.load_scorer = load
spec = importlib.util.spec_from_file_location("evaluate", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module.main(sys.argv[2:])
"""


def test_sigkill_while_scoring_then_rerun(
    evaluate, models, prompt_file, uninterrupted, monkeypatch, tmp_path
):
    from diffusion_dpo.evaluation.score_cache import ScoreCache

    out, marker = tmp_path / "out", tmp_path / "scoring-started"
    script = tmp_path / "killable.py"
    script.write_text(_KILLABLE)
    env = {**os.environ, "MARKER": str(marker), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, str(script), str(REPO / "eval" / "evaluate.py"), *_argv(models, prompt_file, out)]
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a full pipe would block the child
    with log.open("w") as stderr:
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the run never reached its third scorer call"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    [cache_file] = (out / "images" / "scores").glob("shapes-*.jsonl")
    assert len(ScoreCache(cache_file)) == 6  # chunks of 4 + 2 images

    calls = _count_scoring(monkeypatch)
    evaluate.main(_argv(models, prompt_file, out))
    assert sum(calls) == N_IMAGES - 6
    assert _comparable(out) == _comparable(uninterrupted)


def test_score_cache_never_reads_back_a_torn_record(tmp_path, caplog):
    from diffusion_dpo.evaluation.score_cache import ScoreCache

    path = tmp_path / "scores.jsonl"
    cache = ScoreCache(path)
    cache.add({"a": 1.5, "b": -0.25, "nan": float("nan")})  # non-finite scores are not cached
    assert ScoreCache(path).scores == {"a": 1.5, "b": -0.25}
    with path.open("a") as f:  # a kill in the middle of the next append
        f.write('{"key": "c", "score": 0.12')
    with caplog.at_level("WARNING"):
        torn = ScoreCache(path)
    assert torn.scores == {"a": 1.5, "b": -0.25} and "ignored 1 unreadable" in caplog.text
    torn.add({"d": 3.0})  # starts on a fresh line: the torn one cannot swallow it
    assert ScoreCache(path).scores == {"a": 1.5, "b": -0.25, "d": 3.0}
    lines = path.read_text().splitlines()
    assert lines[2] == '{"key": "c", "score": 0.12' and json.loads(lines[3]) == {"key": "d", "score": 3.0}


def test_score_cache_keys_and_files(tmp_path):
    from diffusion_dpo.evaluation.score_cache import ScoreCache, score_key, scorer_identity

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    assert score_key(a, "p") == score_key(b, "p")  # the same image (e.g. safety-blanked) ...
    assert score_key(a, "p") != score_key(a, "q")  # ... under another prompt scores anew
    b.write_bytes(b"other bytes")
    assert score_key(a, "p") != score_key(b, "p")
    # the scorer's identity picks the file: spec, dtype, local weights, code (and library versions)
    folder = tmp_path / "scores"

    def cache_file(spec, dtype="fp32"):
        return ScoreCache.for_scorer(folder, spec, dtype).path

    assert cache_file("shapes") == cache_file("shapes") != cache_file("shapes", "fp16")
    weights = tmp_path / "HPS_v2.1_compressed.pt"
    weights.write_bytes(b"v1")
    before = cache_file(f"hpsv2.1={weights}")
    assert cache_file(f"hpsv2.1={tmp_path}") != before  # another spec, though the same file
    weights.write_bytes(b"v2, retrained")  # new size and mtime
    assert cache_file(f"hpsv2.1={weights}") != before
    identity = scorer_identity("shapes", "fp32")
    assert identity["code"] != scorer_identity("pickscore", "fp32")["code"]  # shapes also hashes its world
    assert identity["libraries"]["torch"]


# ----------------------------------------------------------------------------------------------------
# 3. missing scorer weights fail before any image


def test_missing_weights_fail_before_generation(evaluate, models, prompt_file, monkeypatch, tmp_path, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    import diffusion_dpo.evaluation.generate as generate

    def no_loading(*args, **kwargs):
        raise AssertionError("a pipeline was loaded although a scorer's weights are missing")

    monkeypatch.setattr(generate, "load_pipeline", no_loading)
    argv = _argv(models, prompt_file, tmp_path / "out", "--scorer", "hpsv2.1")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 1
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert "hpsv2.1: weights not found" in line and "HPS_v2.1_compressed.pt" in line
    assert not (tmp_path / "out" / "images").exists()


def test_missing_weights_cli_prints_one_line(models, prompt_file, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    argv = [sys.executable, str(REPO / "eval" / "evaluate.py"), *_argv(models, prompt_file, tmp_path / "out")]
    argv += ["--scorer", "pickscore"]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert line.startswith("evaluate.py: error: pickscore: weights not found")
    for part in (
        "yuvalkirstain/PickScore_v1",
        "--scorer pickscore=/path/to/folder",
        "HF_HOME",
        "HF_HUB_OFFLINE",
    ):
        assert part in line
    assert str(tmp_path / "hf_home") in line  # where it looked
    assert not (tmp_path / "out" / "images").exists()


# ----------------------------------------------------------------------------------------------------
# other faults: bad inputs, a model that does not load, NaN scores


def test_bad_prompt_files_are_clear_errors(evaluate, models, tmp_path, capsys):
    cases = {
        "binary.txt": (
            b"\x89\xff\xfe\x00 not text",
            "cannot read prompts from .*binary.txt: UnicodeDecodeError",
        ),
        "blank.txt": (b"\n  \n", "no prompts in .*blank.txt"),
        "header_only.csv": (b"prompt,category\n", "no prompts in .*header_only.csv"),
        "broken.json": (b'{"photo": ["a cat",', "cannot read prompts from .*broken.json: JSONDecodeError"),
        "empty.json": (b"[]", "no prompts in .*empty.json"),
        "broken.parquet": (b"PAR1 not really", "cannot read prompts from .*broken.parquet"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(_argv(models, tmp_path / name, tmp_path / "out"))
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert re.search(message, err), (name, err)
    assert not (tmp_path / "out" / "images").exists()


def test_a_model_that_does_not_load_is_one_line(evaluate, models, prompt_file, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["other"], broken)
    shutil.rmtree(broken / "unet")  # model_index.json still names a unet
    out = tmp_path / "out"
    argv = _argv(models, prompt_file, out)
    argv[argv.index(f"other={models['other']}")] = f"other={broken}"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(argv)
    assert exit_info.value.code == 1
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert "could not load model 'other'" in line and str(broken) in line
    assert len(list((out / "images").rglob("*.png"))) == 6  # the baseline's images are kept


def test_nan_score_stops_with_a_clear_error(evaluate, models, prompt_file, monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    _count_scoring(monkeypatch, nan_image=1)  # the second image of model base
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(_argv(models, prompt_file, out))
    assert exit_info.value.code == 1
    [line] = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert "scorer shapes gave NaN or infinite scores for 1 of 6 images of model base" in line
    assert not (out / "summary.json").exists()

    calls = _count_scoring(monkeypatch)  # a healthy rerun scores only the NaN image and model other
    summary = evaluate.main(_argv(models, prompt_file, out))
    assert calls == [1, 4, 2]
    assert summary["scores"]["base"]["shapes"]["n"] == 6
