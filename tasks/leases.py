"""Heartbeat leases: a dead worker's jobs go back to the queue within a minute, a live worker's never.

With Redis as the broker, a delivered job that is not yet acknowledged sits in the hash
``unacked`` with its delivery time in the sorted set ``unacked_index``; every worker's
kombu periodically moves back to its queue each message whose time there is older than
the visibility timeout. On its own that forces a bad choice (Celery issues 5935, 7651):
a long timeout leaves a dead host's job stranded for hours, a short one hands a long job
to a second worker while the first is still running it.

Here that time is a lease. The main process of every worker (not the pool child, which
may be busy in the model for an hour) refreshes, every ``lease / 6`` seconds, the score
of each message it holds (reserved, running, or waiting for a retry countdown) to now,
with ``ZADD XX`` so a message acked meanwhile is not brought back. The visibility timeout
is the lease (``MASKFLEET_LEASE_SECONDS``, default 30 s) and kombu's sweep runs every few
seconds, so:

- a worker that dies (host lost, SIGKILL of the whole worker) stops refreshing, and a
  live worker returns its job to the queue within lease + sweep interval (about 40 s);
- a job whose worker lives keeps a fresh score however long it runs, and is never
  handed out again. The restore itself is kombu's transaction on ``unacked``, so two
  live workers sweeping at once restore a message once.

A pool child killed alone (OOM killer, segfault) is handled by Celery itself:
``task_reject_on_worker_lost`` puts the job back at once, at the head of its queue
(front_requeue.py). On a broker outage the
running job is cancelled (``worker_cancel_long_running_tasks_on_connection_loss``), its
request is dropped here, and once Redis is back the lease runs out and it is redelivered.

Every worker of a fleet must run this (any ``maskfleet worker`` or
``celery -A maskfleet.tasks.app worker`` does): a plain Celery worker on the same Redis
would hold jobs without refreshing them, and they would be redelivered after the lease.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Iterable

import redis
from celery.signals import worker_ready, worker_shutdown

from .redis_urls import REDIS_SCHEMES, redis_client, scheme
from .settings import load_settings

log = logging.getLogger(__name__)

UNACKED_INDEX_KEY = "unacked_index"  # kombu's default; we never set `unacked_index_key`


def heartbeat_interval(lease_seconds: int) -> float:
    """How often a worker refreshes its leases: six times per lease, at most every 5 s."""
    return min(5.0, max(0.25, lease_seconds / 6))


def poll_interval(lease_seconds: int) -> float:
    """How long an idle worker's BRPOP waits before it is sent again (kombu's default: 1 s); a
    job arriving ends it at once, so this only sets the idle cost and is kept under the lease."""
    return heartbeat_interval(lease_seconds)


def restore_interval(lease_seconds: int) -> int:
    """How often kombu sweeps for expired leases: a third of the lease, 1..10 s."""
    return max(1, min(10, lease_seconds // 3))


def held_requests(worker_state: Any) -> set[Any]:
    """Every request this worker process holds (reserved, running, scheduled), from celery.worker.state."""
    requests: set[Any] = set()
    for _ in range(3):  # the consumer thread may change the collections while we copy them
        try:
            requests = set(worker_state.requests.values())
            for name in ("reserved_requests", "active_requests", "scheduled_requests"):
                requests.update(tuple(getattr(worker_state, name, ())))
            break
        except RuntimeError:
            continue
    return requests


def held_delivery_tags(worker_state: Any) -> list[str]:
    """Delivery tags of every message this worker process holds, from celery.worker.state."""
    tags = []
    for request in held_requests(worker_state):
        message = getattr(request, "message", None)
        tag = getattr(message, "delivery_tag", None)
        if tag is not None:
            tags.append(tag if isinstance(tag, str) else str(tag))
    return tags


def refresh_leases(client: redis.Redis, tags: Iterable[str], now: float | None = None,
                   index_key: str = UNACKED_INDEX_KEY) -> int:
    """Set the unacked score of each tag to `now`; only tags still unacked count. Returns how many."""
    tags = list(tags)
    if not tags:
        return 0
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    for tag in tags:
        pipe.zadd(index_key, {tag: now}, xx=True, ch=True)
    return sum(int(n) for n in pipe.execute())


class LeaseHeartbeat:
    """A daemon thread in the worker's main process refreshing the leases of what it holds."""

    def __init__(self, broker_url: str, lease_seconds: int, worker_state: Any):
        self.client = redis_client(broker_url, socket_timeout=max(1.0, lease_seconds / 3),
                                   socket_connect_timeout=max(1.0, lease_seconds / 3))
        self.interval = heartbeat_interval(lease_seconds)
        self.worker_state = worker_state
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maskfleet-lease-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> "LeaseHeartbeat":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self.interval + 1)

    def beat(self) -> int:
        # Holding nothing costs no command: an idle worker's only traffic is its BRPOP.
        return refresh_leases(self.client, held_delivery_tags(self.worker_state))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
                if self._failing:
                    log.info("lease heartbeat reaches Redis again")
                self._failing = False
            except redis.RedisError as e:
                if not self._failing:  # once per outage, not every beat
                    log.warning("lease heartbeat cannot reach Redis (%s); held jobs are redelivered "
                                "if this lasts past the lease", e)
                self._failing = True


_heartbeat: LeaseHeartbeat | None = None


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _heartbeat
    app = getattr(sender, "app", None)
    url = app.conf.broker_url if app is not None else load_settings().broker_url
    if _heartbeat is not None or scheme(url) not in REDIS_SCHEMES:
        return  # the embedded demo fleet's memory broker has no visibility timeout
    from celery.worker import state

    _heartbeat = LeaseHeartbeat(url, load_settings().lease_seconds, state).start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    global _heartbeat
    if _heartbeat is not None:
        _heartbeat.stop()
        _heartbeat = None
