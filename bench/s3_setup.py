"""The local S3 set-up the fleet benchmarks share: moto's server holding the model store and a job's inputs.

Points this process's boto3 at the server (and away from any AWS set-up of the developer's),
uploads the tiny golden UNet as model `tiny` and golden case c03's inputs, and returns what
a benchmark needs to make jobs and start workers (they inherit the environment).
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from golden_jobs import IN_REPO_GOLDEN, TINY_UNET, write_case_job  # noqa: E402
from s3_server import S3Server  # noqa: E402

from maskfleet.storage import reset_s3_client  # noqa: E402

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
FOREIGN_AWS_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_DEFAULT_PROFILE")


@dataclass
class LocalS3:
    server: S3Server
    bucket: str
    models: str  # s3://bucket/models, holding `tiny`
    template: dict  # golden c03's job with every input on S3 and --steps steps; output left to the caller


def upload_tree(client, bucket: str, local_dir: Path, prefix: str) -> None:
    for path in sorted(local_dir.rglob("*")):
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(local_dir).as_posix()}")


def s3_job_template(server: S3Server, bucket: str, work: Path, steps: int) -> dict:
    """The case's job with every input on S3 (output left to the caller)."""
    job_path, _, _ = write_case_job(CASE, work)
    job = json.loads(job_path.read_text())
    for field in ("latent", "mask"):
        name = job[field].rsplit("/", 1)[1]
        server.client.upload_file(job[field].removeprefix("file://"), bucket, f"in/{name}")
        job[field] = f"s3://{bucket}/in/{name}"
    for field in ("base_sampler", "mask_sampler"):
        for kind in ("positive", "negative"):
            name = job[field][kind].rsplit("/", 1)[1]
            server.client.upload_file(job[field][kind].removeprefix("file://"), bucket, f"cond/{name}")
            job[field][kind] = f"s3://{bucket}/cond/{name}"
    job["steps"] = steps
    return job


def start_local_s3(tmp: Path, steps: int) -> LocalS3:
    """Start moto in `tmp`, point boto3 (this process and its children) at it, upload model and inputs."""
    server = S3Server.start(tmp)
    for name in FOREIGN_AWS_ENV:
        os.environ.pop(name, None)
    os.environ.update(server.environment())
    os.environ["AWS_CONFIG_FILE"] = str(tmp / "no-aws-config")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp / "no-aws-credentials")
    reset_s3_client()
    bucket = server.make_bucket()
    upload_tree(server.client, bucket, TINY_UNET, "models/tiny")
    return LocalS3(server, bucket, f"s3://{bucket}/models", s3_job_template(server, bucket, tmp / "inputs", steps))
