"""One step of each sampler, written after its paper, in ComfyUI's (k-diffusion's) form.

A step moves `x` from `sigma` to `sigma_next` (variance-exploding space: x = x0 + sigma * eps).
Each step function has the signature `step(ctx, x, sigma, sigma_next) -> (x_next, denoised)`
where `denoised` is the model's x0 estimate at the step's first evaluation (what ComfyUI
reports to its preview callback, and what a call returns when it ends clean), and `ctx`
gives the model, the sampler's noise source and the sampler's `history` (state carried
from the previous step; empty for a freshly started sampler, which makes every multistep
method first order, as in the original node's one-step calls).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy
import torch

from .errors import InvalidInput
from .names import SAMPLER_NAMES, check_implemented

Tensor = torch.Tensor


@dataclass
class StepContext:
    """What a step needs besides x and its two sigmas."""

    model: Callable[[Tensor, Tensor], Tensor]  # denoised = model(x, sigma)
    noise: Callable[[Tensor, Tensor], Tensor] | None = None  # noise(sigma, sigma_next), shaped like x
    history: dict = field(default_factory=dict)


def to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """The probability-flow ODE derivative dx/dsigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: Tensor, sigma_to: Tensor, eta: float = 1.0) -> tuple[Tensor, Tensor]:
    """Split a step into a deterministic part down to sigma_down and fresh noise of size sigma_up."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _t(sigma: Tensor) -> Tensor:
    """Half-log-SNR time of DPM-Solver: t = -log(sigma)."""
    return sigma.log().neg()


def _sigma(t: Tensor) -> Tensor:
    return t.neg().exp()


def euler(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Algorithm 2 without churn)."""
    denoised = ctx.model(x, sigma)
    return x + to_d(x, sigma, denoised) * (sigma_next - sigma), denoised


def euler_ancestral(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """Euler down to sigma_down, then fresh Gaussian noise up to sigma_next (eta 1)."""
    denoised = ctx.model(x, sigma)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
    x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
    if sigma_next > 0:
        x = x + ctx.noise(sigma, sigma_next) * sigma_up
    return x, denoised


def heun(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """Heun's second-order method (Karras et al. 2022, Algorithm 1); Euler on the last step to 0."""
    denoised = ctx.model(x, sigma)
    d = to_d(x, sigma, denoised)
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt, denoised
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, ctx.model(x_2, sigma_next))
    return x + (d + d_2) / 2 * dt, denoised


def dpm_2(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """Second-order midpoint method in log sigma (Karras et al. 2022, "DPM-Solver-2" variant)."""
    denoised = ctx.model(x, sigma)
    d = to_d(x, sigma, denoised)
    if sigma_next == 0:
        return x + d * (sigma_next - sigma), denoised
    sigma_mid = sigma.log().lerp(sigma_next.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, ctx.model(x_2, sigma_mid))
    return x + d_2 * (sigma_next - sigma), denoised


def dpm_2_ancestral(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """dpm_2 down to sigma_down, then fresh noise of size sigma_up."""
    denoised = ctx.model(x, sigma)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
    d = to_d(x, sigma, denoised)
    if sigma_down == 0:
        return x + d * (sigma_down - sigma), denoised
    sigma_mid = sigma.log().lerp(sigma_down.log(), 0.5).exp()
    x_2 = x + d * (sigma_mid - sigma)
    d_2 = to_d(x_2, sigma_mid, ctx.model(x_2, sigma_mid))
    x = x + d_2 * (sigma_down - sigma)
    return x + ctx.noise(sigma, sigma_next) * sigma_up, denoised


def _lms_coefficient(order: int, sigmas: list[float], j: int) -> float:
    """Integral over [sigmas[-2], sigmas[-1]] of the Lagrange basis polynomial j of the last `order` sigmas."""
    nodes = sigmas[-1 - order : -1][::-1]  # newest first, matching the reversed derivative list
    poly = numpy.polynomial.Polynomial([1.0])
    for k, node in enumerate(nodes):
        if k != j:
            poly = poly * numpy.polynomial.Polynomial([-node, 1.0]) / (nodes[j] - node)
    antiderivative = poly.integ()
    return float(antiderivative(sigmas[-1]) - antiderivative(sigmas[-2]))


def lms(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor, max_order: int = 4):
    """Linear multistep (Adams-Bashforth in sigma) over up to four earlier derivatives."""
    denoised = ctx.model(x, sigma)
    ds = ctx.history.setdefault("ds", [])
    sigmas = ctx.history.setdefault("sigmas", [])
    ds.append(to_d(x, sigma, denoised))
    if not sigmas:
        sigmas.append(float(sigma))
    sigmas.append(float(sigma_next))
    del ds[:-max_order]
    order = len(ds)
    coeffs = [_lms_coefficient(order, sigmas, j) for j in range(order)]
    for coeff, d in zip(coeffs, reversed(ds)):
        x = x + coeff * d
    return x, denoised


def dpmpp_2s_ancestral(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """DPM-Solver++(2S) (Lu et al. 2022) down to sigma_down, then fresh noise of size sigma_up."""
    denoised = ctx.model(x, sigma)
    sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
    if sigma_down == 0:
        x = x + to_d(x, sigma, denoised) * (sigma_down - sigma)
    else:
        t, t_next = _t(sigma), _t(sigma_down)
        h = t_next - t
        s = t + h / 2
        x_2 = (_sigma(s) / _sigma(t)) * x - (-h / 2).expm1() * denoised
        denoised_2 = ctx.model(x_2, _sigma(s))
        x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_2
    if sigma_next > 0:
        x = x + ctx.noise(sigma, sigma_next) * sigma_up
    return x, denoised


def dpmpp_sde(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor, r: float = 0.5):
    """DPM-Solver++ SDE, second order with a midpoint at ratio r (Lu et al. 2022), eta 1."""
    denoised = ctx.model(x, sigma)
    if sigma_next == 0:
        return x + to_d(x, sigma, denoised) * (sigma_next - sigma), denoised
    t, t_next = _t(sigma), _t(sigma_next)
    h = t_next - t
    s = t + h * r
    fac = 1 / (2 * r)
    sd, su = ancestral_step(_sigma(t), _sigma(s))
    s_ = _t(sd)
    x_2 = (_sigma(s_) / _sigma(t)) * x - (t - s_).expm1() * denoised
    x_2 = x_2 + ctx.noise(_sigma(t), _sigma(s)) * su
    denoised_2 = ctx.model(x_2, _sigma(s))
    sd, su = ancestral_step(_sigma(t), _sigma(t_next))
    t_next_ = _t(sd)
    denoised_d = (1 - fac) * denoised + fac * denoised_2
    x = (_sigma(t_next_) / _sigma(t)) * x - (t - t_next_).expm1() * denoised_d
    return x + ctx.noise(_sigma(t), _sigma(t_next)) * su, denoised


def dpmpp_2m(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """DPM-Solver++(2M) (Lu et al. 2022): second order from the previous step's denoised."""
    denoised = ctx.model(x, sigma)
    t, t_next = _t(sigma), _t(sigma_next)
    h = t_next - t
    old_denoised = ctx.history.get("old_denoised")
    if old_denoised is None or sigma_next == 0:
        denoised_d = denoised
    else:
        r = (t - _t(ctx.history["sigma_prev"])) / h
        denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    x = (_sigma(t_next) / _sigma(t)) * x - (-h).expm1() * denoised_d
    ctx.history.update(old_denoised=denoised, sigma_prev=sigma)
    return x, denoised


def dpmpp_2m_sde(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float = 1.0):
    """DPM-Solver++(2M) SDE with the midpoint correction (Lu et al. 2022), eta 1."""
    denoised = ctx.model(x, sigma)
    h = None
    if sigma_next == 0:
        x = denoised
    else:
        h = _t(sigma_next) - _t(sigma)
        eta_h = eta * h
        x = sigma_next / sigma * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
        old_denoised = ctx.history.get("old_denoised")
        if old_denoised is not None:
            r = ctx.history["h_last"] / h
            x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
        x = x + ctx.noise(sigma, sigma_next) * sigma_next * (-2 * eta_h).expm1().neg().sqrt()
    ctx.history.update(old_denoised=denoised, h_last=h)
    return x, denoised


def dpmpp_3m_sde(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor, eta: float = 1.0):
    """DPM-Solver++(3M) SDE (Lu et al. 2022), eta 1."""
    denoised = ctx.model(x, sigma)
    hist = ctx.history
    h = None
    if sigma_next == 0:
        x = denoised
    else:
        h = _t(sigma_next) - _t(sigma)
        h_eta = h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        if hist.get("h_2") is not None:
            r0 = hist["h_1"] / h
            r1 = hist["h_2"] / h
            d1_0 = (denoised - hist["denoised_1"]) / r0
            d1_1 = (hist["denoised_1"] - hist["denoised_2"]) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            phi_3 = phi_2 / h_eta - 0.5
            x = x + phi_2 * d1 - phi_3 * d2
        elif hist.get("h_1") is not None:
            r = hist["h_1"] / h
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            x = x + phi_2 * (denoised - hist["denoised_1"]) / r
        x = x + ctx.noise(sigma, sigma_next) * sigma_next * (-2 * h * eta).expm1().neg().sqrt()
    hist.update(denoised_2=hist.get("denoised_1"), denoised_1=denoised, h_2=hist.get("h_1"), h_1=h)
    return x, denoised


def lcm(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """Latent Consistency Model sampling (Luo et al. 2023): jump to x0, re-noise to sigma_next."""
    denoised = ctx.model(x, sigma)
    x = denoised
    if sigma_next > 0:
        x = x + ctx.noise(sigma, sigma_next) * sigma_next
    return x, denoised


def dpm_fast_single(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """ComfyUI's dpm_fast given two sigmas: one DPM-Solver-1 step (Lu et al. 2022, eq. 3.7).

    ComfyUI's wrapper replaces a final sigma of 0 by the previous sigma, so a call ending
    at 0 is a zero-length step: x is returned unchanged (the model is still evaluated,
    and its denoised is what the call reports).
    """
    sigma_min = sigma if sigma_next == 0 else sigma_next
    t, t_next = _t(sigma), _t(sigma_min)
    sigma_t = _sigma(t)
    eps = (x - ctx.model(x, sigma_t)) / sigma_t
    denoised = x - sigma_t * eps
    return x - _sigma(t_next) * (t_next - t).expm1() * eps, denoised


def uni_pc_single(ctx: StepContext, x: Tensor, sigma: Tensor, sigma_next: Tensor):
    """ComfyUI's uni_pc given two sigmas: its order comes out as 0, so it evaluates the model
    once and only rescales x between the variance-preserving scales of the two sigmas."""
    denoised = ctx.model(x, sigma)
    sigma_end = sigma_next if sigma_next > 0 else torch.full_like(sigma_next, 0.001)
    return x / torch.sqrt(1.0 + sigma**2) * torch.sqrt(1.0 + sigma_end**2), denoised


@dataclass(frozen=True)
class SamplerInfo:
    """How the loop runs a ComfyUI sampler name."""

    step: Callable
    noise: str | None = None  # None, "ancestral" (Gaussian draws) or "brownian" (Brownian tree)
    inpaint_random_noise: bool = False  # ddim: outside-mask model input noise from seed + 1
    recovery_sampler: str | None = None  # Impact Pack's second pass over the same step


SAMPLERS: dict[str, SamplerInfo] = {
    "euler": SamplerInfo(euler),
    "euler_ancestral": SamplerInfo(euler_ancestral, noise="ancestral"),
    "heun": SamplerInfo(heun),
    "dpm_2": SamplerInfo(dpm_2),
    "dpm_2_ancestral": SamplerInfo(dpm_2_ancestral, noise="ancestral"),
    "lms": SamplerInfo(lms),
    "dpmpp_2s_ancestral": SamplerInfo(dpmpp_2s_ancestral, noise="ancestral"),
    "dpmpp_sde": SamplerInfo(dpmpp_sde, noise="brownian", recovery_sampler="dpm_fast"),
    "dpmpp_2m": SamplerInfo(dpmpp_2m),
    "dpmpp_2m_sde": SamplerInfo(dpmpp_2m_sde, noise="brownian", recovery_sampler="dpmpp_2m"),
    "dpmpp_3m_sde": SamplerInfo(dpmpp_3m_sde, noise="brownian", recovery_sampler="dpmpp_2m"),
    "ddim": SamplerInfo(euler, inpaint_random_noise=True),
    "uni_pc": SamplerInfo(uni_pc_single, recovery_sampler="dpm_fast"),
    "uni_pc_bh2": SamplerInfo(uni_pc_single, recovery_sampler="dpm_fast"),
    "lcm": SamplerInfo(lcm, noise="ancestral"),
}

check_implemented(SAMPLERS, SAMPLER_NAMES, "samplers.SAMPLERS")

# Only reachable as a recovery pass; not a name a job may ask for.
RECOVERY_SAMPLERS: dict[str, SamplerInfo] = {"dpm_fast": SamplerInfo(dpm_fast_single), "dpmpp_2m": SAMPLERS["dpmpp_2m"]}


def check_sampler_name(name: str, field: str = "sampler_name") -> None:
    if name not in SAMPLERS:
        raise InvalidInput(field, f"unknown sampler {name!r}; valid: {', '.join(SAMPLERS)}")
