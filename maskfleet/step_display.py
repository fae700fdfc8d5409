"""How `submit --wait` and `demo` show a job's progress while they poll it: a bar on a terminal,
one line per new step otherwise (a log, a pipe, CI), so a person sees it move and a log stays short.

Both show the numbers `status` carries (step of total, which sampler's half just ran) and
end on total/total when the job succeeded, also when the last poll saw an earlier step.
"""
from __future__ import annotations

from typing import TextIO


def progress_line(step, total, sampler) -> str:
    return f"[maskfleet] step {step}/{total} ({sampler} sampler)"


class StepDisplay:
    """`show` each PROGRESS meta seen, `succeeded` when the job ends well, `close` always."""

    def __init__(self, stream: TextIO, quiet: bool = False, bar: bool | None = None):
        self.stream = stream
        self.quiet = quiet
        self.bar_wanted = stream.isatty() if bar is None else bar
        self._bar = None
        self._seen: tuple | None = None

    def show(self, step, total, sampler) -> None:
        if self.quiet or (step, total, sampler) == self._seen:
            return
        self._seen = (step, total, sampler)
        if not self.bar_wanted:
            print(progress_line(step, total, sampler), file=self.stream, flush=True)
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="step", desc="[maskfleet]", file=self.stream, dynamic_ncols=True)
        self._bar.n = step
        self._bar.set_postfix_str(f"{sampler} sampler", refresh=False)
        self._bar.refresh()

    def succeeded(self) -> None:
        """The end, total/total, unless it was shown already (or nothing was: a job done before the first poll)."""
        if self._seen is not None:
            self.show(self._seen[1], self._seen[1], "mask")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
