"""Job status webhooks, signed per Standard Webhooks and sent from a background thread.

Why threads: the caller is the sampling loop on a GPU. A receiver that is slow, down
or answering 500 must cost that loop nothing, so :meth:`WebhookSender.emit` only
serialises the event and puts it on a queue; a daemon thread per destination posts the
events in order, retries with exponential backoff, and gives an event up (with a log
line) once its attempts or its deadline run out. A job's started and final events are
written to the Redis outbox first (webhook_outbox.py) and removed once delivered: given
up, they are dead-lettered, and a process that dies leaves them to another worker. One thread per destination because one
receiver that is down would otherwise hold every other job's webhooks behind its
retries; stale progress behind a slow receiver is skipped for the newest for the same
reason. The retry bound comes from the MASKFLEET_WEBHOOK_* settings on workers.

Signing (https://www.standardwebhooks.com) is the ``standardwebhooks`` package's: each
event carries ``webhook-id`` (unique per event, the same on every retry of it),
``webhook-timestamp`` (integer seconds, of the attempt) and ``webhook-signature`` from
``Webhook(key).sign``, so a receiver's ``Webhook(secret).verify(body, headers)`` accepts
our requests. The key comes from ``MASKFLEET_WEBHOOK_SECRET``, checked here first (read
as the package reads a string secret: ``whsec_`` prefix dropped, the rest base64) so a
bad one is a clear configuration error naming the variable.

Which URLs may be called is :mod:`callback_policy`'s business (checked when the job
is submitted and when it runs); the sender does not follow redirects, so a receiver
cannot send it somewhere the policy would have refused.

Retries are our own loop, not urllib3's `Retry`: each attempt is signed with a fresh
timestamp, a sender that closes must stop waiting at once, and one deadline bounds an
event's attempts; urllib3 parses the receiver's Retry-After (seconds or HTTP-date).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable
from urllib.parse import urlsplit

import redis
from standardwebhooks import Webhook
from urllib3.exceptions import InvalidHeader
from urllib3.util.retry import Retry

from ..settings import load_settings, variable
from .webhook_outbox import Outbox, OutboxEvent

log = logging.getLogger(__name__)

SECRET_ENV = variable("webhook_secret")
# WebhookSender's retry keywords, each the setting webhook_<keyword>: attempts, the first
# wait (doubled after each failed attempt, at most max_backoff), the deadline from the
# first attempt, and each attempt's timeout, in seconds.
RETRY_KEYWORDS = ("max_attempts", "backoff", "deadline", "timeout")
EVENT_TYPES = ("job.started", "job.progress", "job.succeeded", "job.failed", "job.cancelled")
FINAL_EVENT_TYPES = frozenset({"job.succeeded", "job.failed", "job.cancelled"})
_STOP = object()
_RETRY_AFTER = Retry(0)  # only its Retry-After parser (both forms); the retry loop is ours, see WebhookSender


# --- signing -------------------------------------------------------------------------

def load_secret(secret: str | bytes | None = None) -> bytes:
    """The HMAC key: ``secret``, or ``MASKFLEET_WEBHOOK_SECRET`` when None.

    A string is read as ``standardwebhooks.Webhook(secret)`` reads it (``whsec_``
    prefix optional, base64 after it); bytes are the key itself.
    """
    if secret is None:
        secret = load_settings().webhook_secret
        if not secret:
            raise ValueError(f"{SECRET_ENV} is not set; webhooks are always signed")
    if isinstance(secret, str):
        try:
            # Same call as standardwebhooks: padding added, stray characters skipped.
            key = base64.b64decode(secret.removeprefix("whsec_") + "==")
        except binascii.Error as exc:
            raise ValueError(f"{SECRET_ENV}: expected whsec_<base64> ({exc})") from None
    else:
        key = bytes(secret)
    if not key:
        raise ValueError(f"{SECRET_ENV}: the secret is empty")
    return key


def retry_options_from_env(env: dict[str, str] | None = None) -> dict[str, float]:
    """WebhookSender's retry keywords from the MASKFLEET_WEBHOOK_* settings; ValueError naming a bad one."""
    settings = load_settings(env)
    return {keyword: getattr(settings, f"webhook_{keyword}") for keyword in RETRY_KEYWORDS}


def event_type_name(name: str) -> str:
    """``"started"`` or ``"job.started"`` -> ``"job.started"``; ValueError if unknown."""
    full = name if name.startswith("job.") else f"job.{name}"
    if full not in EVENT_TYPES:
        raise ValueError(f"unknown webhook event {name!r}; expected one of {EVENT_TYPES}")
    return full


# --- the sender ----------------------------------------------------------------------

@dataclass
class _Event:
    url: str
    type: str
    job_id: str | None
    msg_id: str
    body: bytes
    member: str | None = None  # its outbox entry, for a durable event (webhook_outbox.py)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # a 3xx then surfaces as an HTTPError, not retried


class _Lane:
    """The events for one destination (scheme://host:port) and the thread that posts them.

    State other than ``queue`` and ``queued_progress`` (guarded by the sender's lock) is
    touched by the lane's thread only.
    """

    def __init__(self, max_queue: int):
        self.queue: queue.Queue = queue.Queue(max_queue)
        self.thread: threading.Thread | None = None
        self.queued_progress: dict[tuple[str, str | None], int] = {}  # progress events in the queue, per job
        self.last_progress: dict[tuple[str, str | None], float] = {}
        self.held: dict[tuple[str, str | None], _Event] = {}


class WebhookSender:
    """Posts job events to callback URLs from background threads, one per destination.

    Events to one destination (scheme, host and port) are delivered in the order they
    were emitted, progress events excepted: per job the first goes out at once, then at
    most one per ``progress_interval`` seconds, the latest one, and a held progress event
    is sent before that job's next non-progress event. Progress that piled up behind a
    slow or failing receiver is skipped for the newest, so a job's final event is never
    queued behind stale progress. Each destination has its own thread, so a receiver that
    is down or slow delays only its own events, not other jobs' webhooks; a thread with
    nothing to send for ``LANE_IDLE_S`` ends. A delivery is retried on connection
    errors, timeouts, 5xx and 429, waiting ``backoff`` * 2**n seconds (at most
    ``max_backoff``, or the receiver's Retry-After) for up to ``max_attempts`` attempts
    within ``deadline`` seconds.
    """

    LANE_IDLE_S = 30.0
    REMOVE_EVERY = 1.0  # seconds between the outbox removals of delivered events (batched in one ZREM)

    def __init__(self, secret: str | bytes | None = None, *, timeout: float = 5.0,
                 max_attempts: int = 6, backoff: float = 0.5, max_backoff: float = 8.0,
                 deadline: float = 60.0, progress_interval: float = 1.0,
                 max_queue: int = 10_000, outbox: Outbox | None = None, lease: float = 30.0,
                 on_outcome: Callable[[str], None] | None = None):
        self._signer = Webhook(load_secret(secret))  # standardwebhooks signs; the key is checked here first
        self.outbox = outbox  # None: every event lives in memory only
        self.lease = lease
        self._on_outcome = on_outcome or (lambda outcome: None)
        self._leased: set[str] = set()  # outbox members this sender holds (queued or being delivered)
        self._unremoved: list[str] = []  # delivered, to be removed from the outbox (`_keep_leases`)
        self._keeper: threading.Thread | None = None
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.deadline = deadline
        self.progress_interval = progress_interval
        self._max_queue = max_queue
        self._opener = urllib.request.build_opener(_NoRedirects)
        self._cond = threading.Condition()
        self._outstanding = 0  # emitted, not yet delivered or dropped
        self._closed = False
        self._stopping = threading.Event()
        self._lanes: dict[str, _Lane] = {}  # destination -> its lane, while it has work

    def emit(self, url: str, event_type: str, data: dict,
             events_filter: list[str] | None = None) -> None:
        """Queue one event for ``url`` and return at once.

        ``event_type``: ``"started"``/``"job.started"`` etc. ``data`` should carry
        ``job_id`` (progress is throttled per job). ``events_filter``: names such as
        ``["started", "succeeded"]``; other events are not sent (None sends all).
        """
        event_type = event_type_name(event_type)
        if events_filter is not None and event_type not in {event_type_name(e) for e in events_filter}:
            return
        payload = {"type": event_type,
                   "timestamp": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                   "data": data}
        job_id = data.get("job_id")
        event = _Event(url=url, type=event_type, job_id=None if job_id is None else str(job_id),
                       msg_id=f"msg_{uuid.uuid4().hex}",
                       body=json.dumps(payload, separators=(",", ":"), default=str).encode())
        if event.type != "job.progress" and self.outbox is not None and not self._closed:
            self._store(event)
        self._queue(event)

    def resume(self, events: Iterable[OutboxEvent]) -> None:
        """Deliver outbox events this process claimed from a sender that died (OutboxSweeper)."""
        for stored in events:
            event = _Event(url=stored.url, type=stored.type, job_id=stored.job_id, msg_id=stored.msg_id,
                           body=stored.body.encode(), member=stored.member)
            self._hold(stored.member)
            self._queue(event)

    def _store(self, event: _Event) -> None:
        """Write a durable event to the outbox before it is queued; on a Redis error it stays in memory only."""
        stored = OutboxEvent(url=event.url, type=event.type, job_id=event.job_id, msg_id=event.msg_id,
                             body=event.body.decode(), emitted_at=time.time())
        try:
            self.outbox.add(stored, self.lease)  # type: ignore[union-attr]
        except redis.RedisError as exc:
            log.warning("webhook %s (%s) not written to the outbox (%s): it is delivered from memory only",
                        event.type, event.msg_id, exc)
            return
        event.member = stored.member
        self._hold(stored.member)

    def _hold(self, member: str) -> None:
        """Hold an outbox event: its lease is renewed (`_keep_leases`) until it is delivered or dead-lettered."""
        with self._cond:
            self._leased.add(member)
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = threading.Thread(target=self._keep_leases, name="maskfleet-webhooks outbox", daemon=True)
                self._keeper.start()

    def _queue(self, event: _Event) -> None:
        with self._cond:
            if self._closed:
                log.warning("webhook %s for %s dropped: sender closed", event.type, url_for_log(event.url))
                return
            lane = self._lane(_destination(event.url))
            try:
                lane.queue.put_nowait(event)  # under the lock: the lane cannot end meanwhile
            except queue.Full:
                # A durable event stays in the outbox: another worker's sweep delivers it when its lease runs out.
                log.warning("webhook %s for %s not queued: queue full", event.type, url_for_log(event.url))
                self._leased.discard(event.member)  # type: ignore[arg-type]
                return
            self._outstanding += 1
            if event.type == "job.progress":
                key = (event.url, event.job_id)
                lane.queued_progress[key] = lane.queued_progress.get(key, 0) + 1

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every emitted event was delivered (and removed from the outbox) or dropped; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._outstanding == 0 and not self._unremoved, timeout)

    def close(self, timeout: float | None = 5.0) -> bool:
        """Flush (up to ``timeout``), then stop the threads; later emits are dropped."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            lanes = list(self._lanes.values())
        self._stopping.set()
        for lane in lanes:
            if lane.thread is not None and lane.thread.is_alive():
                lane.queue.put(_STOP)
        for lane in lanes:
            if lane.thread is not None:
                lane.thread.join(self.timeout + 1.0)
        return flushed

    # --- the lane threads ---

    def _lane(self, destination: str) -> _Lane:
        """The lane for ``destination``, made (with its thread) if it has none; call with the lock held."""
        lane = self._lanes.get(destination)
        if lane is None:
            lane = self._lanes[destination] = _Lane(self._max_queue)
        if lane.thread is None or not lane.thread.is_alive():  # new, or its thread died
            lane.thread = threading.Thread(target=self._run, args=(destination, lane),
                                           name=f"maskfleet-webhooks {destination}", daemon=True)
            lane.thread.start()
        return lane

    def _run(self, destination: str, lane: _Lane) -> None:
        while True:
            wait = self._until_next_held(lane)
            try:
                event = lane.queue.get(timeout=self.LANE_IDLE_S if wait is None else wait)
            except queue.Empty:
                event = None
                with self._cond:
                    if not lane.held and lane.queue.empty():
                        del self._lanes[destination]  # idle: a later emit starts a new lane
                        return
            if event is _STOP:
                for held in lane.held.values():
                    self._drop(held, 0, "sender closed")
                return
            if event is not None:
                self._handle(lane, event)
            self._send_due_progress(lane)

    def _handle(self, lane: _Lane, event: _Event) -> None:
        key = (event.url, event.job_id)
        if event.type == "job.progress":
            with self._cond:
                newer = lane.queued_progress[key] - 1
                if newer:
                    lane.queued_progress[key] = newer
                else:
                    del lane.queued_progress[key]
            last = lane.last_progress.get(key)
            if newer and last is not None:
                self._done()  # a later progress of this job is already queued: it supersedes this one
            elif last is None or time.monotonic() - last >= self.progress_interval:
                lane.last_progress[key] = time.monotonic()
                self._deliver(event)
            else:
                replaced = lane.held.pop(key, None)
                if replaced is not None:
                    self._done()  # superseded by a later progress event
                lane.held[key] = event
            return
        held = lane.held.pop(key, None)
        if held is not None:
            self._deliver(held)
        self._deliver(event)
        if event.type in FINAL_EVENT_TYPES:
            lane.last_progress.pop(key, None)

    def _until_next_held(self, lane: _Lane) -> float | None:
        if not lane.held:
            return None
        due = min(lane.last_progress[key] + self.progress_interval for key in lane.held)
        return max(0.0, due - time.monotonic())

    def _send_due_progress(self, lane: _Lane) -> None:
        now = time.monotonic()
        for key in [k for k in lane.held if now - lane.last_progress[k] >= self.progress_interval]:
            lane.last_progress[key] = time.monotonic()
            self._deliver(lane.held.pop(key))

    def _deliver(self, event: _Event) -> None:
        deadline = time.monotonic() + self.deadline
        attempt, error = 0, "sender closed"
        while attempt < self.max_attempts and not self._stopping.is_set():
            attempt += 1
            error, retryable, retry_after = self._attempt(event)
            if error is None:
                self._delivered(event)
                return
            delay = min(retry_after if retry_after is not None
                        else self.backoff * 2 ** (attempt - 1), self.max_backoff)
            if not retryable or attempt == self.max_attempts or time.monotonic() + delay > deadline:
                break
            log.info("webhook %s (%s) to %s failed (%s), retry %d in %.2f s", event.type,
                     event.msg_id, url_for_log(event.url), error, attempt, delay)
            self._on_outcome("retried")
            self._stopping.wait(delay)
        if self._stopping.is_set() and event.member is not None:
            self._release(event)  # left in the outbox: another worker delivers it when the lease runs out
            return
        self._drop(event, attempt, error)

    def _delivered(self, event: _Event) -> None:
        self._on_outcome("delivered")
        if event.member is not None:
            with self._cond:  # removed by `_keep_leases` within REMOVE_EVERY, with the others delivered meanwhile
                self._unremoved.append(event.member)
        self._release(event)

    def _release(self, event: _Event) -> None:
        if event.member is not None:
            with self._cond:
                self._leased.discard(event.member)
        self._done()

    def _keep_leases(self) -> None:
        """While this sender holds outbox events or has delivered ones to remove: remove those every
        REMOVE_EVERY seconds (one ZREM for all of them) and move the leases of the held ones forward
        every lease / 3. Ends when there is nothing left to do."""
        tick = min(self.REMOVE_EVERY, self.lease / 3)
        renewed = time.monotonic()
        while not self._stopping.wait(tick):
            with self._cond:
                held, unremoved = list(self._leased), list(self._unremoved)
            renew = held and time.monotonic() - renewed >= self.lease / 3 - tick / 2
            try:
                self.outbox.remove(unremoved)  # type: ignore[union-attr]
                with self._cond:
                    del self._unremoved[:len(unremoved)]  # only appended to meanwhile
                if renew:
                    self.outbox.extend(held, self.lease)  # type: ignore[union-attr]
                    renewed = time.monotonic()
            except redis.RedisError as exc:
                log.warning("webhook outbox unreachable (%s); retrying in %.1f s", exc, tick)
            with self._cond:
                self._cond.notify_all()
                if not self._leased and not self._unremoved:
                    self._keeper = None
                    return

    def _attempt(self, event: _Event) -> tuple[str | None, bool, float | None]:
        """One POST: (error or None, retryable, Retry-After seconds or None)."""
        sent_at = datetime.fromtimestamp(int(time.time()), tz=timezone.utc)  # a fresh timestamp per attempt
        headers = {"Content-Type": "application/json",
                   "User-Agent": "maskfleet-webhooks",
                   "webhook-id": event.msg_id,
                   "webhook-timestamp": str(int(sent_at.timestamp())),
                   "webhook-signature": self._signer.sign(event.msg_id, sent_at, event.body.decode("utf-8"))}
        request = urllib.request.Request(event.url, data=event.body, headers=headers,
                                         method="POST")
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                response.read()
            return None, False, None
        except urllib.error.HTTPError as exc:
            exc.close()
            retryable = exc.code == 429 or exc.code >= 500
            return f"HTTP {exc.code}", retryable, _retry_after(exc.headers.get("Retry-After"))
        except (OSError, http.client.HTTPException) as exc:  # refused, timeout, reset, DNS
            return f"{type(exc).__name__}: {exc}", True, None
        except ValueError as exc:  # a URL urllib cannot use
            return str(exc), False, None

    def _drop(self, event: _Event, attempts: int, error: str) -> None:
        """Give up on an event: a durable one goes to the dead letters (replayable), any other is gone."""
        if event.member is not None:
            try:
                self.outbox.dead_letter(OutboxEvent.of(event.member), error, attempts)  # type: ignore[union-attr]
            except redis.RedisError as exc:  # its lease runs out and another worker tries again
                log.warning("webhook %s (%s) not dead-lettered (%s): left in the outbox", event.type, event.msg_id, exc)
            else:
                log.warning("webhook %s (%s) to %s dead-lettered after %d attempt(s): %s", event.type,
                            event.msg_id, url_for_log(event.url), attempts, error)
                self._on_outcome("dead_lettered")
            self._release(event)
            return
        log.warning("webhook %s (%s) to %s dropped after %d attempt(s): %s", event.type,
                    event.msg_id, url_for_log(event.url), attempts, error)
        self._on_outcome("dropped")
        self._done()

    def _done(self) -> None:
        with self._cond:
            self._outstanding -= 1
            self._cond.notify_all()


def _retry_after(value: str | None) -> float | None:
    """The receiver's Retry-After in seconds (delay-seconds or HTTP-date, parsed by urllib3), None when absent or malformed."""
    if value is None:
        return None
    try:
        return _RETRY_AFTER.parse_retry_after(value)
    except InvalidHeader:
        return None  # use our own backoff


def _destination(url: str) -> str:
    """``scheme://host:port`` of ``url``: what shares one lane (and one receiver's fate)."""
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.rpartition('@')[2].lower()}"


def url_for_log(url: str) -> str:
    """The URL without query or credentials (either may hold a token)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
