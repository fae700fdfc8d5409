"""A fleet on two Redis deployments (MASKFLEET_BROKER_ROUTES): each model's jobs through its own Redis only.

Two redis-servers of the test's own: A is MASKFLEET_BROKER_URL, B the route of model
`tiny-b` (the tiny golden UNet under a second name). Model `tiny` is served by a Celery
worker on A; `tiny-b` by `maskfleet worker --models-served tiny-b`, given the routes and
A as its broker, which must find B by itself. The producer (this process) has the same
two settings and no broker URL of its own: it sends jobs of both models, first `tiny-b`
alone, then both, and follows them by job id only.

Every job must end SUCCESS with the reference output; each job's records (Celery's result,
our submission record) must be on its model's Redis and not on the other; while only
`tiny-b` jobs ran, Redis A must have seen a small fraction of B's commands (its idle
worker, and one lookup per job). The report gives commands per job on each Redis.
"""
from __future__ import annotations

import json
import shutil
import time

import pytest
from golden_jobs import make_models_dir
from redis_server import RedisServer
from tiny_jobs import file_sha256, job_from, output_path, publish_report, reference_sha256, write_tiny_inputs

from maskfleet.client import _app, handle, submit
from maskfleet.tasks.redis_keys import submitted_key
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, start_launcher, stop_launcher, wait_for, worker_pids

JOBS = 6  # per model
DEADLINE_S = 120.0


def commands(server: RedisServer) -> int:
    return sum(v["calls"] for v in server.client().info("commandstats").values())


@pytest.fixture
def fleet(tmp_path, monkeypatch):
    a, b = RedisServer(tmp_path / "a"), RedisServer(tmp_path / "b")
    launcher, workers, launched = None, [], []
    try:
        a.start()
        b.start()
        routes = json.dumps({"tiny-b": b.url(0)})
        monkeypatch.setenv("MASKFLEET_BROKER_URL", a.url(0))
        monkeypatch.setenv("MASKFLEET_BROKER_ROUTES", routes)
        monkeypatch.delenv("MASKFLEET_RESULT_BACKEND", raising=False)
        models = make_models_dir(tmp_path)
        shutil.copytree(models / "tiny", models / "tiny-b")
        env = {"MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_METRICS_PORT": "0", "MASKFLEET_BROKER_ROUTES": routes}
        workers.append(Worker("route-a", [model_queue("tiny")], a.url(0), models, tmp_path / "route-a.log", env))
        launcher = start_launcher(a.url(0), models, tmp_path / "route-b.log", models_served="tiny-b",
                                  extra_env={**env, "MASKFLEET_RESULT_BACKEND": ""})
        workers[0].wait_ready(_app(a.url(0)))
        app_b = _app(b.url(0))
        wait_for(lambda: app_b.control.ping(timeout=0.5), 90, "worker of tiny-b answering on Redis B", poll=0.3)
        launched = worker_pids(launcher)
        yield {"a": a, "b": b, "models": models, "root": tmp_path, "log_b": tmp_path / "route-b.log"}
    finally:
        for worker in workers:
            worker.stop()
        if launcher is not None:
            stop_launcher(launcher, launched or worker_pids(launcher))
        a.stop()
        b.stop()


def test_each_model_runs_through_its_own_redis_and_producers_find_jobs_by_id(fleet, capsys):
    a, b, root = fleet["a"], fleet["b"], fleet["root"]
    template = write_tiny_inputs(root / "inputs", size=8)
    expected = reference_sha256(template, root / "reference.latent", fleet["models"])
    (root / "out").mkdir()
    stamp = time.time_ns()

    def jobs_of(model: str) -> list[dict]:
        return [job_from(template, f"{model}-{stamp}-{i}", root / "out" / f"{model}-{i}.latent",
                         base_sampler={**template["base_sampler"], "model": model}) for i in range(JOBS)]

    def run(jobs: list[dict]) -> None:
        for job in jobs:
            assert submit(job).submitted
        for job in jobs:
            result = handle(job["job_id"]).wait(DEADLINE_S)  # found by id alone, on whichever Redis holds it
            assert result is not None and file_sha256(output_path(job)) == expected, job["job_id"]

    b_jobs, a_jobs = jobs_of("tiny-b"), jobs_of("tiny")
    before = commands(a), commands(b)
    run(b_jobs)
    b_only = commands(a) - before[0], commands(b) - before[1]
    assert b_only[0] < b_only[1] / 4, f"Redis A carried {b_only[0]} commands while B ran its {JOBS} jobs ({b_only[1]})"
    before = commands(a), commands(b)
    run(a_jobs)
    a_only = commands(a) - before[0], commands(b) - before[1]
    assert a_only[1] < a_only[0] / 4, f"Redis B carried {a_only[1]} commands while A ran its {JOBS} jobs ({a_only[0]})"

    for jobs, home, other in ((b_jobs, b, a), (a_jobs, a, b)):
        for job in jobs:
            keys = (f"celery-task-meta-{job['job_id']}", submitted_key(job["job_id"]))
            assert home.client().exists(*keys) == 2 and other.client().exists(*keys) == 0, job["job_id"]
    assert handle(b_jobs[0]["job_id"]).app.conf.broker_url == b.url(0)
    assert "tiny-b" in fleet["log_b"].read_text() and b.url(0) in fleet["log_b"].read_text()  # the launcher's line

    publish_report(capsys, root / "routes-report.txt",
                   f"Broker routes: {JOBS} jobs of tiny-b through Redis B: {b_only[1] / JOBS:.1f} commands per job on B, "
                   f"{b_only[0] / JOBS:.1f} on A; {JOBS} jobs of tiny through A: {a_only[0] / JOBS:.1f} per job on A, "
                   f"{a_only[1] / JOBS:.1f} on B (idle workers and lookups by job id included)")
