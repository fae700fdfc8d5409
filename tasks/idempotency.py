"""A job id is an idempotency key: submitted twice, run once; redelivered after it finished, not redone.

- Producer side, `claim_submission` does SET NX on `maskfleet:submitted:<job_id>`: only
  the first submission of a job id sends a message (and the Celery task id is the job id).
  The key holds the submission's record (JSON: the job document's digest, when it was
  sent, the gateway's API key name that owns it, and the job document itself, stored
  once here rather than in every state write), which tells a repeat from a different
  document under the same id.
- Worker side, a job that succeeded leaves `maskfleet:done:<job_id>` (the digest of the job
  document), written from Celery's task_success signal. A redelivered message (worker lost
  after the output was written, before the ack) finds it and returns the result Celery
  stored (under the same id, for as long) without sampling again. The same id with a
  different job is refused.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from celery import states
from celery.signals import task_success

from ..job import Job, JobError, parse_job
from .errors import InvalidJob
from .lifecycle import Concern, TaskRun
from .redis_keys import connection, done_key, submitted_key, ttl
from .settings import TASK_NAME


def job_digest(job: Job) -> str:
    return hashlib.sha256(job.model_dump_json().encode()).hexdigest()


def claim_submission(job_id: str, url: str | None = None, record: dict | None = None) -> bool:
    """True for the first submission of `job_id` (within the key's lifetime), which stores `record`."""
    return bool(connection(url).set(submitted_key(job_id), json.dumps(record or {}), nx=True, ex=ttl()))


def submission_record(job_id: str, url: str | None = None) -> dict | None:
    """The record stored by the submission of `job_id`, None when none is on record ({} for an old "1")."""
    raw = connection(url).get(submitted_key(job_id))
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def first_on_record(job_id: str, urls: Sequence[str | None]) -> tuple[int, dict] | None:
    """(index, record) of the first of `urls` whose Redis holds a submission record of `job_id`:
    how a job is found by its id alone when model groups have Redis deployments of their own."""
    for index, url in enumerate(urls):
        record = submission_record(job_id, url)
        if record is not None:
            return index, record
    return None


def was_submitted(job_id: str, url: str | None = None) -> bool:
    """Whether a submission of `job_id` is on record (within the key's lifetime)."""
    return bool(connection(url).exists(submitted_key(job_id)))


def finished_result(task: Any, job: Job) -> dict | None:
    """The stored result of this job id if it already succeeded, else None."""
    if not job.job_id:
        return None
    raw = connection().get(done_key(job.job_id))
    if raw is None:
        return None
    if json.loads(raw)["digest"] != job_digest(job):
        raise InvalidJob(f"job_id: {job.job_id!r} already finished for a different job document")
    stored = task.backend.get_task_meta(task.request.id)
    return stored["result"] if stored.get("status") == states.SUCCESS and isinstance(stored["result"], dict) else None


def record_finished(job: Job) -> None:
    if job.job_id:
        connection().set(done_key(job.job_id), json.dumps({"digest": job_digest(job)}), ex=ttl())


@task_success.connect
def _on_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if getattr(sender, "name", None) != TASK_NAME or not isinstance(result, dict):
        return
    try:
        job = parse_job(sender.request.args[0])
    except (JobError, IndexError, TypeError):
        return
    record_finished(job)


class FinishedBefore(Concern):
    """A job id that already succeeded with this document returns its stored result, not sampled again."""

    def before(self, run: TaskRun) -> dict | None:
        return finished_result(run.task, run.job)  # type: ignore[arg-type]
