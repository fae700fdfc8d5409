"""A worker killed while its webhook receiver is down: another worker delivers its events.

Real processes: worker A runs four jobs whose callback points at a receiver that is down,
so their `started` and `succeeded` events sit in the outbox while A retries them. A is
killed with SIGKILL (main process and pool child: the host is gone), the Redis (a private
redis-server with its append-only file) is restarted, worker B starts, the receiver comes
back, and every event must arrive, from B, with the webhook-id it had in A's outbox,
`started` before `succeeded`. The lease is shortened to 2 s (sweeps every second) so the
test does not wait the default 30 s.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
import redis
from golden_jobs import IN_REPO_GOLDEN, fleet_job, make_models_dir
from metrics_scrape import free_port
from webhook_receiver import SECRET, Receiver, clear_proxies

from maskfleet.client import _app, submit
from maskfleet.tasks.settings import model_queue
from maskfleet.tasks.webhook_outbox import OUTBOX_KEY, OutboxEvent
from fleet_workers import Worker, stop_workers, wait_for
from redis_server import RedisServer

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
JOBS = 4
LEASE = 2


def test_a_killed_workers_events_survive_a_redis_restart_and_are_delivered_by_another_worker(tmp_path):
    server = RedisServer(tmp_path, persistent=True).start()
    url = server.url()
    port = free_port()
    allowed = f"127.0.0.1:{port}"
    env = pytest.MonkeyPatch()
    worker_env = {"MASKFLEET_WEBHOOK_SECRET": SECRET, "MASKFLEET_CALLBACK_ALLOWLIST": allowed,
                  "MASKFLEET_WEBHOOK_LEASE": str(LEASE), "MASKFLEET_WEBHOOK_MAX_ATTEMPTS": "1000",
                  "MASKFLEET_WEBHOOK_BACKOFF": "0.2", "MASKFLEET_WEBHOOK_DEADLINE": "600", "MASKFLEET_TORCH_THREADS": "1"}
    models = make_models_dir(tmp_path)
    workers: list[Worker] = []
    hook = None
    try:
        clear_proxies(env)
        env.setenv("MASKFLEET_CALLBACK_ALLOWLIST", allowed)
        app = _app(url)
        a = Worker("outbox-a", [model_queue("tiny")], url, models, tmp_path / "a.log", extra_env=worker_env)
        workers.append(a)
        a.wait_ready(app)
        jobs = [fleet_job(CASE, tmp_path, f"outbox-{i}", callback={"url": f"http://{allowed}/hook"}) for i in range(JOBS)]
        for handle in [submit(job, broker_url=url) for job in jobs]:
            handle.wait(120)
        client = redis.Redis.from_url(url)
        pending = wait_for(lambda: (lambda m: m if len(m) == 2 * JOBS else None)(client.zrange(OUTBOX_KEY, 0, -1)),
                           30, "every started and succeeded event in the outbox")
        stored = {(e.job_id, e.type): e.msg_id for e in map(OutboxEvent.of, pending)}

        os.killpg(a.proc.pid, signal.SIGKILL)  # parent and child at once, mid-retry
        a.proc.wait()
        server.restart()
        client = server.client()  # the old connection went with the server
        assert sorted(client.zrange(OUTBOX_KEY, 0, -1)) == sorted(pending)  # the append-only file kept them
        b = Worker("outbox-b", [model_queue("tiny")], url, models, tmp_path / "b.log", extra_env=worker_env)
        workers.append(b)
        b.wait_ready(app)
        hook = Receiver(port=port)
        back_at = time.monotonic()

        def arrived():
            with hook.lock:
                got = {(body["data"]["job_id"], kind): msg_id for msg_id, kind, body in hook.received}
            return got if all(key in got for key in stored) else None

        got = wait_for(arrived, 60, "every event from the other worker")
        delivered_in = time.monotonic() - back_at
        assert {key: got[key] for key in stored} == stored  # the same webhook-id it had in A's outbox
        assert hook.bad == []
        with hook.lock:
            order = [(body["data"]["job_id"], kind) for _, kind, body in hook.received]
        for job in jobs:
            mine = [kind for job_id, kind in order if job_id == job["job_id"]]
            assert mine.index("job.started") < mine.index("job.succeeded"), mine
        assert "taking over" in b.log.read_text(errors="replace")
        wait_for(lambda: client.zcard(OUTBOX_KEY) == 0, 10, "an empty outbox")
        print(f"\n{2 * JOBS} events of a killed worker delivered by another {delivered_in:.1f} s after the receiver "
              f"came back (lease {LEASE} s)")
    finally:
        stop_workers(workers)
        if hook is not None:
            hook.close()
        env.undo()
        server.stop()
