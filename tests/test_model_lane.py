"""The model lane (maskfleet/model_lane.py): one thread samples what job threads hand it, alone or batched."""
from __future__ import annotations

import threading

import pytest

from maskfleet.model_lane import ModelLane
from maskfleet.sampling.errors import SamplingStopped

DEADLINE_S = 10


class Recorder:
    """A run_batch that records its batches; works are ints, outputs their squares.

    A work listed in `hold` blocks until `release` is set, so tests can line others up behind it.
    """

    def __init__(self, hold=(), calls=3):
        self.batches: list[list[int]] = []
        self.hold = set(hold)
        self.release = threading.Event()
        self.started = threading.Event()
        self.calls = calls

    def __call__(self, works, on_progress, should_stop):
        self.batches.append(list(works))
        self.started.set()
        if self.hold & set(works):
            assert self.release.wait(DEADLINE_S)
        for done in range(1, self.calls + 1):
            if should_stop():
                raise SamplingStopped("all let go")
            on_progress(done, self.calls, "base")
        return [w * w for w in works]


def run_in_threads(lane, works, key=lambda w: "same", **hooks):
    results, threads = {}, []

    def one(w):
        try:
            results[w] = lane.run(w, key(w), **{k: v(w) for k, v in hooks.items()})
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            results[w] = e

    for w in works:
        t = threading.Thread(target=one, args=(w,))
        t.start()
        threads.append(t)
    return results, threads


def join(threads):
    for t in threads:
        t.join(DEADLINE_S)
        assert not t.is_alive()


def test_jobs_of_one_key_waiting_together_run_as_one_batch_up_to_the_limit():
    rec = Recorder(hold={1})
    lane = ModelLane(rec, max_batch=3)
    first, t1 = run_in_threads(lane, [1])
    assert rec.started.wait(DEADLINE_S)
    rest, t2 = run_in_threads(lane, [2, 3, 4, 5])
    wait_until(lambda: len(lane._waiting) == 4)
    rec.release.set()
    join(t1 + t2)
    assert first == {1: 1} and rest == {2: 4, 3: 9, 4: 16, 5: 25}
    assert rec.batches[0] == [1]
    assert sorted(len(b) for b in rec.batches[1:]) == [1, 3]  # four waiting, at most three per batch


def test_other_keys_and_no_key_never_share_a_batch():
    rec = Recorder(hold={0})
    lane = ModelLane(rec, max_batch=8)
    _, t0 = run_in_threads(lane, [0])
    assert rec.started.wait(DEADLINE_S)
    keys = {1: "a", 2: "b", 3: "a", 4: None, 5: None}
    results, t = run_in_threads(lane, list(keys), key=keys.get)
    wait_until(lambda: len(lane._waiting) == 5)
    rec.release.set()
    join(t0 + t)
    assert results == {w: w * w for w in keys}
    assert sorted(sorted(b) for b in rec.batches[1:]) == [[1, 3], [2], [4], [5]]


def test_progress_reaches_each_job_in_its_own_thread():
    rec = Recorder()
    lane = ModelLane(rec, max_batch=1)
    seen: dict[int, list] = {}

    def hook(w):
        seen[w] = []
        return lambda done, total, which: seen[w].append((done, total, which, threading.get_ident()))

    results, threads = run_in_threads(lane, [1, 2], on_progress=hook)
    join(threads)
    assert results == {1: 1, 2: 4}
    for w, thread in zip([1, 2], threads):
        assert [s[:3] for s in seen[w]] == [(1, 3, "base"), (2, 3, "base"), (3, 3, "base")]
        assert {s[3] for s in seen[w]} == {thread.ident}  # never the lane's thread


def test_a_stopped_job_is_let_go_at_once_and_its_batch_mates_finish():
    rec = Recorder(hold={0})
    lane = ModelLane(rec, max_batch=4)
    _, t0 = run_in_threads(lane, [0])
    assert rec.started.wait(DEADLINE_S)

    def stopper(w):
        if w == 2:
            return lambda: True
        if w == 3:
            def late() -> bool:
                raise TimeoutError("soft time limit")
            return late
        return lambda: False

    results, t = run_in_threads(lane, [1, 2, 3], should_stop=stopper)
    wait_until(lambda: len(lane._waiting) == 3)
    rec.release.set()
    join(t0 + t)
    assert results[1] == 1
    assert isinstance(results[2], SamplingStopped)
    assert isinstance(results[3], TimeoutError) and "soft time limit" in str(results[3])
    assert sorted(rec.batches[1]) == [1, 2, 3]


def test_a_batch_whose_jobs_are_all_stopped_ends_early_and_an_error_reaches_every_job():
    rec = Recorder(calls=100)
    lane = ModelLane(rec, max_batch=2)
    results, t = run_in_threads(lane, [7], should_stop=lambda w: lambda: True)
    join(t)
    assert isinstance(results[7], SamplingStopped)

    def broken(works, on_progress, should_stop):
        raise MemoryError("out of memory in the batch")

    lane = ModelLane(broken, max_batch=2)
    results, t = run_in_threads(lane, [1, 2])
    join(t)
    assert all(isinstance(r, MemoryError) for r in results.values())
    lane = ModelLane(rec)  # the lane thread survives a failed batch
    assert lane.run(3) == 9


def test_the_lane_waits_for_a_job_still_being_prepared_but_not_forever():
    rec = Recorder()
    lane = ModelLane(rec, max_batch=2, linger=DEADLINE_S)
    expected = lane.expecting().__enter__()  # a second job is reading its inputs
    results, t = run_in_threads(lane, [1])
    wait_until(lambda: lane.received == 1)
    assert lane.run(2, "same", expected=expected) == 4  # joined 1's batch: the lane waited for it
    join(t)
    assert results == {1: 1} and rec.batches == [[1, 2]]

    quick = ModelLane(rec, max_batch=2, linger=0.05)
    with quick.expecting():  # a job that never arrives (its inputs were bad): the lane goes on alone
        assert quick.run(3, "same") == 9


def test_max_batch_must_be_positive():
    with pytest.raises(ValueError, match="max_batch"):
        ModelLane(Recorder(), max_batch=0)


def wait_until(predicate, timeout=DEADLINE_S):
    end = threading.Event()
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        end.wait(0.005)
    raise AssertionError("condition not reached")
