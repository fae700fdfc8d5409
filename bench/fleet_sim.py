"""A simulated large fleet on one Redis: many light consumers, thousands of short jobs, none lost or run twice.

--consumers worker processes (bench/fleet_sim_worker.py: the fleet's configuration, Request
class, leases, delivery counting and Redis-touching lifecycle concerns around a stub body
that sleeps --step-ms per sampler call, no torch) serve one model queue of a private
redis-server (tests/redis_server.py). Once all answer, --jobs jobs are submitted through
the producer client and followed on their result channels (a pattern subscription: no
command per job). Printed: jobs/s from the first submit to the last SUCCESS, Redis's own
CPU time (INFO cpu) per job and as a share of one core, commands per job, and, from the
workers' logs, jobs lost (no SUCCESS) and jobs run twice (more than one "succeeded" line).

    python bench/fleet_sim.py [--consumers 50] [--jobs 2000] [--steps 2] [--step-ms 10]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fleet_workers import stop_process  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from tiny_jobs import completions, job_from, write_tiny_inputs  # noqa: E402

from maskfleet.client import _app, submit  # noqa: E402
from maskfleet.tasks.settings import load_settings, model_queue  # noqa: E402
from maskfleet.worker.launcher import peer_flags  # noqa: E402
from machine import cpu_model  # bench/machine.py

MODEL = "sim"
FINAL = ("SUCCESS", "FAILURE", "REVOKED")


def start_consumers(count: int, url: str, root: Path, step_ms: float) -> list[tuple[subprocess.Popen, Path]]:
    env = {**os.environ, "MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url, "MASKFLEET_METRICS_PORT": "0",
           "MASKFLEET_SIM_STEP_MS": str(step_ms), "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")]))}
    consumers = []
    for i in range(count):
        log = root / f"sim-{i}.log"
        argv = [sys.executable, "-m", "celery", "-A", "fleet_sim_worker", "worker", "-P", "solo", "-n", f"sim-{i}@bench",
                "-Q", model_queue(MODEL), "--loglevel", "INFO", *peer_flags(load_settings(env))]
        consumers.append((subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                           start_new_session=True), log))
    return consumers


def wait_answering(app, count: int, deadline_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < deadline_s:
        if len(app.control.ping(timeout=2.0)) >= count:
            return time.monotonic() - start
    raise TimeoutError(f"not all {count} consumers answered within {deadline_s} s")


def rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0)


def redis_cpu(client) -> float:
    cpu = client.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def follow(ends, ids: set[str], deadline: float) -> dict[str, str]:
    """Final state of each job id, heard on the result channels, until all are final or the deadline."""
    final: dict[str, str] = {}
    while len(final) < len(ids) and time.monotonic() < deadline:
        message = ends.get_message(timeout=1.0)
        if not message:
            continue
        task_id = message["channel"].decode().removeprefix("celery-task-meta-")
        status = json.loads(message["data"])["status"]
        if task_id in ids and status in FINAL:
            final[task_id] = status
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--consumers", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=10.0, help="sleep per sampler call (two per step)")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds for all jobs to end")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="maskfleet-fleet-sim-"))
    server = RedisServer(root).start()
    consumers = []
    try:
        url = server.url()
        app = _app(url)
        consumers = start_consumers(args.consumers, url, root, args.step_ms)
        up_s = wait_answering(app, args.consumers, deadline_s=600)
        template = write_tiny_inputs(root / "inputs", size=8)
        template["base_sampler"]["model"] = template["mask_sampler"]["model"] = MODEL
        stamp = time.time_ns()
        jobs = [job_from(template, f"sim-{stamp}-{i:05d}", root / "out" / f"{i}.latent", steps=args.steps)
                for i in range(args.jobs)]
        client = server.client()
        ends = client.pubsub(ignore_subscribe_messages=True)
        ends.psubscribe("celery-task-meta-*")
        cpu0, calls0 = redis_cpu(client), server.commands()
        start = time.monotonic()
        for job in jobs:
            submit(job, broker_url=url)
        submitted_s = time.monotonic() - start
        final = follow(ends, {j["job_id"] for j in jobs}, start + args.deadline)
        elapsed = time.monotonic() - start
        cpu, calls = redis_cpu(client) - cpu0, server.commands() - calls0
        ends.close()
        runs = completions([log for _, log in consumers])
        ids = [j["job_id"] for j in jobs]
        lost = [i for i in ids if final.get(i) != "SUCCESS"]
        twice = [i for i in ids if len(runs.get(i, [])) > 1]
        by_log = [sum(len(r) for r in completions([log]).values()) for _, log in consumers]
        memory = sum(rss_mb(proc.pid) for proc, _ in consumers) / len(consumers)
        print(f"machine: {cpu_model()}; one private Redis; {args.consumers} consumers (-P solo, stub body of "
              f"{args.steps} steps x 2 sampler calls x {args.step_ms:g} ms, {memory:.0f} MB each), all answering "
              f"{up_s:.0f} s after start")
        print(f"{args.jobs} jobs: {args.jobs / elapsed:.1f} jobs/s ({elapsed:.1f} s from the first submit to the last "
              f"end; the one producer process took {submitted_s:.1f} s to submit them, so it set the pace when the "
              f"two are close); per consumer {min(by_log)}-{max(by_log)} jobs; with no overhead at all the consumers "
              f"would do {args.consumers / (2 * args.steps * args.step_ms / 1000):.0f} jobs/s")
        print(f"Redis: {cpu / args.jobs * 1000:.2f} ms of CPU per job, {100 * cpu / elapsed:.0f} % of one core over "
              f"the run; {calls / args.jobs:.1f} commands per job (idle consumers and the producer included)")
        print(f"lost (no SUCCESS): {len(lost)}; run twice: {len(twice)}" + (f" e.g. {lost[:3]} {twice[:3]}"
                                                                             if lost or twice else ""))
    finally:
        for proc, _ in consumers:
            stop_process(proc, 30)
        server.stop()


if __name__ == "__main__":
    main()
