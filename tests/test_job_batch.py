"""Cross-job batching in the engine: a batch of jobs gives each job what it gets alone.

Bitwise on CPU with the tiny golden UNet for `forward="per_job"` (each job's rows in a
forward of their own). `forward="fused"` (one forward over all rows) is bitwise with a
model whose rows do not depend on the batch size (the analytic denoiser), and with the
UNet when the jobs have equal latent batches (its timestep embedding is then computed at
one job's row count); with unequal batches it is not, because MKL's sgemm picks kernels
by row count (see sampling/job_batch.py), so that one test uses a tolerance.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from analytic_denoiser import GaussianDenoiser
from golden_jobs import TINY_UNET
from maskfleet.sampling import AdvancedSampler, InvalidInput, SamplingJob, SamplingParams, SamplingStopped, sample_job
from maskfleet.sampling.job_batch import batch_key, sample_job_batch
from maskfleet.sampling.noise_sources import JobBatchRandomness, JobRandomness
from maskfleet.model_dirs import load_unet_denoiser

SIZE = 8  # latent height and width
STEPS = 3
# (base, mask) sampler pairs covering every kind of randomness: none (euler), ancestral
# draws, ddim's inpaint noise (seed + 1), Brownian trees, and the recovery passes of the
# SDE samplers and uni_pc.
SAMPLER_PAIRS = [("euler_ancestral", "ddim"), ("dpmpp_2m_sde", "uni_pc"), ("dpmpp_sde", "euler")]


@pytest.fixture(scope="module")
def unet():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the worker runs it; two threads on a busy 2-core machine are ~20x slower
    yield load_unet_denoiser(TINY_UNET)
    torch.set_num_threads(threads)


def blob_mask(g: torch.Generator, res: int = 8 * SIZE) -> torch.Tensor:
    """A soft-edged disc at a random place and size, at 8x the latent's resolution."""
    cy, cx = torch.randint(res // 6, res - res // 6, (2,), generator=g).tolist()
    radius = float(torch.randint(res // 10, res // 3, (1,), generator=g))
    yy, xx = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    dist = ((yy - cy) ** 2 + (xx - cx) ** 2).float().sqrt()
    return (radius + 4 - dist).clamp(0, 4)[None] / 4


def make_jobs(den, n: int, names: tuple[str, str], width: int = 32, cfg=(7.0, 4.0), mode: str = "comfy") -> list[SamplingJob]:
    """n jobs differing in seed, latent, mask and conditioning; job 1 has a latent batch of 2
    with a batch-1 positive and a batch-2 negative (guidance repeats them to its rows).
    Coherent jobs run both samplers on karras (the mode wants one schedule)."""
    g = torch.Generator().manual_seed(100 + n)
    jobs = []
    for i in range(n):
        b = 2 if i == 1 else 1

        def cond(batch=1):
            return torch.randn(batch, 77, width, generator=g)

        jobs.append(SamplingJob.of(
            latent=torch.randn(b, 4, SIZE, SIZE, generator=g),
            mask=blob_mask(g),
            base=AdvancedSampler(den, cfg[0], names[0], "karras", cond(), cond(b)),
            mask_sampler=AdvancedSampler(den, cfg[1], names[1], "karras" if mode == "coherent" else "normal", cond(), cond()),
            seed=1000 * i + 7,
            steps=STEPS,
            overlap_factor=3,
            mode=mode,
        ))
    return jobs


def run_alone(job: SamplingJob) -> torch.Tensor:
    return sample_job(job)


def assert_bitwise(batched: list[torch.Tensor], jobs: list[SamplingJob]) -> None:
    assert len(batched) == len(jobs)
    for i, (out, job) in enumerate(zip(batched, jobs)):
        alone = run_alone(job)
        assert out.shape == job.latent.shape and out.dtype == job.latent.dtype
        assert torch.equal(out, alone), f"job {i}: max |diff| {(out - alone).abs().max():.3e}"


@pytest.mark.parametrize("names", SAMPLER_PAIRS, ids="+".join)
@pytest.mark.parametrize("n", [2, 3])
def test_per_job_forward_is_bitwise_the_unbatched_runs_with_the_unet(unet, names, n):
    jobs = make_jobs(unet, n, names)
    assert_bitwise(sample_job_batch(jobs, forward="per_job"), jobs)


@pytest.mark.parametrize("names", SAMPLER_PAIRS, ids="+".join)
@pytest.mark.parametrize("n", [2, 3])
def test_fused_forward_is_bitwise_with_a_batch_independent_model(names, n):
    jobs = make_jobs(GaussianDenoiser(), n, names, width=8)
    assert_bitwise(sample_job_batch(jobs, forward="fused"), jobs)


@pytest.mark.parametrize("names", SAMPLER_PAIRS, ids="+".join)
def test_fused_forward_is_bitwise_with_the_unet_when_the_jobs_have_equal_rows(unet, names):
    # The timestep embedding is computed at one job's row count (UNetDenoiser.timestep_rows).
    jobs = [job for job in make_jobs(unet, 4, names) if job.latent.shape[0] == 1]
    assert len(jobs) == 3
    assert_bitwise(sample_job_batch(jobs, forward="fused"), jobs)


@pytest.mark.parametrize("mode", ["coherent", "regional"])
@pytest.mark.parametrize("names", [("euler", "dpmpp_2m"), ("euler_ancestral", "dpmpp_2m_sde")], ids="+".join)
def test_other_modes_batch_bitwise_as_the_jobs_alone_with_the_unet(unet, names, mode):
    """Coherent mode's paired first evaluation (four row blocks per job) and regional mode's
    composites keep both forwards bitwise: per_job gives each job its blocks, fused (equal
    rows) computes the timestep rows at one job's count."""
    jobs = make_jobs(unet, 3, names, mode=mode)
    assert_bitwise(sample_job_batch(jobs, forward="per_job"), jobs)
    equal_rows = [job for job in make_jobs(unet, 4, names, mode=mode) if job.latent.shape[0] == 1]
    assert_bitwise(sample_job_batch(equal_rows, forward="fused"), equal_rows)


def test_fused_forward_with_the_unet_on_cpu_matches_to_float_rounding(unet):
    # NOT bitwise: the jobs' latent batches differ (1, 2, 1), so the timestep embedding runs
    # at the whole batch's row count, and MKL's sgemm rounds a row differently there.
    jobs = make_jobs(unet, 3, ("dpmpp_2m_sde", "euler_ancestral"))
    for out, job in zip(sample_job_batch(jobs, forward="fused"), jobs):
        alone = run_alone(job)
        assert ((out - alone).norm() / alone.norm()).item() < 1e-4


def test_timestep_rows_leaves_the_unet_as_it_was(unet):
    x, ctx, sigma = torch.randn(6, 4, SIZE, SIZE), torch.randn(6, 77, 32), torch.tensor(2.0)
    x[2:4], x[4:] = x[:2], x[:2]
    ctx[2:4], ctx[4:] = ctx[:2], ctx[:2]
    pair = unet.denoise(x[:2], sigma, ctx[:2])
    assert not torch.equal(unet.denoise(x, sigma, ctx)[:2], pair)  # the CPU kernels round by row count
    with unet.timestep_rows(2):
        shared = unet.denoise(x, sigma, ctx)
    assert all(torch.equal(shared[i:i + 2], pair) for i in (0, 2, 4))
    assert not torch.equal(unet.denoise(x, sigma, ctx)[:2], pair)  # the hooks are gone


def test_a_batch_of_one_is_bitwise_the_single_run_with_the_fused_forward(unet):
    jobs = make_jobs(unet, 2, ("euler_ancestral", "ddim"))[1:]  # the job with a latent batch of 2
    assert_bitwise(sample_job_batch(jobs), jobs)


def test_batch_randomness_draws_each_jobs_own_numbers():
    rows, seeds = [1, 2, 1], [5, 6, 2**64 - 1]
    batch = JobBatchRandomness.of(seeds, rows)
    alone = [JobRandomness(s) for s in seeds]
    shape = (sum(rows), 4, 3, 3)

    def each(draw):
        return torch.cat([draw(job, (r, 4, 3, 3)) for job, r in zip(alone, rows)])

    # Same order as a sampler call: start noise, ancestral draws continuing it, inpaint noise, more.
    assert torch.equal(batch.start_noise(shape), each(lambda j, s: j.start_noise(s)))
    assert torch.equal(batch.ancestral_noise(shape), each(lambda j, s: j.ancestral_noise(s)))
    assert torch.equal(batch.inpaint_noise(shape), each(lambda j, s: j.inpaint_noise(s)))
    assert torch.equal(batch.ancestral_noise(shape), each(lambda j, s: j.ancestral_noise(s)))
    like = torch.zeros(shape)
    lo, hi = torch.tensor(0.03), torch.tensor(14.6)
    tree = batch.brownian(like, lo, hi)
    trees = [j.brownian(block, lo, hi) for j, block in zip(alone, like.split(rows))]
    s, s_next = torch.tensor(3.0), torch.tensor(1.5)
    assert torch.equal(tree(s, s_next), torch.cat([t(s, s_next) for t in trees]))
    with pytest.raises(ValueError, match="rows"):
        batch.start_noise((5, 4, 3, 3))


def test_hooks_see_the_batch_as_one_job():
    jobs = make_jobs(GaussianDenoiser(), 3, ("euler", "euler"), width=8)
    seen = []
    sample_job_batch(jobs, on_progress=lambda done, total, which: seen.append((done, total, which)))
    assert seen == [(i + 1, 2 * STEPS, "base" if i % 2 == 0 else "mask") for i in range(2 * STEPS)]
    with pytest.raises(SamplingStopped):
        sample_job_batch(jobs, should_stop=lambda: len(seen) >= 2 * STEPS + 3,
                         on_progress=lambda *a: seen.append(a))
    assert len(seen) == 2 * STEPS + 3


def _changed(job: SamplingJob, **changes) -> SamplingJob:
    """`job` with tensors, samplers or params changed (params validated again)."""
    params = {k: changes.pop(k) for k in list(changes) if k in SamplingParams.model_fields}
    if params:
        changes["params"] = SamplingParams.checked(**{**job.params.model_dump(), **params})
    return dataclasses.replace(job, **changes)


def _sampler_changed(sampler: AdvancedSampler, **changes) -> AdvancedSampler:
    return dataclasses.replace(sampler, **changes)


@pytest.mark.parametrize("change, field", [
    (lambda j: _changed(j, steps=4), "steps"),
    (lambda j: _changed(j, denoise=0.5), "denoise"),
    (lambda j: _changed(j, overlap_factor=5), "overlap_factor"),
    (lambda j: _changed(j, latent=torch.zeros(1, 4, SIZE, 2 * SIZE)), "latent_shape"),
    (lambda j: _changed(j, latent=torch.zeros(1, 4, SIZE, SIZE, dtype=torch.float64)), "latent_dtype"),
    (lambda j: _changed(j, mask=torch.zeros(1, 4 * SIZE, 4 * SIZE)), "mask_shape"),
    (lambda j: _changed(j, base=_sampler_changed(j.base, sampler_name="heun")), "base.sampler_name"),
    (lambda j: _changed(j, base=_sampler_changed(j.base, scheduler="normal")), "base.scheduler"),
    (lambda j: _changed(j, mask_sampler=_sampler_changed(j.mask_sampler, cfg=5.0)), "mask_sampler.cfg"),
    (lambda j: _changed(j, base=_sampler_changed(j.base, denoiser=GaussianDenoiser())), "base.denoiser"),
    (lambda j: _changed(j, mask_sampler=_sampler_changed(j.mask_sampler, positive=torch.zeros(1, 5, 8))),
     "mask_sampler.positive.shape"),
])
def test_incompatible_items_are_refused_naming_item_and_field(change, field):
    jobs = make_jobs(GaussianDenoiser(), 3, ("euler", "euler"), width=8)
    jobs[2] = change(jobs[2])
    assert batch_key(jobs[0]) == batch_key(jobs[1]) != batch_key(jobs[2])
    with pytest.raises(InvalidInput) as err:
        sample_job_batch(jobs)
    assert err.value.field == "items[2]"
    assert err.value.reason.startswith(f"cannot be batched with items[0]: {field} is ")


@pytest.mark.parametrize("bad, field", [
    ({"mask": torch.zeros(3, 8 * SIZE, 8 * SIZE)}, "items[1].mask"),
    ({"latent": torch.full((1, 4, SIZE, SIZE), float("nan"))}, "items[1].latent"),
])
def test_a_bad_item_is_named(bad, field):
    jobs = make_jobs(GaussianDenoiser(), 2, ("euler", "euler"), width=8)
    jobs[1] = _changed(jobs[1], **bad)
    with pytest.raises(InvalidInput) as err:
        sample_job_batch(jobs)
    assert err.value.field == field
    with pytest.raises(InvalidInput, match="items"):
        sample_job_batch([])


def test_a_bad_seed_cannot_make_an_item():
    """Params are checked once, when the item is made (SamplingParams), not again by the batch."""
    jobs = make_jobs(GaussianDenoiser(), 2, ("euler", "euler"), width=8)
    with pytest.raises(InvalidInput) as err:
        _changed(jobs[1], seed=-1)
    assert err.value.field == "seed"


def test_a_cropped_job_runs_alone():
    jobs = make_jobs(GaussianDenoiser(), 2, ("euler", "euler"), width=8)
    jobs[1] = _changed(jobs[1], crop_margin=2)
    assert batch_key(jobs[1]) is None
    with pytest.raises(InvalidInput) as err:
        sample_job_batch(jobs)
    assert err.value.field == "items[1].crop_margin"
