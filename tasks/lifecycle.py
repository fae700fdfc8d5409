"""The task's lifecycle: small concerns run in one ordered list around the job pipeline's one call.

Dramatiq's middleware is the model: each concern (poison check, cancellation,
idempotency, time limit, input prefetch, progress, out of memory, storage retry, bad
input...) is one class in the module that owns it, with a few of these hooks, and
`sample_task.LIFECYCLE` lists them in the order they run:

- `before(run)`: before the call, in list order; may fill `run` (the parsed job, a stop
  check, the progress hook) or return a result that ends the task without running it.
- `around(run)`: a context manager entered in list order around the call.
- `failed(run, error)`: when the call raises, in list order; the first concern that
  returns an exception (raised instead, once the error and its traceback are gone) or
  raises one decides the task's outcome; None passes the error on.
- `after(run)`: at the end however the task ends, in reverse order, for every concern whose
  `before` was called (so it must cope with what `before` did not get to set up).
"""
from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import redis
from celery.exceptions import Reject

from ..job import Job
from ..sampling.hooks import ProgressHook, StopHook
from ..settings import Settings, load_settings


@dataclass
class TaskRun:
    """One run of the task: what the concerns read and fill in."""

    task: Any  # the bound Celery task (task.request.id, task.retry, ...)
    job_data: Any  # the message's job document
    settings: Settings
    job: Job | None = None  # set by job_document.ParsedJob
    stops: list[StopHook] = field(default_factory=list)  # asked before every sampler call
    on_progress: ProgressHook | None = None
    cancel_watch: Any = None  # set by cancellation.Cancellation: the job's cancel subscription

    @property
    def task_id(self) -> str:
        return self.task.request.id

    def should_stop(self) -> bool:
        return any(stop() for stop in self.stops)


class Concern:
    """A lifecycle concern; every hook is optional."""

    def before(self, run: TaskRun) -> dict | None:
        return None

    def around(self, run: TaskRun) -> AbstractContextManager:
        return nullcontext()

    def failed(self, run: TaskRun, error: Exception) -> Exception | None:
        return None

    def after(self, run: TaskRun) -> None:
        return None


def run_task(task: Any, job_data: dict, concerns: Sequence[Concern], call: Callable[[TaskRun], dict]) -> dict:
    """A task's body: `call` with the concerns around it. A job that loses Redis anywhere in it
    (our own keys: delivery count, cancel flag, finished results) is handed back to the queue
    with no state stored (Reject with requeue), never FAILURE: the outage is not the job's
    fault, and a FAILURE seen for a moment would end a producer's wait."""
    try:
        return run_with(concerns, TaskRun(task, job_data, load_settings()), call)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        raise Reject(f"Redis unreachable during the job, handed back to the queue: {e}", requeue=True) from None


def run_with(concerns: Sequence[Concern], run: TaskRun, call: Callable[[TaskRun], dict]) -> dict:
    """`call(run)` with every concern's hooks around it (see the module docstring)."""
    begun: list[Concern] = []
    try:
        for concern in concerns:
            begun.append(concern)
            early = concern.before(run)
            if early is not None:
                return early
        return _call_around(concerns, run, call)
    finally:
        for concern in reversed(begun):
            concern.after(run)


def _call_around(concerns: Sequence[Concern], run: TaskRun, call: Callable[[TaskRun], dict]) -> dict:
    with ExitStack() as stack:
        for concern in concerns:
            stack.enter_context(concern.around(run))
        try:
            return call(run)
        except Exception as error:
            replacement = _first_replacement(concerns, run, error)
            if replacement is None:
                raise
        # Raised here, outside the except block: the error's traceback (which holds the job's
        # tensors) is gone before the concerns' exits run (memory_limit frees the device there).
        raise replacement


def _first_replacement(concerns: Sequence[Concern], run: TaskRun, error: Exception) -> Exception | None:
    for concern in concerns:
        replacement = concern.failed(run, error)
        if replacement is not None:
            return replacement
    return None
