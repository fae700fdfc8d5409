"""The warm worker's gap: from the end of one job to the first model call of the next.

A GPU is idle between two queued jobs while Celery hands over the next message and the
job reads its inputs; the target is under 5 ms at the median with a local S3 server.
This measures it: one warm worker (`-P prefork -c 1`, one torch thread) on an empty DB
of the machine's Redis, moto's S3 server holding the model store and every input and
output (bench/s3_setup.py), --jobs jobs of golden case c03 submitted at once so each
waits in the queue behind the previous one. Each result carries wall-clock timestamps
taken in the worker (`started`, `sampling` = first model call, `finished` = output
written); for consecutive jobs:

    gap      = next.sampling - previous.finished   (what the GPU waits)
    handoff  = next.started  - previous.finished   (Celery: result stored, ack, next message)
    prepare  = next.sampling - next.started        (inputs read from S3, models looked up)

It runs twice in one go: first the baseline (MASKFLEET_PREFETCH_JOBS=0: the next message
is fetched and its inputs read after the previous job ends), then with
MASKFLEET_PREFETCH_JOBS=1 (the next job is held while the previous one runs and its
inputs are read ahead, tasks/input_prefetch.py), and prints the ratio of the medians.

    python bench/warm_gap.py [--jobs 30] [--steps 2]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from s3_setup import CASE, start_local_s3  # first: it puts tests/ on sys.path (bench/ is there already)
from fleet_workers import Worker, claim_db_url, flush  # noqa: E402,I001
from machine import cpu_model

from maskfleet.client import _app, submit
from maskfleet.tasks.settings import model_queue

WAIT_S = 300.0


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_jobs(url: str, s3, tmp: Path, jobs: int, prefetch: int) -> list[dict]:
    """Timestamps of `jobs` queued jobs run by one warm worker reserving `prefetch` jobs ahead."""
    stamp = time.time_ns()

    def job(i: int) -> dict:
        return dict(s3.template, job_id=f"gap-{stamp}-{i}", output=f"s3://{s3.bucket}/out/{stamp}-{i}.latent")

    worker = Worker(f"gap{prefetch}", [model_queue("tiny")], url, s3.models, tmp / f"worker{prefetch}.log",
                    {"MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_MODEL_CACHE": str(tmp / "cache"),
                     "MASKFLEET_METRICS_PORT": "0", "MASKFLEET_PREFETCH_JOBS": str(prefetch)})
    try:
        worker.wait_ready(_app(url))
        submit(job(-1), broker_url=url).wait(WAIT_S)  # model fetched and loaded: the worker is warm
        handles = [submit(job(i), broker_url=url) for i in range(jobs)]
        return sorted((h.wait(WAIT_S)["timestamps"] for h in handles), key=lambda t: t["finished"])
    finally:
        worker.stop()


def gaps(stamps: list[dict]) -> dict[str, list[float]]:
    pairs = list(zip(stamps, stamps[1:]))
    return {"gap (GPU idle)": [(n["sampling"] - p["finished"]) * 1000 for p, n in pairs],
            "  handoff (Celery)": [(n["started"] - p["finished"]) * 1000 for p, n in pairs],
            "  prepare (inputs)": [(n["sampling"] - n["started"]) * 1000 for _, n in pairs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="warm-gap-"))
    url, s3 = None, None
    runs = {}
    try:
        url = claim_db_url()
        s3 = start_local_s3(tmp, args.steps)
        for prefetch in (0, 1):
            runs[prefetch] = run_jobs(url, s3, tmp, args.jobs, prefetch)
    finally:
        if s3 is not None:
            s3.server.stop()
        if url is not None:
            flush(url)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"machine: {cpu_model()}; one warm CPU worker, 1 torch thread; job {CASE.name}, latent 1x4x32x32, "
          f"{args.steps} steps, inputs/model/outputs on moto S3; {args.jobs - 1} gaps between {args.jobs} queued jobs")
    medians = {}
    for prefetch, stamps in runs.items():
        label = "MASKFLEET_PREFETCH_JOBS=1 (inputs read ahead)" if prefetch else "MASKFLEET_PREFETCH_JOBS=0 (baseline)"
        print(label)
        for name, values in gaps(stamps).items():
            print(f"  {name:<20} median {statistics.median(values):7.1f} ms   p90 {quantile(values, 0.9):7.1f} ms")
        medians[prefetch] = statistics.median(gaps(stamps)["gap (GPU idle)"])
        sampling = statistics.median((t["finished"] - t["sampling"]) * 1000 for t in stamps)
        print(f"  job sampling + write, median {sampling:.1f} ms; gap / (gap + job) = "
              f"{medians[prefetch] / (medians[prefetch] + sampling):.3f}")
    print(f"gap with prefetch / baseline = {medians[1] / medians[0]:.3f}; target gap < 5 ms: "
          f"{'met' if medians[1] < 5 else 'NOT met'}")


if __name__ == "__main__":
    main()
