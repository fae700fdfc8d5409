"""Pictures in and out: an input image as ComfyUI's LoadImage reads it, an output image as SaveImage writes it.

An input picture becomes float32 [1, H, W, 3] in [0, 1]: EXIF orientation applied (a
broken EXIF block ignored), converted to RGB (alpha dropped: VAEEncode takes the RGB
channels), divided by 255. The formats and decoding errors are the mask reader's: only
what image editors write, and a file Pillow cannot decode is a field error, never a
traceback. Outputs are PNG: float [0, 1] scaled by 255 and truncated to 8 bits, as
SaveImage does.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InvalidFile
from .file_uris import DEFAULT_MAX_INPUT_BYTES
from .mask_files import IMAGE_DECODE_ERRORS, IMAGE_FORMATS, MAX_MASK_PIXELS
from .objects import Uri, object_name, read_object
from .safetensors_files import reject_pickle_suffix

MAX_IMAGE_PIXELS = MAX_MASK_PIXELS  # 64 Mpx, as for masks
MIN_IMAGE_SIDE = 8  # the VAE's downscale: a smaller side would give an empty latent


def read_image(uri: Uri, field: str = "image", *, max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
               max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Read the picture at ``uri``, see ``decode_image``."""
    name = object_name(uri, field)
    reject_pickle_suffix(name, field)  # before a byte is fetched
    return decode_image(read_object(uri, field, max_bytes), field, max_pixels=max_pixels)


def decode_image(data: bytes, field: str, *, max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """float32 [1, H, W, 3] in [0, 1]; InvalidFile naming ``field`` for anything else."""
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > max_pixels:
                raise InvalidFile(field, f"image is {image.width}x{image.height} pixels, over the {max_pixels}-pixel cap")
            if min(image.width, image.height) < MIN_IMAGE_SIDE:
                raise InvalidFile(field, f"image is {image.width}x{image.height} pixels; both sides must be at least "
                                         f"{MIN_IMAGE_SIDE} (the VAE makes one latent pixel of 8x8)")
            try:
                image = ImageOps.exif_transpose(image)
            except IMAGE_DECODE_ERRORS:
                pass  # a broken EXIF block: the pixels as stored
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except InvalidFile:
        raise
    except Image.DecompressionBombError as e:
        raise InvalidFile(field, f"image too large: {e}") from None
    except UnidentifiedImageError:
        raise InvalidFile(field, f"not an image ({', '.join(IMAGE_FORMATS)})") from None
    except IMAGE_DECODE_ERRORS as e:
        raise InvalidFile(field, f"cannot decode image: {e or type(e).__name__}") from None
    return torch.from_numpy(rgb.copy()).unsqueeze(0)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[..., 3] float in [0, 1] -> uint8 as SaveImage makes it: x * 255 clipped, truncated."""
    return (pixels.detach().float().cpu() * 255.0).clamp(0, 255).to(torch.uint8)


def encode_png(pixels: torch.Tensor) -> bytes:
    """PNG bytes of [B, H, W, 3]: uint8 as is, float in [0, 1] as SaveImage makes 8 bits of it; a batch is
    laid out left to right."""
    rgb = pixels.cpu() if pixels.dtype == torch.uint8 else to_uint8(pixels)
    strip = torch.cat(list(rgb), dim=1) if rgb.shape[0] > 1 else rgb[0]
    buffer = io.BytesIO()
    Image.fromarray(strip.numpy(), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
