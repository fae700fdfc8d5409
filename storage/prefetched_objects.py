"""Objects read ahead for the job this process is about to run, served instead of a second read.

A worker that holds a job behind the one it runs reads that job's S3 inputs while the
GPU is busy (tasks/input_prefetch.py) and hands the bytes to the process that will run
it. `read_object` asks here first, so every format reader (latents, masks,
conditioning) takes them without knowing where they came from. Only S3 URIs are served:
a local file is read where it lies, so its confinement to MASKFLEET_ALLOWED_ROOTS is
checked as always. An object over the reader's size cap is not served (the real read
then refuses it with the usual message).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Mapping

# Per context (thread), so the job threads of a pipelined worker each see only their own job's objects.
_served: ContextVar[Mapping[str, bytes]] = ContextVar("maskfleet_served_objects", default={})


@contextmanager
def serving(objects: Mapping[str, bytes]) -> Iterator[None]:
    """Serve `objects` (S3 URI -> bytes) to `read_object` in this thread for the duration of the block."""
    token = _served.set(dict(objects))
    try:
        yield
    finally:
        _served.reset(token)


def served(uri: object, max_bytes: int) -> bytes | None:
    """The bytes read ahead for `uri`, or None when there are none (or they exceed `max_bytes`)."""
    data = _served.get().get(uri) if isinstance(uri, str) else None
    if data is None or len(data) > max_bytes:
        return None
    return data
