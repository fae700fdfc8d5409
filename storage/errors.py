"""The one error type storage raises for bad user input.

Jobs name their inputs by field (``latent``, ``mask``, ``output``...). Every problem with
a file, URI or model name is reported as ``InvalidFile(field, reason)`` so the job layer
can turn it into a failed job whose message tells the producer which field to fix,
without catching a zoo of OSError, SafetensorError and Pillow exceptions.
"""


class InvalidFile(ValueError):
    """A job field names a file (or model) we cannot use; ``reason`` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
