"""The task's own Request class: what the worker's main process does with a job's message.

Two things Celery's Request does not: a job cancelled while still queued gets its
`cancelled` webhook, and a job handed back to the broker goes to the front of its queue.

Cancelled while queued:
`maskfleet cancel` revokes the task id, and the worker that receives the message drops
it without running it: Celery's `Request.revoked()`, in the worker's main process, stores
REVOKED and acks. No task code runs then and no task signal carries the job document,
so without this the producer's webhook receiver never heard of the cancellation. This
Request class is the task's own (`Task.Request`): it sees the drop together with the
message's arguments and hands the job's callback to `status_events.announce_dropped`.
A job that starts anyway (its worker missed the revoke, say it started later) sees the
cancel flag at its first sampler call and announces `cancelled` the usual way.
"""
from __future__ import annotations

import logging

from celery.worker.request import Request

from .front_requeue import requeue_at_front
from .status_events import announce_dropped

log = logging.getLogger(__name__)


class SampleRequest(Request):
    """Celery's request, plus the `cancelled` webhook when the job is dropped as revoked, and
    requeues at the head of the queue (front_requeue.py)."""

    _drop_announced = False

    def revoked(self) -> bool:
        dropped = super().revoked()
        if dropped and not self._drop_announced:
            self._drop_announced = True
            try:
                announce_dropped(self.id, self.args)
            except Exception:  # never let a webhook problem break the consumer that drops the message
                log.exception("no cancelled webhook for dropped job %s", self.id)
        return dropped

    def reject(self, requeue: bool = False) -> None:
        if not requeue or self.acknowledged:
            return super().reject(requeue)
        try:
            at_front = requeue_at_front(self.message)
        except self._connection_errors as e:  # as Celery's own reject: logged; the lease brings it back
            log.critical("could not hand job %s back to the queue: %r", self.id, e)
            at_front = True
        if not at_front:
            return super().reject(requeue)
        self.acknowledged = True
        self.send_event("task-rejected", requeue=True)
