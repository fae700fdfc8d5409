"""A whole fleet in one process: in-memory broker and result backend, one solo-pool worker thread.

`maskfleet demo` uses it to send a job through the same path a real fleet uses (the
producer client, the broker, the `maskfleet.sample` task on a worker, PROGRESS and the
result through the result backend) on a machine with no Redis and no S3:

- broker `memory://` (kombu's in-process transport) and result backend `cache+memory://`
  (Celery's process-wide in-memory cache), set in the environment and on the app before
  anything connects, so a Redis running on the machine (or named in
  MASKFLEET_BROKER_URL) is never touched;
- the task's own small records (submission, done and cancel keys, normally in Redis)
  go to `MemoryKeys`, a dict behind the same few Redis calls;
- one Celery worker (solo pool, no heartbeat/mingle/gossip) runs in a daemon thread and
  is stopped and joined when the `embedded_fleet` block ends, so nothing keeps the
  process alive afterwards.

The worker's JobPipeline reads MASKFLEET_MODELS/DEVICE/DTYPE like a fleet worker; they are
set for the duration of the block and restored after it.
"""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Sequence
from unittest import mock

MEMORY_BROKER = "memory://"
MEMORY_BACKEND = "cache+memory://"
POLL_SECONDS = 0.05  # how often the worker looks at the in-memory queue


class MemoryKeys:
    """The subset of redis.Redis that tasks/ uses (set with nx/ex, get, exists, delete, incr, expire), in a dict."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, float | None]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _bytes(value: object) -> bytes:
        if isinstance(value, bytes):
            return value
        return str(value).encode()

    def _live(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and time.monotonic() >= expires:
            del self._data[key]
            return None
        return value

    def set(self, name: str, value: object, ex: int | None = None, nx: bool = False, **_: object) -> bool | None:
        with self._lock:
            if nx and self._live(name) is not None:
                return None
            self._data[name] = (self._bytes(value), None if ex is None else time.monotonic() + ex)
            return True

    def get(self, name: str) -> bytes | None:
        with self._lock:
            return self._live(name)

    def exists(self, *names: str) -> int:
        with self._lock:
            return sum(self._live(n) is not None for n in names)

    def delete(self, *names: str) -> int:
        with self._lock:
            return sum(self._data.pop(n, None) is not None for n in names)

    def incr(self, name: str) -> int:
        with self._lock:
            current = self._live(name)
            value = int(current or 0) + 1
            expires = self._data[name][1] if current is not None else None
            self._data[name] = (str(value).encode(), expires)
            return value

    def expire(self, name: str, seconds: int) -> bool:
        with self._lock:
            current = self._live(name)
            if current is None:
                return False
            self._data[name] = (current, time.monotonic() + seconds)
            return True


@contextmanager
def embedded_fleet(
    models_root: str,
    queues: Sequence[str],
    device: str = "auto",
    dtype: str = "float32",
    start_timeout: float = 30.0,
    stop_timeout: float = 30.0,
) -> Iterator[threading.Thread]:
    """Run one in-process worker consuming `queues` for the duration of the block; yield its thread.

    Inside the block `maskfleet.client.submit` and `JobHandle` work as against a real fleet.
    """
    env = {
        "MASKFLEET_BROKER_URL": MEMORY_BROKER,
        "MASKFLEET_RESULT_BACKEND": MEMORY_BACKEND,
        "MASKFLEET_MODELS": str(models_root),
        "MASKFLEET_DEVICE": device,
        "MASKFLEET_DTYPE": dtype,
        "MASKFLEET_METRICS_PORT": "0",  # an in-process demo opens no port: only `maskfleet worker` serves metrics
    }
    with mock.patch.dict(os.environ, env):  # restored as it was when the block ends
        # Imported only now: the app reads the URLs from the environment when first imported.
        from celery.worker import state as worker_state

        from .tasks import redis_keys, sample_task  # noqa: F401 (registers the task with the app)
        from .tasks.worker_pipeline import reset_pipeline
        from .tasks.app import app

        # Also when the app was imported earlier in this process (before anything connected).
        transport = dict(app.conf.broker_transport_options or {}, polling_interval=POLL_SECONDS)
        app.conf.update(
            broker_url=MEMORY_BROKER,
            result_backend=MEMORY_BACKEND,
            broker_transport_options=transport,
            worker_send_task_events=False,  # no Flower to watch an in-process worker
            task_send_sent_event=False,
            worker_hijack_root_logger=False,
        )
        conn = app.connection_for_write()
        try:
            if conn.transport_cls != "memory" or type(app.backend).__name__ != "CacheBackend":
                raise RuntimeError("the embedded fleet must be set up before the Celery app connects anywhere")
        finally:
            conn.release()
        keys = MemoryKeys()
        redis_keys.register_store(MEMORY_BACKEND, keys)  # the task's own keys go to the dict
        reset_pipeline()  # a JobPipeline for this block's models/device/dtype

        ready = threading.Event()
        worker = app.WorkController(
            hostname=f"maskfleet@embedded-{os.getpid()}",
            pool="solo",
            concurrency=1,
            queues=list(queues),
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            loglevel="WARNING",
            ready_callback=lambda consumer: ready.set(),
        )

        def serve() -> None:
            app.set_current()  # as `celery -A` does: the worker's tasks resolve this app, not Celery's default one
            worker.start()

        thread = threading.Thread(target=serve, name="maskfleet-embedded-worker", daemon=True)
        thread.start()
        failed = True
        try:
            deadline = time.monotonic() + start_timeout
            while not ready.wait(0.05):
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise RuntimeError("the embedded Celery worker did not start")
            yield thread
            failed = False
        finally:
            # The consumer loop sees the flag between messages (a running job ends first).
            # Leaving on an error (Ctrl-C included) does not wait for a running job: the
            # thread is a daemon and dies with the process.
            worker_state.should_terminate = 0
            thread.join(1.0 if failed else stop_timeout)
            worker_state.should_terminate = None
            redis_keys.register_store(MEMORY_BACKEND, None)
            reset_pipeline()
            if not thread.is_alive():
                app.close()
            elif not failed:
                raise RuntimeError("the embedded Celery worker did not stop")
