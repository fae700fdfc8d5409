"""What the fleet costs on top of the job: latency through Redis + S3 + a worker, and scaling to two workers.

Everything is real and local: an empty DB of the machine's Redis (claimed, flushed at the
end), moto's S3 server (tests/s3_server.py) holding the tiny golden UNet as the model store
and every input and output, and Celery worker processes (`-P prefork -c 1`, one torch
thread each, MASKFLEET_TORCH_THREADS=1) started as the fleet tests start them
(tests/fleet_workers.py). The job is golden case c03 (euler, dual sampler, 32x32 latent)
with --steps steps.

(a) Fleet overhead. Fleet: `maskfleet.client.submit(job)` then `handle.wait()` until the
client sees SUCCESS (polling Redis every --poll-ms). Local: `JobPipeline.run(job)` in this
process on a warm runner (what `maskfleet run` does), the same inputs and model store on S3,
its output also written to S3, one torch thread like the worker. After one warm-up of each,
--jobs fleet and local runs alternate; overhead = median(fleet) - median(local).

(b) Throughput. --tp-jobs jobs submitted at once to one warm worker, then the same to two
warm workers sharing the queue; jobs/s from the first submit to the last SUCCESS, and the ratio.

    python bench/fleet_overhead.py [--jobs 10] [--steps 4] [--tp-jobs 8] [--poll-ms 5]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import celery
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fleet_workers import Worker, claim_db_url, flush  # noqa: E402

from maskfleet.client import _app, submit  # noqa: E402
from maskfleet.job import parse_job  # noqa: E402
from maskfleet.job_pipeline import JobPipeline, RunOptions  # noqa: E402
from maskfleet.tasks.settings import model_queue  # noqa: E402
from machine import cpu_model  # bench/machine.py (scripts run with bench/ on sys.path)
from s3_setup import CASE, start_local_s3  # bench/s3_setup.py

WAIT_S = 300.0


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=10, help="sequential jobs timed for the overhead (a)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--tp-jobs", type=int, default=8, help="jobs per throughput run (b)")
    parser.add_argument("--poll-ms", type=float, default=5.0, help="how often the client polls for the result")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the local run gets what a worker gets
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # no `accelerate` advice in the figures
    poll = args.poll_ms / 1000

    print(f"machine: {cpu_model()}, {usable_cores()} cores usable, torch {torch.__version__}, celery {celery.__version__}")
    print("threads: 1 torch thread per worker (MASKFLEET_TORCH_THREADS=1, -c 1) and in the local run")
    print(f"job:     {CASE.name} (euler dual sampler, latent 1x4x32x32, tiny UNet), {args.steps} steps; "
          f"inputs, model store and outputs on moto S3; client polls every {args.poll_ms:g} ms")

    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    url = None
    server = None
    workers: list[Worker] = []
    try:
        url = claim_db_url()
        s3 = start_local_s3(tmp, args.steps)
        server, bucket, models, template = s3.server, s3.bucket, s3.models, s3.template
        app = _app(url)
        stamp = time.time_ns()

        def job(kind: str, i: int) -> dict:
            return dict(template, job_id=f"bench-{stamp}-{kind}-{i}", output=f"s3://{bucket}/out/{kind}-{i}.latent")

        def start_worker(name: str) -> Worker:
            env = {"MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_MODEL_CACHE": str(tmp / "cache-workers")}
            worker = Worker(name, [model_queue("tiny"), f"bench.{name}"], url, models, tmp / f"{name}.log", env)
            workers.append(worker)
            worker.wait_ready(app)
            submit(job(f"warm-{name}", 0), broker_url=url, queue=f"bench.{name}").wait(WAIT_S, poll)  # model loaded
            return worker

        start_worker("bench-a")
        runner = JobPipeline(RunOptions(models, "cpu", model_cache_dir=tmp / "cache-local"))
        runner.run(parse_job(job("local-warm", 0)))

        # (a) alternate fleet and local runs of the same job
        fleet_s, local_s, worker_s, same = [], [], [], 0
        for i in range(args.jobs):
            spec = parse_job(job("local", i))
            start = time.perf_counter()
            local = runner.run(spec)
            local_s.append(time.perf_counter() - start)

            start = time.perf_counter()
            result = submit(job("fleet", i), broker_url=url).wait(WAIT_S, poll)
            fleet_s.append(time.perf_counter() - start)
            worker_s.append(result["seconds"]["total"])
            same += result["sha256"] == local["sha256"]

        # (b) throughput: one warm worker, then two
        def throughput(kind: str) -> tuple[float, Counter]:
            start = time.perf_counter()
            handles = [submit(job(kind, i), broker_url=url) for i in range(args.tp_jobs)]
            for handle in handles:
                handle.wait(WAIT_S, poll)
            elapsed = time.perf_counter() - start
            return args.tp_jobs / elapsed, Counter(h.result.worker for h in handles)

        one, one_split = throughput("tp1")
        start_worker("bench-b")
        two, two_split = throughput("tp2")

        ms = lambda seconds: f"{seconds * 1000:.1f} ms"  # noqa: E731
        runs = lambda values: ", ".join(f"{v * 1000:.0f}" for v in values)  # noqa: E731
        fleet_med, local_med, worker_med = (statistics.median(v) for v in (fleet_s, local_s, worker_s))
        overhead = fleet_med - local_med
        print()
        print(f"(a) fleet overhead, median of {args.jobs} sequential jobs after a warm-up")
        print(f"    fleet end to end (submit -> SUCCESS at the client)  {ms(fleet_med)}   (runs, ms: {runs(fleet_s)})")
        print(f"    in-process JobPipeline.run, warm (maskfleet run)      {ms(local_med)}   (runs, ms: {runs(local_s)})")
        print(f"    the job as timed inside the worker                  {ms(worker_med)}")
        print(f"    fleet overhead = fleet - in-process                 {ms(overhead)}   (target < 150 ms: "
              f"{'met' if overhead < 0.150 else 'NOT met'})")
        print(f"    of which outside the job (fleet - in-worker time)   {ms(fleet_med - worker_med)}")
        print(f"    outputs bitwise equal to the in-process run: {same}/{args.jobs}")
        print()
        print(f"(b) throughput, {args.tp_jobs} jobs submitted at once, from first submit to last SUCCESS")
        print(f"    one worker   {one:.3f} jobs/s   (jobs per worker: {dict(one_split)})")
        print(f"    two workers  {two:.3f} jobs/s   (jobs per worker: {dict(two_split)})")
        print(f"    ratio two/one: {two / one:.2f}x   (target >= 1.8x: {'met' if two / one >= 1.8 else 'NOT met'})")
    finally:
        for worker in workers:
            worker.stop()
        if server is not None:
            server.stop()
        if url is not None:
            flush(url)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
