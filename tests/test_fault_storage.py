"""The S3 endpoint fails under a real worker: transient faults are absorbed, permanent ones
fail the job cleanly after bounded retries, and nothing half-written is left behind.

A real Celery worker reads its inputs from and writes its output and preview to the moto
S3 server, through the test's own TCP fault proxy (tcp_fault_proxy.py): its
AWS_ENDPOINT_URL is the proxy, which resets connections, holds requests past the
worker's 1 s read timeout, or answers 503 Slow Down, for a count of requests matching a
request-line pattern (e.g. only the PUT of the job's output). The test checks the bucket
directly on the moto server, bypassing the proxy.

Retry budget of the worker here: botocore makes ATTEMPTS requests per S3 call (its
"standard" mode, MASKFLEET_S3_MAX_ATTEMPTS), and on StorageUnavailable the task is retried
STORAGE_RETRIES times (MASKFLEET_STORAGE_RETRIES) while reading, or, once the job is
sampled, the output write alone is retried as often (the job is not sampled again), so a
failing S3 call is made exactly ATTEMPTS * (STORAGE_RETRIES + 1) times before the job fails.
"""
from __future__ import annotations

import hashlib
import json
import re
import time

import pytest
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, upload_case_inputs
from safetensors.torch import load
from tcp_fault_proxy import FaultProxy

from maskfleet.client import JobFailed, _app, submit
from maskfleet.storage import objects, reset_s3_client
from maskfleet.storage.errors import StorageUnavailable
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
ATTEMPTS = 2
STORAGE_RETRIES = 2
READ_TIMEOUT_S = 1
CALLS_BEFORE_FAILING = ATTEMPTS * (STORAGE_RETRIES + 1)

require_redis()


@pytest.fixture(scope="module")
def fleet(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("fault-storage")
    url = claim_db_url()
    bucket = s3_server.make_bucket()
    job = upload_case_inputs(s3_server.client, bucket, root / "inputs", CASE)
    proxy = FaultProxy(("127.0.0.1", s3_server.port))
    worker = None
    try:
        worker = Worker("s3faults", [model_queue("tiny")], url, make_models_dir(root), root / "worker.log",
                        extra_env={**s3_server.environment(), "AWS_ENDPOINT_URL": proxy.url,
                                   "MASKFLEET_S3_MAX_ATTEMPTS": str(ATTEMPTS),
                                   "MASKFLEET_S3_CONNECT_TIMEOUT": "1",
                                   "MASKFLEET_S3_READ_TIMEOUT": str(READ_TIMEOUT_S),
                                   "MASKFLEET_S3_ADDRESSING_STYLE": "path",
                                   "MASKFLEET_STORAGE_RETRIES": str(STORAGE_RETRIES),
                                   "MASKFLEET_TORCH_THREADS": "1"})
        app = _app(url)
        worker.wait_ready(app)
        yield {"url": url, "app": app, "s3": s3_server.client, "bucket": bucket, "job": job,
               "proxy": proxy, "worker": worker}
    finally:
        if worker is not None:
            worker.stop()
        proxy.close()
        flush(url)


@pytest.fixture
def proxy(fleet):
    fleet["proxy"].reset()
    yield fleet["proxy"]
    fleet["proxy"].reset()


@pytest.fixture(scope="module")
def fault_free(fleet):
    """The output bytes of the job run once with no fault (what every faulted run must write)."""
    fleet["proxy"].clear()
    job = s3_job(fleet, "baseline")
    started = time.monotonic()
    result = submit(job, broker_url=fleet["url"]).wait(120)
    data = output_bytes(fleet, job)
    reference = load((CASE / "data.safetensors").read_bytes())["out_intended"]
    out = load(data)["latent_tensor"]
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-4
    assert hashlib.sha256(data).hexdigest() == result["sha256"]
    return {"bytes": data, "sha256": result["sha256"], "wall_s": time.monotonic() - started}


def s3_job(fleet, name: str) -> dict:
    job = json.loads(json.dumps(fleet["job"]))
    job["job_id"] = f"{name}-{time.time_ns()}"
    job["output"] = f"s3://{fleet['bucket']}/out/{job['job_id']}.latent"
    job["preview"] = f"s3://{fleet['bucket']}/out/{job['job_id']}.png"
    return job


def key_of(uri: str) -> str:
    return uri.split("/", 3)[3]


def path_of(fleet, uri: str) -> str:
    """The request target for `uri` in path-style addressing, as a regex."""
    return re.escape(f"/{fleet['bucket']}/{key_of(uri)}")


def output_bytes(fleet, job: dict) -> bytes:
    obj = fleet["s3"].get_object(Bucket=fleet["bucket"], Key=key_of(job["output"]))
    data = obj["Body"].read()
    assert obj["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()  # whole, as written
    return data


def leftovers(fleet, job: dict) -> dict:
    """What the job left in the bucket, read from moto directly (not through the proxy)."""
    s3, bucket = fleet["s3"], fleet["bucket"]
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=f"out/{job['job_id']}")
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=f"out/{job['job_id']}")
    return {"objects": [o["Key"] for o in listed.get("Contents", [])],
            "uploads": [u["Key"] for u in uploads.get("Uploads", [])]}


def retry_log_lines(fleet, job: dict, marker: str = "retry: Retry in") -> list[str]:
    """The worker's log lines about retrying this job: the task's (default) or the output write's."""
    log = fleet["worker"].log.read_text(errors="replace")
    return [line for line in log.splitlines() if job["job_id"] in line and marker in line]


WRITE_RETRY = "not sampling again"  # JobPipeline.write's log line


# --- transient faults: the job succeeds with the fault-free output ---

TRANSIENT = {
    # name: (rules as (action, what to match, count, hold: seconds, or bytes for "cut"),
    #        task retries expected, output-write retries expected)
    "reset, read timeout and 503 once each": ([("drop", "GET latent", ATTEMPTS - 1, 0),
                                               ("delay", "GET mask", ATTEMPTS - 1, READ_TIMEOUT_S * 3),
                                               ("error", "PUT output", ATTEMPTS - 1, 0)], 0, 0),
    "503 on everything for a while": ([("error", "any", ATTEMPTS + 1, 0)], 1, 0),
    # Past botocore's attempts the write alone is retried: the job is not sampled again.
    "output PUT timing out past botocore": ([("delay", "PUT output", ATTEMPTS, READ_TIMEOUT_S * 3)], 0, 1),
    # botocore retries requests, not bodies: a download cut half-way is the task's to retry.
    "latent download cut half-way": ([("cut", "GET latent", 1, 4000)], 1, 0),
}


def install(fleet, proxy: FaultProxy, job: dict, rules) -> None:
    targets = {"any": None,
               "GET mask": f"^GET {path_of(fleet, job['mask'])} ",
               "GET latent": f"^GET {path_of(fleet, job['latent'])} ",
               "PUT output": f"^PUT {path_of(fleet, job['output'])} "}
    for action, target, count, hold in rules:
        proxy.fault(action, match=targets[target], count=count, hold=hold)


@pytest.mark.parametrize("case", list(TRANSIENT))
def test_transient_fault_is_retried_and_the_job_succeeds(fleet, fault_free, proxy, case):
    rules, expected_retries, write_retries = TRANSIENT[case]
    job = s3_job(fleet, "transient")
    install(fleet, proxy, job, rules)
    started = time.monotonic()
    result = submit(job, broker_url=fleet["url"]).wait(120)
    took = time.monotonic() - started

    assert all(rule.hits == rule.count for rule in proxy.rules), [(r.action, r.hits, r.count) for r in proxy.rules]
    assert result["sha256"] == fault_free["sha256"]
    assert output_bytes(fleet, job) == fault_free["bytes"]
    assert leftovers(fleet, job) == {"objects": [key_of(job["output"]), key_of(job["preview"])], "uploads": []}
    assert len(retry_log_lines(fleet, job)) == expected_retries
    assert len(retry_log_lines(fleet, job, WRITE_RETRY)) == write_retries
    print(f"{case}: {sum(r.hits for r in proxy.rules)} faulted requests, {expected_retries} task retries, "
          f"{write_retries} output-write retries, SUCCESS in {took:.2f} s (fault-free {fault_free['wall_s']:.2f} s)")


# --- permanent faults: FAILURE with StorageUnavailable after bounded retries, nothing left ---

PERMANENT = {
    # name: (action, what to match, field named by the error, what the message says)
    "store answering 503": ("error", "any", "latent",
                            r"cannot read s3://\S+: S3 error SlowDown \(HTTP 503\), after retries"),
    "store resetting connections": ("drop", "any", "latent",
                                    r"cannot read s3://\S+: Connection was closed before we received a valid response"),
    "output PUT answering 503": ("error", "PUT output", "output",
                                 r"cannot write s3://\S+: S3 error SlowDown \(HTTP 503\), after retries"),
    "output PUT timing out": ("delay", "PUT output", "output", r"cannot write s3://\S+: Read timeout"),
}


@pytest.mark.parametrize("case", list(PERMANENT))
def test_permanent_fault_fails_the_job_after_bounded_retries_leaving_nothing(fleet, fault_free, proxy, case):
    action, target, field, message = PERMANENT[case]
    job = s3_job(fleet, "permanent")
    install(fleet, proxy, job, [(action, target, None, READ_TIMEOUT_S * 3)])
    started = time.monotonic()
    handle = submit(job, broker_url=fleet["url"])
    with pytest.raises(JobFailed) as failed:
        handle.wait(120)
    took = time.monotonic() - started

    assert failed.value.state == "FAILURE"
    assert re.fullmatch(rf"{field}: {message}.*", failed.value.message), failed.value.message
    # Reading fails the task's attempts; writing fails the write's own attempts (sampled once).
    task_tries, write_tries = (0, STORAGE_RETRIES) if field == "output" else (STORAGE_RETRIES, 0)
    assert len(retry_log_lines(fleet, job)) == task_tries
    assert len(retry_log_lines(fleet, job, WRITE_RETRY)) == write_tries
    failing = job["output"] if field == "output" else job["latent"]
    calls = proxy.seen(rf"^(GET|PUT) {path_of(fleet, failing)}$")
    assert len(calls) == CALLS_BEFORE_FAILING and {c.action for c in calls} == {action}
    assert leftovers(fleet, job) == {"objects": [], "uploads": []}
    if field == "output":  # the preview was written each time and taken back each time
        assert len(proxy.seen(rf"^DELETE {path_of(fleet, job['preview'])}$", "pass")) == STORAGE_RETRIES + 1
    print(f"{case}: {len(calls)} requests for the failing call, {task_tries} task retries, {write_tries} "
          f"output-write retries, FAILURE in {took:.2f} s: {failed.value.message}")


@pytest.fixture(scope="module")
def failed_at_write_time(fleet, fault_free):
    """A job during which the store refuses the output's PUT and every DELETE (the preview went in)."""
    proxy = fleet["proxy"]
    proxy.reset()
    job = s3_job(fleet, "write-time")
    proxy.fault("error", match=f"^PUT {path_of(fleet, job['output'])} ")
    proxy.fault("error", match="^DELETE ")
    handle = submit(job, broker_url=fleet["url"])
    with pytest.raises(JobFailed) as failed:
        handle.wait(120)
    proxy.reset()
    return {"job": job, "failed": failed.value}


def test_store_failing_at_write_time_leaves_no_output(fleet, failed_at_write_time):
    job, failed = failed_at_write_time["job"], failed_at_write_time["failed"]
    assert failed.state == "FAILURE" and "after retries" in failed.message
    found = leftovers(fleet, job)
    assert key_of(job["output"]) not in found["objects"] and found["uploads"] == []
    print(f"left in the bucket: {found['objects']}; error: {failed.message}")


def test_store_failing_at_write_time_reports_the_outputs_error(fleet, failed_at_write_time):
    assert failed_at_write_time["failed"].message.startswith("output: cannot write")


def test_storage_unavailable_reaches_the_producer_as_itself(fleet, proxy):
    job = s3_job(fleet, "class")
    proxy.fault("error")
    handle = submit(job, broker_url=fleet["url"])
    with pytest.raises(JobFailed):
        handle.wait(120)
    assert handle.status()["meta"]["error"] == "StorageUnavailable"


def test_multipart_output_whose_part_fails_is_aborted(fleet, proxy, monkeypatch):
    """boto3's managed upload (outputs over MULTIPART_THRESHOLD) aborts the upload when a part fails.

    In this process, against the same proxy: a 64 MiB output is too large for a CPU job, so
    the thresholds come down to moto's smallest part size (5 MiB) instead.
    """
    for name, value in {"AWS_ENDPOINT_URL": proxy.url, "MASKFLEET_S3_MAX_ATTEMPTS": str(ATTEMPTS),
                        "MASKFLEET_S3_READ_TIMEOUT": str(READ_TIMEOUT_S),
                        "MASKFLEET_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(objects, "MULTIPART_THRESHOLD", 5 << 20)
    monkeypatch.setattr(objects, "MULTIPART_CHUNKSIZE", 5 << 20)
    reset_s3_client()
    try:
        job = s3_job(fleet, "multipart")
        proxy.fault("error", match=r"^PUT \S*[?&]partNumber=2\b")
        with pytest.raises(StorageUnavailable, match=r"^output: cannot write .*SlowDown \(HTTP 503\), after retries"):
            objects.write_object(job["output"], bytes(11 << 20))
    finally:
        reset_s3_client()
    assert len(proxy.seen(r"^PUT \S*[?&]partNumber=2\b", "error")) == ATTEMPTS
    assert len(proxy.seen(r"^DELETE \S*[?&]uploadId=", "pass")) == 1  # AbortMultipartUpload
    assert leftovers(fleet, job) == {"objects": [], "uploads": []}


def test_the_worker_runs_the_next_job_normally_after_storage_faults(fleet, fault_free, proxy):
    job = s3_job(fleet, "after")
    result = submit(job, broker_url=fleet["url"]).wait(120)
    assert result["sha256"] == fault_free["sha256"]
    assert {s.action for s in proxy.seen()} <= {"pass"}
    assert retry_log_lines(fleet, job) == []
