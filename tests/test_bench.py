"""The benchmark (``python -m diffusion_dpo.bench``) and the trainer's speed options.

Only that things run, are wired and count right: speed claims come from the benchmark on a quiet
machine, never from a timed test. Runs are tiny (32 px, one pair, one or two steps).
"""

import json
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from diffusion_dpo.bench import archs, cli
from diffusion_dpo.bench.hardware import compute_precision, peak_tflops
from diffusion_dpo.bench.measure import cached_shapes, count_flops, make_batch, memory_breakdown, step_flops
from diffusion_dpo.training.collectives import StepWindow
from diffusion_dpo.training.config import TrainConfig, build_parser, parse_config
from diffusion_dpo.training.models import check_xformers, setup_models
from diffusion_dpo.training.optim import adam_kernel_kwargs, make_optimizer
from diffusion_dpo.training.step import compute_batch_loss

#: every row but the whole-loop ones (train() itself: tested once, on SD1.5, in its own test)
STEP_ROWS = ["paper_baseline", "default", "full", "lora", "cached_latents", "mapo"]
TINY_ARGS = ["--resolution", "32", "--batch_pairs", "1", "--warmup", "1", "--steps", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_models")


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the rows' processes


@pytest.fixture
def rows_in_this_process(monkeypatch):
    """Each row runs in the test's process instead of a fresh one. On a 2-core VM a row's own process
    spends ~10 s importing torch, diffusers and transformers and a second measuring a tiny step; what
    a fresh process adds (a memory baseline and peak of the row's own) is tested with real processes, a
    step row's and the whole-loop rows', by test_the_loop_rows_run_train_itself_and_report_the_loops_overhead_over_the_step."""
    import importlib
    import subprocess
    import traceback

    from trainer_runs import reset_accelerate

    def in_process(module, spec_path, result_path):
        threads, environ = torch.get_num_threads(), dict(os.environ)  # a loop row sets ACCELERATE_USE_CPU
        try:
            importlib.import_module(module).main([str(spec_path), str(result_path)])
            return subprocess.CompletedProcess([module], 0, "", "")
        except Exception:
            return subprocess.CompletedProcess([module], 1, "", traceback.format_exc())
        finally:
            torch.set_num_threads(threads)
            os.environ.clear()
            os.environ.update(environ)
            reset_accelerate()

    monkeypatch.setattr(cli, "_row_process", in_process)


def test_cli_runs_the_comparison_rows_and_writes_json(model_dir, tmp_path, capsys, rows_in_this_process):
    out = tmp_path / "bench.json"
    cli.main(["--arch", "tiny", *TINY_ARGS, "--model_dir", str(model_dir), "--output", str(out)])
    rows = json.loads(out.read_text())
    assert [r["name"] for r in rows] == [
        "paper_baseline",
        "default",
        "full",
        "lora",
        "cached_latents",
        "mapo",
        "loop",
        "loop_lora",
    ]
    for row in rows:
        assert row["status"] == "ok", row.get("error")
        for key in (
            "config",
            "pairs_per_s",
            "peak_memory_bytes",
            "speedup_vs_baseline",
            "memory_ratio_vs_baseline",
        ):
            assert row[key] is not None, key
        assert row["pairs_per_s"] > 0 and row["peak_memory_bytes"] > 0 and row["flops_per_step"] > 0
        assert row["baseline"] == "paper_baseline" and row["mfu"] is None  # no MFU on CPU
    assert rows[0]["speedup_vs_baseline"] == 1.0 and rows[0]["memory_ratio_vs_baseline"] == 1.0
    # the baseline is the paper's set-up, the default row the trainer's defaults, lora has no reference
    assert rows[0]["config"]["adam_implementation"] == "for_loop"
    assert "adam_implementation" not in rows[1]["config"] and not rows[1]["config"].get("use_lora")
    assert rows[3]["config"]["use_lora"] and rows[3]["memory_breakdown_bytes"]["reference_unet"] == 0
    assert rows[0]["memory_breakdown_bytes"]["reference_unet"] > 0
    # LoRA trains and keeps optimizer states for the adapters only
    assert rows[3]["static_memory_bytes"] < 0.6 * rows[2]["static_memory_bytes"]
    # from precomputed latents: the same step without the VAE and text encoder
    assert rows[4]["config"]["cached_latents"] and 0 < rows[4]["flops_per_step"] < rows[2]["flops_per_step"]
    # MaPO: no reference UNet in memory and no reference forward in the step
    assert (
        rows[5]["config"]["objective"] == "mapo" and rows[5]["memory_breakdown_bytes"]["reference_unet"] == 0
    )
    assert 0 < rows[5]["flops_per_step"] < rows[2]["flops_per_step"]
    table = capsys.readouterr().out
    for name in ("paper_baseline", "default", "full", "lora", "pairs/s", "peak mem"):
        assert name in table


def test_the_loop_rows_run_train_itself_and_report_the_loops_overhead_over_the_step(
    model_dir, tmp_path, capsys
):
    """The whole-loop rows run train() on JPEG pairs for warm-up + timed optimizer steps (counted by
    the optimizer hook, and train()'s own metrics.jsonl has a row for each step before the last, after
    which the hook stops it); their s/step is the median gap between optimizer steps, and the overhead
    is whole loop − step of the same configuration, as the table prints it (none without the step row)."""
    import math

    out = tmp_path / "bench.json"
    argv = ["--arch", "tiny", "--resolution", "32", "--batch_pairs", "2", "--warmup", "1", "--steps", "3"]
    argv += ["--threads", "1", "--rows", "default,loop,loop_lora", "--source_size", "48"]
    cli.main([*argv, "--model_dir", str(model_dir), "--output", str(out)])
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == ["default", "loop", "loop_lora"]
    table = capsys.readouterr().out
    for name in ("loop", "loop_lora"):
        loop = rows[name]
        assert loop["status"] == "ok", loop.get("error")
        assert loop["config"]["train_batch_size"] == 2 and loop["config"].get("use_lora", False) == (
            name == "loop_lora"
        )
        assert loop["optimizer_steps"] == 1 + 3 and loop["metrics_rows"] == 1 + 3 - 1
        assert len(loop["step_seconds"]) == 3
        assert loop["step_seconds_median"] == sorted(loop["step_seconds"])[1]
        for value in (loop["step_seconds_median"], loop["pairs_per_s"], loop["peak_memory_bytes"]):
            assert math.isfinite(value) and value > 0
        assert loop["pairs_per_s"] == pytest.approx(2 / loop["step_seconds_median"])
        assert loop["memory_breakdown_bytes"]["optimizer_states"] > 0
    loop, step = rows["loop"], rows["default"]
    assert loop["step_row"] == "default" and loop["memory_breakdown_bytes"] == step["memory_breakdown_bytes"]
    assert loop["loop_overhead_s"] == loop["step_seconds_median"] - step["step_seconds_median"]
    assert loop["loop_overhead_fraction"] == pytest.approx(
        loop["loop_overhead_s"] / step["step_seconds_median"]
    )
    assert "loop overhead per optimizer step" in table
    assert (
        f"  loop: {loop['step_seconds_median']:.4f} - default {step['step_seconds_median']:.4f} = " in table
    )
    # the LoRA loop's step row (lora) was not measured: no overhead, and the table says so
    assert rows["loop_lora"]["step_row"] == "lora" and rows["loop_lora"]["loop_overhead_s"] is None
    assert "  loop_lora: not measured" in table
    # the GPU suite's first command (the SD1.5 comparison) measures the loop rows
    from diffusion_dpo.bench import suite

    name, suite_args = suite.SUITE[0]
    args = cli.build_parser().parse_args([*suite_args, "--device", "cpu"])
    args.resolution, args.batch_pairs = 512, 16
    names = [r.name for r in cli.build_rows(args, "cpu", tmp_path)]
    assert name == "sd15_compare" and {"default", "loop", "lora", "loop_lora"} <= set(names)


def test_sdxl_80gb_preset_runs_on_cpu_with_the_tiny_sdxl_model(model_dir, tmp_path):
    """The SDXL memory-budget preset's code path, on the tiny SDXL-shaped model in bf16 on CPU; 8-bit
    Adam is reported as not available here rather than failing the run."""
    out = tmp_path / "budget.json"
    rows_wanted = "full_bf16_checkpointing,full_bf16_checkpointing_8bit_adam"
    cli.main(
        ["--arch", "tiny_sdxl", "--preset", "sdxl_80gb", "--rows", rows_wanted, *TINY_ARGS]
        + ["--model_dir", str(model_dir), "--output", str(out)]
    )
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    done = rows["full_bf16_checkpointing"]
    assert done["status"] == "ok", done.get("error")
    assert done["config"]["mixed_precision"] == "bf16" and done["config"]["gradient_checkpointing"]
    assert done["fits_80gb"] is True
    breakdown = done["memory_breakdown_bytes"]
    assert breakdown["reference_unet"] * 2 == breakdown["trained_weights"]  # bf16 reference, fp32 weights
    assert breakdown["optimizer_states"] >= 2 * breakdown["trained_weights"]  # AdamW: two fp32 moments
    assert rows["full_bf16_checkpointing_8bit_adam"]["status"] == "skipped"
    assert "bitsandbytes" in rows["full_bf16_checkpointing_8bit_adam"]["note"]


def test_the_80gb_decision_reads_what_the_allocator_reserved_against_80e9_bytes(
    model_dir, monkeypatch, capsys
):
    """--preset sdxl_80gb on hand-made measurements either side of 80·10⁹ bytes: a row fits when the
    peak the caching allocator reserved is below the budget, whatever it allocated (a row that
    allocated 78 GB but reserved 95 GB does not fit; exactly 80·10⁹ does not fit); where no reserved
    peak is reported (CPU), the peak memory decides. The table says which rows fit."""
    from diffusion_dpo.bench import measure

    memory = {  # row -> (peak allocated, peak reserved or None)
        "full_bf16": (78e9, 95e9),
        "full_bf16_checkpointing": (70e9, 80e9),
        "full_bf16_checkpointing_adafactor": (60e9, 79.9e9),
        "full_bf16_checkpointing_adafactor_cached": (81e9, None),
        "lora_bf16_checkpointing": (30e9, None),
    }

    def fake_measure(row, args, device, work, shapes=None):
        allocated, reserved = memory[row.name]
        out = {"status": "ok", "pairs_per_s": 1.0, "step_seconds_median": 1.0, "peak_memory_bytes": int(allocated),
               "device_name": "cpu", "memory_breakdown_bytes": {"x": 1}, "torch_threads": 1}  # fmt: skip
        return out if reserved is None else {**out, "peak_reserved_bytes": int(reserved)}

    monkeypatch.setattr(cli, "_measure", fake_measure)
    monkeypatch.setattr(measure, "step_flops", lambda cfg, cached, shapes=None: 1000)
    monkeypatch.setattr(measure, "cached_shapes", lambda cfg: {})
    argv = ["--arch", "tiny_sdxl", "--preset", "sdxl_80gb", "--rows", ",".join(memory), *TINY_ARGS]
    rows = {r["name"]: r for r in cli.main([*argv, "--model_dir", str(model_dir)])}
    assert {name: rows[name]["fits_80gb"] for name in memory} == {
        "full_bf16": False,
        "full_bf16_checkpointing": False,
        "full_bf16_checkpointing_adafactor": True,
        "full_bf16_checkpointing_adafactor_cached": False,
        "lora_bf16_checkpointing": True,
    }
    table = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()}
    assert "over 80 GB" in table["full_bf16"] and "fits 80 GB" in table["full_bf16_checkpointing_adafactor"]


def test_flop_count_matches_the_hand_count_on_cpu_and_meta():
    """conv 3→8 (3×3, same padding) on 2×3×6×6, then linear 288→10. Forward: conv 2·N·8·6·6·3·9,
    linear 2·N·288·10. Backward: the input needs no gradient, so the conv computes only its weight
    gradient (= its forward), the linear its weight and input gradients (2 × its forward)."""
    n = 2
    conv = 2 * n * 8 * 6 * 6 * 3 * 9
    linear = 2 * n * 288 * 10
    expected = (conv + linear) + (conv + 2 * linear)
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(288, 10)
        ).to(device)
        x = torch.randn(n, 3, 6, 6, device=device)
        assert count_flops(lambda m=model, x=x: m(x).sum().backward()) == expected


def test_meta_step_flops_equal_a_real_step_and_lora_needs_fewer(tiny_sd_path):
    """The model FLOPs of a DPO step counted on the meta device are those of the same step run on CPU
    (with the math attention kernel, which the counter sees as matmuls, as on meta)."""
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(tiny_sd_path), dataset_name="x", resolution=32, train_batch_size=2
    )
    meta = step_flops(cfg, cached=False)
    models = setup_models(cfg, "cpu")
    batch = make_batch(cfg, micro_conditioning=False)

    def step():
        loss, _ = compute_batch_loss(models, batch, cfg)
        loss.backward()

    with sdpa_kernel([SDPBackend.MATH]):
        assert count_flops(step) == meta > 0
    lora = step_flops(TrainConfig(**{**cfg.to_dict(), "use_lora": True}), cached=False)
    assert 0 < lora < meta  # no weight gradients for the frozen base


# ---- SD3 architectures --------------------------------------------------------------------------------


def test_tiny_sd3_runs_every_comparison_row(model_dir, tmp_path, rows_in_this_process):
    """The tiny SD3 model (MMDiT, two CLIPs and a T5) through every row: the flow objective, the
    transformer's reference, LoRA on its attention projections, and batches from a cache with pooled
    embeddings."""
    out = tmp_path / "bench_sd3.json"
    cli.main(
        [
            "--arch",
            "tiny_sd3",
            *TINY_ARGS,
            "--rows",
            ",".join(STEP_ROWS),
            "--model_dir",
            str(model_dir),
            "--output",
            str(out),
        ]
    )
    assert (model_dir / "tiny_sd3" / "text_encoder_3").is_dir()  # T5 runs in the uncached rows
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == STEP_ROWS
    for row in rows.values():
        assert row["status"] == "ok", row.get("error")
        assert row["pairs_per_s"] > 0 and row["flops_per_step"] > 0 and row["peak_memory_bytes"] > 0
        assert "drop_t5" not in row["config"]  # the trainer's default: with T5
    assert "reference transformer" in rows["paper_baseline"]["description"]
    assert rows["paper_baseline"]["memory_breakdown_bytes"]["reference_unet"] > 0
    for name in ("lora", "mapo"):
        assert rows[name]["memory_breakdown_bytes"]["reference_unet"] == 0
    assert 0 < rows["cached_latents"]["flops_per_step"] < rows["full"]["flops_per_step"]
    assert rows["cached_latents"]["config"]["latents_cache"]  # set up as a run from a cache


def test_a_cached_row_keeps_the_encoders_out_of_the_devices_memory(model_dir):
    """A run from a cache keeps the VAE and text encoders (SD3: T5 too) in CPU memory, and the memory
    breakdown counts what is on the step's device (the meta device stands in for a GPU)."""
    path = archs.ensure_model("tiny_sd3", model_dir)
    common = dict(pretrained_model_name_or_path=str(path), dataset_name="x", resolution=32)
    for cache, frozen in ((None, True), ("(cached)", False)):
        models = setup_models(TrainConfig(**common, latents_cache=cache), "meta")
        breakdown = memory_breakdown(models, torch.optim.AdamW(models.unet.parameters()))
        assert (breakdown["frozen_parts"] > 0) is frozen
        assert breakdown["trained_weights"] == breakdown["reference_unet"] > 0


def test_sd3_step_flops_on_meta_equal_a_real_step_also_from_a_cache(model_dir):
    """SD3's FLOPs counted on the meta device are those of the step run on CPU, from pixels and captions
    (VAE, two CLIPs, T5) and from a cache, whose batches carry the pooled embeddings SD3 needs."""
    path = archs.ensure_model("tiny_sd3", model_dir)
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(path), dataset_name="x", resolution=32, train_batch_size=2
    )
    models = setup_models(cfg, "cpu")
    assert not models.components.family.micro_conditioning
    shapes = cached_shapes(cfg)
    assert shapes["latent"][0] == 16 and shapes["pooled"] is not None  # SD3: both CLIPs' pooled outputs
    for cached in (False, True):
        batch = make_batch(cfg, micro_conditioning=False, shapes=shapes if cached else None)
        assert ("pooled_prompt_embeds" in batch) is cached and "original_sizes_w" not in batch

        def step(batch=batch):
            loss, _ = compute_batch_loss(models, batch, cfg)
            loss.backward()

        with sdpa_kernel([SDPBackend.MATH]):
            assert count_flops(step) == step_flops(cfg, cached=cached) > 0


def test_sd35_medium_is_the_published_architecture_without_t5():
    """The configs are the published ones (stabilityai/stable-diffusion-3.5-medium's config.json files);
    the 2.2B-parameter transformer is only instantiated on the meta device here."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    t, v = archs.SD35_MEDIUM_TRANSFORMER, archs.SD35_VAE
    published_transformer = {
        "num_layers": 24, "num_attention_heads": 24, "attention_head_dim": 64, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "qk_norm": "rms_norm",
        "dual_attention_layers": tuple(range(13)),
    }  # fmt: skip
    assert {k: t[k] for k in published_transformer} == published_transformer
    published_vae = {
        "latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609, "use_quant_conv": False,
        "use_post_quant_conv": False, "force_upcast": True, "sample_size": 1024,
        "block_out_channels": (128, 256, 512, 512),
    }  # fmt: skip
    assert {k: v[k] for k in published_vae} == published_vae
    assert archs.SD35_SCHEDULE == {"num_train_timesteps": 1000, "shift": 3.0}
    # the pooled projection is both CLIPs' projections concatenated (768 + 1280)
    clip_l, clip_g = archs.CLIP_L_TEXT, archs.CLIP_G_TEXT
    assert clip_l["projection_dim"] + clip_g["projection_dim"] == t["pooled_projection_dim"]
    assert (clip_g["hidden_size"], clip_g["num_hidden_layers"], clip_g["hidden_act"]) == (1280, 32, "gelu")

    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(t)
        pipe = archs.build_pipeline("sd35_medium")
    assert 2.2e9 < sum(p.numel() for p in transformer.parameters()) < 2.5e9
    assert len(transformer.transformer_blocks) == 24 and transformer.transformer_blocks[12].attn2 is not None
    assert transformer.transformer_blocks[13].attn2 is None
    assert pipe.text_encoder_3 is None and pipe.tokenizer_3 is None
    assert all(isinstance(e, CLIPTextModelWithProjection) for e in (pipe.text_encoder, pipe.text_encoder_2))
    assert dict(pipe.transformer.config)["dual_attention_layers"] == tuple(range(13))
    arch = archs.ARCHS["sd35_medium"]
    assert arch.family == "sd3" and arch.resolution == 1024 and "T5" in arch.description


def test_sd35_medium_rows_train_without_t5_at_the_real_sequence_length(tmp_path):
    """Every row (without building the model): --drop_t5 with 77 T5 positions; the paper baseline as for
    SD1.5 (no gradient checkpointing, no VAE swap); not the SDXL memory preset."""
    args = cli.build_parser().parse_args(["--arch", "sd35_medium", "--batch_pairs", "1"])
    args.resolution = archs.default_resolution("sd35_medium")
    rows = cli.build_rows(args, "cpu", tmp_path / "sd35_medium")
    assert [r.name for r in rows] == [*STEP_ROWS, "loop", "loop_lora"]
    for row in rows:
        assert row.train["drop_t5"] is True and row.train["max_sequence_length"] == 77
        assert row.train["resolution"] == 1024 and "vae_model_name_or_path" not in row.train
        TrainConfig(**row.train).validate()
    paper = rows[0].train
    assert paper["adam_implementation"] == "for_loop" and not paper.get("gradient_checkpointing")
    with pytest.raises(ValueError, match="use --arch sdxl"):
        cli.check_args(
            cli.build_parser().parse_args(["--arch", "sd35_medium", "--preset", "sdxl_80gb"]), "cpu"
        )


def test_sdxl_rows_use_the_papers_sdxl_optimizer_and_adafactor_is_an_option(tmp_path):
    """The paper's train.py trains SDXL with Adafactor and gradient checkpointing: so does the SDXL
    baseline row; the SDXL memory preset also measures Adafactor, and --use_adafactor reaches the
    full and lora rows (and refuses AdamW's kernel flags)."""
    args = cli.build_parser().parse_args(["--arch", "tiny_sdxl", "--batch_pairs", "2"])
    args.resolution = 64
    paper = cli.build_rows(args, "cpu", tmp_path / "m")[0]
    assert paper.train["use_adafactor"] and paper.train["gradient_checkpointing"]
    assert "adam_implementation" not in paper.train and "Adafactor" in paper.description
    TrainConfig(**paper.train).validate()
    args = cli.build_parser().parse_args(
        ["--arch", "tiny_sdxl", "--preset", "sdxl_80gb", "--batch_pairs", "1"]
    )
    args.resolution = 64
    budget = {r.name: r for r in cli.build_rows(args, "cpu", tmp_path / "m")}
    assert budget["full_bf16_checkpointing_adafactor"].train["use_adafactor"]
    cached = budget["full_bf16_checkpointing_adafactor_cached"]
    assert cached.cached_latents and cached.train["latents_cache"] and cached.train["use_adafactor"]
    args = cli.build_parser().parse_args(["--arch", "tiny", "--use_adafactor", "--batch_pairs", "2"])
    args.resolution = 64
    rows = {r.name: r for r in cli.build_rows(args, "cpu", tmp_path / "m")}
    assert rows["full"].train["use_adafactor"] and rows["lora"].train["use_adafactor"]
    assert not rows["paper_baseline"].train.get("use_adafactor")
    bad = cli.build_parser().parse_args(
        ["--arch", "tiny", "--use_adafactor", "--adam_implementation", "fused"]
    )
    with pytest.raises(ValueError, match="--use_adafactor replaces AdamW"):
        cli.check_args(bad, "cpu")


def test_peak_table_and_precision():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.5
    assert peak_tflops("NVIDIA H200", "tf32")[0] == 494.7
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0
    assert peak_tflops("NVIDIA L40S", "fp16")[0] == 362.1
    assert peak_tflops("Some Future GPU", "bf16")[0] is None
    assert compute_precision("bf16", False) == "bf16" and compute_precision("no", True) == "tf32"
    assert compute_precision("no", False) == "fp32"


# ---- GPU-only options refuse to run where they cannot, with the reason ------------------------------


def test_xformers_needs_the_package_and_a_gpu(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a)
    )
    with pytest.raises(ValueError, match="needs the xformers package"):
        check_xformers("cuda")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "xformers" else real(name, *a)
    )
    with pytest.raises(
        ValueError, match="--enable_xformers_memory_efficient_attention runs on CUDA GPUs only"
    ):
        check_xformers("cpu")


def test_eight_bit_adam_without_bitsandbytes_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    cfg = TrainConfig(pretrained_model_name_or_path="m", dataset_name="d", use_8bit_adam=True)
    with pytest.raises(ValueError, match="--use_8bit_adam needs the bitsandbytes package"):
        make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(2))], 1e-3, "cpu")
    with pytest.raises(ValueError, match="--use_8bit_adam brings its own kernels"):
        parse_config(["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--use_8bit_adam"]
                     + ["--adam_implementation", "fused"])  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusals")
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--enable_xformers_memory_efficient_attention"], "--enable_xformers_memory_efficient_attention"),
        (["--use_8bit_adam"], "--use_8bit_adam"),
        (["--mixed_precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--preset", "sdxl_80gb"], "use --arch sdxl"),
    ],
)
def test_bench_refuses_gpu_only_options_on_cpu(model_dir, flags, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--arch", "tiny", *TINY_ARGS, "--model_dir", str(model_dir), *flags])
    assert message in str(exit_.value)


# ---- the trainer's speed options are wired ------------------------------------------------------------


def test_speed_flags_parse_and_are_documented():
    help_text = build_parser().format_help()
    for flag in ("--adam_implementation", "--use_8bit_adam", "--channels_last", "--compile_unet"):
        assert flag in help_text
    cfg = parse_config(
        ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--channels_last", "--compile_unet"]
        + ["--adam_implementation", "foreach", "--gradient_checkpointing"]
    )
    assert cfg.channels_last and cfg.compile_unet and cfg.gradient_checkpointing
    assert cfg.adam_implementation == "foreach"
    defaults = TrainConfig(pretrained_model_name_or_path="m", dataset_name="d")
    assert defaults.adam_implementation == "auto" and not defaults.use_8bit_adam
    assert not (defaults.channels_last or defaults.compile_unet)
    with pytest.raises(SystemExit):
        parse_config(
            ["--pretrained_model_name_or_path", "m", "--dataset_name", "d", "--adam_implementation", "x"]
        )


def test_adam_kernels_fused_by_default_on_cuda_foreach_elsewhere():
    assert adam_kernel_kwargs("auto", "cuda") == {"fused": True}
    # on CPU, the for-loop's update bit for bit: tests/test_optim.py
    assert adam_kernel_kwargs("auto", "cpu") == {"foreach": True}
    assert adam_kernel_kwargs("for_loop", "cuda") == {"foreach": False}
    cfg = TrainConfig(pretrained_model_name_or_path="m", dataset_name="d", adam_implementation="fused")
    optimizer = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))], 1e-3, "cpu")
    assert optimizer.defaults["fused"] is True and optimizer.defaults["lr"] == 1e-3


def test_channels_last_and_compile_are_applied_to_the_unets(tiny_sd_path):
    cfg = TrainConfig(
        pretrained_model_name_or_path=str(tiny_sd_path),
        dataset_name="d",
        channels_last=True,
        compile_unet=True,
    )
    models = setup_models(cfg, "cpu")
    for unet in (models.unet, models.ref_unet):
        weight = unet.conv_in.weight
        assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert models.unet._compiled_call_impl is not None  # compiled in place, lazily (nothing runs here)
    assert models.ref_unet._compiled_call_impl is None
    assert list(models.unet.state_dict())[0] == "conv_in.weight"  # no wrapper in the keys


class _OneProcess:
    num_processes = 1
    device = torch.device("cpu")


def test_the_step_reads_the_gradient_norm_with_the_metrics_in_one_sync():
    window = StepWindow()
    batch = {"captions": ["a", "b"], "valid": torch.tensor([True, False])}
    window.add(torch.tensor(0.5), {"loss": torch.tensor(0.5)}, batch)
    totals = window.reduce(_OneProcess(), stop=False, grad_norm=torch.tensor(2.5))
    assert totals["grad_norm"] == 2.5 and totals["metrics"]["loss"] == 0.5 and totals["skipped"] == 1
    assert totals["nonfinite"] is False and totals["stop"] is False
    import math

    assert math.isnan(StepWindow().reduce(_OneProcess(), stop=False)["grad_norm"])


#: Tensor methods that hand a tensor's value to Python: on a GPU each waits for the device (a host sync)
_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__", "numpy", "cpu"}


class _ReadsByLine(torch.overrides.TorchFunctionMode):
    """Counts the reads of tensor values made by the package's own lines, by (file, line, function)."""

    def __init__(self):
        super().__init__()
        import collections
        import os
        import sys

        import diffusion_dpo

        self.package = os.path.dirname(diffusion_dpo.__file__) + os.sep
        self.frame = sys._getframe
        self.sites = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in _READS:
            caller = self.frame(1)  # the line that asked for the value (torch's own reads are not ours)
            path = caller.f_code.co_filename
            if path.startswith(self.package):
                where = f"{path[len(self.package) :]}:{caller.f_code.co_name}"
                self.sites[(where, func.__name__)] += 1
        return func(*args, **(kwargs or {}))


def test_a_training_run_reads_device_values_once_per_optimizer_step(tmp_path, tiny_sd_path, one_thread):
    """train() for 3 optimizer steps of 2 micro-batches: the only read of a value the step computed on
    the device (loss, metrics, flags, gradient norm) is StepWindow.reduce's one ``tolist``, once per
    optimizer step. The other reads of the package are of the DataLoader's batch, which stays in host
    memory (the loader is not prepared): its valid-row count and its row indices, once per micro-batch.
    A ``.item()``, ``float()``, ``bool()`` ... of a tensor anywhere else in the step is a new line here.
    (On a GPU, ``torch.cuda.set_sync_debug_mode`` would see the syncs themselves; on CPU the reads are
    what can be counted.)"""
    from trainer_runs import tiny_run_flags

    from diffusion_dpo import synthetic
    from diffusion_dpo.training.loop import train

    data = synthetic.write_pair_dataset(tmp_path / "pairs.parquet", 24, seed=0)
    argv = tiny_run_flags(
        tiny_sd_path,
        data,
        tmp_path / "out",
        max_train_steps=3,
        train_batch_size=2,
        gradient_accumulation_steps=2,
    )
    reads = _ReadsByLine()
    with reads:
        summary = train(parse_config(argv))
    assert summary["global_step"] == 3
    assert dict(reads.sites) == {
        ("training/collectives.py:reduce", "tolist"): 3,  # the one host sync of each optimizer step
        ("training/collectives.py:add", "__int__"): 6,  # host: int(batch["valid"].sum())
        ("diffusion/draws.py:draw_for_rows", "tolist"): 6,  # host: the batch's row indices
    }


def test_the_data_preset_times_the_trainers_loader_from_images_streams_and_a_cache(model_dir, tmp_path):
    """--preset data: every row runs the trainer's own DataLoader (built by build_train_data) over the
    JPEG pairs it wrote, whole, streamed and from a latent cache encoded by the arch's model, with and
    without workers, and delivers the batches it counts."""
    out = tmp_path / "data.json"
    argv = ["--preset", "data", "--arch", "tiny_sdxl", "--resolution", "32", "--source_size", "40"]
    argv += ["--batch_pairs", "2", "--workers", "0,1", "--warmup", "1", "--steps", "2"]
    cli.main([*argv, "--model_dir", str(model_dir), "--output", str(out)])
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == [
        "images_w0", "images_streaming_w0", "cache_w0", "images_w1", "images_streaming_w1", "cache_w1",
    ]  # fmt: skip
    for row in rows.values():
        assert row["status"] == "ok", row.get("error")
        assert row["pairs"] == 4 and row["pairs_per_s"] > 0 and row["first_batch_seconds"] > 0
        assert row["config"]["source_size"] == 40 and row["config"]["train_batch_size"] == 2
    assert (
        rows["cache_w1"]["config"]["source"] == "cache" and rows["images_streaming_w1"]["config"]["streaming"]
    )
    with pytest.raises(SystemExit, match="--workers must list"):
        cli.main([*argv[:-6], "--workers", "-1"])
    with pytest.raises(SystemExit, match="no row named"):
        cli.main([*argv, "--rows", "images_w3"])


def test_the_data_presets_jpegs_decode_at_their_size_and_are_untied_pairs(tmp_path):
    """The source is Pick-a-Pic-shaped: captions, two JPEGs of the asked size, labels 0/1 summing to 1;
    textured, so they are far larger than flat drawings would be."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from diffusion_dpo.bench.loading import worker_counts, write_jpeg_pairs

    table = pq.read_table(write_jpeg_pairs(tmp_path / "p.parquet", 3, 96)).to_pylist()
    assert len(table) == 3
    for row in table:
        for column in ("jpg_0", "jpg_1"):
            image = Image.open(io.BytesIO(row[column]))
            assert image.format == "JPEG" and image.size == (96, 96)
            assert len(row[column]) > 96 * 96 / 4  # textured: over 2 bits per pixel
        assert row["label_0"] + row["label_1"] == 1.0 and row["label_0"] in (0.0, 1.0)
    assert worker_counts("0, 3") == [0, 3] and worker_counts(None)[0] == 0


def test_repeats_measure_the_rows_in_turn_and_report_each_rows_median_run(model_dir, monkeypatch):
    """--repeats 3: the rows are measured in turn three times (a slow spell spreads over all of them),
    and each row reports its run of median speed, whole, with the speeds of all three."""
    from diffusion_dpo.bench import measure

    order, speeds = [], {"paper_baseline": [10.0, 30.0, 20.0], "default": [5.0, 7.0, 6.0]}

    def fake_measure(row, args, device, work, shapes=None):
        order.append(row.name)
        speed = speeds[row.name][order.count(row.name) - 1]
        return {"status": "ok", "pairs_per_s": speed, "step_seconds_median": 1 / speed,
                "peak_memory_bytes": int(speed), "device_name": "cpu", "memory_breakdown_bytes": {"x": 1},
                "torch_threads": 1}  # fmt: skip

    monkeypatch.setattr(cli, "_measure", fake_measure)
    monkeypatch.setattr(measure, "step_flops", lambda cfg, cached, shapes=None: 1000)
    args = [
        "--arch",
        "tiny",
        "--rows",
        "paper_baseline,default",
        "--repeats",
        "3",
        "--model_dir",
        str(model_dir),
    ]
    rows = {r["name"]: r for r in cli.main(args)}
    assert order == ["paper_baseline", "default"] * 3
    assert rows["paper_baseline"]["pairs_per_s"] == 20.0 and rows["paper_baseline"]["peak_memory_bytes"] == 20
    assert rows["paper_baseline"]["pairs_per_s_of_repeats"] == [10.0, 30.0, 20.0]
    assert rows["default"]["pairs_per_s"] == 6.0 and rows["default"]["speedup_vs_baseline"] == 0.3
    with pytest.raises(SystemExit, match="--repeats >= 1"):
        cli.main([*args[:-2], "--repeats", "0"])


def test_to_device_converts_after_the_copy_and_pins_only_for_cuda():
    """Off CUDA a plain copy (pinning needs a CUDA driver: this CPU-only test would fail if it pinned);
    the dtype conversion happens after the move, to the same values as ``.to(device, dtype)``."""
    from diffusion_dpo.transfer import to_device

    x = torch.randn(4, 3)
    y = to_device(x, "cpu", torch.bfloat16)
    assert y.dtype == torch.bfloat16 and torch.equal(y, x.to("cpu", torch.bfloat16))
    assert to_device(x, "meta").device.type == "meta"


class _TransferCalls(torch.overrides.TorchFunctionMode):
    """Records the calls ``to_device`` makes on tensors, in order. The two that need a CUDA driver
    answer as the driver would without one being here: ``pin_memory`` gives a copy (a page-locked one
    on a GPU machine, reported pinned after), and a copy to ``cuda`` arrives on the meta device (which
    stands in for the GPU: shapes and dtypes, no values); everything else runs for real."""

    def __init__(self, pinned: list[torch.Tensor]):
        super().__init__()
        self.calls, self.held = [], list(pinned)  # held: the ids below stay those of these tensors
        self.pinned = {id(t) for t in pinned}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name == "is_pinned":
            self.calls.append(("is_pinned",))
            return id(args[0]) in self.pinned
        if name == "pin_memory":
            self.calls.append(("pin_memory", args[0].dtype))
            copy = args[0].clone()
            self.held.append(copy)
            self.pinned.add(id(copy))
            return copy
        if name == "to":
            target = [a for a in args[1:] if not isinstance(a, torch.dtype)]
            dtype = [a for a in args[1:] if isinstance(a, torch.dtype)]
            device = torch.device(target[0]) if target else None
            self.calls.append(
                ("to", device.type if device else None, dtype[0] if dtype else None,
                 kwargs.get("non_blocking", False), args[0].device.type, id(args[0]) in self.pinned)
            )  # fmt: skip
            if device is not None and device.type == "cuda":
                return func(args[0], "meta", *dtype)
        return func(*args, **kwargs)


@pytest.mark.parametrize("already_pinned", [False, True], ids=["pageable", "pinned_by_the_loader"])
def test_to_device_copies_to_cuda_from_pinned_memory_without_blocking_then_converts(already_pinned):
    """The CUDA path, seen at the calls torch exposes (no GPU here): a pageable CPU tensor is pinned,
    one the DataLoader pinned is not pinned again; the copy is ``non_blocking`` from the pinned tensor
    in its own dtype (float32: the conversion is not done on the host), and the dtype conversion comes
    after, on the device. Off CUDA nothing is pinned and nothing is asked."""
    from diffusion_dpo.transfer import to_device

    x = torch.randn(4, 3)
    with _TransferCalls(pinned=[x] if already_pinned else []) as calls:
        y = to_device(x, "cuda", torch.bfloat16)
    assert y.device.type == "meta" and y.dtype == torch.bfloat16 and y.shape == x.shape
    pin = [] if already_pinned else [("pin_memory", torch.float32)]
    assert calls.calls == [
        ("is_pinned",),
        *pin,
        ("to", "cuda", None, True, "cpu", True),  # non_blocking, from page-locked memory, still float32
        ("to", None, torch.bfloat16, False, "meta", False),  # converted on the device
    ]
    with _TransferCalls(pinned=[]) as calls:
        z = to_device(x, "cpu", torch.bfloat16)
    assert torch.equal(z, x.to(torch.bfloat16))
    assert [c[0] for c in calls.calls] == ["to", "to"] and not any(c[3] for c in calls.calls)


def test_the_suite_runs_its_commands_on_the_test_models_and_keeps_to_its_budget(model_dir, tmp_path):
    """`python -m diffusion_dpo.bench.suite --tiny`: the GPU suite's commands on the test models, each
    one's JSON and table written and gathered in summary.txt; a budget too small for a command skips
    it (listed) instead of starting it."""
    from diffusion_dpo.bench import suite

    assert suite.tiny_args(["--arch", "sd35_medium", "--batch_pairs", "16", "--workers", "0,4,8"]) == [
        "--arch", "tiny_sd3", "--batch_pairs", "2", "--workers", "0,1", "--resolution", "64",
        "--warmup", "1", "--steps", "2",
    ]  # fmt: skip
    out = tmp_path / "suite"
    done = suite.main(
        ["--output_dir", str(out), "--tiny", "--only", "sd35_medium,data_sd15", "--model_dir", str(model_dir)]
    )
    assert [(d["name"], d["status"]) for d in done] == [("sd35_medium", "ok"), ("data_sd15", "ok")]
    rows = json.loads((out / "sd35_medium.json").read_text())
    assert [r["name"] for r in rows] == ["paper_baseline", "full", "lora", "cached_latents"]
    assert all(r["status"] == "ok" and r["config"]["arch"] == "tiny_sd3" for r in rows)
    assert rows[1]["config"]["gradient_checkpointing"] and rows[1]["config"]["train_batch_size"] == 2
    summary = (out / "summary.txt").read_text()
    assert "== sd35_medium" in summary and "== data_sd15" in summary and "images_w1" in summary
    skipped = suite.main(
        ["--output_dir", str(tmp_path / "none"), "--tiny", "--budget_s", "10", "--only", "sd15_compare"]
    )
    assert [(d["name"], d["status"]) for d in skipped] == [("sd15_compare", "skipped")]
    assert skipped[0]["why"].endswith("s of the budget left")
    with pytest.raises(SystemExit, match="no command named"):
        suite.main(["--output_dir", str(tmp_path / "x"), "--only", "sd16"])


def test_flux_dev_is_the_published_architecture_and_its_rows_train_at_512_t5_tokens(tmp_path):
    """FLUX.1 [dev]'s configs are BFL's flux-dev params as diffusers names them; every row (without
    building the model) trains the flux family at 1024 px with T5's 512 tokens and guidance 3.5."""
    t, v = archs.FLUX1_DEV_TRANSFORMER, archs.FLUX1_VAE
    assert t["num_attention_heads"] * t["attention_head_dim"] == 3072 and sum(t["axes_dims_rope"]) == 128
    assert (t["num_layers"], t["num_single_layers"], t["in_channels"], t["guidance_embeds"]) == (
        19,
        38,
        64,
        True,
    )
    assert (t["joint_attention_dim"], t["pooled_projection_dim"]) == (archs.T5_XXL["d_model"], 768)
    assert (v["latent_channels"], v["scaling_factor"], v["shift_factor"]) == (16, 0.3611, 0.1159)
    assert v["block_out_channels"] == (128, 256, 512, 512)  # BFL's ch 128, ch_mult (1, 2, 4, 4)
    assert archs.FLUX1_SCHEDULE["use_dynamic_shifting"]
    assert archs.family("flux_dev").name == archs.family("tiny_flux").name == "flux"
    args = cli.build_parser().parse_args(["--arch", "flux_dev", "--batch_pairs", "1"])
    args.resolution = archs.default_resolution("flux_dev")
    rows = cli.build_rows(args, "cpu", tmp_path / "flux_dev")
    assert [r.name for r in rows] == [*STEP_ROWS, "loop", "loop_lora"]
    for row in rows:
        cfg = TrainConfig(**row.train)
        cfg.validate()
        assert cfg.resolution == 1024 and cfg.max_sequence_length is None  # the family's 512


def test_tiny_flux_runs_every_comparison_row(model_dir, tmp_path, rows_in_this_process):
    """The tiny FLUX.1 model through every row: packed latents, the guidance embedding, its LoRA targets,
    and batches from a cache with CLIP's pooled embedding."""
    out = tmp_path / "bench_flux.json"
    cli.main(
        [
            "--arch",
            "tiny_flux",
            *TINY_ARGS,
            "--rows",
            ",".join(STEP_ROWS),
            "--model_dir",
            str(model_dir),
            "--output",
            str(out),
        ]
    )
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert list(rows) == STEP_ROWS
    for row in rows.values():
        assert row["status"] == "ok", row.get("error")
        assert row["pairs_per_s"] > 0 and row["flops_per_step"] > 0 and row["peak_memory_bytes"] > 0
    assert 0 < rows["cached_latents"]["flops_per_step"] < rows["full"]["flops_per_step"]


@pytest.mark.slow
def test_flux_dev_parameters_and_step_flops_on_the_meta_device():
    """FLUX.1 [dev] built on the meta device (no memory): 11.9B transformer and 4.76B T5 parameters, and
    the model FLOPs of one DPO step on one cached pair at 1024 px, full (with its reference) and LoRA
    (diffusers' targets, rank 16). Measured: 595 and 477 TFLOPs."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from peft import LoraConfig

    from diffusion_dpo.models.families import FluxFamily
    from diffusion_dpo.models.loading import SDComponents
    from diffusion_dpo.training.models import Models

    with torch.device("meta"):
        pipe = archs.build_pipeline("flux_dev")
        ref = FluxTransformer2DModel(**archs.FLUX1_DEV_TRANSFORMER)

    def params(module):
        return sum(p.numel() for p in module.parameters())

    assert 11.8e9 < params(pipe.transformer) < 12.0e9 and 4.7e9 < params(pipe.text_encoder_2) < 4.8e9
    shapes = {"latent": [16, 128, 128], "text": [512, 4096], "pooled": [768]}
    flops = {}
    for lora in (False, True):
        cfg = TrainConfig(pretrained_model_name_or_path="x", dataset_name="x", resolution=1024,
                          train_batch_size=1, use_lora=lora, rank=16, latents_cache="cache")  # fmt: skip
        if lora:
            pipe.transformer.requires_grad_(False)
            pipe.transformer.add_adapter(
                LoraConfig(r=16, lora_alpha=16, target_modules=list(FluxFamily.lora_target_modules))
            )
        scheduler = FlowMatchEulerDiscreteScheduler(**archs.FLUX1_SCHEDULE)
        comps = SDComponents(pipe.transformer, pipe.vae, scheduler, family=FluxFamily())
        models = Models(comps, pipe.transformer, None if lora else ref, torch.float32)
        batch = make_batch(cfg, False, shapes)

        def step(models=models, batch=batch, cfg=cfg):
            loss, _ = compute_batch_loss(models, batch, cfg)
            loss.backward()

        flops[lora] = count_flops(step)
    assert 4e14 < flops[True] < flops[False] < 7e14
