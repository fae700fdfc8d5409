"""The warm worker's gap: how long the model waits between the end of one job's sampling and the next.

A GPU is idle between two queued jobs while the first writes its output, Celery hands
over the next message and the next job reads its inputs; the target is under 5 ms at
the median with a local S3 server. This measures it: one warm worker (one torch
thread) on an empty DB of the machine's Redis, moto's S3 server holding the model store
and every input and output (bench/s3_setup.py), --jobs jobs of golden case c03 submitted
at once so each waits in the queue behind the previous one. Each result carries
wall-clock timestamps taken in the worker (`started`, `sampling` = first model call,
`sampled` = last model call done, `finished` = output written); for consecutive jobs:

    idle     = next.sampling - previous.sampled    (what the GPU waits)
    write    = previous.finished - previous.sampled
    handoff  = next.started  - previous.finished   (Celery: result stored, ack, next message)
    prepare  = next.sampling - next.started        (inputs read, models looked up)

(the last three add up to `idle` for a prefork worker, which does them one after another).
One run measures three workers on the same jobs: the prefork baseline, prefork with
MASKFLEET_PREFETCH_JOBS=1 (the next job held, its inputs read ahead while the previous
one samples: tasks/input_prefetch.py), and the pipelined worker (MASKFLEET_PIPELINE=1:
job threads around one model lane, tasks/pipelined_worker.py); it prints each one's
idle time and its ratio to the baseline.

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


MODES = {
    "prefork (baseline)": {},
    "prefork, MASKFLEET_PREFETCH_JOBS=1": {"MASKFLEET_PREFETCH_JOBS": "1"},
    "pipelined, MASKFLEET_PIPELINE=1": {"MASKFLEET_PIPELINE": "1"},
}


def run_jobs(url: str, s3, tmp: Path, jobs: int, name: str, env: dict) -> list[dict]:
    """Results of `jobs` queued jobs run by one warm worker with `env`, in the order they sampled."""
    stamp = time.time_ns()

    def job(i: int) -> dict:
        return dict(s3.template, job_id=f"gap-{stamp}-{i}", output=f"s3://{s3.bucket}/out/{stamp}-{i}.latent")

    worker = Worker(name, [model_queue("tiny")], url, s3.models, tmp / f"{name}.log",
                    {"MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_MODEL_CACHE": str(tmp / "cache"),
                     "MASKFLEET_METRICS_PORT": "0", **env})
    try:
        worker.wait_ready(_app(url))
        submit(job(-1), broker_url=url).wait(WAIT_S)  # model fetched and loaded: the worker is warm
        handles = [submit(job(i), broker_url=url) for i in range(jobs)]
        return sorted((h.wait(WAIT_S) for h in handles), key=lambda r: r["timestamps"]["sampling"])
    finally:
        worker.stop()


def spans(results: list[dict]) -> dict[str, list[float]]:
    stamps = [r["timestamps"] for r in results]
    pairs = list(zip(stamps, stamps[1:]))
    return {"idle (model waits)": [(n["sampling"] - p["sampled"]) * 1000 for p, n in pairs],
            "  write": [(p["finished"] - p["sampled"]) * 1000 for p, _ in pairs],
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
        for n, (mode, env) in enumerate(MODES.items()):
            runs[mode] = run_jobs(url, s3, tmp, args.jobs, f"gap{n}", env)
    finally:
        if s3 is not None:
            s3.server.stop()
        if url is not None:
            flush(url)
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"machine: {cpu_model()}; one warm CPU worker, 1 torch thread; job {CASE.name}, latent 1x4x32x32, "
          f"{args.steps} steps, inputs/model/outputs on moto S3; {args.jobs - 1} gaps between {args.jobs} queued jobs")
    idle = {}
    for mode, results in runs.items():
        values = spans(results)
        idle[mode] = statistics.median(values["idle (model waits)"])
        sampling = statistics.median((r["timestamps"]["sampled"] - r["timestamps"]["sampling"]) * 1000 for r in results)
        print(f"{mode}: sampling median {sampling:.1f} ms per job; idle / (idle + sampling) = "
              f"{idle[mode] / (idle[mode] + sampling):.3f}; outputs {len({r['sha256'] for r in results})} distinct")
        for name, v in values.items():
            if mode.startswith("pipelined") and name.startswith("  "):
                continue  # overlapped with the previous job's sampling: not part of the idle time
            print(f"  {name:<20} median {statistics.median(v):7.2f} ms   p90 {quantile(v, 0.9):7.2f} ms")
    baseline = idle["prefork (baseline)"]
    for mode, value in idle.items():
        print(f"idle {mode} / baseline = {value / baseline:.4f}")
    best = min(idle.values())
    print(f"target idle < 5 ms at the median: {'met' if best < 5 else 'NOT met'} ({best:.2f} ms)")
    outputs = {r["sha256"] for results in runs.values() for r in results}
    print(f"all {sum(len(r) for r in runs.values())} outputs identical across modes: {len(outputs) == 1}")


if __name__ == "__main__":
    main()
