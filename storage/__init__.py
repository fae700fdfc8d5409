"""Storage: reading and writing latents, masks and conditioning by URI, and finding models.

URIs are ``s3://bucket/key`` (any S3-compatible store, see s3_client.py),
``file:///abs/path`` or plain local paths; objects.py moves the bytes, the *_files
modules decode and encode them.
"""

from .conditioning_files import (
    decode_conditioning, decode_conditioning_with_pooled, read_conditioning,
    read_conditioning_with_pooled)
from .errors import InvalidFile, StorageUnavailable
from .file_uris import DEFAULT_MAX_INPUT_BYTES, local_path, read_bytes, write_atomic
from .latent_files import decode_latent, encode_latent, read_latent, write_latent
from .mask_files import decode_mask, read_mask
from .model_store import models_root_from, resolve_model_dir
from .objects import check_uri, delete_object, object_name, read_object, write_object
from .s3_client import get_s3_client, parse_s3_uri, reset_s3_client

__all__ = [
    "DEFAULT_MAX_INPUT_BYTES",
    "InvalidFile",
    "StorageUnavailable",
    "check_uri",
    "decode_conditioning",
    "decode_conditioning_with_pooled",
    "decode_latent",
    "decode_mask",
    "delete_object",
    "encode_latent",
    "get_s3_client",
    "local_path",
    "models_root_from",
    "object_name",
    "parse_s3_uri",
    "read_bytes",
    "read_conditioning",
    "read_conditioning_with_pooled",
    "read_latent",
    "read_mask",
    "read_object",
    "reset_s3_client",
    "resolve_model_dir",
    "write_atomic",
    "write_latent",
    "write_object",
]
