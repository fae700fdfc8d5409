"""The two-sampler masked loop: the base sampler outside the mask, the mask sampler on the grown mask.

For each step i of `start .. adv_steps - 1` (adv_steps = int(steps / denoise)), the base
sampler advances the whole latent one step with the inverse mask as its noise mask, then
the mask sampler advances it over the same step with the grown mask. Noise is added once,
by the first base call; the last mask call returns a clean latent. (The original passes
"enable"/"disable" strings where booleans are meant, so it re-adds noise on every call;
we follow its intent, which golden `out_intended` records.)

`mode="coherent"` shares the validation here and then runs `coherent_loop.py`: the same
two samplers, kept running across steps on one schedule and one noise stream.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from .coherent_loop import check_coherent, sample_coherent
from .comfy_call import AdvancedSampler, JobRandomness, RegionMask, ScheduleCache, advanced_call
from .errors import InvalidInput, SamplingStopped
from .masks import check_mask_fits, check_overlap, grow_mask, inverse_mask, normalize_mask, to_latent
from .noise_sources import Randomness
from .region_crop import check_crop_margin, crop_box
from .samplers import check_sampler_name
from .schedulers import check_scheduler_name

ProgressHook = Callable[[int, int, str], None]  # (calls done, total calls, "base" | "mask")
StopHook = Callable[[], bool]

MODES = ("comfy", "coherent")
MAX_SEED = 2**64 - 1
MAX_STEPS = 10000  # the most steps a job runs, and the longest schedule `int(steps / denoise)` may ask for


def check_schedule_length(steps: int, denoise: float) -> None:
    """Refuse a `denoise` whose schedule, `int(steps / denoise)` steps, would exceed MAX_STEPS.

    A tiny denoise would otherwise ask for a schedule of a billion sigmas (memory) or an
    infinite one (1 / 5e-324 is inf); compared as floats, so no int() of an overflow.
    """
    length = steps / denoise
    if not length < MAX_STEPS + 1:
        raise InvalidInput(
            "denoise", f"with steps {steps}, the schedule would have int(steps / denoise) = {length:.6g} steps, "
            f"over the maximum of {MAX_STEPS} (denoise must be at least {steps / MAX_STEPS:g})")


def plan_steps(steps: int, denoise: float) -> tuple[int, int]:
    """(adv_steps, start): the schedule length and the first step the job runs."""
    check_schedule_length(steps, denoise)
    adv_steps = int(steps / denoise)
    return adv_steps, adv_steps - steps


def _validate(latent, seed, steps, denoise, overlap_factor, mode, base, mask_sampler) -> None:
    if latent.ndim != 4:
        raise InvalidInput("latent", f"expected shape [B, C, H, W], got {list(latent.shape)}")
    if not torch.is_floating_point(latent) or not torch.isfinite(latent).all():
        raise InvalidInput("latent", "must be floating point with finite values")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInput("seed", f"must be in 0..{MAX_SEED}")
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidInput("steps", f"must be in 1..{MAX_STEPS}")
    if not 0 < denoise <= 1:
        raise InvalidInput("denoise", "must satisfy 0 < denoise <= 1")
    check_schedule_length(steps, denoise)
    if not 0 <= overlap_factor <= 10000:
        raise InvalidInput("overlap_factor", "must be in 0..10000")
    if mode not in MODES:
        raise InvalidInput("mode", f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    for field, sampler in (("base_sampler", base), ("mask_sampler", mask_sampler)):
        check_sampler_name(sampler.sampler_name, f"{field}.sampler_name")
        check_scheduler_name(sampler.scheduler, f"{field}.scheduler")
    if base.denoiser.latent_scale != mask_sampler.denoiser.latent_scale:
        raise InvalidInput("mask_sampler.model", "both samplers' models must use the same latent space (latent scale differs)")


def sample_two_samplers(
    latent: torch.Tensor,
    mask: torch.Tensor,
    base: AdvancedSampler,
    mask_sampler: AdvancedSampler,
    *,
    seed: int,
    steps: int,
    denoise: float = 1.0,
    overlap_factor: int = 10,
    mode: Literal["comfy", "coherent"] = "comfy",
    on_progress: ProgressHook | None = None,
    should_stop: StopHook | None = None,
    randomness: Randomness | None = None,
    crop_margin: int | None = None,
) -> torch.Tensor:
    """Denoise `latent` (raw latent space, [B, C, H, W]) with two samplers split by `mask`.

    Returns a clean latent of the input's shape and dtype. `on_progress` is called after
    every sampler call; `should_stop` is checked before every call and raises
    `SamplingStopped` when it returns true. `crop_margin` (latent pixels; None: off) runs
    the mask sampler on the grown mask's box plus that margin instead of the whole latent
    (`region_crop.py`): faster for small masks, slightly different from full frame.

    `randomness` (default: the draws of `seed`) replaces the job's random draws;
    `job_batch.py` passes one that serves a batch of jobs, each with its own seed.

    `mode`: "comfy" (the original node) or "coherent" (`coherent_loop.py`; refuses
    crop_margin and samplers on different schedulers).
    """
    _validate(latent, seed, steps, denoise, overlap_factor, mode, base, mask_sampler)
    check_crop_margin(crop_margin)
    b, _, h, w = latent.shape
    mask = normalize_mask(mask, b).to(latent.device)
    check_mask_fits(mask, latent.shape)
    check_overlap(overlap_factor, h, w)
    adv_steps, start = plan_steps(steps, denoise)
    if mode == "coherent":
        check_coherent(base, mask_sampler, crop_margin)
        return sample_coherent(latent, mask, base, mask_sampler, adv_steps=adv_steps, start=start, overlap_factor=overlap_factor,
                               randomness=randomness, seed=seed, on_progress=on_progress, should_stop=should_stop)
    base_region = RegionMask.of(to_latent(inverse_mask(mask), latent.shape))
    grown = to_latent(grow_mask(mask, h, w, overlap_factor), latent.shape)
    box = None if crop_margin is None else crop_box(grown, crop_margin)
    mask_region = RegionMask.of(grown if box is None else box.crop(grown))

    total_calls = 2 * (adv_steps - start)
    randomness = JobRandomness(seed) if randomness is None else randomness
    schedules = ScheduleCache()
    scale = base.denoiser.latent_scale
    x = latent.float() * scale
    done = 0
    calls = (("base", base, base_region, None), ("mask", mask_sampler, mask_region, box))
    for i in range(start, adv_steps):
        for which, sampler, region, window in calls:
            if should_stop is not None and should_stop():
                raise SamplingStopped(f"stopped before step {i} ({which} sampler)")
            is_base = which == "base"
            add_noise = is_base and i == start
            leftover = is_base or i + 1 != adv_steps
            x_in = x if window is None else window.crop(x)
            out = advanced_call(sampler, x_in, region, adv_steps, i, i + 1, add_noise, leftover, randomness, schedules)
            x = out if window is None else window.paste(x, out)
            done += 1
            if on_progress is not None:
                on_progress(done, total_calls, which)
    return (x / scale).to(latent.dtype)
