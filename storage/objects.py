"""Bytes in and out by URI: ``s3://bucket/key``, ``file:///abs/path`` or a local path.

The format readers and writers (latents, masks, conditioning) work on bytes and call
this module for I/O, so every input goes through the same size cap and every output
through the same whole-or-nothing write and sha256 stamp, wherever it lives:

- reading S3: one GET, whose headers give the size before the body is read: an object
  over the cap is refused before a byte of it is downloaded;
- writing S3: one PUT, or above ``MULTIPART_THRESHOLD`` boto3's managed upload, which
  completes the multipart upload or aborts it; either way an object appears whole or not
  at all, with ``Metadata={"sha256": hex}``;
- local files: confined to ``MASKFLEET_ALLOWED_ROOTS`` when set (see allowed_roots.py),
  read with the cap, written by temp file + rename with the ``user.sha256`` xattr where
  the filesystem has xattrs.

S3 failures become InvalidFile naming the job field (missing key or bucket, access
denied, anything else with its S3 error code), or StorageUnavailable when the store
could not be reached or kept failing after botocore's retries; never a traceback.
"""

import hashlib
import io
import os
from pathlib import Path, PurePosixPath

from boto3.s3.transfer import TransferConfig
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError

from .allowed_roots import confine, open_confined
from .errors import InvalidFile, StorageUnavailable
from .file_uris import DEFAULT_MAX_INPUT_BYTES, local_path, read_bytes, write_atomic
from .prefetched_objects import served
from .s3_client import get_s3_client, parse_s3_uri

MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNKSIZE = 16 << 20
SHA256_XATTR = "user.sha256"

_MISSING = frozenset({"NoSuchKey", "NotFound", "404"})
_DENIED = frozenset({"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId",
                     "SignatureDoesNotMatch", "AllAccessDisabled"})
_THROTTLED = frozenset({"SlowDown", "Throttling", "ThrottlingException",
                        "RequestTimeout", "RequestTimeTooSkewed"})

Uri = str | os.PathLike


def is_s3_uri(uri: Uri) -> bool:
    """True for ``s3://`` strings; paths and other strings are local."""
    return isinstance(uri, str) and uri[:5].lower() == "s3://"


def check_uri(uri: Uri, field: str) -> None:
    """Check a URI's syntax without any I/O (scheme, bucket name and key, file:// form)."""
    if is_s3_uri(uri):
        parse_s3_uri(uri, field)
    else:
        _local(uri, field)


def object_name(uri: Uri, field: str) -> str:
    """The last path segment of ``uri`` (``x.latent`` for ``s3://b/in/x.latent``)."""
    if is_s3_uri(uri):
        return PurePosixPath(parse_s3_uri(uri, field)[1]).name
    return _local(uri, field).name


def read_object(uri: Uri, field: str, max_bytes: int = DEFAULT_MAX_INPUT_BYTES) -> bytes:
    """Return the whole object or file named by ``uri``, refusing anything over ``max_bytes``."""
    if is_s3_uri(uri):
        ahead = served(uri, max_bytes)
        return ahead if ahead is not None else _read_s3(uri, field, max_bytes)
    path = confine(_local(uri, field), field)
    return read_bytes(path, field, max_bytes, open_file=lambda: open_confined(path, field))


def write_object(uri: Uri, data: bytes, field: str = "output",
                 content_type: str | None = None) -> str:
    """Write ``data`` whole or not at all; return its sha256 hex, also stored with it."""
    digest = hashlib.sha256(data).hexdigest()
    if is_s3_uri(uri):
        _write_s3(uri, data, field, content_type, digest)
        return digest
    path = confine(_local(uri, field), field, writing=True)
    try:
        write_atomic(path, data, xattrs={SHA256_XATTR: digest.encode("ascii")},
                     open_dir=lambda: open_confined(path.parent, field, directory=True, create=True))
    except OSError as e:
        raise InvalidFile(field, f"cannot write {path}: {e.strerror or e}") from None
    return digest


def delete_object(uri: Uri, field: str = "output") -> None:
    """Delete the object or file named by ``uri``; one that does not exist is fine."""
    if is_s3_uri(uri):
        bucket, key = parse_s3_uri(uri, field)
        try:
            get_s3_client().delete_object(Bucket=bucket, Key=key)
        except ClientError as e:
            raise _client_error(e, uri, field, "delete") from None
        except BotoCoreError as e:
            raise _botocore_error(e, uri, field, "delete") from None
        return
    path = confine(_local(uri, field), field, writing=True)
    try:
        dir_fd = open_confined(path.parent, field, directory=True)
    except FileNotFoundError:
        return  # no folder, no file
    except OSError as e:
        raise InvalidFile(field, f"cannot delete {path}: {e.strerror or e}") from None
    try:
        os.unlink(path.name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise InvalidFile(field, f"cannot delete {path}: {e.strerror or e}") from None
    finally:
        os.close(dir_fd)


def _local(uri: Uri, field: str) -> Path:
    if isinstance(uri, os.PathLike):  # a Path from a local caller: never parsed as a URI
        path = Path(uri)
        if "\0" in str(path):
            raise InvalidFile(field, "path contains a NUL character")
        return path.absolute()
    return local_path(uri, field)


def _read_s3(uri: str, field: str, max_bytes: int) -> bytes:
    bucket, key = parse_s3_uri(uri, field)
    client = get_s3_client()
    try:
        # One GET: its headers (the size) arrive before the body, which is read only when
        # the size is under the cap; one request per input instead of a HEAD and a GET.
        response = client.get_object(Bucket=bucket, Key=key)
        size = response["ContentLength"]
        # Not `with response["Body"] as body`: that yields urllib3's raw stream, whose
        # errors (a connection reset half-way) escape as urllib3 exceptions; botocore's
        # StreamingBody.read turns them into HTTPClientError like any other.
        body = response["Body"]
        try:
            if size > max_bytes:  # closed unread: the connection is dropped, nothing downloaded
                raise InvalidFile(field, f"{uri} is {size} bytes, over the {max_bytes}-byte input cap")
            data = body.read(size + 1)  # what the headers said (size <= the cap), not up to the cap
        finally:
            body.close()
    except ClientError as e:
        if _code(e) in _MISSING and not _bucket_exists(client, bucket):
            raise InvalidFile(field, f"{uri}: bucket {bucket!r} does not exist") from None
        raise _client_error(e, uri, field, "read") from None
    except BotoCoreError as e:
        raise _botocore_error(e, uri, field, "read") from None
    if len(data) != size:  # one response, one version of the object: the download is short
        raise StorageUnavailable(
            field, f"cannot read {uri}: the download ended after {len(data)} of {size} bytes; "
            "try again")
    return data


def _write_s3(uri: str, data: bytes, field: str, content_type: str | None, digest: str) -> None:
    bucket, key = parse_s3_uri(uri, field)
    extra = {"Metadata": {"sha256": digest}}
    if content_type:
        extra["ContentType"] = content_type
    client = get_s3_client()
    try:
        if len(data) <= MULTIPART_THRESHOLD:
            client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        else:
            config = TransferConfig(multipart_threshold=MULTIPART_THRESHOLD,
                                    multipart_chunksize=MULTIPART_CHUNKSIZE)
            client.upload_fileobj(io.BytesIO(data), bucket, key, ExtraArgs=extra, Config=config)
    except ClientError as e:
        raise _client_error(e, uri, field, "write") from None
    except BotoCoreError as e:
        raise _botocore_error(e, uri, field, "write") from None


def s3_error(error: ClientError | BotoCoreError, uri: str, field: str, action: str) -> InvalidFile:
    """What a botocore error while we ``action`` (read, write, delete, list) ``uri`` means
    for the job: InvalidFile naming ``field``, or StorageUnavailable when the store failed.

    For the other modules that call S3 themselves (the model store), so every S3 failure is
    classified the same way.
    """
    if isinstance(error, ClientError):
        return _client_error(error, uri, field, action)
    return _botocore_error(error, uri, field, action)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _bucket_exists(client, bucket: str) -> bool:
    """After a 404 without an S3 error code: is it the bucket that is missing?"""
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        return _code(e) not in _MISSING and _code(e) != "NoSuchBucket"
    except BotoCoreError:
        return True
    return True


def _client_error(error: ClientError, uri: str, field: str, action: str) -> InvalidFile:
    code = _code(error)
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    bucket = uri[5:].partition("/")[0]  # uri may name a prefix (the model store's)
    if code == "NoSuchBucket":
        return InvalidFile(field, f"{uri}: bucket {bucket!r} does not exist")
    if code in _MISSING and action == "read":
        return InvalidFile(field, f"{uri} does not exist")
    if code in _DENIED or status == 403:
        return InvalidFile(
            field, f"cannot {action} {uri}: access denied ({code or 'HTTP 403'}); check the "
            "worker's S3 credentials and the bucket's policy")
    if code == "PreconditionFailed" and action == "read":
        return StorageUnavailable(field, f"{uri} changed while being read; try again")
    shown = f"S3 error {code}" if code else "S3 error"
    if status:
        shown += f" (HTTP {status})"
    if (status or 0) >= 500 or code in _THROTTLED:
        return StorageUnavailable(field, f"cannot {action} {uri}: {shown}, after retries")
    return InvalidFile(field, f"cannot {action} {uri}: {shown}")


def _botocore_error(error: BotoCoreError, uri: str, field: str, action: str) -> InvalidFile:
    if isinstance(error, (BotoConnectionError, HTTPClientError)):
        return StorageUnavailable(field, f"cannot {action} {uri}: {error}")
    return InvalidFile(field, f"cannot {action} {uri}: {error}")
