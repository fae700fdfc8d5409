"""Real Celery workers for the fleet tests: subprocesses on the test run's Redis (tests/conftest.py), one DB per module."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterable

import redis
from celery import Celery

from maskfleet.tasks.pipelined_worker import pool_arguments
from maskfleet.worker.launcher import peer_flags
from maskfleet.tasks.settings import load_settings

REDIS_URL = os.environ.get("MASKFLEET_TEST_REDIS", "redis://127.0.0.1:6379")  # conftest.py starts a private one


def require_redis() -> None:
    """Skip the calling test module when the machine has no Redis (CI starts one: .ci/run)."""
    import pytest

    try:
        redis.Redis.from_url(REDIS_URL).ping()
    except redis.RedisError:  # pragma: no cover
        pytest.skip(f"no Redis at {REDIS_URL}", allow_module_level=True)


CLAIM_KEY = "maskfleet-test:claimed"


def claim_db_url(first: int = 1, last: int = 15) -> str:
    """An empty DB of the machine's Redis, claimed with a marker key so a concurrent run picks another.

    `flush(url)` at the end frees it (the marker goes with everything else).
    """
    for db in random.sample(range(first, last + 1), last - first + 1):
        url = f"{REDIS_URL}/{db}"
        conn = redis.Redis.from_url(url)
        if conn.dbsize() == 0 and conn.set(CLAIM_KEY, str(os.getpid()), nx=True, ex=3600):
            if conn.dbsize() == 1:  # nobody else was writing there meanwhile
                return url
            conn.delete(CLAIM_KEY)
    raise RuntimeError(f"no empty Redis DB in {first}..{last} at {REDIS_URL}")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.02):
    """Poll `predicate` until it returns something truthy (returned); AssertionError naming `what` at the deadline."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"no {what} within {timeout} s")


def flush(url: str) -> None:
    redis.Redis.from_url(url).flushdb()


class Worker:
    """`python -m celery -A maskfleet.tasks.app worker -P prefork -c 1` on the given queues
    (the thread pool of a pipelined worker when `extra_env` has MASKFLEET_PIPELINE=1)."""

    def __init__(self, name: str, queues: list[str], url: str, models: Path, log: Path, extra_env: dict | None = None):
        self.name = f"{name}@test"
        env = {**os.environ, "MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url,
               "MASKFLEET_MODELS": str(models), "MASKFLEET_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "",
               **(extra_env or {})}
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "maskfleet.tasks.app", "worker", *pool_arguments(load_settings(env)),
             "-n", self.name, "-Q", ",".join(queues), "--loglevel", "INFO", *peer_flags(load_settings(env))],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self, app: Celery, deadline_s: float = 90.0) -> None:
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                if app.control.ping(destination=[self.name], timeout=0.5):
                    return
            except (redis.RedisError, OSError):  # the producer's connection to a broker that was restarted
                pass
            time.sleep(0.3)
        raise TimeoutError(f"worker not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.proc, timeout)


def stop_workers(workers: Iterable[Worker], timeout: float = 30.0) -> None:
    """Stop them all at once: each warm shutdown waits out an idle BRPOP (seconds), so one after
    another would add those waits up."""
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        stop_process(worker.proc, timeout, signalled=True)


def stop_process(proc: subprocess.Popen, timeout: float, signalled: bool = False) -> int:
    """SIGTERM (unless `signalled` already), then after `timeout` s SIGKILL to its whole session
    (started with start_new_session=True)."""
    if proc.poll() is None:
        if not signalled:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode


def start_launcher(url: str, models: Path, log: Path, lease_seconds: int = 30, models_served: str = "tiny",
                   extra_env: dict | None = None) -> subprocess.Popen:
    """`maskfleet worker --models-served <models_served> --device cpu` (one Celery worker, maskfleet@<host>-cpu)."""
    env = {**os.environ, "MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url, "MASKFLEET_MODELS": str(models),
           "CUDA_VISIBLE_DEVICES": "", "MASKFLEET_LEASE_SECONDS": str(lease_seconds), **(extra_env or {})}
    return subprocess.Popen([sys.executable, "-m", "maskfleet.cli", "worker", "--models-served", models_served,
                             "--device", "cpu"],
                            env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def worker_pids(launcher: subprocess.Popen) -> list[int]:
    """The launcher's Celery workers: its children (each leads its own session, pool included)."""
    try:
        text = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text()
    except OSError:
        return []
    return [int(pid) for pid in text.split()]


def wait_logged(log: Path, text: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < end and proc.poll() is None, log.read_text(errors="replace")[-3000:]
        time.sleep(0.05)


def stop_launcher(proc: subprocess.Popen, workers: list[int]) -> None:
    """End a launcher and every worker it started; the workers lead their own sessions, so
    killing the launcher's group would leave them running (and consuming the next test's DB)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Flower:
    """`python -m celery -A maskfleet.tasks.app flower` on 127.0.0.1:`port`, its API open (FLOWER_UNAUTHENTICATED_API),
    as the README runs it; `ready` once it answers and has seen a worker's heartbeat (its event capture is on)."""

    def __init__(self, url: str, port: int, log: Path, extra_env: dict | None = None):
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        env = {**os.environ, "MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url,
               "FLOWER_UNAUTHENTICATED_API": "true", **(extra_env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "maskfleet.tasks.app", "flower", "--address=127.0.0.1", f"--port={port}"],
            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )

    def get(self, path: str, timeout: float = 5.0):
        """The JSON (or, for /metrics, the text) Flower answers at `path`."""
        import json
        import urllib.request

        with urllib.request.urlopen(self.base + path, timeout=timeout) as response:
            body = response.read().decode()
        return body if path.startswith("/metrics") else json.loads(body)

    def task_state(self, task_id: str) -> str | None:
        import urllib.error

        try:
            return self.get(f"/api/task/info/{task_id}")["state"]
        except urllib.error.HTTPError as e:
            if e.code == 404:  # no event of it seen yet
                return None
            raise

    def wait_ready(self, worker_name: str, deadline_s: float = 90.0) -> None:
        def seen_worker() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"flower exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                return f'flower_worker_online{{worker="{worker_name}"}} 1.0' in self.get("/metrics")
            except OSError:
                return False

        wait_for(seen_worker, deadline_s, f"heartbeat of {worker_name} in Flower", poll=0.3)

    def stop(self, timeout: float = 15.0) -> None:
        stop_process(self.proc, timeout)


class Gateway:
    """`python -m maskfleet.cli gateway` on 127.0.0.1:`port` with `env`; stopped by `stop`."""

    def __init__(self, port: int, env: dict, log: Path, *args: str):
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen([sys.executable, "-m", "maskfleet.cli", "gateway", "--port", str(port), *args],
                                     env={**os.environ, **env}, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, deadline_s: float = 60) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
            import httpx

            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, deadline_s, "gateway /healthz", poll=0.1)

    def stop(self) -> None:
        stop_process(self.proc, 15)


def sse_events(response, stop=lambda event: False):
    """(id, event, data) of each Server-Sent Event in the stream, until it ends or `stop(event)` says so."""
    import json

    event: dict = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line:
            field, _, value = line.partition(": ")
            event[field] = value
            continue
        if event:
            parsed = (int(event["id"]), event["event"], json.loads(event["data"]))
            yield parsed
            if stop(parsed):
                return
        event = {}
