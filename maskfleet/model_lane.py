"""One thread runs every model evaluation of a process; job threads prepare, hand over and write.

A worker that runs one job at a time leaves its GPU idle while a job reads its inputs,
writes its output and goes through the task queue's handover. In a pipelined worker
(several job threads in one process, `MASKFLEET_PIPELINE=1`) each job thread reads and
checks its inputs on its own, then hands the prepared job to this lane and waits; the
lane's single thread samples one job or a batch after another, so the next job starts
the moment the previous one's sampling ends, and the previous job's thread writes its
output meanwhile.

Batching (`max_batch` > 1): jobs waiting in the lane whose batch key is equal (same
models, shapes and schedule: the caller decides) run as one batch, up to `max_batch`.
While other jobs are still being prepared and the batch is not full, the lane waits up
to `linger` seconds for them, not longer.

Hooks stay with their job: progress is relayed to the job's own thread (which calls its
hook there, where task context lives), and each job's stop check is asked by the lane
before every sampler call. A job whose check says stop, or raises (a time limit), is let
go at once with SamplingStopped or that error; its rows in a running batch are computed
to the end and thrown away. A batch stops early only when every job in it was let go.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Callable, Hashable, Sequence

from .sampling import ProgressHook, StopHook
from .sampling.errors import SamplingStopped

log = logging.getLogger(__name__)

# run_batch(works, on_progress, should_stop) -> one output per work, in order
RunBatch = Callable[[Sequence[Any], ProgressHook, StopHook], Sequence[Any]]


@dataclass(eq=False)
class _Waiting:
    work: Any
    key: Hashable | None
    should_stop: StopHook | None
    events: SimpleQueue = field(default_factory=SimpleQueue)
    let_go: bool = False


class ModelLane:
    """The process's model thread: `run(work)` from any job thread returns that work's output."""

    def __init__(self, run_batch: RunBatch, max_batch: int = 1, linger: float = 0.2):
        if max_batch < 1:
            raise ValueError(f"max_batch: must be at least 1, got {max_batch}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.linger = linger
        self._waiting: deque[_Waiting] = deque()
        self._preparing = 0
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._serve, name="maskfleet-model-lane", daemon=True)
        self._thread.start()
        self.received = 0  # jobs handed to the lane so far
        self.batches: deque[int] = deque(maxlen=1000)  # sizes of the latest batches (bounded: a worker runs for months)

    def expecting(self) -> "Expected":
        """Around a job thread's preparation and its `run`: the lane may wait for it to form a batch."""
        return Expected(self)

    def run(self, work: Any, key: Hashable | None = None, on_progress: ProgressHook | None = None,
            should_stop: StopHook | None = None, expected: "Expected | None" = None) -> Any:
        """Sample `work` in the lane (batched with waiting works of the same non-None `key`)."""
        waiting = _Waiting(work, key, should_stop)
        with self._changed:
            self._waiting.append(waiting)
            self.received += 1
            if expected is not None:
                expected.arrived()  # in the same lock: never seen as neither preparing nor waiting
            self._changed.notify_all()
        while True:
            kind, value = waiting.events.get()
            if kind == "progress":
                if on_progress is not None:
                    on_progress(*value)
            elif kind == "done":
                return value
            else:
                raise value

    def _take_batch(self) -> list[_Waiting]:
        with self._changed:
            while not self._waiting:
                self._changed.wait()
            batch = [self._waiting.popleft()]
            key = batch[0].key
            if key is None or self.max_batch == 1:
                return batch
            deadline = None
            while True:
                for other in [w for w in self._waiting if w.key == key][: self.max_batch - len(batch)]:
                    self._waiting.remove(other)
                    batch.append(other)
                if len(batch) >= self.max_batch or self._preparing == 0:
                    return batch
                now = time.monotonic()
                deadline = now + self.linger if deadline is None else deadline
                if now >= deadline:
                    return batch
                self._changed.wait(deadline - now)

    def _serve(self) -> None:
        while True:
            batch = self._take_batch()
            self.batches.append(len(batch))
            if len(batch) > 1:
                log.info("sampling %d jobs as one batch", len(batch))
            self._run(batch)

    def _run(self, batch: list[_Waiting]) -> None:
        def on_progress(done: int, total: int, which: str) -> None:
            for w in batch:
                if not w.let_go:
                    w.events.put(("progress", (done, total, which)))

        def should_stop() -> bool:
            for w in batch:
                if w.let_go or w.should_stop is None:
                    continue
                try:
                    stop = w.should_stop()
                except BaseException as e:  # a time limit: the job ends with it
                    _let_go(w, e)
                    continue
                if stop:
                    _let_go(w, SamplingStopped("stopped before a sampler call"))
            return all(w.let_go for w in batch)

        try:
            outputs = self.run_batch([w.work for w in batch], on_progress, should_stop)
        except BaseException as e:
            for w in batch:
                if not w.let_go:
                    _let_go(w, e)
            return
        for w, out in zip(batch, outputs):
            if not w.let_go:
                w.let_go = True
                w.events.put(("done", out))


def _let_go(waiting: _Waiting, error: BaseException) -> None:
    waiting.let_go = True
    waiting.events.put(("error", error))


class Expected:
    """A job on its way to the lane (reading inputs); counted until it arrives or gives up."""

    def __init__(self, lane: ModelLane):
        self.lane = lane
        self._counted = False

    def arrived(self) -> None:  # called with the lane's lock held
        if self._counted:
            self._counted = False
            self.lane._preparing -= 1

    def __enter__(self) -> "Expected":
        with self.lane._changed:
            self.lane._preparing += 1
            self._counted = True
        return self

    def __exit__(self, *_: Any) -> None:
        with self.lane._changed:
            self.arrived()
            self.lane._changed.notify_all()
