"""Storage: reading and writing latents, masks and conditioning, and finding models."""

from .conditioning_files import read_conditioning
from .errors import InvalidFile
from .file_uris import DEFAULT_MAX_INPUT_BYTES, local_path, read_bytes, write_atomic
from .latent_files import encode_latent, read_latent, write_latent
from .mask_files import read_mask
from .model_store import models_root_from, resolve_model_dir

__all__ = [
    "DEFAULT_MAX_INPUT_BYTES",
    "InvalidFile",
    "encode_latent",
    "local_path",
    "models_root_from",
    "read_bytes",
    "read_conditioning",
    "read_latent",
    "read_mask",
    "resolve_model_dir",
    "write_atomic",
    "write_latent",
]
