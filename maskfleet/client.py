"""The producer's client: submit a job to the fleet, follow it, wait for it, cancel it.

Needs only the broker URL (MASKFLEET_BROKER_URL, or `broker_url=`), and the routes of
models kept on other Redis deployments (MASKFLEET_BROKER_ROUTES, tasks/broker_routes.py);
no model, GPU or storage access. Jobs are checked locally first (the same pydantic model the worker
uses, plus `time_limit` against MASKFLEET_MAX_JOB_SECONDS and `callback.url` against
the callback policy, as the worker checks them again), then sent by name, so this
module never imports the task's code.
"""
from __future__ import annotations

import os
import time
import uuid
from functools import lru_cache
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from .job import Job, JobError, parse_job
from .settings import PREFIX
from .tasks.app import app as default_app, configure
from .tasks.broker_routes import group_urls, route_url
from .tasks.callback_policy import check_callback_url
from .tasks.cancellation import request_cancel
from .tasks.idempotency import claim_submission, first_on_record, job_digest, submission_record, was_submitted
from .tasks.settings import TASK_NAME, Settings, check_time_limit, load_settings, soft_limit

FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


class UnknownJob(LookupError):
    """A cancel named a job id that no submission or state is on record for."""


class JobFailed(RuntimeError):
    """The job ended in FAILURE or REVOKED, or did not end in time; `state` says which."""

    def __init__(self, task_id: str, state: str, message: str) -> None:
        super().__init__(f"job {task_id} {state}: {message}")
        self.task_id = task_id
        self.state = state
        self.message = message


def _app(broker_url: str | None) -> Celery:
    """The app for `broker_url` (broker and result backend), every other setting from the environment;
    None: the environment's own broker and result backend. Made once per distinct environment."""
    env = {k: v for k, v in os.environ.items() if k.startswith(PREFIX)}
    if broker_url is not None:
        env = {k: v for k, v in env.items() if k not in ("MASKFLEET_BROKER_URL", "MASKFLEET_RESULT_BACKEND")}
        env["MASKFLEET_BROKER_URL"] = broker_url
    return _app_of(tuple(sorted(env.items())))


@lru_cache(maxsize=8)
def _app_of(env: tuple[tuple[str, str], ...]) -> Celery:
    return app_for(load_settings(dict(env)))


class ProducerApp(Celery):
    """A Celery app whose result backend does not subscribe to each job's result channel as it is sent.

    Celery's Redis backend subscribes when a task is sent, for an `AsyncResult.get()` that may
    follow; a producer here polls (`JobHandle.wait`) or listens on its own (the gateway), so
    that is two Redis commands per job for nothing. `get()` still works: it subscribes itself.
    """

    def _get_backend(self) -> Any:
        backend = super()._get_backend()
        backend.on_task_call = _no_subscription
        return backend


def app_for_model(model: str) -> Celery:
    """The app of `model`'s group: its route in MASKFLEET_BROKER_ROUTES, else the environment's broker."""
    return _app(route_url(load_settings(), model))


def locate(task_id: str) -> Celery:
    """The app of the group whose Redis holds `task_id`'s submission record (the default group when none does)."""
    apps = [_app(url) for url in group_urls(load_settings())]
    found = first_on_record(task_id, [app.conf.result_backend for app in apps]) if len(apps) > 1 else None
    return _app(None) if found is None else apps[found[0]]


def _no_subscription(producer: Any, task_id: str) -> None:
    return None


def app_for(settings: Settings) -> Celery:
    """A producer's Celery app for these settings (broker, result backend, limits)."""
    app = ProducerApp("maskfleet-client")
    configure(app, settings)
    return app


@dataclass
class JobHandle:
    task_id: str
    app: Celery = field(default=default_app, repr=False)
    submitted: bool = True  # False when this job id had been submitted before: nothing was sent

    @property
    def result(self) -> AsyncResult:
        return AsyncResult(self.task_id, app=self.app)

    def document(self) -> dict | None:
        """The job document as submitted (its submission record), None when none is on record."""
        record = submission_record(self.task_id, self.app.conf.result_backend)
        return None if record is None else record.get("job")

    def status(self) -> dict[str, Any]:
        """{"id", "state", "meta"}: meta is PROGRESS's step/total/sampler/phase, the result, or the error."""
        r = self.result
        state = r.state
        info = r.info
        if isinstance(info, BaseException):
            meta: Any = {"error": type(info).__name__, "message": str(info)}
        else:
            meta = info
        return {"id": self.task_id, "state": state, "meta": meta}

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> dict:
        """The result dict; JobFailed on FAILURE, REVOKED or timeout (the job keeps running then)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status["state"] == "SUCCESS":
                return status["meta"]
            if status["state"] in FINAL_STATES:
                meta = status["meta"]
                message = meta.get("message", str(meta)) if isinstance(meta, dict) else str(meta)
                raise JobFailed(self.task_id, status["state"], message)
            if deadline is not None and time.monotonic() >= deadline:
                raise JobFailed(self.task_id, "TIMEOUT", f"not finished after {timeout} s (state {status['state']})")
            time.sleep(poll)

    def cancel(self, force: bool = False) -> None:
        """Stop the job: dropped if still queued, stopped at the next sampler call if running; no output.

        UnknownJob when no such job is on record (no submission through this client, no state):
        nothing is recorded then, so a later job with that id runs. `force` records the
        cancellation anyway (a job sent by name from another Celery app and still queued has no
        record); it expires with the results (MASKFLEET_RESULT_EXPIRES).
        """
        backend_url = self.app.conf.result_backend
        if not force and self.result.state == "PENDING" and not was_submitted(self.task_id, backend_url):
            raise UnknownJob(f"no job {self.task_id!r} is on record (never submitted through maskfleet, or its record "
                             "expired); nothing was cancelled (force records the cancellation anyway)")
        request_cancel(self.task_id, backend_url)
        self.app.control.revoke(self.task_id)  # no terminate: the worker stops it cleanly through the flag
        if self.result.state == "PENDING":  # queued (or unknown): say so now, a worker may be hours away
            self.app.backend.mark_as_revoked(self.task_id, "cancelled")


def submit(job: dict | str | bytes | Job, *, broker_url: str | None = None, queue: str | None = None,
           owner: str | None = None, app: Celery | None = None) -> JobHandle:
    """Validate `job` (a dict, JSON text or a Job) locally and send it; a job_id already submitted is not sent again.

    The task id is the job_id when there is one. `queue` overrides the route by model.
    `owner` (the HTTP gateway's API key name) is kept in the submission record; `app` (`app_for(settings)`)
    replaces `broker_url`. Without either, the job goes to its model's Redis (MASKFLEET_BROKER_ROUTES).
    JobError (a ValueError) names the field when the job is bad, its `time_limit` exceeds
    this environment's MASKFLEET_MAX_JOB_SECONDS, or its `callback.url` is refused by the
    callback policy (MASKFLEET_CALLBACK_ALLOWLIST here); nothing is sent then.
    """
    parsed = job if isinstance(job, Job) else parse_job(job)
    options: dict[str, Any] = {"queue": queue} if queue else {}
    # When it was sent, for the worker's queue-wait metric (tasks/metrics.py).
    options["headers"] = {"sent_at": time.time()}
    longest = load_settings().max_job_seconds if parsed.time_limit is not None else 0
    try:
        if parsed.time_limit is not None:
            check_time_limit(parsed.time_limit, longest)
            options.update(time_limit=parsed.time_limit, soft_time_limit=soft_limit(parsed.time_limit))
        if parsed.callback is not None:
            check_callback_url(parsed.callback.url)
    except ValueError as e:
        raise JobError(str(e)) from None
    app = app or (_app(broker_url) if broker_url else app_for_model(parsed.base_sampler.model))
    # A job without a job_id is claimed under a fresh id too: the claim is the first call to
    # Redis, so a wrong password or an unreachable Redis fails here at once and clearly
    # (Celery's own first contact retries for about 20 s, then says little).
    task_id = parsed.job_id or str(uuid.uuid4())
    document = parsed.model_dump(mode="json")
    record = {"digest": job_digest(parsed), "submitted_at": time.time(), "owner": owner, "job": document}
    if not claim_submission(task_id, app.conf.result_backend, record):
        return JobHandle(task_id, app, submitted=False)
    # Celery would repeat the whole document in the message's headers as its repr (shown by Flower).
    summary = {"job_id": task_id, "model": parsed.base_sampler.model, "steps": parsed.steps}
    sent = app.send_task(TASK_NAME, args=[document], task_id=task_id, argsrepr=repr([summary]), kwargsrepr="{}",
                         **options)
    return JobHandle(sent.id, app)


def handle(task_id: str, *, broker_url: str | None = None) -> JobHandle:
    """A handle on a job submitted earlier (by its task id, the job_id when one was given); without
    `broker_url`, on the Redis that holds its submission record (MASKFLEET_BROKER_ROUTES)."""
    return JobHandle(task_id, _app(broker_url) if broker_url else locate(task_id))
