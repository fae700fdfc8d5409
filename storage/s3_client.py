"""The process's S3 client, and parsing ``s3://bucket/key`` URIs.

Any S3-compatible store works (AWS, MinIO, Ceph, R2). Where to connect and as whom is
boto3's standard configuration, untouched here: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_DEFAULT_REGION, AWS_PROFILE and the shared
config files, and AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for a non-AWS endpoint (read by
botocore itself since boto3 1.28). What we add is botocore configuration, read from the
environment (the `MASKFLEET_S3_*` settings, maskfleet/settings.py and docs/settings.md)
when a process first asks for its client.

Retries, timeouts and pooling are botocore's; there is no retry loop of ours. Clients are
thread-safe, so each process builds one and reuses it; the cache is keyed by process id
because a forked worker child must not share its parent's open connections.
"""

import ipaddress
import os
import re
import threading

import boto3
import botocore.config

from ..settings import load_settings
from .errors import InvalidFile

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_lock = threading.Lock()
_client: tuple[int, object] | None = None  # (pid, client)


def get_s3_client():
    """Return this process's S3 client, creating it on first use (again after a fork)."""
    global _client
    pid = os.getpid()
    cached = _client
    if cached is not None and cached[0] == pid:
        return cached[1]
    with _lock:
        if _client is None or _client[0] != pid:
            # A Session of our own: boto3's default session is not safe to create from
            # several threads at once.
            client = boto3.session.Session().client("s3", config=s3_config_from_env())
            _client = (pid, client)
        return _client[1]


def reset_s3_client() -> None:
    """Forget the cached client, so the next call reads the environment again (tests)."""
    global _client
    with _lock:
        _client = None


def _reinit_lock_in_child() -> None:
    global _lock
    _lock = threading.Lock()  # a fork while another thread held it must not deadlock us


os.register_at_fork(after_in_child=_reinit_lock_in_child)


def s3_config_from_env() -> botocore.config.Config:
    """The botocore configuration described in this module's docstring."""
    settings = load_settings()
    return botocore.config.Config(
        # total_max_attempts counts the first try; botocore's "max_attempts" key would
        # count retries only (5 there means 6 requests).
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        max_pool_connections=settings.s3_max_pool,
        s3={"addressing_style": settings.s3_addressing_style},
    )


def parse_s3_uri(uri: str, field: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (bucket, key), checking both.

    The bucket must follow S3's naming rules (3-63 characters: lowercase letters, digits,
    '.' and '-', starting and ending with a letter or digit, no '..', not an IP
    address). The key is everything after the first '/' after the bucket, taken
    literally (no percent-decoding, '?' and '#' are part of it); it must be non-empty,
    valid Unicode, at most 1024 bytes in UTF-8 and must not end with '/' (that names a prefix).
    """
    if not uri[:5].lower() == "s3://":
        raise InvalidFile(field, f"{uri!r} is not an s3:// URI")
    bucket, slash, key = uri[5:].partition("/")
    if not bucket:
        raise InvalidFile(field, f"{uri!r} names no bucket; expected s3://bucket/key")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _is_ip_address(bucket):
        raise InvalidFile(
            field, f"{uri!r}: invalid bucket name {bucket!r} (3-63 characters: lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or digit)")
    if not slash or not key:
        raise InvalidFile(field, f"{uri!r} names no object key; expected s3://bucket/key")
    if key.endswith("/"):
        raise InvalidFile(field, f"{uri!r} ends with '/', which names a prefix, not an object")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidFile(field, f"{uri!r}: object key is not valid Unicode (it holds a lone surrogate)") from None
    if len(key.encode("utf-8")) > 1024:
        raise InvalidFile(field, f"{uri!r}: object key is over S3's 1024-byte limit")
    if "\0" in key:
        raise InvalidFile(field, f"{uri!r}: object key contains a NUL character")
    return bucket, key


def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
