"""A real S3-compatible HTTP server for tests: moto's standalone server in a subprocess.

Tests talk to it over loopback HTTP through boto3 only, exactly as a worker talks to
MinIO or AWS; nothing is patched in-process.
"""

import itertools
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "maskfleet-test",
    "AWS_SECRET_ACCESS_KEY": "maskfleet-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
START_DEADLINE_S = 60.0


class S3Server:
    """A running moto server: ``endpoint_url``, a boto3 ``client`` for checks, ``make_bucket()``."""

    def __init__(self, process: subprocess.Popen, port: int, log_path: Path):
        self.process = process
        self.port = port
        self.log_path = log_path
        self.endpoint_url = f"http://127.0.0.1:{port}"
        session = boto3.session.Session(
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=CREDENTIALS["AWS_DEFAULT_REGION"])
        self.client = session.client("s3", endpoint_url=self.endpoint_url)
        self._names = itertools.count()

    @classmethod
    def start(cls, workdir: Path) -> "S3Server":
        log_path = workdir / "moto-server.log"
        for _ in range(3):  # the free port may be taken between finding and binding it
            port = _free_port()
            with open(log_path, "wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                    env={**os.environ, **CREDENTIALS})
            if _wait_until_serving(process, port, time.monotonic() + START_DEADLINE_S):
                return cls(process, port, log_path)
            _stop(process)
        raise RuntimeError(f"moto server did not start; log:\n{log_path.read_text()[-4000:]}")

    def environment(self) -> dict[str, str]:
        """What a worker would have in its environment to use this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL": self.endpoint_url}

    def make_bucket(self) -> str:
        name = f"mf-{next(self._names)}-{secrets.token_hex(4)}"
        self.client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        _stop(self.process)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(process: subprocess.Popen, port: int, deadline: float) -> bool:
    delay = 0.02
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
    return False


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
