"""Run jobs in this process: what `maskfleet run` does, and what a worker will do per job.

Data flows one way: job -> every URI checked (local outputs against the allowed roots
too) -> models found (fetched into the cache if the store is S3) -> inputs read and
checked, alone and against each other and the models' configs (mask shape against the
latent, overlap against its size, latent channels and conditioning widths against each
UNet's config.json) -> models loaded (kept in an LRU across jobs) -> sampling -> output
written whole (temp file + rename locally, one PUT or a completed multipart upload on
S3). Every input is read and checked before a model is loaded or anything is written,
so a bad job fails fast, names the field to fix and leaves no output behind.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .job import Job, PromptText
from .model_cache import LoadedModels
from .model_lane import ModelLane
from .prepared_job import PreparedJob, batch_key
from .prompt_encoder import PromptEncoder
from .sampling import AdvancedSampler, ProgressHook, StopHook
from .sampling.errors import InvalidInput
from .sampling.masks import check_mask_fits, check_overlap
from .model_dirs import load_unet_denoiser, unet_inputs
from .sampling.unet_denoiser import UNetDenoiser
from .storage.allowed_roots import confine
from .storage.conditioning_files import read_conditioning
from .storage.errors import InvalidFile
from .storage.file_uris import local_path, resolve_path
from .storage.latent_files import encode_latent, read_latent
from .storage.mask_files import read_mask
from .storage.model_store import ModelStore
from .storage.objects import check_uri, delete_object, is_s3_uri, object_name, write_object
from .storage.preview_png import encode_preview_png

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OUTPUT_SUFFIXES = (".latent", ".safetensors")
SAMPLER_FIELDS = ("base_sampler", "mask_sampler")
SDXL_LATENT_SCALE = 0.13025  # the VAE scaling factor that tells an SDXL latent (preview colours)


@dataclass(frozen=True)
class RunOptions:
    models_root: str  # local folder, file:// or s3://bucket/prefix
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"
    model_cache_dir: Path | None = None  # where S3 models are downloaded (default: the store's)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("device", f"{device!r} asked for but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InvalidInput("device", f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def _same_object_key(uri: str, field: str) -> str:
    """A key under which two URIs naming the same object compare equal."""
    return uri if is_s3_uri(uri) else str(resolve_path(local_path(uri, field), field))


def check_job_uris(job: Job) -> None:
    """Syntax of every URI, the output's suffix, and that no output would overwrite an input."""
    inputs = job.input_uris()
    for field, uri in inputs.items():
        check_uri(uri, field)
    outputs = {"output": job.output, **({"preview": job.preview} if job.preview else {})}
    for field, uri in outputs.items():
        check_uri(uri, field)
    suffix = Path(object_name(job.output, "output")).suffix
    if suffix not in OUTPUT_SUFFIXES:
        raise InvalidInput("output", f"suffix must be one of {', '.join(OUTPUT_SUFFIXES)}, got {suffix or 'none'!r}")
    if job.preview and Path(object_name(job.preview, "preview")).suffix.lower() != ".png":
        raise InvalidInput("preview", "must name a .png object")
    taken = {_same_object_key(uri, field) for field, uri in inputs.items()}
    for field, uri in outputs.items():
        if _same_object_key(uri, field) in taken:
            raise InvalidInput(field, "would overwrite one of the job's inputs")
    if job.preview and _same_object_key(job.preview, "preview") == _same_object_key(job.output, "output"):
        raise InvalidInput("preview", "must differ from output")
    for field, uri in outputs.items():  # a write outside MASKFLEET_ALLOWED_ROOTS fails now, not after sampling
        if not is_s3_uri(uri):
            confine(local_path(uri, field), field, writing=True)


def check_inputs_fit(job: Job, latent: torch.Tensor, mask: torch.Tensor, cond: dict[str, torch.Tensor],
                     model_dirs: dict[str, Path]) -> None:
    """The inputs against each other and against each sampler's UNet config, before any model loads.

    Each is valid alone by now; together they must make one job: a mask of the latent's
    batch and aspect ratio, an overlap no larger than the latent, the latent channels
    and conditioning width each UNet takes (read from its config.json, no weights).
    """
    _, channels, height, width = latent.shape
    check_mask_fits(mask, latent.shape)
    check_overlap(job.overlap_factor, height, width)
    for field in SAMPLER_FIELDS:
        model = getattr(job, field).model
        takes = unet_inputs(model_dirs[field], f"{field}.model")
        if channels != takes.in_channels:
            raise InvalidInput("latent", f"has {channels} channels; {field}.model {model!r} takes {takes.in_channels}")
        for kind in ("positive", "negative"):
            name = f"{field}.{kind}"
            got = cond[name].shape[-1]
            if takes.context_width is not None and got != takes.context_width:
                raise InvalidInput(name, f"is {got} wide (last dimension); {field}.model {model!r} takes {takes.context_width}")


class JobRunner:
    """Runs jobs, keeping models and prompt encodings loaded between them.

    Alone, it runs a job start to end in the caller's thread. With a ModelLane (the
    pipelined worker) several threads may call `run` at once: each prepares its job
    (reads inputs, loads models under a lock), hands it to the lane, which samples jobs
    one after another or batched, and writes its own output.
    """

    def __init__(self, options: RunOptions, lane: ModelLane | None = None):
        if options.dtype not in DTYPES:
            raise InvalidInput("dtype", f"unknown dtype {options.dtype!r}; valid: {', '.join(DTYPES)}")
        self.device = resolve_device(options.device)
        self.dtype = DTYPES[options.dtype]
        self.store = ModelStore(options.models_root, options.model_cache_dir)
        self.models: LoadedModels[UNetDenoiser] = LoadedModels(device=self.device, dtype=self.dtype)
        self.prompts = PromptEncoder(self.device, self.dtype)
        self.lane = lane
        self._loading = threading.Lock()  # model store, model LRU and prompt encoder: one thread at a time

    def _conditioning(self, value: str | PromptText, model_dir: Path, field: str) -> torch.Tensor:
        if isinstance(value, PromptText):
            with self._loading:
                return self.prompts.encode(model_dir, value.prompt, field)
        return read_conditioning(value, field).to(self.device)

    def prepare(self, job: Job) -> PreparedJob:
        """Read and check every input, then load the models: everything before the first model call."""
        started, started_at = time.perf_counter(), time.time()
        check_job_uris(job)
        with self._loading:
            model_dirs = {field: self.store.local_dir(getattr(job, field).model, f"{field}.model") for field in SAMPLER_FIELDS}
        latent = read_latent(job.latent, "latent")
        mask = read_mask(job.mask, "mask")
        cond = {
            f"{field}.{kind}": self._conditioning(getattr(getattr(job, field), kind), model_dirs[field], f"{field}.{kind}")
            for field in SAMPLER_FIELDS
            for kind in ("positive", "negative")
        }
        check_inputs_fit(job, latent, mask, cond, model_dirs)
        samplers = {}
        for field in SAMPLER_FIELDS:
            spec = getattr(job, field)
            with self._loading:
                denoiser = self.models.get(
                    spec.model, f"{field}.model", lambda d=model_dirs[field]: load_unet_denoiser(d, self.device, self.dtype)
                )
            samplers[field] = AdvancedSampler(
                denoiser=denoiser,
                cfg=spec.cfg,
                sampler_name=spec.sampler_name,
                scheduler=spec.scheduler,
                positive=cond[f"{field}.positive"],
                negative=cond[f"{field}.negative"],
            )
        return PreparedJob(job, latent.to(self.device), mask, samplers["base_sampler"], samplers["mask_sampler"],
                           started, started_at)

    def run(self, job: Job, on_progress: ProgressHook | None = None, should_stop: StopHook | None = None) -> dict:
        """Run `job` and return a small JSON-able result (never tensors)."""
        return self.finish(*self.sampled(job, on_progress, should_stop))

    def sampled(self, job: Job, on_progress: ProgressHook | None = None,
                should_stop: StopHook | None = None) -> tuple[PreparedJob, torch.Tensor]:
        """Prepare and sample `job`: everything before `finish` writes it (the sampled latent on the CPU).

        Apart from `finish` so that a caller can retry the write alone (a fleet worker does,
        on storage faults) instead of sampling the job again.
        """
        if self.lane is None:
            prepared = self.prepare(job)
            out = prepared.sample(on_progress, should_stop)
        else:
            with self.lane.expecting() as expected:
                prepared = self.prepare(job)
                out = self.lane.run(prepared, batch_key(prepared), on_progress, should_stop, expected)
        return prepared, out.cpu()

    def finish(self, prepared: PreparedJob, out: torch.Tensor) -> dict:
        """Check and write the sampled latent (and preview); the job's result."""
        job = prepared.job
        if not torch.isfinite(out).all():
            raise InvalidInput("output", "sampling produced NaN or infinite values; nothing was written")
        family = "sdxl" if abs(prepared.base.denoiser.latent_scale - SDXL_LATENT_SCALE) < 1e-6 else "sd15"
        sha256 = self._write(job, out, family)
        return {
            "job_id": job.job_id,
            "output": job.output,
            "sha256": sha256,
            "preview": job.preview,
            "shape": list(out.shape),
            "dtype": str(out.dtype).removeprefix("torch."),
            "device": str(self.device),
            "seconds": {
                "total": round(time.perf_counter() - prepared.started, 4),
                "prepare": round(prepared.sampling_at - prepared.started_at, 4),
                "sampling": round(prepared.sampled_at - prepared.sampling_at, 4),
            },
            # Wall clock (Unix seconds): when the job started here, when its first model call
            # began and its last ended, when its output was written; bench/warm_gap.py
            # measures the GPU's idle time between jobs from them.
            "timestamps": {"started": round(prepared.started_at, 6), "sampling": round(prepared.sampling_at, 6),
                           "sampled": round(prepared.sampled_at, 6), "finished": round(time.time(), 6)},
        }

    @staticmethod
    def _write(job: Job, out: torch.Tensor, preview_family: str) -> str:
        """Write the preview, then the output; if the output fails, take the preview back."""
        data = encode_latent(out, Path(object_name(job.output, "output")).suffix)
        if job.preview:
            write_object(job.preview, encode_preview_png(out, preview_family), "preview", content_type="image/png")
        try:
            return write_object(job.output, data, "output")
        except BaseException:
            if job.preview:
                try:
                    delete_object(job.preview, "preview")
                except InvalidFile as e:  # the output's error is the job's; this one is only logged
                    log.warning("output write failed and the preview %s could not be taken back: %s", job.preview, e)
            raise


def run_job(job: Job, options: RunOptions, on_progress: ProgressHook | None = None) -> dict:
    """Run one job with a fresh runner (the CLI's case)."""
    return JobRunner(options).run(job, on_progress)
