"""How much the two-sampler loop costs on top of the model it drives.

The job is a dual-sampler masked job (`sample_two_samplers`: base cfg 7, mask cfg 4, a
circular mask over ~30% of the latent, overlap 3, batch 1). The floor is the same number
of bare classifier-free-guidance UNet forwards, `unet(cat([x, x]), t, cat([pos, neg]))`
under no_grad with inputs built beforehand: the model alone, nothing of ours. For euler
the job makes exactly 2 * steps model evaluations (one per sampler per step), so
job / floor is the loop's overhead factor; 1.00 means the loop is free.

The model is a small SD-shaped diffusers UNet with seeded random weights (speed does not
depend on the weights). Job and floor alternate, each after one warm-up, and the median
of --repeats runs is reported, so both are measured under the same conditions.

    python bench/loop_efficiency.py [--steps 20] [--size 64] [--repeats 3] [--threads N] [--sampler euler]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from maskfleet.sampling import AdvancedSampler, NoiseSchedule, sample_two_samplers
from maskfleet.sampling.unet_denoiser import UNetDenoiser
from machine import cpu_model  # bench/machine.py (scripts run with bench/ on sys.path)




def build_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 256),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.eval().requires_grad_(False)


def job_inputs(size: int) -> tuple[torch.Generator, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The bench job's seeded inputs: the generator (for more draws), a 1x4xSxS latent, a
    circular mask over ~30% of it, and base/mask positive/negative conditionings [1, 77, 64]."""
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, size, size, generator=g)
    conds = [torch.randn(1, 77, 64, generator=g) for _ in range(4)]
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = math.sqrt(0.3 * size**2 / math.pi)
    centre = (size - 1) / 2
    mask = (((yy - centre) ** 2 + (xx - centre) ** 2) <= radius**2).float()
    return g, latent, mask, conds


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64, help="latent height = width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--sampler", default="euler")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    unet = build_unet()
    denoiser = UNetDenoiser(unet, NoiseSchedule.from_config({}))
    g, latent, mask, (pos_b, neg_b, pos_m, neg_m) = job_inputs(args.size)
    base = AdvancedSampler(denoiser, 7.0, args.sampler, "normal", pos_b, neg_b)
    masked = AdvancedSampler(denoiser, 4.0, args.sampler, "normal", pos_m, neg_m)

    def job():
        return sample_two_samplers(latent, mask, base, masked, seed=0, steps=args.steps, denoise=1.0, overlap_factor=3)

    evals = 2 * args.steps
    x2 = torch.randn(2, 4, args.size, args.size, generator=g)
    t2 = torch.full((2,), 500.0)
    context = torch.cat([pos_b, neg_b])

    def floor():
        with torch.no_grad():
            for _ in range(evals):
                unet(x2, t2, encoder_hidden_states=context)

    # Warm-up job, counting the UNet forwards it makes (the hook is removed before timing).
    calls = []
    hook = unet.register_forward_pre_hook(lambda module, inputs: calls.append(1))
    job()
    hook.remove()
    floor()

    job_s, floor_s = [], []
    for _ in range(args.repeats):
        job_s.append(timed(job))
        floor_s.append(timed(floor))
    job_med, floor_med = statistics.median(job_s), statistics.median(floor_s)

    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"job:   {args.sampler}, {args.steps} steps, latent {args.size}x{args.size}, batch 1")
    print(f"UNet evaluations in the job: {len(calls)} (floor: 2 * steps = {evals})")
    print(f"job    {job_med:.3f} s   (runs: {', '.join(f'{s:.3f}' for s in job_s)})")
    print(f"floor  {floor_med:.3f} s   (runs: {', '.join(f'{s:.3f}' for s in floor_s)})")
    print(f"ratio job/floor: {job_med / floor_med:.3f}")


if __name__ == "__main__":
    main()
