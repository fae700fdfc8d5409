"""The job document: one pydantic model that validates jobs, documents them and publishes their schema.

Everything that describes a job (field names, ranges, defaults, descriptions) is
declared here once; `maskfleet schema` prints the JSON Schema derived from it, the CLI's
help lists its fields, and validation errors name the offending field.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from .names import JOB_ID_PATTERN, MODEL_NAME_PATTERN
from .sampling.coherent_rules import coherent_refusal
from .sampling.errors import InvalidInput
from .sampling.names import SAMPLER_NAMES, SCHEDULER_NAMES
from .sampling.sampling_params import SamplingParams

SamplerName = Literal[SAMPLER_NAMES]  # type: ignore[valid-type]
SchedulerName = Literal[SCHEDULER_NAMES]  # type: ignore[valid-type]

MAX_JOB_BYTES = 1 << 20  # a job document as JSON text; real ones are a few KB
MAX_SHOWN_NAME = 64  # an unknown field's name is cut to this in an error message
MAX_SIZE_ID = 16384  # pixels: the largest size an SDXL size id may name


class PromptText(BaseModel):
    """A prompt given as text, encoded by the model's own text encoder (model dirs with `text_encoder/` and `tokenizer/`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=10000, description="Prompt text; empty is the unconditional prompt.")
    # SDXL's size conditioning, as ComfyUI's CLIPTextEncodeSDXL takes it (pixels); left out: the plain rule.
    width: int | None = Field(None, ge=0, le=MAX_SIZE_ID, description="SDXL only: the size conditioning's width; default the latent's width x 8.")
    height: int | None = Field(None, ge=0, le=MAX_SIZE_ID, description="SDXL only: the size conditioning's height; default the latent's height x 8.")
    crop_w: int | None = Field(None, ge=0, le=MAX_SIZE_ID, description="SDXL only: crop left; default 0.")
    crop_h: int | None = Field(None, ge=0, le=MAX_SIZE_ID, description="SDXL only: crop top; default 0.")
    target_width: int | None = Field(None, ge=0, le=MAX_SIZE_ID, description="SDXL only: target width; default `width`.")
    target_height: int | None = Field(None, ge=0, le=MAX_SIZE_ID, description="SDXL only: target height; default `height`.")

    def size_overrides(self) -> dict[str, int]:
        """The SDXL size ids this prompt sets (the others follow the plain rule)."""
        return {name: value for name, value in self.model_dump(exclude={"prompt"}).items() if value is not None}


def _conditioning_kind(value) -> str:
    return "prompt" if isinstance(value, (dict, PromptText)) else "uri"


Conditioning = Annotated[
    Union[Annotated[str, Field(min_length=1), Tag("uri")], Annotated[PromptText, Tag("prompt")]],
    Discriminator(_conditioning_kind),
    Field(description="URI of a conditioning file (safetensors: prompt_embeds or one tensor), or {\"prompt\": \"text\"}."),
]


class SamplerSpec(BaseModel):
    """One advanced sampler: what ComfyUI's KSamplerAdvanced takes, minus the step range."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(pattern=MODEL_NAME_PATTERN, description="Model name: a diffusers model directory in the model store.")
    sampler_name: SamplerName = Field(description="ComfyUI sampler name.")
    scheduler: SchedulerName = Field(description="ComfyUI scheduler name.")
    cfg: float = Field(8.0, ge=0.0, le=100.0, description="Classifier-free guidance scale; 1.0 skips the negative prompt.")
    vae: str | None = Field(None, pattern=MODEL_NAME_PATTERN, description="A VAE of its own from the model store (a diffusers AutoencoderKL folder or a single safetensors file, as ComfyUI's VAELoader takes), for `image` and `output_image` instead of the model's own; only the base sampler's is used (a mask_sampler.vae must name the same).")
    positive: Conditioning
    negative: Conditioning


EventName = Literal["started", "progress", "succeeded", "failed", "cancelled"]


class Callback(BaseModel):
    """Where a fleet worker posts this job's status (signed webhooks); `maskfleet run` ignores it."""

    model_config = ConfigDict(extra="forbid", strict=True)

    url: str = Field(min_length=1, max_length=2048, description="http(s) URL that receives the job's events as signed POSTs (Standard Webhooks); internal addresses only if the fleet allowlists them.")
    events: list[EventName] | None = Field(None, min_length=1, description="Events to send (started, progress, succeeded, failed, cancelled); leave out for all.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL with a host")
        return url


class Job(SamplingParams):
    """A two-sampler masked sampling job: the sampling params (seed, steps, denoise, overlap_factor,
    crop_margin, mode; declared in sampling/sampling_params.py) plus where its inputs and outputs are."""

    # strict: JSON types as they are ("20" is not a number of steps, true is not 1).
    model_config = ConfigDict(extra="forbid", title="maskfleet job", strict=True)

    job_id: str | None = Field(None, pattern=JOB_ID_PATTERN, description="Client-chosen idempotency key.")
    latent: str | None = Field(None, min_length=1, description="URI of the input latent: ComfyUI .latent or safetensors with one [B, C, H, W] tensor. Give this or `image`.")
    image: str | None = Field(None, min_length=1, description="URI of an input picture (PNG, JPEG, WebP...) instead of a latent: encoded by the base sampler's model's VAE as ComfyUI's VAEEncode does (RGB / 255, the size cropped to a multiple of 8 around the centre).")
    mask: str = Field(min_length=1, description="URI of the mask: PNG (ComfyUI LoadImageMask conventions) or safetensors, any resolution, values in [0, 1].")
    base_sampler: SamplerSpec = Field(description="Sampler for everything outside the mask.")
    mask_sampler: SamplerSpec = Field(description="Sampler for the mask, grown by overlap_factor.")
    output: str | None = Field(None, min_length=1, description="URI of the output latent: .latent (ComfyUI format) or .safetensors. Give this, `output_image`, or both.")
    preview: str | None = Field(None, min_length=1, description="Optional URI of a PNG preview of the output latent.")
    output_image: str | None = Field(None, min_length=1, description="Optional URI of a PNG of the result decoded by the base sampler's model's VAE (ComfyUI's VAEDecode and SaveImage: clamp((x + 1) / 2) * 255, truncated), written before the latent (or instead of it when `output` is left out).")
    paste_back: bool | None = Field(None, description="With `image` and `output_image`: outside the grown mask the output picture's pixels are the input's, bit for bit, blended across the overlap band (a VAE round trip changes every pixel). Default: on when `image` is given.")
    tiled: bool = Field(False, description="Encode and decode the picture in overlapping tiles (large images); the VAE falls back to tiles by itself when the whole does not fit in memory.")
    callback: Callback | None = Field(None, description="Fleet only: webhook for the job's status events; `maskfleet run` ignores it.")
    time_limit: int | None = Field(None, ge=1, le=86400, description="Fleet only: hard time limit in seconds (soft limit a little below), at most the workers' MASKFLEET_MAX_JOB_SECONDS; `maskfleet run` ignores it.")

    @model_validator(mode="after")
    def _one_input(self) -> "Job":
        """The input as a latent or as a picture, exactly one of them; at least one output."""
        if self.latent is not None and self.image is not None:
            raise InvalidInput("latent", "give the input as latent or as image, not both")
        if self.latent is None and self.image is None:
            raise InvalidInput("latent", "required: give latent (a latent file) or image (a picture the model's VAE encodes)")
        if self.output is None and self.output_image is None:
            raise InvalidInput("output", "required: give output (the latent), output_image (the picture), or both")
        if self.paste_back and self.image is None:
            raise InvalidInput("paste_back", "needs image: it pastes the input picture's pixels back outside the mask")
        if self.mask_sampler.vae is not None and self.mask_sampler.vae != self.base_sampler.vae:
            raise InvalidInput("mask_sampler.vae", "the picture is encoded and decoded once, with base_sampler.vae: "
                                                   f"name the same VAE there ({self.base_sampler.vae!r}) or leave it out")
        return self

    @model_validator(mode="after")
    def _mode_can_run(self) -> "Job":
        """Coherent mode's refusals (schedulers that differ, crop_margin, samplers it cannot make right),
        at submission rather than on a worker after the models are loaded."""
        if self.mode == "coherent":
            refusal = coherent_refusal(self.base_sampler.sampler_name, self.base_sampler.scheduler,
                                       self.mask_sampler.sampler_name, self.mask_sampler.scheduler, self.crop_margin)
            if refusal is not None:
                raise InvalidInput(*refusal)
        return self

    @property
    def pastes_back(self) -> bool:
        """Whether the output picture gets the input picture's pixels outside the grown mask."""
        return self.image is not None and self.paste_back is not False

    def sampling_params(self) -> SamplingParams:
        """The params the engine samples with (SamplingJob.params), without the job's URIs."""
        return SamplingParams.model_validate({name: getattr(self, name) for name in SamplingParams.model_fields})

    def input_uris(self) -> dict[str, str]:
        """Every object the job reads, by field: latent or image, mask, and conditionings given as URIs."""
        inputs = {"latent": self.latent, "image": self.image, "mask": self.mask}
        inputs = {field: uri for field, uri in inputs.items() if uri is not None}
        for field in ("base_sampler", "mask_sampler"):
            for kind in ("positive", "negative"):
                value = getattr(getattr(self, field), kind)
                if isinstance(value, str):
                    inputs[f"{field}.{kind}"] = value
        return inputs


class JobError(ValueError):
    """A job document that does not validate; the message lists each field and its reason."""


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = [str(p) for p in e["loc"]]
        # Drop the union tag pydantic puts after positive/negative ("uri" or "prompt").
        loc = [p for i, p in enumerate(loc) if not (i and loc[i - 1] in ("positive", "negative") and p in ("uri", "prompt"))]
        refused = (e.get("ctx") or {}).get("error")
        if not loc and isinstance(refused, InvalidInput):
            lines.append(str(refused))  # already "<field>: <reason>"
            continue
        where = ".".join(p if len(p) <= MAX_SHOWN_NAME else p[:MAX_SHOWN_NAME] + "..." for p in loc) or "job"
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def _document_bytes(data: dict | str | bytes) -> int:
    """The size of a job document as JSON text (a dict, as a message carries it, measured as JSON)."""
    if isinstance(data, bytes):
        return len(data)
    if isinstance(data, str):
        return len(data.encode("utf-8", "surrogatepass"))
    try:
        return len(json.dumps(data, default=str, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    except (TypeError, ValueError, RecursionError):
        return 0  # not JSON-shaped (a cycle, odd keys): pydantic says what is wrong with it


def parse_job(data: dict | str | bytes) -> Job:
    """Validate a job given as a dict or as JSON text (at most MAX_JOB_BYTES); raise JobError naming every bad field."""
    size = _document_bytes(data)
    if size > MAX_JOB_BYTES:
        raise JobError(f"job: the document is {size} bytes, over the {MAX_JOB_BYTES}-byte cap")
    try:
        if isinstance(data, (str, bytes)):
            return Job.model_validate_json(data)
        return Job.model_validate(data)
    except ValidationError as e:
        raise JobError(_describe(e)) from None


def job_schema() -> dict:
    """The JSON Schema of a job document."""
    return Job.model_json_schema()


def _fields() -> list[tuple[str, object]]:
    """(dotted name, field info) of every job field; a sampler's fields once, under base_sampler."""
    out = []
    for name, info in Job.model_fields.items():
        out.append((name, info))
        sub_model = {"base_sampler": SamplerSpec, "callback": Callback}.get(name)
        for sub, sub_info in (sub_model.model_fields.items() if sub_model else ()):
            out.append((f"{name}.{sub}", sub_info))
    return out


def field_help() -> str:
    """One line per job field (sampler fields indented), for the CLI's help text."""
    return "\n".join(f"  {'  ' * name.count('.')}{name.rsplit('.', 1)[-1]}: {info.description}" for name, info in _fields())


def fields_markdown() -> str:
    """docs/job.md: every field of a job document, from the model (`maskfleet schema --markdown`)."""
    lines = ["# The job document", "",
             "Generated from the pydantic model in `maskfleet/job.py` (`maskfleet schema --markdown > docs/job.md`;",
             "`maskfleet schema` prints the JSON Schema). `mask_sampler` has the fields of `base_sampler`.", "",
             "| field | required | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in _fields():
        required = "yes" if info.is_required() else ""
        default = "" if info.is_required() or info.default is None else f"`{json.dumps(info.default)}`"
        lines.append(f"| `{name}` | {required} | {default} | {info.description or ''} |")
    return "\n".join(lines) + "\n"
