"""The callbacks a sampling loop calls: progress after each sampler call, a stop check before each."""
from __future__ import annotations

from typing import Callable

ProgressHook = Callable[[int, int, str], None]  # (calls done, total calls, "base" | "mask")
StopHook = Callable[[], bool]
CALLS_PER_STEP = 2  # each step: the base sampler's call, then the mask sampler's


def job_step(calls_done: int, total_calls: int) -> tuple[int, int]:
    """(step, steps) of the job a progress hook's call count stands for: both calls of a step are that
    step (the base sampler's starts it, the mask sampler's ends it), so the last call says steps/steps."""
    return (calls_done + 1) // CALLS_PER_STEP, total_calls // CALLS_PER_STEP
