"""Storage: reading and writing latents, masks and conditioning by URI, and finding models.

URIs are ``s3://bucket/key`` (any S3-compatible store, see s3_client.py),
``file:///abs/path`` or plain local paths; objects.py moves the bytes, the *_files
modules decode and encode them.
"""

from __future__ import annotations

from ..lazy_exports import lazy_exports

# Imported on first use (PEP 562): a producer reading a job file needs file_uris and errors,
# not the tensor formats (torch) or boto3.
_EXPORTS = {
    "DEFAULT_MAX_INPUT_BYTES": "file_uris",
    "InvalidFile": "errors",
    "StorageUnavailable": "errors",
    "check_uri": "objects",
    "decode_conditioning": "conditioning_files",
    "decode_conditioning_with_pooled": "conditioning_files",
    "decode_latent": "latent_files",
    "decode_mask": "mask_files",
    "delete_object": "objects",
    "encode_latent": "latent_files",
    "get_s3_client": "s3_client",
    "local_path": "file_uris",
    "models_root_from": "model_store",
    "object_name": "objects",
    "parse_s3_uri": "s3_client",
    "read_bytes": "file_uris",
    "read_conditioning": "conditioning_files",
    "read_conditioning_with_pooled": "conditioning_files",
    "read_latent": "latent_files",
    "read_mask": "mask_files",
    "read_object": "objects",
    "reset_s3_client": "s3_client",
    "resolve_model_dir": "model_store",
    "write_atomic": "file_uris",
    "write_latent": "latent_files",
    "write_object": "objects",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
