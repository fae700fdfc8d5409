"""The webhook outbox: a job's started and final events kept in Redis until a receiver took them.

A sender's in-memory queue dies with its process; a producer waiting for `succeeded` would
wait forever. So every `started`, `succeeded`, `failed` and `cancelled` event is written
here before the job is acknowledged, and removed only after a 2xx (or when it is
dead-lettered). Progress events are never written: stale progress is worthless.

Layout, on the worker's result backend Redis:

- ``maskfleet:webhooks:outbox``: a sorted set; member = the event as JSON (URL, type, job id,
  its ``webhook-id``, body, when it was emitted), score = when its holder's lease on it runs
  out. The sender that emits an event holds it and moves that score forward while it
  retries (``ZADD XX``), as the job leases do (leases.py).
- Every worker's main process sweeps the outbox every lease / 2 (`OutboxSweeper`): events
  whose lease ran out lost their holder (its process died), and are claimed (a script
  gives them a new lease atomically, so two sweepers never both take one) and delivered
  by that process's sender, in the order they were emitted.
- ``maskfleet:webhooks:dead``: a stream of the events given up on (past the sender's
  attempts or deadline, too old when taken over, or beyond the outbox's size), capped at
  MASKFLEET_WEBHOOK_DEAD_MAX entries. ``maskfleet webhooks list-failed`` reads it;
  ``maskfleet webhooks replay ID`` puts an event back in the outbox with its lease already
  run out, so the next sweep of any worker delivers it, with the same ``webhook-id``.

A redelivered event keeps its ``webhook-id`` and gets a fresh signature timestamp per
attempt, so receivers deduplicate on the id (delivery is at least once).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import redis

from .redis_keys import WEBHOOK_DEAD_KEY as DEAD_KEY
from .redis_keys import WEBHOOK_OUTBOX_KEY as OUTBOX_KEY
from .redis_keys import connection
from .settings import load_settings

SWEEP_BATCH = 100  # events claimed per sweep at most
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, member in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], member) end
return due
"""


@dataclass(frozen=True)
class OutboxEvent:
    """One durable event as the outbox keeps it (its JSON is the sorted set's member)."""

    url: str
    type: str
    job_id: str | None
    msg_id: str  # the webhook-id, the same on every delivery of the event
    body: str
    emitted_at: float  # wall clock, seconds

    @property
    def member(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def of(cls, member: str | bytes) -> "OutboxEvent":
        return cls(**json.loads(member))


class Outbox:
    """The outbox's Redis calls; every method is one round trip."""

    def __init__(self, client: redis.Redis, dead_max: int = 10_000):
        self.client = client
        self.dead_max = dead_max

    def add(self, event: OutboxEvent, lease: float) -> None:
        self.client.zadd(OUTBOX_KEY, {event.member: time.time() + lease})

    def extend(self, members: Iterable[str], lease: float) -> None:
        """Move the leases of events this process still holds forward (those removed meanwhile stay removed)."""
        until = time.time() + lease
        scores = {member: until for member in members}
        if scores:
            self.client.zadd(OUTBOX_KEY, scores, xx=True)

    def remove(self, members: Iterable[str]) -> None:
        members = list(members)
        if members:
            self.client.zrem(OUTBOX_KEY, *members)

    def expired(self, limit: int = SWEEP_BATCH) -> list[str]:
        """Members whose lease ran out, the earliest first."""
        return [_text(m) for m in self.client.zrangebyscore(OUTBOX_KEY, "-inf", time.time(), start=0, num=limit)]

    def claim(self, lease: float, limit: int = SWEEP_BATCH) -> list[OutboxEvent]:
        """The events whose lease ran out, now held by this process for `lease` seconds, in emitted order.

        One script, so that the check and the new lease are atomic: of two sweepers, the
        first takes the events and the second finds none of them due any more."""
        now = time.time()
        members = self.client.eval(_CLAIM, 1, OUTBOX_KEY, now, now + lease, limit)
        return sorted((OutboxEvent.of(member) for member in members), key=lambda e: e.emitted_at)

    def size(self) -> int:
        return int(self.client.zcard(OUTBOX_KEY))

    def oldest(self, count: int) -> list[str]:
        return [_text(m) for m in self.client.zrange(OUTBOX_KEY, 0, count - 1)]

    def dead_letter(self, event: OutboxEvent, error: str, attempts: int) -> None:
        """Move `event` from the outbox to the dead letters, in one transaction."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xadd(DEAD_KEY, {"event": event.member, "error": error, "attempts": str(attempts),
                             "dead_at": f"{time.time():.3f}"}, maxlen=self.dead_max, approximate=True)
        pipe.zrem(OUTBOX_KEY, event.member)
        pipe.execute()

    def dead(self, count: int | None = None) -> list[dict]:
        """The dead letters, the oldest first: {id, event, error, attempts, dead_at}."""
        entries = self.client.xrange(DEAD_KEY, count=count)
        return [_dead_entry(entry_id, fields) for entry_id, fields in entries]

    def replay(self, ref: str) -> OutboxEvent:
        """Put a dead letter (its stream id or its webhook-id) back in the outbox, due at once; KeyError if unknown."""
        for entry in self.dead():
            event = OutboxEvent.of(entry["event"])
            if ref in (entry["id"], event.msg_id):
                pipe = self.client.pipeline(transaction=True)
                pipe.zadd(OUTBOX_KEY, {event.member: 0})
                pipe.xdel(DEAD_KEY, entry["id"])
                pipe.execute()
                return event
        raise KeyError(ref)


def fleet_outbox() -> Outbox | None:
    """The outbox on this process's result backend Redis; None where our keys live in no Redis
    (the embedded demo fleet's in-memory store): events there live in memory only."""
    client = connection()
    return Outbox(client, load_settings().webhook_dead_max) if isinstance(client, redis.Redis) else None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _dead_entry(entry_id: str | bytes, fields: dict) -> dict:
    fields = {_text(k): _text(v) for k, v in fields.items()}
    return {"id": _text(entry_id), "event": fields["event"], "error": fields.get("error", ""),
            "attempts": int(fields.get("attempts", 0)), "dead_at": float(fields.get("dead_at", 0))}
