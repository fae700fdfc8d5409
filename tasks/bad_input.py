"""Bad input found while the job runs (a file, a tensor, a model that does not fit) fails it as InvalidJob naming the field."""
from __future__ import annotations

from ..sampling.errors import InvalidInput
from ..storage.errors import InvalidFile
from .errors import InvalidJob
from .lifecycle import Concern, TaskRun


class BadInput(Concern):
    def failed(self, run: TaskRun, error: Exception) -> Exception | None:
        if isinstance(error, (InvalidInput, InvalidFile)):
            return InvalidJob(str(error))
        return None
