"""The loop's contract beyond ComfyUI parity: every sampler and scheduler runs, hooks, batches, determinism."""
from __future__ import annotations

import pytest
import torch

from analytic_denoiser import GaussianDenoiser, conditioning
from maskfleet.sampling import SAMPLERS, SCHEDULERS, AdvancedSampler, InvalidInput, SamplingStopped, sample_two_samplers
from maskfleet.sampling.unet_denoiser import UNetDenoiser
from maskfleet.sampling.noise_schedule import NoiseSchedule


def circle_mask(h: int, w: int, radius: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < radius**2).float()[None]


def samplers_for(den, base_name="euler", mask_name="euler", scheduler="normal", cfg=(7.0, 4.0)):
    base = AdvancedSampler(den, cfg[0], base_name, scheduler, conditioning(1.0), conditioning(0.0))
    inner = AdvancedSampler(den, cfg[1], mask_name, scheduler, conditioning(-1.0), conditioning(0.0))
    return base, inner


def run(den=None, latent=None, mask=None, **kw):
    den = den or GaussianDenoiser()
    latent = torch.zeros(1, 4, 16, 16) if latent is None else latent
    mask = circle_mask(128, 128, 40) if mask is None else mask
    names = {k: kw.pop(k) for k in ("base_name", "mask_name", "scheduler", "cfg") if k in kw}
    base, inner = samplers_for(den, **names)
    return sample_two_samplers(latent, mask, base, inner, **{"seed": 3, "steps": 6, "overlap_factor": 3, **kw})


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_gives_a_finite_latent_of_the_input_shape(sampler):
    out = run(base_name=sampler, mask_name=sampler)
    assert out.shape == (1, 4, 16, 16)
    assert torch.isfinite(out).all()
    # Away from the seam the base region is pulled towards mu = 1 (cfg 7 around mu_neg = 0 -> 7).
    assert out[0, :, 0, 0].mean() > 0.5


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("denoise", [1.0, 0.5])
def test_every_scheduler_runs_at_full_and_partial_denoise(scheduler, denoise):
    out = run(scheduler=scheduler, denoise=denoise, latent=torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert torch.isfinite(out).all()


def test_progress_hook_sees_every_call_in_order():
    seen = []
    run(steps=5, on_progress=lambda done, total, which: seen.append((done, total, which)))
    assert seen == [(i + 1, 10, "base" if i % 2 == 0 else "mask") for i in range(10)]


def test_partial_denoise_runs_only_the_last_steps():
    seen = []
    run(steps=6, denoise=0.3, on_progress=lambda done, total, which: seen.append(done))
    assert seen == list(range(1, 13))  # 6 steps of a 20-step schedule, two calls each


def test_stop_hook_stops_between_calls():
    calls = []

    def should_stop():
        return len(calls) >= 3

    with pytest.raises(SamplingStopped):
        run(on_progress=lambda *a: calls.append(a), should_stop=should_stop)
    assert len(calls) == 3


def test_cfg_batches_cond_and_uncond_and_cfg_one_skips_uncond():
    den = GaussianDenoiser()
    run(den=den, cfg=(7.0, 1.0), steps=4)
    # euler: one evaluation per call; base (cfg 7) batches 2, mask (cfg 1) runs cond only.
    assert den.calls == [2, 1] * 4


def test_batch_element_zero_equals_the_single_latent_run():
    latent = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    # One noise draw for the whole batch, so element 0 gets the single latent's noise.
    both = run(latent=latent, base_name="dpmpp_2m", mask_name="heun")
    single = run(latent=latent[:1], base_name="dpmpp_2m", mask_name="heun")
    assert torch.equal(both[:1], single)
    assert not torch.equal(both[1:], single)


def test_mask_batch_must_be_one_or_the_latent_batch():
    with pytest.raises(InvalidInput, match="mask"):
        run(latent=torch.zeros(2, 4, 16, 16), mask=torch.zeros(3, 64, 64))
    out = run(latent=torch.zeros(2, 4, 16, 16), mask=torch.zeros(2, 64, 64))
    assert out.shape[0] == 2


def test_same_job_twice_is_bitwise_identical():
    for name in ("euler_ancestral", "dpmpp_2m_sde", "ddim", "dpmpp_sde"):
        a = run(base_name=name, mask_name=name, latent=torch.ones(1, 4, 16, 16))
        b = run(base_name=name, mask_name=name, latent=torch.ones(1, 4, 16, 16))
        assert torch.equal(a, b), name


def test_engine_leaves_torch_global_rng_alone():
    before = torch.get_rng_state()
    run(base_name="euler_ancestral", mask_name="lcm")
    assert torch.equal(before, torch.get_rng_state())


def test_non_square_latent_keeps_its_shape_and_the_mask_region_its_orientation():
    # A wide mask band across the top of a 8x24 latent: the mask region must stay at the top.
    mask = torch.zeros(1, 64, 192)
    mask[:, :16, :] = 1.0
    den = GaussianDenoiser(s=0.01)
    out = run(den=den, latent=torch.zeros(1, 4, 8, 24), mask=mask, overlap_factor=0, cfg=(1.0, 1.0), steps=8)
    assert out.shape == (1, 4, 8, 24)
    assert out[0, :, 0, :].mean() < -0.5  # mask sampler (mu = -1) at the top rows
    assert out[0, :, -1, :].mean() > 0.5  # base sampler (mu = +1) at the bottom rows


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"steps": 0}, "steps"),
        ({"denoise": 0.0}, "denoise"),
        ({"denoise": 1.5}, "denoise"),
        ({"overlap_factor": -1}, "overlap_factor"),
        ({"seed": -1}, "seed"),
        ({"mode": "fast"}, "mode"),
        ({"base_name": "euler_x"}, "base_sampler.sampler_name"),
        ({"scheduler": "linear"}, "base_sampler.scheduler"),
        ({"latent": torch.full((1, 4, 8, 8), float("nan"))}, "latent"),
        ({"latent": torch.zeros(4, 8, 8)}, "latent"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(InvalidInput) as err:
        run(**kwargs)
    assert err.value.field == field


class _ZeroUNet(torch.nn.Module):
    """Predicts 0 for everything: isolates the eps / v conversion of UNetDenoiser."""

    config = type("Config", (), {"addition_embed_type": None})()
    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, t, encoder_hidden_states):
        return type("Out", (), {"sample": torch.zeros_like(x)})()


@pytest.mark.parametrize("prediction, expected", [("epsilon", lambda x, s: x), ("v_prediction", lambda x, s: x / (s**2 + 1))])
def test_unet_denoiser_prediction_types(prediction, expected):
    schedule = NoiseSchedule.from_config({"prediction_type": prediction})
    den = UNetDenoiser(_ZeroUNet(), schedule)
    x = torch.randn(1, 4, 8, 8)
    sigma = torch.tensor(2.0)
    assert torch.allclose(den.denoise(x, sigma, torch.zeros(1, 77, 8)), expected(x, sigma))
