"""Conditioning files: prompt embeddings computed by the producer, as safetensors.

Workers do not run text encoders; producers send the embeddings (``prompt_embeds`` as
diffusers' pipelines name them). This module reads and checks them.
"""

from pathlib import Path

import torch

from .errors import InvalidFile
from .file_uris import DEFAULT_MAX_INPUT_BYTES, read_bytes
from .safetensors_files import (
    load_safetensors, pick_tensor, reject_pickle_suffix, require_finite, to_float32)


def read_conditioning(path: Path, field: str, *,
                      max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> torch.Tensor:
    """Read prompt embeddings as float32 [B, T, D].

    The safetensors file holds ``prompt_embeds`` (other tensors such as
    ``pooled_prompt_embeds`` are ignored) or exactly one tensor. A 2-D [T, D] tensor
    gets a batch dimension of 1. The tensor must be floating, non-empty and finite.
    """
    reject_pickle_suffix(path, field)
    tensors = load_safetensors(read_bytes(path, field, max_bytes), field)
    embeds = pick_tensor(tensors, field, "prompt_embeds")
    if embeds.ndim == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.ndim != 3:
        raise InvalidFile(
            field, f"has shape {list(embeds.shape)}; expected [B, T, D] or [T, D]")
    return require_finite(to_float32(embeds, field), field)
