"""SDXL-style conditioning as one tensor per prompt: token embeddings, then the pooled embedding and size ids.

An SDXL UNet takes, besides the token embeddings [B, T, D], a pooled embedding [B, P] and
six size ids per row (height, width, crop_h, crop_w, target_height, target_width, in
pixels), which it embeds and adds to the timestep embedding (ComfyUI's `y`; diffusers'
`added_cond_kwargs` text_embeds and time_ids). Packed as `ceil((P + 6) / D)` extra rows
after the tokens, they travel wherever a conditioning does, row for row: CFG's
cond/uncond batch, coherent mode's paired evaluations and cross-job batches concatenate
and split them like any other conditioning, and each row keeps its own pooled vector.
`UNetDenoiser` unpacks them for a model whose config says `addition_embed_type: text_time`.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

SIZE_ID_NAMES = ("height", "width", "crop_h", "crop_w", "target_height", "target_width")
SIZE_IDS = len(SIZE_ID_NAMES)


def default_size_ids(latent_height: int, latent_width: int) -> tuple[int, ...]:
    """ComfyUI's ids for a plain CLIPTextEncode: the latent's size x 8, no crop, target = size."""
    return size_ids(latent_height, latent_width)


def size_ids(latent_height: int, latent_width: int, given: Mapping[str, float] | None = None) -> tuple[float, ...]:
    """The six ids, in SIZE_ID_NAMES order: those `given` (CLIPTextEncodeSDXL's inputs by name), the
    others by the plain rule (height and width the latent's x 8, crops 0, targets = height and width)."""
    given = given or {}
    height, width = given.get("height", latent_height * 8), given.get("width", latent_width * 8)
    return (height, width, given.get("crop_h", 0), given.get("crop_w", 0),
            given.get("target_height", height), given.get("target_width", width))


def extra_rows(pooled_width: int, width: int) -> int:
    """How many rows of `width` the pooled embedding and the size ids take."""
    return math.ceil((pooled_width + SIZE_IDS) / width)


def pack(context: torch.Tensor, pooled: torch.Tensor, size_ids: tuple[int, ...]) -> torch.Tensor:
    """[B, T, D] tokens + [B, P] pooled + six ids -> [B, T + extra_rows(P, D), D] (float32)."""
    b, _, d = context.shape
    ids = torch.tensor(size_ids, dtype=torch.float32, device=context.device).expand(b, SIZE_IDS)
    tail = torch.cat([pooled.float().to(context.device), ids], dim=1)
    rows = extra_rows(pooled.shape[1], d)
    tail = torch.nn.functional.pad(tail, (0, rows * d - tail.shape[1])).reshape(b, rows, d)
    return torch.cat([context.float(), tail], dim=1)


def unpack(packed: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [B, T, D], pooled [B, P], size ids [B, 6]) from `pack`'s tensor."""
    b, _, d = packed.shape
    rows = extra_rows(pooled_width, d)
    tail = packed[:, -rows:].reshape(b, rows * d)
    return packed[:, :-rows], tail[:, :pooled_width], tail[:, pooled_width:pooled_width + SIZE_IDS]
