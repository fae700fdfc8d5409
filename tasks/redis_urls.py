"""Redis clients for every URL the fleet takes: redis://, rediss://, unix:// and Sentinel's sentinel://.

A Sentinel deployment is given as Celery and kombu take it, one `sentinel://` URL per
sentinel joined by `;`: `sentinel://:password@s1:26379/0;sentinel://:password@s2:26379/0`.
The password (and user) in the first URL are the master's and its replicas'; the db is
the first URL's path. MASKFLEET_SENTINEL_MASTER names the monitored master and
MASKFLEET_SENTINEL_PASSWORD is the sentinels' own password, if they have one. Each client
asks the sentinels for the current master when it connects, so after a failover it finds
the promoted replica by itself. Everything of ours that talks to Redis gets its client
here (our keys, leases, queue depth, the gateway), and Celery's broker and result backend
get the same two settings as transport options (`celery_transport_options`).
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.sentinel import Sentinel

from ..settings import REDIS_SCHEMES, Settings, load_settings, scheme

__all__ = ["REDIS_SCHEMES", "async_redis_client", "celery_transport_options", "is_sentinel", "redacted", "redis_client",
           "scheme"]

SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379


def redacted(url: str) -> str:
    """`url` with each password masked, for messages and logs."""
    return re.sub(r"://([^:@/;]*):[^@/;]*@", r"://\1:***@", url)


def is_sentinel(url: str) -> bool:
    return scheme(url) == SENTINEL_SCHEME


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The sentinels' (host, port) list and the master's connection arguments (db, user, password)."""
    parts = [urlsplit(u.strip()) for u in url.split(";") if u.strip()]
    bad = [p.geturl() for p in parts if p.scheme != SENTINEL_SCHEME or not p.hostname]
    if bad:
        raise ValueError(f"{bad[0]!r}: each `;`-separated part of a Sentinel URL is sentinel://[:password@]host[:port][/db]")
    first = parts[0]
    master: dict[str, Any] = {"db": int(first.path.strip("/") or 0)}
    if first.password:
        master["password"] = unquote(first.password)
    if first.username:
        master["username"] = unquote(first.username)
    return [(p.hostname, p.port or SENTINEL_PORT) for p in parts], master  # type: ignore[misc]


def _sentinel_setup(url: str, settings: Settings | None, kwargs: dict[str, Any]) -> tuple[list, dict, dict, str]:
    """(sentinels, the sentinels' connection arguments, the master's, the master's name) for a Sentinel URL."""
    settings = settings or load_settings()
    sentinels, master = _sentinel_parts(url)
    own = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    if settings.sentinel_password:
        own["password"] = settings.sentinel_password
    return sentinels, own, master, settings.sentinel_master  # `kwargs` reach the master through Sentinel(**kwargs)


def redis_client(url: str, settings: Settings | None = None, **kwargs: Any) -> redis.Redis:
    """A client of `url`; for a Sentinel URL, of its current master (`kwargs`: redis-py connection options)."""
    if not is_sentinel(url):
        return redis.Redis.from_url(url, **kwargs)
    sentinels, own, master, name = _sentinel_setup(url, settings, kwargs)
    return Sentinel(sentinels, sentinel_kwargs=own, **kwargs).master_for(name, **master)


def async_redis_client(url: str, settings: Settings | None = None, **kwargs: Any) -> redis.asyncio.Redis:
    """The asyncio twin of `redis_client` (the gateway's subscriptions)."""
    if not is_sentinel(url):
        return redis.asyncio.from_url(url, **kwargs)
    sentinels, own, master, name = _sentinel_setup(url, settings, kwargs)
    return AsyncSentinel(sentinels, sentinel_kwargs=own, **kwargs).master_for(name, **master)


def celery_transport_options(url: str, settings: Settings) -> dict[str, Any]:
    """What Celery's broker or result backend needs beyond the URL: the master's name and the sentinels' password."""
    if not is_sentinel(url):
        return {}
    options: dict[str, Any] = {"master_name": settings.sentinel_master}
    if settings.sentinel_password:
        options["sentinel_kwargs"] = {"password": settings.sentinel_password}
    return options
