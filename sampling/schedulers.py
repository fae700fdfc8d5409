"""Sigma schedules by ComfyUI scheduler name.

Every function returns a float32 tensor of sigmas ending at 0, computed exactly as ComfyUI
does so that the same scheduler name gives the same sigmas: usually `steps + 1` of them,
but `beta` drops repeated timesteps (fewer at high step counts) and `ddim_uniform` walks
indices 1, 1 + 1000 // steps, ... up to 999 (one more for steps such as 6 or 7). The loop
handles either: a step past the schedule's end leaves the latent as it is, as in ComfyUI. `schedule_for` adds the sampler-specific rule: dpm_2,
dpm_2_ancestral and uni_pc take a schedule for one more step with the second-to-last
sigma dropped.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy
import torch

from .errors import InvalidInput
from .names import SCHEDULER_NAMES, check_implemented
from .noise_schedule import NoiseSchedule


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def normal(schedule: NoiseSchedule, steps: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced from the last to the first training step (log-sigma interpolated)."""
    start = schedule.timestep(schedule.sigma_max)
    end = schedule.timestep(schedule.sigma_min)
    append_zero = True
    if sgm:
        timesteps = torch.linspace(start, end, steps + 1)[:-1]
    else:
        if math.isclose(float(schedule.sigma(end)), 0, abs_tol=0.00001):
            steps += 1
            append_zero = False
        timesteps = torch.linspace(start, end, steps)
    sigmas = [float(schedule.sigma(t)) for t in timesteps]
    if append_zero:
        sigmas.append(0.0)
    return torch.tensor(sigmas, dtype=torch.float32)


def sgm_uniform(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """`normal` for steps + 1 timesteps with the last one left out (SGM's uniform spacing)."""
    return normal(schedule, steps, sgm=True)


def karras(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022), eq. 5: uniform in sigma^(1/rho) between sigma_max and sigma_min."""
    ramp = torch.linspace(0, 1, steps)
    min_inv_rho = float(schedule.sigma_min) ** (1 / rho)
    max_inv_rho = float(schedule.sigma_max) ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Uniform in log sigma between sigma_max and sigma_min."""
    log_sigmas = torch.linspace(math.log(float(schedule.sigma_max)), math.log(float(schedule.sigma_min)), steps)
    return _append_zero(log_sigmas.exp())


def simple(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """Training sigmas at whole indices stepping down evenly from the last one."""
    stride = len(schedule.sigmas) / steps
    sigmas = [float(schedule.sigmas[-(1 + int(x * stride))]) for x in range(steps)]
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


def ddim_uniform(schedule: NoiseSchedule, steps: int) -> torch.Tensor:
    """DDIM's uniform timesteps 1, 1 + stride, ... reversed; does not start at sigma_max."""
    x = 1
    if math.isclose(float(schedule.sigmas[x]), 0, abs_tol=0.00001):
        steps += 1
        sigmas: list[float] = []
    else:
        sigmas = [0.0]
    stride = max(len(schedule.sigmas) // steps, 1)
    while x < len(schedule.sigmas):
        sigmas.append(float(schedule.sigmas[x]))
        x += stride
    return torch.tensor(sigmas[::-1], dtype=torch.float32)


def beta(schedule: NoiseSchedule, steps: int, alpha: float = 0.6, beta_: float = 0.6) -> torch.Tensor:
    """Timesteps at the quantiles of a Beta(0.6, 0.6) distribution (Lee et al. 2024), repeats dropped."""
    from scipy import stats

    total = len(schedule.sigmas) - 1
    ts = 1 - numpy.linspace(0, 1, steps, endpoint=False)
    ts = numpy.rint(stats.beta.ppf(ts, alpha, beta_) * total)
    sigmas = []
    last_t = -1
    for t in ts:
        if t != last_t:
            sigmas.append(float(schedule.sigmas[int(t)]))
        last_t = t
    return torch.tensor(sigmas + [0.0], dtype=torch.float32)


SCHEDULERS: dict[str, Callable[[NoiseSchedule, int], torch.Tensor]] = {
    "normal": normal,
    "karras": karras,
    "exponential": exponential,
    "sgm_uniform": sgm_uniform,
    "simple": simple,
    "ddim_uniform": ddim_uniform,
    "beta": beta,
}

check_implemented(SCHEDULERS, SCHEDULER_NAMES, "schedulers.SCHEDULERS")

# Samplers that ComfyUI (and Impact Pack) give a schedule one step longer with the
# second-to-last sigma removed.
DISCARD_PENULTIMATE_SIGMA_SAMPLERS = frozenset({"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"})


def check_scheduler_name(name: str, field: str = "scheduler") -> None:
    if name not in SCHEDULERS:
        raise InvalidInput(field, f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULERS)}")


def scheduler_sigmas(schedule: NoiseSchedule, scheduler: str, steps: int) -> torch.Tensor:
    """The named scheduler's sigmas for `steps` steps."""
    check_scheduler_name(scheduler)
    return SCHEDULERS[scheduler](schedule, steps)


def schedule_for(schedule: NoiseSchedule, sampler_name: str, scheduler: str, steps: int) -> torch.Tensor:
    """The full sigma schedule a sampler works on, with ComfyUI's penultimate-sigma rule."""
    if sampler_name in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        sigmas = scheduler_sigmas(schedule, scheduler, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return scheduler_sigmas(schedule, scheduler, steps)
