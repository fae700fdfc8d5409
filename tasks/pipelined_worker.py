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
from typing import Callable

from celery.exceptions import SoftTimeLimitExceeded

from ..model_lane import ModelLane
from ..prepared_job import sample_batch
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


def within_time_limit(should_stop: Callable[[], bool], soft_seconds: float | None) -> Callable[[], bool]:
    """`should_stop`, raising SoftTimeLimitExceeded once `soft_seconds` have passed since now."""
    if not soft_seconds:
        return should_stop
    deadline = time.monotonic() + soft_seconds

    def check() -> bool:
        if time.monotonic() > deadline:
            raise SoftTimeLimitExceeded(f"soft time limit ({soft_seconds:g} s) exceeded")
        return should_stop()

    return check
