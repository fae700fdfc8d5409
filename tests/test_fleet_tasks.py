"""The fleet end to end: real Celery worker processes on the machine's Redis (a DB of their own).

One worker serves only model `tiny` (queue maskfleet.model.tiny) for the whole module;
jobs are the golden cases written as files. Nothing is mocked.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job

from maskfleet.client import JobFailed, JobHandle, _app, submit
from maskfleet.job import parse_job
from maskfleet.job_pipeline import RunOptions, run_job
from maskfleet.tasks.settings import TASK_NAME, model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"

require_redis()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fleet")
    url = claim_db_url()
    flush(url)
    models = make_models_dir(root)
    worker = Worker("tiny", [model_queue("tiny")], url, models, root / "worker.log")
    app = _app(url)
    try:
        worker.wait_ready(app)
        yield {"url": url, "root": root, "models": models, "app": app, "worker": worker}
    finally:
        worker.stop()
        flush(url)


def make_job(fleet, name: str, **changes) -> dict:
    _, _, _ = write_case_job(CASE, fleet["root"] / name)
    job = json.loads((fleet["root"] / name / "job.json").read_text())
    job["job_id"] = f"{name}-{time.time_ns()}"
    job.update(changes)
    return job


def wait_state(handle: JobHandle, states: set[str], timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = handle.status()
        if status["state"] in states:
            return status
        time.sleep(0.05)
    raise AssertionError(f"{handle.task_id} still {handle.status()} after {timeout} s")


def test_end_to_end_progress_success_and_same_output_as_maskfleet_run(fleet):
    job = make_job(fleet, "e2e")
    handle = submit(job, broker_url=fleet["url"])
    assert handle.task_id == job["job_id"]
    seen = []
    end = time.monotonic() + 120
    while time.monotonic() < end:
        status = handle.status()
        seen.append(status["state"])
        if status["state"] == "PROGRESS":
            assert set(status["meta"]) == {"step", "total", "sampler", "phase"}
            assert status["meta"]["total"] == 6 and status["meta"]["sampler"] in ("base", "mask")  # the job's 6 steps
            assert 1 <= status["meta"]["step"] <= 6
        if status["state"] in ("SUCCESS", "FAILURE"):
            break
        time.sleep(0.02)
    assert "PROGRESS" in seen, seen
    result = handle.wait(1)
    assert result["output"] == job["output"] and result["shape"] == [1, 4, 32, 32]

    local = dict(job, output=(fleet["root"] / "e2e" / "local.latent").as_uri())
    local_result = run_job(parse_job(local), RunOptions(str(fleet["models"]), "cpu"))
    fleet_bytes = Path(job["output"][len("file://"):]).read_bytes()
    assert fleet_bytes == Path(local["output"][len("file://"):]).read_bytes()
    assert result["sha256"] == local_result["sha256"]


def test_bad_job_fails_naming_the_field_and_writes_nothing(fleet):
    job = make_job(fleet, "bad")
    job["base_sampler"]["model"] = "missing"
    # Routed by hand to the served queue: the worker, not the router, must refuse it.
    handle = submit(job, broker_url=fleet["url"], queue=model_queue("tiny"))
    with pytest.raises(JobFailed) as failed:
        handle.wait(60)
    assert failed.value.state == "FAILURE"
    status = handle.status()
    assert status["meta"]["error"] == "InvalidJob"
    assert status["meta"]["message"].startswith("base_sampler.model:") and "missing" in status["meta"]["message"]
    assert not Path(job["output"][len("file://"):]).exists()
    assert fleet["app"].AsyncResult(handle.task_id).retries in (0, None)


def test_same_job_id_runs_once_and_a_redelivered_finished_job_is_not_redone(fleet):
    job = make_job(fleet, "once")
    first = submit(job, broker_url=fleet["url"])
    second = submit(job, broker_url=fleet["url"])
    assert first.submitted and not second.submitted and second.task_id == first.task_id
    result = first.wait(120)
    output = Path(job["output"][len("file://"):])
    mtime = output.stat().st_mtime_ns
    # What a redelivery looks like to the worker: the same message (same task id) again.
    again = fleet["app"].send_task(TASK_NAME, args=[parse_job(job).model_dump(mode="json")],
                                   task_id=first.task_id, queue=model_queue("tiny"))
    time.sleep(0.2)
    assert JobHandle(again.id, fleet["app"]).wait(60) == result  # same timings: returned, not recomputed
    assert output.stat().st_mtime_ns == mtime


def test_routing_and_cancel_of_a_queued_job(fleet):
    other = make_job(fleet, "other")
    other["base_sampler"]["model"] = other["mask_sampler"]["model"] = "other"
    queued = submit(other, broker_url=fleet["url"])
    tiny = submit(make_job(fleet, "routed"), broker_url=fleet["url"])
    tiny.wait(120)
    assert queued.status()["state"] == "PENDING"  # the tiny-only worker never took it
    queued.cancel()
    status = queued.status()
    assert status["state"] == "REVOKED"
    with pytest.raises(JobFailed) as failed:
        queued.wait(1)
    assert failed.value.state == "REVOKED"


def test_cancel_running_job_stops_it_without_output(fleet):
    job = make_job(fleet, "long", steps=2000)
    handle = submit(job, broker_url=fleet["url"])
    wait_state(handle, {"PROGRESS"}, 120)
    handle.cancel()
    status = wait_state(handle, {"REVOKED", "SUCCESS", "FAILURE"}, 60)
    assert status["state"] == "REVOKED", status
    time.sleep(0.5)
    assert handle.status()["state"] == "REVOKED"
    assert not Path(job["output"][len("file://"):]).exists()
    # The worker is free again: a next job runs.
    assert submit(make_job(fleet, "after"), broker_url=fleet["url"]).wait(120)["shape"] == [1, 4, 32, 32]
