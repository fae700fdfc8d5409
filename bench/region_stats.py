"""Region statistics of dual-sampler jobs on Gaussian data, for every sampler and scheduler, per mode.

The measurement of issue 8 (harness: tests/gaussian_regions.py, whose docstring derives the
expected values and the tolerances). Base conditioning mu_A = -1, mask conditioning
mu_B = +1, data std s = 0.5, mask = right half of a [seeds, 4, 8, 64] latent; denoise 1.0
(empty latent) and 0.5 (latent drawn from N(mu_A, s^2)), overlap 0 and 10. Per job: region
means and pooled per-pixel stds across seeds (A: left of the band, B: the mask), the
expected values, the seam's largest column-to-column jump relative to |mu_B - mu_A|
(1.0 = a hard edge), the sampler alone in region B's setting (its step function over the
whole step range, whole latent: `ref B`), and two verdicts with the failed checks (mA sA mB
sB: region mean/std; ovr: seam profile outside the two means; rev: seam profile turning
back): `exact` against the exact answer within the derived tolerance, `own` against the
sampler alone within the statistical tolerance (the loop's own error, whatever the
sampler's). The summary adds whether the sampler alone meets the exact answer (`alone`).

    python bench/region_stats.py [--modes comfy regional coherent] [--steps 20] [--seeds 32] [--samplers ...] [--schedulers ...]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from gaussian_regions import Setup, expected, failures, own_failures, reference_call, reference_failures, run_job, tolerances  # noqa: E402
from machine import cpu_model  # noqa: E402  (bench/machine.py)
from maskfleet.sampling import MODES, SAMPLERS, SCHEDULERS, InvalidInput  # noqa: E402

CODES = {"mean A": "mA", "std A": "sA", "mean B": "mB", "std B": "sB", "seam overshoot": "ovr", "seam reversal": "rev"}


def _codes(found: list[str]) -> str:
    codes = [code for prefix, code in CODES.items() if any(f.startswith(prefix) for f in found)]
    return "pass" if not found else "FAIL " + ",".join(codes)


def run_mode(mode: str, samplers: list[str], schedulers: list[str], steps: int, setup: Setup) -> list[dict]:
    rows = []
    header = f"{'sampler':<19}{'scheduler':<13}{'den':>4}{'ovl':>4}  {'mean A':>7}{'std A':>7}{'mean B':>7}{'std B':>7}  {'want A':>13}{'want B':>13}  {'jump':>5}  {'ref B':>12}  {'exact':<21}own"
    print(f"\n== mode {mode} ==\n{header}")
    for sampler in samplers:
        for scheduler in schedulers:
            for denoise in (1.0, 0.5):
                ref = reference_call(sampler, scheduler, denoise, steps, setup)
                exp = expected(sampler, scheduler, denoise, steps, setup)
                for overlap in (0, 10):
                    try:
                        stats = run_job(mode, sampler, scheduler, denoise, overlap, steps, setup)
                    except InvalidInput as refused:
                        rows.append(dict(sampler=sampler, scheduler=scheduler, denoise=denoise, overlap=overlap,
                                         refused=refused.field))
                        print(f"{sampler:<19}{scheduler:<13}{denoise:>4}{overlap:>4}  refused ({refused.field})")
                        continue
                    tol = tolerances(sampler, scheduler, denoise, steps, overlap, setup)
                    found = failures(stats, exp, tol)
                    own = own_failures(stats, ref, tol)
                    rows.append(dict(sampler=sampler, scheduler=scheduler, denoise=denoise, overlap=overlap,
                                     stats=stats, exp=exp, tol=tol, found=found, own=own,
                                     alone=reference_failures(ref, exp, tol)))
                    print(f"{sampler:<19}{scheduler:<13}{denoise:>4}{overlap:>4}  "
                          f"{stats.mean_a:>7.3f}{stats.std_a:>7.3f}{stats.mean_b:>7.3f}{stats.std_b:>7.3f}  "
                          f"{exp.mean_a:>6.3f}/{exp.std_a:.3f}{exp.mean_b:>7.3f}/{exp.std_b:.3f}  "
                          f"{stats.seam_jump(setup):>5.2f}  {ref.mean_b:>6.3f}/{ref.std_b:.3f}  {_codes(found):<21}{_codes(own)}", flush=True)
    return rows


def summary(mode: str, rows: list[dict], setup: Setup) -> None:
    """Per sampler, worst case over schedulers, denoise and overlap."""
    by_sampler = defaultdict(list)
    for row in rows:
        by_sampler[row["sampler"]].append(row)
    print(f"\n== summary, mode {mode}: worst case over schedulers, denoise 1.0/0.5, overlap 0/10 ==")
    print(f"{'sampler':<19}{'exact':>7}{'own':>7}{'alone':>7}  {'max|dmean| A':>12}{'max|dmean| B':>13}  {'std A range':>13}{'std B range':>13}{'jump ovl 10':>13}  failing checks (exact)")
    for sampler, all_rows in by_sampler.items():
        srows = [r for r in all_rows if "refused" not in r]
        refused = len(all_rows) - len(srows)
        if not srows:
            print(f"{sampler:<19}refused in this mode ({all_rows[0]['refused']})")
            continue
        passed = sum(not r["found"] for r in srows)
        own = sum(not r["own"] for r in srows)
        alone = sum(not r["alone"] for r in srows)
        dmean_a = max(abs(r["stats"].mean_a - r["exp"].mean_a) for r in srows)
        dmean_b = max(abs(r["stats"].mean_b - r["exp"].mean_b) for r in srows)
        std_a = [r["stats"].std_a for r in srows]
        std_b = [r["stats"].std_b for r in srows]
        jumps = [r["stats"].seam_jump(setup) for r in srows if r["overlap"] == 10] or [float("nan")]
        counts = defaultdict(int)
        for r in srows:
            for prefix, code in CODES.items():
                if any(f.startswith(prefix) for f in r["found"]):
                    counts[code] += 1
        checks = " ".join(f"{code}x{n}" for code, n in counts.items()) or "-"
        if refused:
            checks += f"; {refused} refused ({', '.join(sorted({r['scheduler'] for r in all_rows if 'refused' in r}))})"
        print(f"{sampler:<19}{passed:>4}/{len(srows):<2}{own:>4}/{len(srows):<2}{alone:>4}/{len(srows):<2}  {dmean_a:>12.3f}{dmean_b:>13.3f}  "
              f"{min(std_a):>6.3f}-{max(std_a):.3f}{min(std_b):>7.3f}-{max(std_b):.3f}{min(jumps):>8.2f}-{max(jumps):.2f}  {checks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=32)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    parser.add_argument("--schedulers", nargs="+", default=list(SCHEDULERS))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup = Setup(seeds=args.seeds)
    print(f"machine: {cpu_model()}, torch threads {torch.get_num_threads()}; steps {args.steps}, "
          f"latent [{setup.seeds}, {setup.channels}, {setup.height}, {setup.width}], mu_A {setup.mu_a}, mu_B {setup.mu_b}, s {setup.s}")
    for mode in args.modes:
        if mode not in MODES:
            print(f"\n== mode {mode}: skipped, not in maskfleet.sampling.MODES {MODES} ==")
            continue
        start = time.perf_counter()
        rows = run_mode(mode, args.samplers, args.schedulers, args.steps, setup)
        summary(mode, rows, setup)
        print(f"mode {mode}: {len(rows)} jobs in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
