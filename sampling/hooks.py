"""The callbacks a sampling loop calls: progress after each sampler call, a stop check before each."""
from __future__ import annotations

from typing import Callable

ProgressHook = Callable[[int, int, str], None]  # (calls done, total calls, "base" | "mask")
StopHook = Callable[[], bool]
