"""Files without storage credentials: presigned S3 URLs for a producer's inputs and a job's outputs.

`POST /v1/uploads` names the files a producer wants to send; each gets a fresh object under
MASKFLEET_UPLOAD_PREFIX (`<prefix>/<key name>/<uuid>/<file name>`, so keys and uploads never
collide) and a presigned PUT URL valid MASKFLEET_PRESIGN_SECONDS; the `s3://` URI goes in
the job. A job's outputs on S3 come with presigned GET URLs when asked (`?presign=true`).
The signing uses the gateway's own S3 credentials (boto3's configuration, as the workers').
A presigned PUT cannot cap the size: the workers' input caps apply when the job reads it.
"""
from __future__ import annotations

import uuid

from pydantic import BaseModel, Field

from ..storage.errors import InvalidFile
from ..storage.s3_client import get_s3_client, parse_s3_uri
from .errors import ApiError

UPLOAD_SUFFIXES = (".latent", ".safetensors", ".png", ".jpg", ".jpeg", ".webp")
OUTPUT_FIELDS = ("output", "preview", "output_image")  # the result's fields that name written objects
MAX_UPLOAD_FILES = 16


class UploadRequest(BaseModel):
    files: list[str] = Field(min_length=1, max_length=MAX_UPLOAD_FILES,
                             description=f"File names to upload (suffix one of {', '.join(UPLOAD_SUFFIXES)}).")


class Upload(BaseModel):
    name: str
    uri: str = Field(description="The s3:// URI to give in the job.")
    put_url: str = Field(description="PUT the file's bytes here (no headers needed) before it expires.")


class Uploads(BaseModel):
    expires_in: int = Field(description="Seconds the put_urls stay valid.")
    files: list[Upload]


def check_file_name(name: str) -> None:
    if not (0 < len(name) <= 128) or not all(c.isalnum() or c in "._-" for c in name) or name.startswith("."):
        raise ApiError(422, "InvalidRequest", f"files: {name[:64]!r} is not a plain file name (letters, digits, . _ -)")
    if not name.lower().endswith(UPLOAD_SUFFIXES):
        raise ApiError(422, "InvalidRequest", f"files: {name!r} must end with one of {', '.join(UPLOAD_SUFFIXES)}")


def upload_location(prefix: str) -> tuple[str, str]:
    """(bucket, key prefix ending in '/', or empty) of MASKFLEET_UPLOAD_PREFIX."""
    bucket, key = parse_s3_uri(prefix.rstrip("/") + "/x", "MASKFLEET_UPLOAD_PREFIX")
    return bucket, key[:-1]


def presign_uploads(request: UploadRequest, prefix: str | None, owner: str, seconds: int) -> Uploads:
    if prefix is None:
        raise ApiError(404, "NotFound", "uploads are off: MASKFLEET_UPLOAD_PREFIX (s3://bucket/prefix) is not set")
    if len(set(request.files)) != len(request.files):
        raise ApiError(422, "InvalidRequest", "files: names must be unique")
    for name in request.files:
        check_file_name(name)
    bucket, root = upload_location(prefix)
    folder = f"{root}{owner}/{uuid.uuid4()}"
    client = get_s3_client()
    files = [Upload(name=name, uri=f"s3://{bucket}/{folder}/{name}",
                    put_url=client.generate_presigned_url("put_object", Params={"Bucket": bucket, "Key": f"{folder}/{name}"},
                                                          ExpiresIn=seconds))
             for name in request.files]
    return Uploads(expires_in=seconds, files=files)


def presign_outputs(result: dict, seconds: int) -> dict[str, str]:
    """Presigned GET URLs of the result's objects on S3 (local outputs have none)."""
    urls = {}
    for field in OUTPUT_FIELDS:
        uri = result.get(field)
        if isinstance(uri, str) and uri[:5].lower() == "s3://":
            try:
                bucket, key = parse_s3_uri(uri, field)
            except InvalidFile:
                continue
            urls[field] = get_s3_client().generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                                 ExpiresIn=seconds)
    return urls
