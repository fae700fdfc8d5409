"""An SD1.5-shaped UNet on a GPU: steps/s, loop efficiency, peak memory and batched throughput.

The UNet has Stable Diffusion 1.5's architecture config (block_out_channels 320, 640,
1280, 1280; two layers per block; cross-attention width 768; 8 attention heads) with
seeded random weights (speed does not depend on the weights), at a 64x64 latent. For
each dtype (fp16, bf16), with and without channels_last and torch.compile, it runs:

- the job: one dual-sampler euler job (`sample_two_samplers`, --steps steps, base cfg 7.5,
  mask cfg 4, a circular mask over ~30% of the latent), which makes 2 x steps guided
  model evaluations;
- the floor: the same number of bare batched cond+uncond UNet forwards on inputs built
  beforehand (nothing of ours);
- batched throughput: 1, 2, 4, 8 such jobs as one batch (`sample_job_batch`, fused
  forward) vs one by one, in jobs/s.

Each figure is the median of --repeats runs after a warm-up, with the GPU synchronised
around every timing. It prints the card's name, steps/s (job steps per second), the
job/floor ratio (1.00: the loop is free), and peak GPU memory of the job.

    python bench/gpu_unet.py [--steps 20] [--repeats 3] [--batches 1 2 4 8]
    python bench/gpu_unet.py --smoke     # a tiny config on the CPU: checks the script runs, no figures
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from loop_efficiency import job_inputs  # bench/loop_efficiency.py
from machine import cpu_model  # bench/machine.py (scripts run with bench/ on sys.path)
from maskfleet.sampling import AdvancedSampler, NoiseSchedule, SamplingJob, sample_job
from maskfleet.sampling.job_batch import sample_job_batch
from maskfleet.sampling.unet_denoiser import UNetDenoiser

SD15 = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768, attention_head_dim=8)
SMOKE = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
             down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
             cross_attention_dim=768, attention_head_dim=8)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(config: dict, device: torch.device, dtype: torch.dtype, channels_last: bool, compiled: bool) -> UNetDenoiser:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval().requires_grad_(False).to(device=device, dtype=dtype)
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    denoiser = UNetDenoiser(unet, NoiseSchedule.from_config({}))
    if compiled:
        denoiser.unet = torch.compile(unet)
    return denoiser


def jobs_for(denoiser: UNetDenoiser, n: int, size: int, steps: int, device: torch.device) -> list[SamplingJob]:
    g, latent, mask, _ = job_inputs(size)
    jobs = []
    for i in range(n):
        conds = [torch.randn(1, 77, 768, generator=g).to(device) for _ in range(4)]
        jobs.append(SamplingJob.of(latent=(latent if i == 0 else torch.randn(latent.shape, generator=g)).to(device),
                             mask=mask.roll((i * size // 7, -i * size // 5), dims=(0, 1)),
                             base=AdvancedSampler(denoiser, 7.5, "euler", "normal", conds[0], conds[1]),
                             mask_sampler=AdvancedSampler(denoiser, 4.0, "euler", "normal", conds[2], conds[3]),
                             seed=i, steps=steps, overlap_factor=3))
    return jobs


def run_alone(job: SamplingJob) -> torch.Tensor:
    return sample_job(job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--smoke", action="store_true", help="tiny config on the CPU, fp32 only")
    args = parser.parse_args()

    if args.smoke:
        device, config, size, dtypes = torch.device("cpu"), SMOKE, 16, [torch.float32]
        variants = [(False, False)]
        args.steps, args.repeats, args.batches = 2, 1, [1, 2]
        print(f"SMOKE RUN on {cpu_model()}: not figures")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu_unet.py needs a CUDA device (or --smoke)")
        device, config, size, dtypes = torch.device("cuda"), SD15, 64, [torch.float16, torch.bfloat16]
        variants = list(itertools.product([False, True], [False, True]))  # (channels_last, compiled)
        print(f"card: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"SD1.5-shaped UNet (random weights), latent {size}x{size}, euler, {args.steps} steps, "
          f"{2 * args.steps} guided evaluations per job; median of {args.repeats}")
    for dtype, (channels_last, compiled) in itertools.product(dtypes, variants):
        denoiser = build(config, device, dtype, channels_last, compiled)
        [job] = jobs_for(denoiser, 1, size, args.steps, device)
        x2 = torch.randn(2, 4, size, size, device=device, dtype=dtype)
        t2 = torch.full((2,), 500.0, device=device)
        context = torch.cat([job.base.positive, job.base.negative]).to(dtype)

        def floor():
            with torch.no_grad():
                for _ in range(2 * args.steps):
                    denoiser.unet(x2, t2, encoder_hidden_states=context)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        job_s = median_time(lambda: run_alone(job), device, args.repeats)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
        floor_s = median_time(floor, device, args.repeats)
        name = f"{str(dtype).removeprefix('torch.')}{', channels_last' if channels_last else ''}{', compile' if compiled else ''}"
        print(f"[{name}] job {job_s * 1000:.1f} ms = {args.steps / job_s:.1f} steps/s; floor {floor_s * 1000:.1f} ms; "
              f"job/floor {job_s / floor_s:.3f}; peak GPU memory {peak:.0f} MiB")
        for n in args.batches:
            jobs = jobs_for(denoiser, n, size, args.steps, device)
            one_by_one = median_time(lambda: [run_alone(j) for j in jobs], device, args.repeats)
            batched = median_time(lambda: sample_job_batch(jobs, forward="fused"), device, args.repeats)
            alone = [run_alone(j) for j in jobs]
            diff = max((a - b).abs().max().item() for a, b in zip(alone, sample_job_batch(jobs, forward="fused")))
            print(f"    batch {n}: {n / one_by_one:.2f} jobs/s one by one, {n / batched:.2f} jobs/s batched "
                  f"(x{one_by_one / batched:.2f}); max |batched - alone| {diff:.2e}")
        del denoiser
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
