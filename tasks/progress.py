"""PROGRESS updates from the sampling loop, throttled so status never slows the GPU.

The loop calls its progress hook after every sampler call (thousands per job on fast
GPUs); each update is a Redis write (two commands, task_state.py), so at most one per
MASKFLEET_PROGRESS_SECONDS goes out, plus always the first and the last. Each update
that goes out sets the PROGRESS state and is handed
to every subscriber (status_events.py subscribes to send progress webhooks), so one
throttle feeds every status channel and the loop pays for one.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable

from ..sampling.hooks import job_step
from .lifecycle import Concern, TaskRun
from .task_state import PROGRESS, write_state

log = logging.getLogger(__name__)

Publish = Callable[[int, int, str], None]
Subscriber = Callable[[Any, dict], None]  # (task, progress meta); must return at once

_subscribers: list[Subscriber] = []


def subscribe(subscriber: Subscriber) -> Subscriber:
    """Have `subscriber(task, meta)` called with every PROGRESS update that goes out (usable as a decorator)."""
    if subscriber not in _subscribers:
        _subscribers.append(subscriber)
    return subscriber


class Throttle:
    """Pass (done, total, which) on to `publish` at most once per `min_interval` seconds, and always the last."""

    def __init__(self, publish: Publish, min_interval: float, clock: Callable[[], float] = time.monotonic):
        self.publish = publish
        self.min_interval = min_interval
        self.clock = clock
        self.last: float | None = None
        self.sent = 0

    def __call__(self, done: int, total: int, which: str) -> None:
        now = self.clock()
        if done >= total or self.last is None or now - self.last >= self.min_interval:
            self.last = now
            self.sent += 1
            self.publish(done, total, which)


def progress_meta(done: int, total: int, which: str) -> dict[str, Any]:
    """The PROGRESS meta of a hook call (`done` of `total` sampler calls): the job's step of its steps,
    and which sampler's half of the step just ran."""
    step, steps = job_step(done, total)
    return {"step": step, "total": steps, "sampler": which, "phase": "sampling"}


def task_progress(task: Any, min_interval: float) -> Throttle:
    """A throttled hook that sets the Celery task's state to PROGRESS with step/total/sampler/phase,
    and passes the same meta to the subscribers (a subscriber's error is logged, never the job's)."""

    def publish(done: int, total: int, which: str) -> None:
        meta = progress_meta(done, total, which)
        write_state(task, PROGRESS, meta)
        for subscriber in _subscribers:
            try:
                subscriber(task, meta)
            except Exception:
                log.exception("progress subscriber %r failed", subscriber)

    return Throttle(publish, min_interval)


class TaskProgress(Concern):
    """The sampling loop's progress hook: this task's throttled PROGRESS state (and its subscribers)."""

    def before(self, run: TaskRun) -> None:
        run.on_progress = task_progress(run.task, run.settings.progress_seconds)
