"""Server-Sent Events of a job (and `Prefer: wait`), fed by the result backend's own pub/sub, never by polling it.

Celery's Redis result backend PUBLISHes every state it stores on the channel named after
the task's key (`celery-task-meta-<id>`): STARTED, each PROGRESS update the worker sends
(throttled to a few per second), and the end (SUCCESS, FAILURE, REVOKED). Each gateway
process keeps one pub/sub connection (`JobEvents`), subscribed to the channels of the jobs
its clients follow. A message makes the process read that job once (however many clients
follow it, and once more if messages came while it read) and hands the view to every
follower, which sends it if it moved on. Who may follow a job is checked when a stream
opens; the shared reads after that are the job's, not a key's.

Event ids order a job's events, so `Last-Event-ID` resumes where a client was: queued 0,
started 1, each half step 2 + 2 x (step - 1) (+ 1 for the mask sampler's), the end
TERMINAL_ID. A new stream starts with the job as it stands (sent only when newer than
Last-Event-ID), so a job that already ended sends its terminal event at once, and a client
that lost the connection before the terminal event gets it when it comes back.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

from redis.exceptions import RedisError

from ..tasks.redis_urls import async_redis_client
from .job_views import FINISHED, JobView

log = logging.getLogger(__name__)

TERMINAL_ID = 1_000_000_000  # above any step's id
KEEPALIVE_SECONDS = 15.0  # a comment line, so proxies keep an idle stream open
RECONNECT_SECONDS = 1.0
EVENT_NAMES = {"queued": "queued", "running": "progress", "succeeded": "succeeded", "failed": "failed",
               "cancelled": "cancelled"}


def event_id(view: JobView) -> int:
    if view.state in FINISHED:
        return TERMINAL_ID
    if view.state == "queued":
        return 0
    if view.progress is None:
        return 1
    return 2 + 2 * (view.progress.step - 1) + (view.progress.sampler == "mask")


def event_name(view: JobView) -> str:
    return "started" if view.state == "running" and view.progress is None else EVENT_NAMES[view.state]


def sse(view: JobView) -> str:
    return f"id: {event_id(view)}\nevent: {event_name(view)}\ndata: {view.model_dump_json()}\n\n"


@dataclass
class _Feed:
    """One followed job: its followers' wake-up events and the latest view read for them."""

    followers: set[asyncio.Event] = field(default_factory=set)
    view: JobView | None = None
    reading: bool = False
    again: bool = False


class JobEvents:
    """One pub/sub connection per process; `follow` yields a job's SSE frames until its terminal event,
    `wait` returns the job once it ended. `read_job(job_id)` reads a job as it stands."""

    def __init__(self, url: str, channel_of: Callable[[str], str], read_job: Callable[[str], Awaitable[JobView]]):
        self.url = url
        self.channel_of = channel_of
        self.read_job = read_job
        self._feeds: dict[str, _Feed] = {}
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._refreshes: set[asyncio.Task] = set()  # kept referenced until done (asyncio holds tasks weakly)
        self._lock = asyncio.Lock()

    @property
    def following(self) -> int:
        return sum(len(feed.followers) for feed in self._feeds.values())

    async def follow(self, job_id: str, last_id: int = -1) -> AsyncIterator[str]:
        """SSE frames for `job_id`, each newer than `last_id`, until the terminal event."""
        woken = asyncio.Event()
        feed = await self._watch(job_id, woken)
        try:
            sent = last_id
            view = await self.read_job(job_id)  # read after subscribing: no change falls between the two
            while True:
                current = event_id(view)
                if current > sent:
                    sent = current
                    yield sse(view)
                if view.state in FINISHED:
                    return
                try:
                    await asyncio.wait_for(woken.wait(), KEEPALIVE_SECONDS)
                    woken.clear()
                    view = feed.view or view
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"
                    view = await self.read_job(job_id)  # and a look of its own, in case a message was lost
        finally:
            await self._unwatch(job_id, woken)

    async def wait(self, job_id: str, seconds: float) -> JobView:
        """The job once it has ended, or as it stands after `seconds` (`Prefer: wait`)."""
        woken = asyncio.Event()
        feed = await self._watch(job_id, woken)
        try:
            deadline = asyncio.get_running_loop().time() + seconds
            view = await self.read_job(job_id)
            while True:
                left = deadline - asyncio.get_running_loop().time()
                if view.state in FINISHED or left <= 0:
                    return view
                try:
                    await asyncio.wait_for(woken.wait(), left)
                    woken.clear()
                    view = feed.view or view
                except asyncio.TimeoutError:
                    view = await self.read_job(job_id)
        finally:
            await self._unwatch(job_id, woken)

    async def _watch(self, job_id: str, woken: asyncio.Event) -> _Feed:
        async with self._lock:
            feed = self._feeds.get(job_id)
            if feed is None:
                feed = self._feeds[job_id] = _Feed()
                if self._pubsub is None:
                    self._pubsub = async_redis_client(self.url).pubsub(ignore_subscribe_messages=True)
                await self._pubsub.subscribe(self.channel_of(job_id))
            feed.followers.add(woken)
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read())
            return feed

    async def _unwatch(self, job_id: str, woken: asyncio.Event) -> None:
        async with self._lock:
            feed = self._feeds.get(job_id)
            if feed is None:
                return
            feed.followers.discard(woken)
            if not feed.followers:
                del self._feeds[job_id]
                try:
                    await self._pubsub.unsubscribe(self.channel_of(job_id))
                except RedisError:
                    pass  # the reader resubscribes what is still followed

    async def _refresh(self, job_id: str, feed: _Feed) -> None:
        """Read the job once for all its followers (again if a message came meanwhile), then wake them."""
        if feed.reading:
            feed.again = True
            return
        feed.reading = True
        try:
            while True:
                feed.again = False
                try:
                    feed.view = await self.read_job(job_id)
                except Exception as e:  # the followers keep their last view and read again at their keepalive
                    log.warning("job events: reading %s failed: %s", job_id, e)
                    return
                for woken in feed.followers:
                    woken.set()
                if not feed.again:
                    return
        finally:
            feed.reading = False

    async def _read(self) -> None:
        """Refresh the job of each channel a message comes on; after a lost connection, resubscribe and
        refresh every followed job. Runs for the life of the process (with nothing followed, reads time out)."""
        by_channel: dict[str, str] = {}
        while True:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as e:
                log.warning("job events: Redis pub/sub lost (%s); reconnecting", e)
                await asyncio.sleep(RECONNECT_SECONDS)
                await self._resubscribe()
                continue
            if message is None or message.get("type") != "message":
                continue
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            if channel not in by_channel:
                by_channel = {self.channel_of(job_id): job_id for job_id in self._feeds}
            job_id = by_channel.get(channel)
            feed = self._feeds.get(job_id) if job_id is not None else None
            if feed is not None:
                self._spawn(self._refresh(job_id, feed))

    async def _resubscribe(self) -> None:
        async with self._lock:
            try:
                await self._pubsub.aclose()
            except (RedisError, OSError):
                pass
            self._pubsub = async_redis_client(self.url).pubsub(ignore_subscribe_messages=True)
            try:
                if self._feeds:
                    await self._pubsub.subscribe(*(self.channel_of(j) for j in self._feeds))
            except (RedisError, OSError):
                return  # tried again after the next failed read
            for job_id, feed in self._feeds.items():  # what changed meanwhile is read now
                self._spawn(self._refresh(job_id, feed))

    def _spawn(self, coroutine) -> None:
        task = asyncio.create_task(coroutine)
        self._refreshes.add(task)
        task.add_done_callback(self._refreshes.discard)
