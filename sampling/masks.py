"""The two regions of the loop: the base sampler's `inv_mask` and the mask sampler's grown mask.

`inv_mask` (1 where mask != 1) stays at the mask's own resolution; like any noise mask
it is resized bilinearly to the latent when a call uses it (`to_latent`). The grown mask
is the mask resized to the latent, rounded, dilated by an overlap_factor x overlap_factor
box and rounded again: the band it adds around the mask is denoised by both samplers,
which hides the seam. (The original names this "erosion" and resizes with height and
width swapped; we resize in the right orientation.) Regional mode (`regional_loop.py`)
takes its base region where the mask is exactly 0 (`outside_mask`) and grows the mask at
the mask's own resolution.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InvalidInput


def normalize_mask(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """A [B, h, w] float32 mask; accepts [h, w], [1, h, w], [B, h, w] or [B, 1, h, w] with values in [0, 1].

    Values outside [0, 1] are refused rather than clamped: a mask of 1.5 or -0.2 says its
    producer meant something else (a 0..255 image, a signed weight), and clamping would
    silently turn it into a different job.
    """
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim == 2:
        mask = mask[None]
    if mask.ndim != 3:
        raise InvalidInput("mask", f"expected shape [H, W] or [B, H, W], got {list(mask.shape)}")
    _check_batch(mask, batch, "mask")
    if not torch.isfinite(mask).all():
        raise InvalidInput("mask", "contains NaN or infinite values")
    check_mask_values(mask)
    return mask.float()


def _check_batch(mask: torch.Tensor, batch: int, field: str) -> None:
    if mask.shape[0] not in (1, batch):
        use = "1" if batch == 1 else f"1 or {batch}"
        raise InvalidInput(field, f"mask batch {mask.shape[0]} does not match latent batch {batch} (use {use})")


def check_mask_values(mask: torch.Tensor, field: str = "mask") -> None:
    """Refuse a mask with values outside [0, 1] (NaN is refused by the finiteness checks)."""
    low, high = float(mask.min()), float(mask.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInput(field, f"values must lie in [0, 1], found {low:g}..{high:g}")


def check_mask_fits(mask: torch.Tensor, latent_shape: torch.Size | tuple[int, ...], field: str = "mask") -> None:
    """Refuse a [B, h, w] mask whose batch or aspect ratio does not fit a [B, C, H, W] latent.

    A mask may have any resolution (it is resized to the latent), but not another shape:
    resized from another aspect ratio it would be stretched over the wrong pixels. The
    ratio must agree up to one latent pixel either way, the rounding a VAE's /8 leaves
    (a 516x512 image over a 64x64 latent is fine; a 512x1024 mask over it is not).
    """
    b, _, h, w = latent_shape
    _check_batch(mask, b, field)
    mh, mw = mask.shape[-2], mask.shape[-1]
    if abs(mh * w / mw - h) > 1.0 or abs(mw * h / mh - w) > 1.0:
        raise InvalidInput(
            field, f"is {mh}x{mw} (height x width), another aspect ratio than the {h}x{w} latent; "
            "a mask may have any resolution but must have the latent's shape")


def check_overlap(overlap_factor: int, height: int, width: int, counted_in: str = "latent") -> None:
    """Refuse an overlap_factor larger than what it grows (the latent, or in regional mode the
    mask): its box would exceed it on every side.

    Past max(H, W) the grown mask covers most of the latent whatever the mask is, so the
    value is a mistake (latent pixels are 1/8 of image pixels), not a request.
    """
    longest = max(height, width)
    if overlap_factor > longest:
        raise InvalidInput(
            "overlap_factor", f"{overlap_factor} is larger than the {height}x{width} {counted_in} "
            f"(it is counted in {counted_in} pixels); use at most {longest}")


def inverse_mask(mask: torch.Tensor) -> torch.Tensor:
    """The base sampler's region: 1 wherever the mask is not exactly 1 (soft edges included)."""
    return (mask != 1.0).float()


def outside_mask(mask: torch.Tensor) -> torch.Tensor:
    """Regional mode's base region: 1 only where the mask is exactly 0 (any positive value is inside)."""
    return (mask == 0.0).float()


def to_latent(mask: torch.Tensor, latent_shape: torch.Size) -> torch.Tensor:
    """Resize a [B, h, w] mask bilinearly to the latent and repeat it over batch and channels."""
    b, c, h, w = latent_shape
    resized = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=(h, w), mode="bilinear")
    resized = resized.expand(-1, c, -1, -1)
    if resized.shape[0] != b:
        resized = resized.expand(b, -1, -1, -1)
    return resized.contiguous()


def grow_mask(mask: torch.Tensor, height: int, width: int, overlap_factor: int) -> torch.Tensor:
    """The mask sampler's region [B, 1, height, width] in {0, 1}: resized, rounded, box-dilated, rounded.

    Modes comfy and coherent grow it at the latent's size, regional mode at the mask's own
    (where the resize changes nothing). The dilation pads by ceil((k - 1) / 2) on every
    side and crops to height x width, so an even k grows the mask by k/2 - 1 pixels up and
    left and k/2 down and right, as the original does.
    """
    resized = F.interpolate(mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=(height, width), mode="bilinear")
    grown = resized.round()
    k = overlap_factor
    if k > 1:
        # Past this size the window covers the whole mask: same result, bounded cost.
        k = min(k, 2 * max(height, width) + 2 + k % 2)
        pad = math.ceil((k - 1) / 2)
        grown = _any_in_window(_any_in_window(F.pad(grown, (pad, pad, pad, pad)), k, -2), k, -1)
        grown = grown[:, :, :height, :width]
    return grown.round()


def _any_in_window(binary: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """1 where any of the k values from here on along `dim` is 1 (a 1-D box dilation of a 0/1
    tensor, as a max-pool of size k without padding): window sums of a running count, so its
    cost does not grow with k (a 64 Mpx mask in regional mode may ask for thousands)."""
    counts = torch.cumsum(binary.to(torch.int32), dim=dim)
    counts = torch.cat([torch.zeros_like(counts.narrow(dim, 0, 1)), counts], dim=dim)
    length = counts.shape[dim] - k
    window = counts.narrow(dim, k, length) - counts.narrow(dim, 0, length)
    return (window > 0).to(binary.dtype)
