"""Every fleet setting, read from the environment in one place.

Producers, workers and the launcher all build their Celery configuration from
`load_settings()`, so a deployment changes behaviour through environment variables only,
and the reliability settings that must agree (time limits and the visibility timeout)
are derived from one number, MASKFLEET_MAX_JOB_SECONDS.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
QUEUE_PREFIX = "maskfleet"
DEFAULT_QUEUE = QUEUE_PREFIX  # jobs sent by name without routing, and workers that serve every model
TASK_NAME = "maskfleet.sample"
BATCH_FORWARDS = ("fused", "per_job")  # sampling/job_batch.py's FORWARDS
KEY_PREFIX = "maskfleet"  # Redis keys of our own: maskfleet:done:*, maskfleet:cancel:*, maskfleet:submitted:*


def model_queue(model: str) -> str:
    """The queue of jobs whose base sampler uses `model`."""
    return f"{QUEUE_PREFIX}.model.{model}"


@dataclass(frozen=True)
class Settings:
    broker_url: str
    result_backend: str
    max_job_seconds: int  # hard time limit: the child running the job is killed past it
    soft_time_limit: int  # SoftTimeLimitExceeded is raised inside the job first
    visibility_timeout: int  # an unacked job not heartbeaten for this long is redelivered (leases.py)
    result_expires: int  # how long results, done records and submission keys are kept
    lease_seconds: int = 30  # a worker's hold on the jobs it reserved lasts this long without a heartbeat
    max_deliveries: int = 3  # deliveries whose worker died before a job gives it up as poison (deliveries.py)
    storage_retries: int = 5  # task retries (with backoff) after botocore's own retries ran out
    prefetch_jobs: int = 0  # jobs a worker reserves beyond the one it runs, their inputs read ahead (input_prefetch.py)
    pipeline: bool = False  # job threads around one model lane instead of one job process (pipelined_worker.py)
    batch_jobs: int = 1  # the most jobs a pipelined worker samples as one batch
    batch_forward: str = "fused"  # a batch's model forward: fused (one) or per_job (bitwise the unbatched runs)

    @property
    def key_ttl(self) -> int:
        return self.result_expires


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 1) -> int:
    """An integer setting from `env`, `default` when unset; ValueError naming it when below `minimum`."""
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected a whole number, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name}: must be at least {minimum}, got {value}")
    return value


def soft_limit(hard: int) -> int:
    """The soft time limit below a hard one: 60 s of headroom for long limits, 5 % (at least 5 s) for short."""
    return max(1, hard - max(5, min(60, hard // 20)))


def check_time_limit(time_limit: int, max_job_seconds: int) -> None:
    """ValueError naming `time_limit` when a job asks for more than the fleet's longest job."""
    if time_limit > max_job_seconds:
        raise ValueError(f"time_limit: {time_limit} s is more than MASKFLEET_MAX_JOB_SECONDS ({max_job_seconds} s)")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    broker = env.get("MASKFLEET_BROKER_URL") or DEFAULT_BROKER_URL
    backend = env.get("MASKFLEET_RESULT_BACKEND") or broker
    hard = _int(env, "MASKFLEET_MAX_JOB_SECONDS", 3600)
    soft = soft_limit(hard)
    lease = _int(env, "MASKFLEET_LEASE_SECONDS", 30)
    expires = _int(env, "MASKFLEET_RESULT_EXPIRES", 86400)
    deliveries = _int(env, "MASKFLEET_MAX_DELIVERIES", 3)
    retries = _int(env, "MASKFLEET_STORAGE_RETRIES", 5, minimum=0)
    prefetch = _int(env, "MASKFLEET_PREFETCH_JOBS", 0, minimum=0)
    pipeline = _int(env, "MASKFLEET_PIPELINE", 0, minimum=0)
    if pipeline > 1:
        raise ValueError(f"MASKFLEET_PIPELINE: expected 0 or 1, got {pipeline}")
    batch = _int(env, "MASKFLEET_BATCH_JOBS", 1)
    if batch > 1 and not pipeline:
        raise ValueError("MASKFLEET_BATCH_JOBS: batching needs the pipelined worker (MASKFLEET_PIPELINE=1)")
    forward = (env.get("MASKFLEET_BATCH_FORWARD") or "fused").strip()
    if forward not in BATCH_FORWARDS:
        raise ValueError(f"MASKFLEET_BATCH_FORWARD: expected one of {', '.join(BATCH_FORWARDS)}, got {forward!r}")
    # The broker's visibility timeout is the lease: workers heartbeat what they hold (leases.py).
    return Settings(broker, backend, hard, soft, lease, expires, lease, deliveries, retries, prefetch,
                    bool(pipeline), batch, forward)
