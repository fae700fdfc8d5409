"""Our own small Redis records, next to Celery's: one connection per process, one key scheme.

Keys (all expire after MASKFLEET_RESULT_EXPIRES):
- maskfleet:submitted:<job_id>  set once by the first submission of a job id (SET NX)
- maskfleet:done:<job_id>       the result of a job id that finished, with the job's digest
- maskfleet:cancel:<task_id>    a cancel request, read by the worker between sampler calls
- maskfleet:deliveries:<task_id> deliveries of a job whose worker died (deliveries.py)
"""
from __future__ import annotations

import os

import redis

from .redis_urls import redis_client
from .settings import KEY_PREFIX, load_settings

_client: tuple[int, str, redis.Redis] | None = None
_stores: dict[str, object] = {}  # URL -> a stand-in with the same few calls (the embedded fleet's dict)


def register_store(url: str, store: object | None) -> None:
    """Serve `url` from `store` (set/get/exists/delete like redis.Redis) instead of a Redis; None removes it."""
    if store is None:
        _stores.pop(url, None)
    else:
        _stores[url] = store


def connection(url: str | None = None) -> redis.Redis:
    """A client for `url` or the result backend's Redis (the broker's by default), made once per process.

    Rebuilt after a fork (a prefork child must not share its parent's sockets) or when the
    URL in the environment changed. A URL given to `register_store` gets that store.
    """
    global _client
    url = url or load_settings().result_backend
    if url in _stores:
        return _stores[url]  # type: ignore[return-value]
    if _client is None or _client[0] != os.getpid() or _client[1] != url:
        _client = (os.getpid(), url, redis_client(url))
    return _client[2]


def submitted_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:submitted:{job_id}"


def done_key(job_id: str) -> str:
    return f"{KEY_PREFIX}:done:{job_id}"


def cancel_key(task_id: str) -> str:
    return f"{KEY_PREFIX}:cancel:{task_id}"


def deliveries_key(task_id: str) -> str:
    return f"{KEY_PREFIX}:deliveries:{task_id}"


def ttl() -> int:
    return load_settings().key_ttl
