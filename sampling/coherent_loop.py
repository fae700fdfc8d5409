"""Coherent mode: the two-sampler loop with each sampler's state kept, one schedule and one noise.

The original node's failures come from its structure, not its samplers: every one-step
call restarts its sampler (multistep methods act first order, uni_pc does not denoise at
all without a recovery pass), redraws its noise, and treats the other region's latent as
if it were at its own noise level. Coherent mode keeps what is good in the algorithm
(two samplers with their own model, cfg and conditioning; an overlap band that hides
the seam) and removes those causes:

- One sigma schedule for both samplers (the base sampler's), so both regions are always
  at the same noise level and the model can be given the whole current latent as is: no
  inpainting wrapper, no re-noised copy of the other region. Schedulers that differ are
  refused (the user can name the same one; silently ignoring a field would be worse).
  Samplers whose ComfyUI schedule drops the penultimate sigma (dpm_2, dpm_2_ancestral,
  uni_pc, uni_pc_bh2) differ from the others by sampler name alone: there the base
  sampler's schedule is used for both, since every sampler is correct on any schedule.
- Each sampler keeps its own `history` across steps (multistep methods are multistep)
  and is stepped once per schedule step from the same current latent x at sigma_i.
  uni_pc and uni_pc_bh2 run as real UniPC (`unipc_multistep.py`); ddim runs as its
  deterministic Euler step without ComfyUI's inpaint noise; no sampler needs Impact
  Pack's recovery pass, which only repaired the restarts.
- One noise stream for both samplers (`SharedNoise`): each step's draw for an interval is
  made once and given to both, so blending the two results in the band keeps the noise
  at full variance (two independent draws blended with weights w, 1 - w would leave
  w^2 + (1 - w)^2 < 1 of it). If either sampler is an SDE sampler, both take the job's
  Brownian tree (an ancestral step's normalised increment over its interval is a fresh
  standard normal, so ancestral samplers are correct on it too); otherwise one Gaussian
  draw per interval from the job's generator. Starting noise is added once, as in comfy.
- After each step the two results are blended, x = w * x_mask + (1 - w) * x_base, with w
  (`blend_weight`) 1 on the mask, 0 outside the grown mask and ramping linearly across
  the band, so the seam is a smooth mix rather than an edge; overlap 0 or 1 gives w =
  the mask itself (soft masks stay soft).
- Both samplers start each step at the same x and sigma, so with one model their first
  evaluations run as one batch (`first_evaluations`): one forward per step saved.

Refused here (`coherent_refusal`, also checked when a job document is validated):
crop_margin (the mask sampler must see the same latent as the base one, and the blend
needs its result over the whole band), and what cannot give a correct result however the
loop runs it, measured with the Gaussian harness (tests/gaussian_regions.py): lcm, and the
multistep SDE samplers on the schedules that end at the model's sigma_min (see
`coherent_rules.py`). Everything else is checked by
tests/test_coherent_mode.py and tests/test_region_statistics.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .coherent_rules import coherent_refusal
from .comfy_call import AdvancedSampler, start_noise_scale
from .errors import InvalidInput, SamplingStopped
from .guidance import guided_denoise, guided_denoise_many
from .hooks import CALLS_PER_STEP, ProgressHook, StopHook
from .masks import grow_mask, to_latent
from .names import SAMPLER_NAMES, check_implemented
from .noise_sources import NoiseSource, Randomness
from .samplers import SAMPLERS, StepContext
from .sampling_job import SamplingJob
from .schedulers import schedule_for
from .unipc_multistep import unipc_bh2_step, unipc_step

# The step each sampler name takes in coherent mode (comfy mode's table is samplers.SAMPLERS).
COHERENT_STEPS: dict[str, Callable] = {
    **{name: info.step for name, info in SAMPLERS.items()},
    "uni_pc": unipc_step,
    "uni_pc_bh2": unipc_bh2_step,
}
check_implemented(COHERENT_STEPS, SAMPLER_NAMES, "coherent_loop.COHERENT_STEPS")


def check_coherent(base: AdvancedSampler, mask_sampler: AdvancedSampler, crop_margin: int | None) -> None:
    """Refuse what coherent mode cannot honour, naming the field."""
    refusal = coherent_refusal(base.sampler_name, base.scheduler, mask_sampler.sampler_name, mask_sampler.scheduler,
                               crop_margin)
    if refusal is not None:
        raise InvalidInput(*refusal)


def blend_weight(mask: torch.Tensor, latent_shape: torch.Size, overlap_factor: int) -> torch.Tensor:
    """The mask sampler's weight w [B, C, H, W]: 1 on the mask, ramping to 0 across the band.

    `mask` is [B, h, w] in [0, 1]. The band is what `grow_mask` adds: ceil((k - 1) / 2)
    latent pixels on the wider side for overlap_factor k. w is the mean of the mask
    dilated by 0, 1, .., r pixels (Chebyshev), which falls linearly from 1 at the mask
    to 1 / (r + 1) at the band's outer pixels, then cut to the grown mask (0 outside).
    """
    b, c, h, w = latent_shape
    resized = to_latent(mask, torch.Size((mask.shape[0], 1, h, w)))
    r = math.ceil((overlap_factor - 1) / 2) if overlap_factor > 1 else 0
    if r == 0:
        weight = resized
    else:
        layers = [resized] + [F.max_pool2d(resized, 2 * j + 1, stride=1, padding=j) for j in range(1, r + 1)]
        weight = torch.stack(layers).mean(0) * grow_mask(mask, h, w, overlap_factor)
    return weight.expand(b, c, h, w).contiguous()


class SharedNoise:
    """noise(sigma, sigma_next) for both samplers: one draw per interval per step, given to both.

    Intervals reaching sigma 0 get zeros: only dpm_2_ancestral asks there, and it scales
    the draw by sigma_up = 0 (the Brownian tree spans the positive sigmas only).
    """

    def __init__(self, randomness: Randomness, like: torch.Tensor, sigmas: torch.Tensor, brownian: bool):
        self.randomness = randomness
        self.shape, self.device = like.shape, like.device
        positive = sigmas[sigmas > 0]
        self.tree: NoiseSource | None = randomness.brownian(like, positive.min(), sigmas.max()) if brownian else None
        self.draws: dict[tuple[float, float], torch.Tensor] = {}

    def new_step(self) -> None:
        self.draws.clear()

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        key = (float(sigma), float(sigma_next))
        if key not in self.draws:
            if min(key) <= 0:
                self.draws[key] = torch.zeros(self.shape, device=self.device)
            elif self.tree is not None:
                self.draws[key] = self.tree(sigma, sigma_next)
            else:
                self.draws[key] = self.randomness.ancestral_noise(self.shape, self.device)
        return self.draws[key]


@dataclass
class Lane:
    """One sampler of the pair with its persistent step state.

    `primed` holds an evaluation made ahead (both samplers' first of a step in one forward,
    `first_evaluations`): the lane's model returns it for that x and sigma, once.
    """

    which: str  # "base" | "mask"
    step: Callable
    ctx: StepContext
    sampler: AdvancedSampler
    primed: tuple[torch.Tensor, float, torch.Tensor] | None = None

    @classmethod
    def of(cls, which: str, sampler: AdvancedSampler, noise: SharedNoise) -> "Lane":
        lane = cls(which, COHERENT_STEPS[sampler.sampler_name], StepContext(model=lambda x, sigma: x, noise=noise), sampler)
        lane.ctx.model = lane.model
        return lane

    def guide(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.sampler.positive, self.sampler.negative, self.sampler.cfg

    def model(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if self.primed is not None:
            primed_x, primed_sigma, denoised = self.primed
            self.primed = None
            if x is primed_x and float(sigma) == primed_sigma:
                return denoised
        return guided_denoise(self.sampler.denoiser, x, sigma, *self.guide())


def first_evaluations(lanes: tuple[Lane, Lane], x: torch.Tensor, sigma: torch.Tensor) -> None:
    """Both samplers' first model evaluation of a step, in one forward, primed into the lanes.

    Every sampler's step starts by evaluating the model at the step's x and sigma, and in
    coherent mode both samplers start from the same x at the same sigma: when they share a
    model the two guided evaluations (four row blocks with cfg) run as one batch.
    """
    base, mask = lanes
    denoised = guided_denoise_many(base.sampler.denoiser, x, sigma, [base.guide(), mask.guide()])
    for lane, value in zip(lanes, denoised):
        lane.primed = (x, float(sigma), value)


def start_noise(x: torch.Tensor, sigmas: torch.Tensor, sigma_max: float, randomness: Randomness) -> torch.Tensor:
    """Comfy's starting noise: at full denoise the VP-matching sqrt(1 + sigma^2), else sigma_0."""
    return x + randomness.start_noise(x.shape, x.device) * start_noise_scale(sigma_max, float(sigmas[0]))


def sample_coherent(job: SamplingJob, randomness: Randomness, on_progress: ProgressHook | None,
                    should_stop: StopHook | None) -> torch.Tensor:
    """Coherent-mode body of `two_sampler_loop.sample_job` (inputs already validated; mask [B, h, w]).

    Progress: two calls per step, base then mask, total 2 * steps, as in comfy mode.
    When both samplers use one model object, their first evaluation of each step runs as
    one batch (`first_evaluations`).
    """
    latent, base, mask_sampler = job.latent, job.base, job.mask_sampler
    adv_steps, start = job.params.plan()
    w = blend_weight(job.mask, latent.shape, job.params.overlap_factor).to(latent.device)
    full = schedule_for(base.denoiser.schedule, base.sampler_name, base.scheduler, adv_steps)
    sigmas = full[start:]
    scale = base.denoiser.latent_scale
    x = start_noise(latent.float() * scale, sigmas, float(base.denoiser.schedule.sigma_max), randomness)
    brownian = any(SAMPLERS[s.sampler_name].noise == "brownian" for s in (base, mask_sampler))
    noise = SharedNoise(randomness, x, full, brownian)
    lanes = (Lane.of("base", base, noise), Lane.of("mask", mask_sampler, noise))
    shared_forward = base.denoiser is mask_sampler.denoiser
    total_calls, done = CALLS_PER_STEP * (len(sigmas) - 1), 0
    for i in range(len(sigmas) - 1):
        noise.new_step()
        results = []
        for lane in lanes:
            if should_stop is not None and should_stop():
                raise SamplingStopped(f"stopped before step {start + i} ({lane.which} sampler)")
            if shared_forward and lane is lanes[0]:
                first_evaluations(lanes, x, sigmas[i])
            results.append(lane.step(lane.ctx, x, sigmas[i], sigmas[i + 1])[0])
            done += 1
            if on_progress is not None:
                on_progress(done, total_calls, lane.which)
        x_base, x_mask = results
        x = torch.lerp(x_base, x_mask, w)
    return (x / scale).to(latent.dtype)
