"""What the HTTP gateway costs: per-job overhead against the Python client, status requests/s, 200 event streams.

Everything is real and local: an empty DB of the machine's Redis (claimed, flushed at the
end), one CPU worker (`-P prefork -c 1`, one torch thread) and one `maskfleet gateway`
process (uvicorn, one event loop, API keys on), started as the tests start them. The job is
golden case c03 (tiny UNet, 32x32 latent, local files) with --steps steps.

(a) Overhead: the same job submitted and waited for through the client (`submit(job).wait`,
polling every --poll-ms) and through the gateway (one `POST /v1/jobs` with `Prefer: wait=60`,
woken by the result backend's pub/sub), alternating, --jobs each after a warm-up; the
medians and their difference.
(b) Status: `GET /v1/jobs/{id}` of a finished job from --threads client threads for
--seconds; requests/s the one gateway process answered.
(c) Streams: --streams clients follow one running job's events (`GET /v1/jobs/{id}/events`)
while a Redis subscriber in this process notes when each progress update was published;
the delay from publish to each client's receipt (median, p99), and the gateway's resident
memory before and with the streams open.

    python bench/gateway.py [--jobs 20] [--steps 2] [--streams 200] [--stream-steps 300]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import redis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fleet_workers import Gateway, Worker, claim_db_url, flush, wait_for  # noqa: E402
from golden_jobs import make_models_dir, write_case_job  # noqa: E402
from metrics_scrape import free_port  # noqa: E402

from maskfleet.client import _app, submit  # noqa: E402
from maskfleet.gateway.api_keys import new_key  # noqa: E402
from maskfleet.tasks.settings import model_queue  # noqa: E402
from machine import cpu_model  # bench/machine.py
from s3_setup import CASE  # bench/s3_setup.py


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def overhead(gw: httpx.Client, job: dict, url: str, args) -> tuple[list[float], list[float]]:
    client_s, gateway_s = [], []
    for i in range(args.jobs + 1):  # the first of each is the warm-up
        started = time.perf_counter()
        submit(dict(job, job_id=f"client-{i}-{time.time_ns()}"), broker_url=url).wait(60, poll=args.poll_ms / 1000)
        if i:
            client_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        answer = gw.post("/v1/jobs", json=dict(job, job_id=f"http-{i}-{time.time_ns()}"), headers={"Prefer": "wait=60"})
        assert answer.status_code == 201 and answer.json()["state"] == "succeeded", answer.text
        if i:
            gateway_s.append(time.perf_counter() - started)
    return client_s, gateway_s


def status_rate(base: str, token: str, job_id: str, threads: int, seconds: float) -> float:
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def hammer(k: int) -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}) as c:
            while time.monotonic() < stop:
                assert c.get(f"/v1/jobs/{job_id}").status_code == 200
                counts[k] += 1

    workers = [threading.Thread(target=hammer, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return sum(counts) / seconds


async def follow_all(base: str, token: str, job_id: str, n: int, received: list[dict], opened: asyncio.Event):
    """n streams on the job; each progress event's receipt time, by (step, sampler), appended to received[i]."""
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {token}"}, limits=limits,
                                 timeout=httpx.Timeout(600, connect=60)) as c:
        ready = [0]

        async def one(i: int) -> None:
            async with c.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                ready[0] += 1
                if ready[0] == n:
                    opened.set()
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        data = json.loads(line[6:])
                        if data.get("progress"):
                            p = data["progress"]
                            received[i][(p["step"], p["sampler"])] = time.time()

        await asyncio.gather(*(one(i) for i in range(n)))


def streams(base: str, token: str, gw: httpx.Client, job: dict, url: str, pid: int, args) -> dict:
    job_id = f"stream-{time.time_ns()}"
    assert gw.post("/v1/jobs", json=dict(job, job_id=job_id, steps=args.stream_steps)).status_code == 201
    wait_for(lambda: gw.get(f"/v1/jobs/{job_id}").json()["state"] == "running", 120, "the long job running")
    published: dict[tuple, float] = {}
    listener = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    listener.subscribe(_app(url).backend.get_key_for_task(job_id))
    done = threading.Event()

    def listen() -> None:
        while not done.is_set():
            message = listener.get_message(timeout=0.5)
            if message and message["type"] == "message":
                meta = json.loads(message["data"])
                result = meta.get("result") or {}
                if meta.get("status") == "PROGRESS":
                    published[(result["step"], result["sampler"])] = time.time()

    threading.Thread(target=listen, daemon=True).start()
    before = rss_mb(pid)
    received: list[dict] = [{} for _ in range(args.streams)]
    opened = asyncio.Event()
    peak = [before]

    async def run() -> None:
        follow = asyncio.create_task(follow_all(base, token, job_id, args.streams, received, opened))
        while not follow.done():
            peak[0] = max(peak[0], rss_mb(pid))
            await asyncio.sleep(0.2)
        await follow

    asyncio.run(run())
    done.set()
    delays = [(t - published[k]) * 1000 for r in received for k, t in r.items() if k in published]
    return {"before_mb": before, "peak_mb": peak[0], "delays_ms": delays, "events": len(delays),
            "updates": len(published)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--poll-ms", type=float, default=5.0, help="the client's poll interval while it waits")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--stream-steps", type=int, default=300)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="maskfleet-gateway-bench-"))
    url = claim_db_url()
    token, entry = new_key("bench", ["submit", "read"])
    (root / "keys.jsonl").write_text(json.dumps(entry) + "\n")
    worker = Worker("bench", [model_queue("tiny")], url, make_models_dir(root), root / "worker.log",
                    extra_env={"MASKFLEET_TORCH_THREADS": "1"})
    gateway = Gateway(free_port(), {"MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url,
                                    "MASKFLEET_API_KEYS_FILE": str(root / "keys.jsonl"),
                                    "MASKFLEET_GATEWAY_LOCAL_FILES": "1"},  # the case's local files, as the client's
                      root / "gateway.log",
                      "--log-level", "warning")
    base = gateway.url
    try:
        worker.wait_ready(_app(url))
        gateway.wait_ready()
        job_path, _, _ = write_case_job(CASE, root / "job")
        job = dict(json.loads(job_path.read_text()), steps=args.steps)
        print(f"machine: {cpu_model()}; one worker (1 torch thread), one gateway process; job: c03, {args.steps} steps")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as gw:
            client_s, gateway_s = overhead(gw, job, url, args)
            c, g = statistics.median(client_s) * 1000, statistics.median(gateway_s) * 1000
            print(f"(a) submit + wait, median of {args.jobs}: client {c:.1f} ms (polling every {args.poll_ms:g} ms), "
                  f"gateway {g:.1f} ms (Prefer: wait): gateway - client {g - c:+.1f} ms, ratio {g / c:.2f}")
            finished = gw.post("/v1/jobs", json=dict(job, job_id=f"status-{time.time_ns()}"),
                               headers={"Prefer": "wait=60"}).json()["id"]
            rate = status_rate(base, token, finished, args.threads, args.seconds)
            print(f"(b) GET /v1/jobs/{{id}} from {args.threads} threads for {args.seconds:g} s: {rate:.0f} requests/s")
            s = streams(base, token, gw, job, url, gateway.proc.pid, args)
        delays = s["delays_ms"]
        print(f"(c) {args.streams} event streams on one running job ({args.stream_steps} steps, {s['updates']} progress "
              f"updates published): {s['events']} events received, delay publish -> client median "
              f"{statistics.median(delays):.1f} ms, p99 {percentile(delays, 0.99):.1f} ms; gateway RSS "
              f"{s['before_mb']:.0f} MB before, {s['peak_mb']:.0f} MB with the streams "
              f"({(s['peak_mb'] - s['before_mb']) * 1024 / args.streams:.0f} KB per stream)")
    finally:
        gateway.stop()
        worker.stop()
        flush(url)


if __name__ == "__main__":
    main()
