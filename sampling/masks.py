"""The two regions of the loop: the base sampler's `inv_mask` and the mask sampler's grown mask.

`inv_mask` (1 where mask != 1) stays at the mask's own resolution; like any noise mask
it is resized bilinearly to the latent when a call uses it (`to_latent`). The grown mask
is the mask resized to the latent, rounded, dilated by an overlap_factor x overlap_factor
box and rounded again: the band it adds around the mask is denoised by both samplers,
which hides the seam. (The original names this "erosion" and resizes with height and
width swapped; we resize in the right orientation.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InvalidInput


def normalize_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A [B, h, w] float32 mask clamped to [0, 1]; accepts [h, w], [1, h, w], [B, h, w] or [B, 1, h, w]."""
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise InvalidInput("mask", f"expected shape [H, W] or [B, H, W], got {list(mask.shape)}")
    if mask.shape[0] not in (1, batch):
        raise InvalidInput("mask", f"mask batch {mask.shape[0]} does not match latent batch {batch} (use 1 or {batch})")
    if not torch.isfinite(mask).all():
        raise InvalidInput("mask", "contains NaN or infinite values")
    return mask.float().clamp(0.0, 1.0)


def inverse_mask(mask: torch.Tensor) -> torch.Tensor:
    """The base sampler's region: 1 wherever the mask is not exactly 1 (soft edges included)."""
    return (mask != 1.0).float()


def to_latent(mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """Resize a [B, h, w] mask bilinearly to the latent and repeat it over batch and channels."""
    b, c, h, w = latent_shape
    resized = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=(h, w), mode="bilinear")
    resized = resized.expand(-1, c, -1, -1)
    if resized.shape[0] != b:
        resized = resized.expand(b, -1, -1, -1)
    return resized.contiguous()


def grow_mask(mask: torch.Tensor, latent_height: int, latent_width: int, overlap_factor: int) -> torch.Tensor:
    """The mask sampler's region [B, 1, H, W] in {0, 1}: resized, rounded, box-dilated, rounded.

    The dilation pads by ceil((k - 1) / 2) on every side and crops to H x W, so an even k
    grows the mask by k/2 - 1 pixels up and left and k/2 down and right, as the original
    does. A box dilation of a 0/1 mask is a max-pool, done as two 1-D passes so that large
    overlap factors cost no more than small ones.
    """
    resized = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=(latent_height, latent_width), mode="bilinear")
    grown = resized.round()
    k = overlap_factor
    if k > 1:
        # Past this size the window covers the whole latent: same result, bounded cost.
        k = min(k, 2 * max(latent_height, latent_width) + 2 + k % 2)
        pad = math.ceil((k - 1) / 2)
        grown = F.max_pool2d(F.pad(grown, (pad, pad, pad, pad)), kernel_size=(k, 1), stride=1)
        grown = F.max_pool2d(grown, kernel_size=(1, k), stride=1)
        grown = grown[:, :, :latent_height, :latent_width]
    return grown.round()
