"""The masked-region crop: run the mask sampler on the grown mask's box instead of the whole latent.

The mask sampler's noise mask is its grown mask: outside it, a call keeps its input (for a
deterministic step rule, bitwise), so evaluating the model there is wasted work. With a
crop margin the loop hands the mask sampler only the grown mask's bounding box plus
`margin` latent pixels of context on each side, then pastes the result back. The base
sampler still runs over the whole latent every step.

The box's sides are rounded up to a few fixed sizes (`crop_size`: 16..64 in steps of 8,
then four sizes per octave, 80, 96, 112, 128, 160, ...; all multiples of 8, so SD's UNet
can halve them three times) so that model input shapes repeat across jobs (kernels,
autotuning and allocator caches get reused) and the model never sees a sliver. Four per
octave wastes at most a quarter of a side on rounding; coarser steps (48 -> 64) would
turn many boxes into full frame on a 64x64 latent. A box that would cover the whole
latent is no crop at all (`None`): full frame.

The result is not the full-frame result: the model sees less context (attention and
group norm span the whole input), and the mask sampler's random draws (ancestral step
noise, ddim's inpaint noise, the Brownian tree) take the cropped shape, so they are other
numbers. Ancestral mask samplers (and lcm) also add their step noise only inside the box,
where full frame adds it over the whole latent between base steps (the SDE samplers'
recovery pass already discards it outside their region). Hence opt-in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


MIN_CROP_SIZE = 16


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


def crop_size(needed: int) -> int:
    """The smallest fixed size >= `needed`: 16..64 by 8, then by an eighth of the octave's top.

    Above 64 the step is 16 up to 128, 32 up to 256, 64 up to 512 and so on: four sizes
    per octave, each a multiple of 8.
    """
    if needed <= 64:
        return max(MIN_CROP_SIZE, -(-needed // 8) * 8)
    step = 1 << ((needed - 1).bit_length() - 3)
    return -(-needed // step) * step


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
    present = (grown_mask != 0).reshape(-1, *grown_mask.shape[-2:]).any(0)
    if not present.any():
        return None
    h, w = present.shape
    top, height = _axis(present.any(1), margin)
    left, width = _axis(present.any(0), margin)
    if height == h and width == w:
        return None
    return CropBox(top, left, height, width)
