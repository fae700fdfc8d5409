"""The errors a job ends with that are never retried: bad input, poison, out of memory.

Celery stores a failed task's exception as JSON (type, module and message), so the
producer sees `InvalidJob("base_sampler.model: ...")` from AsyncResult; the message
names the field and the reason. Each class's message is its only argument so it
survives the round trip.
"""


class InvalidJob(ValueError):
    """A job that can never succeed as written (bad field, missing input or model)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class PoisonJob(RuntimeError):
    """A job whose worker process died during each of its last deliveries: failed, not delivered again."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class JobOutOfMemory(RuntimeError):
    """The job needs more memory than the device has (or than MASKFLEET_MEMORY_LIMIT_MB allows).

    Not retried: the same parameters would run out again. The worker frees what the job
    held and takes the next one.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
