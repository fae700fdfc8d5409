"""One call of an advanced sampler over steps [start, end), with the original node's semantics.

This is what Impact Pack's `KSamplerAdvancedWrapper.sample_advanced` does on top of
ComfyUI (rules in shared/golden/README.md): slice the sampler's own schedule, add the
seeded starting noise when asked, run a *fresh* sampler (no history, so multistep
methods act first order) with an inpainting wrapper around the model, return either the
final x or the last reported x0, and for the SDE and uni_pc samplers composite the
result into the call's input and run a second "recovery" pass over the same step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .guidance import Denoiser, guided_denoise
from .noise_sources import JobRandomness, Randomness  # noqa: F401 (JobRandomness re-exported for callers)
from .samplers import RECOVERY_SAMPLERS, SAMPLERS, SamplerInfo, StepContext
from .schedulers import schedule_for


@dataclass
class AdvancedSampler:
    """ComfyUI's KSamplerAdvanced minus the step range: what each of the two samplers is."""

    denoiser: Denoiser
    cfg: float
    sampler_name: str
    scheduler: str
    positive: torch.Tensor
    negative: torch.Tensor


@dataclass(frozen=True)
class RegionMask:
    """A call's noise mask at latent resolution with the products every model evaluation reuses."""

    inside: torch.Tensor  # m, [B, C, H, W]
    outside: torch.Tensor  # 1 - m

    @classmethod
    def of(cls, latent_mask: torch.Tensor) -> "RegionMask":
        return cls(latent_mask, 1.0 - latent_mask)


class ScheduleCache:
    """Full sigma schedules by (sampler name, scheduler, steps), computed once per job."""

    def __init__(self) -> None:
        self._cache: dict[tuple, torch.Tensor] = {}

    def get(self, denoiser: Denoiser, sampler_name: str, scheduler: str, steps: int) -> torch.Tensor:
        key = (id(denoiser.schedule), sampler_name, scheduler, steps)
        if key not in self._cache:
            self._cache[key] = schedule_for(denoiser.schedule, sampler_name, scheduler, steps)
        return self._cache[key]


def start_noise_scale(sigma_max: float, sigma0):
    """What the starting noise is multiplied by: ComfyUI's sqrt(1 + sigma0^2) when the run
    starts at the schedule's top (full denoise), else `sigma0` itself (as given)."""
    s0 = float(sigma0)
    if math.isclose(sigma_max, s0, rel_tol=1e-05) or s0 > sigma_max:
        return math.sqrt(1.0 + s0**2)
    return sigma0


def step_sigmas(total: torch.Tensor, start: int, end: int, leftover: bool) -> torch.Tensor | None:
    """The sigmas a call runs over, or None when the step range lies past the schedule's end."""
    sigmas = total
    if end < len(total) - 1:
        sigmas = total[: end + 1].clone()
        if not leftover:
            sigmas[-1] = 0
    if start >= len(sigmas) - 1:
        return None
    return sigmas[start:]


@dataclass(frozen=True)
class CallSpan:
    """The step range one call runs: steps [start, end) of a `steps`-step schedule, whether
    it adds the starting noise, and whether it returns x with leftover noise (else the last x0)."""

    steps: int
    start: int
    end: int
    add_noise: bool
    leftover: bool


@dataclass(frozen=True)
class Recovery:
    """Impact Pack's recovery for the SDE and uni_pc samplers (`SamplerInfo.recovery_sampler`):
    the sampler's pass on its step's sigmas times `first`, composited over the call's input
    with the noise mask, then the recovery sampler's pass over the same step on its own
    schedule times `second`."""

    first: float
    second: float


RATIO_ADDITIONAL = Recovery(1.0, 1.0)  # the original node: mode "ratio additional", ratio 1.0
RATIO_BETWEEN = Recovery(1.0 - 0.3, 0.3)  # the node since 2024-08: "ratio between", ratio 0.3


@dataclass(frozen=True)
class OneCall:
    """One call of an advanced sampler inside `region` over `span`, with the job's draws and
    schedules; `recovery` None is Impact Pack's recovery mode "DISABLE"."""

    sampler: AdvancedSampler
    region: RegionMask
    span: CallSpan
    randomness: Randomness
    schedules: ScheduleCache
    recovery: Recovery | None = RATIO_ADDITIONAL

    def run(self, x_in: torch.Tensor) -> torch.Tensor:
        """The sampler's pass, then (SDE and uni_pc samplers) Impact Pack's recovery pass."""
        info = SAMPLERS[self.sampler.sampler_name]
        recovery = self.recovery
        if info.recovery_sampler is None or recovery is None:
            return self._pass(info, self.sampler.sampler_name, x_in)
        x = self._pass(info, self.sampler.sampler_name, x_in, recovery.first)
        composite = x * self.region.inside + x_in * self.region.outside
        return self._pass(RECOVERY_SAMPLERS[info.recovery_sampler], info.recovery_sampler, composite, recovery.second)

    def _pass(self, info: SamplerInfo, schedule_name: str, x_in: torch.Tensor, sigma_ratio: float = 1.0) -> torch.Tensor:
        sampler, region, span, randomness = self.sampler, self.region, self.span, self.randomness
        denoiser = sampler.denoiser
        total = self.schedules.get(denoiser, schedule_name, sampler.scheduler, span.steps)
        sigmas = step_sigmas(total, span.start, span.end, span.leftover)
        if sigmas is None:
            return x_in
        if sigma_ratio != 1.0:
            sigmas = sigmas * sigma_ratio  # the Brownian tree below still spans the unscaled schedule
        # The sigmas stay on the CPU (0-d CPU tensors mix with tensors on any device), so the
        # steps' sigma comparisons and the denoiser's timestep lookup never wait on a GPU.
        if span.add_noise:
            noise = randomness.start_noise(x_in.shape, x_in.device)
            x = x_in + noise * start_noise_scale(float(denoiser.schedule.sigma_max), sigmas[0])
        else:
            noise = None
            x = x_in
        if info.inpaint_random_noise:
            noise = randomness.inpaint_noise(x_in.shape, x_in.device)
        kept = x_in * region.outside  # what the model's output is replaced by outside the mask

        def model(x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            outside_input = kept if noise is None else (x_in + noise * sigma) * region.outside
            seen = x_t * region.inside + outside_input
            denoised = guided_denoise(denoiser, seen, sigma, sampler.positive, sampler.negative, sampler.cfg)
            return denoised * region.inside + kept

        if info.noise == "ancestral":
            noise_source = lambda sigma, sigma_next: randomness.ancestral_noise(x.shape, x.device)  # noqa: E731
        elif info.noise == "brownian":
            positive = total[total > 0]
            noise_source = randomness.brownian(x, positive.min(), total.max())
        else:
            noise_source = None
        ctx = StepContext(model=model, noise=noise_source)
        denoised = None
        for i in range(len(sigmas) - 1):
            x, denoised = info.step(ctx, x, sigmas[i], sigmas[i + 1])
        if span.leftover or denoised is None:
            return x
        return denoised
