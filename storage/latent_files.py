"""Latent files: ComfyUI ``.latent`` files and plain safetensors, in and out.

Producers hand us latents saved by ComfyUI's SaveLatent or by their own code, and read
our outputs back with ComfyUI's LoadLatent. This module is the compatibility contract
for those files, including ComfyUI's legacy-scale rule described in ``decode_latent``.
Files are named by URI (``s3://``, ``file://`` or a local path, see objects.py); the
decoding itself is pure, on bytes.
"""

from pathlib import PurePosixPath

import safetensors.torch
import torch

from .errors import InvalidFile
from .file_uris import DEFAULT_MAX_INPUT_BYTES
from .objects import Uri, object_name, read_object, write_object
from .safetensors_files import (
    load_safetensors, pick_tensor, reject_pickle_suffix, require_finite, to_float32)

COMFY_TENSOR = "latent_tensor"
COMFY_VERSION_MARKER = "latent_format_version_0"
# ComfyUI's LoadLatent divides latents from files without the version marker by this.
LEGACY_SCALE = 0.18215


def read_latent(uri: Uri, field: str = "latent", *,
                max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> torch.Tensor:
    """Read the latent at ``uri`` (at most ``max_bytes``), see ``decode_latent``."""
    name = object_name(uri, field)
    reject_pickle_suffix(name, field)  # before a byte is fetched
    return decode_latent(read_object(uri, field, max_bytes), field, name)


def decode_latent(data: bytes, field: str, name: str) -> torch.Tensor:
    """Decode a latent as float32 [B, C, H, W] from safetensors bytes.

    The file is recognised by content, never by suffix, and never unpickled (``name``s
    ending in ``.pt``, ``.ckpt``, ``.pth``, ``.bin`` or ``.pkl`` are refused). It holds
    either ComfyUI's ``.latent`` layout (tensor ``latent_tensor``) or exactly one tensor
    of any name. Like ComfyUI's LoadLatent, a ``latent_tensor`` file WITHOUT the
    ``latent_format_version_0`` key is an old-format file and is multiplied by
    1/0.18215; files with the marker, and single-tensor files under other names, are
    used as stored. The tensor must be 4-D, floating (float16, bfloat16, float32 or
    float64), non-empty and finite.
    """
    reject_pickle_suffix(name, field)
    tensors = load_safetensors(data, field)
    latent = pick_tensor(tensors, field, COMFY_TENSOR)
    if latent.ndim != 4:
        raise InvalidFile(
            field, f"has shape {list(latent.shape)}; expected 4-D [B, C, H, W]")
    latent = to_float32(latent, field)
    if COMFY_TENSOR in tensors and COMFY_VERSION_MARKER not in tensors:
        latent = latent * (1.0 / LEGACY_SCALE)
    return require_finite(latent, field)


def encode_latent(latent: torch.Tensor, suffix: str) -> bytes:
    """Serialise a latent as safetensors bytes for a file ending in ``suffix``.

    ``.latent`` gives ComfyUI's SaveLatent layout: ``latent_tensor`` plus the empty
    ``latent_format_version_0`` marker so LoadLatent does not rescale it.
    ``.safetensors`` gives one tensor named ``latent``. Always contiguous float32 on CPU.
    """
    tensor = latent.detach().to("cpu", torch.float32).contiguous()
    if suffix.lower() == ".latent":
        tensors = {COMFY_TENSOR: tensor, COMFY_VERSION_MARKER: torch.tensor([])}
    elif suffix.lower() == ".safetensors":
        tensors = {"latent": tensor}
    else:
        raise InvalidFile(
            "output", f"unsupported output file type {suffix!r}; suffix must be .latent "
            "or .safetensors")
    return safetensors.torch.save(tensors)


def write_latent(uri: Uri, latent: torch.Tensor, field: str = "output") -> str:
    """Write ``latent`` whole to ``uri`` in the format its suffix names; return the sha256."""
    suffix = PurePosixPath(object_name(uri, field)).suffix
    try:
        data = encode_latent(latent, suffix)
    except InvalidFile as e:
        raise InvalidFile(field, e.reason) from None
    return write_object(uri, data, field)
