"""What the fleet costs its Redis: commands and bytes per job, and per idle worker as the fleet grows.

A private redis-server (tests/redis_server.py) is the broker and result backend of real
worker processes (`-P prefork -c 1`) started with the flags `maskfleet worker` gives them
(tests/fleet_workers.py; `MASKFLEET_WORKER_GOSSIP=1 python bench/broker_cost.py` for the
old defaults, mingle and gossip on). Counted from
`INFO commandstats` and `INFO stats` deltas (commands by name, bytes in and out), so the
counting itself adds one INFO call per reading and nothing else.

(a) Per job: --jobs jobs of the tiny model (tests/tiny_jobs.py, a --size latent) at --steps
steps, submitted one after another through the client and waited for (the
bench hears each job end on its result channel, so it adds no command); commands per job by name, the
PROGRESS writes among them (one per MASKFLEET_PROGRESS_SECONDS of sampling, plus the first
and the last), and bytes written to Redis per job.
The same again with a callback on every job (a webhook receiver on loopback): what the
webhooks and their outbox add per job.
(b) Idle: 1, 2, 4 and --max-workers workers started together, then --idle-seconds of
nothing; commands/s and bytes out/s per worker, and the growth law fitted on bytes out
(bytes_out ~ workers^k).

    python bench/broker_cost.py [--jobs 5] [--steps 20] [--idle-seconds 20] [--max-workers 8]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fleet_workers import Worker  # noqa: E402
from golden_jobs import make_models_dir  # noqa: E402
from redis_server import RedisServer  # noqa: E402
from tiny_jobs import job_from, write_tiny_inputs  # noqa: E402
from webhook_receiver import SECRET, Receiver  # noqa: E402

from maskfleet.client import _app, submit  # noqa: E402
from maskfleet.tasks.settings import model_queue  # noqa: E402
from machine import cpu_model  # bench/machine.py


def reading(client) -> tuple[Counter, int, int]:
    """(calls by command, bytes in, bytes out) so far; the INFO calls themselves are taken out by the caller."""
    stats = client.info("commandstats")
    calls = Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})
    net = client.info("stats")
    return calls, int(net["total_net_input_bytes"]), int(net["total_net_output_bytes"])


def delta(before, after) -> tuple[Counter, int, int]:
    calls = after[0] - before[0]
    calls["info"] -= 2  # the two INFO calls of a reading
    return +calls, after[1] - before[1], after[2] - before[2]


def per_job(server: RedisServer, root: Path, args, callback: str | None = None) -> Counter:
    """Part (a); with `callback` (a receiver's URL) every job carries it; the commands per job by name."""
    url = server.url()
    models = make_models_dir(root)
    template = write_tiny_inputs(root / "inputs", size=args.size)
    if callback is not None:
        template = {**template, "callback": {"url": callback}}
    hooks = {} if callback is None else {"MASKFLEET_WEBHOOK_SECRET": SECRET,
                                         "MASKFLEET_CALLBACK_ALLOWLIST": os.environ["MASKFLEET_CALLBACK_ALLOWLIST"]}
    worker = Worker("cost", [model_queue("tiny")], url, models, root / "worker.log",
                    extra_env={"MASKFLEET_TORCH_THREADS": "1", **hooks})
    try:
        app = _app(url)
        worker.wait_ready(app)
        submit(job_from(template, f"warm-{time.time_ns()}", root / "warm.latent", steps=args.steps), broker_url=url).wait(120)
        time.sleep(1.0)
        client = server.client()
        # The end of each job is heard on its result channel, so the bench adds no command per job.
        ends = client.pubsub(ignore_subscribe_messages=True)
        ends.psubscribe("celery-task-meta-*")
        before = reading(client)
        seconds = 0.0
        for i in range(args.jobs):
            job = job_from(template, f"job{i}-{time.time_ns()}", root / f"job{i}.latent", steps=args.steps)
            start = time.monotonic()
            submit(job, broker_url=url)
            wait_final(ends, job["job_id"], deadline=start + 120)
            seconds += time.monotonic() - start
        settled = acks_settled(client)
        calls, bytes_in, bytes_out = delta(before, reading(client))
        calls["hlen"] -= settled
        ends.close()
        idle_calls = idle_rate(server, 2.0)  # the worker's background commands over the same time span
        total = sum(calls.values()) / args.jobs
        # Each state write publishes once: STARTED, SUCCESS, and the PROGRESS writes (SET + PUBLISH each).
        progress_writes = calls["publish"] / args.jobs - 2
        print(f"(a) per job{' with a callback (every event)' if callback else ''} ({args.steps} steps, {args.size}x{args.size} latent, {seconds / args.jobs:.2f} s from submit "
              f"to SUCCESS, {args.jobs} jobs, one worker): {total:.1f} commands, "
              f"{bytes_in / args.jobs / 1024:.1f} KB written, {bytes_out / args.jobs / 1024:.1f} KB read "
              f"(the worker's idle background, {idle_calls:.1f} commands/s, is included)")
        print(f"    of which PROGRESS writes: {progress_writes:.1f} ({2 * progress_writes:.1f} commands); "
              f"the rest, {total - 2 * progress_writes:.1f} commands, does not depend on steps or time")
        print("    by command:", ", ".join(f"{name} {n / args.jobs:.1f}" for name, n in calls.most_common()))
        return calls
    finally:
        worker.stop()


def with_callback(server: RedisServer, root: Path, args, plain: Counter) -> None:
    """(a) again with every job posting its webhooks to a receiver on loopback: what the outbox adds."""
    hook = Receiver()
    (root / "callback").mkdir()
    os.environ["MASKFLEET_CALLBACK_ALLOWLIST"] = f"127.0.0.1:{hook.server.server_address[1]}"  # the client checks it too
    try:
        calls = per_job(server, root / "callback", args, callback=hook.url)
    finally:
        hook.close()
    added = {name: (calls[name] - plain[name]) / args.jobs for name in set(calls) | set(plain)}
    shown = ", ".join(f"{name} {n:+.1f}" for name, n in sorted(added.items(), key=lambda kv: -abs(kv[1])) if abs(n) >= 0.1)
    print(f"    a callback adds {sum(added.values()):+.1f} commands per job ({shown}); the outbox's own are the "
          f"ZADD and ZREM of its started and final events; receiver got {len(hook.received)} events")


def wait_final(ends, task_id: str, deadline: float) -> None:
    """Until the job's result channel carries a final state."""
    while time.monotonic() < deadline:
        message = ends.get_message(timeout=1.0)
        if message and message["channel"].decode().endswith(task_id) and \
                json.loads(message["data"])["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return
    raise TimeoutError(f"job {task_id} did not end")


def acks_settled(client, deadline_s: float = 30.0) -> int:
    """Wait until the worker acked the last job (it does so after the result is stored); the HLEN calls made."""
    end, calls = time.monotonic() + deadline_s, 0
    while time.monotonic() < end:
        calls += 1
        if client.hlen("unacked") == 0:
            return calls
        time.sleep(0.05)
    raise TimeoutError("the last job was not acked")


def idle_rate(server: RedisServer, seconds: float) -> float:
    client = server.client()
    before = reading(client)
    time.sleep(seconds)
    calls, _, _ = delta(before, reading(client))
    return sum(calls.values()) / seconds


def idle(server: RedisServer, root: Path, args) -> None:
    counts = sorted({n for n in (1, 2, 4, args.max_workers) if n <= args.max_workers})
    models = make_models_dir(root)  # the per-job part made it already; the same folder
    rows = []
    for n in counts:
        workers = [Worker(f"idle{n}-{k}", [model_queue("tiny")], server.url(), models,
                          root / f"idle{n}-{k}.log", extra_env={"MASKFLEET_TORCH_THREADS": "1"})
                   for k in range(n)]
        try:
            app = _app(server.url())
            for w in workers:
                w.wait_ready(app, deadline_s=300)
            time.sleep(5.0)  # past the start-up chatter (mingle, first heartbeats)
            client = server.client()
            before = reading(client)
            time.sleep(args.idle_seconds)
            calls, bytes_in, bytes_out = delta(before, reading(client))
            rows.append((n, sum(calls.values()) / args.idle_seconds, bytes_out / args.idle_seconds))
            print(f"(b) {n} idle workers: {rows[-1][1]:.1f} commands/s ({rows[-1][1] / n:.2f} per worker), "
                  f"{rows[-1][2] / 1024:.2f} KB/s out ({rows[-1][2] / n / 1024:.3f} KB/s per worker)", flush=True)
        finally:
            for w in workers:
                w.stop()
    if len(rows) >= 2 and rows[0][2] > 0:
        k = math.log(rows[-1][2] / rows[0][2]) / math.log(rows[-1][0] / rows[0][0])
        print(f"    bytes out grow as workers^{k:.2f} from {rows[0][0]} to {rows[-1][0]} workers "
              "(1: linear, 2: every worker hears every other)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=8, help="latent side: 8 samples 20 steps in well under a second "
                        "on one CPU thread, about what a GPU takes for SD1.5")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--max-workers", type=int, default=8)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="maskfleet-broker-cost-"))
    server = RedisServer(root).start()
    try:
        print(f"machine: {cpu_model()}; a private Redis; workers -P prefork -c 1, one torch thread")
        plain = per_job(server, root, args)
        with_callback(server, root, args, plain)
        idle(server, root, args)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
