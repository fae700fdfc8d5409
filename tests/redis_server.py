"""A redis-server of the test's own, on a free loopback port: to restart it, or give it a password.

The machine's Redis (127.0.0.1:6379) is shared by the whole suite, so a test that
restarts its broker or needs `requirepass` starts one of these instead. With
``persistent=True`` it keeps an append-only file fsynced on every write in its folder,
so a restart (SHUTDOWN, then the same command again) keeps queues, unacked messages and
results, as a production Redis with AOF does.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

START_DEADLINE_S = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """`start()`, `stop()`, `restart()`; `url(db)` includes the password when there is one."""

    def __init__(self, workdir: Path, password: str | None = None, persistent: bool = False,
                 extra_args: tuple[str, ...] = ()):
        if shutil.which("redis-server") is None:  # pragma: no cover
            raise RuntimeError("redis-server is not installed")
        self.workdir = workdir
        self.password = password
        self.persistent = persistent
        self.extra_args = extra_args  # more redis-server options (a replica's --replicaof)
        self.port = _free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = workdir / f"redis-{self.port}.log"

    def url(self, db: int = 0) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/{db}"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url())

    def commands(self) -> int:
        """Commands this server has run since it started (INFO commandstats, the INFO itself included)."""
        return sum(int(v["calls"]) for v in self.client().info("commandstats").values())

    def _argv(self) -> list[str]:
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir),
                "--save", "", "--logfile", str(self.log_path)]
        if self.persistent:
            argv += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            argv += ["--appendonly", "no"]
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        return argv + list(self.extra_args)

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        end = time.monotonic() + START_DEADLINE_S
        while time.monotonic() < end:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited ({self.process.returncode}): {self._log_tail()}")
            try:
                if self.client().ping():
                    return self
            except redis.RedisError:
                time.sleep(0.05)
        raise TimeoutError(f"redis-server on port {self.port} did not answer: {self._log_tail()}")

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as a lost host would, with no SHUTDOWN and no goodbye to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        """SHUTDOWN (the AOF is already on disk), then wait for the process."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.client().shutdown(nosave=not self.persistent)
        except redis.RedisError:
            pass  # the connection drops as the server exits
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop, stay down `down_for` seconds (clients see refused connections), start on the same port."""
        self.stop()
        if down_for:
            time.sleep(down_for)  # the outage itself, not a synchronisation
        self.start()

    def _log_tail(self) -> str:
        return self.log_path.read_text()[-2000:] if self.log_path.exists() else "(no log)"
