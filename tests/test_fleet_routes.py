"""A fleet on two Redis deployments (MASKFLEET_BROKER_ROUTES): each model's jobs through its own Redis only.

Two redis-servers of the test's own: A is MASKFLEET_BROKER_URL, B the route of model
`tiny-b` (the tiny golden UNet under a second name). Model `tiny` is served by a Celery
worker on A; `tiny-b` by `maskfleet worker --models-served tiny-b`, given the routes and
A as its broker, which must find B by itself. The producer (this process) and a gateway
have the same two settings and no other broker URL.

Through the client: jobs of `tiny-b` alone, then of `tiny`, followed by job id only. Every
job must end SUCCESS with the reference output; each job's records (Celery's result, our
submission record) must be on its model's Redis and not on the other; while one Redis ran
its jobs the other must have seen a small fraction of its commands (its idle worker and
one lookup per job). The report gives commands per job on each. Through the gateway: a job
of each model, followed by its event stream (on the job's own Redis) and by id.
"""
from __future__ import annotations

import json
import shutil
import time

import httpx
import pytest
from golden_jobs import make_models_dir
from metrics_scrape import free_port
from redis_server import RedisServer
from tiny_jobs import file_sha256, job_from, output_path, publish_report, reference_sha256, write_tiny_inputs

from maskfleet.client import _app, handle, submit
from maskfleet.tasks.redis_keys import submitted_key
from maskfleet.tasks.settings import model_queue
from fleet_workers import Gateway, Worker, sse_events, start_launcher, stop_launcher, wait_for, worker_pids

JOBS = 6  # per model
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("routes")
    for name in ("a", "b"):
        (root / name).mkdir()
    a, b = RedisServer(root / "a"), RedisServer(root / "b")
    launcher, gateway, workers, launched = None, None, [], []
    with pytest.MonkeyPatch.context() as monkeypatch:
        try:
            a.start()
            b.start()
            routes = json.dumps({"tiny-b": b.url(0)})
            monkeypatch.setenv("MASKFLEET_BROKER_URL", a.url(0))
            monkeypatch.setenv("MASKFLEET_BROKER_ROUTES", routes)
            monkeypatch.delenv("MASKFLEET_RESULT_BACKEND", raising=False)
            models = make_models_dir(root)
            shutil.copytree(models / "tiny", models / "tiny-b")
            env = {"MASKFLEET_TORCH_THREADS": "1", "MASKFLEET_METRICS_PORT": "0", "MASKFLEET_BROKER_ROUTES": routes}
            workers.append(Worker("route-a", [model_queue("tiny")], a.url(0), models, root / "route-a.log", env))
            launcher = start_launcher(a.url(0), models, root / "route-b.log", models_served="tiny-b",
                                      extra_env={**env, "MASKFLEET_RESULT_BACKEND": ""})
            gateway = Gateway(free_port(), {**env, "MASKFLEET_BROKER_URL": a.url(0), "MASKFLEET_RESULT_BACKEND": "",
                                            "MASKFLEET_GATEWAY_LOCAL_FILES": "1"}, root / "gateway.log",
                              "--insecure-no-auth")
            workers[0].wait_ready(_app(a.url(0)))
            app_b = _app(b.url(0))
            wait_for(lambda: app_b.control.ping(timeout=0.5), 90, "worker of tiny-b answering on Redis B", poll=0.3)
            launched = worker_pids(launcher)
            gateway.wait_ready()
            template = write_tiny_inputs(root / "inputs", size=8)
            expected = reference_sha256(template, root / "reference.latent", models)
            (root / "out").mkdir()
            yield {"a": a, "b": b, "root": root, "log_b": root / "route-b.log", "gateway": gateway,
                   "template": template, "expected": expected}
        finally:
            for process in (gateway, *workers):
                if process is not None:
                    process.stop()
            if launcher is not None:
                stop_launcher(launcher, launched or worker_pids(launcher))
            a.stop()
            b.stop()


def jobs_of(fleet, model: str, count: int, name: str) -> list[dict]:
    template, stamp = fleet["template"], time.time_ns()
    return [job_from(template, f"{name}-{model}-{stamp}-{i}", fleet["root"] / "out" / f"{name}-{model}-{i}.latent",
                     base_sampler={**template["base_sampler"], "model": model}) for i in range(count)]


def homes(fleet, job_id: str) -> list[str]:
    """The Redis deployments (a, b) that hold the job's result and submission record."""
    keys = (f"celery-task-meta-{job_id}", submitted_key(job_id))
    return [name for name in ("a", "b") if fleet[name].client().exists(*keys) == 2]


def test_each_model_runs_through_its_own_redis_and_producers_find_jobs_by_id(fleet, capsys):
    a, b, root, expected = fleet["a"], fleet["b"], fleet["root"], fleet["expected"]

    def run(jobs: list[dict]) -> None:
        for job in jobs:
            assert submit(job).submitted
        for job in jobs:
            result = handle(job["job_id"]).wait(DEADLINE_S)  # found by id alone, on whichever Redis holds it
            assert result is not None and file_sha256(output_path(job)) == expected, job["job_id"]

    b_jobs, a_jobs = jobs_of(fleet, "tiny-b", JOBS, "client"), jobs_of(fleet, "tiny", JOBS, "client")
    before = a.commands(), b.commands()
    run(b_jobs)
    b_only = a.commands() - before[0], b.commands() - before[1]
    assert b_only[0] < b_only[1] / 4, f"Redis A carried {b_only[0]} commands while B ran its {JOBS} jobs ({b_only[1]})"
    before = a.commands(), b.commands()
    run(a_jobs)
    a_only = a.commands() - before[0], b.commands() - before[1]
    assert a_only[1] < a_only[0] / 4, f"Redis B carried {a_only[1]} commands while A ran its {JOBS} jobs ({a_only[0]})"

    assert {job["job_id"]: homes(fleet, job["job_id"]) for job in b_jobs + a_jobs} == \
        {**{job["job_id"]: ["b"] for job in b_jobs}, **{job["job_id"]: ["a"] for job in a_jobs}}
    assert handle(b_jobs[0]["job_id"]).app.conf.broker_url == b.url(0)
    launched = fleet["log_b"].read_text()
    assert "maskfleet.model.tiny-b" in launched and f"(Redis {b.url(0)})" in launched  # the launcher's line

    publish_report(capsys, root / "routes-report.txt",
                   f"Broker routes: {JOBS} jobs of tiny-b through Redis B: {b_only[1] / JOBS:.1f} commands per job on B, "
                   f"{b_only[0] / JOBS:.1f} on A; {JOBS} jobs of tiny through A: {a_only[0] / JOBS:.1f} per job on A, "
                   f"{a_only[1] / JOBS:.1f} on B (idle workers and the producer's status polling included)")


def test_the_gateway_sends_each_model_to_its_redis_and_follows_jobs_on_it(fleet):
    with httpx.Client(base_url=fleet["gateway"].url, timeout=90) as http:
        ids = []
        for job in jobs_of(fleet, "tiny-b", 1, "http") + jobs_of(fleet, "tiny", 1, "http"):
            created = http.post("/v1/jobs", json=job)
            assert created.status_code == 201, created.text
            with http.stream("GET", f"/v1/jobs/{job['job_id']}/events") as response:
                kinds = [kind for _, kind, _ in sse_events(response)]
            assert kinds[-1] == "succeeded", kinds  # the stream listened on the job's own Redis
            done = http.get(f"/v1/jobs/{job['job_id']}", headers={"Prefer": "wait=60"}).json()
            assert done["state"] == "succeeded" and file_sha256(output_path(job)) == fleet["expected"]
            ids.append(job["job_id"])
        assert [homes(fleet, job_id) for job_id in ids] == [["b"], ["a"]]
        assert http.get("/readyz").json() == {"redis": "ok"}
