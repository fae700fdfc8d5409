"""maskfleet: two-sampler masked diffusion sampling as a worker fleet."""

__version__ = "0.1.0"
