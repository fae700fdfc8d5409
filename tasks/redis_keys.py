"""Our own small Redis records, next to Celery's: one connection per process, one key scheme.

Keys (all expire after MASKFLEET_RESULT_EXPIRES):
- maskfleet:submitted:<job_id>  set once by the first submission of a job id (SET NX)
- maskfleet:done:<job_id>       the result of a job id that finished, with the job's digest
- maskfleet:cancel:<task_id>    a cancel request, read by the worker between sampler calls
- maskfleet:deliveries:<task_id> deliveries of a job whose worker died (deliveries.py)

And two that do not expire, kept until delivered or trimmed by their size limits (webhook_outbox.py):
- maskfleet:webhooks:outbox     started and final webhook events not yet delivered (a sorted set)
- maskfleet:webhooks:dead       webhook events given up on (a capped stream)
"""
from __future__ import annotations

import os

import redis

from .redis_urls import redis_client
from .settings import KEY_PREFIX, load_settings

_clients: dict[tuple[int, str], redis.Redis] = {}  # (process id, URL) -> its client, the oldest first
MAX_CLIENTS = 16
_stores: dict[str, object] = {}  # URL -> a stand-in with the same few calls (the embedded fleet's dict)


def register_store(url: str, store: object | None) -> None:
    """Serve `url` from `store` (set/get/exists/delete like redis.Redis) instead of a Redis; None removes it."""
    if store is None:
        _stores.pop(url, None)
    else:
        _stores[url] = store


def connection(url: str | None = None) -> redis.Redis:
    """A client for `url` or the result backend's Redis (the broker's by default), made once per process and URL.

    Made again after a fork (a prefork child must not share its parent's sockets); a producer
    whose models are routed to several Redis deployments (broker_routes.py) keeps one per
    deployment. A URL given to `register_store` gets that store.
    """
    url = url or load_settings().result_backend
    if url in _stores:
        return _stores[url]  # type: ignore[return-value]
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        if any(pid != key[0] for pid, _ in _clients):  # forked: the parent's clients are not ours to use
            _clients.clear()
        while len(_clients) >= MAX_CLIENTS:
            _clients.pop(next(iter(_clients))).close()
        client = _clients[key] = redis_client(url)
    return client


WEBHOOK_OUTBOX_KEY = f"{KEY_PREFIX}:webhooks:outbox"
WEBHOOK_DEAD_KEY = f"{KEY_PREFIX}:webhooks:dead"


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
