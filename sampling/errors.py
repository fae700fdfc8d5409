"""Errors the sampling engine raises, so callers can tell bad input from a stopped job."""


class SamplingError(Exception):
    """Base class of every error raised by the sampling engine."""


class InvalidInput(SamplingError, ValueError):
    """An input (tensor, name or number) cannot be sampled; the message names the field."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class SamplingStopped(SamplingError):
    """The stop hook asked the loop to stop between two sampler calls."""
