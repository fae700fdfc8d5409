"""A job ready for the model: its tensors on the device, its samplers built; sampled alone or in a batch.

JobPipeline.prepare makes one (inputs read and checked, models loaded); sampling it is
the only part that needs the model, so a pipelined worker's model lane (model_lane.py)
runs `sample_batch` on one or several of them while other threads prepare and write.
Jobs batch when `batch_key` is equal and not None.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import torch

from .job import Job
from .sampling import ProgressHook, SamplingJob, StopHook, sample_job
from .sampling.job_batch import batch_key as engine_batch_key
from .sampling.job_batch import sample_job_batch


@dataclass
class PreparedJob:
    """A job whose inputs are read and checked and whose models are loaded: what sampling needs."""

    job: Job
    sampling: SamplingJob  # tensors on the runner's device, samplers with their loaded models
    started: float  # perf_counter and wall clock when the job started here
    started_at: float
    sampling_at: float = 0.0  # wall clock: first model call, end of sampling
    sampled_at: float = 0.0
    vae: Any = None  # the base model's VAECodec, when the job encodes a picture or writes one
    pixels: torch.Tensor | None = None  # the input picture as encoded ([1, H, W, 3], cropped), for paste-back

    def sample(self, on_progress: ProgressHook | None = None, should_stop: StopHook | None = None) -> torch.Tensor:
        """Sample this job alone; records when its model calls began and ended."""
        self.sampling_at = time.time()
        out = sample_job(self.sampling, on_progress=on_progress, should_stop=should_stop)
        self.sampled_at = time.time()
        return out


def batch_key(prepared: PreparedJob) -> Hashable | None:
    """What jobs must share to run as one batch (sampling/job_batch.py's BatchKey); None: this job runs alone."""
    return engine_batch_key(prepared.sampling)


def sample_batch(works: Sequence[PreparedJob], on_progress: ProgressHook, should_stop: StopHook,
                 forward: str = "fused") -> list[torch.Tensor]:
    """Sample prepared jobs of one batch key, one output per job; one job alone takes the plain path."""
    if len(works) == 1:
        return [works[0].sample(on_progress, should_stop)]
    started = time.time()
    outs = sample_job_batch([w.sampling for w in works], forward=forward,  # type: ignore[arg-type]
                            on_progress=on_progress, should_stop=should_stop)
    ended = time.time()
    for work in works:
        work.sampling_at, work.sampled_at = started, ended
    return outs
