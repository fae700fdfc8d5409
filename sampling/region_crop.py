"""The masked-region crop: run the mask sampler on the grown mask's box instead of the whole latent.

The mask sampler's noise mask is its grown mask: outside it, a call keeps its input (for a
deterministic step rule, bitwise), so evaluating the model there is wasted work. With a
crop margin the loop hands the mask sampler only the grown mask's bounding box plus
`margin` latent pixels of context on each side, then pastes the result back. The base
sampler still runs over the whole latent every step.

The box's sides are rounded up to a few fixed sizes (`CROP_SIZES`, all multiples of 8, so
every UNet down to SD's /8 can halve them) so that model input shapes repeat across jobs
(kernels and allocator caches get reused) and so that the model never sees a sliver. A
box that would cover the whole latent is no crop at all (`None`): full frame.

The result is not the full-frame result: the model sees less context (attention and
group norm span the whole input), and the mask sampler's random draws (ancestral step
noise, ddim's inpaint noise, the Brownian tree) take the cropped shape, so they are other
numbers. Ancestral and SDE mask samplers also add their step noise only inside the box,
where full frame adds it over the whole latent between base steps. Hence opt-in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidInput

# Past the last size, sides round up to a multiple of LARGE_STEP.
CROP_SIZES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
LARGE_STEP = 256
MAX_CROP_MARGIN = 10000


@dataclass(frozen=True)
class CropBox:
    """A window of the latent, in latent pixels: rows top .. top + height, columns left .. left + width."""

    top: int
    left: int
    height: int
    width: int

    def _view(self, t: torch.Tensor) -> torch.Tensor:
        return t[..., self.top : self.top + self.height, self.left : self.left + self.width]

    def crop(self, t: torch.Tensor) -> torch.Tensor:
        """The window of `t` ([..., H, W]) as a contiguous tensor, the layout the model runs fastest on."""
        return self._view(t).contiguous()

    def paste(self, full: torch.Tensor, cropped: torch.Tensor) -> torch.Tensor:
        """A copy of `full` with the window replaced by `cropped` (`full` itself is left as it is)."""
        out = full.clone()
        self._view(out).copy_(cropped)
        return out


def check_crop_margin(margin: int | None) -> None:
    """Refuse a margin that is not a whole number of latent pixels in 0..MAX_CROP_MARGIN (None: no crop)."""
    if margin is None:
        return
    if isinstance(margin, bool) or not isinstance(margin, int):
        raise InvalidInput("crop_margin", f"must be a whole number of latent pixels or None, got {margin!r}")
    if not 0 <= margin <= MAX_CROP_MARGIN:
        raise InvalidInput("crop_margin", f"must be in 0..{MAX_CROP_MARGIN} (latent pixels), got {margin}")


def crop_size(needed: int) -> int:
    """The smallest fixed size >= `needed`: one of CROP_SIZES, past them a multiple of LARGE_STEP."""
    for size in CROP_SIZES:
        if size >= needed:
            return size
    return -(-needed // LARGE_STEP) * LARGE_STEP


def _axis(present: torch.Tensor, margin: int) -> tuple[int, int]:
    """(start, size) on one axis: the span of `present` plus margin, rounded up, shifted inside."""
    length = present.numel()
    hits = present.nonzero().flatten()
    lo = max(int(hits[0]) - margin, 0)
    hi = min(int(hits[-1]) + 1 + margin, length)
    size = crop_size(hi - lo)
    if size >= length:
        return 0, length
    # Spread the rounding's extra context over both sides, then keep the window inside.
    start = lo - (size - (hi - lo)) // 2
    return min(max(start, 0), length - size), size


def crop_box(grown_mask: torch.Tensor, margin: int) -> CropBox | None:
    """The box the mask sampler needs for `grown_mask` ([..., H, W], nonzero = its region), or None.

    The box is the bounding box of the nonzero values over every leading dim (the whole
    batch shares one box, so the batch stays one tensor), widened by `margin` on each side,
    each side rounded up by `crop_size` and shifted to stay inside the latent; an axis
    whose rounded size reaches the latent's keeps the latent's. None (full frame) when the
    box covers the whole latent or the mask is empty: an empty region's model is never
    consulted, so there is nothing to save, and full frame keeps the job as it is uncropped.
    """
    check_crop_margin(margin)
    present = (grown_mask != 0).reshape(-1, *grown_mask.shape[-2:]).any(0)
    if not present.any():
        return None
    h, w = present.shape
    top, height = _axis(present.any(1), margin)
    left, width = _axis(present.any(0), margin)
    if height == h and width == w:
        return None
    return CropBox(top, left, height, width)
