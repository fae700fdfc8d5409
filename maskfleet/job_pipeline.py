"""The job pipeline: one job from its validated document to its result, free of Celery.

inputs -> checks -> sampling -> output write (with its retry) -> result, in one call,
`JobPipeline.run`: `maskfleet run`, the fleet's task and the embedded demo all call it.
A picture given as input is encoded by the VAE once every input is checked; the outputs
(preview, decoded picture, latent) are made once and then written, the latent last.

Data flows one way: every URI checked (local outputs against the allowed roots too) ->
models found (fetched into the cache if the store is S3) -> inputs read and checked,
alone and against each other and the models' configs (job_checks.py) -> models loaded
(kept in an LRU across jobs) -> sampling (alone, or through the worker's model lane) ->
output written whole (temp file + rename locally, one PUT or a completed multipart
upload on S3). Every input is read and checked before a model is loaded or anything is
written, so a bad job fails fast, names the field to fix and leaves no output behind.
An output write that fails on a storage fault is retried alone (`RunOptions.write_retries`
times): sampling again would redo the GPU's work for a fault of the store.
"""
from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .job import Job, PromptText
from .job_checks import SAMPLER_FIELDS, Embeds, check_inputs_fit, check_job_uris
from .model_cache import LoadedModels
from .model_dirs import UNetInputs, load_unet_denoiser, unet_inputs
from .model_lane import ModelLane
from .prepared_job import PreparedJob, batch_key
from .prompt_encoder import PromptEncoder
from .sampling import AdvancedSampler, ProgressHook, SamplingJob, StopHook
from .sampling.errors import InvalidInput, SamplingStopped
from .sampling.paste_back import paste_back
from .sampling.sdxl_conditioning import SIZE_ID_NAMES, pack, size_ids
from .sampling.unet_denoiser import SDXL_LATENT_SCALE, UNetDenoiser
from .storage.conditioning_files import read_conditioning_file
from .storage.errors import InvalidFile, StorageUnavailable
from .storage.image_files import encode_png, read_image
from .storage.latent_files import encode_latent, read_latent
from .storage.mask_files import read_mask
from .storage.model_store import ModelStore
from .storage.objects import delete_object, object_name, write_object
from .storage.preview_png import encode_preview_png
from .vae_codec import DOWNSCALE, VAECodec, crop_to_multiple, load_vae, vae_latent_channels

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
STORAGE_BACKOFF_MAX = 300  # seconds, the longest wait between two attempts on storage faults


@dataclass(frozen=True)
class RunOptions:
    models_root: str  # local folder, file:// or s3://bucket/prefix
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "float32"
    model_cache_dir: Path | None = None  # where S3 models are downloaded (default: the store's)
    write_retries: int = 0  # output writes retried alone on storage faults (the fleet: MASKFLEET_STORAGE_RETRIES)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidInput("device", f"{device!r} asked for but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InvalidInput("device", f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None


def storage_retry_countdown(retries: int) -> float:
    """Seconds before the next attempt after a storage fault: half of 2, 4, 8, ... (at most 300)
    fixed, the other half jittered, so retries spread out yet the default 5 span at least 31 s
    of outage (full jitter could wait 0 s every time and spend them all in a moment)."""
    base = min(STORAGE_BACKOFF_MAX, 2 ** (retries + 1))
    return base / 2 + random.uniform(0, base / 2)


class OutputWriteFailed(StorageUnavailable):
    """The output could not be written after the write's own retries: the job fails with `error`
    (a fleet worker does not retry the task: the job was sampled, and sampling again would not help)."""

    def __init__(self, error: StorageUnavailable):
        super().__init__(error.field, error.reason)
        self.error = error


def model_conditioning(embeds: Embeds, takes: UNetInputs, latent: torch.Tensor) -> torch.Tensor:
    """The conditioning tensor the sampler hands the model: the prompt embeddings, with the pooled
    embedding and the size ids (those given, else the plain rule for this latent) packed after them
    for an SDXL-style model (sampling/sdxl_conditioning.py)."""
    tokens, pooled, given = embeds
    if takes.pooled_width is None:
        return tokens
    return pack(tokens, pooled, size_ids(*latent.shape[-2:], given))  # type: ignore[arg-type]


def vae_channels(job: Job, vae_path: Path, takes: UNetInputs, field: str) -> int:
    """The latent channels of the job's VAE, which must be those the base sampler's UNet takes;
    refused naming `field` (`image` / `output_image`), or `base_sampler.vae` when it names the VAE."""
    channels = vae_latent_channels(vae_path, field)
    if channels != takes.in_channels:
        blamed = "base_sampler.vae" if job.base_sampler.vae else field
        raise InvalidInput(blamed, f"the VAE ({vae_path.name}) makes {channels}-channel latents; base_sampler.model "
                                   f"{job.base_sampler.model!r} takes {takes.in_channels}")
    return channels


class JobPipeline:
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
        self.write_retries = options.write_retries
        self.store = ModelStore(options.models_root, options.model_cache_dir)
        self.models: LoadedModels[UNetDenoiser | VAECodec] = LoadedModels(device=self.device, dtype=self.dtype)
        self.prompts = PromptEncoder(self.device, self.dtype)
        self.lane = lane
        self._loading = threading.Lock()  # model store, model LRU and prompt encoder: one thread at a time

    def run(self, job: Job, on_progress: ProgressHook | None = None, should_stop: StopHook | None = None) -> dict:
        """Run `job` start to end and return a small JSON-able result (never tensors)."""
        prepared, out = self.sampled(job, on_progress, should_stop)
        return self.write(prepared, out, should_stop or (lambda: False))

    def _conditioning(self, value: str | PromptText, model_dir: Path, field: str) -> Embeds:
        """(prompt embeddings, pooled or None) on the device, from a file or the model's text encoder."""
        if isinstance(value, PromptText):
            with self._loading:
                return (*self.prompts.encode_with_pooled(model_dir, value.prompt, field), value.size_overrides())
        embeds, pooled, ids = read_conditioning_file(value, field)
        given = {} if ids is None else dict(zip(SIZE_ID_NAMES, ids))
        return embeds.to(self.device), None if pooled is None else pooled.to(self.device), given

    def prepare(self, job: Job) -> PreparedJob:
        """Read and check every input, then load the models: everything before the first model call."""
        started, started_at = time.perf_counter(), time.time()
        check_job_uris(job)
        with self._loading:
            model_dirs = {field: self.store.local_model(getattr(job, field).model, f"{field}.model") for field in SAMPLER_FIELDS}
        takes = {field: unet_inputs(model_dirs[field], f"{field}.model") for field in SAMPLER_FIELDS}
        vae_path = self._vae_path(job, model_dirs["base_sampler"])
        latent, pixels = self._input(job, vae_path, takes["base_sampler"])
        if job.output_image is not None:
            vae_channels(job, vae_path, takes["base_sampler"], "output_image")  # type: ignore[arg-type]
        mask = read_mask(job.mask, "mask")
        cond = {
            f"{field}.{kind}": self._conditioning(getattr(getattr(job, field), kind), model_dirs[field], f"{field}.{kind}")
            for field in SAMPLER_FIELDS
            for kind in ("positive", "negative")
        }
        check_inputs_fit(job, latent, mask, cond, takes)
        vae = self._vae(job, vae_path) if vae_path is not None else None
        if pixels is not None:
            latent = vae.encode(pixels, tiled=job.tiled)
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
                positive=model_conditioning(cond[f"{field}.positive"], takes[field], latent),
                negative=model_conditioning(cond[f"{field}.negative"], takes[field], latent),
            )
        sampling = SamplingJob(latent.to(self.device), mask, samplers["base_sampler"], samplers["mask_sampler"],
                               job.sampling_params())
        return PreparedJob(job, sampling, started, started_at, vae=vae, pixels=pixels)

    def _vae_path(self, job: Job, base_model: Path) -> Path | None:
        """Where the job's VAE is (the base sampler's `vae`, else its model) when it reads or writes a picture."""
        if job.image is None and job.output_image is None:
            return None
        if job.base_sampler.vae is None:
            return base_model
        with self._loading:
            return self.store.local_model(job.base_sampler.vae, "base_sampler.vae")

    def _input(self, job: Job, vae_path: Path | None, takes: UNetInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the input latent, the picture it will be encoded from or None). A picture is read and cropped
        now, and stands as the shape of the latent it gives (on the meta device) until every input is
        checked: then it is encoded."""
        if job.image is None:
            return read_latent(job.latent, "latent"), None
        pixels = crop_to_multiple(read_image(job.image, "image"))
        channels = vae_channels(job, vae_path, takes, "image")  # type: ignore[arg-type]
        return torch.empty(1, channels, pixels.shape[1] // DOWNSCALE, pixels.shape[2] // DOWNSCALE, device="meta"), pixels

    def _vae(self, job: Job, vae_path: Path) -> VAECodec:
        """The base sampler's VAE (its `vae`, else its model's), kept loaded with the models."""
        spec = job.base_sampler
        name, field = (f"{spec.vae}/vae", "base_sampler.vae") if spec.vae else (f"{spec.model}/vae", "base_sampler.model")
        with self._loading:
            return self.models.get(name, field, lambda: load_vae(vae_path, self.device, field), dtype=torch.float32)

    def sampled(self, job: Job, on_progress: ProgressHook | None = None,
                should_stop: StopHook | None = None) -> tuple[PreparedJob, torch.Tensor]:
        """Prepare and sample `job`: everything before its output is written (the sampled latent on the CPU)."""
        if self.lane is None:
            prepared = self.prepare(job)
            out = prepared.sample(on_progress, should_stop)
        else:
            with self.lane.expecting() as expected:
                prepared = self.prepare(job)
                out = self.lane.run(prepared, batch_key(prepared), on_progress, should_stop, expected)
        return prepared, out.cpu()

    def write(self, prepared: PreparedJob, out: torch.Tensor, should_stop: StopHook) -> dict:
        """The job's output files made once (`outputs`), then written by `finish`, retried alone on storage
        faults (`write_retries` times, `storage_retry_countdown` apart; `should_stop` asked before each new
        attempt); then OutputWriteFailed."""
        files = self.outputs(prepared, out)
        attempt = 0
        while True:
            try:
                return self.finish(prepared, out, files)
            except StorageUnavailable as e:
                if attempt == self.write_retries:
                    raise OutputWriteFailed(e) from None
                wait = storage_retry_countdown(attempt)
                attempt += 1
                log.warning("job %s: output write failed (%s); writing again in %.1f s (retry %d of %d), not sampling again",
                            prepared.job.job_id or prepared.job.output, e, wait, attempt, self.write_retries)
            time.sleep(wait)
            if should_stop():
                raise SamplingStopped("stopped before writing the output again")

    def outputs(self, prepared: PreparedJob, out: torch.Tensor) -> dict[str, bytes]:
        """The bytes of every file the job writes, by field, in writing order: preview, output_image (the
        latent decoded by the VAE, the input picture pasted back outside the mask), output (when given) last."""
        job = prepared.job
        if not torch.isfinite(out).all():
            raise InvalidInput("output", "sampling produced NaN or infinite values; nothing was written")
        files = {}
        if job.preview:
            family = "sdxl" if abs(prepared.sampling.base.denoiser.latent_scale - SDXL_LATENT_SCALE) < 1e-6 else "sd15"
            files["preview"] = encode_preview_png(out, family)
        if job.output_image:
            decoded = prepared.vae.decode(out, tiled=job.tiled)
            if job.pastes_back:
                decoded = paste_back(decoded, prepared.pixels, prepared.sampling.mask, job.overlap_factor)
            files["output_image"] = encode_png(decoded)
        if job.output:
            files["output"] = encode_latent(out, Path(object_name(job.output, "output")).suffix)
        return files

    def finish(self, prepared: PreparedJob, out: torch.Tensor, files: dict[str, bytes]) -> dict:
        """Write the job's files (`outputs`); the job's result."""
        job = prepared.job
        sha256 = self._write(job, files)
        return {
            "job_id": job.job_id,
            "output": job.output,
            "sha256": sha256.get("output"),
            "preview": job.preview,
            **({"output_image": job.output_image, "output_image_sha256": sha256["output_image"]} if job.output_image else {}),
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
    def _write(job: Job, files: dict[str, bytes]) -> dict[str, str]:
        """Write the files in order (the last, the output latent when there is one, is the commit point);
        when one fails, take back those written before it. Their sha256 by field."""
        written: dict[str, str] = {}
        try:
            for field, data in files.items():
                content_type = "image/png" if field in ("preview", "output_image") else None
                written[field] = write_object(getattr(job, field), data, field, content_type=content_type)
        except BaseException:
            for field in written:
                try:
                    delete_object(getattr(job, field), field)
                except InvalidFile as e:  # the failed write's error is the job's; this one is only logged
                    log.warning("a write failed and %s %s could not be taken back: %s", field, getattr(job, field), e)
            raise
        return written


def run_job(job: Job, options: RunOptions, on_progress: ProgressHook | None = None) -> dict:
    """Run one job with a fresh pipeline (the CLI's case)."""
    return JobPipeline(options).run(job, on_progress)
