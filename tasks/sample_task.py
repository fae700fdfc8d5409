"""The task `maskfleet.sample`: one job document (JSON) in, a small result dict out.

The body is one call of this process's job pipeline (worker_pipeline.py, job_pipeline.py)
with the lifecycle's concerns around it, in the order of `LIFECYCLE` (lifecycle.py says
how they hook in; each lives in the module that owns it).

Outcomes: SUCCESS with the pipeline's result; FAILURE with InvalidJob("<field>: <reason>")
for bad input (a `time_limit` over this worker's MASKFLEET_MAX_JOB_SECONDS included),
with JobOutOfMemory when the job does not fit the device (memory_limit.py), with
PoisonJob when its worker died during each of its last deliveries (deliveries.py): none
of them retried; retried with backoff when storage is unavailable, then FAILURE with
StorageUnavailable (storage_retry.py); REVOKED when cancelled (cancellation.py).
A job that loses Redis while it runs is handed back to the queue, never FAILURE
(lifecycle.run_task).
"""
from __future__ import annotations

from typing import Any

from .app import app
from .bad_input import BadInput
from .cancellation import Cancellation
from .deliveries import PoisonCheck
from .errors import InvalidJob
from .idempotency import FinishedBefore
from .input_prefetch import PrefetchedInputs
from .job_document import ParsedJob
from .lifecycle import Concern, TaskRun, run_task
from .memory_limit import OutOfMemory
from .pipelined_worker import ThreadTimeLimit
from .progress import TaskProgress
from .settings import TASK_NAME
from .status_events import StartAnnouncement
from .storage_retry import StorageRetry
from .task_state import StartedState
from .worker_pipeline import worker_pipeline

# In the order they run; a failure is decided by the first concern that claims it.
LIFECYCLE: list[Concern] = [
    StartedState(),  # STARTED, as Celery's task_track_started would write it, in fewer commands
    PoisonCheck(),  # count the delivery; PoisonJob after too many that killed their worker
    ParsedJob(),  # the message's document validated again: InvalidJob naming the field
    StartAnnouncement(),  # the callback checked here, `started` sent
    Cancellation(),  # cancelled before it started: REVOKED; the cancel flag asked between sampler calls
    FinishedBefore(),  # an idempotency key that already succeeded: its stored result
    ThreadTimeLimit(),  # pipelined workers: the soft time limit asked between sampler calls
    PrefetchedInputs(),  # inputs read ahead while the previous job ran
    TaskProgress(),  # PROGRESS state and progress webhooks, throttled
    OutOfMemory(),  # JobOutOfMemory, the device freed
    StorageRetry(),  # task retries while reading; the write's own retries exhausted: FAILURE
    BadInput(),  # InvalidInput / InvalidFile: InvalidJob naming the field
]


# throws: bad input is the producer's fault, logged as one INFO line naming the field (no traceback);
# worker faults keep their ERROR line and traceback.
@app.task(bind=True, name=TASK_NAME, Request="maskfleet.tasks.sample_request:SampleRequest", throws=(InvalidJob,))
def sample(self: Any, job_data: dict) -> dict:
    return run_task(self, job_data, LIFECYCLE, _pipeline_call)


def _pipeline_call(run: TaskRun) -> dict:
    return worker_pipeline().run(run.job, on_progress=run.on_progress, should_stop=run.should_stop)  # type: ignore[arg-type]
