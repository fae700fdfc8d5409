"""The error a job ends with when its input is bad: FAILURE, never retried.

Celery stores a failed task's exception as JSON (type, module and message), so the
producer sees `InvalidJob("base_sampler.model: ...")` from AsyncResult; the message
names the field and the reason, and is the exception's only argument so it survives
the round trip.
"""


class InvalidJob(ValueError):
    """A job that can never succeed as written (bad field, missing input or model)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
