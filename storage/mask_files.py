"""Mask files: images (ComfyUI's LoadImageMask conventions) or safetensors tensors.

Producers draw masks in image editors or export them from ComfyUI; this module turns
either kind of file into a float32 [B, H, W] mask in [0, 1], where 1 means "resample
with the mask sampler".
"""

import io
import struct

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidFile
from .file_uris import DEFAULT_MAX_INPUT_BYTES
from .objects import Uri, object_name, read_object
from .safetensors_files import (
    declared_elements, declared_shapes, is_safetensors, load_safetensors, pick_tensor,
    reject_pickle_suffix, require_finite, to_float32)

MAX_MASK_PIXELS = 64 * 1024 * 1024
# A mask file's byte cap: float32 values at the pixel cap, plus room for a header. A bigger
# file cannot be a mask we take and is refused by its size, before it is read.
MAX_MASK_BYTES = min(DEFAULT_MAX_INPUT_BYTES, MAX_MASK_PIXELS * 4 + (1 << 20))
# The image formats a mask may be: what image editors and ComfyUI write. Pillow's other
# plugins (EPS runs Ghostscript, and a dozen rare formats) never see a job's bytes.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF")
# What Pillow raises on a file it recognised but cannot decode (truncated data, bad
# chunks, a zTXt chunk that inflates past its limit, broken TIFF tags): never a traceback.
IMAGE_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, KeyError, TypeError, ZeroDivisionError)
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})


def read_mask(uri: Uri, field: str = "mask", *,
              max_bytes: int = MAX_MASK_BYTES,
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
    meant another convention, and clamping would run a different job); a tensor whose
    header declares more than ``max_pixels`` values is refused before it is built.
    Anything else is opened with Pillow as one of IMAGE_FORMATS, see ``image_to_mask``;
    images over ``max_pixels`` pixels are refused. ``name`` (the URI's last segment) is only checked
    for pickle suffixes.
    """
    reject_pickle_suffix(name, field)
    if is_safetensors(data):
        for tensor_name, shape in declared_shapes(data, field).items():
            if declared_elements(shape) > max_pixels:
                raise InvalidFile(
                    field, f"tensor {tensor_name!r} has shape {shape}, "
                    f"{declared_elements(shape)} values, over the {max_pixels}-pixel cap")
        return _tensor_to_mask(pick_tensor(load_safetensors(data, field), field), field)
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise InvalidFile(
                    field, f"image is {image.width}x{image.height} pixels, over the "
                    f"{max_pixels}-pixel cap")
            return image_to_mask(image).unsqueeze(0)
    except InvalidFile:
        raise  # the pixel cap above (a ValueError too): not a decoding error
    except Image.DecompressionBombError as e:
        raise InvalidFile(field, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise InvalidFile(
            field, f"neither an image ({', '.join(IMAGE_FORMATS)}) nor a safetensors file") from None
    except IMAGE_DECODE_ERRORS as e:
        raise InvalidFile(field, f"cannot decode image: {e or type(e).__name__}") from None


def image_to_mask(image: Image.Image) -> torch.Tensor:
    """Convert a Pillow image to a float32 [H, W] mask, as ComfyUI's LoadImageMask does.

    EXIF orientation is applied first (an EXIF block that cannot be parsed is ignored,
    the pixels are used as stored). If the image has transparency (an alpha band or a
    tRNS transparent colour), mask = 1 - alpha/255, so transparent pixels are masked:
    this is LoadImageMask with its default channel "alpha". Otherwise the red channel
    (the gray value for grayscale) / 255 is used as is, like channel "red"; 16-bit
    grayscale is divided by 65535. Deliberate difference: LoadImageMask with channel
    "alpha" gives an all-zero mask for an image without alpha; we use red instead,
    because a black-and-white mask image is what users mean.
    """
    try:
        image = ImageOps.exif_transpose(image)
    except IMAGE_DECODE_ERRORS:
        pass  # a broken EXIF block: the pixels as stored, as if it had none
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
