"""STARTED and PROGRESS, written by the task in two Redis commands instead of Celery's five.

Celery's `update_state` reads the result key first (so that a late write cannot hide a
SUCCESS) and wraps SETEX and PUBLISH in MULTI/EXEC: five commands per write, and a job
writes PROGRESS every MASKFLEET_PROGRESS_SECONDS. Here the write is `SET ... GET`, which
stores the state and returns the one it replaced in one command, then a PUBLISH on the
task's result channel: the same key, value and channel as Celery's, so AsyncResult, Flower
and the gateway's subscription read them unchanged. When the replaced state was SUCCESS (a
redelivered message of a job that had finished), it is put back at once and nothing is
published, as Celery's check would have kept it. The final states (SUCCESS, FAILURE,
REVOKED) stay Celery's. STARTED's meta is Celery's own (`pid`, `hostname`).

A Redis error propagates like any other of the job's own keys: the task hands the job back
to the queue (sample_task.py). A result backend that is no Redis (the embedded fleet's
memory cache) gets Celery's `update_state`.
"""
from __future__ import annotations

import os
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend

from .lifecycle import Concern, TaskRun

STARTED, PROGRESS, SUCCESS = states.STARTED, "PROGRESS", states.SUCCESS


def write_state(task: Any, state: str, meta: dict) -> None:
    """Store `state` with `meta` as the task's state and publish it on the task's result channel."""
    backend = task.backend
    if not task.request.id:  # the body called directly, outside a worker: no task to record
        return
    if not isinstance(backend, RedisBackend):
        task.update_state(state=state, meta=meta)
        return
    task_id = task.request.id
    value = backend.encode({"status": state, "result": meta, "traceback": None, "children": [],
                            "date_done": None, "task_id": task_id})
    key = backend.get_key_for_task(task_id)
    expires = int(backend.expires) if backend.expires else None
    replaced = backend.client.set(key, value, ex=expires, get=True)
    if replaced is not None and backend.decode(replaced).get("status") == SUCCESS:
        backend.client.set(key, replaced, ex=expires)
        return
    backend.client.publish(key, value)


class StartedState(Concern):
    """STARTED, with the worker's name and process id, before anything else runs."""

    def before(self, run: TaskRun) -> None:
        write_state(run.task, STARTED, {"pid": os.getpid(), "hostname": run.task.request.hostname})
