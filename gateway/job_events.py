"""Server-Sent Events of a job (and `Prefer: wait`), fed by the result backend's own pub/sub, never by polling it.

Celery's Redis result backend PUBLISHes every state it stores on the channel named after
the task's key (`celery-task-meta-<id>`): STARTED, each PROGRESS update the worker sends
(throttled to a few per second), and the end (SUCCESS, FAILURE, REVOKED). Each gateway
process keeps one pub/sub connection (`JobEvents`), subscribed to the channels of the jobs
its clients follow; a message wakes that job's followers, which read the job once and
send it if it moved on.

Event ids order a job's events, so `Last-Event-ID` resumes where a client was: queued 0,
started 1, each half step 2 + 2 x (step - 1) (+ 1 for the mask sampler's), the end
TERMINAL_ID. A new stream starts with the job as it stands (sent only when newer than
Last-Event-ID), so a job that already ended sends its terminal event at once, and a client
that lost the connection before the terminal event gets it when it comes back.
"""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from typing import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

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


class JobEvents:
    """One pub/sub connection per process; `follow` yields a job's SSE frames until its terminal event."""

    def __init__(self, url: str, channel_of: Callable[[str], str]):
        self.url = url
        self.channel_of = channel_of
        self._followers: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._pubsub = None
        self._reader: asyncio.Task | None = None
        self._lock = asyncio.Lock()

    @property
    def following(self) -> int:
        return sum(len(v) for v in self._followers.values())

    async def follow(self, read: Callable[[], Awaitable[JobView]], job_id: str, last_id: int = -1) -> AsyncIterator[str]:
        """SSE frames for `job_id`: `read()` gives the job as it stands (after each wake-up)."""
        woken = asyncio.Event()
        await self._watch(job_id, woken)
        try:
            sent = last_id
            while True:
                view = await read()  # read after subscribing: no change falls between the two
                current = event_id(view)
                if current > sent:
                    sent = current
                    yield sse(view)
                if view.state in FINISHED:
                    return
                try:
                    await asyncio.wait_for(woken.wait(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    yield ": keepalive\n\n"
                woken.clear()
        finally:
            await self._unwatch(job_id, woken)

    async def wait(self, read: Callable[[], Awaitable[JobView]], job_id: str, seconds: float) -> JobView:
        """The job once it has ended, or as it stands after `seconds` (`Prefer: wait`), woken like `follow`."""
        woken = asyncio.Event()
        await self._watch(job_id, woken)
        try:
            deadline = asyncio.get_running_loop().time() + seconds
            while True:
                view = await read()
                left = deadline - asyncio.get_running_loop().time()
                if view.state in FINISHED or left <= 0:
                    return view
                try:
                    await asyncio.wait_for(woken.wait(), left)
                except asyncio.TimeoutError:
                    pass
                woken.clear()
        finally:
            await self._unwatch(job_id, woken)

    async def _watch(self, job_id: str, woken: asyncio.Event) -> None:
        async with self._lock:
            first = not self._followers[job_id]
            self._followers[job_id].add(woken)
            if self._pubsub is None:
                self._pubsub = aioredis.from_url(self.url).pubsub(ignore_subscribe_messages=True)
            if first:
                await self._pubsub.subscribe(self.channel_of(job_id))
            if self._reader is None or self._reader.done():
                self._reader = asyncio.create_task(self._read())

    async def _unwatch(self, job_id: str, woken: asyncio.Event) -> None:
        async with self._lock:
            followers = self._followers.get(job_id)
            if followers is None:
                return
            followers.discard(woken)
            if not followers:
                del self._followers[job_id]
                try:
                    await self._pubsub.unsubscribe(self.channel_of(job_id))
                except RedisError:
                    pass  # the reader resubscribes what is still followed

    async def _read(self) -> None:
        """Wake the followers of each channel a message comes on; after a lost connection, resubscribe and wake all.
        Runs for the life of the process (with nothing followed, each read just times out)."""
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
            for job_id, followers in list(self._followers.items()):
                if self.channel_of(job_id) == channel:
                    for woken in followers:
                        woken.set()

    async def _resubscribe(self) -> None:
        async with self._lock:
            try:
                await self._pubsub.aclose()
            except (RedisError, OSError):
                pass
            self._pubsub = aioredis.from_url(self.url).pubsub(ignore_subscribe_messages=True)
            try:
                if self._followers:
                    await self._pubsub.subscribe(*(self.channel_of(j) for j in self._followers))
            except (RedisError, OSError):
                return  # tried again after the next failed read
            for followers in self._followers.values():  # what changed meanwhile is read now
                for woken in followers:
                    woken.set()
