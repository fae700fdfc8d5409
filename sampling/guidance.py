"""The denoiser interface and classifier-free guidance over it.

A denoiser maps a noisy latent (variance-exploding form, x = x0 + sigma * eps) and a
batch of conditioning to its estimate of x0. A diffusers UNet is one implementation
(`unet_denoiser.py`); tests plug in analytic ones. Guidance is applied on the denoised
values, `uncond + cfg * (cond - uncond)` (the same as eps-space CFG), with cond and
uncond run as one batched forward pass; cfg 1.0 skips the uncond pass.
"""
from __future__ import annotations

import math
from typing import Protocol, Sequence, runtime_checkable

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
    return guided_denoise_many(denoiser, x, sigma, [(positive, negative, cfg)])[0]


def guided_denoise_many(
    denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, guides: Sequence[tuple[torch.Tensor, torch.Tensor, float]]
) -> list[torch.Tensor]:
    """One guided x0 estimate per (positive, negative, cfg) of the same x and sigma, in one forward.

    The rows are laid out guide after guide, cond before uncond (cfg 1.0: cond only), each
    block the latent batch: one guide gives `guided_denoise`'s usual `cat([x, x])` with
    `cat([pos, neg])`. Coherent mode asks for both samplers' first evaluation of a step at
    once when they share a model, so the model runs one batch of four blocks instead of
    two of two. Conditionings of different token counts cannot share a batch: then each
    block is a forward of its own.
    """
    n = x.shape[0]
    contexts = []
    for positive, negative, cfg in guides:
        contexts.append(_batch(positive, n))
        if not math.isclose(cfg, 1.0):
            contexts.append(_batch(negative, n))
    if len(contexts) == 1:
        blocks = [denoiser.denoise(x, sigma, contexts[0])]
    elif len({c.shape[1:] for c in contexts}) == 1:
        blocks = list(denoiser.denoise(torch.cat([x] * len(contexts)), sigma, torch.cat(contexts)).split(n))
    else:
        blocks = [denoiser.denoise(x, sigma, c) for c in contexts]
    results, i = [], 0
    for _, _, cfg in guides:
        if math.isclose(cfg, 1.0):
            results.append(blocks[i])
            i += 1
        else:
            cond, uncond = blocks[i], blocks[i + 1]
            results.append(uncond + (cond - uncond) * cfg)
            i += 2
    return results
