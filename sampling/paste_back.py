"""Paste the input picture back outside the mask: a VAE round trip changes every pixel it touches.

Outside the grown mask the job kept the input latent, but decoding it does not give the
input picture back (the VAE is lossy; ComfyUI users composite the original over the
result for this reason). The output picture takes the input's pixels there, bit for bit,
the decoded pixels on the mask, and a blend across the overlap band with coherent mode's
weight (1 on the mask falling linearly to the band's edge), resized to the picture.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .coherent_loop import blend_weight
from .masks import grow_mask, normalize_mask


def paste_back(decoded: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, overlap_factor: int) -> torch.Tensor:
    """uint8 [B, H, W, 3]: `original` ([B or 1, H, W, 3] in [0, 1], read from 8-bit pixels) where the
    grown mask is 0, `decoded` ([B, H, W, 3] in [0, 1]) on the mask, blended across the band."""
    b, height, width, _ = decoded.shape
    h, w = height // 8, width // 8
    mask = normalize_mask(mask.float().cpu(), b)
    weight = blend_weight(mask, torch.Size((b, 1, h, w)), overlap_factor)
    region = grow_mask(mask, h, w, overlap_factor).expand(b, 1, h, w)
    weight = F.interpolate(weight, size=(height, width), mode="bilinear") * F.interpolate(region, size=(height, width))
    weight = weight.permute(0, 2, 3, 1)  # [B, H, W, 1]
    original = original.expand(b, -1, -1, -1)
    kept = (original * 255.0).round().to(torch.uint8)  # the input's own 8-bit values, exactly
    blended = ((original + weight * (decoded - original)) * 255.0).clamp(0, 255).to(torch.uint8)  # SaveImage's truncation
    return torch.where(weight == 0, kept, blended)
