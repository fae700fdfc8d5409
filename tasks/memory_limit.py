"""Out of memory: a job too large for its device fails with JobOutOfMemory, and the worker goes on.

On a GPU, a job that does not fit raises CUDA's OutOfMemoryError inside the model; on
the CPU an allocation fails (or, without a limit, the kernel's OOM killer ends the whole
process, and the job comes back as a poison job: deliveries.py). Either way the job
would fail again with the same parameters, so it is not retried: the task turns the
error into :class:`JobOutOfMemory`, drops the job's tensors and returns cached blocks to
the device before the next job.

``MASKFLEET_MEMORY_LIMIT_MB`` caps what a worker's job process may use: on CUDA through
``torch.cuda.set_per_process_memory_fraction`` (the caching allocator refuses past it),
on the CPU through the process's data limit (RLIMIT_DATA: heap and private mappings),
so an oversized job fails at its first large allocation instead of pushing the host
into swap or the OOM killer. Unset, the device's own size is the limit.
"""
from __future__ import annotations

import gc
import resource
from contextlib import contextmanager
from typing import Iterator

import torch

from ..settings import load_settings, variable
from .errors import JobOutOfMemory
from .lifecycle import Concern, TaskRun
from .worker_pipeline import current_pipeline

LIMIT_ENV = variable("memory_limit_mb")
_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory", "cannot allocate memory")


def memory_limit_mb(env: dict | None = None) -> int | None:
    """MASKFLEET_MEMORY_LIMIT_MB, None when unset."""
    return load_settings(env).memory_limit_mb


def apply_memory_limit(device: torch.device, limit_mb: int | None) -> None:
    """Cap this process's memory on `device` (see the module docstring); None leaves it alone."""
    if limit_mb is None:
        return
    limit = limit_mb * 1024 * 1024
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, limit / total), device)
    else:
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _MESSAGES)


def describe(error: BaseException, device: torch.device, limit_mb: int | None) -> str:
    """The JobOutOfMemory message: device, the limit, and the allocator's own first line."""
    detail = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
    cap = f" (limit MASKFLEET_MEMORY_LIMIT_MB={limit_mb})" if limit_mb is not None else ""
    return (f"out of memory on {device}{cap}: {detail}; not retried with the same parameters, "
            "use a smaller batch or resolution")


def free_memory(device: torch.device) -> None:
    """Give back what a failed job held: unreachable tensors, then the CUDA allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _device() -> torch.device:
    pipeline = current_pipeline()
    return pipeline.device if pipeline is not None else torch.device("cpu")


class OutOfMemory(Concern):
    """An out-of-memory error becomes JobOutOfMemory (not retried); the device is freed for the next job."""

    def failed(self, run: TaskRun, error: Exception) -> Exception | None:
        if not is_out_of_memory(error):
            return None
        return JobOutOfMemory(describe(error, _device(), run.settings.memory_limit_mb))

    @contextmanager
    def around(self, run: TaskRun) -> Iterator[None]:
        try:
            yield
        except JobOutOfMemory:
            # Raised by the lifecycle outside the except block of the original error, whose
            # traceback (holding the job's tensors) is gone by now: they can be collected.
            free_memory(_device())
            raise
