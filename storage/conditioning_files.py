"""Conditioning files: prompt embeddings computed by the producer, as safetensors.

Producers send the embeddings (``prompt_embeds`` and, for SDXL-style models,
``pooled_prompt_embeds``, as diffusers' pipelines name them; optionally SDXL's size
conditioning ``add_time_ids``: height, width, crop top, crop left, target height, target
width, as diffusers computes it and ComfyUI's CLIPTextEncodeSDXL takes it). This module
reads and checks them; the decoding is pure, on bytes.
"""

from typing import NamedTuple

import torch

from .errors import InvalidFile
from .file_uris import DEFAULT_MAX_INPUT_BYTES
from .objects import Uri, object_name, read_object
from .safetensors_files import (
    load_safetensors, pick_tensor, reject_pickle_suffix, require_finite, to_float32)

POOLED = "pooled_prompt_embeds"
SIZE_IDS_KEY = "add_time_ids"


class ConditioningFile(NamedTuple):
    embeds: torch.Tensor  # float32 [B, T, D]
    pooled: torch.Tensor | None  # float32 [B, P]
    size_ids: tuple[float, ...] | None  # six values, SDXL's size conditioning


def read_conditioning_file(uri: Uri, field: str, *, max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> ConditioningFile:
    """Read every part of the conditioning file at ``uri``, see ``decode_conditioning_file``."""
    name = object_name(uri, field)
    reject_pickle_suffix(name, field)  # before a byte is fetched
    return decode_conditioning_file(read_object(uri, field, max_bytes), field, name)


def read_conditioning(uri: Uri, field: str, *,
                      max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> torch.Tensor:
    """Read the prompt embeddings at ``uri``, see ``decode_conditioning``."""
    return read_conditioning_with_pooled(uri, field, max_bytes=max_bytes)[0]


def read_conditioning_with_pooled(
        uri: Uri, field: str, *, max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Read prompt embeddings and pooled embeddings (None when absent) at ``uri``."""
    return read_conditioning_file(uri, field, max_bytes=max_bytes)[:2]


def decode_conditioning(data: bytes, field: str, name: str) -> torch.Tensor:
    """Decode prompt embeddings as float32 [B, T, D], see ``decode_conditioning_with_pooled``."""
    return decode_conditioning_with_pooled(data, field, name)[0]


def decode_conditioning_with_pooled(
        data: bytes, field: str, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Decode (prompt embeddings, pooled or None), see ``decode_conditioning_file``."""
    return decode_conditioning_file(data, field, name)[:2]


def decode_conditioning_file(data: bytes, field: str, name: str) -> ConditioningFile:
    """Decode (prompt embeddings float32 [B, T, D], pooled float32 [B, D] or None, size ids or None).

    The safetensors file holds ``prompt_embeds`` (other tensors are ignored, except
    ``pooled_prompt_embeds``) or exactly one tensor. A 2-D [T, D] tensor gets a batch
    dimension of 1. ``pooled_prompt_embeds``, when present, is [B, D] with the same B
    (or [D], made [1, D]). ``add_time_ids``, when present, is six values ([6] or [1, 6]).
    Tensors must be floating, non-empty and finite.
    """
    reject_pickle_suffix(name, field)
    tensors = load_safetensors(data, field)
    if set(tensors) == {POOLED}:
        raise InvalidFile(field, f"holds only {POOLED}; prompt_embeds is required")
    embeds = pick_tensor(tensors, field, "prompt_embeds")
    if embeds.ndim == 2:
        embeds = embeds.unsqueeze(0)
    if embeds.ndim != 3:
        raise InvalidFile(
            field, f"has shape {list(embeds.shape)}; expected [B, T, D] or [T, D]")
    embeds = require_finite(to_float32(embeds, field), field)
    size_ids = _size_ids(tensors.get(SIZE_IDS_KEY), field)
    pooled = tensors.get(POOLED)
    if pooled is None:
        return ConditioningFile(embeds, None, size_ids)
    if pooled.ndim == 1:
        pooled = pooled.unsqueeze(0)
    if pooled.ndim != 2 or pooled.shape[0] != embeds.shape[0]:
        raise InvalidFile(
            field, f"{POOLED} has shape {list(tensors[POOLED].shape)}; expected "
            f"[{embeds.shape[0]}, D] to match prompt_embeds' batch of {embeds.shape[0]}")
    try:
        pooled = require_finite(to_float32(pooled, field), field)
    except InvalidFile as e:
        raise InvalidFile(field, f"{POOLED} {e.reason}") from None
    return ConditioningFile(embeds, pooled, size_ids)


def _size_ids(tensor: torch.Tensor | None, field: str) -> tuple[float, ...] | None:
    if tensor is None:
        return None
    if tensor.numel() != 6 or tensor.ndim > 2:
        raise InvalidFile(field, f"{SIZE_IDS_KEY} has shape {list(tensor.shape)}; expected six values: height, width, "
                                 "crop top, crop left, target height, target width")
    try:
        values = require_finite(to_float32(tensor, field), field)
    except InvalidFile as e:
        raise InvalidFile(field, f"{SIZE_IDS_KEY} {e.reason}") from None
    return tuple(float(v) for v in values.flatten())
