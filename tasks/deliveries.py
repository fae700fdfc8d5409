"""Poison jobs: a job whose worker dies every time it runs is failed after a few deliveries.

Late acks and `task_reject_on_worker_lost` put a job back in the queue when the process
running it dies, which is what saves a job from a lost host. A job that itself kills
its worker (a segfault in a kernel for one shape, an allocation the OOM killer ends)
would then be redelivered forever, taking a worker down each time.

So each delivery is counted in ``maskfleet:deliveries:<task_id>`` when the job starts,
and the count is cleared when the run ends in any way the process survives (success,
failure, retry, cancellation: Celery's task_postrun). What is left counts only the
deliveries whose process died. When a job starts with more than
``MASKFLEET_MAX_DELIVERIES`` (default 3) such deliveries behind it, it fails with
:class:`PoisonJob` instead of running, and the queue moves on. A host lost while
running a healthy job counts too, and so does a broker outage during a job (the worker
ends the run and cannot reach Redis to clear the count), so the bound should stay above
the number of such accidents one job may meet.
"""
from __future__ import annotations

from typing import Any

from celery.signals import task_postrun

from .errors import PoisonJob
from .lifecycle import Concern, TaskRun
from .redis_keys import connection, deliveries_key, ttl
from .settings import TASK_NAME


def count_delivery(task_id: str) -> int:
    """This delivery's number among those that did not end normally (1 for a healthy job)."""
    key = deliveries_key(task_id)
    delivery = int(connection().incr(key))
    connection().expire(key, ttl())
    return delivery


def check_not_poison(task_id: str, max_deliveries: int) -> None:
    """Count this delivery; PoisonJob when the worker died during each of the last `max_deliveries`."""
    delivery = count_delivery(task_id)
    if delivery > max_deliveries:
        connection().delete(deliveries_key(task_id))
        raise PoisonJob(
            f"not run again: its worker process died during each of its last {delivery - 1} deliveries "
            f"(killed, out of memory or crashed); MASKFLEET_MAX_DELIVERIES is {max_deliveries}")


@task_postrun.connect
def _ended_normally(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if getattr(sender, "name", None) == TASK_NAME and task_id:
        connection().delete(deliveries_key(task_id))


class PoisonCheck(Concern):
    """Before anything else: count this delivery, fail a poison job without running it."""

    def before(self, run: TaskRun) -> None:
        check_not_poison(run.task_id, run.settings.max_deliveries)
