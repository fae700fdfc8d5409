"""Mode "regional" rule by rule, with the analytic denoiser (sampling/regional_loop.py).

The golden cases check the whole against the node's own output (test_golden_cases.py);
these pin the rules a change could break without a golden case noticing first: the
base-only first step, the soft band that belongs to neither region, the growth counted in
mask pixels in the right orientation, progress, and cross-job batching.
"""
from __future__ import annotations

import math

import pytest
import torch

from analytic_denoiser import GaussianDenoiser, conditioning
from maskfleet.sampling import AdvancedSampler, InvalidInput, SamplingStopped, sample_two_samplers
from maskfleet.sampling.hooks import job_step
from maskfleet.sampling.noise_sources import JobBatchRandomness, JobRandomness
from maskfleet.sampling.regional_loop import regional_regions
from maskfleet.sampling.schedulers import schedule_for

S, MU_A, MU_B = 0.5, 1.0, -1.0


def samplers(name: str = "euler", base_den=None, mask_den=None):
    base = AdvancedSampler(base_den or GaussianDenoiser(S), 1.0, name, "karras", conditioning(MU_A), conditioning(0.0))
    inner = AdvancedSampler(mask_den or GaussianDenoiser(S), 1.0, name, "karras", conditioning(MU_B), conditioning(0.0))
    return base, inner


def regional(latent, mask, name="euler", steps=4, seed=7, overlap=0, base_den=None, mask_den=None, **kw):
    base, inner = samplers(name, base_den, mask_den)
    return sample_two_samplers(latent, mask, base, inner, seed=seed, steps=steps, overlap_factor=overlap,
                               mode="regional", **kw)


def left_half(h: int, w: int) -> torch.Tensor:
    mask = torch.zeros(1, h, w)
    mask[..., : w // 2] = 1.0
    return mask


def test_one_step_is_the_base_sampler_alone_over_the_whole_latent():
    latent = torch.full((1, 4, 8, 8), 0.3)
    mask_den = GaussianDenoiser(S)
    out = regional(latent, left_half(8, 8), steps=1, mask_den=mask_den)
    assert mask_den.calls == []  # the mask sampler never runs
    assert torch.equal(out, regional(latent, torch.zeros(1, 8, 8), steps=1))  # the mask does not matter


def test_the_soft_band_below_one_half_keeps_the_first_steps_value():
    """Mask values in (0, 0.5) are outside the base region (mask == 0) and round to 0 in the
    grown one: those pixels keep the base-only first step's value to the end."""
    h, w, steps, seed = 8, 16, 4, 7
    mask = torch.zeros(1, h, w)
    mask[..., :6] = 1.0
    mask[..., 6:8] = 0.25  # the band, at the latent's resolution so no resize blends it
    latent = torch.full((1, 4, h, w), 0.3)
    out = regional(latent, mask, steps=steps, seed=seed)

    # The first step by hand: noise added at sigma_0 (full denoise), one euler step towards MU_A.
    den = GaussianDenoiser(S)
    sigmas = schedule_for(den.schedule, "euler", "karras", steps)
    s0, s1 = sigmas[0], sigmas[1]
    x = latent + JobRandomness(seed).start_noise(latent.shape) * math.sqrt(1.0 + float(s0) ** 2)
    first = x + (x - den.denoise(x, s0, conditioning(MU_A))) / s0 * (s1 - s0)
    torch.testing.assert_close(out[..., 6:8], first[..., 6:8])
    # Elsewhere the loop went on to sigma 0: far from the first step's noisy values.
    assert (out[..., :6] - first[..., :6]).abs().mean() > 1.0
    assert (out[..., 8:] - first[..., 8:]).abs().mean() > 1.0


def test_the_mask_grows_by_overlap_factor_mask_pixels_in_both_directions():
    """A non-square mask at 8x the latent grows by the same number of mask pixels across and
    down (the node swaps height and width here, which stretches one and squashes the other)."""
    mask = torch.zeros(1, 64, 128)  # latent 8 x 16
    mask[:, 24:40, 48:80] = 1.0  # latent rows 3..4, columns 6..9
    _, grown = regional_regions(mask, torch.Size((1, 4, 8, 16)), 33)  # 16 mask pixels = 2 latent pixels each way
    rows = (grown.inside[0, 0] > 0).any(dim=1).nonzero().flatten().tolist()
    cols = (grown.inside[0, 0] > 0).any(dim=0).nonzero().flatten().tolist()
    assert rows == list(range(1, 7)) and cols == list(range(4, 12))
    base, _ = regional_regions(mask, torch.Size((1, 4, 8, 16)), 33)
    assert torch.equal(base.inside[0, 0], (mask[0, 3::8, 3::8] == 0).float())  # 1 only where the mask is 0


def test_overlap_is_checked_against_the_mask_not_the_latent():
    latent, mask = torch.zeros(1, 4, 8, 8), left_half(64, 64)
    assert torch.isfinite(regional(latent, mask, steps=2, overlap=40)).all()  # past the latent, within the mask
    with pytest.raises(InvalidInput) as e:
        regional(latent, mask, steps=2, overlap=65)
    assert e.value.field == "overlap_factor" and "64x64 mask" in str(e.value)


def test_crop_margin_is_refused():
    with pytest.raises(InvalidInput) as e:
        regional(torch.zeros(1, 4, 8, 8), left_half(8, 8), crop_margin=2)
    assert e.value.field == "crop_margin"


def test_progress_counts_the_base_only_step_as_a_whole_step():
    seen = []
    regional(torch.zeros(1, 4, 8, 8), left_half(8, 8), steps=3, denoise=0.5, on_progress=lambda *a: seen.append(a))
    assert seen == [(2, 6, "base"), (3, 6, "base"), (4, 6, "mask"), (5, 6, "base"), (6, 6, "mask")]
    assert [job_step(done, total) for done, total, _ in seen] == [(1, 3), (2, 3), (2, 3), (3, 3), (3, 3)]


def test_should_stop_is_checked_before_each_call():
    calls = []
    with pytest.raises(SamplingStopped):
        regional(torch.zeros(1, 4, 8, 8), left_half(8, 8), should_stop=lambda: len(calls) == 2 or calls.append(1))
    assert len(calls) == 2


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "uni_pc"])
def test_a_batch_of_jobs_gives_each_job_its_own_result(name):
    """JobBatchRandomness (cross-job batching): each job's rows are what it gets alone."""
    latents = [torch.zeros(1, 4, 8, 16), torch.full((1, 4, 8, 16), 0.2)]
    masks = [left_half(8, 16), 1.0 - left_half(8, 16)]
    alone = [regional(latent, mask, name, seed=seed) for latent, mask, seed in zip(latents, masks, (3, 11))]
    batched = regional(torch.cat(latents), torch.cat(masks), name, randomness=JobBatchRandomness.of([3, 11], [1, 1]))
    torch.testing.assert_close(batched, torch.cat(alone), rtol=0, atol=0)
