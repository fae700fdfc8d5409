"""A job as the HTTP API shows it: the Celery state and meta of `JobHandle.status` in the API's words.

Celery's states become five (PENDING, RECEIVED and RETRY are `queued`: not running now;
STARTED and PROGRESS `running`; SUCCESS `succeeded`; FAILURE `failed`; REVOKED
`cancelled`), with the progress of a running job, the result of a finished one and the
error of a failed one (`message` names the field of a bad job, as `maskfleet run` does).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
STATES: dict[str, JobState] = {
    "PENDING": "queued", "RECEIVED": "queued", "RETRY": "queued",
    "STARTED": "running", "PROGRESS": "running",
    "SUCCESS": "succeeded", "FAILURE": "failed", "REVOKED": "cancelled",
}
FINISHED: frozenset[JobState] = frozenset({"succeeded", "failed", "cancelled"})
JOBS_PATH = "/v1/jobs"


class Progress(BaseModel):
    step: int = Field(description="The step of the job's `steps` being run (both samplers' calls of a step are one step).")
    total: int = Field(description="The job's steps.")
    sampler: str = Field(description="Which sampler's half of the step ran last: base or mask.")


class JobError(BaseModel):
    type: str = Field(description="InvalidJob for bad input (the producer's fault), else the worker's error class.")
    message: str = Field(description="For bad input: `<field>: <reason>`.")


class Links(BaseModel):
    self: str
    cancel: str
    events: str


class JobView(BaseModel):
    """A job: its state, and what goes with the state."""

    id: str
    state: JobState
    progress: Progress | None = None
    result: dict[str, Any] | None = Field(None, description="A succeeded job's result: output URIs, sha256, shape, timings.")
    error: JobError | None = None
    submitted_at: float | None = Field(None, description="Unix time the job was submitted (null for jobs sent by other means).")
    downloads: dict[str, str] | None = Field(None, description="With ?presign=true: presigned GET URLs of the outputs on S3, by field.")
    links: Links


def job_view(status: dict, record: dict | None) -> JobView:
    """The view of `JobHandle.status()`'s {"id", "state", "meta"} and the job's submission record."""
    task_id, state, meta = status["id"], STATES.get(status["state"], "queued"), status["meta"]
    meta = meta if isinstance(meta, dict) else {}
    base = f"{JOBS_PATH}/{task_id}"
    view: dict[str, Any] = {"id": task_id, "state": state, "submitted_at": (record or {}).get("submitted_at"),
                            "links": Links(self=base, cancel=f"{base}/cancel", events=f"{base}/events")}
    if status["state"] == "PROGRESS" and {"step", "total", "sampler"} <= meta.keys():
        view["progress"] = Progress(step=meta["step"], total=meta["total"], sampler=meta["sampler"])
    elif state == "succeeded":
        view["result"] = meta
    elif state in ("failed", "cancelled"):
        view["error"] = JobError(type=str(meta.get("error", "")), message=str(meta.get("message", "")))
    return JobView(**view)
