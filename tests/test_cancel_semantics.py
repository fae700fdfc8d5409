"""`maskfleet cancel` of an id nobody submitted says so and records nothing, unless --force."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import redis

from fleet_workers import claim_db_url, flush, require_redis
from maskfleet.tasks.redis_keys import cancel_key


def cli(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_EXPIRES": "600"}
    return subprocess.run([sys.executable, "-m", "maskfleet.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def test_cancelling_an_unknown_id_says_so_and_leaves_no_tombstone():
    require_redis()
    url = claim_db_url()
    r = redis.Redis.from_url(url)
    job_id = f"never-submitted-{time.time_ns()}"
    try:
        refused = cli(url, "cancel", job_id)
        assert refused.returncode == 1 and refused.stdout == ""
        assert f"no job '{job_id}' is on record" in refused.stderr and "--force" in refused.stderr
        assert not r.exists(cancel_key(job_id))
        assert '"state": "PENDING"' in cli(url, "status", job_id).stdout  # a later job with this id would run

        forced = cli(url, "cancel", job_id, "--force")
        assert forced.returncode == 0 and '"state": "REVOKED"' in forced.stdout, forced.stderr
        assert 0 < r.ttl(cancel_key(job_id)) <= 600  # expires with the results
    finally:
        flush(url)
