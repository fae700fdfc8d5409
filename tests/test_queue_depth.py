"""queue_depth against the machine's Redis: priority lists, the unacked hash, missing keys; the exporter."""
from __future__ import annotations

import socket
import urllib.request

import pytest
import redis
from celery import Celery
from fleet_workers import claim_db_url, flush, require_redis
from maskfleet.tasks.queue_depth import (
    PRIORITY_SEP,
    QueueDepthCollector,
    queue_depth,
    serve_queue_depth,
)
from maskfleet.tasks.settings import model_queue

require_redis()

QUEUE = model_queue("sd15")
OTHER = model_queue("other")
PRIORITIES = [0, 0, 2, 4, 7, 9, 9]


@pytest.fixture
def url():
    url = claim_db_url()
    yield url
    flush(url)


@pytest.fixture
def app(url):
    app = Celery("queue-depth-test", broker=url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], broker_connection_retry_on_startup=True)
    yield app
    app.close()


def send(app: Celery, queue: str, priorities: list[int]) -> None:
    for i, pri in enumerate(priorities):
        app.send_task("maskfleet.sample", args=[{"i": i}], queue=queue, priority=pri)


def test_counts_every_priority_list(app, url):
    client = redis.Redis.from_url(url)
    send(app, QUEUE, PRIORITIES)
    send(app, OTHER, [0, 5])
    assert queue_depth(client, QUEUE) == len(PRIORITIES)
    base = sum(1 for p in PRIORITIES if p < 3)  # kombu rounds down to a step: 0..2 -> the plain list
    assert client.llen(QUEUE) == base < len(PRIORITIES)  # what a plain list length sees
    assert client.llen(f"{QUEUE}{PRIORITY_SEP}9") == 2
    assert queue_depth(client, OTHER) == 2


def test_missing_queue_is_zero(url):
    client = redis.Redis.from_url(url)
    assert queue_depth(client, QUEUE) == 0
    assert queue_depth(client, "no.such.queue") == 0


def test_counts_messages_in_flight(app, url):
    client = redis.Redis.from_url(url)
    send(app, QUEUE, [0, 6, 9])
    send(app, OTHER, [0])
    with app.connection_for_read() as conn:
        mine = conn.SimpleQueue(QUEUE, no_ack=False)
        theirs = conn.SimpleQueue(OTHER, no_ack=False)
        taken = mine.get(timeout=5)  # not acked: it moves to the `unacked` hash, out of every list
        other_taken = theirs.get(timeout=5)
        assert client.hlen("unacked") >= 2
        waiting = sum(client.llen(k) for k in [QUEUE, f"{QUEUE}{PRIORITY_SEP}6", f"{QUEUE}{PRIORITY_SEP}9"])
        assert waiting < 3
        assert queue_depth(client, QUEUE) == 3
        assert queue_depth(client, OTHER) == 1
        taken.ack()
        other_taken.ack()
        assert queue_depth(client, QUEUE) == 2
        assert queue_depth(client, OTHER) == 0
        mine.close()
        theirs.close()


def test_collector_and_exporter(app, url):
    send(app, QUEUE, [0, 9])
    (family,) = QueueDepthCollector(url, [QUEUE, OTHER]).collect()
    assert {s.labels["queue"]: s.value for s in family.samples} == {QUEUE: 2, OTHER: 0}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve_queue_depth(port, url, [QUEUE], addr="127.0.0.1")
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f'maskfleet_queue_depth{{queue="{QUEUE}"}} 2.0' in body
