"""Cross-job batching in the engine: N jobs one by one vs as one batch (`sample_job_batch`).

The jobs are the loop bench's dual-sampler job (its UNet and seeded inputs, from
loop_efficiency.py) with a small latent and few steps; they differ in seed, latent, mask
centre and conditioning, so they share one batch key. For each N in --sizes the bench
times the N jobs run one after another, then as one batch with `forward="fused"` (one
model forward over all rows) and with `forward="per_job"` (each job's rows in their own
forward), and says whether each batch's outputs are bitwise those of the one-by-one runs.
Each timing is the median of --repeats runs after one warm-up of that N.

    python bench/job_batching.py [--size 32] [--steps 2] [--sizes 1 2 4 8] [--repeats 2] [--threads N] [--sampler euler_ancestral]
"""
from __future__ import annotations

import argparse
import statistics

import torch

from loop_efficiency import build_unet, job_inputs, timed  # bench/loop_efficiency.py
from machine import cpu_model  # bench/machine.py (scripts run with bench/ on sys.path)
from maskfleet.sampling import AdvancedSampler, NoiseSchedule, SamplingJob, sample_job
from maskfleet.sampling.job_batch import sample_job_batch
from maskfleet.sampling.unet_denoiser import UNetDenoiser


def make_jobs(denoiser: UNetDenoiser, n: int, size: int, steps: int, sampler: str) -> list[SamplingJob]:
    """n variants of the loop bench's job: seeds 0..n-1, fresh latents and conditionings,
    the mask rolled to another centre for each."""
    g, latent, mask, _ = job_inputs(size)
    jobs = []
    for i in range(n):
        conds = [torch.randn(1, 77, 64, generator=g) for _ in range(4)]
        jobs.append(SamplingJob.of(
            latent=latent if i == 0 else torch.randn(latent.shape, generator=g),
            mask=mask.roll((i * size // 7, -i * size // 5), dims=(0, 1)),
            base=AdvancedSampler(denoiser, 7.0, sampler, "normal", conds[0], conds[1]),
            mask_sampler=AdvancedSampler(denoiser, 4.0, sampler, "normal", conds[2], conds[3]),
            seed=i,
            steps=steps,
            overlap_factor=3,
        ))
    return jobs


def run_alone(job: SamplingJob) -> torch.Tensor:
    return sample_job(job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 8], help="batch sizes (jobs per batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--sampler", default="euler_ancestral")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    denoiser = UNetDenoiser(build_unet(), NoiseSchedule.from_config({}))
    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"jobs:    {args.sampler} (both samplers), {args.steps} steps, latent {args.size}x{args.size}, "
          f"batch 1 each, cfg 7 / 4; median of {args.repeats} runs")
    print(f"{'N':>2}  {'one by one':>12}  {'fused':>12}  {'ratio':>5}  {'bitwise':>7}  {'per_job':>12}  {'ratio':>5}  {'bitwise':>7}")
    for n in args.sizes:
        jobs = make_jobs(denoiser, n, args.size, args.steps, args.sampler)
        alone = [run_alone(job) for job in jobs]  # also the warm-up
        fused = sample_job_batch(jobs, forward="fused")
        per_job = sample_job_batch(jobs, forward="per_job")
        times = {"alone": [], "fused": [], "per_job": []}
        for _ in range(args.repeats):
            times["alone"].append(timed(lambda: [run_alone(job) for job in jobs]))
            times["fused"].append(timed(lambda: sample_job_batch(jobs, forward="fused")))
            times["per_job"].append(timed(lambda: sample_job_batch(jobs, forward="per_job")))
        rate = {k: n / statistics.median(v) for k, v in times.items()}

        def same(outs):
            return "yes" if all(torch.equal(a, b) for a, b in zip(outs, alone)) else "no"

        print(f"{n:>2}  {rate['alone']:>7.3f} jobs/s  {rate['fused']:>7.3f} jobs/s  {rate['fused'] / rate['alone']:>5.2f}  "
              f"{same(fused):>7}  {rate['per_job']:>7.3f} jobs/s  {rate['per_job'] / rate['alone']:>5.2f}  {same(per_job):>7}")


if __name__ == "__main__":
    main()
