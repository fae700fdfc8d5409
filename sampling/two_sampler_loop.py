"""The two-sampler masked loop: the base sampler outside the mask, the mask sampler on the grown mask.

For each step i of `start .. adv_steps - 1` (adv_steps = int(steps / denoise)), the base
sampler advances the whole latent one step with the inverse mask as its noise mask, then
the mask sampler advances it over the same step with the grown mask. Noise is added once,
by the first base call; the last mask call returns a clean latent. (The original passes
"enable"/"disable" strings where booleans are meant, so it re-adds noise on every call;
we follow its intent, which golden `out_intended` records.)

`mode="coherent"` shares the validation here and then runs `coherent_loop.py`: the same
two samplers, kept running across steps on one schedule and one noise stream.
`mode="regional"` runs `regional_loop.py`: the node as Impact Pack has shipped it since 2024-08.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .coherent_loop import check_coherent, sample_coherent
from .comfy_call import AdvancedSampler, CallSpan, JobRandomness, OneCall, RegionMask, ScheduleCache
from .errors import InvalidInput, SamplingStopped
from .masks import check_mask_fits, check_overlap, grow_mask, inverse_mask, normalize_mask, to_latent
from .noise_sources import Randomness
from .region_crop import crop_box
from .regional_loop import sample_regional
from .hooks import CALLS_PER_STEP, ProgressHook, StopHook
from .samplers import check_sampler_name
from .sampling_job import SamplingJob
from .schedulers import check_scheduler_name


def check_tensors_and_samplers(job: SamplingJob) -> None:
    """What SamplingParams cannot check: the latent, the sampler names and the samplers' latent space."""
    latent = job.latent
    if latent.ndim != 4:
        raise InvalidInput("latent", f"expected shape [B, C, H, W], got {list(latent.shape)}")
    if not torch.is_floating_point(latent) or not torch.isfinite(latent).all():
        raise InvalidInput("latent", "must be floating point with finite values")
    for field, sampler in (("base_sampler", job.base), ("mask_sampler", job.mask_sampler)):
        check_sampler_name(sampler.sampler_name, f"{field}.sampler_name")
        check_scheduler_name(sampler.scheduler, f"{field}.scheduler")
    if job.base.denoiser.latent_scale != job.mask_sampler.denoiser.latent_scale:
        raise InvalidInput("mask_sampler.model", "both samplers' models must use the same latent space (latent scale differs)")


def sample_two_samplers(
    latent: torch.Tensor,
    mask: torch.Tensor,
    base: AdvancedSampler,
    mask_sampler: AdvancedSampler,
    *,
    on_progress: ProgressHook | None = None,
    should_stop: StopHook | None = None,
    randomness: Randomness | None = None,
    **params: Any,
) -> torch.Tensor:
    """`sample_job` for a library caller: `params` are SamplingParams' fields as keywords
    (seed, steps, denoise, overlap_factor, crop_margin, mode); a bad one is InvalidInput naming it."""
    job = SamplingJob.of(latent, mask, base, mask_sampler, **params)
    return sample_job(job, on_progress=on_progress, should_stop=should_stop, randomness=randomness)


def sample_job(
    job: SamplingJob,
    *,
    on_progress: ProgressHook | None = None,
    should_stop: StopHook | None = None,
    randomness: Randomness | None = None,
) -> torch.Tensor:
    """Denoise `job.latent` (raw latent space, [B, C, H, W]) with two samplers split by `job.mask`.

    Returns a clean latent of the input's shape and dtype. `on_progress` is called after
    every sampler call; `should_stop` is checked before every call and raises
    `SamplingStopped` when it returns true. `crop_margin` (latent pixels; None: off) runs
    the mask sampler on the grown mask's box plus that margin instead of the whole latent
    (`region_crop.py`): faster for small masks, slightly different from full frame.

    `randomness` (default: the draws of the job's seed) replaces the job's random draws;
    `job_batch.py` passes one that serves a batch of jobs, each with its own seed.

    Mode "comfy" is the original node; "regional" the node as Impact Pack ships it today
    (`regional_loop.py`); "coherent" runs `coherent_loop.py` (it refuses crop_margin and
    samplers on different schedulers).
    """
    check_tensors_and_samplers(job)
    params = job.params
    b, _, h, w = job.latent.shape
    mask = normalize_mask(job.mask, b).to(job.latent.device)
    check_mask_fits(mask, job.latent.shape)
    if params.mode == "regional":
        check_overlap(params.overlap_factor, mask.shape[-2], mask.shape[-1], "mask")
    else:
        check_overlap(params.overlap_factor, h, w)
    job = dataclasses.replace(job, mask=mask)
    randomness = JobRandomness(params.seed) if randomness is None else randomness
    if params.mode == "coherent":
        check_coherent(job.base, job.mask_sampler, params.crop_margin)
        return sample_coherent(job, randomness, on_progress, should_stop)
    if params.mode == "regional":
        return sample_regional(job, randomness, on_progress, should_stop)
    return _sample_comfy(job, randomness, on_progress, should_stop)


def _sample_comfy(job: SamplingJob, randomness: Randomness, on_progress: ProgressHook | None,
                  should_stop: StopHook | None) -> torch.Tensor:
    """Comfy-mode body of `sample_job` (inputs validated; mask [B, h, w])."""
    latent, mask, params = job.latent, job.mask, job.params
    _, _, h, w = latent.shape
    adv_steps, start = params.plan()
    base_region = RegionMask.of(to_latent(inverse_mask(mask), latent.shape))
    grown = to_latent(grow_mask(mask, h, w, params.overlap_factor), latent.shape)
    box = None if params.crop_margin is None else crop_box(grown, params.crop_margin)
    mask_region = RegionMask.of(grown if box is None else box.crop(grown))

    total_calls = CALLS_PER_STEP * (adv_steps - start)
    schedules = ScheduleCache()
    scale = job.base.denoiser.latent_scale
    x = latent.float() * scale
    done = 0
    calls = (("base", job.base, base_region, None), ("mask", job.mask_sampler, mask_region, box))
    for i in range(start, adv_steps):
        for which, sampler, region, window in calls:
            if should_stop is not None and should_stop():
                raise SamplingStopped(f"stopped before step {i} ({which} sampler)")
            is_base = which == "base"
            span = CallSpan(adv_steps, i, i + 1, add_noise=is_base and i == start, leftover=is_base or i + 1 != adv_steps)
            x_in = x if window is None else window.crop(x)
            out = OneCall(sampler, region, span, randomness, schedules).run(x_in)
            x = out if window is None else window.paste(x, out)
            done += 1
            if on_progress is not None:
                on_progress(done, total_calls, which)
    return (x / scale).to(latent.dtype)
