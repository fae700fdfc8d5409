"""The memory bound a fuzzed call must stay within, enforced rather than hoped for.

`memory_cap(extra)` lowers this process's address-space limit (RLIMIT_AS) to what it
maps now plus `extra` bytes for the duration of a block, then restores it: a reader that
tries to allocate gigabytes for a hostile header fails inside the block (MemoryError, or
torch's "can't allocate memory"), which the property then reports as the bug it is.
"""
from __future__ import annotations

import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def mapped_bytes() -> int:
    """This process's address space now (VmSize)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


@contextmanager
def memory_cap(extra_bytes: int) -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = mapped_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
