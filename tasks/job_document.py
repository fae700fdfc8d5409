"""The job document of a task's message, validated again on the worker (a message may come from any Celery app)."""
from __future__ import annotations

from ..job import JobError, parse_job
from .errors import InvalidJob
from .lifecycle import Concern, TaskRun
from .settings import check_time_limit


class ParsedJob(Concern):
    """The message's job parsed into `run.job`; InvalidJob naming the field, a `time_limit` over
    this worker's hard limit (MASKFLEET_MAX_JOB_SECONDS) included."""

    def before(self, run: TaskRun) -> None:
        try:
            job = parse_job(run.job_data)
            if job.time_limit is not None:
                check_time_limit(job.time_limit, run.task.app.conf.task_time_limit)
        except (JobError, ValueError) as e:
            raise InvalidJob(str(e)) from None
        run.job = job
