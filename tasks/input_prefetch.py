"""Inputs of a held job read while the job before it runs, so the GPU does not wait on S3.

With ``MASKFLEET_PREFETCH_JOBS=N`` (default 0: off) a worker reserves up to N jobs
beyond the one it runs (tasks/app.py). When such a job arrives while the worker is busy,
the worker's main process (idle while its pool child samples) reads the job's S3 inputs
(latent, mask, conditioning files) in a background thread and leaves them in a private
folder, one sub-folder per task id, made visible by a rename only once whole. The pool
child, when it starts the job, takes that folder if it is there, serves the bytes to
``read_object`` (storage/prefetched_objects.py) and deletes it; otherwise it reads from
S3 as usual. Every check a job's inputs get still happens in the child, on the same
bytes; a read that fails ahead is simply not kept, and the child's own read reports it.

The inputs are read after the job was submitted, as they would be by a worker that took
the job at once; a producer must not change a job's inputs after submitting it, with or
without prefetch. Folders of jobs this worker no longer holds (run elsewhere after a
cancel, or finished before their read ahead did) are swept at each new read, and the
whole folder is removed at worker shutdown.

The cost: a held job waits behind the running one even when another worker is idle;
leases (leases.py) cover held jobs, so a dead worker's held jobs come back within a lease.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

from celery.signals import task_received, worker_init, worker_shutdown

from ..job import JobError, parse_job
from ..storage.errors import InvalidFile
from ..storage.objects import is_s3_uri, read_object
from ..storage.prefetched_objects import serving
from .leases import held_requests
from .lifecycle import Concern, TaskRun
from .settings import TASK_NAME, load_settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SAFE_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,254}")  # job ids and uuids; a foreign id with "/" is not read ahead
_root: Path | None = None  # set in the main process before the pool forks, so children inherit it
_reader: ThreadPoolExecutor | None = None


def s3_inputs(job_data: Any) -> dict[str, str]:
    """The job's S3 inputs as {field: uri}; empty for a job that does not parse (the child will say why)."""
    try:
        job = parse_job(job_data)
    except JobError:
        return {}
    return {field: uri for field, uri in job.input_uris().items() if is_s3_uri(uri)}


def folder_of(root: Path, task_id: Any) -> Path | None:
    """The task's folder under `root`, or None for an id that is not a plain file name (never a path)."""
    if not isinstance(task_id, str) or not SAFE_TASK_ID.fullmatch(task_id):
        return None
    return root / task_id


def read_ahead(root: Path, task_id: str, inputs: dict[str, str]) -> bool:
    """Read `inputs` into ``root/<task_id>`` (whole or not at all); False when none could be read."""
    folder = folder_of(root, task_id)
    if folder is None:
        return False
    partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=root))
    manifest: dict[str, str] = {}
    try:
        for n, (field, uri) in enumerate(sorted(inputs.items())):
            if uri in manifest:
                continue
            try:
                data = read_object(uri, field)
            except InvalidFile as e:  # the child reads it again and fails the job with this error
                log.debug("not read ahead: %s", e)
                continue
            (partial / str(n)).write_bytes(data)
            manifest[uri] = str(n)
        if not manifest:
            return False
        (partial / MANIFEST).write_text(json.dumps(manifest))
        os.rename(partial, folder)
        return True
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def take(root: Path, task_id: str) -> dict[str, bytes]:
    """The inputs read ahead for `task_id` ({uri: bytes}), removed from `root`; empty when none."""
    folder = folder_of(root, task_id)
    if folder is None:
        return {}
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return {uri: (folder / name).read_bytes() for uri, name in manifest.items()}
    except (OSError, ValueError):
        return {}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(root: Path, keep: set[str]) -> None:
    """Remove the folders of task ids not in `keep` (finished, or run by another worker)."""
    for entry in root.iterdir():
        if entry.name not in keep and not entry.name.startswith("."):
            shutil.rmtree(entry, ignore_errors=True)


def served_inputs(task_id: str) -> ContextManager[None]:
    """In the child running `task_id`: serve its inputs read ahead, if any, to `read_object`."""
    if _root is None:
        return nullcontext()
    objects = take(_root, task_id)
    if objects:
        log.info("job %s: %d inputs read ahead while the previous job ran", task_id, len(objects))
    return serving(objects)


def _held_task_ids() -> set[str]:
    from celery.worker import state

    return {r.id for r in held_requests(state)}


def _read_in_background(task_id: str, inputs: dict[str, str]) -> None:
    root = _root
    if root is None:
        return
    try:
        sweep(root, _held_task_ids() | {task_id})
        read_ahead(root, task_id, inputs)
    except Exception:  # never the job's concern: its child reads the inputs itself
        log.exception("reading ahead the inputs of %s failed", task_id)


@worker_init.connect
def _start(**_: Any) -> None:
    global _root, _reader
    if load_settings().prefetch_jobs > 0:
        _root = Path(tempfile.mkdtemp(prefix="maskfleet-prefetch-"))
        _reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maskfleet-prefetch")


@task_received.connect
def _on_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """A job arrived at this worker: read its inputs ahead if it will wait behind running ones."""
    from celery.worker import state

    if _reader is None or request is None or getattr(request, "task_name", None) != TASK_NAME:
        return
    # Reserved requests include the running ones (the pool may not have reported them
    # started yet); with all its processes taken, this job waits: read its inputs meanwhile.
    processes = getattr(getattr(sender, "pool", None), "num_processes", 1) or 1
    if len(state.reserved_requests) < processes:  # the pool takes it now: its child reads the inputs
        return
    inputs = s3_inputs(request.args[0] if request.args else None)
    if inputs:
        _reader.submit(_read_in_background, request.id, inputs)


@worker_shutdown.connect
def _stop(**_: Any) -> None:
    global _root, _reader
    if _reader is not None:
        _reader.shutdown(wait=True, cancel_futures=True)
    if _root is not None:
        shutil.rmtree(_root, ignore_errors=True)
    _root, _reader = None, None


class PrefetchedInputs(Concern):
    """Around the job: its inputs read ahead, if any, served to the storage readers."""

    def around(self, run: TaskRun) -> ContextManager[None]:
        return served_inputs(run.task_id)
