"""A denoiser with a known answer, for tests that need no trained model.

For data drawn per pixel from N(mu, s^2), the ideal x0 estimate at noise level sigma is
the posterior mean (x * s^2 + mu * sigma^2) / (s^2 + sigma^2). The conditioning picks mu:
mu = context[:, 0, 0], so a positive and a negative prompt pull towards different values.

`GaussianDenoiser` gives that x0 directly (the engine's Denoiser interface). `GaussianUNet`
is the same answer as a diffusers UNet gives it, an epsilon or a v prediction from the
scaled input x / sqrt(sigma^2 + 1) and an integer training timestep, to be wrapped in the
engine's own `UNetDenoiser`, so the conversions a real model goes through are in the loop.
"""
from __future__ import annotations

from types import SimpleNamespace

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


class GaussianUNet(torch.nn.Module):
    """The posterior mean as an epsilon or v prediction, called like a diffusers UNet.

    It sees only the integer timestep UNetDenoiser gives it, and takes that timestep's
    training sigma, as a trained model would: exact where the schedule's sigmas are
    training sigmas (the `simple` and `ddim_uniform` schedulers), off by the timestep's
    rounding elsewhere.
    """

    def __init__(self, s: float = 0.5, prediction_type: str = "epsilon"):
        super().__init__()
        self.schedule = NoiseSchedule.from_config({"prediction_type": prediction_type})
        self.config = SimpleNamespace(addition_embed_type=None)
        self.s2 = s * s
        self.prediction_type = prediction_type

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, x_in: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> SimpleNamespace:
        sigma = self.schedule.sigmas[t.long()].view(-1, 1, 1, 1)
        scale = (sigma**2 + 1).sqrt()
        x = x_in * scale
        mu = encoder_hidden_states[:, 0, 0].view(-1, 1, 1, 1)
        x0 = (x * self.s2 + mu * sigma**2) / (self.s2 + sigma**2)
        if self.prediction_type == "v_prediction":  # x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
            return SimpleNamespace(sample=(x / scale**2 - x0) * scale / sigma)
        return SimpleNamespace(sample=(x - x0) / sigma)  # x0 = x - eps * sigma
