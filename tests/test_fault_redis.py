"""Redis restarted in the middle of a run of jobs: workers reconnect, every job completes once.

The broker and result backend is a redis-server of this test's own (tests/redis_server.py)
with an append-only file fsynced on every write, so queued messages, unacknowledged
deliveries and results survive the restart as in production. Two real Celery workers
(prefork, -c 1) serve the `tiny` model with a 15 s lease (MASKFLEET_LEASE_SECONDS), so a
job cancelled by the connection loss (worker_cancel_long_running_tasks_on_connection_loss)
comes back to the queue within a lease of Redis coming back (tasks/leases.py).

The lease is longer than the outage plus the workers' reconnect backoff (about 6 s), as
the 30 s default is: a worker that writes anything about its cancelled job once it is
connected again (a REVOKED state, an ack of the message) does so before the lease could
return the job, so such a write would lose the job, and the test sees it.

A first batch is submitted; when both workers run one of its jobs (one at least already
sampling) and the rest wait in the queue, Redis is shut down for 3 s and started again
on the same port; then a second batch is submitted. Every job of both batches must end SUCCESS with the reference
output (all jobs share inputs and seed, so one in-process run gives the bytes each
output must have), and none may complete twice: per job id, the workers' "succeeded"
lines carry one distinct result (a second sampling would log other timings), and each
output file keeps the inode and mtime it had when its job was first seen finished.
No job may ever have been FAILURE or REVOKED, even for a moment: the AOF holds every
state Celery stored (aof_history.py), so a transient one a client could have taken for
the end of its job cannot hide between two polls.
"""
from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

import pytest
import redis
from aof_history import result_states
from golden_jobs import make_models_dir
from redis_server import RedisServer
from tiny_jobs import (completions, deliveries, file_sha256, job_states, output_path, publish_report, reference_sha256,
                       submit_batch, wait_two_running, write_tiny_inputs)

from maskfleet.client import _app
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, stop_workers

LEASE_S = 15
STEPS = 16  # about 1 s of sampling per job on one CPU thread (more on a busy machine): caught running
FIRST_BATCH = 8
SECOND_BATCH = 4
DOWN_FOR_S = 3.0
DEADLINE_S = 150.0


@pytest.fixture
def fleet(tmp_path):
    server = RedisServer(tmp_path, persistent=True).start()
    url = server.url(0)
    models = make_models_dir(tmp_path)
    env = {"MASKFLEET_LEASE_SECONDS": str(LEASE_S), "MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_METRICS_PORT": "0"}
    workers = []
    app = _app(url)
    try:
        for name in ("redis-a", "redis-b"):
            workers.append(Worker(name, [model_queue("tiny")], url, models, tmp_path / f"{name}.log", env))
        for worker in workers:
            worker.wait_ready(app)
        yield {"server": server, "url": url, "app": app, "workers": workers, "root": tmp_path, "models": models}
    finally:
        stop_workers(workers)
        server.stop()


def reconnect_gaps(logs: list[Path]) -> list[float]:
    """Seconds from each worker's 'Connection to broker lost' to its next 'Connected to' line."""
    stamp = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/MainProcess\] (.*)$", re.M)
    gaps = []
    for log in logs:
        lost_at = None
        for when, message in stamp.findall(log.read_text(errors="replace")):
            t = datetime.strptime(when, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if "Connection to broker lost" in message:
                lost_at = t
            elif message.startswith("Connected to") and lost_at is not None:
                gaps.append(round(t - lost_at, 1))
                lost_at = None
    return gaps


def broker_holds_jobs(server: RedisServer) -> bool:
    """Whether a job still waits in the queue or is delivered and not yet acknowledged."""
    conn = server.client()
    return bool(conn.hlen("unacked") or conn.llen(model_queue("tiny")))


# On the connection loss Celery cancels the running job and stores RETRY in the (same, unreachable)
# Redis; workers set result_backend_always_retry (tasks/app.py), so that write waits for Redis and
# the job is redelivered after its lease. Without it Celery would store REVOKED and ack it: lost.
def test_redis_restart_mid_run_every_job_completes_once(fleet, capsys):
    root, url, app, server, workers = fleet["root"], fleet["url"], fleet["app"], fleet["server"], fleet["workers"]
    template = write_tiny_inputs(root / "inputs", size=16)
    template["steps"] = STEPS
    (root / "out").mkdir()
    expected_sha = reference_sha256(template, root / "reference.latent", fleet["models"])

    jobs, handles = submit_batch(template, root / "out", "before", FIRST_BATCH, url)
    # Wait for both workers to be running a job (one at least sampling) while the others wait in the queue.
    now = wait_two_running(handles)
    running = [t for t, s in now.items() if s in ("STARTED", "PROGRESS")]
    sampling = [t for t, s in now.items() if s == "PROGRESS"]
    queued = [t for t, s in now.items() if s == "PENDING"]
    at_restart = dict(now)
    assert len(sampling) >= 1 and len(queued) >= 3, now

    down_at = time.monotonic()
    server.restart(down_for=DOWN_FOR_S)
    up_at = time.monotonic()
    # The AOF kept the waiting jobs: each is still in the queue or delivered and unacknowledged.
    kept_unacked = server.client().hlen("unacked")
    kept_queued = server.client().llen(model_queue("tiny"))
    assert kept_unacked + kept_queued >= len(queued), (kept_unacked, kept_queued, queued)

    # Workers reconnect: each answers a ping over the restarted broker.
    names = [w.name for w in workers]
    answered: set[str] = set()
    end = time.monotonic() + 60
    while answered != set(names) and time.monotonic() < end:
        try:
            for reply in app.control.ping(destination=names, timeout=0.5):
                answered.update(reply)
        except (redis.RedisError, OSError):
            pass
    reconnected_s = time.monotonic() - up_at
    assert answered == set(names), f"not reconnected after 60 s: {set(names) - answered}"

    later, later_handles = submit_batch(template, root / "out", "after", SECOND_BATCH, url)
    jobs += later
    handles += later_handles

    # Every job ends SUCCESS; note each output's identity when its job is first seen finished,
    # and every state the producer could see on the way (a FAILURE or REVOKED seen here would
    # have ended a client's wait() with JobFailed, even if a redelivery succeeds later).
    first_seen: dict[str, tuple[int, int]] = {}
    finished_at: dict[str, float] = {}
    history: dict[str, list[str]] = {job["job_id"]: [] for job in jobs}
    wrong: dict[str, dict] = {}
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        now = job_states(handles)
        for handle, job in zip(handles, jobs):
            job_id = job["job_id"]
            state = now[job_id]
            if state is not None and (not history[job_id] or history[job_id][-1] != state):
                history[job_id].append(state)
            if state in ("FAILURE", "REVOKED") and job_id not in wrong:
                wrong[job_id] = handle.status()
            if state == "SUCCESS" and job_id not in first_seen:
                st = output_path(job).stat()
                first_seen[job_id] = (st.st_ino, st.st_mtime_ns)
                finished_at[job_id] = time.monotonic()
        if len(first_seen) == len(jobs) or (all(s in ("SUCCESS", "FAILURE", "REVOKED") for s in now.values())
                                            and not broker_holds_jobs(server)):
            break  # done, or nothing left that could change a state
        time.sleep(0.1)
    stored = result_states(fleet["root"])
    ended_badly = {t: stored.get(t) for t in history if {"FAILURE", "REVOKED"} & set(stored.get(t, []))}
    assert len(first_seen) == len(jobs), ("jobs lost", {t: h for t, h in history.items() if t not in first_seen},
                                          "states stored", ended_badly)
    assert wrong == {} and ended_badly == {}, ("a final state before the real end", wrong, ended_badly)
    all_done_s = time.monotonic() - up_at

    # Nothing left that could be delivered again: queue empty, no unacknowledged delivery.
    end = time.monotonic() + 30
    while broker_holds_jobs(server) and time.monotonic() < end:
        time.sleep(0.1)
    assert not broker_holds_jobs(server)

    for handle, job in zip(handles, jobs):
        status = handle.status()
        assert status["state"] == "SUCCESS", status
        assert status["meta"]["job_id"] == job["job_id"] and status["meta"]["sha256"] == expected_sha
        out = output_path(job)
        assert file_sha256(out) == expected_sha
        assert (out.stat().st_ino, out.stat().st_mtime_ns) == first_seen[job["job_id"]], job["job_id"]

    # Workers kept running through the outage (no restart of their process).
    for worker in workers:
        assert worker.proc.poll() is None, worker.log.read_text()[-3000:]

    logs = [w.log for w in workers]
    done = completions(logs)
    received = deliveries(logs)
    runs = {job["job_id"]: len(set(done.get(job["job_id"], []))) for job in jobs}
    assert runs == {job["job_id"]: 1 for job in jobs}, {t: done.get(t) for t, n in runs.items() if n != 1}
    redelivered = {t: n for t, n in received.items() if n > 1}
    replayed = {t: len(r) for t, r in done.items() if len(r) > 1}
    text = "\n".join(log.read_text(errors="replace") for log in logs)
    lost = text.count("Connection to broker lost")
    cancelled = text.count("Terminating it instead")
    gaps = reconnect_gaps(logs)
    first_after = min(finished_at[h.task_id] for h in later_handles) - up_at
    first_done = min(t for job_id, t in finished_at.items() if at_restart.get(job_id) != "SUCCESS") - up_at
    interrupted_done = max(finished_at[t] for t in running) - up_at
    report = (f"redis down {up_at - down_at:.1f} s; both workers answered ping {reconnected_s:.1f} s after "
              f"Redis was back; first job finished {first_done:.1f} s after it, the jobs running at the restart "
              f"{interrupted_done:.1f} s after it, the first job submitted after it {first_after:.1f} s after it; "
              f"all {len(jobs)} jobs done {all_done_s:.1f} s after it; running at restart {len(running)} "
              f"(sampling {len(sampling)}), queued {len(queued)}; after the restart {kept_unacked} unacked + "
              f"{kept_queued} in the queue; broker-lost log lines {lost}, jobs terminated on connection loss "
              f"{cancelled}; worker log from broker lost to connected again {gaps} s; redelivered {redelivered}; "
              f"succeeded lines replayed from the done record {replayed}")
    publish_report(capsys, root / "fault_redis_report.txt", report)
    # Each worker saw the connection drop and came back (the outage really reached them).
    assert all("Connection to broker lost" in log.read_text(errors="replace") for log in logs)
