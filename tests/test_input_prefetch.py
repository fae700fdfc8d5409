"""Inputs read ahead (tasks/input_prefetch.py): the pieces on the moto S3 server, then a real worker.

A worker with MASKFLEET_PREFETCH_JOBS=1 holds the next job while it runs one and reads
that job's S3 inputs meanwhile; the child that runs it takes the bytes instead of
reading S3 again. Outputs must be bitwise what a job that read its own inputs writes,
and nothing read ahead may outlive the worker.
"""
from __future__ import annotations

import hashlib
import json
import time

import pytest
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, upload_case_inputs

from maskfleet.client import _app, submit
from maskfleet.storage import objects
from maskfleet.storage.file_uris import DEFAULT_MAX_INPUT_BYTES
from maskfleet.storage.prefetched_objects import served, serving
from maskfleet.tasks import input_prefetch
from maskfleet.tasks.settings import model_queue
from fleet_workers import Worker, claim_db_url, flush, require_redis

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"


@pytest.fixture(scope="module")
def s3_job(s3_server, tmp_path_factory):
    bucket = s3_server.make_bucket()
    job = upload_case_inputs(s3_server.client, bucket, tmp_path_factory.mktemp("prefetch-inputs"), CASE)
    return {"bucket": bucket, "job": job}


def test_s3_inputs_are_the_s3_uris_of_latent_mask_and_conditioning_files(s3_job):
    job = json.loads(json.dumps(s3_job["job"]))
    job["mask_sampler"]["negative"] = {"prompt": "text is encoded, not read"}
    job["base_sampler"]["positive"] = "/local/files/are/read/where/they/lie.safetensors"
    inputs = input_prefetch.s3_inputs(job)
    assert set(inputs) == {"latent", "mask", "base_sampler.negative", "mask_sampler.positive"}
    assert all(uri.startswith("s3://") for uri in inputs.values())
    assert input_prefetch.s3_inputs({"steps": "not a job"}) == {}


def test_read_ahead_then_take_gives_the_bytes_once(s3_job, tmp_path):
    inputs = input_prefetch.s3_inputs(s3_job["job"])
    missing = f"s3://{s3_job['bucket']}/in/missing.latent"
    assert input_prefetch.read_ahead(tmp_path, "task-1", {**inputs, "extra": missing})
    assert [p.name for p in tmp_path.iterdir()] == ["task-1"]  # the partial folder was renamed, nothing else left
    got = input_prefetch.take(tmp_path, "task-1")
    assert set(got) == set(inputs.values())  # the missing object is left for the job's own read to report
    for uri, data in got.items():
        assert data == objects.read_object(uri, "x")
    assert list(tmp_path.iterdir()) == []
    assert input_prefetch.take(tmp_path, "task-1") == {}


def test_nothing_readable_leaves_no_folder(s3_job, tmp_path):
    assert not input_prefetch.read_ahead(tmp_path, "t", {"latent": f"s3://{s3_job['bucket']}/in/nope.latent"})
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_folders_of_jobs_no_longer_held(tmp_path):
    for name in ("held", "gone", ".partial-being-written"):
        (tmp_path / name).mkdir()
    input_prefetch.sweep(tmp_path, {"held"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-being-written", "held"]


def test_read_object_serves_bytes_read_ahead_for_s3_uris_only(s3_job, tmp_path):
    uri = s3_job["job"]["latent"]
    local = tmp_path / "x.latent"
    local.write_bytes(b"on disk")
    with serving({uri: b"read ahead", str(local): b"never served"}):
        assert objects.read_object(uri, "latent") == b"read ahead"
        assert objects.read_object(str(local), "latent") == b"on disk"
        assert served(uri, max_bytes=3) is None  # over the reader's cap: the real read refuses it
    assert served(uri, DEFAULT_MAX_INPUT_BYTES) is None
    assert objects.read_object(uri, "latent") != b"read ahead"


def test_a_worker_reads_held_jobs_inputs_ahead_and_writes_the_same_outputs(s3_server, s3_job, tmp_path):
    require_redis()
    url = claim_db_url()
    scratch = tmp_path / "worker-tmp"
    scratch.mkdir()
    worker = Worker("prefetch", [model_queue("tiny")], url, make_models_dir(tmp_path), tmp_path / "worker.log",
                    {**s3_server.environment(), "MASKFLEET_PREFETCH_JOBS": "1", "MASKFLEET_TORCH_THREADS": "1",
                     "MASKFLEET_METRICS_PORT": "0", "TMPDIR": str(scratch)})
    try:
        worker.wait_ready(_app(url))
        stamp = time.time_ns()
        jobs = [dict(s3_job["job"], job_id=f"ahead-{stamp}-{i}", output=f"s3://{s3_job['bucket']}/out/{stamp}-{i}.latent",
                     steps=2) for i in range(4)]
        results = [h.wait(120) for h in [submit(job, broker_url=url) for job in jobs]]
    finally:
        worker.stop()
        flush(url)
    log = (tmp_path / "worker.log").read_text()
    read_ahead = [line for line in log.splitlines() if "inputs read ahead" in line]
    assert len(read_ahead) >= 2, log[-3000:]  # the jobs queued behind the first one (timing may spare one)
    distinct = len(set(input_prefetch.s3_inputs(s3_job["job"]).values()))
    assert all(f"{distinct} inputs read ahead" in line for line in read_ahead), read_ahead
    outputs = [s3_server.client.get_object(Bucket=s3_job["bucket"], Key=r["output"].split("/", 3)[3])["Body"].read()
               for r in results]
    assert len({hashlib.sha256(o).hexdigest() for o in outputs}) == 1  # same job, read ahead or not: same bytes
    assert {r["sha256"] for r in results} == {hashlib.sha256(outputs[0]).hexdigest()}
    assert [p.name for p in scratch.iterdir() if p.name.startswith("maskfleet-prefetch-")] == []


def test_a_task_id_that_is_not_a_plain_name_is_never_used_as_a_path(s3_job, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    inputs = input_prefetch.s3_inputs(s3_job["job"])
    for task_id in ("../outside", "a/b", "", ".hidden"):
        assert not input_prefetch.read_ahead(root, task_id, inputs)
        assert input_prefetch.take(root, task_id) == {}
    assert list(root.iterdir()) == [] and (tmp_path / "outside").exists()
