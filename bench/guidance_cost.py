"""What classifier-free guidance costs: batched cond+uncond, cfg 1.0 skipping uncond, one model for both samplers.

(a) The same dual-sampler job (loop_efficiency.py's UNet and mask) with cfg 7 / 4 and with
    cfg 1.0 for both samplers: the UNet rows each makes (a forward hook counts batch rows)
    and the time ratio. cfg 1.0 needs no uncond pass, so it should cost about half.
(b) cond and uncond as one batched forward `unet(cat([x, x]))` vs two forwards of one row:
    what batching them saves on this machine.
(c) A job whose samplers name the same model (golden case c03 through JobPipeline): the
    model is loaded once and shared (the loaded-model cache's load count).
(d) Coherent mode with one model object for both samplers (their first evaluation of each
    step is one forward of four row blocks) vs the same UNet behind two denoiser objects
    (two forwards of two blocks): euler (one evaluation per step) and heun (two).

    python bench/guidance_cost.py [--steps 10] [--size 32] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from loop_efficiency import build_unet, job_inputs, timed  # bench/ is on sys.path for its scripts
from machine import cpu_model
from maskfleet.sampling import AdvancedSampler, NoiseSchedule, sample_two_samplers
from maskfleet.sampling.unet_denoiser import UNetDenoiser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job  # noqa: E402

from maskfleet.job import parse_job  # noqa: E402
from maskfleet.job_pipeline import JobPipeline, RunOptions  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=32, help="latent height = width")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    unet = build_unet()
    denoiser = UNetDenoiser(unet, NoiseSchedule.from_config({}))
    g, latent, mask, (pos_b, neg_b, pos_m, neg_m) = job_inputs(args.size)

    def job(cfg_base: float, cfg_mask: float):
        base = AdvancedSampler(denoiser, cfg_base, "euler", "normal", pos_b, neg_b)
        masked = AdvancedSampler(denoiser, cfg_mask, "euler", "normal", pos_m, neg_m)
        return lambda: sample_two_samplers(latent, mask, base, masked, seed=0, steps=args.steps, denoise=1.0,
                                           overlap_factor=3)

    rows: list[int] = []
    hook = unet.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
    guided, unguided = job(7.0, 4.0), job(1.0, 1.0)
    guided()
    guided_rows, rows[:] = sum(rows), []
    unguided()
    unguided_rows = sum(rows)
    hook.remove()

    x1, x2 = torch.randn(1, 4, args.size, args.size, generator=g), torch.randn(2, 4, args.size, args.size, generator=g)
    t1, t2 = torch.full((1,), 500.0), torch.full((2,), 500.0)
    context2 = torch.cat([pos_b, neg_b])

    def batched():
        with torch.no_grad():
            for _ in range(2 * args.steps):
                unet(x2, t2, encoder_hidden_states=context2)

    def separate():
        with torch.no_grad():
            for _ in range(2 * args.steps):
                unet(x1, t1, encoder_hidden_states=pos_b)
                unet(x1, t1, encoder_hidden_states=neg_b)

    def coherent(sampler: str, shared: bool):
        other = denoiser if shared else UNetDenoiser(unet, denoiser.schedule)
        base = AdvancedSampler(denoiser, 7.0, sampler, "karras", pos_b, neg_b)
        masked = AdvancedSampler(other, 4.0, sampler, "karras", pos_m, neg_m)
        return lambda: sample_two_samplers(latent, mask, base, masked, seed=0, steps=args.steps, denoise=1.0,
                                           overlap_factor=3, mode="coherent")

    pair_runs = {f"{s}-{how}": coherent(s, how == "shared") for s in ("euler", "heun") for how in ("shared", "apart")}
    diff = {s: float((pair_runs[f"{s}-shared"]() - pair_runs[f"{s}-apart"]()).abs().max()) for s in ("euler", "heun")}
    batched(), separate()  # warm-up
    runs = {"guided": guided, "unguided": unguided, "batched": batched, "separate": separate, **pair_runs}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn))
    med = {name: statistics.median(values) for name, values in times.items()}

    work = Path(tempfile.mkdtemp(prefix="guidance-"))
    job_path, _, _ = write_case_job(IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0", work / "case")
    runner = JobPipeline(RunOptions(str(make_models_dir(work)), "cpu"))
    spec = json.loads(job_path.read_text())
    assert spec["base_sampler"]["model"] == spec["mask_sampler"]["model"]
    runner.run(parse_job(spec))

    print(f"machine: {cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"euler, {args.steps} steps, latent {args.size}x{args.size}")
    print(f"(a) UNet rows: cfg 7/4 {guided_rows}, cfg 1.0 {unguided_rows} (ratio {unguided_rows / guided_rows:.2f}); "
          f"time {med['guided']:.3f} s vs {med['unguided']:.3f} s, cfg 1.0 / cfg 7: {med['unguided'] / med['guided']:.3f}")
    print(f"(b) cond+uncond batched {med['batched']:.3f} s vs two forwards {med['separate']:.3f} s: "
          f"batched / separate {med['batched'] / med['separate']:.3f}")
    print(f"(c) one model named by both samplers: loaded {runner.models.misses} time(s), "
          f"{runner.models.hits} cache hit(s) in the job")
    for s in ("euler", "heun"):
        shared, apart = med[f"{s}-shared"], med[f"{s}-apart"]
        print(f"(d) coherent {s}: first evaluations paired {shared:.3f} s vs apart {apart:.3f} s: "
              f"paired / apart {shared / apart:.3f}; outputs differ by at most {diff[s]:.1e}")


if __name__ == "__main__":
    main()
