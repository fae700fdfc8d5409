"""Every worker delivers the webhook events of workers that died: a sweep of the outbox in its main process.

The main process (not the pool child, which may be busy in the model) looks every
MASKFLEET_WEBHOOK_LEASE / 2 seconds for outbox events whose holder's lease ran out
(webhook_outbox.py): one ZRANGEBYSCORE when there are none, the idle cost. It claims
them and hands them to its own sender (status_events.webhook_sender) in the order they
were emitted, except:

- an event older than MASKFLEET_WEBHOOK_MAX_AGE, which is dead-lettered;
- a `started` event of a job that has ended since (its result is in the backend) without
  its final event among those taken over: that final event came from another worker (the
  job was redelivered) and may already be out, and `started` after it would tell the
  receiver the job is running again. It is removed. With its final event, both go out in
  order.

Once a minute it also checks the outbox's size against MASKFLEET_WEBHOOK_OUTBOX_MAX and
dead-letters the oldest events past it.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import redis
from celery import states
from celery.signals import worker_ready, worker_shutdown

from .settings import load_settings
from .webhook_outbox import Outbox, OutboxEvent, fleet_outbox
from .webhooks import FINAL_EVENT_TYPES

log = logging.getLogger(__name__)

SIZE_CHECK_SECONDS = 60.0


class OutboxSweeper:
    """The sweep thread of one worker's main process."""

    def __init__(self, outbox: Outbox, sender_of: Callable[[], Any], lease: float, max_age: float, max_size: int):
        self.outbox = outbox
        self.sender_of = sender_of  # () -> WebhookSender, made on first need (the secret is checked then)
        self.lease = lease
        self.max_age = max_age
        self.max_size = max_size
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._size_checked = 0.0

    def start(self) -> "OutboxSweeper":
        self._thread = threading.Thread(target=self._run, name="maskfleet-outbox-sweeper", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.wait(self.lease / 2):
            try:
                self.sweep()
            except redis.RedisError as exc:
                log.info("webhook outbox sweep skipped: %s", exc)
            except RuntimeError as exc:  # no usable secret: this worker cannot sign what it would take over
                log.warning("webhook outbox sweep off: %s", exc)
                return

    def sweep(self) -> int:
        """Claim and hand over what is due; the number of events handed to the sender."""
        if time.monotonic() - self._size_checked >= SIZE_CHECK_SECONDS:
            self._size_checked = time.monotonic()
            self._trim()
        if not self.outbox.expired(limit=1):
            return 0
        sender = self.sender_of()  # before claiming: a worker that cannot sign must not take events
        events = self.outbox.claim(self.lease)
        ending = {event.job_id for event in events if event.type in FINAL_EVENT_TYPES}
        due = []
        for event in events:
            if time.time() - event.emitted_at > self.max_age:
                self.outbox.dead_letter(event, f"older than MASKFLEET_WEBHOOK_MAX_AGE ({self.max_age:g} s) when taken over", 0)
                log.warning("webhook %s (%s) dead-lettered: too old when taken over", event.type, event.msg_id)
            elif event.type == "job.started" and event.job_id not in ending and self._job_ended(event):
                self.outbox.remove([event.member])
            else:
                due.append(event)
        if due:
            log.info("taking over %d webhook event(s) whose sender stopped", len(due))
            sender.resume(due)
        return len(due)

    def _job_ended(self, event: OutboxEvent) -> bool:
        from .app import app  # Celery's own key and encoding of a task's state (as task_state.py uses them)

        task_id = json.loads(event.body).get("data", {}).get("task_id")
        if not task_id:
            return False
        meta = self.outbox.client.get(app.backend.get_key_for_task(task_id))
        return meta is not None and app.backend.decode(meta).get("status") in states.READY_STATES

    def _trim(self) -> None:
        surplus = self.outbox.size() - self.max_size
        if surplus <= 0:
            return
        for member in self.outbox.oldest(surplus):
            self.outbox.dead_letter(OutboxEvent.of(member), f"outbox over MASKFLEET_WEBHOOK_OUTBOX_MAX ({self.max_size})", 0)
        log.warning("webhook outbox over its %d events: the %d oldest dead-lettered", self.max_size, surplus)


_sweeper: OutboxSweeper | None = None


@worker_ready.connect
def _start(sender: Any = None, **_: Any) -> None:
    global _sweeper
    from .status_events import webhook_sender  # the sender of this process, as the pool's children make theirs

    settings = load_settings()
    outbox = fleet_outbox()
    if outbox is not None:  # the embedded demo fleet has none
        _sweeper = OutboxSweeper(outbox, webhook_sender, settings.webhook_lease, settings.webhook_max_age,
                                 settings.webhook_outbox_max).start()


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
