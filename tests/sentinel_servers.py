"""A Redis Sentinel deployment of the test's own: a master, a replica and three sentinels on loopback.

The master and the replica share a password; the sentinels have their own. The sentinels
(quorum 2) call the master down after DOWN_AFTER_MS without an answer and promote the
replica. `url(db)` is the fleet's `sentinel://` URL for it, every sentinel listed.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from redis_server import START_DEADLINE_S, RedisServer, _free_port

MASTER_NAME = "mymaster"
DOWN_AFTER_MS = 1000
SENTINELS = 3


class SentinelDeployment:
    def __init__(self, workdir: Path, password: str, sentinel_password: str):
        self.workdir = workdir
        self.password = password
        self.sentinel_password = sentinel_password
        self.master = RedisServer(workdir, password=password)
        self.replica: RedisServer | None = None
        self.sentinel_ports = [_free_port() for _ in range(SENTINELS)]
        self.sentinels: list[subprocess.Popen] = []

    def url(self, db: int = 0) -> str:
        return ";".join(f"sentinel://:{self.password}@127.0.0.1:{port}/{db}" for port in self.sentinel_ports)

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index], password=self.sentinel_password, socket_timeout=5)

    def start(self) -> "SentinelDeployment":
        self.master.start()
        self.replica = RedisServer(self.workdir, password=self.password,
                                   extra_args=("--replicaof", "127.0.0.1", str(self.master.port))).start()
        self._until(lambda: self.replica.client().info("replication").get("master_link_status") == "up",
                    "the replica in sync")
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"  # sentinels rewrite their file: one each
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.workdir}", f"logfile {self.workdir}/sentinel-{port}.log",
                f"requirepass {self.sentinel_password}", f"sentinel sentinel-pass {self.sentinel_password}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {self.master.port} 2",
                f"sentinel auth-pass {MASTER_NAME} {self.password}",
                f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
                f"sentinel failover-timeout {MASTER_NAME} 10000", ""]))
            self.sentinels.append(subprocess.Popen(["redis-server", str(conf), "--sentinel"],
                                                   stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        for i in range(SENTINELS):  # each sentinel knows the replica and the two others
            self._until(lambda i=i: len(self.sentinel(i).sentinel_slaves(MASTER_NAME)) == 1
                        and len(self.sentinel(i).sentinel_sentinels(MASTER_NAME)) == SENTINELS - 1,
                        f"sentinel {i} to see the replica and its peers")
        return self

    def master_port(self) -> int:
        return int(self.sentinel().sentinel_get_master_addr_by_name(MASTER_NAME)[1])

    def wait_replicated(self, timeout_ms: int = 5000) -> None:
        """Until the replica has every write the master took so far (Redis's WAIT)."""
        acked = self.master.client().execute_command("WAIT", 1, timeout_ms)
        assert int(acked) == 1, "the replica did not acknowledge the master's writes"

    def kill_master(self) -> None:
        self.master.kill()

    def wait_promoted(self, deadline_s: float = 60.0) -> float:
        """Until every sentinel names the replica as master and it takes writes; the seconds it took."""
        start = time.monotonic()
        self._until(lambda: all(self._names_replica(i) for i in range(SENTINELS))
                    and self.replica.client().info("replication")["role"] == "master",
                    "the replica promoted", deadline_s)
        return time.monotonic() - start

    def _names_replica(self, index: int) -> bool:
        try:
            return int(self.sentinel(index).sentinel_get_master_addr_by_name(MASTER_NAME)[1]) == self.replica.port
        except redis.RedisError:
            return False

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinels:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for server in (self.replica, self.master):
            if server is not None:
                server.stop()

    def _until(self, ready, what: str, deadline_s: float = START_DEADLINE_S) -> None:
        end = time.monotonic() + deadline_s
        last: Exception | None = None
        while time.monotonic() < end:
            try:
                if ready():
                    return
            except redis.RedisError as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"waited {deadline_s} s for {what} (last error: {last})")
