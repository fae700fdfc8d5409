"""Job status webhooks end to end: a real Celery worker posts to a real HTTP receiver that
verifies every signature with `standardwebhooks` (the receiver of test_webhooks.py).

The worker runs with MASKFLEET_WEBHOOK_SECRET, MASKFLEET_CALLBACK_ALLOWLIST naming the
receiver's port only, and MASKFLEET_MAX_JOB_SECONDS=600; this process (the producer)
allows the receiver too, and keeps the default maximum (3600 s).
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
from golden_jobs import IN_REPO_GOLDEN, fleet_job, make_models_dir
from webhook_receiver import SECRET, Receiver, clear_proxies

from maskfleet.client import JobFailed, _app, submit
from maskfleet.tasks.redis_keys import submitted_key
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
WORKER_MAX_SECONDS = 600

require_redis()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("webhooks")
    url = claim_db_url()
    hook = Receiver()
    allowed = f"127.0.0.1:{hook.server.server_address[1]}"
    env = pytest.MonkeyPatch()
    worker = None
    try:
        clear_proxies(env)
        for name in ("MASKFLEET_MAX_JOB_SECONDS", "MASKFLEET_WEBHOOK_SECRET"):
            env.delenv(name, raising=False)
        env.setenv("MASKFLEET_CALLBACK_ALLOWLIST", allowed)
        worker = Worker("webhooks", [model_queue("tiny")], url, make_models_dir(root), root / "worker.log",
                        extra_env={"MASKFLEET_WEBHOOK_SECRET": SECRET, "MASKFLEET_CALLBACK_ALLOWLIST": allowed,
                                   "MASKFLEET_MAX_JOB_SECONDS": str(WORKER_MAX_SECONDS)})
        app = _app(url)
        worker.wait_ready(app)
        yield {"url": url, "root": root, "app": app, "hook": hook}
    finally:
        if worker is not None:
            worker.stop()
        env.undo()
        hook.close()
        flush(url)


def make_job(fleet, name: str, **changes) -> dict:
    return fleet_job(CASE, fleet["root"], name, callback={"url": fleet["hook"].url}, **changes)


def events(fleet, job_id: str) -> list[tuple[str, dict]]:
    hook = fleet["hook"]
    with hook.lock:
        return [(kind, body["data"]) for _, kind, body in hook.received if body["data"].get("job_id") == job_id]


def wait_event(fleet, job_id: str, kind: str, timeout: float = 30.0) -> list[tuple[str, dict]]:
    """This job's events once one of type `kind` arrived (the worker sends a job's events in order)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        seen = events(fleet, job_id)
        if any(k == kind for k, _ in seen):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"no {kind} for {job_id} after {timeout} s: {[k for k, _ in events(fleet, job_id)]}")


def test_successful_job_sends_started_progress_succeeded_signed(fleet):
    job = make_job(fleet, "ok", time_limit=120)
    result = submit(job, broker_url=fleet["url"]).wait(60)
    seen = wait_event(fleet, job["job_id"], "job.succeeded")
    kinds = [k for k, _ in seen]
    assert kinds[0] == "job.started" and kinds[-1] == "job.succeeded", kinds
    assert len(kinds) >= 3 and set(kinds[1:-1]) == {"job.progress"}, kinds
    assert fleet["hook"].bad == []  # every request verified with standardwebhooks
    progress = seen[1][1]
    assert progress["total"] == 6 and progress["sampler"] in ("base", "mask") and progress["task_id"] == job["job_id"]
    last = [data for kind, data in seen if kind == "job.progress"][-1]
    assert (last["step"], last["sampler"]) == (6, "mask")  # the last progress says total/total
    done = seen[-1][1]
    assert done["output"] == job["output"] and done["sha256"] == result["sha256"] and done["task_id"] == job["job_id"]


def test_bad_job_sends_failed_naming_the_field(fleet):
    job = make_job(fleet, "bad")
    job["base_sampler"]["model"] = "missing"
    handle = submit(job, broker_url=fleet["url"], queue=model_queue("tiny"))
    with pytest.raises(JobFailed):
        handle.wait(60)
    seen = wait_event(fleet, job["job_id"], "job.failed")
    assert [k for k, _ in seen] == ["job.started", "job.failed"]
    failed = seen[-1][1]
    assert failed["error"].startswith("base_sampler.model:") and "missing" in failed["error"]
    assert failed["exception"] == "InvalidJob" and failed["task_id"] == job["job_id"]


def test_events_filter_sends_only_the_listed_events(fleet):
    job = make_job(fleet, "filtered", steps=1)
    job["callback"]["events"] = ["succeeded"]
    submit(job, broker_url=fleet["url"]).wait(60)
    assert [k for k, _ in wait_event(fleet, job["job_id"], "job.succeeded")] == ["job.succeeded"]


def test_cancelled_running_job_sends_cancelled(fleet):
    job = make_job(fleet, "cancel", steps=2000)
    handle = submit(job, broker_url=fleet["url"])
    wait_event(fleet, job["job_id"], "job.progress")
    handle.cancel()
    seen = wait_event(fleet, job["job_id"], "job.cancelled")
    assert seen[0][0] == "job.started" and seen[-1][0] == "job.cancelled"
    assert "job.succeeded" not in [k for k, _ in seen]
    assert handle.status()["state"] == "REVOKED"


def test_job_cancelled_while_queued_sends_cancelled_and_nothing_else(fleet):
    """The worker drops a revoked job without running it; the producer still hears `cancelled`."""
    running = make_job(fleet, "busy", steps=2000)
    busy = submit(running, broker_url=fleet["url"])
    wait_event(fleet, running["job_id"], "job.progress")  # the only pool process is taken
    queued = make_job(fleet, "queued-cancel")
    handle = submit(queued, broker_url=fleet["url"])
    handle.cancel()
    busy.cancel()  # frees the worker, which then receives the queued job and drops it
    seen = wait_event(fleet, queued["job_id"], "job.cancelled")
    assert [k for k, _ in seen] == ["job.cancelled"]  # never started
    assert seen[0][1]["queued"] is True and seen[0][1]["task_id"] == queued["job_id"]
    assert handle.status()["state"] == "REVOKED"
    assert not Path(queued["output"][len("file://"):]).exists()
    assert fleet["hook"].bad == []
    wait_event(fleet, running["job_id"], "job.cancelled")


def test_metadata_callback_is_refused_by_the_client_and_nothing_is_sent(fleet):
    job = make_job(fleet, "metadata")
    job["callback"]["url"] = "http://169.254.169.254/latest/meta-data/"
    with pytest.raises(ValueError, match=r"^callback\.url: .*169\.254\.169\.254.*link-local"):
        submit(job, broker_url=fleet["url"])
    assert not redis.Redis.from_url(fleet["url"]).exists(submitted_key(job["job_id"]))  # job_id not even claimed
    assert fleet["app"].AsyncResult(job["job_id"]).state == "PENDING"


def test_callback_the_worker_refuses_fails_the_job_before_it_runs(fleet, monkeypatch):
    other = Receiver()
    try:
        monkeypatch.setenv("MASKFLEET_CALLBACK_ALLOWLIST", "127.0.0.1")  # the producer allows any port here
        job = make_job(fleet, "refused")
        job["callback"]["url"] = other.url
        handle = submit(job, broker_url=fleet["url"])
        with pytest.raises(JobFailed) as failed:
            handle.wait(60)
        assert failed.value.message.startswith("callback.url:") and "loopback" in failed.value.message
        assert not Path(job["output"][len("file://"):]).exists()
        # A later job's events go through the same ordered sender: once its succeeded arrived,
        # anything sent for the refused job would have arrived before it.
        after = make_job(fleet, "after-refused", steps=1)
        after["callback"]["events"] = ["succeeded"]
        submit(after, broker_url=fleet["url"]).wait(60)
        wait_event(fleet, after["job_id"], "job.succeeded")
        assert other.attempts == [] and other.bad == []
    finally:
        other.close()


def test_time_limit_is_the_jobs_own(fleet):
    job = make_job(fleet, "limited", steps=5000, time_limit=6)  # soft limit 1 s, far less than 5000 steps take
    with pytest.raises(JobFailed) as failed:
        submit(job, broker_url=fleet["url"]).wait(60)
    assert failed.value.state == "FAILURE"
    seen = wait_event(fleet, job["job_id"], "job.failed")
    assert seen[-1][1]["exception"] == "SoftTimeLimitExceeded"
    assert not Path(job["output"][len("file://"):]).exists()


def test_time_limit_over_the_maximum_is_refused(fleet):
    job = make_job(fleet, "too-long-client", time_limit=3601)
    with pytest.raises(ValueError, match=r"^time_limit: 3601 s is more than MASKFLEET_MAX_JOB_SECONDS \(3600 s\)"):
        submit(job, broker_url=fleet["url"])
    assert not redis.Redis.from_url(fleet["url"]).exists(submitted_key(job["job_id"]))

    # Within this producer's maximum, over the worker's: the worker refuses it, and says so by webhook.
    job = make_job(fleet, "too-long-worker", time_limit=WORKER_MAX_SECONDS + 1)
    handle = submit(job, broker_url=fleet["url"])
    with pytest.raises(JobFailed) as failed:
        handle.wait(60)
    assert failed.value.message == f"time_limit: {WORKER_MAX_SECONDS + 1} s is more than MASKFLEET_MAX_JOB_SECONDS ({WORKER_MAX_SECONDS} s)"
    seen = wait_event(fleet, job["job_id"], "job.failed")
    assert [k for k, _ in seen] == ["job.failed"] and seen[0][1]["error"] == failed.value.message
    assert not Path(job["output"][len("file://"):]).exists()
