"""Load: 300 small jobs submitted at once to three CPU workers.

All must finish SUCCESS, each completed exactly once, the keys the fleet writes per job
(Celery's celery-task-meta-<id>, our maskfleet:done:<id> and maskfleet:submitted:<id>)
must carry the configured lifetime (MASKFLEET_RESULT_EXPIRES, 20 s here, for the workers
and for this producer) and then be gone, and Redis's used_memory must come back near
where it was before the jobs. The test reports jobs/s (printed, and written to
fleet_load.txt in its tmp folder).

Redis is a redis-server of the test's own (tests/redis_server.py), so no other test's
traffic moves the memory figure. Three real workers (prefork, -c 1, one torch thread
each) serve model `tiny`; each job is an 8x8 latent, one step, the same input files for
all, its own job_id and output file. A first job per worker loads the model before the
clock starts, so jobs/s is the fleet's steady rate, not model loading.
"""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
from golden_jobs import make_models_dir
from redis_server import RedisServer
from tiny_jobs import publish_report, completions, deliveries, file_sha256, job_from, output_path, write_tiny_inputs

from maskfleet.client import _app, submit
from maskfleet.tasks.redis_keys import done_key, submitted_key
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, stop_workers

JOBS = 300
WORKERS = 3
EXPIRES_S = 20
RUN_DEADLINE_S = 120.0
MEMORY_SLACK = 1 << 20  # bytes: used_memory after expiry may exceed the baseline by less than 1 MiB
KEY_PATTERNS = ("celery-task-meta-*", "maskfleet:*")


def meta_key(task_id: str) -> str:
    return f"celery-task-meta-{task_id}"


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKFLEET_RESULT_EXPIRES", str(EXPIRES_S))  # the producer's submitted:* keys
    server = RedisServer(tmp_path).start()
    url = server.url(0)
    models = make_models_dir(tmp_path)
    env = {"MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_RESULT_EXPIRES": str(EXPIRES_S), "MASKFLEET_METRICS_PORT": "0"}
    workers = []
    app = _app(url)
    try:
        for i in range(WORKERS):
            workers.append(Worker(f"load-{i}", [model_queue("tiny")], url, models, tmp_path / f"load-{i}.log", env))
        for worker in workers:
            worker.wait_ready(app)
        yield {"server": server, "url": url, "app": app, "workers": workers, "root": tmp_path}
    finally:
        stop_workers(workers)
        server.stop()


def job_keys(conn) -> list[bytes]:
    return [key for pattern in KEY_PATTERNS for key in conn.scan_iter(match=pattern, count=1000)]


def wait_states(conn, task_ids: list[str], deadline: float, on_finished=None) -> dict[str, str]:
    """Poll the result keys (one MGET per round) until every job is SUCCESS/FAILURE/REVOKED.

    `on_finished(ids)` gets, each round, the jobs seen finished in the round before.
    """
    final: dict[str, str] = {}
    fresh: list[str] = []
    while time.monotonic() < deadline:
        if on_finished is not None and fresh:
            on_finished(fresh)
        waiting = [t for t in task_ids if t not in final]
        if not waiting:
            break
        fresh = []
        for task_id, raw in zip(waiting, conn.mget([meta_key(t) for t in waiting])):
            status = json.loads(raw)["status"] if raw else "PENDING"
            if status in ("SUCCESS", "FAILURE", "REVOKED"):
                final[task_id] = status
                fresh.append(task_id)
        time.sleep(0.05)
    return final


def test_300_jobs_three_workers_all_once_keys_expire_memory_returns(fleet, capsys):
    root, url, server, workers = fleet["root"], fleet["url"], fleet["server"], fleet["workers"]
    conn = server.client()
    template = write_tiny_inputs(root / "inputs", size=8)
    (root / "out").mkdir()
    stamp = time.time_ns()
    baseline = conn.info("memory")["used_memory"]

    # Warm-up: one job per worker loads the model in its pool child (not timed).
    warm = [job_from(template, f"warm-{stamp}-{i}", root / "out" / f"warm{i}.latent") for i in range(WORKERS)]
    for job in warm:
        submit(job, broker_url=url)
    warm_states = wait_states(conn, [j["job_id"] for j in warm], time.monotonic() + 120)
    assert warm_states == {j["job_id"]: "SUCCESS" for j in warm}, warm_states

    jobs = [job_from(template, f"load-{stamp}-{i:03d}", root / "out" / f"job{i:03d}.latent") for i in range(JOBS)]
    ttls: dict[str, list[int | None]] = {}  # per job: TTL of its meta, done and submitted keys

    statuses: dict[str, dict] = {}  # per job: what the client says once it is seen finished (before its keys expire)

    def note_ttls(task_ids) -> None:
        """Record each key's TTL the first time it is seen alive (done:* is written just after SUCCESS),
        and the job's status through the client."""
        for task_id in task_ids:
            if task_id not in statuses:
                statuses[task_id] = by_id[task_id].status()
        pipe = conn.pipeline(transaction=False)
        for task_id in task_ids:
            for key in (meta_key(task_id), done_key(task_id), submitted_key(task_id)):
                pipe.ttl(key)
        answers = iter(pipe.execute())
        for task_id in task_ids:
            seen = ttls.setdefault(task_id, [None, None, None])
            for i in range(3):
                ttl = next(answers)
                if seen[i] is None and ttl != -2:
                    seen[i] = ttl

    started = time.monotonic()
    handles = [submit(job, broker_url=url) for job in jobs]
    by_id = {h.task_id: h for h in handles}
    submitted_s = time.monotonic() - started
    assert all(h.submitted for h in handles)
    final = wait_states(conn, [j["job_id"] for j in jobs], started + RUN_DEADLINE_S, note_ttls)
    elapsed = time.monotonic() - started
    assert Counter(final.values()) == Counter({"SUCCESS": JOBS}), Counter(final.values())
    rate = JOBS / elapsed

    # Every job's result and output: SUCCESS, its own output file, the same bytes for all (same inputs).
    shas = set()
    for job in jobs:
        status = statuses[job["job_id"]]
        assert status["state"] == "SUCCESS", status
        assert status["meta"]["job_id"] == job["job_id"] and status["meta"]["output"] == job["output"]
        assert file_sha256(output_path(job)) == status["meta"]["sha256"]
        shas.add(status["meta"]["sha256"])
    assert len(shas) == 1, shas

    # None twice: one delivery and one succeeded line per job id across the three workers' logs,
    # and every worker took a share.
    logs = [w.log for w in workers]
    done = completions(logs)
    received = deliveries(logs)
    ids = [j["job_id"] for j in jobs]
    assert {t: len(done.get(t, [])) for t in ids} == dict.fromkeys(ids, 1)
    assert {t: received.get(t, 0) for t in ids} == dict.fromkeys(ids, 1)
    per_worker = {w.name: sum(1 for t in deliveries([w.log]) if t in received and t in ids) for w in workers}
    assert all(n > 0 for n in per_worker.values()), per_worker

    # Result keys carry the configured lifetime when the job finishes (None: the producer's
    # submitted key of a job that waited longer than the lifetime had already expired).
    note_ttls([t for t in ids if None in ttls.get(t, [None])[:2]])  # a done key written late
    assert set(ttls) == set(ids)
    for task_id, (meta_ttl, done_ttl, submitted_ttl) in ttls.items():
        assert meta_ttl is not None and 0 < meta_ttl <= EXPIRES_S, (task_id, ttls[task_id])
        assert done_ttl is not None and 0 < done_ttl <= EXPIRES_S, (task_id, ttls[task_id])
        assert submitted_ttl is None or 0 < submitted_ttl <= EXPIRES_S, (task_id, ttls[task_id])
    submitted_expired = sum(1 for t in ttls.values() if t[2] is None)
    remaining = job_keys(conn)
    without_ttl = [k for k in remaining if conn.ttl(k) == -1]
    assert without_ttl == [], without_ttl[:10]
    peak = conn.info("memory")["used_memory"]

    # ...and then they are gone, and Redis's memory is back near the baseline.
    end = time.monotonic() + EXPIRES_S + 30
    while job_keys(conn) and time.monotonic() < end:
        time.sleep(0.5)
    left = job_keys(conn)
    assert left == [], f"{len(left)} keys did not expire, e.g. {left[:5]}"
    expired_after = time.monotonic() - started
    other = sorted(k.decode() for k in conn.scan_iter(count=1000))
    after = conn.info("memory")["used_memory"]

    report = (f"{JOBS} jobs on {WORKERS} CPU workers: {rate:.1f} jobs/s ({elapsed:.1f} s from first submit to "
              f"last SUCCESS; submitting took {submitted_s:.1f} s); per worker {per_worker}; keys expired "
              f"{expired_after:.0f} s after the first submit (MASKFLEET_RESULT_EXPIRES={EXPIRES_S}); Redis "
              f"used_memory before {baseline} B, with results {peak} B, after expiry {after} B "
              f"(delta {after - baseline:+d} B); submitted keys expired before their job finished: "
              f"{submitted_expired}; keys left: {other}")
    publish_report(capsys, root / "fleet_load.txt", report)
    assert after - baseline < MEMORY_SLACK, report
