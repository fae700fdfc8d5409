"""Storage faults: the task retried with backoff while reading, the job failed once its output write gave up.

A store that fails even after botocore's own retries is not the job's fault: while the
job reads its inputs and models, the whole task is retried (at most
MASKFLEET_STORAGE_RETRIES times, `storage_retry_countdown` apart), then fails with
StorageUnavailable. Once sampled, the pipeline retries the output write alone
(OutputWriteFailed when it gives up): the task is not retried then, since sampling
again would redo the GPU's work for a fault of the store.
"""
from __future__ import annotations

from ..job_pipeline import OutputWriteFailed, storage_retry_countdown
from ..storage.errors import StorageUnavailable
from .lifecycle import Concern, TaskRun


class StorageRetry(Concern):
    def failed(self, run: TaskRun, error: Exception) -> Exception | None:
        if isinstance(error, OutputWriteFailed):
            return error.error
        if isinstance(error, StorageUnavailable):
            task = run.task
            return task.retry(exc=error, countdown=storage_retry_countdown(task.request.retries),
                              max_retries=run.settings.storage_retries, throw=False)
        return None
