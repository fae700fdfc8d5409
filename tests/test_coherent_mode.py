"""Coherent mode (issue 8) with a denoiser whose answer is known: each region gets its own Gaussian.

GaussianDenoiser returns the exact posterior mean for N(mu, S^2) data, pixel by pixel;
the base sampler's conditioning asks for MU_A, the mask sampler's for MU_B. Because the
denoiser is pixelwise, the output away from the overlap band must be exactly what the
region's sampler gives when it runs alone over the whole latent: that is checked for
every sampler against a plain k-diffusion loop written here (one persistent history,
noise drawn once per step). The statistics test then checks the values themselves.
"""
from __future__ import annotations

import math

import pytest
import torch

from analytic_denoiser import GaussianDenoiser, conditioning
from maskfleet.sampling import SAMPLERS, AdvancedSampler, InvalidInput, SamplingStopped, sample_two_samplers
from maskfleet.job import JobError, parse_job
from maskfleet.sampling.coherent_loop import COHERENT_STEPS, blend_weight
from maskfleet.sampling.coherent_rules import REFUSED_SAMPLERS
from maskfleet.sampling.noise_sources import JobBatchRandomness, JobRandomness
from maskfleet.sampling.samplers import StepContext
from maskfleet.sampling.schedulers import schedule_for

S, MU_A, MU_B = 0.5, 1.0, -1.0
OVERLAP = 10  # grows the left-half mask by 5 latent pixels to the right: columns W/2 .. W/2 + 4


def left_half(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[..., : w // 2] = 1.0
    return mask


def pair(name: str, scheduler: str = "karras", mask_name: str | None = None, mask_scheduler: str | None = None, den=None):
    den = den or GaussianDenoiser(S)
    base = AdvancedSampler(den, 1.0, name, scheduler, conditioning(MU_A), conditioning(0.0))
    inner = AdvancedSampler(den, 1.0, mask_name or name, mask_scheduler or scheduler, conditioning(MU_B), conditioning(0.0))
    return base, inner


def coherent(latent, name, steps, seed=7, **kw):
    base, inner = pair(name, **{k: kw.pop(k) for k in ("scheduler", "mask_name", "mask_scheduler") if k in kw})
    mask = kw.pop("mask", None)
    mask = left_half(*latent.shape[-2:]) if mask is None else mask
    return sample_two_samplers(latent, mask, base, inner, seed=seed, steps=steps, overlap_factor=OVERLAP, mode="coherent", **kw)


def plain_run(latent, name, mu, steps, seed=7, scheduler="karras"):
    """One sampler alone over the whole latent, as k-diffusion runs it: one history for all steps."""
    den = GaussianDenoiser(S)
    sigmas = schedule_for(den.schedule, name, scheduler, steps)
    rnd = JobRandomness(seed)
    x = latent + rnd.start_noise(latent.shape) * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    if SAMPLERS[name].noise == "brownian":
        noise = rnd.brownian(x, sigmas[sigmas > 0].min(), sigmas.max())
    else:
        noise = lambda sigma, sigma_next: rnd.ancestral_noise(x.shape)  # noqa: E731
    ctx = StepContext(model=lambda x_t, sigma: den.denoise(x_t, sigma, conditioning(mu, x_t.shape[0])), noise=noise)
    for i in range(len(sigmas) - 1):
        x, _ = COHERENT_STEPS[name](ctx, x, sigmas[i], sigmas[i + 1])
    return x


def regions(out: torch.Tensor, margin: int = 2):
    """(inside the mask, outside the grown mask), each at least `margin` pixels from the band."""
    w = out.shape[-1]
    return out[..., : w // 2 - margin], out[..., w // 2 + OVERLAP // 2 + margin :]


@pytest.mark.parametrize("name", sorted(set(SAMPLERS) - set(REFUSED_SAMPLERS)))
def test_each_region_is_its_sampler_run_alone(name):
    latent = torch.zeros(1, 4, 16, 32)
    steps = 8
    out = coherent(latent, name, steps)
    inside, outside = regions(out)
    inside_ref, _ = regions(plain_run(latent, name, MU_B, steps))
    _, outside_ref = regions(plain_run(latent, name, MU_A, steps))
    torch.testing.assert_close(inside, inside_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outside, outside_ref, rtol=1e-5, atol=1e-5)


# Allowed relative error of the output standard deviation from the sampler's own
# discretisation at 30 karras steps (measured with plain_run: first-order methods are
# 5-11 % low there, second-order and multistep ones within 1 %).
FIRST_ORDER = {"euler", "ddim", "euler_ancestral"}


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "ddim"])
def test_region_means_and_spread_match_the_data(name):
    """Mean mu and spread S per region, tolerances derived from the pixel count.

    The pixels are independent, so the mean of N pixels has standard error S / sqrt(N)
    and their standard deviation S / sqrt(2 (N - 1)); we allow 4 of each. On top: the
    exact probability-flow ODE keeps a fraction S / sqrt(S^2 + sigma_0^2) of the input
    latent's offset from mu (here 0 - mu; 3.4 %), which a discretised sampler changes by
    less than half again; and the std may miss S by the sampler's discretisation error
    (FIRST_ORDER: 15 %, others 3 %).
    """
    batch = 1 if SAMPLERS[name].noise == "brownian" else 2  # the Brownian tree is slow on CPU
    out = coherent(torch.zeros(batch, 4, 64, 64), name, steps=30)
    sigma_0 = float(schedule_for(GaussianDenoiser(S).schedule, name, "karras", 30)[0])
    memory = S / math.sqrt(S**2 + sigma_0**2)
    for values, mu in zip(regions(out), (MU_B, MU_A)):
        n = values.numel()
        mean_tol = 4 * S / math.sqrt(n) + 1.5 * memory * abs(mu)
        assert abs(float(values.mean()) - mu) <= mean_tol, (name, float(values.mean()), mu, mean_tol)
        std, std_se = float(values.std()), S / math.sqrt(2 * (n - 1))
        allowance = 0.15 if name in FIRST_ORDER else 0.03
        assert abs(std - S) <= 4 * std_se + allowance * S, (name, std, allowance)


def test_the_seam_keeps_full_noise_and_moves_smoothly():
    """In the band the two results are blended; with one shared noise draw the spread stays S.

    Independent draws blended with weights w, 1 - w would leave sqrt(w^2 + (1 - w)^2) of
    the noise: 0.71 S at w = 1/2. The mean moves monotonically from MU_B to MU_A.
    """
    out = coherent(torch.zeros(2, 4, 64, 64), "euler_ancestral", steps=30)
    band = out[..., 32:37]
    outside_std = float(regions(out)[1].std())
    n = band[..., 0].numel()
    tol = 4 * S / math.sqrt(2 * (n - 1))  # 4 standard errors of one column's std (0.06 here; the shrink would be 0.15)
    for c in range(band.shape[-1]):
        assert abs(float(band[..., c].std()) - outside_std) < tol, (c, float(band[..., c].std()), outside_std)
    means = out.mean(dim=(0, 1, 2))
    assert (means[31:38].diff() > 0.2).all(), means[31:38]  # steps of 2/6 between w = 1 and w = 0


def test_blend_weight_is_the_mask_at_overlap_0_and_a_ramp_in_the_band():
    mask = left_half(8, 16)
    assert torch.equal(blend_weight(mask, torch.Size((1, 4, 8, 16)), 0)[0, 0], mask[0])
    w = blend_weight(mask, torch.Size((1, 4, 8, 16)), 6)[0, 0, 0]  # grows by 3 to the right
    assert w[:8].eq(1).all() and w[11:].eq(0).all()
    torch.testing.assert_close(w[8:11], torch.tensor([3 / 4, 2 / 4, 1 / 4]))


def test_multistep_state_carries_over_between_steps():
    """A restarted dpmpp_2m is Euler (its first-order step); in coherent mode it is second order."""
    latent = torch.zeros(1, 4, 16, 32)
    two_m, euler = coherent(latent, "dpmpp_2m", 10), coherent(latent, "euler", 10)
    assert (two_m - euler).abs().max() > 1e-2
    # ... and closer to the data's spread than Euler's at the same step count.
    inside_2m, inside_euler = regions(two_m)[0], regions(euler)[0]
    assert abs(float(inside_2m.std()) - S) < abs(float(inside_euler.std()) - S)


def test_partial_denoise_runs_the_last_steps_and_reports_two_calls_per_step():
    seen = []
    out = coherent(torch.full((1, 4, 16, 32), 0.3), "dpmpp_2m", 6, denoise=0.5, on_progress=lambda *a: seen.append(a))
    assert seen == [(i + 1, 12, "base" if i % 2 == 0 else "mask") for i in range(12)]
    assert torch.isfinite(out).all()


def test_should_stop_is_checked_before_each_call():
    calls = []
    with pytest.raises(SamplingStopped):
        coherent(torch.zeros(1, 4, 16, 16), "euler", 4, should_stop=lambda: len(calls) == 3 or calls.append(1))


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde"])
def test_a_batch_of_jobs_gives_each_job_its_own_result(name):
    """JobBatchRandomness (cross-job batching): each job's rows are what it gets alone."""
    latents = [torch.zeros(1, 4, 8, 16), torch.full((1, 4, 8, 16), 0.2)]
    alone = [coherent(latent, name, 5, seed=seed) for latent, seed in zip(latents, (3, 11))]
    batched = coherent(torch.cat(latents), name, 5, randomness=JobBatchRandomness.of([3, 11], [1, 1]))
    torch.testing.assert_close(batched, torch.cat(alone))


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"crop_margin": 4}, "crop_margin"),
        ({"mask_scheduler": "normal"}, "mask_sampler.scheduler"),
        ({"mask_name": "lcm"}, "mask_sampler.sampler_name"),
        ({"mask_name": "dpmpp_2m_sde", "scheduler": "normal"}, "mask_sampler.scheduler"),
        ({"mask_name": "dpmpp_3m_sde", "scheduler": "ddim_uniform"}, "mask_sampler.scheduler"),
    ],
)
def test_refusals_name_the_field(kw, field):
    with pytest.raises(InvalidInput) as info:
        coherent(torch.zeros(1, 4, 16, 16), "euler", 4, **kw)
    assert info.value.field == field


def test_a_job_document_is_refused_before_anything_loads():
    """The same rules when a job is parsed (submission, `maskfleet run`), naming the same field."""
    job = {
        "latent": "in.latent", "mask": "mask.png", "output": "out.latent", "mode": "coherent",
        "base_sampler": {"model": "m", "sampler_name": "euler", "scheduler": "normal", "positive": "p", "negative": "n"},
        "mask_sampler": {"model": "m", "sampler_name": "lcm", "scheduler": "normal", "positive": "p", "negative": "n"},
    }
    with pytest.raises(JobError, match=r"^mask_sampler\.sampler_name: 'lcm' is refused in coherent mode: .*consistency"):
        parse_job(job)
    job["mask_sampler"]["sampler_name"] = "dpmpp_2m_sde"
    with pytest.raises(JobError, match=r"^mask_sampler\.scheduler: refused in coherent mode: dpmpp_2m_sde on the 'normal'"):
        parse_job(job)
    job["base_sampler"]["scheduler"] = job["mask_sampler"]["scheduler"] = "karras"
    assert parse_job(job).mode == "coherent"
    assert parse_job({**job, "mode": "comfy", "mask_sampler": {**job["mask_sampler"], "sampler_name": "lcm"}}).mode == "comfy"


def test_samplers_with_different_schedules_use_the_base_one():
    """dpm_2 alone would drop the penultimate sigma; paired with euler it runs on euler's schedule."""
    out = coherent(torch.zeros(1, 4, 8, 16), "euler", 6, mask_name="dpm_2")
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(set(COHERENT_STEPS) - set(REFUSED_SAMPLERS)))
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_a_shared_model_runs_both_first_evaluations_of_a_step_in_one_forward(name, cfg):
    """Both samplers start each step at the same x and sigma: with one model object their
    first evaluations are one batch (twice the rows), so each step saves one forward, and
    the result is the one two separate forwards give."""
    latent, steps = torch.zeros(1, 4, 8, 16), 5

    def run(shared: bool):
        den_a = GaussianDenoiser(S)
        den_b = den_a if shared else GaussianDenoiser(S)
        base = AdvancedSampler(den_a, cfg, name, "karras", conditioning(MU_A), conditioning(0.0))
        inner = AdvancedSampler(den_b, cfg, name, "karras", conditioning(MU_B), conditioning(0.0))
        out = sample_two_samplers(latent, left_half(8, 16), base, inner, seed=3, steps=steps,
                                  overlap_factor=OVERLAP, mode="coherent")
        return out, den_a.calls + (den_b.calls if not shared else [])

    (together, calls_together), (apart, calls_apart) = run(True), run(False)
    torch.testing.assert_close(together, apart, rtol=1e-6, atol=1e-6)
    assert len(calls_together) == len(calls_apart) - steps
    rows = 1 if cfg == 1.0 else 2
    assert calls_together.count(2 * rows) == steps  # one paired forward per step
    assert sum(calls_together) == sum(calls_apart)  # no evaluation wasted or repeated
