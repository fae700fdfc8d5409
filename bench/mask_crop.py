"""What the masked-region crop (the job option `crop_margin`) saves, and how far it moves the result.

The job is the loop bench's (bench/loop_efficiency.py: its UNet with block_out_channels
(64, 128, 256) and seeded random weights, its seeded latent and conditionings; euler,
base cfg 7, mask cfg 4) with overlap_factor 10 and a centred disc mask covering 5%, 20%
and 50% of the latent. For each, the job runs full frame (crop_margin None) and cropped
(crop_margin --margin): the base sampler covers the whole latent either way, the mask
sampler only the crop box. Reported per coverage: the box; the UNet's input (rows x
pixels over all forwards, counted, so free of timing noise: the convolutions cost in
proportion to it, self-attention more than that); the sampling time of the whole job and
of the mask sampler's calls (timed between the loop's progress calls), full frame vs
crop; and the cropped result's difference from the full-frame one, max abs and RMS over
the mask, the overlap band (grown mask minus mask) and the rest, relative to the
full-frame output's standard deviation. A box that would cover the whole latent means no
crop: the job is then exactly the full-frame job and is not run twice.

The speedups are computed from the mask sampler's time over the base sampler's in the
same run (median over --repeats runs): the two samplers' calls alternate, so both see
the same machine, and the base sampler does the same full-frame work in both jobs, so
the ratio survives a shared machine's changing load, which whole-job times (also
printed, fastest of the runs) do not.

With random weights the model is no image prior, so the differences say how much the
model's output moves when it sees less context, not how visible that is in a picture.

    python bench/mask_crop.py [--steps 6] [--margin 8] [--size 64] [--repeats 2] [--threads N]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from loop_efficiency import build_unet, job_inputs  # bench/loop_efficiency.py (bench/ is on sys.path)
from machine import cpu_model
from maskfleet.sampling import AdvancedSampler, NoiseSchedule, sample_two_samplers
from maskfleet.sampling.masks import grow_mask
from maskfleet.sampling.region_crop import crop_box
from maskfleet.sampling.unet_denoiser import UNetDenoiser

COVERAGES = (0.05, 0.20, 0.50)
OVERLAP = 10


def disc_mask(size: int, coverage: float) -> torch.Tensor:
    """A [1, size, size] centred disc whose area is `coverage` of the latent (at latent resolution)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = math.sqrt(coverage * size**2 / math.pi)
    centre = (size - 1) / 2
    return ((((yy - centre) ** 2 + (xx - centre) ** 2) <= radius**2).float())[None]


class WorkCounter:
    """Counts UNet input rows x pixels: what a forward's convolutions cost in proportion to."""

    def __init__(self, unet):
        self.pixels = 0
        unet.register_forward_pre_hook(self._count)

    def _count(self, module, inputs):
        x = inputs[0]
        self.pixels += x.shape[0] * x.shape[-2] * x.shape[-1]


def timed_job(run, counter: WorkCounter) -> tuple[float, float, int, int, torch.Tensor]:
    """(total s, mask sampler s, total work, mask sampler work, output), each call measured
    from the previous progress call."""
    marks = []
    start, work0 = time.perf_counter(), counter.pixels
    out = run(lambda done, total, which: marks.append((time.perf_counter(), counter.pixels, which)))
    total_s, total_work = time.perf_counter() - start, counter.pixels - work0
    mask_s, mask_work, last, last_work = 0.0, 0, start, work0
    for t, work, which in marks:
        if which == "mask":
            mask_s += t - last
            mask_work += work - last_work
        last, last_work = t, work
    return total_s, mask_s, total_work, mask_work, out


def differences(full: torch.Tensor, cropped: torch.Tensor, mask: torch.Tensor, grown: torch.Tensor) -> dict[str, tuple[float, float]]:
    """(max abs, RMS) of cropped - full over mask, band and outside, relative to full.std()."""
    diff = (cropped - full)[0]  # [C, H, W]
    scale = float(full.std())
    inside, grown_b = mask[0] > 0.5, grown[0, 0] > 0.5
    regions = {"mask": inside, "band": grown_b & ~inside, "outside": ~grown_b}
    return {
        name: (float(diff[:, where].abs().max()) / scale, float(diff[:, where].pow(2).mean().sqrt()) / scale)
        for name, where in regions.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--margin", type=int, default=8, help="crop_margin, latent pixels of context around the grown mask")
    parser.add_argument("--size", type=int, default=64, help="latent height = width")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each job (median time ratio, fastest times)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    unet = build_unet()
    counter = WorkCounter(unet)
    denoiser = UNetDenoiser(unet, NoiseSchedule.from_config({}))
    _, latent, _, (pos_b, neg_b, pos_m, neg_m) = job_inputs(args.size)
    base = AdvancedSampler(denoiser, 7.0, "euler", "normal", pos_b, neg_b)
    masked = AdvancedSampler(denoiser, 4.0, "euler", "normal", pos_m, neg_m)

    def job(mask, margin, steps, hook=None):
        return sample_two_samplers(latent, mask, base, masked, seed=0, steps=steps, overlap_factor=OVERLAP,
                                   crop_margin=margin, on_progress=hook)

    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"job: euler, {args.steps} steps, latent {args.size}x{args.size}, batch 1, overlap {OVERLAP}, "
          f"crop_margin {args.margin}; centred disc masks; {args.repeats} run(s) of each")
    for coverage in COVERAGES:
        mask = disc_mask(args.size, coverage)
        grown = grow_mask(mask, args.size, args.size, OVERLAP)
        box = crop_box(grown, args.margin)
        covered = float(mask.mean())
        if box is None:
            print(f"\n{coverage:.0%} mask ({covered:.1%} of the latent): the box would cover the whole latent: "
                  f"no crop, the job is the full-frame job (speedup 1.00, difference 0)")
            continue
        share = box.height * box.width / args.size**2
        # Warm-up: one step of each, so first-call costs of either input shape are not timed.
        job(mask, None, 1)
        job(mask, args.margin, 1)
        runs = {"full": [], "crop": []}
        for _ in range(args.repeats):
            for name, margin in (("full", None), ("crop", args.margin)):
                runs[name].append(timed_job(lambda hook: job(mask, margin, args.steps, hook), counter))
        _, _, full_work, full_mask_work, full_out = runs["full"][0]
        _, _, crop_work, crop_mask_work, crop_out = runs["crop"][0]
        fastest = {name: min(runs[name], key=lambda r: r[0]) for name in runs}
        # Mask sampler time over base sampler time within one run: the calls alternate, so
        # both see the same machine, and the base sampler does the same work in both jobs.
        ratio = {name: statistics.median(r[1] / (r[0] - r[1]) for r in runs[name]) for name in runs}
        print(f"\n{coverage:.0%} mask ({covered:.1%} of the latent, grown {float(grown.mean()):.1%}): "
              f"box {box.height}x{box.width} at ({box.top}, {box.left}), {share:.0%} of the latent")
        print(f"  UNet input pixels, crop / full: job {crop_work / full_work:.3f}, mask sampler {crop_mask_work / full_mask_work:.3f}"
              " (convolutions cost in proportion, self-attention more)")
        for name in ("full", "crop"):
            total_s, mask_s = fastest[name][:2]
            print(f"  {name}: job {total_s:6.2f} s = base sampler {total_s - mask_s:6.2f} s + mask sampler {mask_s:6.2f} s;"
                  f" mask / base time {ratio[name]:.3f}")
        print(f"  speedup from the mask / base time ratios: mask sampler {ratio['full'] / ratio['crop']:.2f}x, "
              f"job {(1 + ratio['full']) / (1 + ratio['crop']):.2f}x "
              f"(from the fastest runs' times: {fastest['full'][0] / fastest['crop'][0]:.2f}x)")
        for name, (peak, rms) in differences(full_out, crop_out, mask, grown).items():
            print(f"  difference in {name:<8} max {peak:.4f}  RMS {rms:.4f}  (x full-frame std {float(full_out.std()):.3f})")


if __name__ == "__main__":
    main()
