"""Region statistics of a dual-sampler job on Gaussian data, with the answer a correct sampler gives.

The harness of issue 8. `GaussianDenoiser` (analytic_denoiser.py) is the exact posterior
mean for data N(mu, s^2) per pixel; the base sampler's conditioning picks mu_A, the mask
sampler's mu_B. Negative conditionings equal the positives and cfg is 1.0: either alone
keeps guidance from moving the means, since the guided x0 is uncond + cfg * (cond - uncond),
which is cond for any cfg when uncond == cond (and cfg 1.0 skips the uncond pass anyway).

The latent is [seeds, C, H, W] with the mask on the right half (columns >= W/2). The
engine draws every kind of noise (start, ancestral, ddim's inpaint noise, the Brownian
tree) for the whole tensor from one seeded source, element by element independent, so
the batch rows are independent seeds and the pixels are independent samples: the
denoiser has no spatial coupling. Region A is the columns left of the grown mask's
band (less a margin), region B the mask's columns right of the seam (less the margin).
Per region: the mean over all its values, and the per-pixel std across seeds, pooled
(sqrt of the mean unbiased per-pixel variance). The seam profile is the mean per column
over seeds, channels and rows.

Expected values (derivation). In the engine's variance-exploding form x_sigma = x0 + sigma * eps.
A job starts at sigma_0 (the first sigma of its step range) from x_t = x_in + c * z with
c = sqrt(1 + sigma_0^2) when sigma_0 is the schedule's sigma_max (ComfyUI's max_denoise
rule) and c = sigma_0 otherwise. Take x_in ~ N(m, v) per pixel (denoise 1.0: the empty
latent, m = v = 0; denoise 0.5 here: x_in ~ N(mu_A, s^2) everywhere), so
x_t ~ N(m, v + c^2). For data N(mu, s^2) the marginal at sigma is N(mu, s^2 + sigma^2)
and the denoiser is D(x, sigma) = mu + (x - mu) s^2 / (s^2 + sigma^2).

- Probability-flow ODE, dx/dsigma = (x - D) / sigma = (x - mu) sigma / (s^2 + sigma^2):
  x - mu scales with sqrt(s^2 + sigma^2), so x0 = mu + (x_t - mu) * k_ode with
  k_ode = s / sqrt(s^2 + sigma_0^2). Output mean mu + (m - mu) k_ode, std k_ode sqrt(v + c^2).
- Reverse SDE (what the ancestral and SDE samplers discretise, eta 1): its exact solution
  from any x_t samples the model's posterior x0 | x_t ~ N(mu + (x_t - mu) k_sde, s^2 sigma_0^2 / (s^2 + sigma_0^2))
  with k_sde = s^2 / (s^2 + sigma_0^2). Output mean mu + (m - mu) k_sde, variance
  k_sde^2 (v + c^2) + s^2 sigma_0^2 / (s^2 + sigma_0^2).

When x_t has the right marginal (m = mu, v + c^2 = s^2 + sigma_0^2) both give N(mu, s^2):
region A at denoise 0.5, and (up to c^2 = 1 + sigma_max^2 instead of s^2 + sigma_max^2,
and mean 0 instead of mu: an offset of mu * k, 0.034 * mu for the ODE at sigma_max 14.6,
0.001 * mu for the SDE) both regions at denoise 1.0. Region B at denoise 0.5 starts from
the other region's data (m = mu_A): both still give std s (v + c^2 = s^2 + sigma_0^2), but
the mean keeps a share of mu_A, k_ode = s / sqrt(s^2 + sigma_0^2) for the ODE and the
smaller k_sde = k_ode^2 for the SDE: mu_B + (mu_A - mu_B) k, not mu_B. Which applies is
the sampler's kind (`SDE_KIND`: samplers that inject fresh noise every step).

Tolerances (`tolerances`). Statistical: a region holds P = C * H * columns pixels per seed;
with N seeds the region mean has standard error std / sqrt(N P) and the pooled per-pixel
std has standard error s / sqrt(2 (N - 1) P); a seam-profile column mean has
s / sqrt(N C H). We allow Z = 5 standard errors (a false failure once in ~1.7 million
checks; the bench makes ~2000). Discretisation: the first-order method of the sampler's
kind, on the job's own schedule and step range, computed in closed form (`first_order`):
Euler for the ODE samplers (it multiplies x - mu by
prod (1 + sigma_i (sigma_{i+1} - sigma_i) / (s^2 + sigma_i^2)) instead of k_ode), ancestral
Euler (eta 1) for the SDE kind; the larger of its mean and std errors over the two regions
is added. For the ancestral-split samplers (`ANCESTRAL_SPLIT`) the split is the method:
its error is taken as the larger of its two ends, Euler inside and the exact ODE inside
(`first_order(inner=...)`); a second-order inner step lands between them. A sampler whose
own discretisation error at this step count is larger than its kind's first-order
method's fails (a higher-order method should do better, and at 20 steps most do). `reference_call` runs the sampler alone so that a failure can be told apart
from the loop's: `own_failures` compares a loop with it (statistical tolerance only),
`reference_failures` compares it with the exact answer.

Checked by convergence (region B at denoise 0.5, normal scheduler, sampler alone): at 400
steps euler and heun reach the ODE value (mean 0.405/0.403 against 0.408, std 0.498/0.500),
euler_ancestral, dpmpp_2m_sde and dpmpp_sde the SDE value (0.819/0.824/0.823 against 0.825;
std 0.495/0.502/0.501). lcm does not converge to either (mean 1.0, std 0.35): every step
jumps to the posterior mean and re-noises, which forgets the input and loses the posterior
spread; it samples consistency models, not this denoiser, so it fails even alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analytic_denoiser import GaussianDenoiser, conditioning
from maskfleet.sampling import AdvancedSampler, sample_two_samplers
from maskfleet.sampling.masks import grow_mask
from maskfleet.sampling.noise_sources import JobRandomness
from maskfleet.sampling.samplers import SAMPLERS, StepContext
from maskfleet.sampling.schedulers import schedule_for
from maskfleet.sampling import plan_steps

try:  # real UniPC (multistep), for the sampler-alone reference
    from maskfleet.sampling.unipc_multistep import unipc_bh2_step, unipc_step

    _UNIPC = {"uni_pc": unipc_step, "uni_pc_bh2": unipc_bh2_step}
except ImportError:
    _UNIPC = {}

# Samplers that add fresh noise every step: their exact limit is the reverse SDE.
SDE_KIND = frozenset(
    {"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde", "lcm"}
)
# Samplers that split each step into an ODE step down to sigma_down and fresh noise up to sigma_next:
# their discretisation error is the split's, between its Euler and exact-ODE ends (`first_order`).
ANCESTRAL_SPLIT = frozenset({"euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral"})
Z = 5.0  # standard errors allowed


@dataclass(frozen=True)
class Setup:
    """One measurement's shape: the two means, the data std, the latent and the seeds."""

    mu_a: float = -1.0
    mu_b: float = 1.0
    s: float = 0.5
    seeds: int = 32
    channels: int = 4
    height: int = 8
    width: int = 64
    margin: int = 2  # columns left out next to the band on each side
    seed: int = 0

    def mask(self) -> torch.Tensor:
        mask = torch.zeros(1, self.height, self.width)
        mask[..., self.width // 2 :] = 1.0
        return mask

    def band(self, overlap: int) -> tuple[int, int]:
        """First and one-past-last column of the grown mask's band (the columns both samplers run)."""
        grown = grow_mask(self.mask(), self.height, self.width, overlap)[0, 0, 0]
        return int(grown.nonzero()[0]), self.width // 2

    def columns(self, overlap: int) -> tuple[slice, slice]:
        lo, hi = self.band(overlap)
        return slice(0, lo - self.margin), slice(hi + self.margin, self.width)

    def input_latent(self, denoise: float) -> torch.Tensor:
        """Empty latent at denoise 1.0, else data of region A's distribution everywhere (per seed)."""
        shape = (self.seeds, self.channels, self.height, self.width)
        if denoise >= 1.0:
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(1234 + self.seed)
        return self.mu_a + self.s * torch.randn(shape, generator=g)

    def input_moments(self, denoise: float) -> tuple[float, float]:
        return (0.0, 0.0) if denoise >= 1.0 else (self.mu_a, self.s**2)


@dataclass(frozen=True)
class RegionStats:
    mean_a: float
    std_a: float
    mean_b: float
    std_b: float
    profile: tuple[float, ...]  # mean per column

    def seam_jump(self, setup: Setup) -> float:
        """Largest step between adjacent columns, relative to |mu_B - mu_A| (1.0: a hard edge)."""
        p = torch.tensor(self.profile)
        return float((p[1:] - p[:-1]).abs().max()) / abs(setup.mu_b - setup.mu_a)


@dataclass(frozen=True)
class Expected:
    mean_a: float
    std_a: float
    mean_b: float
    std_b: float
    kind: str  # "ode" | "sde"


@dataclass(frozen=True)
class Tolerance:
    mean: float  # statistical + Euler's discretisation error
    std: float
    column: float  # a seam-profile column mean's allowance (overshoot, reversals)
    mean_stat: float  # statistical only: a loop against the sampler alone (both estimates)
    std_stat: float


def _pooled(x: torch.Tensor) -> tuple[float, float]:
    """Mean over everything, and the per-pixel std across seeds pooled over pixels."""
    return float(x.mean()), float(x.var(dim=0, unbiased=True).mean().sqrt())


def measure(out: torch.Tensor, setup: Setup, overlap: int) -> RegionStats:
    cols_a, cols_b = setup.columns(overlap)
    mean_a, std_a = _pooled(out[..., cols_a])
    mean_b, std_b = _pooled(out[..., cols_b])
    profile = out.mean(dim=(0, 1, 2))
    return RegionStats(mean_a, std_a, mean_b, std_b, tuple(float(v) for v in profile))


def samplers_for(setup: Setup, sampler_name: str, scheduler: str, den=None) -> tuple[AdvancedSampler, AdvancedSampler]:
    den = den or GaussianDenoiser(setup.s)
    a, b = conditioning(setup.mu_a), conditioning(setup.mu_b)
    return (AdvancedSampler(den, 1.0, sampler_name, scheduler, a, a), AdvancedSampler(den, 1.0, sampler_name, scheduler, b, b))


def run_job(
    mode: str, sampler_name: str, scheduler: str, denoise: float, overlap: int, steps: int, setup: Setup = Setup(),
    den=None,
) -> RegionStats:
    """One dual-sampler job over all seeds at once, measured; `den` replaces the GaussianDenoiser
    (a UNetDenoiser around analytic_denoiser.GaussianUNet, say)."""
    base, mask_sampler = samplers_for(setup, sampler_name, scheduler, den)
    out = sample_two_samplers(
        setup.input_latent(denoise), setup.mask(), base, mask_sampler,
        seed=setup.seed, steps=steps, denoise=denoise, overlap_factor=overlap, mode=mode,
    )
    return measure(out, setup, overlap)


@dataclass(frozen=True)
class Reference:
    """The sampler alone with each region's conditioning: (mean, pooled std) for A and for B."""

    mean_a: float
    std_a: float
    mean_b: float
    std_b: float


def reference_call(sampler_name: str, scheduler: str, denoise: float, steps: int, setup: Setup = Setup()) -> Reference:
    """The sampler alone, as k-diffusion runs it: its step function over the job's whole step
    range with history kept, on half the latent's width, the engine's noise draws; rows 0..N-1 with
    conditioning mu_A, rows N..2N-1 with mu_B (the denoiser reads mu per row).

    Not `comfy_call.OneCall`: for the SDE and uni_pc samplers that adds Impact Pack's recovery pass
    (re-noise the result and run the step range again with an ODE sampler), which is not the
    sampler's own behaviour. For uni_pc and uni_pc_bh2 the table's step is ComfyUI's
    degenerate one-step form (a rescale, what the original's two-sigma calls run); the sampler
    alone is real UniPC, taken from `sampling/unipc_multistep.py` where that module exists.
    """
    den = GaussianDenoiser(setup.s)
    n = setup.seeds
    context = torch.cat([conditioning(setup.mu_a, n), conditioning(setup.mu_b, n)])
    half = setup.input_latent(denoise)[..., : setup.width // 2]  # as many pixels as a region, or more
    x_in = torch.cat([half, half])
    sigmas, _, c = _start(sampler_name, scheduler, denoise, steps)
    total = schedule_for(den.schedule, sampler_name, scheduler, plan_steps(steps, denoise)[0])
    info = SAMPLERS[sampler_name]
    step = _UNIPC.get(sampler_name, info.step)
    randomness = JobRandomness(setup.seed)
    x = x_in + randomness.start_noise(x_in.shape) * c
    if info.noise == "ancestral":
        noise = lambda sigma, sigma_next: randomness.ancestral_noise(x.shape)  # noqa: E731
    elif info.noise == "brownian":
        noise = randomness.brownian(x, total[total > 0].min(), total.max())
    else:
        noise = None
    ctx = StepContext(model=lambda x_t, sigma: den.denoise(x_t, sigma, context), noise=noise)
    for i in range(len(sigmas) - 1):
        x, _ = step(ctx, x, sigmas[i], sigmas[i + 1])
    return Reference(*_pooled(x[:n]), *_pooled(x[n:]))


def _start(sampler_name: str, scheduler: str, denoise: float, steps: int) -> tuple[torch.Tensor, float, float]:
    """The step range's sigmas, sigma_0 and the starting noise's scale c."""
    den = GaussianDenoiser()
    adv_steps, start = plan_steps(steps, denoise)
    sigmas = schedule_for(den.schedule, sampler_name, scheduler, adv_steps)[start:]
    sigma_0 = float(sigmas[0])
    sigma_max = float(den.schedule.sigma_max)
    max_denoise = math.isclose(sigma_max, sigma_0, rel_tol=1e-05) or sigma_0 > sigma_max
    return sigmas, sigma_0, math.sqrt(1.0 + sigma_0**2) if max_denoise else sigma_0


def _exact(mu: float, m: float, v: float, s: float, sigma_0: float, c: float, kind: str) -> tuple[float, float]:
    s2, sig2 = s * s, sigma_0 * sigma_0
    if kind == "ode":
        k = s / math.sqrt(s2 + sig2)
        return mu + (m - mu) * k, k * math.sqrt(v + c * c)
    k = s2 / (s2 + sig2)
    return mu + (m - mu) * k, math.sqrt(k * k * (v + c * c) + s2 * sig2 / (s2 + sig2))


def expected(sampler_name: str, scheduler: str, denoise: float, steps: int, setup: Setup = Setup()) -> Expected:
    """What the exact process gives in each region from the job's actual start (see the module docstring)."""
    _, sigma_0, c = _start(sampler_name, scheduler, denoise, steps)
    m, v = setup.input_moments(denoise)
    kind = "sde" if sampler_name in SDE_KIND else "ode"
    mean_a, std_a = _exact(setup.mu_a, m, v, setup.s, sigma_0, c, kind)
    mean_b, std_b = _exact(setup.mu_b, m, v, setup.s, sigma_0, c, kind)
    return Expected(mean_a, std_a, mean_b, std_b, kind)


def first_order(kind: str, sigmas: torch.Tensor, mu: float, m: float, v: float, c: float, s: float,
                inner: str = "euler") -> tuple[float, float]:
    """(mean, std) that the first-order method of the sampler's kind gives on this linear problem.

    Both move x - mu by a = 1 + sigma (sigma_down - sigma) / (s^2 + sigma^2) per step (Euler to
    sigma_down); Euler has sigma_down = sigma_next, ancestral Euler goes down to
    sigma_down = sqrt(sigma_next^2 - sigma_up^2) and adds fresh noise of variance sigma_up^2,
    sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 (eta 1). So the mean gain is
    prod a and the variance runs V <- a^2 V + sigma_up^2 from V = v + c^2.

    inner="exact": the ancestral split with the ODE part solved exactly instead of by Euler,
    a = sqrt((s^2 + sigma_down^2) / (s^2 + sigma^2)): the limit the split converges to as its
    inner ODE solver improves, what the second-order ancestral samplers (dpm_2_ancestral,
    dpmpp_2s_ancestral) approach. The split itself is first order in the SDE, and its two
    ends err differently: Euler's inner step happens to give the exact SDE mean gain
    (s^2 + sigma_next^2) / (s^2 + sigma^2) per step but loses spread; the exact inner step
    keeps the spread but keeps too much of the start's offset from mu (up to 0.08 at
    denoise 0.5 on 20 steps).
    """
    gain, var = 1.0, v + c * c
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        up2 = 0.0 if kind == "ode" or sigma_next == 0 else min(sigma_next**2, sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
        down = math.sqrt(sigma_next**2 - up2)
        if inner == "exact":
            a = math.sqrt((s * s + down * down) / (s * s + sigma * sigma))
        else:
            a = 1.0 + sigma * (down - sigma) / (s * s + sigma * sigma)
        gain, var = gain * a, a * a * var + up2
    return mu + (m - mu) * gain, math.sqrt(var)


def tolerances(sampler_name: str, scheduler: str, denoise: float, steps: int, overlap: int, setup: Setup = Setup()) -> Tolerance:
    """Z standard errors plus the first-order method's discretisation error on this schedule and step range."""
    sigmas, sigma_0, c = _start(sampler_name, scheduler, denoise, steps)
    m, v = setup.input_moments(denoise)
    s = setup.s
    kind = "sde" if sampler_name in SDE_KIND else "ode"
    mean_error = std_error = 0.0
    inners = ("euler", "exact") if sampler_name in ANCESTRAL_SPLIT else ("euler",)
    for mu in (setup.mu_a, setup.mu_b):
        want = _exact(mu, m, v, s, sigma_0, c, kind)
        for inner in inners:
            got = first_order(kind, sigmas, mu, m, v, c, s, inner)
            mean_error, std_error = max(mean_error, abs(got[0] - want[0])), max(std_error, abs(got[1] - want[1]))
    n = setup.seeds
    cols_a, cols_b = setup.columns(overlap)
    pixels = setup.channels * setup.height * min(len(range(setup.width)[cols_a]), len(range(setup.width)[cols_b]))
    se_mean = s / math.sqrt(n * pixels)
    se_std = s / math.sqrt(2 * (n - 1) * pixels)
    se_column = s / math.sqrt(n * setup.channels * setup.height)
    return Tolerance(
        mean=Z * se_mean + mean_error,
        std=Z * se_std + std_error,
        column=Z * se_column + mean_error,
        mean_stat=Z * math.sqrt(2) * se_mean,
        std_stat=Z * math.sqrt(2) * se_std,
    )


def _region_failures(got, want, mean_tol: float, std_tol: float) -> list[str]:
    found = []
    for name, tol in (("mean_a", mean_tol), ("std_a", std_tol), ("mean_b", mean_tol), ("std_b", std_tol)):
        g, w = getattr(got, name), getattr(want, name)
        if abs(g - w) > tol:
            label = name.replace("_a", " A").replace("_b", " B")
            found.append(f"{label} {g:.3f} (want {w:.3f} +- {tol:.3f})")
    return found


def own_failures(stats: RegionStats, ref: Reference, tol: Tolerance) -> list[str]:
    """Where the loop differs from the sampler alone by more than chance (the loop's own error)."""
    return _region_failures(stats, ref, tol.mean_stat, tol.std_stat)


def reference_failures(ref: Reference, exp: Expected, tol: Tolerance) -> list[str]:
    """Where the sampler alone misses the exact answer by more than the tolerance (the sampler's own error)."""
    return _region_failures(ref, exp, tol.mean, tol.std)


def failures(stats: RegionStats, exp: Expected, tol: Tolerance) -> list[str]:
    """What is wrong with a measurement: region means and stds off, or a seam profile that
    leaves the range between the two expected means or turns back (a halo); [] = pass."""
    found = _region_failures(stats, exp, tol.mean, tol.std)
    p = torch.tensor(stats.profile)
    lo, hi = min(exp.mean_a, exp.mean_b), max(exp.mean_a, exp.mean_b)
    over = float(torch.clamp(torch.maximum(p - hi, lo - p), min=0).max())
    if over > tol.column:
        found.append(f"seam overshoot {over:.3f} (allowed {tol.column:.3f})")
    direction = 1.0 if exp.mean_b >= exp.mean_a else -1.0
    reversal = float(torch.clamp(-(p[1:] - p[:-1]) * direction, min=0).max())
    if reversal > 2 * tol.column:  # a difference of two column means
        found.append(f"seam reversal {reversal:.3f} (allowed {2 * tol.column:.3f})")
    return found
