"""The task `maskfleet.sample`: one job document (JSON) in, a small result dict out.

The worker validates the job again (a message may come from any Celery app), runs it
with a JobRunner made lazily in the process that runs tasks (the prefork child, so CUDA
and the models are never touched in the worker's parent process) and kept for the
life of that process, so models stay loaded between jobs.

Outcomes: SUCCESS with JobRunner's result; FAILURE with InvalidJob("<field>: <reason>")
for bad input (a `time_limit` over this worker's MASKFLEET_MAX_JOB_SECONDS included),
with JobOutOfMemory when the job does not fit the device (memory_limit.py), with
PoisonJob when its worker died during each of its last deliveries (deliveries.py): none
of them retried; retried with backoff when storage is unavailable (at most
MASKFLEET_STORAGE_RETRIES times, after botocore's own retries), then FAILURE with
StorageUnavailable: the whole task while reading inputs and models, the output write
alone once the job is sampled (`write_with_retries`: sampling again would redo the
GPU's work for a fault of the store); REVOKED when cancelled (see cancellation.py).
A job that loses Redis while it runs (our own keys: delivery count, cancel flag,
finished results) is handed back to the queue with no state stored (Reject with
requeue), never FAILURE: the outage is not the job's fault, and a FAILURE seen for a
moment would end a producer's wait. Progress, webhooks (status_events.py), cancellation
and idempotency live in their own modules; this body only wires their hooks into the run.
"""
from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Any, Callable

import redis
import torch
from celery.exceptions import Reject

from ..job import JobError, parse_job
from ..local_run import JobRunner, RunOptions
from ..prepared_job import PreparedJob
from ..sampling.errors import InvalidInput, SamplingStopped
from ..storage.errors import InvalidFile, StorageUnavailable
from ..storage.model_store import models_root_from
from .app import app
from .cancellation import cancel_requested, end_cancelled, stop_hook
from .deliveries import check_not_poison
from .errors import InvalidJob, JobOutOfMemory
from .idempotency import finished_result
from .input_prefetch import served_inputs
from .memory_limit import apply_memory_limit, describe, free_memory, is_out_of_memory, memory_limit_mb
from .pipelined_worker import model_lane, within_time_limit
from .progress import task_progress
from .settings import TASK_NAME, check_time_limit, load_settings
from .status_events import announce_start

log = logging.getLogger(__name__)

_runner: tuple[int, JobRunner] | None = None
_making_runner = threading.Lock()  # a pipelined worker's job threads ask for it at once
STORAGE_BACKOFF_MAX = 300  # seconds, the longest wait between two attempts of a job on storage faults


def runner() -> JobRunner:
    """This process's JobRunner, from MASKFLEET_MODELS, MASKFLEET_DEVICE (auto), MASKFLEET_DTYPE (float32),
    with a model lane when the worker is pipelined (MASKFLEET_PIPELINE, pipelined_worker.py)."""
    with _making_runner:
        return _make_runner()


def _make_runner() -> JobRunner:
    global _runner
    if _runner is None or _runner[0] != os.getpid():
        settings = load_settings()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        try:
            root = models_root_from(None)
        except InvalidFile as e:  # the worker's configuration, not the job's fault
            raise RuntimeError(f"worker misconfigured: {e}") from None
        options = RunOptions(models_root=root, device=settings.device, dtype=settings.dtype)
        job_runner = JobRunner(options, lane=model_lane(settings))
        try:
            apply_memory_limit(job_runner.device, memory_limit_mb())
        except ValueError as e:
            raise RuntimeError(f"worker misconfigured: {e}") from None
        _runner = (os.getpid(), job_runner)
    return _runner[1]


def reset_runner() -> None:
    """Forget this process's JobRunner, so the next job builds one from the current environment."""
    global _runner
    _runner = None


def storage_retry_countdown(retries: int) -> float:
    """Seconds before the next attempt after a storage fault: half of 2, 4, 8, ... (at most 300)
    fixed, the other half jittered, so retries spread out yet the default 5 span at least 31 s
    of outage (full jitter could wait 0 s every time and spend them all in a moment)."""
    base = min(STORAGE_BACKOFF_MAX, 2 ** (retries + 1))
    return base / 2 + random.uniform(0, base / 2)


def soft_seconds(task: Any) -> float | None:
    """The running job's soft time limit: its own (sent with the job) or the worker's."""
    limits = getattr(task.request, "timelimit", None) or (None, None)
    return limits[1] or app.conf.task_soft_time_limit


def sample_guarded(job: Any, **hooks: Any) -> tuple[PreparedJob, torch.Tensor]:
    """Prepare and sample `job` on this process's runner; an out-of-memory error becomes
    JobOutOfMemory after freeing."""
    job_runner = runner()
    try:
        return job_runner.sampled(job, **hooks)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        message = describe(e, job_runner.device, memory_limit_mb())
    # Outside the except block: the error's traceback, which holds the job's tensors, is gone.
    free_memory(job_runner.device)
    raise JobOutOfMemory(message)


def write_with_retries(task: Any, prepared: PreparedJob, out: torch.Tensor, retries: int,
                       should_stop: Callable[[], bool]) -> dict:
    """Write a sampled job, retrying the write alone on storage faults (`retries` times, the task's
    backoff) rather than the task, which would sample the job again; then FAILURE with the error.

    The cancel flag and (pipelined) the soft time limit are checked before each new attempt.
    """
    attempt = 0
    while True:
        try:
            return runner().finish(prepared, out)
        except StorageUnavailable as e:
            if attempt == retries:
                raise OutputWriteFailed(e) from None
            wait = storage_retry_countdown(attempt)
            attempt += 1
            log.warning("job %s: output write failed (%s); writing again in %.1f s (retry %d of %d), not sampling again",
                        task.request.id, e, wait, attempt, retries)
        time.sleep(wait)
        if should_stop():
            raise SamplingStopped("stopped before writing the output again")


class OutputWriteFailed(Exception):
    """The output could not be written after the write's own retries: end FAILURE with `error`, no task retry."""

    def __init__(self, error: StorageUnavailable):
        super().__init__(str(error))
        self.error = error


@app.task(bind=True, name=TASK_NAME, Request="maskfleet.tasks.sample_request:SampleRequest")
def sample(self: Any, job_data: dict) -> dict:
    try:
        return run_task(self, job_data)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
        raise Reject(f"Redis unreachable during the job, handed back to the queue: {e}", requeue=True) from None


def run_task(task: Any, job_data: dict) -> dict:
    """The job body; a Redis connection error raised anywhere in it reaches `sample`."""
    settings = load_settings()
    check_not_poison(task.request.id, settings.max_deliveries)
    try:
        job = parse_job(job_data)
        if job.time_limit is not None:  # never more than this worker's own hard limit
            check_time_limit(job.time_limit, app.conf.task_time_limit)
    except (JobError, ValueError) as e:
        raise InvalidJob(str(e)) from None
    announce_start(task, job)
    if cancel_requested(task.request.id):
        end_cancelled(task)
    done = finished_result(job)
    if done is not None:
        return done
    should_stop = stop_hook(task.request.id)
    if settings.pipeline:  # no signal can stop a thread: the soft limit is checked between sampler calls
        should_stop = within_time_limit(should_stop, soft_seconds(task))
    try:
        with served_inputs(task.request.id):
            prepared, out = sample_guarded(job, on_progress=task_progress(task), should_stop=should_stop)
            return write_with_retries(task, prepared, out, settings.storage_retries, should_stop)
    except SamplingStopped:
        end_cancelled(task)
    except OutputWriteFailed as e:
        raise e.error from None
    except StorageUnavailable as e:
        raise task.retry(exc=e, countdown=storage_retry_countdown(task.request.retries),
                         max_retries=settings.storage_retries) from None
    except (InvalidInput, InvalidFile) as e:
        raise InvalidJob(str(e)) from None
