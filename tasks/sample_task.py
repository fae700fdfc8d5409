"""The task `maskfleet.sample`: one job document (JSON) in, a small result dict out.

The worker validates the job again (a message may come from any Celery app), runs it
with a JobRunner made lazily in the process that runs tasks (the prefork child, so CUDA
and the models are never touched in the worker's parent process) and kept for the
life of that process, so models stay loaded between jobs.

Outcomes: SUCCESS with JobRunner's result; FAILURE with InvalidJob("<field>: <reason>")
for bad input (a `time_limit` over this worker's MASKFLEET_MAX_JOB_SECONDS included),
never retried; retried with backoff when storage is unavailable; REVOKED when cancelled
(see cancellation.py). Progress, webhooks (status_events.py), cancellation and
idempotency live in their own modules; this body only wires their hooks into the run.
"""
from __future__ import annotations

import os
from typing import Any

from ..job import JobError, parse_job
from ..local_run import JobRunner, RunOptions
from ..sampling.errors import InvalidInput, SamplingStopped
from ..storage.errors import InvalidFile, StorageUnavailable
from ..storage.model_store import models_root_from
from .app import app
from .cancellation import cancel_requested, end_cancelled, stop_hook
from .errors import InvalidJob
from .idempotency import finished_result
from .progress import task_progress
from .settings import TASK_NAME, check_time_limit
from .status_events import announce_start

_runner: tuple[int, JobRunner] | None = None


def runner() -> JobRunner:
    """This process's JobRunner, from MASKFLEET_MODELS, MASKFLEET_DEVICE (auto), MASKFLEET_DTYPE (float32)."""
    global _runner
    if _runner is None or _runner[0] != os.getpid():
        threads = os.environ.get("MASKFLEET_TORCH_THREADS")
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        try:
            root = models_root_from(None)
        except InvalidFile as e:  # the worker's configuration, not the job's fault
            raise RuntimeError(f"worker misconfigured: {e}") from None
        options = RunOptions(
            models_root=root,
            device=os.environ.get("MASKFLEET_DEVICE") or "auto",
            dtype=os.environ.get("MASKFLEET_DTYPE") or "float32",
        )
        _runner = (os.getpid(), JobRunner(options))
    return _runner[1]


def reset_runner() -> None:
    """Forget this process's JobRunner, so the next job builds one from the current environment."""
    global _runner
    _runner = None


@app.task(
    bind=True,
    name=TASK_NAME,
    autoretry_for=(StorageUnavailable,),
    retry_backoff=True,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=5,
)
def sample(self: Any, job_data: dict) -> dict:
    try:
        job = parse_job(job_data)
        if job.time_limit is not None:  # past the max, Redis would redeliver it while it runs
            check_time_limit(job.time_limit, app.conf.task_time_limit)
    except (JobError, ValueError) as e:
        raise InvalidJob(str(e)) from None
    announce_start(self, job)
    if cancel_requested(self.request.id):
        end_cancelled(self)
    done = finished_result(job)
    if done is not None:
        return done
    try:
        return runner().run(job, on_progress=task_progress(self), should_stop=stop_hook(self.request.id))
    except SamplingStopped:
        end_cancelled(self)
    except StorageUnavailable:
        raise
    except (InvalidInput, InvalidFile) as e:
        raise InvalidJob(str(e)) from None
