"""Job status as webhooks: started, progress, succeeded, failed and cancelled, for jobs with a `callback`.

Hooked to the task's lifecycle rather than woven into it:

- started: :func:`announce_start`, the task's one call into this module, made right after
  the job validates. It checks ``callback.url`` against this worker's callback policy
  (refused: the job fails with ``InvalidJob("callback.url: ...")`` before running and that
  URL is never called), then emits ``started``. It is a call and not a ``task_prerun``
  handler because Celery logs a signal handler's exception and runs the task anyway.
- progress: a subscriber of progress.py, so the same throttled updates that set the
  PROGRESS state become webhooks (the sender throttles them again to one per second per
  job and always delivers the latest before the job's final event).
- succeeded: ``task_success``; data = the result dict + ``job_id`` + ``task_id``.
- failed: ``task_failure``; data = ``{"error": message, "exception": type, "job_id",
  "task_id"}``, InvalidJob included. A job that failed before :func:`announce_start`
  (its document did not validate, its time_limit is over this worker's maximum) still
  gets ``failed`` when its ``callback`` part validates and the policy allows its URL.
  So does a hard time limit, which Celery reports from the worker's main process.
- cancelled: ``task_postrun`` with state IGNORED: the task raises Ignore only when it is
  cancelled (cancellation.end_cancelled). A job cancelled while still queued never
  reaches a pool process: the worker's main process drops it, and the task's Request
  class (sample_request.py) calls :func:`announce_dropped`, which sends ``cancelled``
  with ``"queued": true`` (and no ``started`` before it).

The sender is one :class:`WebhookSender` per process, made on the first job with a
callback (so in the prefork child), with its retry bound from the environment
(the MASKFLEET_WEBHOOK_* settings). Its key is ``MASKFLEET_WEBHOOK_SECRET``; when that
is unset or malformed, a job with a callback fails before running with
``RuntimeError("worker misconfigured: ...")``: the worker cannot sign, which is not the
job's fault, and running it silently without its webhooks would be worse. At process
shutdown the sender gets up to ``FLUSH_SECONDS`` to deliver what is queued. The started
and final events are written to the webhook outbox in Redis first (webhook_outbox.py),
before the job is acknowledged: those of a process that is killed (hard time limit, OOM,
the whole worker) are delivered by another worker's sweep (outbox_sweeper.py) once the
dead sender's lease on them runs out. Progress events live in memory only.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import states
from celery.signals import task_failure, task_postrun, task_success, worker_process_shutdown, worker_shutdown
from pydantic import ValidationError

from ..job import Callback, Job
from .callback_policy import check_callback_url
from .errors import InvalidJob
from .lifecycle import Concern, TaskRun
from .metrics import count_webhook
from .progress import subscribe
from .settings import TASK_NAME, load_settings
from .webhook_outbox import fleet_outbox
from .webhooks import WebhookSender, retry_options_from_env

log = logging.getLogger(__name__)

FLUSH_SECONDS = 10.0  # what a shutting-down process waits for queued webhooks, at most

_lock = threading.Lock()
_sender: tuple[int, WebhookSender] | None = None
# Jobs with a callback running in this process: task id -> (callback, job_id).
_watched: dict[str, tuple[Callback, str | None]] = {}


def webhook_sender() -> WebhookSender:
    """This process's sender, made on first use; RuntimeError when the worker has no usable secret."""
    global _sender
    with _lock:
        if _sender is None or _sender[0] != os.getpid():
            try:
                options = retry_options_from_env()
            except ValueError as e:
                raise RuntimeError(f"worker misconfigured: {e}") from None
            try:
                _sender = (os.getpid(), WebhookSender(**options, outbox=fleet_outbox(), lease=load_settings().webhook_lease,
                                                      on_outcome=count_webhook))
            except ValueError as e:
                raise RuntimeError(f"worker misconfigured: the job has a callback but {e}") from None
        return _sender[1]


def announce_start(task: Any, job: Job) -> None:
    """Check the job's callback on this worker, then send `started` (no-op without a callback)."""
    if job.callback is None:
        return
    try:
        check_callback_url(job.callback.url)
    except ValueError as e:
        raise InvalidJob(str(e)) from None
    webhook_sender()
    _watched[task.request.id] = (job.callback, job.job_id)
    _emit(task.request.id, "started", {"worker": task.request.hostname})


def _emit(task_id: str, event: str, data: dict) -> None:
    watched = _watched.get(task_id)
    if watched is not None:
        callback, job_id = watched
        webhook_sender().emit(callback.url, event, {**data, "job_id": job_id, "task_id": task_id}, callback.events)


def _ours(task: Any) -> bool:
    return getattr(task, "name", None) == TASK_NAME


@subscribe
def _on_progress(task: Any, meta: dict) -> None:
    if _ours(task):
        _emit(task.request.id, "progress", meta)


@task_success.connect
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if _ours(sender):
        task_id = sender.request.id
        _emit(task_id, "succeeded", result if isinstance(result, dict) else {"result": result})
        _watched.pop(task_id, None)


@task_failure.connect
def _on_failure(sender: Any = None, task_id: str | None = None, exception: BaseException | None = None,
                args: Any = None, **_: Any) -> None:
    if not _ours(sender) or task_id is None:
        return
    data = {"error": str(exception) or type(exception).__name__, "exception": type(exception).__name__}
    _final_event(task_id, args, "failed", data)


def announce_dropped(task_id: str, args: Any) -> None:
    """`cancelled` for a job the worker dropped without running it (revoked while queued;
    sample_request.SampleRequest), when its callback validates and the policy allows it."""
    _final_event(task_id, args, "cancelled", {"queued": True})


def _final_event(task_id: str, args: Any, event: str, data: dict) -> None:
    """A job's last event, also for a job never announced (its callback read from the message's args)."""
    if task_id not in _watched:
        unannounced = _unannounced_callback(args)
        if unannounced is None:
            return
        _watched[task_id] = unannounced
    try:
        _emit(task_id, event, data)
    except RuntimeError as e:  # no secret on this worker: nothing can be signed
        log.warning("no %s webhook for %s: %s", event, task_id, e)
    finally:
        _watched.pop(task_id, None)


def _unannounced_callback(args: Any) -> tuple[Callback, str | None] | None:
    """The callback of a job that failed before announce_start, if it validates and its URL is allowed."""
    try:
        document = args[0]
        callback = Callback.model_validate(document["callback"])
    except (IndexError, KeyError, TypeError, ValidationError):
        return None
    try:
        check_callback_url(callback.url)
    except ValueError as e:
        log.info("no failed webhook: %s", e)
        return None
    job_id = document.get("job_id")
    return callback, job_id if isinstance(job_id, str) else None


@task_postrun.connect
def _on_postrun(sender: Any = None, task_id: str | None = None, state: str | None = None, **_: Any) -> None:
    if not _ours(sender) or task_id not in _watched:
        return
    if state == states.IGNORED:  # cancellation.end_cancelled
        _emit(task_id, "cancelled", {})
    _watched.pop(task_id, None)  # also after a retry: the next attempt announces itself again


@worker_process_shutdown.connect
@worker_shutdown.connect
def _flush(**_: Any) -> None:
    with _lock:
        current = _sender[1] if _sender is not None and _sender[0] == os.getpid() else None
    if current is not None and not current.close(FLUSH_SECONDS):
        log.warning("webhooks still queued after %.0f s at shutdown were dropped", FLUSH_SECONDS)


class StartAnnouncement(Concern):
    """The job's callback checked on this worker, then its `started` webhook."""

    def before(self, run: TaskRun) -> None:
        announce_start(run.task, run.job)  # type: ignore[arg-type]
