"""Every write a persistent RedisServer took, in order, read back from its append-only file.

A test that polls a job's state can miss a state that lasted a few milliseconds (a
REVOKED overwritten by the redelivery's STARTED); the AOF cannot: Redis appends each
write that changed something before it answers. `result_states(workdir)` lists, per
task id, every state its celery-task-meta key was set to.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

META_PREFIX = b"celery-task-meta-"


def commands(workdir: Path) -> list[list[bytes]]:
    """The commands of the AOF's incremental files (RESP arrays of bulk strings), oldest first."""
    data = b"".join(p.read_bytes() for p in sorted((workdir / "appendonlydir").glob("*.incr.aof")))
    found, i = [], 0
    while i < len(data):
        if data[i:i + 1] != b"*":
            raise ValueError(f"not a RESP array at byte {i}: {data[i:i + 20]!r}")
        end = data.index(b"\r\n", i)
        count, i = int(data[i + 1:end]), end + 2
        args = []
        for _ in range(count):
            end = data.index(b"\r\n", i)
            size, i = int(data[i + 1:end]), end + 2
            args.append(data[i:i + size])
            i += size + 2
        found.append(args)
    return found


def result_states(workdir: Path) -> dict[str, list[str]]:
    """task id -> every state Celery stored for it, in order."""
    states: dict[str, list[str]] = defaultdict(list)
    for args in commands(workdir):
        if args[0].upper() == b"SET" and args[1].startswith(META_PREFIX):
            states[args[1][len(META_PREFIX):].decode()].append(json.loads(args[2])["status"])
    return dict(states)
