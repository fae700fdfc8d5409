"""The webhook receiver fails under a real worker: down, slow, or answering 500.

A real Celery worker posts its jobs' events to a real HTTP receiver that verifies every
signature with `standardwebhooks` (webhook_receiver.py). What must hold whatever the
receiver does: the job's own result is unaffected (SUCCESS, its sampling time not
stretched by the receiver); each delivery is retried with growing waits under the same
webhook-id, up to a bound; a receiver that recovers within that bound gets the events.

The worker's retry bound is shortened through the environment (tasks/webhooks.py,
the MASKFLEET_WEBHOOK_* settings): MAX_ATTEMPTS attempts, waits of BACKOFF, 2*BACKOFF, 4*BACKOFF ... (at most
8 s) between them, DEADLINE seconds in all, TIMEOUT seconds per attempt.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import pytest
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job
from webhook_receiver import SECRET, Receiver, clear_proxies

from maskfleet.cli import main
from maskfleet.client import _app, submit
from maskfleet.tasks.settings import model_queue
from maskfleet.tasks.webhooks import WebhookSender, retry_options_from_env
from fleet_workers import Worker, claim_db_url, flush, require_redis, wait_for

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
MAX_ATTEMPTS = 8
BACKOFF = 0.1
DEADLINE = 30
TIMEOUT = 3
RETRY_SPAN = sum(min(BACKOFF * 2 ** n, 8.0) for n in range(MAX_ATTEMPTS - 1))  # first to last attempt, 12.7 s
LEASE = 4  # the outbox sweep runs every 2 s: a replayed event goes out within that
PORTS = ("down", "other", "slow", "flaky", "dead", "too-slow")

require_redis()


def reserve_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-webhooks")
    url = claim_db_url()
    ports = {name: reserve_port() for name in PORTS}
    allowed = ",".join(f"127.0.0.1:{port}" for port in ports.values())
    env = pytest.MonkeyPatch()
    worker = None
    try:
        clear_proxies(env)
        env.setenv("MASKFLEET_CALLBACK_ALLOWLIST", allowed)  # the producer checks callbacks too
        worker = Worker("hookfaults", [model_queue("tiny")], url, make_models_dir(root), root / "worker.log",
                        extra_env={"MASKFLEET_WEBHOOK_SECRET": SECRET, "MASKFLEET_CALLBACK_ALLOWLIST": allowed,
                                   "MASKFLEET_WEBHOOK_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
                                   "MASKFLEET_WEBHOOK_BACKOFF": str(BACKOFF),
                                   "MASKFLEET_WEBHOOK_DEADLINE": str(DEADLINE),
                                   "MASKFLEET_WEBHOOK_TIMEOUT": str(TIMEOUT),
                                   "MASKFLEET_WEBHOOK_LEASE": str(LEASE),
                                   "MASKFLEET_TORCH_THREADS": "1"})
        app = _app(url)
        worker.wait_ready(app)
        yield {"url": url, "root": root, "app": app, "worker": worker, "ports": ports}
    finally:
        if worker is not None:
            worker.stop()
        env.undo()
        flush(url)


@pytest.fixture(scope="module")
def baseline(fleet):
    """The same job without a callback: its sampling time is what a job with one should take."""
    result = submit(make_job(fleet, "baseline", None), broker_url=fleet["url"]).wait(120)
    return result["seconds"]


def hook_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/hook?token=abc"


def make_job(fleet, name: str, port: int | None, events: list[str] | None = None) -> dict:
    job_path, _, _ = write_case_job(CASE, fleet["root"] / name)
    job = json.loads(job_path.read_text())
    job["job_id"] = f"{name}-{time.time_ns()}"
    if port is not None:
        job["callback"] = {"url": hook_url(port), **({"events": events} if events else {})}
    return job



def delivered(hook: Receiver, job_id: str) -> list[tuple[str, str, dict]]:
    """This job's events answered 2xx: (webhook-id, type, data), in arrival order."""
    with hook.lock:
        return [(msg_id, kind, body["data"]) for msg_id, kind, body in hook.received
                if body["data"].get("job_id") == job_id]


def sender_retries(fleet, port: int) -> list[tuple[str, str, float]]:
    """The worker's log lines for failed attempts to this port: (type, webhook-id, wait before the next)."""
    text = fleet["worker"].log.read_text(errors="replace")
    pattern = (rf"webhook (job\.\w+) \((msg_\w+)\) to http://127\.0\.0\.1:{port}/hook failed \(.*?\), "
               r"retry \d+ in ([\d.]+) s")
    return [(kind, msg_id, float(wait)) for kind, msg_id, wait in re.findall(pattern, text)]


def dropped(fleet, port: int) -> list[tuple[str, str, int]]:
    text = fleet["worker"].log.read_text(errors="replace")
    pattern = rf"webhook (job\.\w+) \((msg_\w+)\) to http://127\.0\.0\.1:{port}/hook (?:dropped|dead-lettered) after (\d+) attempt"
    return [(kind, msg_id, int(n)) for kind, msg_id, n in re.findall(pattern, text)]


def assert_growing(waits: list[float]) -> None:
    expected = [min(BACKOFF * 2 ** n, 8.0) for n in range(len(waits))]
    assert waits == pytest.approx(expected), waits


def test_receiver_down_during_the_job_gets_every_event_once_it_is_back(fleet, baseline, receivers):
    port = fleet["ports"]["down"]  # nothing listens there: connection refused
    job = make_job(fleet, "down", port)
    submitted = time.monotonic()
    result = submit(job, broker_url=fleet["url"]).wait(120)
    done = time.monotonic() - submitted
    # The job ended while its receiver was down, and no slower than its events' first retry span.
    assert result["seconds"]["total"] < RETRY_SPAN


    def started_retries():
        return [r for r in sender_retries(fleet, port) if r[0] == "job.started"]

    retried = wait_for(lambda: len(started_retries()) >= 3 and started_retries(), RETRY_SPAN, "3 failed attempts")
    assert len({msg_id for _, msg_id, _ in retried}) == 1  # the same webhook-id on every retry
    assert_growing([wait for _, _, wait in retried])

    hook = receivers(port=port)  # the receiver comes back
    back = time.monotonic()
    seen = wait_for(lambda: [e for e in delivered(hook, job["job_id"])
                             if e[1] == "job.succeeded"] and delivered(hook, job["job_id"]),
                    RETRY_SPAN + 10, "succeeded event")
    kinds = [kind for _, kind, _ in seen]
    assert kinds[0] == "job.started" and kinds[-1] == "job.succeeded", kinds
    assert set(kinds[1:-1]) <= {"job.progress"} and len(kinds) <= 4  # progress that piled up: first and latest
    assert hook.bad == []  # every request verified with standardwebhooks
    assert seen[0][0] == retried[0][1]  # the started event is the one that was retried
    assert seen[-1][2]["sha256"] == result["sha256"]
    assert dropped(fleet, port) == []
    print(f"receiver down: job SUCCESS in {done:.2f} s (sampling {result['seconds']['sampling']:.2f} s, "
          f"baseline {baseline['sampling']:.2f} s); started retried {len(started_retries())} times before the "
          f"receiver came back; all {len(kinds)} events delivered {time.monotonic() - back:.2f} s after")


def test_slow_receiver_does_not_slow_the_job(fleet, baseline, receivers):
    delay = 2.5  # under the sender's TIMEOUT: slow, not timing out
    hook = receivers(port=fleet["ports"]["slow"], delay=delay)
    job = make_job(fleet, "slow", hook.server.server_address[1])
    submitted = time.monotonic()
    result = submit(job, broker_url=fleet["url"]).wait(120)
    done = time.monotonic()
    # Blocked on its webhooks, the job would sample for `delay` more per progress event (the
    # first and the last at least); the margin is for a loaded machine's noise.
    assert result["seconds"]["sampling"] < baseline["sampling"] + 2 * delay
    seen = wait_for(lambda: [e for e in delivered(hook, job["job_id"]) if e[1] == "job.succeeded"]
                    and delivered(hook, job["job_id"]), 120, "succeeded event")
    late = time.monotonic() - done
    kinds = [kind for _, kind, _ in seen]
    assert kinds[0] == "job.started" and kinds[-1] == "job.succeeded" and hook.bad == []
    # Progress that piled up behind the slow receiver is coalesced: the final event is not
    # held back by a backlog of stale progress (at most the one in flight and the latest).
    assert late < 4 * delay + 3, (late, kinds)
    print(f"slow receiver ({delay} s per request): job SUCCESS in {done - submitted:.2f} s (sampling "
          f"{result['seconds']['sampling']:.2f} s, baseline {baseline['sampling']:.2f} s); {len(kinds)} events, "
          f"succeeded delivered {late:.2f} s after the job ended")


def test_receiver_answering_500_for_a_while_gets_the_events(fleet, receivers):
    failures = 3
    hook = receivers(port=fleet["ports"]["flaky"], statuses=[500] * failures)
    job = make_job(fleet, "flaky", hook.server.server_address[1], events=["started", "succeeded"])
    result = submit(job, broker_url=fleet["url"]).wait(120)
    seen = wait_for(lambda: [e for e in delivered(hook, job["job_id"]) if e[1] == "job.succeeded"]
                    and delivered(hook, job["job_id"]), 60, "succeeded event")
    assert [kind for _, kind, _ in seen] == ["job.started", "job.succeeded"] and hook.bad == []
    started = [a for a in hook.log if a.msg_id == seen[0][0]]
    assert [a.status for a in started] == [500] * failures + [200]  # one webhook-id for all attempts
    gaps = [b.at - a.at for a, b in zip(started, started[1:])]
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:])), gaps
    assert gaps[0] >= BACKOFF and gaps[-1] >= BACKOFF * 2 ** (failures - 1)
    assert seen[1][2]["sha256"] == result["sha256"]
    print(f"500 x{failures}: started delivered on attempt {len(started)}, gaps {[round(g, 2) for g in gaps]} s")


def test_receiver_always_answering_500_is_given_up_after_the_bound_without_holding_others(fleet, receivers, capsys):
    hook = receivers(port=fleet["ports"]["dead"], statuses=[500] * 100)
    port = hook.server.server_address[1]
    job = make_job(fleet, "dead", port, events=["succeeded"])
    result = submit(job, broker_url=fleet["url"]).wait(120)
    assert result["output"] == job["output"]  # the job's own result is unaffected

    # Meanwhile the next job's receiver gets its events at once, not after those retries.
    other = receivers(port=fleet["ports"]["other"])
    second = make_job(fleet, "other", fleet["ports"]["other"], events=["started", "succeeded"])
    submit(second, broker_url=fleet["url"]).wait(120)
    wait_for(lambda: len(delivered(other, second["job_id"])) == 2, 10, "the next job's events")
    assert dropped(fleet, port) == [] and other.bad == []  # still retrying the first job's event
    retrying = len(hook.log)

    gave_up = wait_for(lambda: dropped(fleet, port), RETRY_SPAN + 2 * DEADLINE, "drop log line")
    assert [(kind, n) for kind, _, n in gave_up] == [("job.succeeded", MAX_ATTEMPTS)]
    attempts = [a for a in hook.log if a.msg_id == gave_up[0][1]]
    assert len(attempts) == MAX_ATTEMPTS and {a.status for a in attempts} == {500}
    assert len(hook.log) == MAX_ATTEMPTS  # nothing else was sent there
    span = attempts[-1].at - attempts[0].at
    assert RETRY_SPAN * 0.9 <= span <= DEADLINE
    assert_growing([wait for _, _, wait in sender_retries(fleet, port)])

    # Dead-lettered, not lost: listed, then replayed once the receiver answers again.
    assert main(["webhooks", "--redis", fleet["url"], "list-failed"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    mine = [entry for entry in listed if entry["job_id"] == job["job_id"]]
    assert [(e["type"], e["webhook_id"], e["error"], e["attempts"]) for e in mine] == \
        [("job.succeeded", gave_up[0][1], "HTTP 500", MAX_ATTEMPTS)]
    with hook.lock:
        hook.statuses.clear()
    assert main(["webhooks", "--redis", fleet["url"], "replay", mine[0]["id"]]) == 0
    replayed = wait_for(lambda: delivered(hook, job["job_id"]), 4 * LEASE, "the replayed event")
    assert [(msg_id, kind) for msg_id, kind, _ in replayed] == [(gave_up[0][1], "job.succeeded")]
    print(f"always 500: {len(attempts)} attempts over {span:.2f} s, then dead-lettered; the next job's events "
          f"arrived while it was at attempt {retrying}; replayed by the CLI and delivered with the same webhook-id")


def test_receiver_too_slow_once_gets_the_event_again_with_the_same_id(fleet, receivers):
    port = fleet["ports"]["too-slow"]
    hook = receivers(port=port, delays=[TIMEOUT + 1.5])
    job = make_job(fleet, "too-slow", port, events=["started", "succeeded"])
    submit(job, broker_url=fleet["url"]).wait(120)
    seen = wait_for(lambda: len(delivered(hook, job["job_id"])) >= 3 and delivered(hook, job["job_id"]),
                    60, "three deliveries")
    # The first attempt of started timed out at the sender and was sent again: the receiver
    # got (and answered) it twice under one webhook-id, which is how it can tell.
    ids = {kind: {msg_id for msg_id, k, _ in seen if k == kind} for _, kind, _ in seen}
    assert sorted(kind for _, kind, _ in seen) == ["job.started", "job.started", "job.succeeded"]
    assert len(ids["job.started"]) == 1 and ids["job.started"] != ids["job.succeeded"] and hook.bad == []
    assert [kind for kind, _, _ in sender_retries(fleet, port)] == ["job.started"]


# --- the sender in this process: its lanes and its settings ---

@pytest.fixture
def no_proxies(monkeypatch):
    clear_proxies(monkeypatch)


def test_an_idle_lane_ends_and_a_later_event_starts_another(no_proxies, receivers):
    hook = receivers()
    sender = WebhookSender(secret=SECRET, backoff=0.05)
    sender.LANE_IDLE_S = 0.2
    lane_name = f"maskfleet-webhooks http://127.0.0.1:{hook.server.server_address[1]}"

    def lanes() -> int:
        return sum(thread.name == lane_name for thread in threading.enumerate())

    try:
        sender.emit(hook.url, "started", {"job_id": "j1"})
        assert sender.flush(5) and lanes() == 1
        wait_for(lambda: lanes() == 0, 5, "the idle lane to end")
        sender.emit(hook.url, "succeeded", {"job_id": "j1"})
        assert sender.flush(5)
        assert hook.types() == ["job.started", "job.succeeded"] and hook.bad == []
    finally:
        sender.close(1)


def test_retry_bound_from_the_environment():
    assert retry_options_from_env({}) == {"max_attempts": 6, "backoff": 0.5, "deadline": 60.0, "timeout": 5.0}
    assert retry_options_from_env({"MASKFLEET_WEBHOOK_MAX_ATTEMPTS": "3", "MASKFLEET_WEBHOOK_DEADLINE": "2.5"}) == {
        "max_attempts": 3, "backoff": 0.5, "deadline": 2.5, "timeout": 5.0}
    with pytest.raises(ValueError, match=r"^MASKFLEET_WEBHOOK_MAX_ATTEMPTS='2\.5': expected a whole number"):
        retry_options_from_env({"MASKFLEET_WEBHOOK_MAX_ATTEMPTS": "2.5"})
    with pytest.raises(ValueError, match=r"^MASKFLEET_WEBHOOK_BACKOFF='0': must be positive"):
        retry_options_from_env({"MASKFLEET_WEBHOOK_BACKOFF": "0"})
