"""Safetensors input files: the only way user-sent bytes become tensors.

Pickle-based files (``torch.save``, ``.ckpt``) can run arbitrary code when loaded, so we
never unpickle anything a user sent: we recognise safetensors by content, refuse pickle
suffixes outright with a reason the user can act on, and share the dtype, emptiness and
finiteness checks so the latent, mask and conditioning readers fail the same way.
"""

import json
import math
from pathlib import PurePosixPath

import safetensors
import torch
from safetensors.torch import load as tensors_from_safetensors_bytes  # no pickle: a JSON header + raw buffers

from .errors import InvalidFile

PICKLE_SUFFIXES = frozenset({".pt", ".ckpt", ".pth", ".bin", ".pkl"})
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def reject_pickle_suffix(name: str, field: str) -> None:
    """Refuse file names (last URI segment) whose suffix says pickle, before reading a byte."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise InvalidFile(
            field, f"{name}: {suffix} files are pickles, which are never loaded "
            "(they can run code); save the tensor with safetensors instead")


def is_safetensors(data: bytes) -> bool:
    """True if ``data`` starts like a safetensors file (u64 header length, then '{')."""
    if len(data) < 10:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 2 <= header_len <= len(data) - 8 and data[8:9] == b"{"


def declared_shapes(data: bytes, field: str) -> dict[str, list[int]]:
    """The tensor shapes the safetensors header declares, read before any tensor is decoded.

    Lets a reader refuse a tensor by its size (a 9000 x 9000 mask) without building it;
    the header is only trusted this far, `load_safetensors` checks it against the data.
    """
    if not is_safetensors(data):
        raise InvalidFile(field, "not a safetensors file")
    end = 8 + int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:end])
        shapes = {name: [int(n) for n in entry["shape"]] for name, entry in header.items() if name != "__metadata__"}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        raise InvalidFile(field, "unreadable safetensors file: malformed header") from None
    return shapes


def declared_elements(shape: list[int]) -> int:
    """How many values a declared shape holds (0 for an empty or negative dimension)."""
    return math.prod(max(0, n) for n in shape)


def load_safetensors(data: bytes, field: str) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes into CPU tensors, as InvalidFile on any format error."""
    if not is_safetensors(data):
        raise InvalidFile(field, "not a safetensors file")
    try:
        return tensors_from_safetensors_bytes(data)
    except (safetensors.SafetensorError, ValueError, TypeError, RuntimeError) as e:
        raise InvalidFile(field, f"unreadable safetensors file: {e}") from None


def pick_tensor(tensors: dict[str, torch.Tensor], field: str,
                preferred: str | None = None) -> torch.Tensor:
    """Return ``tensors[preferred]`` if present, else the only tensor in the file."""
    if preferred in tensors:
        return tensors[preferred]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    expected = f"{preferred} or exactly one tensor" if preferred else "exactly one tensor"
    if not tensors:
        raise InvalidFile(field, f"holds no tensors; expected {expected}")
    names = sorted(tensors)
    shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    raise InvalidFile(field, f"holds {len(names)} tensors ({shown}); expected {expected}")


def to_float32(tensor: torch.Tensor, field: str, allow_bool: bool = False) -> torch.Tensor:
    """Check the dtype is floating (or bool if allowed) and the tensor non-empty; cast."""
    allowed = FLOAT_DTYPES + ((torch.bool,) if allow_bool else ())
    if tensor.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        dtype = str(tensor.dtype).removeprefix("torch.")
        raise InvalidFile(field, f"has dtype {dtype}; expected one of {names}")
    if tensor.numel() == 0:
        raise InvalidFile(field, f"is empty (shape {list(tensor.shape)})")
    return tensor.to(torch.float32)


def require_finite(tensor: torch.Tensor, field: str) -> torch.Tensor:
    """Refuse tensors holding NaN or infinite values; return the tensor unchanged."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise InvalidFile(field, f"contains {bad} NaN or infinite values")
    return tensor
