"""The webhook outbox (tasks/webhook_outbox.py, outbox_sweeper.py) against a private redis-server
and a real HTTP receiver that verifies every signature.

A sender "dies" here by closing while its receiver is down: what it held stays in the
outbox and its leases stop being renewed, which is what a SIGKILL leaves behind (the
fleet test in test_fault_webhooks.py kills a real worker).
"""
from __future__ import annotations

import json
import threading
import time

import pytest
from metrics_scrape import free_port
from redis_server import RedisServer
from webhook_receiver import SECRET, clear_proxies

from maskfleet.cli import main
from maskfleet.tasks.app import app
from maskfleet.tasks.outbox_sweeper import OutboxSweeper
from maskfleet.tasks.webhook_outbox import DEAD_KEY, OUTBOX_KEY, Outbox, OutboxEvent
from maskfleet.tasks.webhooks import WebhookSender

LEASE = 1.0


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} after {timeout} s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    redis_server = RedisServer(tmp_path_factory.mktemp("outbox-redis"), persistent=True).start()
    yield redis_server
    redis_server.stop()


@pytest.fixture
def outbox(server, monkeypatch):
    clear_proxies(monkeypatch)
    monkeypatch.delenv("MASKFLEET_CALLBACK_ALLOWLIST", raising=False)
    client = server.client()
    client.delete(OUTBOX_KEY, DEAD_KEY)
    yield Outbox(client, dead_max=100)
    client.delete(OUTBOX_KEY, DEAD_KEY)


@pytest.fixture
def senders(outbox):
    made = []

    def make(**kwargs):
        options = {"secret": SECRET, "timeout": 2.0, "backoff": 0.05, "max_backoff": 0.2, "deadline": 30.0,
                   "max_attempts": 1000, "outbox": outbox, "lease": LEASE}
        made.append(WebhookSender(**{**options, **kwargs}))
        return made[-1]

    yield make
    for sender in made:
        sender.close(timeout=0.5)


def sweeper(outbox, sender, max_age=3600.0, max_size=1000) -> OutboxSweeper:
    return OutboxSweeper(outbox, lambda: sender, LEASE, max_age, max_size)


def outbox_events(outbox) -> list[OutboxEvent]:
    return [OutboxEvent.of(m) for m in outbox.client.zrange(OUTBOX_KEY, 0, -1)]


def die_with_pending_events(senders, url: str, events: list[tuple[str, dict]]) -> list[OutboxEvent]:
    """A sender that emits `events` to an unreachable `url` and dies; what it left in the outbox."""
    dying = senders()
    for kind, data in events:
        dying.emit(url, kind, data)
    wait_until(lambda: len(outbox_events(dying.outbox)) == sum(k != "progress" for k, _ in events), 5, "events stored")
    dying.close(timeout=0.1)
    return outbox_events(dying.outbox)


def take_over(outbox, taker, hook, count: int) -> None:
    """Sweep as a live worker does until the receiver has `count` events (their leases run out one by one)."""
    sweep = sweeper(outbox, taker)

    def received_all() -> bool:
        sweep.sweep()
        return len(hook.received) >= count

    wait_until(received_all, 15, f"{count} events taken over")
    assert taker.flush(10)  # delivered and removed from the outbox


def test_started_and_final_events_stay_in_the_outbox_until_delivered(outbox, senders, receivers):
    hook = receivers(delay=0.3)
    sender = senders()
    for kind in ("started", "progress", "succeeded"):
        sender.emit(hook.url, kind, {"job_id": "j1", "task_id": "t1"})
    stored = outbox_events(outbox)
    assert [e.type for e in stored] == ["job.started", "job.succeeded"]  # progress is never stored
    assert sender.flush(10)
    assert outbox.size() == 0
    assert hook.types() == ["job.started", "job.progress", "job.succeeded"] and hook.bad == []
    assert [msg_id for msg_id, kind, _ in hook.received if kind != "job.progress"] == [e.msg_id for e in stored]


def test_a_dead_senders_events_go_out_from_another_sender_in_order_with_the_same_ids(outbox, senders, receivers):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    left = die_with_pending_events(senders, url, [("started", {"job_id": "j1", "task_id": "t1"}),
                                                  ("progress", {"job_id": "j1", "step": 1}),
                                                  ("succeeded", {"job_id": "j1", "task_id": "t1"})])
    assert [e.type for e in left] == ["job.started", "job.succeeded"]
    hook = receivers(port=port)
    take_over(outbox, senders(), hook, len(left))
    assert [(msg_id, kind) for msg_id, kind, _ in hook.received] == [(e.msg_id, e.type) for e in left]
    assert hook.bad == []  # signed afresh by the taker, with its own timestamp
    assert outbox.size() == 0


def test_a_live_sender_keeps_its_leases_so_nobody_takes_its_events(outbox, senders):
    url = f"http://127.0.0.1:{free_port()}/hook"  # down: the sender keeps retrying
    sender = senders()
    sender.emit(url, "succeeded", {"job_id": "j1", "task_id": "t1"})
    other = sweeper(outbox, senders())
    end = time.monotonic() + 3 * LEASE
    while time.monotonic() < end:
        assert other.sweep() == 0
        time.sleep(LEASE / 4)
    assert outbox.size() == 1


def test_two_sweepers_never_claim_the_same_event(outbox):
    events = [OutboxEvent(f"http://h/{i}", "job.succeeded", f"j{i}", f"msg_{i}", "{}", time.time() + i) for i in range(200)]
    outbox.client.zadd(OUTBOX_KEY, {e.member: 0 for e in events})  # every lease long gone
    claimed: list[list[OutboxEvent]] = [[], []]
    start = threading.Barrier(2)

    def claim(slot: int) -> None:
        start.wait()
        while True:
            got = outbox.claim(LEASE, limit=7)
            if not got:
                return
            claimed[slot].extend(got)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    ids = [e.msg_id for e in claimed[0]] + [e.msg_id for e in claimed[1]]
    assert sorted(ids) == sorted(e.msg_id for e in events) and len(set(ids)) == len(ids)
    assert claimed[0] and claimed[1]  # both took part


def test_given_up_events_are_dead_lettered_then_listed_and_replayed_by_the_cli(outbox, senders, receivers, server, capsys):
    hook = receivers(statuses=[500] * 3)
    sender = senders(max_attempts=3)
    sender.emit(hook.url, "failed", {"job_id": "j9", "task_id": "t9", "error": "steps: bad"})
    assert sender.flush(10)
    assert outbox.size() == 0 and hook.received == []

    assert main(["webhooks", "--redis", server.url(), "list-failed"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(listed) == 1
    entry = listed[0]
    assert (entry["type"], entry["job_id"], entry["error"], entry["attempts"]) == ("job.failed", "j9", "HTTP 500", 3)
    assert "token" not in entry["url"]  # the query may hold a secret

    assert main(["webhooks", "--redis", server.url(), "replay", "msg_nope"]) == 1
    assert main(["webhooks", "--redis", server.url(), "replay", entry["webhook_id"]]) == 0
    assert outbox.dead() == [] and outbox.size() == 1
    taker = senders()
    assert sweeper(outbox, taker).sweep() == 1  # replayed with its lease run out: due at once
    assert taker.flush(10)
    assert [(msg_id, kind) for msg_id, kind, _ in hook.received] == [(entry["webhook_id"], "job.failed")]
    assert outbox.size() == 0


def test_takeover_dead_letters_events_past_the_age_limit_and_drops_started_of_ended_jobs(outbox, senders, receivers):
    hook = receivers()

    def event(kind: str, job: str, emitted_at: float) -> OutboxEvent:
        body = json.dumps({"type": kind, "data": {"job_id": job, "task_id": f"t-{job}"}})
        return OutboxEvent(hook.url, kind, job, f"msg_{job}", body, emitted_at)

    old = event("job.succeeded", "old", time.time() - 100)
    ended = event("job.started", "end", time.time())
    running = event("job.started", "run", time.time())
    outbox.client.zadd(OUTBOX_KEY, {e.member: 0 for e in (old, ended, running)})
    meta_key = app.backend.get_key_for_task
    outbox.client.set(meta_key("t-end"), json.dumps({"status": "SUCCESS"}))
    outbox.client.set(meta_key("t-run"), json.dumps({"status": "STARTED"}))
    taker = senders()
    assert sweeper(outbox, taker, max_age=60).sweep() == 1
    assert taker.flush(10)
    assert [msg_id for msg_id, _, _ in hook.received] == ["msg_run"]
    assert [OutboxEvent.of(d["event"]).msg_id for d in outbox.dead()] == ["msg_old"]
    assert outbox.size() == 0
    outbox.client.delete(meta_key("t-end"), meta_key("t-run"))


def test_an_outbox_past_its_limit_dead_letters_the_oldest(outbox, senders):
    events = [OutboxEvent("http://h/x", "job.succeeded", f"j{i}", f"msg_{i}", "{}", float(i)) for i in range(5)]
    outbox.client.zadd(OUTBOX_KEY, {e.member: time.time() + 60 + i for i, e in enumerate(events)})
    assert sweeper(outbox, senders(), max_size=3).sweep() == 0  # nothing due: only the size check acts
    assert [OutboxEvent.of(d["event"]).msg_id for d in outbox.dead()] == ["msg_0", "msg_1"]
    assert outbox.size() == 3


def test_pending_events_survive_a_redis_restart(outbox, senders, receivers, server):
    port = free_port()
    url = f"http://127.0.0.1:{port}/hook"
    left = die_with_pending_events(senders, url, [("started", {"job_id": "j1", "task_id": "t1"}),
                                                  ("cancelled", {"job_id": "j1", "task_id": "t1"})])
    server.restart()  # AOF fsynced on every write, as docs/scaling.md asks of a production Redis
    assert [e.msg_id for e in outbox_events(outbox)] == [e.msg_id for e in left]
    hook = receivers(port=port)
    take_over(outbox, senders(), hook, len(left))
    assert [msg_id for msg_id, _, _ in hook.received] == [e.msg_id for e in left]
