"""Which Redis a model's jobs go through: MASKFLEET_BROKER_ROUTES, one table for producers, workers and the gateway.

Queues are per model, so a fleet whose traffic outgrows one Redis can put groups of models
on Redis deployments of their own: `{"sdxl-*": "redis://redis-b:6379/0"}` sends every job
of a model matching `sdxl-*` through redis-b, which is then that job's broker, result
backend and home of its keys (leases, cancel flag, submission record); every other model
stays on MASKFLEET_BROKER_URL (and MASKFLEET_RESULT_BACKEND). Nothing crosses groups, so
each Redis carries only its own models' jobs and the fleet's ceiling grows with the
number of groups (docs/scaling.md). A producer routes each job by its base model; a
worker process serves the models of one group and talks to that group's Redis only; a
lookup by job id asks each group's Redis for the job's submission record.
"""
from __future__ import annotations

from fnmatch import fnmatchcase

from .redis_urls import redacted
from .settings import Settings


def route_url(settings: Settings, model: str) -> str | None:
    """The Redis URL of `model`'s group; None for the default group (MASKFLEET_BROKER_URL)."""
    routes = settings.broker_routes
    url = routes.get(model)
    if url is None:
        url = next((u for pattern, u in routes.items() if fnmatchcase(model, pattern)), None)
    return None if url == settings.broker_url else url


def routed(settings: Settings, url: str | None) -> Settings:
    """`settings` with `url` as the broker and the result backend; unchanged for the default group (None)."""
    return settings if url is None else settings.model_copy(update={"broker_url": url, "result_backend": url})


def group_urls(settings: Settings) -> list[str | None]:
    """Every group's URL, the default group's (None) first, then each routed Redis once, in the table's order."""
    return [None, *dict.fromkeys(u for u in settings.broker_routes.values() if u != settings.broker_url)]


def common_route(settings: Settings, models: list[str]) -> str | None:
    """The one group `models` share; ValueError naming them when they span several (a worker has one broker)."""
    by_url: dict[str | None, list[str]] = {}
    for model in models:
        by_url.setdefault(route_url(settings, model), []).append(model)
    if len(by_url) > 1:
        groups = "; ".join(f"{', '.join(names)} on {redacted(url) if url else 'MASKFLEET_BROKER_URL'}"
                           for url, names in by_url.items())
        raise ValueError(f"MASKFLEET_BROKER_ROUTES puts these models on different Redis deployments ({groups}); "
                         "a worker serves one group: start one worker per group")
    return next(iter(by_url), None)
