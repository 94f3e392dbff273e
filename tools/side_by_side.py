#!/usr/bin/env python
"""Seconds per optimizer step of the paper's, diffusers' and our Diffusion-DPO trainers on the same work.

    python tools/side_by_side.py                      # downloads the two reference scripts (pinned)
    python tools/side_by_side.py --paper_repo DIR --diffusers_repo DIR   # from local clones / git dirs

Compared, each as the whole training script a user runs (data loading, logging and the host syncs of
its own loop included): the paper's ``train.py`` (SalesforceAIResearch/DiffusionDPO: full fine-tune
with a frozen reference UNet), diffusers' ``examples/research_projects/diffusion_dpo/
train_diffusion_dpo.py`` (LoRA; the reference is the UNet with its adapters disabled), and
``train_sd.py`` full fine-tune and LoRA. All four get the same tiny SD1.5-shaped pipeline and the same
Pick-a-Pic-format parquet, built here; the same resolution, pairs per step, β (diffusers' script takes
it at half the paper's scale), learning rate, AdamW settings, steps and torch threads; fp32; no
gradient accumulation, checkpoint, validation or tracker within the measured steps.

The reference scripts are read from their public repositories at run time (never kept in this repo)
into ``OUTPUT_DIR/reference/``; the commit used is recorded. How each run is timed: a runner
(``--_run``, this file) registers a global optimizer-step post-hook that records
``time.perf_counter()`` at every optimizer step and runs the script with ``runpy`` as ``__main__``; a
run's s/step is the median of the gaps between consecutive steps after the warm-up steps. Runs
alternate: each round runs every trainer once, the order rotated per round; a trainer's figure is the
median of its run medians, and each ratio comes with a 95% bootstrap interval over rounds. Results:
``OUTPUT_DIR/results.md`` and ``results.json``.

A reference script that cannot run as it is (the paper's requires xformers, diffusers' imports wandb)
is patched at run time by the runner, never edited; every patch applied is named in the results.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import platform
import runpy
import shutil
import statistics
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

logger = logging.getLogger("side_by_side")

ROOT = Path(__file__).resolve().parents[1]

#: The reference scripts: repository, path in it, and the commit downloaded by default.
REFERENCES = {
    "paper": {
        "repo": "SalesforceAIResearch/DiffusionDPO",
        "path": "train.py",
        "commit": "5233e75919f912f3f631958ee4ebb5b5204382d9",
    },
    "diffusers": {
        "repo": "huggingface/diffusers",
        "path": "examples/research_projects/diffusion_dpo/train_diffusion_dpo.py",
        "commit": "58eb52c0803ea9af3abec60841c2a093bdf1f951",
    },
}

#: The trainers in the order of the first round, and how the table names them.
TRAINERS = {
    "paper": "the paper's `train.py` (full fine-tune, frozen reference)",
    "ours_full": "ours, full fine-tune (`train_sd.py`)",
    "diffusers": "diffusers' `train_diffusion_dpo.py` (LoRA)",
    "ours_lora": "ours, LoRA (`train_sd.py --use_lora`)",
}

#: (ours, theirs) pairs doing the same work, reported as the ratio ours / theirs.
RATIOS = (("ours_full", "paper"), ("ours_lora", "diffusers"))


# --- the runner: one training script, timed per optimizer step -------------------------------------


@contextlib.contextmanager
def _no_trackers(applied: list[str]) -> Iterator[None]:
    """Every ``Accelerator`` without trackers, whatever ``log_with`` the script passes: the reference
    scripts default to tensorboard, and "none" is not a value accelerate accepts."""
    import accelerate

    original = accelerate.Accelerator.__init__

    def init(self, *args, **kwargs):
        kwargs["log_with"] = None
        original(self, *args, **kwargs)

    accelerate.Accelerator.__init__ = init
    applied.append("no_trackers: Accelerator(log_with=None)")
    try:
        yield
    finally:
        accelerate.Accelerator.__init__ = original


def _xformers_usable() -> bool:
    import torch

    try:
        import xformers  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@contextlib.contextmanager
def _xformers_noop(applied: list[str]) -> Iterator[None]:
    """The paper's script raises unless xformers is installed and then enables it on the UNet; where
    xformers cannot run (not installed, or no CUDA) the UNet keeps PyTorch's attention (SDPA), as ours
    does by default."""
    if _xformers_usable():
        yield
        return
    import diffusers
    import diffusers.utils.import_utils as import_utils

    saved_module = sys.modules.get("xformers")
    saved_available = import_utils.is_xformers_available
    saved_enable = diffusers.UNet2DConditionModel.enable_xformers_memory_efficient_attention
    stub = types.ModuleType("xformers")
    stub.__version__ = "0.0.0+side_by_side_stub"
    sys.modules["xformers"] = stub
    import_utils.is_xformers_available = lambda: True
    diffusers.UNet2DConditionModel.enable_xformers_memory_efficient_attention = lambda self, *a, **k: None
    applied.append(
        "xformers_noop: is_xformers_available() -> True, a stub `xformers` module, "
        "UNet2DConditionModel.enable_xformers_memory_efficient_attention -> no-op (PyTorch attention)"
    )
    try:
        yield
    finally:
        import_utils.is_xformers_available = saved_available
        diffusers.UNet2DConditionModel.enable_xformers_memory_efficient_attention = saved_enable
        if saved_module is None:
            sys.modules.pop("xformers", None)
        else:
            sys.modules["xformers"] = saved_module


@contextlib.contextmanager
def _wandb_stub(applied: list[str]) -> Iterator[None]:
    """diffusers' script imports wandb at the top (it only uses it for validation images)."""
    try:
        import wandb  # noqa: F401

        yield
        return
    except ImportError:
        pass
    import importlib.machinery

    import accelerate  # noqa: F401  (their "is wandb installed" checks run first, and see that it is not)
    import diffusers  # noqa: F401

    stub = types.ModuleType("wandb")
    stub.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    sys.modules["wandb"] = stub
    applied.append("wandb_stub: an empty `wandb` module (wandb is not installed; used only for validation)")
    try:
        yield
    finally:
        sys.modules.pop("wandb", None)


PATCHES: dict[str, Callable[[list[str]], contextlib.AbstractContextManager]] = {
    "no_trackers": _no_trackers,
    "xformers_noop": _xformers_noop,
    "wandb_stub": _wandb_stub,
}


def _exit_code(code) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def run_script(
    script: str | Path,
    argv: Sequence[str],
    out_json: str | Path | None = None,
    patches: Sequence[str] = (),
    threads: int | None = None,
) -> dict:
    """Run ``script`` as ``__main__`` with ``argv``, recording ``time.perf_counter()`` at every optimizer
    step (a global ``register_optimizer_step_post_hook``); returns (and writes to ``out_json``) the
    timestamps, the exit code, the patches applied and what the stepping optimizer trained.

    The script sees ``sys.argv = [script, *argv]`` and its own folder first on ``sys.path``, as under
    ``python script``. ``threads``: ``torch.set_num_threads`` before it starts."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    unknown = [p for p in patches if p not in PATCHES]
    if unknown:
        raise ValueError(f"unknown patches {unknown}; known: {sorted(PATCHES)}")
    if threads is not None:
        torch.set_num_threads(threads)
    script = Path(script).resolve()
    stamps: list[float] = []
    record: dict = {"script": str(script), "argv": list(argv), "optimizers": []}

    def on_step(optimizer, args, kwargs) -> None:
        stamps.append(time.perf_counter())
        if id(optimizer) not in [o["id"] for o in record["optimizers"]]:
            record["optimizers"].append(
                {
                    "id": id(optimizer),
                    "class": type(optimizer).__name__,
                    "trainable_parameters": sum(
                        p.numel() for group in optimizer.param_groups for p in group["params"]
                    ),
                    "threads": torch.get_num_threads(),
                }
            )

    applied: list[str] = []
    saved_argv, saved_path = sys.argv, list(sys.path)
    handle = register_optimizer_step_post_hook(on_step)
    started = time.perf_counter()
    exit_code: int | str = "exception"
    try:
        with contextlib.ExitStack() as stack:
            for name in patches:
                stack.enter_context(PATCHES[name](applied))
            sys.argv = [str(script), *argv]
            sys.path.insert(0, str(script.parent))
            try:
                runpy.run_path(str(script), run_name="__main__")
                exit_code = 0
            except SystemExit as stop:
                exit_code = _exit_code(stop.code)
    finally:
        handle.remove()
        sys.argv, sys.path[:] = saved_argv, saved_path
        record.update(
            started=started,
            stamps=stamps,
            exit_code=exit_code,
            patches=applied,
            threads_at_exit=torch.get_num_threads(),
        )
        if out_json is not None:
            Path(out_json).write_text(json.dumps(record, indent=1) + "\n")
    return record


# --- statistics and the table ------------------------------------------------------------------------


def step_gaps(stamps: Sequence[float], warmup: int) -> list[float]:
    """Seconds between consecutive optimizer steps after the first ``warmup`` steps (``warmup >= 1``:
    the first step has no step before it)."""
    if warmup < 1:
        raise ValueError(f"warmup must be >= 1 (the first step has no gap before it), got {warmup}")
    return [b - a for a, b in zip(stamps[warmup - 1 : -1], stamps[warmup:], strict=True)]


def run_median(stamps: Sequence[float], warmup: int, steps: int) -> float:
    """The median of the ``steps`` gaps after ``warmup`` warm-up steps; a ValueError if the run made
    fewer optimizer steps than ``warmup + steps``."""
    gaps = step_gaps(stamps, warmup)
    if len(gaps) < steps:
        raise ValueError(
            f"the run made {len(stamps)} optimizer steps, fewer than the {warmup} warm-up + {steps} "
            "measured ones"
        )
    return statistics.median(gaps[:steps])


def ratio_interval(
    ours: Sequence[float], theirs: Sequence[float], level: float = 0.95
) -> tuple[float, float]:
    """A percentile bootstrap interval of ``median(ours) / median(theirs)`` over rounds: round ``i``'s two
    run medians stay together (they ran minutes apart, so a slow spell of the machine hits both). Every
    one of the ``n**n`` resamples of the ``n`` rounds is taken (5 rounds: 3,125), so the interval is
    exact and the same on every rerun of the same numbers; above 7 rounds, 20,000 seeded draws."""
    import itertools

    import numpy as np

    ours, theirs, n = np.asarray(ours, float), np.asarray(theirs, float), len(ours)
    if n != len(theirs) or n < 2:
        raise ValueError(
            f"a ratio interval needs the same number (>= 2) of rounds, got {n} and {len(theirs)}"
        )
    if n <= 7:
        picks = np.array(list(itertools.product(range(n), repeat=n)))
    else:
        picks = np.random.default_rng(0).integers(0, n, size=(20_000, n))
    ratios = np.median(ours[picks], axis=1) / np.median(theirs[picks], axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(ratios, [alpha, 1 - alpha], method="inverted_cdf")
    return float(low), float(high)


def summarize(run_medians: dict[str, list[float]]) -> dict:
    """Per trainer the median of its run medians and the runs (in round order); the ours/theirs ratios
    of :data:`RATIOS` where both trainers ran, with their 95% intervals over rounds
    (:func:`ratio_interval`) where they ran the same rounds, two or more."""
    trainers = {
        name: {"median_s_per_step": statistics.median(values), "run_medians": list(values)}
        for name, values in run_medians.items()
        if values
    }
    pairs = [(ours, theirs) for ours, theirs in RATIOS if ours in trainers and theirs in trainers]
    ratios = {
        f"{ours}/{theirs}": trainers[ours]["median_s_per_step"] / trainers[theirs]["median_s_per_step"]
        for ours, theirs in pairs
    }
    intervals = {
        f"{ours}/{theirs}": list(ratio_interval(run_medians[ours], run_medians[theirs]))
        for ours, theirs in pairs
        if len(run_medians[ours]) == len(run_medians[theirs]) >= 2
    }
    return {"trainers": trainers, "ratios": ratios, "ratio_intervals": intervals}


def round_orders(trainers: Sequence[str], rounds: int) -> list[list[str]]:
    """The trainers' order in each round: the first round as given, each next one rotated by one."""
    trainers = list(trainers)
    return [trainers[r % len(trainers) :] + trainers[: r % len(trainers)] for r in range(rounds)]


def markdown_table(summary: dict) -> str:
    lines = ["| trainer | median s/step | run medians (s) |", "|---|---|---|"]
    for name, row in summary["trainers"].items():
        runs = " ".join(f"{v:.4f}" for v in row["run_medians"])
        lines.append(f"| {TRAINERS.get(name, name)} | {row['median_s_per_step']:.4f} | {runs} |")
    lines.append("")
    for key, ratio in summary["ratios"].items():
        ours, theirs = key.split("/")
        interval = summary.get("ratio_intervals", {}).get(key)
        within = f"; 95% interval over rounds {interval[0]:.3f} to {interval[1]:.3f}" if interval else ""
        lines.append(f"- {ours} / {theirs}: **{ratio:.3f}** ({(ratio - 1) * 100:+.1f}%{within})")
    return "\n".join(lines)


# --- the reference scripts, read at run time ---------------------------------------------------------


def _git(git_dir: Path, *args: str) -> str:
    work_tree = (git_dir / ".git").exists()
    where = ["-C", str(git_dir)] if work_tree else ["--git-dir", str(git_dir)]
    result = subprocess.run(["git", *where, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise ValueError(f"git {' '.join(args)} in {git_dir} failed: {result.stderr.strip()}")
    return result.stdout


def script_from_git(repo: str | Path, path: str, rev: str, dest_dir: Path, name: str) -> tuple[Path, dict]:
    """Write ``path`` at ``rev`` of the git repository ``repo`` (a work tree or a bare git dir) to
    ``dest_dir``; returns the file and where it came from (with the commit)."""
    repo = Path(repo)
    commit = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    text = _git(repo, "show", f"{commit}:{path}")
    out = dest_dir / f"{name}-{commit[:12]}.py"
    dest_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out, {"source": f"git {repo}", "path": path, "commit": commit}


def script_from_github(repo: str, path: str, commit: str, dest_dir: Path, name: str) -> tuple[Path, dict]:
    """Download ``path`` at ``commit`` of the GitHub repository ``repo`` (cached in ``dest_dir``)."""
    out = dest_dir / f"{name}-{commit[:12]}.py"
    url = f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"
    if not out.is_file():
        dest_dir.mkdir(parents=True, exist_ok=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                text = response.read().decode()
        except OSError as error:
            raise ValueError(
                f"cannot download {url} ({error}); pass --{name}_script FILE or --{name}_repo DIR instead"
            ) from error
        out.write_text(text)
    return out, {"source": url, "path": path, "commit": commit}


def resolve_reference(args, name: str, dest_dir: Path) -> tuple[Path, dict]:
    ref = REFERENCES[name]
    script, repo, rev = (getattr(args, f"{name}_{k}") for k in ("script", "repo", "rev"))
    if script:
        path, origin = Path(script).resolve(), {"source": f"file {script}", "path": ref["path"]}
        origin["commit"] = rev or "unknown (a local file)"
    elif repo:
        path, origin = script_from_git(repo, ref["path"], rev or "HEAD", dest_dir, name)
    else:
        path, origin = script_from_github(ref["repo"], ref["path"], rev or ref["commit"], dest_dir, name)
    if not path.is_file():
        raise ValueError(f"--{name}_script {path} is not a file")
    origin["repository"] = ref["repo"]
    origin["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, origin


# --- the shared work ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Work:
    resolution: int = 64
    batch_size: int = 4
    warmup: int = 2
    steps: int = 20
    beta_dpo: float = 5000.0  # the paper's scale (ours too); diffusers' script takes half of it
    learning_rate: float = 1e-5
    rank: int = 4
    threads: int = 2
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def num_pairs(self) -> int:
        # twice the pairs the run reads: no epoch ends within the measured steps, for any loader
        return 2 * self.batch_size * self.total_steps


def build_assets(work: Work, assets: Path) -> tuple[Path, Path]:
    """The tiny SD1.5-shaped pipeline and the Pick-a-Pic-format parquet folder every trainer reads
    (rebuilt when the settings they depend on changed)."""
    from diffusion_dpo.models.tiny import save_tiny_pipeline

    wanted = {"resolution": work.resolution, "num_pairs": work.num_pairs, "seed": work.seed, "version": 1}
    meta = assets / "assets.json"
    model, pairs = assets / "tiny_sd15", assets / "pairs"
    if meta.is_file() and json.loads(meta.read_text()) == wanted and model.is_dir() and pairs.is_dir():
        return model, pairs
    shutil.rmtree(assets, ignore_errors=True)
    save_tiny_pipeline(model, arch="sd15", seed=work.seed, resolution=work.resolution)
    write_pairs(work, pairs)
    meta.write_text(json.dumps(wanted) + "\n")
    return model, pairs


def write_pairs(work: Work, folder: Path) -> Path:
    """``work.num_pairs`` decided Pick-a-Pic v2 rows (``caption, jpg_0, jpg_1, label_0, label_1``, PNG
    bytes at ``work.resolution``) as ``folder/train-00000-of-00001.parquet``: the split every loader
    (``datasets.load_dataset(folder)``, ours) names ``train``. No ties: the scripts treat them differently."""
    from diffusion_dpo.synthetic.writers import write_pair_dataset

    write_pair_dataset(
        folder / "train-00000-of-00001.parquet",
        work.num_pairs,
        seed=work.seed,
        resolution=work.resolution,
        tie_fraction=0.0,
    )
    return folder


def trainer_commands(work: Work, model: Path, pairs: Path, scripts: dict[str, Path]) -> dict[str, dict]:
    """Per trainer: the script, its arguments for ``OUT`` (its output folder, filled in per run) and the
    runner's patches. The flags name the same work in each script's own terms."""
    if "diffusers" in scripts and (work.beta_dpo / 2) != int(work.beta_dpo / 2):
        raise ValueError(
            f"diffusers' script takes an integer β, half the paper's: --beta_dpo {work.beta_dpo:g} is not even"
        )
    common = [
        f"--pretrained_model_name_or_path={model}",
        f"--dataset_name={pairs}",
        f"--resolution={work.resolution}",
        f"--train_batch_size={work.batch_size}",
        "--gradient_accumulation_steps=1",
        f"--max_train_steps={work.total_steps}",
        f"--learning_rate={work.learning_rate}",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        "--mixed_precision=no",
        "--dataloader_num_workers=0",
        f"--checkpointing_steps={10 * work.total_steps + 1000}",
        f"--seed={work.seed}",
    ]
    ours = [
        *common,
        f"--beta_dpo={work.beta_dpo:g}",
        "--dataset_format=pickapic",
        "--report_to=none",
        f"--validation_steps={10 * work.total_steps + 1000}",
        "--no_audit_pairs",
        "--overwrite_output_dir",
    ]
    commands = {
        "paper": {
            "script": scripts.get("paper"),
            "args": [*common, f"--beta_dpo={work.beta_dpo:g}", "--report_to=tensorboard"],
            "patches": ["no_trackers", "xformers_noop"],
        },
        "ours_full": {"script": ROOT / "train_sd.py", "args": ours, "patches": ["no_trackers"]},
        "diffusers": {
            "script": scripts.get("diffusers"),
            "args": [
                *common,
                f"--beta_dpo={work.beta_dpo / 2:g}",  # logσ(β·(Δref − Δθ)) = the paper's with β/2
                "--dataset_split_name=train",
                f"--rank={work.rank}",
                f"--vae_encode_batch_size={2 * work.batch_size}",
                "--report_to=tensorboard",
            ],
            "patches": ["no_trackers", "wandb_stub"],
        },
        "ours_lora": {
            "script": ROOT / "train_sd.py",
            "args": [*ours, "--use_lora", f"--rank={work.rank}"],
            "patches": ["no_trackers"],
        },
    }
    for command in commands.values():
        command["args"].append("--output_dir={OUT}")
    return commands


# --- the measurement ---------------------------------------------------------------------------------


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    found = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **_versions(),
    }
    return found


def _our_commit() -> dict:
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(git("status", "--porcelain"))}


def _load() -> list[float] | None:
    with contextlib.suppress(OSError, AttributeError):
        return [round(x, 2) for x in os.getloadavg()]
    return None


def run_once(name: str, command: dict, run_dir: Path, work: Work, timeout: float, keep: bool) -> dict:
    """One run of one trainer in a fresh process; returns its runner record plus the run median."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out, stamps_json = run_dir / "out", run_dir / "steps.json"
    args = [a.replace("{OUT}", str(out)) for a in command["args"]]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_run", str(stamps_json)]
    cmd += ["--_threads", str(work.threads), "--_patches", ",".join(command["patches"])]
    cmd += ["--", str(command["script"]), *args]
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(work.threads),
        MKL_NUM_THREADS=str(work.threads),
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p),
        HF_DATASETS_CACHE=str(run_dir.parent.parent / "hf_datasets_cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    load_before = _load()
    with open(run_dir / "log.txt", "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        try:
            result = subprocess.run(
                cmd, cwd=run_dir, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"{name} ran past {timeout} s; see {run_dir / 'log.txt'}") from error
    if result.returncode != 0 or not stamps_json.is_file():
        tail = (run_dir / "log.txt").read_text().splitlines()[-15:]
        raise RuntimeError(
            f"{name} failed (exit {result.returncode}); {run_dir / 'log.txt'} ends:\n" + "\n".join(tail)
        )
    record = json.loads(stamps_json.read_text())
    record["median_s_per_step"] = run_median(record["stamps"], work.warmup, work.steps)
    record["load_average_before"], record["load_average_after"] = load_before, _load()
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return record


def measure(args) -> dict:
    out_dir = Path(args.output_dir).resolve()
    work = Work(
        resolution=args.resolution,
        batch_size=args.batch_size,
        warmup=args.warmup,
        steps=args.steps,
        beta_dpo=args.beta_dpo,
        learning_rate=args.learning_rate,
        rank=args.rank,
        threads=args.threads,
        seed=args.seed,
    )
    trainers = [t for t in args.trainers.split(",") if t]
    unknown = [t for t in trainers if t not in TRAINERS]
    if unknown:
        raise ValueError(f"--trainers: unknown {unknown}; known: {list(TRAINERS)}")
    scripts, origins = {}, {}
    for name in ("paper", "diffusers"):
        if name in trainers:
            scripts[name], origins[name] = resolve_reference(args, name, out_dir / "reference")
            logger.info("%s: %s at %s", name, origins[name]["path"], origins[name]["commit"])
    model, pairs = build_assets(work, out_dir / "assets")
    commands = trainer_commands(work, model, pairs, scripts)
    started = datetime.datetime.now(datetime.UTC)
    load_before, records = _load(), {t: [] for t in trainers}
    for r, order in enumerate(round_orders(trainers, args.rounds)):
        for name in order:
            record = run_once(
                name,
                commands[name],
                out_dir / "runs" / f"round{r}-{name}",
                work,
                args.run_timeout,
                args.keep_runs,
            )
            records[name].append(record)
            logger.info("round %d %-9s %.4f s/step", r, name, record["median_s_per_step"])
    summary = summarize({t: [rec["median_s_per_step"] for rec in records[t]] for t in trainers})
    for name in trainers:
        first = records[name][0]
        summary["trainers"][name].update(
            trainable_parameters=first["optimizers"][0]["trainable_parameters"]
            if first["optimizers"]
            else None,
            optimizer=first["optimizers"][0]["class"] if first["optimizers"] else None,
            threads=sorted({o["threads"] for rec in records[name] for o in rec["optimizers"]}),
            run_load_averages=[
                [rec["load_average_before"], rec["load_average_after"]] for rec in records[name]
            ],
            patches=first["patches"],
            command=[str(commands[name]["script"]), *commands[name]["args"]],
        )
    return {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_average_before": load_before,
        "load_average_after": _load(),
        "ours": _our_commit(),
        "references": origins,
        "work": {**dataclasses.asdict(work), "rounds": args.rounds, "num_pairs": work.num_pairs},
        "orders": round_orders(trainers, args.rounds),
        **summary,
    }


def _load_line(result: dict) -> str:
    loads = [
        pair[0][0]
        for row in result["trainers"].values()
        for pair in row.get("run_load_averages", [])
        if pair and pair[0]
    ]
    if not loads:
        return ""
    return (
        f"1-minute load average at the start of the runs: {min(loads):.2f} to {max(loads):.2f} "
        f"(median {statistics.median(loads):.2f}) on {result['machine']['cores']} cores."
    )


def report_markdown(result: dict) -> str:
    m, w = result["machine"], result["work"]
    gpu = f", GPU {m['gpu']}" if m["gpu"] else ""
    lines = [
        f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores{gpu}); torch {m['torch']}, "
        f"diffusers {m['diffusers']}, transformers {m['transformers']}, accelerate {m['accelerate']}, "
        f"peft {m['peft']}; load average before/after {result['load_average_before']} / "
        f"{result['load_average_after']}.",
        "",
        f"Work: tiny SD1.5-shaped pipeline, {w['resolution']} px, {w['batch_size']} pairs per optimizer step, "
        f"fp32, {w['threads']} torch threads, β {w['beta_dpo']:g} (paper scale), lr {w['learning_rate']:g}, "
        f"LoRA rank {w['rank']}; {w['warmup']} warm-up + {w['steps']} measured steps per run, "
        f"{w['rounds']} alternating rounds.",
        "",
        markdown_table(result),
        "",
        _load_line(result),
        f"Ours: {result['ours']['commit'][:12]}{' (uncommitted changes)' if result['ours']['dirty'] else ''}.",
    ]
    for name, origin in result["references"].items():
        lines.append(f"{name}: {origin['repository']} `{origin['path']}` at {origin['commit']}.")
    for name, row in result["trainers"].items():
        if row.get("patches"):
            lines.append(f"{name} patched at run time: " + "; ".join(row["patches"]) + ".")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # spelled out, not looped over the names: the docs' check finds each flag in the source
    for name, flags in (
        ("paper", ("--paper_script", "--paper_repo", "--paper_rev")),
        ("diffusers", ("--diffusers_script", "--diffusers_repo", "--diffusers_rev")),
    ):
        ref = REFERENCES[name]
        group = parser.add_argument_group(f"{name}'s script ({ref['repo']} {ref['path']})")
        group.add_argument(flags[0], metavar="FILE", help="Use this local copy of it.")
        group.add_argument(flags[1], metavar="DIR", help="Read it from this clone or git dir.")
        group.add_argument(
            flags[2], metavar="REV", help=f"Commit to read (default: {ref['commit'][:12]}; HEAD of a repo)."
        )
    parser.add_argument("--output_dir", default=str(ROOT / "outputs" / "side_by_side"))
    parser.add_argument("--trainers", default=",".join(TRAINERS), help="Comma-separated subset, in order.")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="Optimizer steps before the measured ones.")
    parser.add_argument("--steps", type=int, default=20, help="Measured optimizer steps per run.")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=4, help="Pairs per optimizer step.")
    parser.add_argument("--beta_dpo", type=float, default=5000.0, help="β in the paper's scale.")
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank.")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run_timeout", type=float, default=900.0, help="Seconds one run may take.")
    parser.add_argument("--keep_runs", action="store_true", help="Keep each run's output folder.")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--_run"]:  # the runner, in the fresh process of one run
        split = argv.index("--")
        opts = dict(zip(argv[0:split:2], argv[1:split:2], strict=True))
        patches = [p for p in opts.get("--_patches", "").split(",") if p]
        threads = int(opts["--_threads"]) if "--_threads" in opts else None
        record = run_script(argv[split + 1], argv[split + 2 :], opts["--_run"], patches, threads)
        return record["exit_code"] if isinstance(record["exit_code"], int) else 1
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        result = measure(args)
    except (ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
    out_dir = Path(args.output_dir)
    (out_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    text = report_markdown(result)
    (out_dir / "results.md").write_text(text)
    print(text)
    print(f"written: {out_dir / 'results.md'}, {out_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
