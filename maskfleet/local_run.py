"""Run one job in this process on local files: what `maskfleet run` does.

Data flows one way: job -> inputs read and checked -> models loaded -> sampling ->
output written whole (temp file + rename). Every input is read and every path checked
before the model is loaded or anything is written, so a bad job fails fast and leaves
no output behind.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .job import Job
from .sampling import AdvancedSampler, sample_two_samplers
from .sampling.errors import InvalidInput
from .sampling.unet_denoiser import UNetDenoiser, load_unet_denoiser
from .storage.conditioning_files import read_conditioning
from .storage.file_uris import local_path, write_atomic
from .storage.latent_files import encode_latent, read_latent
from .storage.mask_files import read_mask
from .storage.model_store import resolve_model_dir
from .storage.preview_png import encode_preview_png

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUT_SUFFIXES = (".latent", ".safetensors")


@dataclass(frozen=True)
class RunOptions:
    models_root: Path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("device", f"{device!r} asked for but no CUDA device is available")
    return torch.device(device)


@dataclass
class _Paths:
    latent: Path
    mask: Path
    conditioning: dict[str, Path]
    output: Path
    preview: Path | None


def _check_paths(job: Job) -> _Paths:
    conditioning = {
        f"{which}.{kind}": local_path(getattr(getattr(job, which), kind), f"{which}.{kind}")
        for which in ("base_sampler", "mask_sampler")
        for kind in ("positive", "negative")
    }
    paths = _Paths(
        latent=local_path(job.latent, "latent"),
        mask=local_path(job.mask, "mask"),
        conditioning=conditioning,
        output=local_path(job.output, "output"),
        preview=local_path(job.preview, "preview") if job.preview else None,
    )
    if paths.output.suffix not in OUTPUT_SUFFIXES:
        raise InvalidInput("output", f"suffix must be one of {', '.join(OUTPUT_SUFFIXES)}, got {paths.output.name!r}")
    if paths.preview is not None and paths.preview.suffix.lower() != ".png":
        raise InvalidInput("preview", f"must name a .png file, got {paths.preview.name!r}")
    inputs = {paths.latent.resolve(), paths.mask.resolve(), *(p.resolve() for p in conditioning.values())}
    for field, target in (("output", paths.output), ("preview", paths.preview)):
        if target is not None and target.resolve() in inputs:
            raise InvalidInput(field, "would overwrite one of the job's inputs")
    return paths


class ModelLoader:
    """Loads each (model name, device, dtype) once; both samplers of a job may share a model."""

    def __init__(self, options: RunOptions):
        self.options = options
        self.device = resolve_device(options.device)
        if options.dtype not in DTYPES:
            raise InvalidInput("dtype", f"unknown dtype {options.dtype!r}; valid: {', '.join(DTYPES)}")
        self.dtype = DTYPES[options.dtype]
        self._loaded: dict[str, UNetDenoiser] = {}

    def get(self, name: str, field: str) -> UNetDenoiser:
        if name not in self._loaded:
            model_dir = resolve_model_dir(self.options.models_root, name, field)
            self._loaded[name] = load_unet_denoiser(model_dir, self.device, self.dtype)
        return self._loaded[name]


def run_job(
    job: Job,
    options: RunOptions,
    on_progress: Callable[[int, int, str], None] | None = None,
    loader: ModelLoader | None = None,
) -> dict:
    """Run `job` on local files and return a small JSON-able result (never tensors)."""
    started = time.perf_counter()
    paths = _check_paths(job)
    loader = loader or ModelLoader(options)
    for field in ("base_sampler", "mask_sampler"):
        resolve_model_dir(options.models_root, getattr(job, field).model, f"{field}.model")
    latent = read_latent(paths.latent, "latent")
    mask = read_mask(paths.mask, "mask")
    cond = {field: read_conditioning(path, field) for field, path in paths.conditioning.items()}

    samplers = {}
    for field in ("base_sampler", "mask_sampler"):
        spec = getattr(job, field)
        denoiser = loader.get(spec.model, f"{field}.model")
        samplers[field] = AdvancedSampler(
            denoiser=denoiser,
            cfg=spec.cfg,
            sampler_name=spec.sampler_name,
            scheduler=spec.scheduler,
            positive=cond[f"{field}.positive"].to(loader.device),
            negative=cond[f"{field}.negative"].to(loader.device),
        )
    loaded = time.perf_counter()
    out = sample_two_samplers(
        latent.to(loader.device),
        mask,
        samplers["base_sampler"],
        samplers["mask_sampler"],
        seed=job.seed,
        steps=job.steps,
        denoise=job.denoise,
        overlap_factor=job.overlap_factor,
        mode=job.mode,
        on_progress=on_progress,
    ).cpu()
    sampled = time.perf_counter()
    if not torch.isfinite(out).all():
        raise InvalidInput("output", "sampling produced NaN or infinite values; nothing was written")

    data = encode_latent(out, paths.output.suffix)
    preview = encode_preview_png(out) if paths.preview is not None else None
    if paths.preview is not None:
        write_atomic(paths.preview, preview)
    try:
        write_atomic(paths.output, data)
    except BaseException:
        if paths.preview is not None:
            paths.preview.unlink(missing_ok=True)
        raise
    return {
        "job_id": job.job_id,
        "output": job.output,
        "preview": job.preview,
        "shape": list(out.shape),
        "dtype": str(out.dtype).removeprefix("torch."),
        "device": str(loader.device),
        "seconds": {
            "total": round(time.perf_counter() - started, 4),
            "load": round(loaded - started, 4),
            "sampling": round(sampled - loaded, 4),
        },
    }
