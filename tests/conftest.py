"""Shared fixtures. ``s3_server``: a real S3-compatible server for the session."""

import pytest
from maskfleet.storage import reset_s3_client
from s3_server import S3Server

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
