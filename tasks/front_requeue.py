"""A job handed back to the broker goes to the head of its queue, where it was, not to its tail.

Producers publish with LPUSH and workers take with BRPOP: the right end of a kombu Redis
list is the front of the line. When a pool child dies (`task_reject_on_worker_lost`) or
the job loses Redis (`Reject(requeue=True)`), Celery rejects the message with requeue,
and kombu's Redis QoS restores it with LPUSH, behind every job submitted since: under
load a job whose process was killed waited 42-89 s behind 30 others instead of running
again at once. kombu's own restores of expired leases and of a stopping worker's
messages already use RPUSH; this does the same for a rejection.
"""
from __future__ import annotations

from typing import Any


def requeue_at_front(message: Any) -> bool:
    """Put an unacknowledged `message` back at the head of its queue and settle it here.

    False, with nothing done, where the transport has no Redis-style restore (the
    in-memory broker of `maskfleet demo`): the caller then rejects as usual. Raises the
    transport's connection errors; the message then stays in `unacked`, and its lease
    running out brings it back (at the head too).
    """
    restore = getattr(getattr(message.channel, "qos", None), "restore_by_tag", None)
    if restore is None:
        return False
    restore(message.delivery_tag, leftmost=False)  # RPUSH in one transaction with the unacked entry's removal
    message.ack()  # the channel's own bookkeeping; its Redis entries are gone already
    return True
