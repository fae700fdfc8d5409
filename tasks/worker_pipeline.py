"""This process's JobPipeline: made on the first job, in the process that runs tasks, kept for its life.

Made lazily in the prefork child (so CUDA and the models are never touched in the
worker's parent process) from the settings: MASKFLEET_MODELS, MASKFLEET_DEVICE,
MASKFLEET_DTYPE, MASKFLEET_STORAGE_RETRIES (output write retries), a model lane when
the worker is pipelined (MASKFLEET_PIPELINE), and MASKFLEET_MEMORY_LIMIT_MB applied to
its device. Models stay loaded between jobs. Imports torch only when a pipeline is made,
so the metrics exporter can ask `current_pipeline()` in any process.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..job_pipeline import JobPipeline

_pipeline: tuple[int, "JobPipeline"] | None = None  # (pid that made it, the pipeline)
_making = threading.Lock()  # a pipelined worker's job threads ask for it at once


def worker_pipeline() -> "JobPipeline":
    """This process's pipeline, made from the settings on first use."""
    global _pipeline
    with _making:
        if _pipeline is None or _pipeline[0] != os.getpid():
            _pipeline = (os.getpid(), _make())
        return _pipeline[1]


def current_pipeline() -> "JobPipeline | None":
    """This process's pipeline if one was made here (a forked child's parent's does not count), else None."""
    current = _pipeline
    return current[1] if current is not None and current[0] == os.getpid() else None


def reset_pipeline() -> None:
    """Forget this process's pipeline, so the next job builds one from the current environment."""
    global _pipeline
    _pipeline = None


def _make() -> "JobPipeline":
    import torch

    from ..job_pipeline import JobPipeline, RunOptions
    from ..settings import load_settings
    from ..storage.errors import InvalidFile
    from ..storage.model_store import models_root_from
    from .memory_limit import apply_memory_limit
    from .pipelined_worker import model_lane

    settings = load_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    try:
        root = models_root_from(None)
    except InvalidFile as e:  # the worker's configuration, not the job's fault
        raise RuntimeError(f"worker misconfigured: {e}") from None
    options = RunOptions(models_root=root, device=settings.device, dtype=settings.dtype,
                         write_retries=settings.storage_retries)
    pipeline = JobPipeline(options, lane=model_lane(settings))
    try:
        apply_memory_limit(pipeline.device, settings.memory_limit_mb)
    except ValueError as e:
        raise RuntimeError(f"worker misconfigured: {e}") from None
    return pipeline
