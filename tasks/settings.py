"""The fleet's names (queues, task, key prefix) and its settings as Celery sees them.

Producers, workers and the launcher all build their Celery configuration from
`load_settings()` (maskfleet/settings.py, the one reader of the environment), so a
deployment changes behaviour through environment variables only, and the reliability
settings that must agree (time limits and the visibility timeout) are derived from one
number, MASKFLEET_MAX_JOB_SECONDS.
"""
from __future__ import annotations

from ..settings import Settings, load_settings, soft_limit

__all__ = ["DEFAULT_QUEUE", "KEY_PREFIX", "QUEUE_PREFIX", "Settings", "TASK_NAME",
           "check_time_limit", "load_settings", "model_queue", "soft_limit"]

QUEUE_PREFIX = "maskfleet"
DEFAULT_QUEUE = QUEUE_PREFIX  # jobs sent by name without routing, and workers that serve every model
TASK_NAME = "maskfleet.sample"
KEY_PREFIX = "maskfleet"  # Redis keys of our own: maskfleet:done:*, maskfleet:cancel:*, maskfleet:submitted:*


def model_queue(model: str) -> str:
    """The queue of jobs whose base sampler uses `model`."""
    return f"{QUEUE_PREFIX}.model.{model}"


def check_time_limit(time_limit: int, max_job_seconds: int) -> None:
    """ValueError naming `time_limit` when a job asks for more than the fleet's longest job."""
    if time_limit > max_job_seconds:
        raise ValueError(f"time_limit: {time_limit} s is more than MASKFLEET_MAX_JOB_SECONDS ({max_job_seconds} s)")
