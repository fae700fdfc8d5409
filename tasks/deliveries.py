"""Poison jobs: a job whose worker dies every time it runs is failed after a few deliveries.

Late acks and `task_reject_on_worker_lost` put a job back in the queue when the process
running it dies, which is what saves a job from a lost host. A job that itself kills
its worker (a segfault in a kernel for one shape, an allocation the OOM killer ends)
would then be redelivered forever, taking a worker down each time.

So each redelivery is counted in ``maskfleet:deliveries:<task_id>`` when the job starts,
and the count is cleared when the run ends in any way the process survives (success,
failure, retry, cancellation: Celery's task_postrun). A first delivery costs no Redis
command: nothing died before it, and if it dies, the broker marks the message
``redelivered`` when it hands it out again (kombu's restore of a lease that ran out, or of
a job whose pool process died). What is left counts only the deliveries whose process
died. When a job starts with ``MASKFLEET_MAX_DELIVERIES`` (default 3) or more such
deliveries behind it, it fails with :class:`PoisonJob` instead of running, and the queue
moves on. A host lost while running a healthy job counts too, and so does a broker outage
during a job (the worker ends the run and cannot reach Redis to clear the count), and so
does a job a stopping worker had reserved and handed back unstarted, so the bound should
stay above the number of such accidents one job may meet.
"""
from __future__ import annotations

from typing import Any

from celery.signals import task_postrun

from .errors import PoisonJob
from .lifecycle import Concern, TaskRun
from .redis_keys import connection, deliveries_key, ttl
from .settings import TASK_NAME


def redelivered(task: Any) -> bool:
    """Whether the broker handed this message out before (kombu marks restored messages)."""
    return bool((getattr(task.request, "delivery_info", None) or {}).get("redelivered"))


def count_delivery(task_id: str) -> int:
    """This redelivery's number (2 for the first one) among the deliveries that did not end normally."""
    key = deliveries_key(task_id)
    pipe = connection().pipeline(transaction=False)
    pipe.incr(key)
    pipe.expire(key, ttl())
    return 1 + int(pipe.execute()[0])


def check_not_poison(task: Any, max_deliveries: int) -> None:
    """Count a redelivery; PoisonJob when the worker died during each of the last `max_deliveries`."""
    if not redelivered(task):
        return
    delivery = count_delivery(task.request.id)
    if delivery > max_deliveries:
        connection().delete(deliveries_key(task.request.id))
        raise PoisonJob(
            f"not run again: its worker process died during each of its last {delivery - 1} deliveries "
            f"(killed, out of memory or crashed); MASKFLEET_MAX_DELIVERIES is {max_deliveries}")


@task_postrun.connect
def _ended_normally(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    if getattr(sender, "name", None) == TASK_NAME and task_id and redelivered(sender):
        connection().delete(deliveries_key(task_id))


class PoisonCheck(Concern):
    """Before anything else: count this delivery, fail a poison job without running it."""

    def before(self, run: TaskRun) -> None:
        check_not_poison(run.task, run.settings.max_deliveries)
