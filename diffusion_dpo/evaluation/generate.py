"""Generate evaluation images with an on-disk cache, the same seeds for every model.

A model is named by a spec string: a diffusers pipeline folder, a hub id, or a LoRA output folder of
the trainer (``pytorch_lora_weights.safetensors`` + ``training_config.yaml`` naming the base model).
Every image is a pure function of (model weights, prompt, seed, generation settings), so it is cached
under a hash of exactly those: a rerun, or a run that crashed half-way, only generates what is missing,
and a pipeline is loaded only when one of its images is missing. Images are written atomically (a temp
file, then ``os.replace``), so a crash never leaves a truncated PNG that looks cached. A cached file can
still be bad (bit-rot, a disk that filled up, a file copied in by hand): every cache hit is decoded and
checked (:func:`check_cached_image`), and a bad one is deleted, logged and generated again.

Pairing: image ``(p, k)`` of every model starts from the noise of ``torch.Generator(device)
.manual_seed(seeds[k])``, one generator per image, so scores of two models on the same (prompt, seed)
are paired comparisons.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
TRAINING_CONFIG = "training_config.yaml"


class ModelLoadError(RuntimeError):
    """A model to evaluate could not be loaded (a broken folder, an unreachable hub id, a bad LoRA)."""


@dataclass(frozen=True)
class ModelSpec:
    """A model to evaluate.

    ``kind`` is ``"pipeline"`` (local diffusers folder), ``"hub"`` (hub id) or ``"lora"`` (trainer LoRA
    output folder; ``base`` is the pipeline it was trained from).
    """

    name: str
    source: str
    kind: str
    base: str | None = None


@dataclass(frozen=True)
class GenerationSettings:
    """Everything besides weights, prompt and seed that changes a generated image."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None  # None: the pipeline's default size
    negative_prompt: str | None = None
    dtype: str = "fp32"
    device_type: str = "cpu"  # the noise of a seeded generator differs between cpu and cuda

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {self.resolution}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {self.dtype!r}")


def settings_from_args(args) -> GenerationSettings:
    """:class:`GenerationSettings` from a command line's generation flags (``--num_inference_steps``,
    ``--guidance_scale``, ``--resolution``, ``--negative_prompt``, ``--dtype``, ``--device``), as
    ``eval/evaluate.py``, ``data/mine_pairs.py`` and ``data/correction_pairs.py`` name them."""
    return GenerationSettings(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        negative_prompt=args.negative_prompt,
        dtype=args.dtype,
        device_type=args.device.split(":")[0],
    )


def _find_key(tree, key: str):
    # training_config.yaml may nest the model section; take the first match, depth-first
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            found = _find_key(value, key)
            if found is not None:
                return found
    return None


def lora_base_model(folder: str | Path) -> str:
    """The base model a LoRA output folder was trained from (``pretrained_model_name_or_path`` in its
    ``training_config.yaml``)."""
    import yaml

    config_path = Path(folder) / TRAINING_CONFIG
    if not config_path.is_file():
        raise ValueError(
            f"{folder} has {LORA_WEIGHTS} but no {TRAINING_CONFIG}: cannot tell which base model the "
            "LoRA belongs to"
        )
    base = _find_key(yaml.safe_load(config_path.read_text()), "pretrained_model_name_or_path")
    if not base:
        raise ValueError(f"{config_path} has no pretrained_model_name_or_path")
    return str(base)


def resolve_model(name: str, source: str) -> ModelSpec:
    """Classify ``source`` as a pipeline folder, a LoRA output folder or a hub id; fail early on a bad path."""
    if not name:
        raise ValueError(f"model name is empty in spec {name}={source}")
    if not source:
        raise ValueError(f"model {name!r} has an empty path or hub id")
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"model {name!r}: {source} is a file; expected a diffusers folder or LoRA folder"
            )
        if (path / LORA_WEIGHTS).is_file():
            return ModelSpec(name, str(path), "lora", lora_base_model(path))
        if (path / "model_index.json").is_file():
            return ModelSpec(name, str(path), "pipeline")
        raise ValueError(
            f"model {name!r}: {source} has neither model_index.json (a diffusers pipeline) nor "
            f"{LORA_WEIGHTS} (a LoRA output folder)"
        )
    # A hub id is "name" or "org/name"; anything else that does not exist is a mistyped path.
    if source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source:
        raise ValueError(f"model {name!r}: path {source} does not exist")
    return ModelSpec(name, source, "hub")


def parse_model_spec(text: str) -> ModelSpec:
    """``"NAME=PATH_OR_ID"`` → :class:`ModelSpec` (see :func:`resolve_model`)."""
    name, sep, source = text.partition("=")
    if not sep:
        raise ValueError(
            f"--model {text!r}: expected NAME=PATH_OR_ID (e.g. base=runwayml/stable-diffusion-v1-5)"
        )
    return resolve_model(name.strip(), source.strip())


def _file_stamps(root: Path, paths) -> list[list]:
    # Size and modification time identify a weights file without reading gigabytes to hash it.
    out = []
    for p in sorted(paths):
        st = p.stat()
        out.append([p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns])
    return out


def _pipeline_identity(source: str) -> dict:
    path = Path(source).expanduser()
    if not path.exists():
        return {"hub": source}
    index = json.loads((path / "model_index.json").read_text())
    files = [path / "model_index.json"]
    for component in index:
        if (path / component).is_dir():
            files += [f for f in (path / component).rglob("*") if f.is_file()]
    return {"path": str(path.resolve()), "files": _file_stamps(path, files)}


def model_identity(spec: ModelSpec) -> dict:
    """A JSON-able description of the weights behind ``spec`` (paths, sizes, mtimes; hub ids by name).

    A retrained model in the same folder gets new mtimes and so a new identity: its images are
    regenerated. Hub ids are identified by name only (pin a revision by downloading to a folder).
    """
    if spec.kind == "lora":
        folder = Path(spec.source)
        lora = _file_stamps(folder, [folder / LORA_WEIGHTS])
        return {"lora": str(folder.resolve()), "files": lora, "base": _pipeline_identity(spec.base)}
    return _pipeline_identity(spec.source)


def image_key(identity: dict, prompt: str, seed: int, settings: GenerationSettings) -> str:
    """sha256 over (weights identity, prompt, seed, settings): the cache key of one image."""
    payload = {"model": identity, "prompt": prompt, "seed": int(seed), "settings": asdict(settings)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def cached_image_path(cache_dir: str | Path, key: str) -> Path:
    """``cache_dir/ab/abcdef….png`` — two-level layout keeps folders small for thousands of images."""
    return Path(cache_dir) / key[:2] / f"{key}.png"


def save_image_atomic(image, path: Path) -> None:
    """Write a PIL image as PNG via a temp file in the same folder and ``os.replace`` (atomic rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_cached_image(path: Path, size: tuple[int, int] | None = None) -> str | None:
    """Why the cached image at ``path`` cannot be used, or None if it can.

    ``verify()`` checks every PNG chunk's CRC (bit-rot, a file cut short) and ``load()`` decodes every
    pixel (a corrupt compressed stream); then the mode must be RGB and the size ``(width, height)``
    (when known). Both read a small file once more: milliseconds against seconds to generate it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()  # must come first, on a freshly opened file
        with Image.open(path) as im:
            im.load()
            if im.format != "PNG":
                return f"it is a {im.format} file, not a PNG"
            if im.mode != "RGB":
                return f"its mode is {im.mode}, not RGB"
            if size is not None and im.size != tuple(size):
                return f"its size is {im.size[0]}x{im.size[1]}, expected {size[0]}x{size[1]}"
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return f"it does not decode ({type(err).__name__}: {err})"
    return None


def default_image_size(spec: ModelSpec) -> tuple[int, int] | None:
    """``(width, height)`` a local pipeline renders when no resolution is given, None if unknown.

    As diffusers' SD/SDXL/SD3 pipelines compute it: the denoiser's ``sample_size * 2 **
    (len(vae.block_out_channels) - 1)``. Hub ids are not read (their configs may not be downloaded yet).
    """
    from diffusion_dpo.models.families import family_for_index

    folder = Path(spec.base if spec.kind == "lora" else spec.source).expanduser()
    try:
        family = family_for_index(json.loads((folder / "model_index.json").read_text()), str(folder))
        denoiser = json.loads((folder / family.denoiser_subfolder / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        side = int(denoiser["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError):  # not local, or an unusual layout: skip the check
        return None
    return side, side


def trained_sampling_kwargs(spec: ModelSpec) -> dict:
    """The pipeline-call keywords a trainer output was trained for (SD3: its T5 ``max_sequence_length``;
    the pipeline's own default is 256 tokens; FLUX.1: that and the guidance embedding's ``guidance_scale``,
    which replaces ``--guidance_scale``), from its ``training_config.yaml``; for any other local folder
    its family's ``default_sampling_kwargs`` (Qwen-Image's real CFG; {} for SD, SDXL, SD3, FLUX.1), and
    {} for a hub id, which samples with its pipeline's defaults."""
    from diffusion_dpo.models.families import family_for_index
    from diffusion_dpo.models.pretrained import read_model_index
    from diffusion_dpo.training.saving import trained_family_options

    options = trained_family_options(spec.source)
    base = spec.base if spec.kind == "lora" else spec.source
    if not options:
        # a local folder not trained here: what its family always samples with (Qwen-Image: real CFG
        # against a blank negative prompt; nothing for the others), so a base compares with its outputs
        if not Path(str(base)).expanduser().is_dir():
            return {}
        try:
            return family_for_index(read_model_index(str(base)), str(base)).default_sampling_kwargs()
        except (FileNotFoundError, ValueError):
            return {}
    try:
        return family_for_index(read_model_index(str(base)), str(base), **options).sampling_kwargs()
    except (FileNotFoundError, ValueError):  # load_pipeline says what is wrong with the model
        return {}


def recorded_sampling(specs: list[ModelSpec], defaults: dict) -> tuple[dict, dict]:
    """The ``num_inference_steps`` and ``guidance_scale`` to sample every model with when the command
    line gives none: what the trainer outputs among ``specs`` recorded (their validation images were
    sampled so: ``training_config.yaml``), when they agree; else ``defaults``.

    Returns ``(settings, where)``: ``where[key]`` says in words where the value came from, for the log
    and the report. Models that record different values fall back to ``defaults``, with a warning naming
    them (every model must sample the same way for the comparison to be paired).
    """
    from diffusion_dpo.training.saving import SAMPLING_KEYS, trained_sampling_settings

    recorded = {spec.name: trained_sampling_settings(spec.source) for spec in specs}
    settings, origins = {}, {}
    for key in SAMPLING_KEYS:
        values = {name: rec[key] for name, rec in recorded.items() if key in rec}
        if len(set(values.values())) == 1:
            settings[key] = next(iter(values.values()))
            origins[key] = f"{key} {settings[key]} as {', '.join(values)} recorded"
            continue
        if values:
            logger.warning(
                "the models recorded different %s (%s): sampling all with %s; give --%s to choose",
                key, ", ".join(f"{n} {v}" for n, v in values.items()), defaults[key], key,
            )  # fmt: skip
        settings[key] = defaults[key]
        origins[key] = f"{key} {defaults[key]} by default"
    return settings, origins


def load_pipeline(spec: ModelSpec, device: str = "cpu", dtype: str = "fp32"):
    """Load a text-to-image pipeline for ``spec`` onto ``device`` in ``dtype`` (LoRA: base + adapter)."""
    from diffusers import DiffusionPipeline

    from diffusion_dpo.models.families import pipeline_load_kwargs
    from diffusion_dpo.models.pretrained import dtype_kwargs
    from diffusion_dpo.training.saving import trained_family_options

    source = spec.base if spec.kind == "lora" else spec.source
    try:
        # SD3 without T5 (saved so, or a LoRA trained so) samples without it, as trained
        parts = pipeline_load_kwargs(
            source, trained_family_options(spec.source) if spec.kind == "lora" else None
        )
        pipe = DiffusionPipeline.from_pretrained(source, **parts, **dtype_kwargs(DTYPES[dtype]))
        if spec.kind == "lora":
            pipe.load_lora_weights(spec.source)
    except Exception as err:  # hub and loading errors come in many types; name the model
        reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line: library messages span several
        where = repr(source) if spec.kind != "lora" else f"{spec.source!r} (a LoRA on {source!r})"
        raise ModelLoadError(f"could not load model {spec.name!r} from {where} ({reason})") from err
    pipe.set_progress_bar_config(disable=True)
    logger.info("loaded model %s (%s) from %s", spec.name, spec.kind, spec.source)
    return pipe.to(device)


def generate_images(
    spec: ModelSpec,
    prompts: list[str],
    seeds: list[int],
    settings: GenerationSettings,
    cache_dir: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 4,
    progress: bool = True,
) -> tuple[list[list[Path]], int]:
    """Images of ``spec`` for every (prompt, seed), generating only those not yet in ``cache_dir``.

    Args:
        prompts: ``[P]`` prompts; seeds: ``[S]`` seeds, the same for every model.
        settings: steps, guidance, resolution, negative prompt, dtype (part of the cache key).
        batch_size: images per pipeline call (mixed prompts and seeds; one generator per image).

    Returns:
        ``(paths, n_generated)``: ``paths[p][k]`` is the PNG of prompt ``p`` and seed ``seeds[k]``.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    identity = model_identity(spec)
    sampling = trained_sampling_kwargs(spec)
    if sampling:  # part of what makes the image (SD3: T5 tokens); absent for UNet models, as before
        identity = {**identity, "sampling": sampling}
    paths = [
        [cached_image_path(cache_dir, image_key(identity, prompt, seed, settings)) for seed in seeds]
        for prompt in prompts
    ]
    size = (settings.resolution, settings.resolution) if settings.resolution else default_image_size(spec)
    missing: dict[Path, tuple[str, int]] = {}  # dict: a repeated prompt is generated once
    n_bad = 0
    for prompt, row in zip(prompts, paths):
        for seed, path in zip(seeds, row):
            if path in missing:
                continue
            if path.exists():
                problem = check_cached_image(path, size)
                if problem is None:
                    continue
                logger.warning(
                    "model %s: cached image %s is unusable (%s); generating it again",
                    spec.name,
                    path,
                    problem,
                )
                path.unlink(missing_ok=True)
                n_bad += 1
            missing[path] = (prompt, seed)
    total = len(prompts) * len(seeds)
    logger.info(
        "model %s: %d of %d images cached, %d to generate%s",
        spec.name,
        total - len(missing),
        total,
        len(missing),
        f" ({n_bad} of them replace unusable cached files)" if n_bad else "",
    )
    if not missing:
        return paths, 0

    pipe = load_pipeline(spec, device=device, dtype=settings.dtype)
    # a family's own negative prompt (Qwen-Image's real CFG needs one) unless --negative_prompt is given
    sampling = dict(sampling)
    family_negative = sampling.pop("negative_prompt", None)
    negative_prompt = settings.negative_prompt or family_negative
    size_kwargs = {"height": settings.resolution, "width": settings.resolution} if settings.resolution else {}
    jobs = list(missing.items())
    flagged = 0
    with tqdm(total=len(jobs), desc=f"generating {spec.name}", disable=not progress) as bar:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            batch_prompts = [prompt for _, (prompt, _) in chunk]
            generators = [torch.Generator(device).manual_seed(seed) for _, (_, seed) in chunk]
            negative = [negative_prompt] * len(chunk) if negative_prompt else None
            with torch.no_grad():
                out = pipe(
                    prompt=batch_prompts,
                    negative_prompt=negative,
                    generator=generators,
                    num_inference_steps=settings.num_inference_steps,
                    output_type="pil",
                    **size_kwargs,
                    # a trained FLUX.1's guidance embedding samples at its training value
                    **{"guidance_scale": settings.guidance_scale, **sampling},
                )
            flagged += sum(bool(x) for x in (getattr(out, "nsfw_content_detected", None) or []))
            for (path, _), image in zip(chunk, out.images, strict=True):
                save_image_atomic(image, path)
            bar.update(len(chunk))
    if flagged:
        logger.warning("model %s: the safety checker blanked %d images", spec.name, flagged)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return paths, len(jobs)
