"""The pipelined worker (MASKFLEET_PIPELINE=1): job threads around one model lane, with a real Celery worker.

One worker (`-P threads`, batches of up to 2 jobs so 4 job threads, the default fused
batch forward, one torch thread) on a claimed Redis DB runs jobs whose inputs and outputs are
local files. What must hold: every output is bitwise the in-process run's, batched or
not; the lane samples one batch at a time (sampling windows never overlap) while other
threads' I/O overlaps them; cancel and the soft time limit, which a thread pool cannot
enforce with signals, still stop a running job with no output.
"""
from __future__ import annotations

import time

import pytest
from golden_jobs import make_models_dir
from metrics_scrape import free_port, scrape
from tiny_jobs import file_sha256, job_from, output_path, reference_sha256, write_tiny_inputs

from maskfleet.client import JobFailed, _app, submit
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis, wait_for

STEPS = 4
LONG_STEPS = 2000  # far longer than any wait here: stopped by cancel or by the time limit

require_redis()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelined")
    url = claim_db_url()
    models = make_models_dir(root)
    template = write_tiny_inputs(root / "inputs", size=16)
    template["steps"] = STEPS
    port = free_port()
    worker = Worker("pipelined", [model_queue("tiny")], url, models, root / "worker.log",
                    {"MASKFLEET_PIPELINE": "1", "MASKFLEET_BATCH_JOBS": "2", "MASKFLEET_TORCH_THREADS": "1",
                     "MASKFLEET_METRICS_PORT": str(port)})
    try:
        worker.wait_ready(_app(url))
        yield {"root": root, "url": url, "models": models, "template": template, "worker": worker, "port": port}
    finally:
        worker.stop()
        flush(url)


def make_job(fleet, name: str, **changes) -> dict:
    job_id = f"{name}-{time.time_ns()}"
    return job_from(fleet["template"], job_id, fleet["root"] / "out" / f"{job_id}.latent", **changes)


def test_queued_jobs_sample_one_batch_at_a_time_with_the_in_process_output(fleet):
    (fleet["root"] / "out").mkdir(exist_ok=True)
    jobs = [make_job(fleet, f"lane{i}") for i in range(6)]
    results = [h.wait(120) for h in [submit(job, broker_url=fleet["url"]) for job in jobs]]
    expected = reference_sha256(fleet["template"], fleet["root"] / "reference.latent", fleet["models"])
    assert [file_sha256(output_path(job)) for job in jobs] == [expected] * len(jobs)
    assert {r["sha256"] for r in results} == {expected}
    batches = {(r["timestamps"]["sampling"], r["timestamps"]["sampled"]): r["timestamps"] for r in results}
    assert len(batches) < len(jobs)  # some jobs were sampled together (the same window)
    assert "sampling 2 jobs as one batch" in (fleet["root"] / "worker.log").read_text()
    stamps = sorted(batches.values(), key=lambda t: t["sampling"])
    pairs = list(zip(stamps, stamps[1:]))
    assert all(n["sampling"] >= p["sampled"] for p, n in pairs), stamps  # one model lane: never two at once
    # The next job was prepared meanwhile and began sampling before the previous job's output was written.
    assert any(n["sampling"] < p["finished"] for p, n in pairs), stamps
    # No pool process here: the worker's main process serves the metrics.
    succeeded = scrape(fleet["port"])[("maskfleet_jobs_total", (("outcome", "succeeded"),))]
    assert succeeded >= len(jobs)


def test_cancel_stops_a_running_job_without_output(fleet):
    (fleet["root"] / "out").mkdir(exist_ok=True)
    job = make_job(fleet, "cancelled", steps=LONG_STEPS)
    handle = submit(job, broker_url=fleet["url"])
    wait_for(lambda: handle.status()["state"] == "PROGRESS", 60, "the long job sampling")
    handle.cancel()
    with pytest.raises(JobFailed) as failed:
        handle.wait(60)
    assert failed.value.state == "REVOKED"
    assert not output_path(job).exists()
    after = make_job(fleet, "after-cancel")
    assert submit(after, broker_url=fleet["url"]).wait(60)["sha256"] == file_sha256(output_path(after))


def test_the_soft_time_limit_ends_a_job_between_sampler_calls(fleet):
    (fleet["root"] / "out").mkdir(exist_ok=True)
    job = make_job(fleet, "too-long", steps=LONG_STEPS, time_limit=8)  # soft limit 3 s
    handle = submit(job, broker_url=fleet["url"])
    with pytest.raises(JobFailed) as failed:
        handle.wait(60)
    assert failed.value.state == "FAILURE"
    assert "SoftTimeLimitExceeded" in str(failed.value) and "3 s" in str(failed.value), str(failed.value)
    assert not output_path(job).exists()
