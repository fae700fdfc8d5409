"""The pipelined worker (`MASKFLEET_PIPELINE=1`): job threads around one model lane, in one process.

A prefork worker runs one job per process: while that job reads its inputs, writes its
output and goes through Celery's handover, its GPU waits. A pipelined worker runs
Celery's thread pool with 2 x MASKFLEET_BATCH_JOBS job threads in one process that owns
the GPU: every thread takes a job through Celery as usual (states, webhooks, acks,
leases, idempotency all unchanged), prepares it, and hands it to the process's model
lane (maskfleet/model_lane.py), which samples the jobs one after another, or batched
up to MASKFLEET_BATCH_JOBS when their models, shapes and schedule agree. The GPU starts
the next job the moment one ends; outputs are written by their own threads meanwhile.

What the thread pool cannot do, and what stands in for it here:
- Time limits: Celery enforces them by signals to a pool process; threads cannot be
  interrupted, so the job's soft limit (its own `time_limit` or the worker's) is checked
  before every sampler call and ends the job with SoftTimeLimitExceeded. A single model
  call is not interrupted. The limit counts from the job's start in its thread, so it
  includes the time the job waits for the model behind the jobs before it.
- Cancelling running jobs on a broker connection loss needs a process to terminate, so
  it is off here (tasks/app.py): jobs finish, and a job redelivered after finishing returns its stored
  result without sampling again (idempotency.py).
- A job that crashes the process takes the other jobs of the worker with it; they come
  back through their leases (leases.py) and count toward MASKFLEET_MAX_DELIVERIES.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from ..model_lane import ModelLane
from ..prepared_job import sample_batch
from ..sampling import StopHook
from .lifecycle import Concern, TaskRun
from .settings import Settings


def pool_arguments(settings: Settings, processes: int = 1) -> list[str]:
    """The `celery worker` pool options: 2 x MASKFLEET_BATCH_JOBS job threads when pipelined
    (one batch sampling while the next is prepared), else `processes` prefork children."""
    if settings.pipeline:
        return ["-P", "threads", "-c", str(2 * settings.batch_jobs)]
    return ["-P", "prefork", "-c", str(processes)]


def model_lane(settings: Settings) -> ModelLane | None:
    """The process's model lane when the worker is pipelined, else None (jobs sample in their own process)."""
    if not settings.pipeline:
        return None
    return ModelLane(partial(sample_batch, forward=settings.batch_forward), max_batch=settings.batch_jobs)


def soft_seconds(task: Any) -> float | None:
    """The running job's soft time limit: its own (sent with the job) or the worker's."""
    limits = getattr(task.request, "timelimit", None) or (None, None)
    return limits[1] or task.app.conf.task_soft_time_limit


def time_limit_check(soft_seconds: float) -> StopHook:
    """A stop check that raises SoftTimeLimitExceeded once `soft_seconds` have passed since now."""
    deadline = time.monotonic() + soft_seconds

    def check() -> bool:
        if time.monotonic() > deadline:
            raise SoftTimeLimitExceeded(f"soft time limit ({soft_seconds:g} s) exceeded")
        return False

    return check


class ThreadTimeLimit(Concern):
    """Pipelined workers only: no signal can stop a thread, so the soft limit is checked between sampler calls."""

    def before(self, run: TaskRun) -> None:
        soft = soft_seconds(run.task)
        if run.settings.pipeline and soft:
            run.stops.append(time_limit_check(soft))
