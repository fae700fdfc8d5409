"""The denoiser interface and classifier-free guidance over it.

A denoiser maps a noisy latent (variance-exploding form, x = x0 + sigma * eps) and a
batch of conditioning to its estimate of x0. A diffusers UNet is one implementation
(`unet_denoiser.py`); tests plug in analytic ones. Guidance is applied on the denoised
values, `uncond + cfg * (cond - uncond)` (the same as eps-space CFG), with cond and
uncond run as one batched forward pass; cfg 1.0 skips the uncond pass.
"""
from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch

from .noise_schedule import NoiseSchedule


@runtime_checkable
class Denoiser(Protocol):
    """Anything that can estimate x0 from a noisy latent and its conditioning."""

    schedule: NoiseSchedule  # the discrete training sigmas (schedulers and timesteps come from it)
    latent_scale: float  # raw latent * latent_scale = the space the model samples in

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x: [N, C, H, W]; sigma: 0-d; context: [N, T, D]. Returns x0 estimates [N, C, H, W]."""
        ...


def _batch(context: torch.Tensor, n: int) -> torch.Tensor:
    if context.shape[0] == n:
        return context
    if context.shape[0] == 1:
        return context.expand(n, *context.shape[1:])
    # ComfyUI repeats conditioning to the latent batch size.
    reps = math.ceil(n / context.shape[0])
    return context.repeat(reps, *([1] * (context.ndim - 1)))[:n]


def guided_denoise(
    denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, cfg: float
) -> torch.Tensor:
    """Classifier-free guided x0 estimate (Ho & Salimans 2022)."""
    n = x.shape[0]
    pos = _batch(positive, n)
    if math.isclose(cfg, 1.0):
        return denoiser.denoise(x, sigma, pos)
    neg = _batch(negative, n)
    if pos.shape[1:] == neg.shape[1:]:
        both = denoiser.denoise(torch.cat([x, x]), sigma, torch.cat([pos, neg]))
        cond, uncond = both[:n], both[n:]
    else:
        cond, uncond = denoiser.denoise(x, sigma, pos), denoiser.denoise(x, sigma, neg)
    return uncond + (cond - uncond) * cfg
