"""Cancelling jobs: a Redis flag per task id, read by the worker between sampler calls.

`maskfleet cancel` (client.JobHandle.cancel) sets `maskfleet:cancel:<task_id>` and also
revokes the task id through Celery, so a queued job is dropped by the worker that
receives it. A running job reads the flag at its first sampler call and then at most every
CHECK_SECONDS (not at every call: thousands of calls per job on a fast GPU would each be a
Redis command); once it sees it, the loop raises SamplingStopped before writing anything
and the job ends as REVOKED: the task stores TaskRevokedError("cancelled") through the
result backend and raises Ignore, so Celery leaves that state alone and acks the message. No output is written. Ignore sends no task
event, so the task sends `task-revoked` itself (when events are on): Flower would
otherwise show the job STARTED for ever.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, NoReturn

from celery.exceptions import Ignore

from ..sampling.errors import SamplingStopped
from .lifecycle import Concern, TaskRun
from .redis_keys import cancel_key, connection, ttl

log = logging.getLogger(__name__)

CANCELLED = "cancelled"
CHECK_SECONDS = 0.25  # the progress updates' rate (progress.Throttle)


def request_cancel(task_id: str, url: str | None = None) -> None:
    connection(url).set(cancel_key(task_id), "1", ex=ttl())


def cancel_requested(task_id: str) -> bool:
    return bool(connection().exists(cancel_key(task_id)))


def stop_hook(task_id: str, min_interval: float = CHECK_SECONDS,
              clock: Callable[[], float] = time.monotonic) -> Callable[[], bool]:
    """The loop's `should_stop`: the cancel flag read at the first call and then at most every `min_interval` s;
    once it is seen, true without reading again."""
    last: float | None = None
    requested = False

    def should_stop() -> bool:
        nonlocal last, requested
        now = clock()
        if not requested and (last is None or now - last >= min_interval):
            last = now
            requested = cancel_requested(task_id)
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
        if cancel_requested(run.task_id):
            end_cancelled(run.task)
        run.stops.append(stop_hook(run.task_id))

    def failed(self, run: TaskRun, error: Exception) -> None:
        if isinstance(error, SamplingStopped):
            end_cancelled(run.task)
