"""A denoiser with a known answer, for tests that need no trained model.

For data drawn per pixel from N(mu, s^2), the ideal x0 estimate at noise level sigma is
the posterior mean (x * s^2 + mu * sigma^2) / (s^2 + sigma^2). The conditioning picks mu:
mu = context[:, 0, 0], so a positive and a negative prompt pull towards different values.
"""
from __future__ import annotations

import torch

from maskfleet.sampling import NoiseSchedule


class GaussianDenoiser:
    """Exact posterior-mean denoiser for N(mu, s^2) data; counts its calls and batch sizes."""

    def __init__(self, s: float = 0.5, latent_scale: float = 1.0):
        self.schedule = NoiseSchedule.from_config({})
        self.latent_scale = latent_scale
        self.s2 = s * s
        self.calls: list[int] = []  # batch size of every call

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        mu = context[:, 0, 0].reshape(-1, 1, 1, 1).to(x)
        return (x * self.s2 + mu * sigma**2) / (self.s2 + sigma**2)


def conditioning(mu: float, batch: int = 1, tokens: int = 4, width: int = 8) -> torch.Tensor:
    """A conditioning tensor that makes GaussianDenoiser aim at `mu`."""
    return torch.full((batch, tokens, width), float(mu))
