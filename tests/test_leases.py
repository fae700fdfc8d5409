"""The lease pieces on their own, against the machine's Redis: which tags a worker holds, how they are refreshed."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import redis

from maskfleet.tasks.leases import (UNACKED_INDEX_KEY, held_delivery_tags, heartbeat_interval, refresh_leases,
                                    restore_interval)
from fleet_workers import claim_db_url, flush, require_redis

require_redis()


class Request:
    """What the heartbeat reads of a celery.worker.request.Request (hashable, like the real one)."""

    def __init__(self, tag: str | None):
        self.message = SimpleNamespace(delivery_tag=tag)


def request(tag: str | None) -> Request:
    return Request(tag)


@pytest.fixture
def db():
    url = claim_db_url()
    try:
        yield redis.Redis.from_url(url)
    finally:
        flush(url)


def test_held_tags_cover_reserved_running_and_countdown_requests():
    reserved, running, waiting = request("r"), request("a"), request("s")
    state = SimpleNamespace(requests={"1": reserved, "2": running}, reserved_requests={reserved},
                            active_requests={running}, scheduled_requests={waiting, request(None)})
    assert sorted(held_delivery_tags(state)) == ["a", "r", "s"]
    assert held_delivery_tags(SimpleNamespace(requests={})) == []


def test_refresh_moves_held_scores_to_now_and_never_brings_back_an_acked_message(db):
    old = time.time() - 1000
    db.zadd(UNACKED_INDEX_KEY, {"held": old, "other": old})
    now = time.time()
    assert refresh_leases(db, ["held", "acked-meanwhile"], now) == 1
    assert db.zscore(UNACKED_INDEX_KEY, "held") == pytest.approx(now)
    assert db.zscore(UNACKED_INDEX_KEY, "other") == pytest.approx(old)  # another worker's: left to expire
    assert db.zscore(UNACKED_INDEX_KEY, "acked-meanwhile") is None
    assert refresh_leases(db, []) == 0


@pytest.mark.parametrize("lease", [1, 3, 30, 600])
def test_heartbeats_come_several_times_per_lease_and_sweeps_within_it(lease):
    assert heartbeat_interval(lease) <= lease / 3
    assert 1 <= restore_interval(lease) <= max(1, lease / 3)
    assert lease + restore_interval(lease) < 60 or lease > 45  # the default lease recovers within a minute
