"""What an operator watches, from one real fleet: a worker, a Flower process, a webhook receiver.

Flower (started as the README starts it, API open with FLOWER_UNAUTHENTICATED_API) shows
SUCCESS, FAILURE and REVOKED for a job that succeeded, a bad job and a job cancelled while
running; and a job's progress is the same numbers in every channel that carries it:
`maskfleet status` (the PROGRESS state), the webhooks and the worker's metrics. Flower
shows no progress: its task view and API list a fixed set of fields (docs/fleet.md).
"""
from __future__ import annotations


import pytest
from golden_jobs import IN_REPO_GOLDEN, fleet_job, make_models_dir
from metrics_scrape import free_port, scrape
from webhook_receiver import SECRET, Receiver, clear_proxies

from maskfleet.client import JobFailed, _app, submit
from maskfleet.tasks.settings import model_queue
from fleet_workers import Flower, Worker, claim_db_url, flush, require_redis, wait_for

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"  # 6 steps

require_redis()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitoring")
    url = claim_db_url()
    hook = Receiver()
    allowed = f"127.0.0.1:{hook.server.server_address[1]}"
    metrics_port = free_port()
    env = pytest.MonkeyPatch()
    worker = flower = None
    try:
        clear_proxies(env)
        env.setenv("MASKFLEET_CALLBACK_ALLOWLIST", allowed)
        worker = Worker("monitored", [model_queue("tiny")], url, make_models_dir(root), root / "worker.log",
                        extra_env={"MASKFLEET_WEBHOOK_SECRET": SECRET, "MASKFLEET_CALLBACK_ALLOWLIST": allowed,
                                   "MASKFLEET_METRICS_PORT": str(metrics_port), "MASKFLEET_METRICS_ADDR": "127.0.0.1",
                                   "MASKFLEET_MONITOR_EVENTS": "1"})  # what Flower needs, as docs/fleet.md says
        flower = Flower(url, free_port(), root / "flower.log", extra_env={"MASKFLEET_MONITOR_EVENTS": "1"})
        worker.wait_ready(_app(url))
        flower.wait_ready(worker.name)
        yield {"url": url, "root": root, "hook": hook, "flower": flower, "metrics_port": metrics_port}
    finally:
        for process in (flower, worker):
            if process is not None:
                process.stop()
        env.undo()
        hook.close()
        flush(url)


def make_job(fleet, name: str, **changes) -> dict:
    return fleet_job(CASE, fleet["root"], name, callback={"url": fleet["hook"].url}, **changes)


def progress_events(fleet, job_id: str) -> list[tuple[int, int, str]]:
    hook = fleet["hook"]
    with hook.lock:
        return [(body["data"]["step"], body["data"]["total"], body["data"]["sampler"])
                for _, kind, body in hook.received if kind == "job.progress" and body["data"].get("job_id") == job_id]


def flower_shows(fleet, job_id: str, state: str) -> None:
    wait_for(lambda: fleet["flower"].task_state(job_id) == state, 30, f"{state} for {job_id} in Flower", poll=0.2)


def metrics_progress(fleet) -> tuple[int, int]:
    metrics = scrape(fleet["metrics_port"])
    return int(metrics[("maskfleet_job_step", ())]), int(metrics[("maskfleet_job_total_steps", ())])


def test_flower_shows_success_failure_and_revoked(fleet):
    good = make_job(fleet, "good")
    submit(good, broker_url=fleet["url"]).wait(60)
    flower_shows(fleet, good["job_id"], "SUCCESS")

    bad = make_job(fleet, "bad")
    bad["base_sampler"]["model"] = "missing"  # found out by the worker
    with pytest.raises(JobFailed):
        submit(bad, broker_url=fleet["url"], queue=model_queue("tiny")).wait(60)
    flower_shows(fleet, bad["job_id"], "FAILURE")
    assert "base_sampler.model" in fleet["flower"].get(f"/api/task/info/{bad['job_id']}")["exception"]

    running = make_job(fleet, "cancelled", steps=2000)
    handle = submit(running, broker_url=fleet["url"])
    wait_for(lambda: progress_events(fleet, running["job_id"]), 60, "progress of the long job")
    flower_shows(fleet, running["job_id"], "STARTED")
    handle.cancel()
    flower_shows(fleet, running["job_id"], "REVOKED")  # the task's own task-revoked event
    assert handle.status()["state"] == "REVOKED"


def test_progress_is_the_same_numbers_in_status_webhooks_and_metrics(fleet):
    done = make_job(fleet, "progress-done")
    submit(done, broker_url=fleet["url"]).wait(60)
    wait_for(lambda: progress_events(fleet, done["job_id"]), 30, "progress webhooks")
    sent = progress_events(fleet, done["job_id"])
    assert sent[-1] == (6, 6, "mask")  # the last says total/total
    assert metrics_progress(fleet) == (6, 6)

    running = make_job(fleet, "progress-running", steps=2000)
    handle = submit(running, broker_url=fleet["url"])
    try:
        status = wait_for(lambda: (s := handle.status())["state"] == "PROGRESS" and s["meta"], 60, "PROGRESS in status")
        step, total, sampler = status["step"], status["total"], status["sampler"]
        assert total == 2000 and 1 <= step < total
        # Webhooks and the PROGRESS state come from the same throttled update.
        wait_for(lambda: (step, total, sampler) in progress_events(fleet, running["job_id"]), 30,
                 f"webhook for step {step}")
        # The metrics gauge moves on; what it says is one of the updates sent.
        scraped = metrics_progress(fleet)
        assert scraped[1] == 2000 and scraped[0] in {s for s, _, _ in progress_events(fleet, running["job_id"])}
    finally:
        handle.cancel()
    wait_for(lambda: handle.status()["state"] == "REVOKED", 60, "the long job cancelled")
