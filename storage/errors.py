"""The one error type storage raises for bad user input.

Jobs name their inputs by field (``latent``, ``mask``, ``output``...). Every problem with
a file, URI or model name is reported as ``InvalidFile(field, reason)`` so the job layer
can turn it into a failed job whose message tells the producer which field to fix,
without catching a zoo of OSError, SafetensorError and Pillow exceptions.
"""


class InvalidFile(ValueError):
    """A job field names a file (or model) we cannot use; ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        # Both in args: Celery stores an exception as its type and args (JSON) and rebuilds it
        # from them, so a producer gets StorageUnavailable back, not a bare ValueError.
        super().__init__(field, reason)
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class StorageUnavailable(InvalidFile):
    """The store failed or could not be reached, even after botocore's retries.

    Not the job's fault: the same job may succeed later. It subclasses InvalidFile so a
    caller that only reports InvalidFile still prints one clean line naming the field;
    the job layer can catch this first to retry instead of failing the job.
    """
