"""A quick look at a latent without a VAE: a fixed linear projection of its channels to RGB.

The factors are the usual approximations of what SD1.5's and SDXL's VAEs decode each
latent channel to; good enough to see composition and the mask seam, eight times smaller
than the image. Latents with another channel count get their first three channels.
"""
from __future__ import annotations

import io

import torch
from PIL import Image

# rows: latent channels; columns: R, G, B
SD15_FACTORS = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
]
SDXL_FACTORS = [
    [0.3651, 0.4232, 0.4341],
    [-0.2533, -0.0042, 0.1068],
    [0.1076, 0.1111, -0.0362],
    [-0.3165, -0.2492, -0.2188],
]
SDXL_BIAS = [0.1084, -0.0175, -0.0011]


def latent_to_rgb(latent: torch.Tensor, family: str = "sd15") -> torch.Tensor:
    """[B, C, H, W] raw latent -> [B, H, W, 3] uint8 image."""
    latent = latent.detach().float().cpu()
    if latent.shape[1] == 4:
        factors = torch.tensor(SDXL_FACTORS if family == "sdxl" else SD15_FACTORS)
        bias = torch.tensor(SDXL_BIAS if family == "sdxl" else [0.0, 0.0, 0.0])
        rgb = torch.einsum("bchw,cr->bhwr", latent, factors) + bias
    else:
        channels = latent[:, :3].permute(0, 2, 3, 1)
        rgb = channels / channels.abs().amax().clamp(min=1e-6)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def encode_preview_png(latent: torch.Tensor, family: str = "sd15") -> bytes:
    """PNG bytes of the preview; a batch is laid out left to right."""
    rgb = latent_to_rgb(latent, family)
    strip = torch.cat(list(rgb), dim=1) if rgb.shape[0] > 1 else rgb[0]
    buffer = io.BytesIO()
    Image.fromarray(strip.numpy(), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
