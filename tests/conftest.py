"""Shared fixtures. ``s3_server``: a real S3-compatible server for the session; ``receivers``:
webhook receivers made by the test (``receivers(**options)``), closed after it; and the
session's own redis-server, so the suite never flushes a database of a shared Redis.
The whole run is offline for Hugging Face's libraries (HF_HUB_OFFLINE=1).

Unless ``MASKFLEET_TEST_REDIS`` names a Redis to use (``redis://host:port``, DBs 1-15 are
claimed and flushed there), a private ``redis-server`` on a free loopback port serves the
whole run and stops with it (also on an interrupted run: atexit).
"""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from maskfleet.storage import reset_s3_client
from redis_server import RedisServer
from s3_server import S3Server
from webhook_receiver import Receiver

TEST_REDIS_ENV = "MASKFLEET_TEST_REDIS"
# No test may reach a model hub: every model is made on the spot or read from tests/data. Set before
# diffusers or transformers are imported; the workers and commands the tests start inherit it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
_private_redis: list[tuple[RedisServer, Path]] = []


def pytest_configure(config):
    if os.environ.get(TEST_REDIS_ENV) or shutil.which("redis-server") is None:
        return  # a Redis named by the developer, or none (the fleet tests then skip)
    workdir = Path(tempfile.mkdtemp(prefix="maskfleet-test-redis-"))
    server = RedisServer(workdir).start()
    _private_redis.append((server, workdir))
    atexit.register(_stop_private_redis)
    os.environ[TEST_REDIS_ENV] = server.url().rsplit("/", 1)[0]  # read by fleet_workers.REDIS_URL


def pytest_unconfigure(config):
    _stop_private_redis()


def _stop_private_redis():
    while _private_redis:
        server, workdir = _private_redis.pop()
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        os.environ.pop(TEST_REDIS_ENV, None)

# Anything from the developer's own AWS setup that could point boto3 elsewhere.
_FOREIGN_AWS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                    "AWS_SECURITY_TOKEN", "AWS_DEFAULT_PROFILE")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """Moto's standalone server on loopback; boto3's environment points at it meanwhile."""
    workdir = tmp_path_factory.mktemp("s3")
    server = S3Server.start(workdir)
    env = pytest.MonkeyPatch()
    try:
        for name in _FOREIGN_AWS_ENV:
            env.delenv(name, raising=False)
        env.setenv("AWS_CONFIG_FILE", str(workdir / "no-aws-config"))
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", str(workdir / "no-aws-credentials"))
        for name, value in server.environment().items():
            env.setenv(name, value)
        reset_s3_client()
        yield server
    finally:
        env.undo()
        reset_s3_client()
        server.stop()


# Property-based tests (tests/test_fuzz_*.py): a small budget in the normal suite, a long run
# on demand with `pytest tests/test_fuzz_inputs.py --hypothesis-profile=fuzz`. Deadlines are
# generous (a loaded 2-core machine); the memory bound is enforced by fuzz_limits.py.
from datetime import timedelta  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("suite", max_examples=150, deadline=timedelta(seconds=10),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=20000, deadline=timedelta(seconds=30),
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("suite")  # --hypothesis-profile overrides it


@pytest.fixture
def receivers():
    """Make webhook receivers (webhook_receiver.Receiver) during a test; all are closed after it."""
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()
