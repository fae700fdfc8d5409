"""The checks a job's inputs get before any model loads: URIs, then the inputs against each other and the models.

Each input is valid alone once its reader accepts it (storage/); these checks make sure
the job as a whole can run: outputs that would not overwrite an input and lie inside
MASKFLEET_ALLOWED_ROOTS, a mask of the latent's batch and aspect ratio, an overlap no
larger than the latent, the channels and conditioning widths each UNet takes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .job import Job
from .model_dirs import UNetInputs
from .sampling.errors import InvalidInput
from .sampling.masks import check_mask_fits, check_overlap
from .storage.allowed_roots import confine
from .storage.file_uris import local_path, resolve_path
from .storage.objects import check_uri, is_s3_uri, object_name

OUTPUT_SUFFIXES = (".latent", ".safetensors")
SAMPLER_FIELDS = ("base_sampler", "mask_sampler")


def _same_object_key(uri: str, field: str) -> str:
    """A key under which two URIs naming the same object compare equal."""
    return uri if is_s3_uri(uri) else str(resolve_path(local_path(uri, field), field))


def check_job_uris(job: Job) -> None:
    """Syntax of every URI, the outputs' suffixes, and that no output would overwrite an input or another output."""
    inputs = job.input_uris()
    for field, uri in inputs.items():
        check_uri(uri, field)
    outputs = {field: getattr(job, field) for field in ("preview", "output_image", "output") if getattr(job, field)}
    for field, uri in outputs.items():
        check_uri(uri, field)
    suffix = Path(object_name(job.output, "output")).suffix if job.output else OUTPUT_SUFFIXES[0]
    if suffix not in OUTPUT_SUFFIXES:
        raise InvalidInput("output", f"suffix must be one of {', '.join(OUTPUT_SUFFIXES)}, got {suffix or 'none'!r}")
    for field in ("preview", "output_image"):
        if field in outputs and Path(object_name(outputs[field], field)).suffix.lower() != ".png":
            raise InvalidInput(field, "must name a .png object")
    taken = {_same_object_key(uri, field) for field, uri in inputs.items()}
    for field, uri in outputs.items():
        if _same_object_key(uri, field) in taken:
            raise InvalidInput(field, "would overwrite one of the job's inputs")
    written: dict[str, str] = {}
    for field, uri in reversed(list(outputs.items())):  # output first: the others are named against it
        key = _same_object_key(uri, field)
        if key in written:
            raise InvalidInput(field, f"must differ from {written[key]}")
        written[key] = field
    for field, uri in outputs.items():  # a write outside MASKFLEET_ALLOWED_ROOTS fails now, not after sampling
        if not is_s3_uri(uri):
            confine(local_path(uri, field), field, writing=True)


# (prompt embeddings [B, T, D], pooled [B, P] or None, SDXL size ids given by name: sdxl_conditioning.size_ids)
Embeds = tuple[torch.Tensor, "torch.Tensor | None", dict]


def check_inputs_fit(job: Job, latent: torch.Tensor, mask: torch.Tensor, cond: dict[str, Embeds],
                     takes: dict[str, UNetInputs]) -> None:
    """The inputs against each other and against each sampler's UNet config, before any model loads.

    Each is valid alone by now; together they must make one job: a mask of the latent's
    batch and aspect ratio, an overlap no larger than the latent, the latent channels,
    conditioning width and (SDXL-style models) pooled width each UNet takes (read from
    its config.json, no weights).
    """
    _, channels, height, width = latent.shape
    check_mask_fits(mask, latent.shape)
    check_overlap(job.overlap_factor, height, width)
    base, inner = takes["base_sampler"].latent_scale, takes["mask_sampler"].latent_scale
    if base != inner:
        raise InvalidInput("mask_sampler.model", f"{job.mask_sampler.model!r} samples in another latent space than "
                           f"base_sampler.model {job.base_sampler.model!r} (latent scale {inner:g}, not {base:g}): "
                           "both samplers need models of one family")
    for field in SAMPLER_FIELDS:
        model = getattr(job, field).model
        unet = takes[field]
        if channels != unet.in_channels:
            raise InvalidInput("latent", f"has {channels} channels; {field}.model {model!r} takes {unet.in_channels}")
        for kind in ("positive", "negative"):
            name = f"{field}.{kind}"
            embeds, pooled, _ = cond[name]
            got = embeds.shape[-1]
            if unet.context_width is not None and got != unet.context_width:
                raise InvalidInput(name, f"is {got} wide (last dimension); {field}.model {model!r} takes {unet.context_width}")
            if unet.pooled_width is None:
                continue
            if pooled is None:
                raise InvalidInput(name, f"has no pooled_prompt_embeds; {field}.model {model!r} is SDXL-style and takes "
                                         f"a pooled embedding [B, {unet.pooled_width}] with the prompt embeddings")
            if pooled.shape[-1] != unet.pooled_width:
                raise InvalidInput(name, f"pooled_prompt_embeds is {pooled.shape[-1]} wide; {field}.model {model!r} "
                                         f"takes {unet.pooled_width}")
