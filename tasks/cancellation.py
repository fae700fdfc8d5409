"""Cancelling jobs: a Redis flag per task id, and a message on a channel of the same name.

`maskfleet cancel` (client.JobHandle.cancel) sets `maskfleet:cancel:<task_id>`, publishes
on the channel `maskfleet:cancel:<task_id>`, and revokes the task id through Celery, so a
queued job is dropped by the worker that receives it. A job that starts subscribes to its
channel, then reads the flag once (a cancel sent before the subscription is the flag, one
after it the message): from then on, asking whether it was cancelled reads the
subscription's socket, not Redis, so the loop asks at most every CHECK_SECONDS at no
broker cost (it was one Redis command per sampler call, thousands per job on a fast GPU).
Each process (each job thread, in a pipelined worker) keeps one subscription connection
and changes its channel per job. If that connection breaks, messages sent meanwhile are
lost, so the job falls back to reading the flag every CHECK_SECONDS.

Once the job sees the cancel, the loop raises SamplingStopped before writing anything and
the job ends as REVOKED: the task stores TaskRevokedError("cancelled") through the result
backend and raises Ignore, so Celery leaves that state alone and acks the message. No
output is written. Ignore sends no task event, so the task sends `task-revoked` itself
(when events are on): Flower would otherwise show the job STARTED for ever.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable, NoReturn

import redis
from celery.exceptions import Ignore

from ..sampling.errors import SamplingStopped
from .lifecycle import Concern, TaskRun
from .redis_keys import cancel_key, connection, ttl

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
CHECK_SECONDS = 0.25  # how often the loop asks; with the subscription a local socket read

_local = threading.local()  # this thread's subscription: (pid, client, PubSub)


def request_cancel(task_id: str, url: str | None = None) -> None:
    client = connection(url)
    client.set(cancel_key(task_id), "1", ex=ttl())
    if hasattr(client, "publish"):  # the embedded fleet's store has no channels: its jobs read the flag
        client.publish(cancel_key(task_id), "1")


def cancel_requested(task_id: str) -> bool:
    return bool(connection().exists(cancel_key(task_id)))


def _subscription(client: Any) -> Any:
    """This thread's PubSub on `client`, made once per process and thread; None where `client` has no pub/sub."""
    held = getattr(_local, "held", None)
    if held is None or held[0] != os.getpid() or held[1] is not client:
        if not hasattr(client, "pubsub"):
            return None
        held = _local.held = (os.getpid(), client, client.pubsub(ignore_subscribe_messages=True))
    return held[2]


def _forget_subscription() -> None:
    held = getattr(_local, "held", None)
    _local.held = None
    if held is not None:
        try:
            held[2].close()
        except Exception:  # a broken connection may fail to close; it is dropped either way
            pass


class CancelWatch:
    """One job's ear for its cancel: subscribed to its channel, then the flag read once."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        self.channel = cancel_key(task_id)
        self.pubsub = _subscription(connection())
        if self.pubsub is not None:
            self.pubsub.subscribe(self.channel)
        self.requested = cancel_requested(task_id)

    def cancelled(self) -> bool:
        """Whether a cancel arrived: a read of the subscription's socket (the flag itself without one)."""
        if self.requested:
            return True
        if self.pubsub is None:
            self.requested = cancel_requested(self.task_id)
            return self.requested
        try:
            while (message := self.pubsub.get_message(timeout=0.0)) is not None:
                if message.get("type") == "message" and _text(message.get("channel")) == self.channel:
                    self.requested = True
        except redis.RedisError as e:  # what was published meanwhile is lost: read the flag from now on
            log.warning("job %s: cancel subscription lost (%s); reading the cancel flag instead", self.task_id, e)
            _forget_subscription()
            self.pubsub = None
            self.requested = cancel_requested(self.task_id)
        return self.requested

    def close(self) -> None:
        if self.pubsub is None:
            return
        try:
            self.pubsub.unsubscribe(self.channel)
        except redis.RedisError:
            _forget_subscription()
        self.pubsub = None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def stop_hook(cancelled: Callable[[], bool], min_interval: float = CHECK_SECONDS,
              clock: Callable[[], float] = time.monotonic) -> Callable[[], bool]:
    """The loop's `should_stop`: `cancelled()` asked at the first call and then at most every `min_interval` s;
    once it says yes, true without asking again."""
    last: float | None = None
    requested = False

    def should_stop() -> bool:
        nonlocal last, requested
        now = clock()
        if not requested and (last is None or now - last >= min_interval):
            last = now
            requested = cancelled()
        return requested

    return should_stop


def end_cancelled(task: Any) -> NoReturn:
    """Store REVOKED for the running task and tell Celery not to record anything else."""
    task.backend.mark_as_revoked(task.request.id, CANCELLED, request=task.request)
    if task.app.conf.worker_send_task_events:
        try:  # as Celery's own revoke sends it (celery.worker.request.Request.send_event)
            task.send_event("task-revoked", retry=False, terminated=True, signum=None, expired=False)
        except Exception as e:  # the state is stored; a monitor missing the event is not the job's failure
            log.warning("task-revoked event not sent for %s: %s", task.request.id, e)
    raise Ignore()


class Cancellation(Concern):
    """A job cancelled before it starts ends REVOKED at once; a running one at its next sampler call."""

    def before(self, run: TaskRun) -> None:
        run.cancel_watch = CancelWatch(run.task_id)
        if run.cancel_watch.requested:
            end_cancelled(run.task)
        run.stops.append(stop_hook(run.cancel_watch.cancelled))

    def failed(self, run: TaskRun, error: Exception) -> None:
        if isinstance(error, SamplingStopped):
            end_cancelled(run.task)

    def after(self, run: TaskRun) -> None:
        if run.cancel_watch is not None:
            run.cancel_watch.close()
