"""``python -m diffusion_dpo.bench.suite``: every GPU row of docs/performance.md, in one go.

    python -m diffusion_dpo.bench.suite --output_dir bench_results            # a CUDA machine
    python -m diffusion_dpo.bench.suite --output_dir /tmp/s --tiny            # the same runs, test models

Runs the benchmark's commands in order of importance and writes each one's JSON rows and table to
``output_dir`` (``<name>.json``, ``<name>.txt``), then ``summary.txt`` with every table. ``--budget_s``
bounds the whole suite: a command that would start with too little time left is skipped and listed, so
a machine lent for a few minutes still returns the most important rows. ``--tiny`` swaps in the test
models at 64 px and a few steps (sd15 → tiny, sdxl → tiny_sdxl, sd35_medium → tiny_sd3), to check the
suite itself on CPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

#: (name, benchmark arguments), most important first: the issue's SD1.5 comparison (paper baseline,
#: full and LoRA in one run, MFU), SDXL full and LoRA at 1024 px, SD1.5 with the faster options (compiling
#: takes minutes per row), the 80 GB budget, SD3.5 Medium, and whether data loading keeps up
SUITE: tuple[tuple[str, list[str]], ...] = (
    ("sd15_compare", ["--arch", "sd15", "--batch_pairs", "16"]),
    ("sdxl_compare", ["--arch", "sdxl", "--batch_pairs", "2", "--gradient_checkpointing",
                      "--rows", "paper_baseline,full,lora,cached_latents"]),
    ("sd15_fast", ["--arch", "sd15", "--batch_pairs", "16", "--compile", "--channels_last",
                   "--rows", "paper_baseline,full,lora,cached_latents"]),
    ("sdxl_80gb", ["--arch", "sdxl", "--preset", "sdxl_80gb"]),
    ("sd35_medium", ["--arch", "sd35_medium", "--batch_pairs", "2", "--gradient_checkpointing",
                     "--rows", "paper_baseline,full,lora,cached_latents"]),
    ("data_sd15", ["--preset", "data", "--arch", "sd15", "--resolution", "512", "--source_size", "768",
                   "--batch_pairs", "16", "--workers", "0,4,8"]),
)  # fmt: skip

_TINY = {"sd15": "tiny", "sdxl": "tiny_sdxl", "sd35_medium": "tiny_sd3"}


def tiny_args(args: list[str]) -> list[str]:
    """A suite command on the test models: small archs, 64 px, 2 pairs, 1 warm-up and 2 timed steps,
    and in the data preset 1 worker instead of many."""
    out = [_TINY.get(a, a) for a in args]
    for flag, value in (
        ("--batch_pairs", "2"),
        ("--resolution", "64"),
        ("--source_size", "64"),
        ("--workers", "0,1"),
    ):
        if flag in out:
            out[out.index(flag) + 1] = value
        elif flag in ("--batch_pairs", "--resolution"):
            out += [flag, value]
    return [*out, "--warmup", "1", "--steps", "2"]


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m diffusion_dpo.bench.suite", description=__doc__.split("\n")[0]
    )
    p.add_argument("--output_dir", required=True, help="Where each command's JSON and table go.")
    p.add_argument(
        "--budget_s", type=float, default=None, help="Seconds for the whole suite (default: no bound)."
    )
    p.add_argument(
        "--min_left_s", type=float, default=90.0,
        help="Skip a command that would start with less time than this left in the budget.",
    )  # fmt: skip
    p.add_argument("--only", default=None, help=f"Comma-separated names of {[n for n, _ in SUITE]}.")
    p.add_argument(
        "--tiny", action="store_true", help="The test models, small and fast: checks the suite on CPU."
    )
    p.add_argument("--model_dir", default="outputs/bench_models", help="The benchmark's --model_dir.")
    args = p.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [n.strip() for n in args.only.split(",")] if args.only else [n for n, _ in SUITE]
    unknown = sorted(set(wanted) - {n for n, _ in SUITE})
    if unknown:
        sys.exit(f"error: --only: no command named {unknown}; the suite has {[n for n, _ in SUITE]}")
    started, done = time.monotonic(), []
    for name, bench_args in SUITE:
        if name not in wanted:
            continue
        left = None if args.budget_s is None else args.budget_s - (time.monotonic() - started)
        if left is not None and left < args.min_left_s:
            done.append({"name": name, "status": "skipped", "why": f"{left:.0f} s of the budget left"})
            print(f"[suite] {name}: skipped ({left:.0f} s left)", flush=True)
            continue
        command = [*(tiny_args(bench_args) if args.tiny else bench_args), "--model_dir", args.model_dir]
        command += ["--output", str(out / f"{name}.json")]
        print(f"[suite] {name}: python -m diffusion_dpo.bench {' '.join(command)}", flush=True)
        t0 = time.monotonic()
        try:
            result = subprocess.run(
                [sys.executable, "-m", "diffusion_dpo.bench", *command], capture_output=True, text=True,
                timeout=left,
            )  # fmt: skip
            status, text = (
                ("ok" if result.returncode == 0 else "failed"),
                result.stdout + result.stderr[-3000:],
            )
        except subprocess.TimeoutExpired as err:  # the budget ran out mid-command: keep what it printed
            printed = err.stdout or ""
            status, text = (
                "timed out",
                printed.decode(errors="replace") if isinstance(printed, bytes) else printed,
            )
        (out / f"{name}.txt").write_text(text)
        done.append({"name": name, "status": status, "seconds": time.monotonic() - t0})
        print(f"[suite] {name}: {status} in {time.monotonic() - t0:.0f} s", flush=True)
    lines = [
        f"{d['name']}: {d['status']}" + (f" ({d['why']})" if "why" in d else f", {d['seconds']:.0f} s")
        for d in done
    ]
    for d in done:
        if d["status"] != "skipped":
            lines += ["", f"== {d['name']}", (out / f"{d['name']}.txt").read_text().strip()]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    return done


if __name__ == "__main__":
    main()
