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
