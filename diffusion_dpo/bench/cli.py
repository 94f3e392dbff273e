"""``python -m diffusion_dpo.bench``: time the trainer's Diffusion-DPO step per configuration.

    python -m diffusion_dpo.bench --arch tiny --resolution 64 --batch_pairs 4    # CPU: minutes
    python -m diffusion_dpo.bench --arch sd15 --batch_pairs 16                    # GPU, bf16, 512 px
    python -m diffusion_dpo.bench --arch sdxl --preset sdxl_80gb                  # SDXL memory budget
    python -m diffusion_dpo.bench --arch sd35_medium --batch_pairs 4              # GPU, SD3.5 Medium, 1024 px
    python -m diffusion_dpo.bench --preset data --arch sd15 --batch_pairs 16      # the DataLoader alone

Rows (configurations), each measured in a fresh process (:mod:`diffusion_dpo.bench.measure`):

- ``paper_baseline``: as the Diffusion-DPO paper's ``train.py`` runs it: VAE and text encoder at every
  step, a separate full reference UNet (SD3: transformer) in the precision of the trained one,
  PyTorch's default AdamW (for SDXL, Adafactor and gradient checkpointing, which the paper's code turns
  on for SDXL);
- ``default``: what ``train_sd.py`` does with its defaults (its speed options that are on by default);
- ``full``: the full fine-tune with the speed options given on this command line;
- ``lora``: the same with LoRA (the reference is the UNet with adapters disabled: no second UNet);
- ``cached_latents``: ``full`` from precomputed latents and text embeddings, the encoders in CPU memory;
- ``mapo``: ``full`` with ``--objective mapo`` (no reference forward, no reference copy);
- ``loop``, ``loop_lora``: ``train()`` itself on JPEG pairs (``default`` and ``lora``'s configurations),
  data loading, logging and host syncs included (:mod:`diffusion_dpo.bench.whole_loop`); the table adds
  each one's loop overhead, whole loop − step.

Every row reports pairs per second (median over the timed optimizer steps after warm-up), peak memory,
and on GPU the model FLOPs utilisation; and its speed-up and memory ratio against the baseline row.
``--preset sdxl_80gb`` measures the memory budget of a full SDXL fine-tune instead, and ``--preset data``
the trainer's DataLoader alone (:mod:`diffusion_dpo.bench.loading`). Every row of an arch
runs with that arch's own options (``sd35_medium``: ``--drop_t5 --max_sequence_length 77``,
:mod:`diffusion_dpo.bench.archs`).

Why one module of ~460 lines: the rows of every step preset, the run that measures them and the table
that compares them read together (the ratios are relative to the first row); the data preset lives
in :mod:`.loading`, the measurement of one row in :mod:`.measure`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from diffusion_dpo.bench import archs
from diffusion_dpo.bench.rows import select_rows

logger = logging.getLogger("diffusion_dpo.bench")

GB = 1e9
#: what "fits in 80 GB" means for --preset sdxl_80gb: the peak reserved by PyTorch's allocator below 80·10⁹
#: bytes (the CUDA context's few hundred MB come on top)
BUDGET_80GB = 80 * GB
#: what a cached row's config names as its cache: setup_models then keeps the encoders in CPU memory, as
#: in a run from a cache (the batches are the benchmark's own)
_CACHE = "(synthetic cached batches of the benchmark)"


@dataclasses.dataclass
class Row:
    name: str
    description: str
    train: dict  # TrainConfig values
    cached_latents: bool = False
    skip: str | None = None  # why this row is not measured here
    step_row: str | None = None  # a whole-loop row (train() itself): the step row of the same configuration


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_dpo.bench",
        description="Time the trainer's Diffusion-DPO training step (compute_batch_loss + backward + "
        "optimizer step) per configuration: pairs/s, peak memory, MFU on GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--arch", choices=sorted(archs.ARCHS), default="tiny", help="Model architecture (random weights)."
    )
    p.add_argument(
        "--preset", choices=("compare", "sdxl_80gb", "data"), default="compare",
        help="compare: paper_baseline, default, full, lora (and cached_latents). sdxl_80gb: a full SDXL "
        "fine-tune's memory budget (bf16 reference, gradient checkpointing, fused or 8-bit AdamW, "
        "Adafactor). data: the trainer's DataLoader alone, from images (whole or streamed) and from a "
        "latent cache, per --workers count: can it feed the step?",
    )  # fmt: skip
    p.add_argument(
        "--rows", default=None, help="Comma-separated names of the rows to measure (default: all)."
    )
    p.add_argument("--resolution", type=int, default=None, help="Image size (default: the arch's own).")
    p.add_argument("--batch_pairs", type=int, default=None, help="Pairs per step (default 4; sdxl_80gb: 1).")
    p.add_argument(
        "--mixed_precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
        help="Precision of every row: auto is bf16 on CUDA and no (fp32) on CPU.",
    )  # fmt: skip
    speed = p.add_argument_group("speed options of the full and lora rows (trainer flags of the same names)")
    speed.add_argument("--gradient_checkpointing", action="store_true")
    speed.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    speed.add_argument(
        "--compile", action="store_true", help="torch.compile the trained UNet (--compile_unet)."
    )
    speed.add_argument("--channels_last", action="store_true")
    speed.add_argument("--use_8bit_adam", action="store_true")
    speed.add_argument("--use_adafactor", action="store_true")
    speed.add_argument(
        "--adam_implementation", choices=("auto", "fused", "foreach", "for_loop"), default=None
    )
    speed.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls (all rows).")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the trainer's).")
    p.add_argument(
        "--warmup", type=int, default=3, help="Untimed optimizer steps first (compilation, caches)."
    )
    p.add_argument(
        "--steps", type=int, default=10, help="Timed optimizer steps; pairs/s is from their median."
    )
    p.add_argument(
        "--repeats", type=int, default=1,
        help="Measure every row this many times, the rows in turn, and report each row's run of median "
        "speed (for shared or noisy machines).",
    )  # fmt: skip
    p.add_argument("--output", default=None, help="Write the rows as a JSON list to this file.")
    p.add_argument(
        "--peak_tflops", type=float, default=None, help="Device peak for MFU, instead of the table."
    )
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads per row (default: torch's).")
    data = p.add_argument_group("--preset data")
    data.add_argument(
        "--workers", default=None,
        help="Comma-separated --dataloader_num_workers values (default: 0 and powers of two up to the CPUs).",
    )  # fmt: skip
    data.add_argument(
        "--source_size", type=int, default=None,
        help="Side of the source JPEGs, decoded and resized to --resolution (default: --resolution); also "
        "the JPEGs of the whole-loop rows (loop, loop_lora).",
    )  # fmt: skip
    p.add_argument(
        "--model_dir", default="outputs/bench_models", help="Where the random-weight models are built, once."
    )
    return p


def check_args(args, device: str) -> None:
    """Refuse, with the reason, what cannot run here (``ValueError``)."""
    from diffusion_dpo.training.models import check_xformers
    from diffusion_dpo.training.optim import check_8bit_adam

    if args.device == "cuda" and device != "cuda":
        raise ValueError("--device cuda: no CUDA GPU is visible to torch here")
    if args.enable_xformers_memory_efficient_attention:
        check_xformers(device)
    if args.use_8bit_adam:
        check_8bit_adam(device)
    if args.use_8bit_adam and args.adam_implementation not in (None, "auto"):
        raise ValueError(
            f"--use_8bit_adam brings its own kernels; drop --adam_implementation {args.adam_implementation}"
        )
    if args.use_adafactor and (args.use_8bit_adam or args.adam_implementation not in (None, "auto")):
        raise ValueError("--use_adafactor replaces AdamW: drop --use_8bit_adam and --adam_implementation")
    if args.mixed_precision == "fp16" and device == "cpu":
        raise ValueError("--mixed_precision fp16 needs a CUDA GPU (CPU autocast runs bf16); use bf16 or no")
    if args.warmup < 0 or args.steps < 1 or args.repeats < 1:
        raise ValueError("--warmup must be >= 0, --steps and --repeats >= 1")
    if args.preset == "sdxl_80gb" and not archs.is_sdxl(args.arch):
        raise ValueError(
            f"--preset sdxl_80gb is an SDXL budget; use --arch sdxl (or tiny_sdxl to test it), not {args.arch}"
        )


def build_rows(args, device: str, model_path: Path) -> list[Row]:
    """The configurations to measure, in order; the first is the baseline of the ratios."""
    sdxl = archs.is_sdxl(args.arch)
    family = archs.family(args.arch)
    precision = args.mixed_precision
    if precision == "auto":
        precision = "bf16" if device == "cuda" else "no"
    base = dict(
        pretrained_model_name_or_path=str(model_path),
        dataset_name="(synthetic batches of the benchmark)",
        resolution=args.resolution,
        train_batch_size=args.batch_pairs,
        mixed_precision=precision,
        allow_tf32=args.allow_tf32,
        learning_rate=1e-6,
        **archs.ARCHS[args.arch].train_options,
    )
    if sdxl:  # an fp16-safe VAE in the weight dtype, as configs/sdxl_lora.yaml and the paper's launcher use
        base["vae_model_name_or_path"] = str(model_path / "vae_fp16_safe")
    lora = {"use_lora": True, **({"rank": args.rank} if args.rank else {})}
    speed = {
        k: v for k, v in dict(
            gradient_checkpointing=args.gradient_checkpointing,
            enable_xformers_memory_efficient_attention=args.enable_xformers_memory_efficient_attention,
            compile_unet=args.compile, channels_last=args.channels_last, use_8bit_adam=args.use_8bit_adam,
            use_adafactor=args.use_adafactor,
        ).items() if v
    }  # fmt: skip
    if args.adam_implementation:
        speed["adam_implementation"] = args.adam_implementation
    given = ", ".join(f"--{k}" for k in speed) or "no speed options given: the trainer's defaults"

    if args.preset == "sdxl_80gb":
        budget = dict(base, mixed_precision="fp16" if precision == "fp16" else "bf16")
        no_8bit = None
        try:
            from diffusion_dpo.training.optim import check_8bit_adam

            check_8bit_adam(device)
        except ValueError as err:
            no_8bit = str(err)
        rows = [
            Row("full_bf16", "full fine-tune, bf16 autocast, bf16 reference, fused AdamW (on CUDA)", budget),
            Row(
                "full_bf16_checkpointing", "+ gradient checkpointing",
                dict(budget, gradient_checkpointing=True),
            ),
            Row(
                "full_bf16_checkpointing_8bit_adam", "+ bitsandbytes' 8-bit AdamW (2 bytes of state per weight)",
                dict(budget, gradient_checkpointing=True, use_8bit_adam=True), skip=no_8bit,
            ),
            Row(
                "full_bf16_checkpointing_adafactor", "+ Adafactor instead (the paper's SDXL optimizer: factored "
                "second moments, almost no state)", dict(budget, gradient_checkpointing=True, use_adafactor=True),
            ),
            Row(
                "full_bf16_checkpointing_adafactor_cached", "+ precomputed latents: no VAE or text encoders on "
                "the GPU", dict(budget, gradient_checkpointing=True, use_adafactor=True, latents_cache=_CACHE),
                cached_latents=True,
            ),
            Row("lora_bf16_checkpointing", "LoRA for comparison", dict(budget, gradient_checkpointing=True, **lora)),
        ]  # fmt: skip
    else:
        if sdxl:  # the paper's train.py turns both on for SDXL (and offloads the reference to CPU)
            paper = dict(base, use_adafactor=True, gradient_checkpointing=True)
            optimizer = "Adafactor, gradient checkpointing (the paper's SDXL set-up; it also offloads the reference to CPU)"
        else:
            paper = dict(base, adam_implementation="foreach" if device == "cuda" else "for_loop")
            optimizer = "PyTorch's default AdamW"
        paper_note = f"VAE + text encoder every step, separate reference {family.denoiser_label}, {optimizer}"
        rows = [
            Row("paper_baseline", paper_note, paper),
            Row("default", "train_sd.py's defaults", dict(base)),
            Row("full", f"full fine-tune; {given}", dict(base, **speed)),
            Row("lora", f"LoRA, reference = adapters disabled; {given}", dict(base, **speed, **lora)),
        ]
        cached = (
            "full from precomputed latents and text embeddings (no VAE, no text encoder in the step; both in "
            "CPU memory, as a run from --latents_cache keeps them)"
        )
        from_cache = dict(base, **speed, latents_cache=_CACHE)
        rows.append(Row("cached_latents", cached, from_cache, cached_latents=True))
        mapo = (
            f"MaPO, full fine-tune without a reference {family.denoiser_label} (no reference forward, no "
            f"second copy); {given}"
        )
        rows.append(Row("mapo", mapo, dict(base, **speed, objective="mapo")))
        loop = "train() itself on JPEG pairs: data loading, schedule, logging, metrics.jsonl, host syncs"
        rows.append(Row("loop", f"{loop}; train_sd.py's defaults", dict(base), step_row="default"))
        rows.append(Row("loop_lora", f"{loop}; LoRA; {given}", dict(base, **speed, **lora), step_row="lora"))
    return select_rows(rows, args.rows, [r.name for r in rows])


def _flop_key(row: Row) -> tuple:
    t = row.train
    return (
        t["resolution"],
        t["train_batch_size"],
        t.get("use_lora", False),
        t.get("rank"),
        row.cached_latents,
        t.get("objective", "dpo"),
    )


def _row_process(module: str, spec_path: Path, result_path: Path) -> subprocess.CompletedProcess:
    # a fresh process per row: its memory baseline and peak are the row's alone
    return subprocess.run(
        [sys.executable, "-m", module, str(spec_path), str(result_path)], capture_output=True, text=True
    )


def _measure(row: Row, args, device: str, work: Path, shapes: dict | None = None) -> dict:
    """Run one row in a fresh process; its measurements, or ``{"status": ..., "error": ...}``."""
    spec = {
        "train": row.train, "cached_latents": row.cached_latents, "device": device, "warmup": args.warmup,
        "steps": args.steps, "threads": args.threads, "shapes": shapes, "source_size": args.source_size,
    }  # fmt: skip
    spec_path, result_path = work / f"{row.name}.spec.json", work / f"{row.name}.result.json"
    spec_path.write_text(json.dumps(spec))
    module = "diffusion_dpo.bench.whole_loop" if row.step_row else "diffusion_dpo.bench.measure"
    proc = _row_process(module, spec_path, result_path)
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        oom = "out of memory" in proc.stderr.lower() or "OutOfMemoryError" in proc.stderr
        return {"status": "out_of_memory" if oom else "failed", "error": tail}
    return {"status": "ok", **json.loads(result_path.read_text())}


def _environment(device: str) -> dict:
    import torch

    return {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "device": device,
    }


def run(args) -> list[dict]:
    import torch

    from diffusion_dpo.bench.hardware import compute_precision, peak_tflops
    from diffusion_dpo.bench.measure import cached_shapes, step_flops
    from diffusion_dpo.training.config import TrainConfig

    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    if args.resolution is None:
        args.resolution = archs.default_resolution(args.arch)
    if args.batch_pairs is None:
        args.batch_pairs = 1 if args.preset == "sdxl_80gb" else 4
    check_args(args, device)
    if args.preset == "data":
        from diffusion_dpo.bench import loading

        return loading.run(args, device, _environment(device))
    model_path = archs.ensure_model(args.arch, args.model_dir)
    rows = build_rows(args, device, model_path)
    env = _environment(device)
    flops: dict[tuple, int] = {}
    shapes: dict[tuple, dict] = {}  # a cached row's batch shapes
    results = []
    measured: dict[str, list[dict]] = {row.name: [] for row in rows}
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        # rows in turn, --repeats times: a slow spell of a shared machine then spreads over every row
        for repeat in range(args.repeats):
            for i, row in enumerate(rows, 1):
                if row.skip:
                    continue
                key = _flop_key(row)
                if row.cached_latents and key not in shapes:  # here, not in the measured process
                    shapes[key] = cached_shapes(TrainConfig(**row.train))
                if key not in flops:  # counted once per shape, before its first measurement
                    flops[key] = step_flops(TrainConfig(**row.train), row.cached_latents, shapes.get(key))
                what = f" (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
                logger.info("[%d/%d] measuring %s%s", i, len(rows), row.name, what)
                measured[row.name].append(_measure(row, args, device, Path(tmp), shapes.get(key)))
    for row in rows:
        out = {
            "name": row.name, "description": row.description,
            "config": {"arch": args.arch, **row.train, "cached_latents": row.cached_latents},
            "environment": env,
        }  # fmt: skip
        if row.skip:
            logger.info("%s: skipped (%s)", row.name, row.skip)
            results.append({**out, "status": "skipped", "note": row.skip})
            continue
        runs = measured[row.name]
        failed = [m for m in runs if m["status"] != "ok"]
        # the run of median speed, whole (its step times, memory and device belong together)
        chosen = failed[0] if failed else sorted(runs, key=lambda m: m["pairs_per_s"])[(len(runs) - 1) // 2]
        out.update(chosen)
        out["flops_per_step"] = flops[_flop_key(row)]
        if len(runs) > 1 and not failed:
            out["pairs_per_s_of_repeats"] = [m["pairs_per_s"] for m in runs]
        if chosen["status"] == "ok":
            cfg = TrainConfig(**row.train)
            out["achieved_tflops"] = out["flops_per_step"] / chosen["step_seconds_median"] / 1e12
            precision = compute_precision(cfg.mixed_precision, cfg.allow_tf32)
            if args.peak_tflops:
                peak, source = args.peak_tflops, f"--peak_tflops ({precision})"
            elif device == "cuda":
                peak, source = peak_tflops(chosen["device_name"], precision)
            else:
                peak, source = None, "no MFU on CPU"
            out.update(peak_tflops=peak, peak_tflops_source=source)
            out["mfu"] = out["achieved_tflops"] / peak if peak else None
            if args.preset == "sdxl_80gb":
                # what the caching allocator took from the GPU (on CPU: the peak), below 80·10⁹ bytes
                taken = chosen.get("peak_reserved_bytes", chosen["peak_memory_bytes"])
                out["fits_80gb"] = taken < BUDGET_80GB
        results.append(out)
    _add_ratios(results)
    _add_loop_overheads(results, rows)
    return results


def _add_loop_overheads(results: list[dict], rows: list[Row]) -> None:
    """A whole-loop row's ``loop_overhead_s``: its s/step minus its step row's (both medians), and that
    as a share of the step row's; None where either was not measured."""
    by_name = {r["name"]: r for r in results}
    for row in rows:
        if row.step_row is None:
            continue
        r, step = by_name[row.name], by_name.get(row.step_row)
        r["step_row"] = row.step_row
        ok = r["status"] == "ok" and step is not None and step["status"] == "ok"
        r["loop_overhead_s"] = r["step_seconds_median"] - step["step_seconds_median"] if ok else None
        r["loop_overhead_fraction"] = r["loop_overhead_s"] / step["step_seconds_median"] if ok else None


def _add_ratios(results: list[dict]) -> None:
    base = next((r for r in results if r["status"] == "ok"), None)
    for r in results:
        r["baseline"] = base["name"] if base else None
        ok = base is not None and r["status"] == "ok"
        r["speedup_vs_baseline"] = r["pairs_per_s"] / base["pairs_per_s"] if ok else None
        r["memory_ratio_vs_baseline"] = r["peak_memory_bytes"] / base["peak_memory_bytes"] if ok else None
        if r["status"] == "ok":  # what the set-up holds, without activations
            r["static_memory_bytes"] = sum(r["memory_breakdown_bytes"].values())


def format_table(results: list[dict], args) -> str:
    """The rows as a text table, with the set-up, the device and the peak the MFU is against."""
    first = results[0]
    env, cfg = first["environment"], first["config"]
    ok = [r for r in results if r["status"] == "ok"]
    device = ok[0]["device_name"] if ok else env["device"]
    threads = f", {ok[0]['torch_threads']} torch threads" if ok and env["device"] == "cpu" else ""
    lines = [
        f"Diffusion-DPO training step, {args.arch} ({archs.ARCHS[args.arch].description})",
        f"{cfg['resolution']} px, {cfg['train_batch_size']} pairs per step, mixed precision "
        f"{cfg['mixed_precision']}; median of {args.steps} optimizer steps after {args.warmup} warm-up",
        f"device: {device}{threads}; torch {env['torch']}; {env['date']}",
    ]
    for source in sorted({r["peak_tflops_source"] for r in ok if r.get("peak_tflops")}):
        value = next(r["peak_tflops"] for r in ok if r.get("peak_tflops_source") == source)
        lines.append(f"MFU against {value:g} TFLOP/s ({source}); model FLOPs counted on the meta device")
    if env["device"] == "cuda":
        lines.append("peak memory: torch.cuda.max_memory_allocated")
    else:
        lines.append("peak memory: the row's process's peak resident set size minus its size after imports")
    width = max(34, *(len(r["name"]) for r in results))
    header = (
        f"{'row':<{width}} {'pairs/s':>9} {'s/step':>8} {'vs ' + str(first.get('baseline')):>20} "
        f"{'peak mem':>10} {'mem ratio':>9} {'static':>9} {'TFLOP/s':>8} {'MFU':>6}  notes"
    )
    lines += ["", header, "-" * len(header)]
    for r in results:
        if r["status"] != "ok":
            why = r.get("note") or (r.get("error") or "").strip().splitlines()[-1:]
            lines.append(f"{r['name']:<{width}} {r['status']}: {why}")
            continue
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
        notes = r["description"]
        if r.get("fits_80gb") is not None:
            notes = ("fits 80 GB; " if r["fits_80gb"] else "over 80 GB; ") + notes
        if r.get("nonfinite_steps"):
            notes += f"; {r['nonfinite_steps']} non-finite steps"
        lines.append(
            f"{r['name']:<{width}} {r['pairs_per_s']:>9.3f} {r['step_seconds_median']:>8.4f} "
            f"{r['speedup_vs_baseline']:>19.2f}x "
            f"{_size(r['peak_memory_bytes']):>10} {r['memory_ratio_vs_baseline']:>9.2f} "
            f"{_size(r['static_memory_bytes']):>9} {r['achieved_tflops']:>8.3f} {mfu:>6}  {notes}"
        )
    loops = [r for r in results if r.get("step_row")]
    if loops:
        lines += ["", "loop overhead per optimizer step (whole loop - step, medians; s/step above):"]
    for r in loops:
        if r.get("loop_overhead_s") is None:
            lines.append(f"  {r['name']}: not measured (its step row {r['step_row']} or itself)")
            continue
        loop_s, overhead = r["step_seconds_median"], r["loop_overhead_s"]
        lines.append(
            f"  {r['name']}: {loop_s:.4f} - {r['step_row']} {loop_s - overhead:.4f} = {overhead:+.4f} s "
            f"({r['loop_overhead_fraction']:+.1%} of the step)"
        )
    lines += [
        "",
        "static memory: trained weights + gradients + optimizer states + reference UNet + frozen parts",
    ]
    for r in ok:
        parts = ", ".join(f"{k.replace('_', ' ')} {_size(v)}" for k, v in r["memory_breakdown_bytes"].items())
        rest = r["peak_memory_bytes"] - r["static_memory_bytes"]
        lines.append(f"  {r['name']}: {parts}; rest of the peak (activations, workspace) {_size(rest)}")
    return "\n".join(lines)


def _size(n: float) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= GB else f"{n / 1e6:.1f} MB"


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    logger.setLevel(logging.INFO)  # progress lines; the trainer's own INFO lines stay quiet
    try:
        results = run(args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if args.preset == "data":
        from diffusion_dpo.bench import loading

        print(loading.format_table(results, args))
    else:
        print(format_table(results, args))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    return results
