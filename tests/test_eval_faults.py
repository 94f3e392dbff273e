"""Evaluation faults: corrupt cached images, interrupted runs, missing scorer weights, bad inputs.

Two tiny random SD pipelines render 3 shapes prompts × 2 seeds at 32 px in 2 steps (batches of 2);
the shapes scorer (no weights) scores them in chunks of 4. Pipeline and scorer calls are counted by
wrapping ``load_pipeline`` / ``load_scorer``; an interruption is an exception raised from inside the
k-th call, or a subprocess killed with SIGKILL while it scores.
"""

from __future__ import annotations

import importlib.util
import json
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
