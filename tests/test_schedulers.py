"""Sigma schedules: SD1.5's discrete sigmas, every ComfyUI scheduler, the sampler rules, golden sigmas."""
from __future__ import annotations

import json
import math

import numpy
import pytest
import torch

from golden_jobs import golden_case_dirs

from maskfleet.sampling import SCHEDULERS, InvalidInput, NoiseSchedule
from maskfleet.sampling.samplers import SAMPLERS, check_sampler_name
from maskfleet.sampling.schedulers import (
    DISCARD_PENULTIMATE_SIGMA_SAMPLERS,
    check_scheduler_name,
    ddim_uniform,
    exponential,
    karras,
    normal,
    schedule_for,
    scheduler_sigmas,
    sgm_uniform,
    simple,
)

# In-repo golden cases (tests/data/golden) plus any held-out ones under $MASKFLEET_GOLDEN_DIR.
GOLDEN_CASES = [d / "case.json" for d in golden_case_dirs()]
STEP_COUNTS = [1, 2, 3, 4, 5, 6, 7, 8, 10, 13, 20, 25, 30, 50]


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_config({})


def reference_sigmas_f64(beta_start=0.00085, beta_end=0.012, n=1000, scaled=True) -> torch.Tensor:
    if scaled:
        betas = numpy.linspace(beta_start**0.5, beta_end**0.5, n, dtype=numpy.float64) ** 2
    else:
        betas = numpy.linspace(beta_start, beta_end, n, dtype=numpy.float64)
    abar = numpy.cumprod(1.0 - betas)
    return torch.from_numpy(numpy.sqrt((1 - abar) / abar))


def log_interp_sigma(sigmas: torch.Tensor, t: float) -> float:
    """sigma at a fractional index, linear in log sigma (independent float64 version)."""
    lo, hi = math.floor(t), math.ceil(t)
    w = t - lo
    ls = sigmas.double().log()
    return math.exp((1 - w) * float(ls[lo]) + w * float(ls[hi]))


# ---------------------------------------------------------------- NoiseSchedule


def test_sd15_schedule(sched):
    assert sched.sigmas.shape == (1000,)
    assert sched.sigmas.dtype == torch.float32
    assert float(sched.sigma_min) == pytest.approx(0.0292, abs=1e-4)
    assert float(sched.sigma_max) == pytest.approx(14.6146, abs=1e-4)
    assert torch.all(sched.sigmas[1:] > sched.sigmas[:-1])
    torch.testing.assert_close(sched.sigmas.double(), reference_sigmas_f64(), rtol=1e-6, atol=0)
    torch.testing.assert_close(sched.log_sigmas, sched.sigmas.double().log().float(), rtol=1e-6, atol=1e-6)
    assert sched.prediction_type == "epsilon"


def test_linear_beta_schedule():
    s = NoiseSchedule.from_config({"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02})
    torch.testing.assert_close(s.sigmas.double(), reference_sigmas_f64(0.0001, 0.02, scaled=False), rtol=1e-6, atol=0)


def test_none_values_take_defaults(sched):
    s = NoiseSchedule.from_config({"beta_start": None, "prediction_type": None})
    assert torch.equal(s.sigmas, sched.sigmas)
    assert s.prediction_type == "epsilon"


def test_v_prediction_accepted_and_unknown_rejected(sched):
    v = NoiseSchedule.from_config({"prediction_type": "v_prediction"})
    assert v.prediction_type == "v_prediction"
    assert torch.equal(v.sigmas, sched.sigmas)
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule.from_config({"prediction_type": "sample"})
    with pytest.raises(ValueError, match="v_prediction"):
        NoiseSchedule.from_config({"prediction_type": "flow"})


def test_timestep_of_training_sigmas_is_their_index(sched):
    ks = torch.arange(1000)
    assert torch.equal(sched.timestep(sched.sigmas), ks)
    for k in (0, 1, 500, 998, 999):
        t = sched.timestep(sched.sigmas[k].clone())
        assert t.shape == () and int(t) == k


def test_timestep_is_nearest_index_in_log_space(sched):
    g = torch.Generator().manual_seed(0)
    sig = torch.exp(torch.empty(500).uniform_(math.log(0.02), math.log(20.0), generator=g))
    got = sched.timestep(sig)
    assert got.shape == sig.shape and got.dtype == torch.long
    ref = (sig.double().log()[None, :] - sched.log_sigmas.double()[:, None]).abs().argmin(dim=0)
    assert torch.equal(got, ref)
    # beyond the ends: clamps to the first / last index
    assert int(sched.timestep(torch.tensor(100.0))) == 999
    assert int(sched.timestep(torch.tensor(0.001))) == 0


def test_timestep_rounds_in_log_space_not_linear(sched):
    k = 0  # sigma_0 = 0.0292, sigma_1 = 0.0413: far enough apart that the two means differ by 1.5 %
    lo, hi = sched.sigmas[k].double(), sched.sigmas[k + 1].double()
    geo_mid = math.sqrt(float(lo) * float(hi))
    # just above the geometric mean but below the arithmetic mean -> k + 1 in log space
    s = torch.tensor(geo_mid * 1.005, dtype=torch.float32)
    assert float(s) < float((lo + hi) / 2)
    assert int(sched.timestep(s)) == k + 1
    s = torch.tensor(geo_mid * 0.995, dtype=torch.float32)
    assert int(sched.timestep(s)) == k


def test_sigma_at_fractional_timestep(sched):
    assert float(sched.sigma(torch.tensor(999.0))) == pytest.approx(float(sched.sigmas[999]), rel=1e-6)
    assert float(sched.sigma(torch.tensor(0))) == pytest.approx(float(sched.sigmas[0]), rel=1e-6)
    for t in (0.5, 124.875, 856.29, 998.9):
        assert float(sched.sigma(torch.tensor(t))) == pytest.approx(log_interp_sigma(sched.sigmas, t), rel=1e-5)
    # clamped outside the table
    assert float(sched.sigma(torch.tensor(1500.0))) == pytest.approx(float(sched.sigmas[999]), rel=1e-6)


# ---------------------------------------------------------------- all schedulers


def expected_length(name: str, steps: int) -> int | None:
    if name == "ddim_uniform":
        # ComfyUI's ddim_uniform walks indices 1, 1 + 1000 // steps, ... up to 999, so it gives
        # more than `steps` sigmas when 1000 is not a multiple of the stride.
        return len(range(1, 1000, max(1000 // steps, 1))) + 1
    if name == "beta":
        return None
    return steps + 1


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_every_scheduler_shape(sched, name, steps):
    sig = SCHEDULERS[name](sched, steps)
    assert sig.dtype == torch.float32 and sig.ndim == 1
    n = expected_length(name, steps)
    if n is None:
        assert 2 <= len(sig) <= steps + 1
    else:
        assert len(sig) == n
    assert float(sig[-1]) == 0.0
    assert torch.all(sig[1:] < sig[:-1]), sig  # strictly decreasing
    assert float(sig[0]) <= float(sched.sigma_max) * (1 + 1e-6)
    assert float(sig[-2]) >= float(sched.sigma_min) * (1 - 1e-6)
    assert torch.equal(scheduler_sigmas(sched, name, steps), sig)


@pytest.mark.parametrize("steps", [8, 20, 200, 500, 1000])
def test_beta_drops_repeats(sched, steps):
    from scipy import stats

    sig = SCHEDULERS["beta"](sched, steps)
    ts = numpy.rint(stats.beta.ppf(1 - numpy.linspace(0, 1, steps, endpoint=False), 0.6, 0.6) * 999)
    idx = list(dict.fromkeys(int(t) for t in ts))  # unique, order kept
    assert len(sig) == len(idx) + 1 <= steps + 1
    torch.testing.assert_close(sig[:-1], sched.sigmas[idx], rtol=0, atol=0)
    assert torch.all(sig[1:] < sig[:-1])
    if steps >= 500:
        assert len(sig) < steps + 1


@pytest.mark.parametrize("steps", [1, 3, 8, 20, 37])
def test_normal_interpolates_log_sigma(sched, steps):
    sig = normal(sched, steps)
    ts = numpy.linspace(999, 0, steps)
    expected = [log_interp_sigma(sched.sigmas, float(t)) for t in ts] + [0.0]
    torch.testing.assert_close(sig.double(), torch.tensor(expected, dtype=torch.float64), rtol=2e-6, atol=0)
    assert float(sig[0]) == pytest.approx(14.6146, abs=1e-4)
    if steps > 1:
        assert float(sig[-2]) == pytest.approx(0.0292, abs=1e-4)


@pytest.mark.parametrize("steps", [1, 2, 8, 20])
def test_karras_formula(sched, steps):
    sig = karras(sched, steps)
    smin, smax, rho = float(sched.sigma_min), float(sched.sigma_max), 7.0
    ramp = [i / (steps - 1) for i in range(steps)] if steps > 1 else [0.0]
    expected = [(smax ** (1 / rho) + r * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho for r in ramp] + [0.0]
    torch.testing.assert_close(sig.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert float(sig[0]) == pytest.approx(smax, rel=1e-5)
    if steps > 1:
        assert float(sig[-2]) == pytest.approx(smin, rel=1e-5)


@pytest.mark.parametrize("steps", [2, 8, 25])
def test_exponential_is_log_uniform(sched, steps):
    sig = exponential(sched, steps)
    logs = sig[:-1].double().log()
    diffs = logs[1:] - logs[:-1]
    expected_step = (math.log(float(sched.sigma_min)) - math.log(float(sched.sigma_max))) / (steps - 1)
    torch.testing.assert_close(diffs, torch.full_like(diffs, expected_step), rtol=1e-4, atol=1e-5)
    assert float(sig[0]) == pytest.approx(float(sched.sigma_max), rel=1e-5)
    assert float(sig[-2]) == pytest.approx(float(sched.sigma_min), rel=1e-5)


def test_ddim_uniform_8(sched):
    sig = ddim_uniform(sched, 8)
    assert len(sig) == 9
    assert float(sig[0]) == pytest.approx(7.3718, abs=1e-4)
    assert float(sig[-2]) == pytest.approx(0.0413, abs=1e-4)
    idx = [876, 751, 626, 501, 376, 251, 126, 1]
    assert torch.equal(sig[:-1], sched.sigmas[idx])
    assert float(sig[0]) < float(sched.sigma_max)  # does not start at sigma_max


def test_simple_uses_whole_indices(sched):
    sig = simple(sched, 8)
    idx = [999, 874, 749, 624, 499, 374, 249, 124]
    assert torch.equal(sig[:-1], sched.sigmas[idx])
    assert float(sig[-1]) == 0.0
    sig = simple(sched, 3)  # stride 333.33: indices 999, 666, 333
    assert torch.equal(sig[:-1], sched.sigmas[[999, 666, 333]])


@pytest.mark.parametrize("steps", [1, 2, 5, 8, 13, 20])
def test_sgm_uniform_is_normal_plus_one_without_penultimate(sched, steps):
    sgm = sgm_uniform(sched, steps)
    ref = normal(sched, steps + 1)
    assert torch.equal(sgm, torch.cat([ref[:-2], ref[-1:]]))


def test_sgm_uniform_8_ends_above_sigma_min(sched):
    sig = sgm_uniform(sched, 8)
    assert float(sig[-2]) == pytest.approx(0.3997, abs=1e-4)
    assert float(sig[-1]) == 0.0


# ---------------------------------------------------------------- schedule_for


def test_discard_set():
    assert DISCARD_PENULTIMATE_SIGMA_SAMPLERS == {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("scheduler", ["normal", "karras", "exponential", "simple", "sgm_uniform"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_schedule_for(sched, sampler, scheduler, steps):
    got = schedule_for(sched, sampler, scheduler, steps)
    assert len(got) == steps + 1
    assert float(got[-1]) == 0.0
    if sampler in DISCARD_PENULTIMATE_SIGMA_SAMPLERS:
        longer = SCHEDULERS[scheduler](sched, steps + 1)
        assert torch.equal(got, torch.cat([longer[:-2], longer[-1:]]))
        if steps > 1:
            assert not torch.equal(got, SCHEDULERS[scheduler](sched, steps))
    else:
        assert torch.equal(got, SCHEDULERS[scheduler](sched, steps))


def test_dpm_2_normal_equals_sgm_uniform(sched):
    for steps in (3, 8):
        assert torch.equal(schedule_for(sched, "dpm_2", "normal", steps), sgm_uniform(sched, steps))


@pytest.mark.skipif(not GOLDEN_CASES, reason="golden cases not available")
@pytest.mark.parametrize("case_path", GOLDEN_CASES, ids=lambda p: p.parent.name)
def test_golden_sigmas(sched, case_path):
    case = json.loads(case_path.read_text())
    n = case["adv_steps"]
    assert n == int(case["steps"] / case["denoise"])
    for which, key in (("base_sampler", "sigmas_base"), ("mask_sampler", "sigmas_mask")):
        s = case[which]
        got = schedule_for(sched, s["sampler_name"], s["scheduler"], n)
        ref = torch.tensor(case[key], dtype=torch.float32)
        assert got.shape == ref.shape, (which, got, ref)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_golden_cases_present():
    assert len(GOLDEN_CASES) >= 7


# ---------------------------------------------------------------- names


def test_unknown_scheduler_name(sched):
    with pytest.raises(InvalidInput) as info:
        scheduler_sigmas(sched, "kerras", 8)
    assert info.value.field == "scheduler"
    msg = str(info.value)
    assert "kerras" in msg
    for name in SCHEDULERS:
        assert name in msg
    with pytest.raises(InvalidInput):
        schedule_for(sched, "euler", "linear", 8)
    with pytest.raises(InvalidInput, match="base_sampler.scheduler"):
        check_scheduler_name("nope", "base_sampler.scheduler")
    check_scheduler_name("karras")


def test_unknown_sampler_name():
    with pytest.raises(InvalidInput) as info:
        check_sampler_name("k_euler")
    msg = str(info.value)
    assert info.value.field == "sampler_name" and "k_euler" in msg
    for name in SAMPLERS:
        assert name in msg
    assert isinstance(info.value, ValueError)
