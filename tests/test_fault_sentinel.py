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
from golden_jobs import make_models_dir
from sentinel_servers import SentinelDeployment
from tiny_jobs import (completions, file_sha256, job_states, output_path, publish_report, reference_sha256, submit_batch,
                       wait_two_running, write_tiny_inputs)

from maskfleet.client import _app
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, stop_workers

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
        stop_workers(workers)
        deployment.stop()


def test_master_killed_the_replica_takes_over_and_every_job_completes_once(fleet, capsys):
    root, url, deployment, workers = fleet["root"], fleet["url"], fleet["deployment"], fleet["workers"]
    template = write_tiny_inputs(root / "inputs", size=16)
    template["steps"] = STEPS
    (root / "out").mkdir()
    expected_sha = reference_sha256(template, root / "reference.latent", fleet["models"])

    jobs, handles = submit_batch(template, root / "out", "before", FIRST_BATCH, url)
    now = wait_two_running(handles)
    assert len([s for s in now.values() if s in ("STARTED", "PROGRESS")]) >= 2, now
    deployment.wait_replicated()

    old_master = deployment.master.port
    killed_at = time.monotonic()
    deployment.kill_master()
    promoted_s = deployment.wait_promoted()
    assert deployment.master_port() != old_master

    later, later_handles = submit_batch(template, root / "out", "after", SECOND_BATCH, url)
    jobs += later
    handles += later_handles

    finished_at: dict[str, float] = {}
    end = time.monotonic() + DEADLINE_S
    while len(finished_at) < len(jobs) and time.monotonic() < end:
        for job_id, state in job_states(handles).items():
            if state == "SUCCESS" and job_id not in finished_at:
                finished_at[job_id] = time.monotonic()
            if state in ("FAILURE", "REVOKED"):
                failed = next(h for h in handles if h.task_id == job_id)
                raise AssertionError(f"{job_id} ended {state}: {failed.status()['meta']}\n" +
                                     "\n".join(w.log.read_text(errors="replace")[-4000:] for w in workers))
        time.sleep(0.1)
    assert set(finished_at) == {job["job_id"] for job in jobs}, ("jobs lost", job_states(handles))

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
