"""Mask files: images (ComfyUI's LoadImageMask conventions) or safetensors tensors.

Producers draw masks in image editors or export them from ComfyUI; this module turns
either kind of file into a float32 [B, H, W] mask in [0, 1], where 1 means "resample
with the mask sampler".
"""

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidFile
from .file_uris import DEFAULT_MAX_INPUT_BYTES
from .objects import Uri, object_name, read_object
from .safetensors_files import (
    is_safetensors, load_safetensors, pick_tensor, reject_pickle_suffix, require_finite,
    to_float32)

MAX_MASK_PIXELS = 64 * 1024 * 1024
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def read_mask(uri: Uri, field: str = "mask", *,
              max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
              max_pixels: int = MAX_MASK_PIXELS) -> torch.Tensor:
    """Read the mask at ``uri`` (at most ``max_bytes``), see ``decode_mask``."""
    name = object_name(uri, field)
    reject_pickle_suffix(name, field)  # before a byte is fetched
    return decode_mask(read_object(uri, field, max_bytes), field, name, max_pixels=max_pixels)


def decode_mask(data: bytes, field: str, name: str, *,
                max_pixels: int = MAX_MASK_PIXELS) -> torch.Tensor:
    """Decode a mask as float32 [B, H, W] with values in [0, 1].

    Safetensors files (recognised by content) hold exactly one floating or bool tensor
    of shape [H, W], [B, H, W] or [B, 1, H, W]; it must be finite with values in
    [0, 1] (anything outside is refused, not clamped: 255 or -1 means the producer
    meant another convention, and clamping would run a different job). Anything else
    is opened with Pillow (PNG, JPEG, WebP...), see ``image_to_mask``; images over
    ``max_pixels`` pixels are refused. ``name`` (the URI's last segment) is only checked
    for pickle suffixes.
    """
    reject_pickle_suffix(name, field)
    if is_safetensors(data):
        return _tensor_to_mask(pick_tensor(load_safetensors(data, field), field), field)
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise InvalidFile(
                    field, f"image is {image.width}x{image.height} pixels, over the "
                    f"{max_pixels}-pixel cap")
            return image_to_mask(image).unsqueeze(0)
    except Image.DecompressionBombError as e:
        raise InvalidFile(field, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise InvalidFile(
            field, "neither an image Pillow can open (PNG, JPEG, WebP...) nor a "
            "safetensors file") from None
    except OSError as e:
        raise InvalidFile(field, f"cannot decode image: {e}") from None


def image_to_mask(image: Image.Image) -> torch.Tensor:
    """Convert a Pillow image to a float32 [H, W] mask, as ComfyUI's LoadImageMask does.

    EXIF orientation is applied first. If the image has transparency (an alpha band or
    a tRNS transparent colour), mask = 1 - alpha/255, so transparent pixels are masked:
    this is LoadImageMask with its default channel "alpha". Otherwise the red channel
    (the gray value for grayscale) / 255 is used as is, like channel "red"; 16-bit
    grayscale is divided by 65535. Deliberate difference: LoadImageMask with channel
    "alpha" gives an all-zero mask for an image without alpha; we use red instead,
    because a black-and-white mask image is what users mean.
    """
    image = ImageOps.exif_transpose(image)
    if "A" in image.getbands() or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA").getchannel("A"), dtype=np.float32)
        return torch.from_numpy(1.0 - alpha / 255.0)
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image, dtype=np.float32) / 65535.0
        return torch.from_numpy(np.clip(gray, 0.0, 1.0))
    if image.mode != "L":
        image = image.convert("RGB").getchannel("R")
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)


def _tensor_to_mask(tensor: torch.Tensor, field: str) -> torch.Tensor:
    """Check a mask tensor's shape and values; return float32 [B, H, W], refusing values outside [0, 1]."""
    shape = list(tensor.shape)
    if tensor.ndim == 4 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    elif tensor.ndim == 2:
        tensor = tensor.unsqueeze(0)
    elif tensor.ndim != 3:
        raise InvalidFile(
            field, f"has shape {shape}; expected [H, W], [B, H, W] or [B, 1, H, W]")
    mask = require_finite(to_float32(tensor, field, allow_bool=True), field)
    low, high = float(mask.min()), float(mask.max())
    if low < 0.0 or high > 1.0:
        raise InvalidFile(field, f"values must lie in [0, 1], found {low:g}..{high:g}")
    return mask.contiguous()
