"""Each sampler step against its published formula, recomputed here in float64.

The models are analytic so the expected values can be written out by hand:
`linear_model` (denoised = a x / (1 + sigma^2)) has an exact probability-flow ODE
solution, and a fixed-x0 model makes every consistent first-order method exact.
The expected values never call into the module's helpers (to_d, ancestral_step...).
"""
from __future__ import annotations

import math

import pytest
import torch

from maskfleet.sampling import InvalidInput
from maskfleet.sampling.samplers import (
    RECOVERY_SAMPLERS,
    SAMPLERS,
    StepContext,
    ancestral_step,
    check_sampler_name,
    dpm_2,
    dpm_2_ancestral,
    dpm_fast_single,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_2s_ancestral,
    dpmpp_3m_sde,
    dpmpp_sde,
    euler,
    euler_ancestral,
    heun,
    lcm,
    lms,
    uni_pc_single,
)

DT = torch.float64
A = 0.7
SHAPE = (2, 3, 4, 5)

# (sigma, sigma_next) pairs with sigma_next > 0: large, medium and small steps.
STEPS = [(14.6146, 6.678), (3.0, 2.5), (1.2, 0.4), (0.5, 0.0292), (2.0, 1.999)]


def T(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=DT)


def rand(seed: int = 0, shape=SHAPE) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-10, atol: float = 1e-10) -> None:
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def lin(x, sigma):
    """Analytic denoiser: x0 estimate a x / (1 + sigma^2)."""
    return x * A / (1 + sigma**2)


def lin_f(x, s: float):
    return x * A / (1 + s * s)


def exact_linear_solution(x: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """dx/ds = x (1 - a / (1 + s^2)) / s  =>  x(s) ∝ s^(1-a) (1 + s^2)^(a/2)."""
    F = lambda s: (1 - A) * math.log(s) + A / 2 * math.log1p(s * s)  # noqa: E731
    return x * math.exp(F(s1) - F(s0))


class Recorder:
    """Wraps a model, counting calls and remembering each call's sigma."""

    def __init__(self, fn):
        self.fn = fn
        self.sigmas: list[float] = []

    def __call__(self, x, sigma):
        self.sigmas.append(float(sigma))
        return self.fn(x, sigma)

    @property
    def calls(self) -> int:
        return len(self.sigmas)


class Noise:
    """A noise source returning a fixed tensor (or zeros), recording each (sigma, sigma_next)."""

    def __init__(self, value: torch.Tensor):
        self.value = value
        self.calls: list[tuple[float, float]] = []

    def __call__(self, sigma, sigma_next):
        self.calls.append((float(sigma), float(sigma_next)))
        return self.value.clone()


def ctx_for(model, noise=None) -> StepContext:
    return StepContext(model=model, noise=noise)


def anc(s: float, sn: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step with eta 1: (sigma_down, sigma_up)."""
    su = min(sn, math.sqrt(sn * sn * (s * s - sn * sn) / (s * s)))
    return math.sqrt(sn * sn - su * su), su


# ---------------------------------------------------------------- euler / heun / dpm_2


@pytest.mark.parametrize("s,sn", STEPS + [(1.3, 0.0)])
def test_euler_formula(s, sn):
    x = rand(1)
    model = Recorder(lin)
    x_next, den = euler(ctx_for(model), x, T(s), T(sn))
    d0 = lin_f(x, s)
    close(den, d0)
    close(x_next, x + (x - d0) / s * (sn - s))
    assert model.sigmas == [s]


@pytest.mark.parametrize("s,sn", STEPS)
def test_heun_second_evaluation(s, sn):
    x = rand(2)
    model = Recorder(lin)
    x_next, den = heun(ctx_for(model), x, T(s), T(sn))
    d1 = (x - lin_f(x, s)) / s
    x2 = x + d1 * (sn - s)
    d2 = (x2 - lin_f(x2, sn)) / sn
    close(x_next, x + (d1 + d2) / 2 * (sn - s))
    close(den, lin_f(x, s))
    assert model.sigmas == pytest.approx([s, sn])


def test_heun_is_euler_when_stepping_to_zero():
    x = rand(3)
    model = Recorder(lin)
    x_next, den = heun(ctx_for(model), x, T(0.8), T(0.0))
    close(x_next, x + (x - lin_f(x, 0.8)) / 0.8 * (0.0 - 0.8))
    close(x_next, lin_f(x, 0.8))  # Euler to 0 lands on the denoised
    assert model.calls == 1


@pytest.mark.parametrize("s,sn", STEPS)
def test_dpm_2_midpoint_in_log_sigma(s, sn):
    x = rand(4)
    model = Recorder(lin)
    x_next, den = dpm_2(ctx_for(model), x, T(s), T(sn))
    s_mid = math.exp((math.log(s) + math.log(sn)) / 2)
    d1 = (x - lin_f(x, s)) / s
    x2 = x + d1 * (s_mid - s)
    d2 = (x2 - lin_f(x2, s_mid)) / s_mid
    close(x_next, x + d2 * (sn - s))
    close(den, lin_f(x, s))
    assert model.sigmas == pytest.approx([s, math.sqrt(s * sn)], rel=1e-12)


def test_dpm_2_is_euler_when_stepping_to_zero():
    x = rand(5)
    model = Recorder(lin)
    x_next, _ = dpm_2(ctx_for(model), x, T(0.6), T(0.0))
    close(x_next, lin_f(x, 0.6))
    assert model.calls == 1


# ---------------------------------------------------------------- ancestral


@pytest.mark.parametrize("s,sn", STEPS + [(1.0, 0.0)])
def test_ancestral_step_split(s, sn):
    sd, su = ancestral_step(T(s), T(sn))
    esd, esu = anc(s, sn)
    assert float(sd) == pytest.approx(esd, rel=1e-12, abs=1e-14)
    assert float(su) == pytest.approx(esu, rel=1e-12, abs=1e-14)
    assert float(sd) ** 2 + float(su) ** 2 == pytest.approx(sn * sn, rel=1e-12, abs=1e-14)
    assert 0 <= float(sd) <= sn + 1e-15 and 0 <= float(su) <= sn + 1e-15
    # The k-diffusion closed form: sigma_up = sn * sqrt(1 - sn^2 / s^2) (never above sn here).
    assert float(su) == pytest.approx(sn * math.sqrt(1 - (sn / s) ** 2), rel=1e-12, abs=1e-14)


def test_ancestral_step_eta_zero_is_deterministic():
    sd, su = ancestral_step(T(3.0), T(1.0), eta=0.0)
    assert float(sd) == 1.0 and float(su) == 0.0


@pytest.mark.parametrize("s,sn", STEPS)
def test_euler_ancestral_formula(s, sn):
    x, n = rand(6), rand(7)
    noise = Noise(n)
    model = Recorder(lin)
    x_next, den = euler_ancestral(ctx_for(model, noise), x, T(s), T(sn))
    sd, su = anc(s, sn)
    expected = x + (x - lin_f(x, s)) / s * (sd - s) + n * su
    close(x_next, expected)
    close(den, lin_f(x, s))
    assert len(noise.calls) == 1 and model.calls == 1


def test_euler_ancestral_draws_no_noise_at_zero():
    x = rand(8)
    noise = Noise(rand(9))
    x_next, den = euler_ancestral(ctx_for(lin, noise), x, T(0.9), T(0.0))
    assert noise.calls == []
    close(x_next, lin_f(x, 0.9))


@pytest.mark.parametrize("s,sn", STEPS)
def test_dpm_2_ancestral_formula(s, sn):
    x, n = rand(10), rand(11)
    noise = Noise(n)
    model = Recorder(lin)
    x_next, den = dpm_2_ancestral(ctx_for(model, noise), x, T(s), T(sn))
    sd, su = anc(s, sn)
    s_mid = math.sqrt(s * sd)
    d1 = (x - lin_f(x, s)) / s
    x2 = x + d1 * (s_mid - s)
    d2 = (x2 - lin_f(x2, s_mid)) / s_mid
    close(x_next, x + d2 * (sd - s) + n * su)
    assert len(noise.calls) == 1
    assert model.sigmas == pytest.approx([s, s_mid], rel=1e-12)


def test_dpm_2_ancestral_at_zero_is_euler_without_noise():
    x = rand(12)
    noise = Noise(rand(13))
    model = Recorder(lin)
    x_next, _ = dpm_2_ancestral(ctx_for(model, noise), x, T(0.7), T(0.0))
    close(x_next, lin_f(x, 0.7))
    assert noise.calls == [] and model.calls == 1


@pytest.mark.parametrize("s,sn", STEPS)
@pytest.mark.parametrize("use_noise", [False, True])
def test_dpmpp_2s_ancestral_formula(s, sn, use_noise):
    x = rand(14)
    n = rand(15) if use_noise else torch.zeros(SHAPE, dtype=DT)
    noise = Noise(n)
    model = Recorder(lin)
    x_next, den = dpmpp_2s_ancestral(ctx_for(model, noise), x, T(s), T(sn))
    sd, su = anc(s, sn)
    # DPM-Solver++(2S) in sigma form: t = -log sigma, midpoint time -> sigma_mid = sqrt(s * sd)
    s_mid = math.sqrt(s * sd)
    d0 = lin_f(x, s)
    x2 = (s_mid / s) * x + (1 - s_mid / s) * d0
    d_mid = lin_f(x2, s_mid)
    expected = (sd / s) * x + (1 - sd / s) * d_mid + n * su
    close(x_next, expected)
    assert model.sigmas == pytest.approx([s, s_mid], rel=1e-12)
    assert len(noise.calls) == 1


def test_dpmpp_2s_ancestral_at_zero():
    x = rand(16)
    noise = Noise(rand(17))
    x_next, _ = dpmpp_2s_ancestral(ctx_for(lin, noise), x, T(1.1), T(0.0))
    close(x_next, lin_f(x, 1.1))
    assert noise.calls == []


# ---------------------------------------------------------------- dpmpp_sde


@pytest.mark.parametrize("s,sn", STEPS)
def test_dpmpp_sde_with_zero_noise(s, sn):
    x = rand(18)
    noise = Noise(torch.zeros(SHAPE, dtype=DT))
    model = Recorder(lin)
    x_next, den = dpmpp_sde(ctx_for(model, noise), x, T(s), T(sn))
    s_mid = math.sqrt(s * sn)  # t + h/2 with r = 0.5
    # first substep: ancestral split of s -> s_mid, DPM-Solver++ 1st order to the down sigma
    sd1, _ = anc(s, s_mid)
    d0 = lin_f(x, s)
    x2 = (sd1 / s) * x + (1 - sd1 / s) * d0
    d_mid = lin_f(x2, s_mid)
    # second substep: fac = 1/(2r) = 1, so the combined denoised is the midpoint's
    sd2, _ = anc(s, sn)
    expected = (sd2 / s) * x + (1 - sd2 / s) * d_mid
    close(x_next, expected)
    close(den, d0)
    assert model.sigmas == pytest.approx([s, s_mid], rel=1e-12)
    assert len(noise.calls) == 2
    assert noise.calls[0] == pytest.approx((s, s_mid), rel=1e-12)
    assert noise.calls[1] == pytest.approx((s, sn), rel=1e-12)


@pytest.mark.parametrize("s,sn", [(3.0, 1.0), (0.9, 0.2)])
def test_dpmpp_sde_noise_terms(s, sn):
    """The noise enters as n * su at both substeps; the first is propagated through the model."""
    x, n = rand(19), rand(20)
    x_next, _ = dpmpp_sde(ctx_for(lin, Noise(n)), x, T(s), T(sn))
    s_mid = math.sqrt(s * sn)
    sd1, su1 = anc(s, s_mid)
    x2 = (sd1 / s) * x + (1 - sd1 / s) * lin_f(x, s) + n * su1
    sd2, su2 = anc(s, sn)
    expected = (sd2 / s) * x + (1 - sd2 / s) * lin_f(x2, s_mid) + n * su2
    close(x_next, expected)


def test_dpmpp_sde_at_zero_is_euler():
    x = rand(21)
    noise = Noise(rand(22))
    model = Recorder(lin)
    x_next, _ = dpmpp_sde(ctx_for(model, noise), x, T(0.4), T(0.0))
    close(x_next, lin_f(x, 0.4))
    assert noise.calls == [] and model.calls == 1


# ---------------------------------------------------------------- dpmpp_2m


@pytest.mark.parametrize("s,sn", STEPS)
def test_dpmpp_2m_first_order_on_fresh_history(s, sn):
    x = rand(23)
    ctx = ctx_for(lin)
    x_next, den = dpmpp_2m(ctx, x, T(s), T(sn))
    d0 = lin_f(x, s)
    close(x_next, (sn / s) * x + (1 - sn / s) * d0)
    close(den, d0)


@pytest.mark.parametrize("s0,s1,s2", [(14.6146, 6.0, 2.2), (3.0, 2.0, 1.5), (1.0, 0.4, 0.1)])
def test_dpmpp_2m_second_order_correction(s0, s1, s2):
    x0 = rand(24)
    ctx = ctx_for(lin)
    x1, den0 = dpmpp_2m(ctx, x0, T(s0), T(s1))
    x2, den1 = dpmpp_2m(ctx, x1, T(s1), T(s2))
    e_x1 = (s1 / s0) * x0 + (1 - s1 / s0) * lin_f(x0, s0)
    close(x1, e_x1)
    h = math.log(s1 / s2)
    h_last = math.log(s0 / s1)
    r = h_last / h
    D = (1 + 1 / (2 * r)) * lin_f(e_x1, s1) - (1 / (2 * r)) * lin_f(x0, s0)
    close(x2, (s2 / s1) * e_x1 + (1 - s2 / s1) * D)
    # It really is different from the first-order update.
    first = (s2 / s1) * e_x1 + (1 - s2 / s1) * lin_f(e_x1, s1)
    assert (x2 - first).abs().max() > 1e-6


def test_dpmpp_2m_with_history_to_zero_returns_denoised():
    x = rand(25)
    ctx = ctx_for(lin)
    x1, _ = dpmpp_2m(ctx, x, T(2.0), T(0.5))
    x2, den = dpmpp_2m(ctx, x1, T(0.5), T(0.0))
    close(x2, lin_f(x1, 0.5))
    close(den, lin_f(x1, 0.5))


# ---------------------------------------------------------------- dpmpp_2m_sde / 3m_sde


def sde_first_step(x, d0, n, s, sn):
    """eta = 1: x' = (sn/s)^2 x + (1 - (sn/s)^2) d0 + n sn sqrt(1 - (sn/s)^2)."""
    q = (sn / s) ** 2
    return q * x + (1 - q) * d0 + n * sn * math.sqrt(1 - q)


@pytest.mark.parametrize("s,sn", STEPS)
def test_dpmpp_2m_sde_first_step(s, sn):
    x, n = rand(26), rand(27)
    noise = Noise(n)
    x_next, den = dpmpp_2m_sde(ctx_for(lin, noise), x, T(s), T(sn))
    close(x_next, sde_first_step(x, lin_f(x, s), n, s, sn))
    assert noise.calls == [pytest.approx((s, sn))]


def test_dpmpp_2m_sde_second_step_midpoint_correction():
    s0, s1, s2 = 5.0, 2.0, 0.7
    x0, n = rand(28), rand(29)
    ctx = ctx_for(lin, Noise(n))
    x1, _ = dpmpp_2m_sde(ctx, x0, T(s0), T(s1))
    x2, _ = dpmpp_2m_sde(ctx, x1, T(s1), T(s2))
    e_x1 = sde_first_step(x0, lin_f(x0, s0), n, s0, s1)
    close(x1, e_x1)
    h, h_last = math.log(s1 / s2), math.log(s0 / s1)
    r = h_last / h
    d1, d_old = lin_f(e_x1, s1), lin_f(x0, s0)
    expected = sde_first_step(e_x1, d1, n, s1, s2) + 0.5 * (1 - math.exp(-2 * h)) / r * (d1 - d_old)
    close(x2, expected)


@pytest.mark.parametrize("step", [dpmpp_2m_sde, dpmpp_3m_sde])
def test_sde_to_zero_returns_denoised_without_noise(step):
    x = rand(30)
    noise = Noise(rand(31))
    ctx = ctx_for(lin, noise)
    x1, _ = step(ctx, x, T(1.5), T(0.5))
    x2, den = step(ctx, x1, T(0.5), T(0.0))
    assert torch.equal(x2, den)
    close(x2, lin_f(x1, 0.5))
    assert len(noise.calls) == 1  # only the first step drew
    # fresh history, straight to zero
    x3, den3 = step(ctx_for(lin, noise), x, T(2.0), T(0.0))
    assert torch.equal(x3, den3)
    assert len(noise.calls) == 1


@pytest.mark.parametrize("s,sn", STEPS)
def test_dpmpp_3m_sde_first_step_equals_2m_sde(s, sn):
    x, n = rand(32), rand(33)
    a, _ = dpmpp_3m_sde(ctx_for(lin, Noise(n)), x, T(s), T(sn))
    close(a, sde_first_step(x, lin_f(x, s), n, s, sn))


def test_dpmpp_3m_sde_second_and_third_step():
    sig = [6.0, 3.0, 1.0, 0.4]
    x0, n = rand(34), rand(35)
    ctx = ctx_for(lin, Noise(n))
    xs = [x0]
    for i in range(3):
        xs.append(dpmpp_3m_sde(ctx, xs[-1], T(sig[i]), T(sig[i + 1]))[0])
    dens = [lin_f(xs[i], sig[i]) for i in range(3)]
    hs = [math.log(sig[i] / sig[i + 1]) for i in range(3)]

    def base(i):
        q = math.exp(-2 * hs[i])
        return q * xs[i] + (1 - q) * dens[i] + n * sig[i + 1] * math.sqrt(1 - q)

    phi2 = lambda he: math.expm1(-he) / he + 1  # noqa: E731
    # step 2: second order with one old denoised
    h = hs[1]
    r = hs[0] / h
    close(xs[2], base(1) + phi2(2 * h) * (dens[1] - dens[0]) / r)
    # step 3: third order with two old denoised
    h = hs[2]
    r0, r1 = hs[1] / h, hs[0] / h
    d1_0 = (dens[2] - dens[1]) / r0
    d1_1 = (dens[1] - dens[0]) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    p2 = phi2(2 * h)
    p3 = p2 / (2 * h) - 0.5
    close(xs[3], base(2) + p2 * d1 - p3 * d2)


# ---------------------------------------------------------------- lms


@pytest.mark.parametrize("s,sn", STEPS + [(0.8, 0.0)])
def test_lms_order_one_is_euler(s, sn):
    x = rand(36)
    a, da = lms(ctx_for(lin), x, T(s), T(sn))
    b, db = euler(ctx_for(lin), x, T(s), T(sn))
    close(a, b)
    close(da, db)


def test_lms_constant_derivative_is_integrated_exactly():
    c = rand(37)
    const = lambda x, s: x - c * s  # noqa: E731  (d = (x - den)/s = c)
    sig = [14.6, 9.0, 5.5, 3.1, 1.7, 0.9, 0.35, 0.0]
    ctx = ctx_for(const)
    x = rand(38)
    for s, sn in zip(sig[:-1], sig[1:]):
        x_next, _ = lms(ctx, x, T(s), T(sn))
        close(x_next, x + c * (sn - s), rtol=1e-9, atol=1e-9)
        x = x_next
    assert len(ctx.history["ds"]) == 4  # max_order


def test_lms_order_two_is_adams_bashforth():
    s0, s1, s2 = 3.0, 2.0, 1.0  # uniform step h = -1: AB2 weights 3h/2 and -h/2
    x0 = rand(39)
    ctx = ctx_for(lin)
    x1, _ = lms(ctx, x0, T(s0), T(s1))
    x2, _ = lms(ctx, x1, T(s1), T(s2))
    d0 = (x0 - lin_f(x0, s0)) / s0
    e_x1 = x0 + d0 * (s1 - s0)
    d1 = (e_x1 - lin_f(e_x1, s1)) / s1
    h = s1 - s0
    close(x2, e_x1 + 1.5 * h * d1 - 0.5 * h * d0)


def test_lms_order_two_nonuniform_coefficients():
    s0, s1, s2 = 5.0, 2.0, 1.2
    x0 = rand(40)
    ctx = ctx_for(lin)
    x1, _ = lms(ctx, x0, T(s0), T(s1))
    x2, _ = lms(ctx, x1, T(s1), T(s2))
    d0 = (x0 - lin_f(x0, s0)) / s0
    d1 = (x1 - lin_f(x1, s1)) / s1
    # integrals over [s1, s2] of the Lagrange basis on nodes (s1, s0)
    c_new = ((s2 - s0) ** 2 - (s1 - s0) ** 2) / (2 * (s1 - s0))
    c_old = (s2 - s1) ** 2 / (2 * (s0 - s1))
    close(x2, x1 + c_new * d1 + c_old * d0)


def test_lms_order_four_integrates_cubic_derivative_exactly():
    c = rand(41)
    p = lambda s: 1 + 0.5 * s - 0.3 * s**2 + 0.05 * s**3  # noqa: E731
    P = lambda s: s + 0.25 * s**2 - 0.1 * s**3 + 0.0125 * s**4  # noqa: E731
    model = lambda x, s: x - c * p(float(s)) * float(s)  # noqa: E731  (d = c p(s))
    sig = [6.0, 4.5, 3.7, 2.2, 1.6, 0.9, 0.5]
    ctx = ctx_for(model)
    x = rand(42)
    for i, (s, sn) in enumerate(zip(sig[:-1], sig[1:])):
        x_next, _ = lms(ctx, x, T(s), T(sn))
        if i >= 3:  # four derivatives in the history
            close(x_next - x, c * (P(sn) - P(s)), rtol=1e-8, atol=1e-9)
        x = x_next


# ---------------------------------------------------------------- lcm / dpm_fast / uni_pc


@pytest.mark.parametrize("s,sn", STEPS)
def test_lcm_renoises_the_denoised(s, sn):
    x, n = rand(43), rand(44)
    noise = Noise(n)
    x_next, den = lcm(ctx_for(lin, noise), x, T(s), T(sn))
    close(x_next, lin_f(x, s) + n * sn)
    assert len(noise.calls) == 1


def test_lcm_to_zero_draws_no_noise():
    x = rand(45)
    noise = Noise(rand(46))
    x_next, den = lcm(ctx_for(lin, noise), x, T(2.0), T(0.0))
    close(x_next, lin_f(x, 2.0))
    assert noise.calls == []


@pytest.mark.parametrize("s,sn", STEPS)
def test_dpm_fast_single_formula(s, sn):
    x = rand(47)
    model = Recorder(lin)
    x_next, den = dpm_fast_single(ctx_for(model), x, T(s), T(sn))
    eps = (x - lin_f(x, s)) / s
    close(x_next, x - sn * math.expm1(math.log(s / sn)) * eps)
    close(den, lin_f(x, s))
    # DPM-Solver-1 in the variance-exploding form is exactly Euler
    close(x_next, euler(ctx_for(lin), x, T(s), T(sn))[0])
    assert model.calls == 1


def test_dpm_fast_single_zero_length_step_at_zero():
    x = rand(48)
    model = Recorder(lin)
    x_next, den = dpm_fast_single(ctx_for(model), x, T(0.7), T(0.0))
    close(x_next, x, rtol=0, atol=1e-14)
    close(den, lin_f(x, 0.7))
    assert model.calls == 1


@pytest.mark.parametrize("s,sn", STEPS + [(0.4, 0.0), (14.6146, 0.0)])
def test_uni_pc_single_rescales(s, sn):
    x = rand(49)
    model = Recorder(lin)
    x_next, den = uni_pc_single(ctx_for(model), x, T(s), T(sn))
    s_end = sn if sn > 0 else 0.001
    close(x_next, x * math.sqrt(1 + s_end**2) / math.sqrt(1 + s**2))
    close(den, lin_f(x, s))
    assert model.calls == 1


# ---------------------------------------------------------------- cross-sampler properties

DETERMINISTIC_EXACT = {
    "euler": euler,
    "heun": heun,
    "dpm_2": dpm_2,
    "lms": lms,
    "dpmpp_2m": dpmpp_2m,
    "dpm_fast": dpm_fast_single,
}

TO_ZERO_GIVES_X0 = {
    "euler": euler,
    "heun": heun,
    "dpm_2": dpm_2,
    "lms": lms,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_2m_sde": dpmpp_2m_sde,
    "dpmpp_3m_sde": dpmpp_3m_sde,
    "dpmpp_sde": dpmpp_sde,
    "euler_ancestral": euler_ancestral,
    "dpm_2_ancestral": dpm_2_ancestral,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral,
    "lcm": lcm,
}


@pytest.mark.parametrize("name", sorted(TO_ZERO_GIVES_X0))
def test_fixed_x0_model_stepping_to_zero_returns_x0(name):
    x0, x = rand(50), rand(51) * 3
    noise = Noise(rand(52))
    step = TO_ZERO_GIVES_X0[name]
    x_next, den = step(ctx_for(lambda _x, _s: x0, noise), x, T(1.7), T(0.0))
    close(x_next, x0, rtol=1e-12, atol=1e-12)
    close(den, x0, rtol=0, atol=0)
    assert noise.calls == []


@pytest.mark.parametrize("name", sorted(DETERMINISTIC_EXACT))
def test_fixed_x0_model_is_solved_exactly(name):
    """With a fixed x0 the ODE solution is x0 + (sigma/sigma_0)(x - x0); every consistent method hits it."""
    x0, x = rand(53), rand(54) * 5
    step = DETERMINISTIC_EXACT[name]
    ctx = ctx_for(lambda _x, _s: x0)
    sig = [14.6146, 7.0, 3.0, 1.1, 0.3, 0.05]
    cur = x
    for s, sn in zip(sig[:-1], sig[1:]):
        cur, _ = step(ctx, cur, T(s), T(sn))
        close(cur, x0 + (sn / sig[0]) * (x - x0), rtol=1e-9, atol=1e-9)


def _integrate(step, n: int, s_start=3.0, s_end=0.5):
    x = rand(55)
    ctx = ctx_for(lin)
    sig = torch.linspace(s_start, s_end, n + 1, dtype=DT)
    for i in range(n):
        x, _ = step(ctx, x, sig[i], sig[i + 1])
    return (x - exact_linear_solution(rand(55), s_start, s_end)).abs().max().item()


@pytest.mark.parametrize("step,order", [(euler, 1), (heun, 2), (dpm_2, 2), (dpmpp_2m, 2)], ids=["euler", "heun", "dpm_2", "dpmpp_2m"])
def test_convergence_order_on_linear_model(step, order):
    e1, e2 = _integrate(step, 32), _integrate(step, 64)
    observed = math.log2(e1 / e2)
    assert abs(observed - order) < 0.25, observed


# ---------------------------------------------------------------- the table


def test_ddim_is_euler_with_inpaint_random_noise():
    info = SAMPLERS["ddim"]
    assert info.step is euler
    assert info.inpaint_random_noise is True
    assert info.noise is None and info.recovery_sampler is None
    assert [name for name, i in SAMPLERS.items() if i.inpaint_random_noise] == ["ddim"]


def test_sampler_table():
    expected_noise = {
        "euler_ancestral": "ancestral",
        "dpm_2_ancestral": "ancestral",
        "dpmpp_2s_ancestral": "ancestral",
        "lcm": "ancestral",
        "dpmpp_sde": "brownian",
        "dpmpp_2m_sde": "brownian",
        "dpmpp_3m_sde": "brownian",
    }
    for name, info in SAMPLERS.items():
        assert info.noise == expected_noise.get(name), name
    assert SAMPLERS["euler"].step is euler
    assert SAMPLERS["lms"].step is lms
    assert SAMPLERS["uni_pc"].step is uni_pc_single and SAMPLERS["uni_pc_bh2"].step is uni_pc_single
    recovery = {n: i.recovery_sampler for n, i in SAMPLERS.items() if i.recovery_sampler}
    assert recovery == {
        "dpmpp_sde": "dpm_fast",
        "dpmpp_2m_sde": "dpmpp_2m",
        "dpmpp_3m_sde": "dpmpp_2m",
        "uni_pc": "dpm_fast",
        "uni_pc_bh2": "dpm_fast",
    }
    assert RECOVERY_SAMPLERS["dpm_fast"].step is dpm_fast_single
    assert RECOVERY_SAMPLERS["dpmpp_2m"].step is dpmpp_2m
    assert "dpm_fast" not in SAMPLERS


def test_unknown_sampler_name():
    with pytest.raises(InvalidInput) as info:
        check_sampler_name("euler_a")
    assert info.value.field == "sampler_name"
    for name in SAMPLERS:
        assert name in str(info.value)
    with pytest.raises(InvalidInput, match="mask_sampler.sampler_name"):
        check_sampler_name("dpm_fast", "mask_sampler.sampler_name")
    check_sampler_name("euler")  # no error
