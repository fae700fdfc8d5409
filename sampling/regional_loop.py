"""Mode "regional": the node as Impact Pack ships it since 2024-08-03, one region of its RegionalSampler.

The rewritten node no longer has a loop of its own: it calls `RegionalSampler` with the
mask as its one region (base_only_steps 1, restore_latent on, recovery "ratio between"
0.3). What differs from the original loop (`two_sampler_loop.py`, mode "comfy"):

- The base region is where the mask is exactly 0; soft edges belong to the mask's side.
- The grown region is grown at the mask's own resolution, so `overlap_factor` counts mask
  pixels, and is resized bilinearly to the latent (its edge blends over a latent pixel).
- The first step is the base sampler's alone, over the whole latent, adding the noise.
- Every later step: the base sampler steps the latent inside its region, the mask sampler
  steps that result inside the grown region, and the two are composited with the grown
  region, so the overlap band is stepped by both within the step.
- The SDE and uni_pc samplers' recovery splits each step's sigmas 0.7 / 0.3 between the
  sampler and its recovery sampler (`RATIO_BETWEEN`); the first step runs no recovery.

With a soft mask, mask values in (0, 0.5) beyond the growth belong to neither region and
keep the first step's value, as in the node. The node resizes its mask with height and
width swapped (a non-square mask is squashed); we resize in the right orientation, as
`out_head_node_hw_fixed` in the golden data does. Rules: shared/golden/README.md, "The HEAD node".
"""
from __future__ import annotations

import torch

from .comfy_call import RATIO_BETWEEN, CallSpan, OneCall, RegionMask, ScheduleCache
from .errors import SamplingStopped
from .hooks import CALLS_PER_STEP, ProgressHook, StopHook
from .masks import grow_mask, outside_mask, to_latent
from .noise_sources import Randomness
from .sampling_job import SamplingJob


def regional_regions(mask: torch.Tensor, latent_shape: torch.Size, overlap_factor: int) -> tuple[RegionMask, RegionMask]:
    """(base region, grown region) at the latent's resolution for a [B, h, w] mask: the base
    region where the mask is 0, the grown one dilated by `overlap_factor` mask pixels."""
    mask_height, mask_width = mask.shape[-2:]
    base_region = RegionMask.of(to_latent(outside_mask(mask), latent_shape))
    grown = grow_mask(mask, mask_height, mask_width, overlap_factor)
    return base_region, RegionMask.of(to_latent(grown, latent_shape))


def sample_regional(job: SamplingJob, randomness: Randomness, on_progress: ProgressHook | None,
                    should_stop: StopHook | None) -> torch.Tensor:
    """Regional-mode body of `sample_job` (inputs validated; mask [B, h, w])."""
    latent, mask, params = job.latent, job.mask, job.params
    adv_steps, start = params.plan()
    base_region, mask_region = regional_regions(mask, latent.shape, params.overlap_factor)
    whole = RegionMask.of(torch.ones_like(base_region.inside))  # the first call has no noise mask

    schedules = ScheduleCache()
    scale = job.base.denoiser.latent_scale
    total_calls = CALLS_PER_STEP * params.steps

    def call(which: str, region: RegionMask, span: CallSpan, x: torch.Tensor, done: int) -> torch.Tensor:
        if should_stop is not None and should_stop():
            raise SamplingStopped(f"stopped before step {span.start} ({which} sampler)")
        sampler = job.base if which == "base" else job.mask_sampler
        recovery = None if span.add_noise else RATIO_BETWEEN  # the base-only step (it adds the noise) has none
        out = OneCall(sampler, region, span, randomness, schedules, recovery).run(x)
        if on_progress is not None:
            on_progress(done, total_calls, which)
        return out

    # The base-only first step counts as both calls of its step for progress.
    x = call("base", whole, CallSpan(adv_steps, start, start + 1, add_noise=True, leftover=True),
             latent.float() * scale, CALLS_PER_STEP)
    for i in range(start + 1, adv_steps):
        span = CallSpan(adv_steps, i, i + 1, add_noise=False, leftover=True)
        done = CALLS_PER_STEP * (i - start)
        stepped = call("base", base_region, span, x, done + 1)
        both = call("mask", mask_region, span, stepped, done + 2)
        x = both * mask_region.inside + stepped * mask_region.outside
    return (x / scale).to(latent.dtype)
