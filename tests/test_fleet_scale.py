"""Two real Celery worker processes share one queue: every job runs exactly once, on either worker.

Both workers (`-c 1`, one torch thread each) consume maskfleet.model.tiny on the machine's
Redis (an empty DB claimed for this module, flushed after). Twenty small jobs with
distinct job ids and outputs go through maskfleet.client.submit. Run-once is checked three
ways that must agree: each worker's own count of tasks it accepted (`inspect().stats()`),
the task ids each worker logged as received, and the task ids each worker logged as
succeeded. Nothing is mocked.
"""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job

from maskfleet.client import _app, submit
from maskfleet.tasks.settings import TASK_NAME, model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis, stop_workers
from tiny_jobs import SUCCEEDED

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
JOBS = 20
STEPS = 3
DEADLINE_S = 120.0

require_redis()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    url = claim_db_url()
    models = make_models_dir(root)
    env = {"MASKFLEET_TORCH_THREADS": "1"}
    workers = []
    app = _app(url)
    try:
        for name in ("scale-a", "scale-b"):  # started together: both import torch at once
            workers.append(Worker(name, [model_queue("tiny")], url, models, root / f"{name}.log", env))
        for worker in workers:
            worker.wait_ready(app)
        yield {"url": url, "root": root, "app": app, "workers": workers}
    finally:
        stop_workers(workers)
        flush(url)


def received_ids(log: Path) -> list[str]:
    """Task ids this worker logged as received (Celery's INFO line, one per delivery)."""
    return re.findall(rf"Task {re.escape(TASK_NAME)}\[([^\]]+)\] received", log.read_text(errors="replace"))


def succeeded_ids(log: Path) -> set[str]:
    """Task ids this worker logged as succeeded (Celery's INFO line, one per run that returned)."""
    return {task_id for task_id, _ in SUCCEEDED.findall(log.read_text(errors="replace"))}


def test_two_workers_share_a_queue_each_job_runs_once_on_either(two_workers):
    root, url, app = two_workers["root"], two_workers["url"], two_workers["app"]
    job_path, _, _ = write_case_job(CASE, root / "inputs")
    template = json.loads(job_path.read_text())
    stamp = time.time_ns()
    jobs = []
    for i in range(JOBS):
        job = dict(template, job_id=f"scale-{stamp}-{i:02d}", steps=STEPS, seed=i,
                   output=(root / "out" / f"job{i:02d}.latent").as_uri())
        jobs.append(job)
    (root / "out").mkdir()

    handles = [submit(job, broker_url=url) for job in jobs]
    assert all(h.submitted for h in handles)
    assert [h.task_id for h in handles] == [job["job_id"] for job in jobs]

    end = time.monotonic() + DEADLINE_S
    results = {}
    for handle in handles:
        results[handle.task_id] = handle.wait(max(0.1, end - time.monotonic()), poll=0.05)

    names = {w.name for w in two_workers["workers"]}
    ran_on = {}
    for job, handle in zip(jobs, handles):
        status = handle.status()
        assert status["state"] == "SUCCESS", status
        result = results[handle.task_id]
        assert result["job_id"] == job["job_id"] and result["output"] == job["output"]
        assert result["shape"] == [1, 4, 32, 32]
        output = Path(job["output"][len("file://"):])
        assert output.is_file() and output.stat().st_size > 0
        [ran_on[handle.task_id]] = [w.name for w in two_workers["workers"] if handle.task_id in succeeded_ids(w.log)]
    assert set(ran_on.values()) <= names, ran_on
    per_worker = Counter(ran_on.values())
    assert set(per_worker) == names, f"one worker took every job: {per_worker}"
    assert len({r["sha256"] for r in results.values()}) == JOBS  # distinct seeds, distinct outputs

    # Each worker's own count of tasks it accepted: together exactly one run per job.
    stats = app.control.inspect(destination=sorted(names), timeout=5.0, limit=len(names)).stats() or {}
    assert set(stats) == names, stats
    accepted = {name: stats[name].get("total", {}).get(TASK_NAME, 0) for name in names}
    assert accepted == dict(per_worker), (accepted, per_worker)
    assert sum(accepted.values()) == JOBS

    # Deliveries as each worker logged them: every job id once, on the worker that ran it.
    logged = {w.name: received_ids(w.log) for w in two_workers["workers"]}
    deliveries = Counter(task_id for ids in logged.values() for task_id in ids)
    assert deliveries == Counter({task_id: 1 for task_id in ran_on}), deliveries
    for name, ids in logged.items():
        assert {task_id for task_id in ids} == {t for t, w in ran_on.items() if w == name}
