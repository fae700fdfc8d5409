"""Redis Sentinel: the master SIGKILLed in the middle of a run of jobs, the replica promoted, every job done once.

A master and a replica (with a password) and three sentinels (with their own) run on
loopback (sentinel_servers.py); the broker, the result backend and our own keys all
reach them through the one `sentinel://` URL. Two real Celery workers (prefork, -c 1)
serve the `tiny` model with a 15 s lease, as in test_fault_redis.py: a job cancelled by
the connection loss comes back to the queue once its lease runs out on the new master.

A first batch is submitted and replicated (Redis's WAIT, what `min-replicas-to-write`
makes of every write); when both workers run one of its jobs, the master is SIGKILLed.
Once the sentinels have promoted the replica, a second batch is submitted through the
same producer. Every job of both batches must end SUCCESS with the reference output, and
none may complete twice (per job id, one distinct "succeeded" result in the workers' logs).
The report gives the time from the kill to the promotion and to the first job completed
after it.
"""
from __future__ import annotations

import time

import pytest
import redis
from golden_jobs import make_models_dir
from sentinel_servers import SentinelDeployment
from tiny_jobs import completions, file_sha256, job_from, output_path, publish_report, reference_sha256, write_tiny_inputs

from maskfleet.client import _app, submit
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker

LEASE_S = 15
STEPS = 16  # about 1 s of sampling per job on one CPU thread: caught running
FIRST_BATCH = 6
SECOND_BATCH = 3
DEADLINE_S = 150.0
PASSWORD, SENTINEL_PASSWORD = "master-secret", "sentinel-secret"


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    deployment = SentinelDeployment(tmp_path, PASSWORD, SENTINEL_PASSWORD)
    workers = []
    try:
        deployment.start()
        url = deployment.url(0)
        monkeypatch.setenv("MASKFLEET_SENTINEL_PASSWORD", SENTINEL_PASSWORD)  # this process is the producer
        models = make_models_dir(tmp_path)
        env = {"MASKFLEET_LEASE_SECONDS": str(LEASE_S), "MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_METRICS_PORT": "0",
               "MASKFLEET_SENTINEL_PASSWORD": SENTINEL_PASSWORD}
        app = _app(url)
        for name in ("sentinel-a", "sentinel-b"):
            workers.append(Worker(name, [model_queue("tiny")], url, models, tmp_path / f"{name}.log", env))
        for worker in workers:
            worker.wait_ready(app)
        yield {"deployment": deployment, "url": url, "app": app, "workers": workers, "root": tmp_path, "models": models}
    finally:
        for worker in workers:
            worker.stop()
        deployment.stop()


def states(handles) -> dict[str, str | None]:
    """State of each job; None for those whose state Redis could not tell right now."""
    found: dict[str, str | None] = {}
    for handle in handles:
        try:
            found[handle.task_id] = handle.status()["state"]
        except (redis.RedisError, OSError):
            found[handle.task_id] = None
    return found


def test_master_killed_the_replica_takes_over_and_every_job_completes_once(fleet, capsys):
    root, url, deployment, workers = fleet["root"], fleet["url"], fleet["deployment"], fleet["workers"]
    template = write_tiny_inputs(root / "inputs", size=16)
    template["steps"] = STEPS
    (root / "out").mkdir()
    expected_sha = reference_sha256(template, root / "reference.latent", fleet["models"])

    stamp = time.time_ns()
    jobs = [job_from(template, f"before-{stamp}-{i:02d}", root / "out" / f"before{i:02d}.latent")
            for i in range(FIRST_BATCH)]
    handles = [submit(job, broker_url=url) for job in jobs]
    assert all(h.submitted for h in handles)

    end = time.monotonic() + 120
    while True:  # both workers running a job, one at least sampling
        now = states(handles)
        running = [t for t, s in now.items() if s in ("STARTED", "PROGRESS")]
        if (len(running) >= 2 and "PROGRESS" in now.values()) or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert len(running) >= 2, now
    deployment.wait_replicated()

    old_master = deployment.master.port
    killed_at = time.monotonic()
    deployment.kill_master()
    promoted_s = deployment.wait_promoted()
    assert deployment.master_port() != old_master

    later = [job_from(template, f"after-{stamp}-{i:02d}", root / "out" / f"after{i:02d}.latent")
             for i in range(SECOND_BATCH)]
    later_handles = [submit(job, broker_url=url) for job in later]
    assert all(h.submitted for h in later_handles)
    jobs += later
    handles += later_handles

    finished_at: dict[str, float] = {}
    end = time.monotonic() + DEADLINE_S
    while len(finished_at) < len(jobs) and time.monotonic() < end:
        for job_id, state in states(handles).items():
            if state == "SUCCESS" and job_id not in finished_at:
                finished_at[job_id] = time.monotonic()
            assert state not in ("FAILURE", "REVOKED"), (job_id, state)
        time.sleep(0.1)
    assert set(finished_at) == {job["job_id"] for job in jobs}, ("jobs lost", states(handles))

    for job in jobs:
        assert file_sha256(output_path(job)) == expected_sha, job["job_id"]
    runs = completions([w.log for w in workers])
    twice = {t: r for t, r in runs.items() if len(set(r)) > 1}
    assert twice == {}, f"jobs sampled to completion twice: {twice}"
    assert set(runs) >= {job["job_id"] for job in jobs}

    first_after = min(finished_at.values()) - killed_at
    publish_report(capsys, root / "sentinel-report.txt",
                   f"Sentinel failover: replica promoted {promoted_s:.1f} s after the master was killed; first job "
                   f"completed {first_after:.1f} s after the kill; all {len(jobs)} jobs done "
                   f"{max(finished_at.values()) - killed_at:.1f} s after it, each once")
