"""The HTTP gateway end to end: a real `maskfleet gateway` (uvicorn) process, the run's Redis, a real
worker, requests over HTTP with httpx.

The worker and the gateway use the moto S3 server (tests/s3_server.py) for uploads and
outputs. Four API keys: two submitters (a, b: submit, read, cancel), a reader and an admin. Jobs
for the model `tiny` run on the worker; jobs for models no worker serves (`idle-*`) stay
queued, which is how queued jobs, cancelling them and a full queue (the gateway runs with
MASKFLEET_MAX_QUEUE_DEPTH=2) are tested.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from golden_jobs import IN_REPO_GOLDEN, fleet_job, make_models_dir, write_case_job
from metrics_scrape import free_port

from maskfleet.client import _app
from maskfleet.gateway.api_keys import new_key
from maskfleet.tasks.settings import model_queue
from fleet_workers import Gateway, Worker, claim_db_url, flush, require_redis, sse_events, wait_for

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"  # 6 steps
MAX_QUEUE_DEPTH = 2

require_redis()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, s3_server):
    root = tmp_path_factory.mktemp("gateway")
    url = claim_db_url()
    bucket = s3_server.make_bucket()
    tokens, entries = {}, []
    for name, scopes in (("a", "submit,read,cancel"), ("b", "submit,read,cancel"), ("reader", "read"), ("ops", "admin")):
        tokens[name], entry = new_key(name, scopes.split(","))
        entries.append(entry)
    (root / "keys.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))  # as `maskfleet api-key >>` writes
    worker = gateway = None
    try:
        worker = Worker("gateway", [model_queue("tiny")], url, make_models_dir(root), root / "worker.log")
        gateway = Gateway(free_port(), {"MASKFLEET_BROKER_URL": url, "MASKFLEET_RESULT_BACKEND": url,
                                        "MASKFLEET_API_KEYS_FILE": str(root / "keys.jsonl"),
                                        "MASKFLEET_MAX_QUEUE_DEPTH": str(MAX_QUEUE_DEPTH),
                                        "MASKFLEET_GATEWAY_LOCAL_FILES": "1",  # the golden case's files
                                        "MASKFLEET_UPLOAD_PREFIX": f"s3://{bucket}/uploads"}, root / "gateway.log")
        worker.wait_ready(_app(url))
        gateway.wait_ready()
        clients = {name: httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=90)
                   for name, token in tokens.items()}
        yield {"root": root, "gateway": gateway, "clients": clients, "url": url, "tokens": tokens, "bucket": bucket,
               "s3": s3_server}
        for client in clients.values():
            client.close()
    finally:
        for process in (gateway, worker):
            if process is not None:
                process.stop()
        flush(url)


def make_job(fleet, name: str, **changes) -> dict:
    return fleet_job(CASE, fleet["root"], name, **changes)


def idle(job: dict, model: str) -> dict:
    """The job sent to a model no worker serves: it stays queued."""
    job["base_sampler"]["model"] = job["mask_sampler"]["model"] = model
    return job


def test_submit_then_wait_for_the_result(fleet):
    a = fleet["clients"]["a"]
    job = make_job(fleet, "http-ok")
    created = a.post("/v1/jobs", json=job)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == f"/v1/jobs/{job['job_id']}"
    assert created.json()["state"] in ("queued", "running") and created.json()["links"]["events"].endswith("/events")
    done = a.get(created.headers["location"], headers={"Prefer": "wait=60"})
    assert done.status_code == 200 and done.headers["preference-applied"] == "wait=60"
    body = done.json()
    assert body["state"] == "succeeded" and body["result"]["shape"] == [1, 4, 32, 32] and body["submitted_at"] > 0
    # The same document again is the same job; another one under this id is a conflict.
    again = a.post("/v1/jobs", json=job)
    assert again.status_code == 200 and again.json()["result"]["sha256"] == body["result"]["sha256"]
    other = dict(job, seed=job["seed"] + 1)
    conflict = a.post("/v1/jobs", json=other)
    assert conflict.status_code == 409 and "job_id" in conflict.json()["error"]["message"]


def test_put_is_idempotent_and_prefer_wait_answers_with_the_finished_job(fleet):
    a = fleet["clients"]["a"]
    job = make_job(fleet, "http-put")
    job_id = job.pop("job_id")
    first = a.put(f"/v1/jobs/{job_id}", json=job, headers={"Prefer": "wait=60"})
    assert first.status_code == 201 and first.json()["state"] == "succeeded", first.text
    second = a.put(f"/v1/jobs/{job_id}", json=job)
    assert second.status_code == 200 and second.json()["result"] == first.json()["result"]
    mismatch = a.put(f"/v1/jobs/{job_id}-other", json=dict(job, job_id=job_id))
    assert mismatch.status_code == 422 and mismatch.json()["error"]["message"].startswith("job_id:")


def test_prefer_wait_that_passes_answers_202_with_the_job_as_it_stands(fleet):
    a = fleet["clients"]["a"]
    job = idle(make_job(fleet, "http-202"), "idle-wait")
    started = time.monotonic()
    answer = a.post("/v1/jobs", json=job, headers={"Prefer": "wait=1"})
    assert answer.status_code == 202 and answer.json()["state"] == "queued"
    assert time.monotonic() - started >= 1
    assert a.post(f"/v1/jobs/{job['job_id']}/cancel").json()["cancelled"] == "queued"


def test_cancel_queued_and_running(fleet):
    a = fleet["clients"]["a"]
    queued = idle(make_job(fleet, "http-cancel-queued"), "idle-cancel")
    assert a.post("/v1/jobs", json=queued).status_code == 201
    answer = a.post(f"/v1/jobs/{queued['job_id']}/cancel")
    assert answer.status_code == 200 and answer.json()["cancelled"] == "queued"
    assert answer.json()["state"] == "cancelled"

    running = make_job(fleet, "http-cancel-running", steps=2000)
    assert a.post("/v1/jobs", json=running).status_code == 201
    seen = wait_for(lambda: (v := a.get(f"/v1/jobs/{running['job_id']}").json())["state"] == "running"
                    and v.get("progress") and v, 60, "the long job running", poll=0.1)
    assert seen["progress"]["total"] == 2000
    answer = a.post(f"/v1/jobs/{running['job_id']}/cancel")
    assert answer.status_code == 200 and answer.json()["cancelled"] == "running"
    wait_for(lambda: a.get(f"/v1/jobs/{running['job_id']}").json()["state"] == "cancelled", 60, "cancelled")
    again = a.post(f"/v1/jobs/{running['job_id']}/cancel")
    assert again.status_code == 409 and "already cancelled" in again.json()["error"]["message"]
    assert a.post("/v1/jobs/never-submitted/cancel").status_code == 404


def test_a_full_queue_answers_429_with_retry_after(fleet):
    a = fleet["clients"]["a"]
    for i in range(MAX_QUEUE_DEPTH):
        assert a.post("/v1/jobs", json=idle(make_job(fleet, f"http-fill-{i}"), "idle-full")).status_code == 201
    full = a.post("/v1/jobs", json=idle(make_job(fleet, "http-over"), "idle-full"))
    assert full.status_code == 429 and int(full.headers["retry-after"]) > 0
    assert "MASKFLEET_MAX_QUEUE_DEPTH=2" in full.json()["error"]["message"]
    assert a.get("/v1/jobs/" + "http-over").status_code == 404  # nothing was recorded for it
    # Other queues still take jobs.
    other = idle(make_job(fleet, "http-other-queue"), "idle-other")
    assert a.post("/v1/jobs", json=other).status_code == 201


def test_bad_requests_name_the_problem(fleet):
    a = fleet["clients"]["a"]
    job = make_job(fleet, "http-bad")
    cases = [
        (a.post("/v1/jobs", json=dict(job, steps=0)), 422, "steps: "),
        (a.post("/v1/jobs", json=dict(job, colour="red")), 422, "colour: "),
        (a.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}), 422, "Invalid JSON"),
        (a.post("/v1/jobs", content=json.dumps(job), headers={"content-type": "text/plain"}), 415, "content-type"),
        (a.post("/v1/jobs", content=b"[" + b"0," * (1 << 20) + b"0]", headers={"content-type": "application/json"}),
         413, "cap"),
        (a.get("/v1/jobs/no%20spaces"), 422, "job_id: "),
        (a.get("/v1/jobs/never-submitted"), 404, "never-submitted"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, (status, response.text)
        assert words in response.json()["error"]["message"], response.text
    # The worker finds what the client cannot: FAILED with the field through HTTP.
    missing = dict(job, base_sampler=dict(job["base_sampler"], positive=job["base_sampler"]["positive"] + ".gone"))
    assert a.post("/v1/jobs", json=missing).status_code == 201
    failed = a.get(f"/v1/jobs/{job['job_id']}", headers={"Prefer": "wait=60"}).json()
    assert failed["state"] == "failed" and failed["error"]["type"] == "InvalidJob"
    assert failed["error"]["message"].startswith("base_sampler.positive")


def test_keys_and_scopes(fleet):
    clients = fleet["clients"]
    job = idle(make_job(fleet, "http-keys"), "idle-keys")
    gateway = fleet["gateway"].url
    assert httpx.post(gateway + "/v1/jobs", json=job).status_code == 401  # no key
    forged = httpx.post(gateway + "/v1/jobs", json=job, headers={"Authorization": "Bearer mf_forged"})
    assert forged.status_code == 401 and forged.headers["www-authenticate"] == "Bearer"
    assert clients["reader"].post("/v1/jobs", json=job).status_code == 403  # read scope only
    assert clients["a"].post("/v1/jobs", json=job).status_code == 201
    path = f"/v1/jobs/{job['job_id']}"
    assert clients["b"].get(path).status_code == 404  # another key's job does not exist for b
    assert clients["b"].post(path + "/cancel").status_code == 404
    assert clients["b"].post("/v1/jobs", json=job).status_code == 409  # nor can b take its id
    assert clients["reader"].get(path).status_code == 404
    assert clients["ops"].get(path).json()["state"] == "queued"  # admin sees every job
    assert clients["ops"].post(path + "/cancel").json()["cancelled"] == "queued"
    assert fleet["gateway"].log.read_text().count("mf_") == 0  # keys never logged


def test_health_readiness_and_openapi(fleet):
    gateway = fleet["gateway"].url
    assert httpx.get(gateway + "/healthz").json() == {"status": "ok"}
    assert httpx.get(gateway + "/readyz").json() == {"redis": "ok", "store": "ok"}
    spec = httpx.get(gateway + "/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    job_schema = spec["components"]["schemas"]["Job"]
    assert {"seed", "steps", "base_sampler", "mask_sampler"} <= set(job_schema["properties"])
    assert spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Job"}
    assert httpx.get(gateway + "/docs").status_code == 200


def test_the_gateway_refuses_to_start_without_keys_and_no_auth_binds_loopback_only(tmp_path):
    env = {**os.environ, "MASKFLEET_BROKER_URL": "redis://127.0.0.1:1/0"}
    env.pop("MASKFLEET_API_KEYS_FILE", None)
    no_keys = subprocess.run([sys.executable, "-m", "maskfleet.cli", "gateway", "--port", str(free_port())],
                             capture_output=True, text=True, env=env, timeout=60)
    assert no_keys.returncode == 2 and "MASKFLEET_API_KEYS_FILE" in no_keys.stderr
    public = subprocess.run([sys.executable, "-m", "maskfleet.cli", "gateway", "--insecure-no-auth", "--host", "0.0.0.0"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert public.returncode == 2 and "loopback only" in public.stderr
    (tmp_path / "keys.json").write_text(json.dumps([{"name": "x", "sha256": "abc", "scopes": ["read"]}]))
    bad_file = subprocess.run([sys.executable, "-m", "maskfleet.cli", "gateway"], capture_output=True, text=True,
                              env={**env, "MASKFLEET_API_KEYS_FILE": str(tmp_path / "keys.json")}, timeout=60)
    assert bad_file.returncode == 2 and "entry 0.sha256" in bad_file.stderr


def test_local_paths_are_refused_unless_the_gateway_accepts_them(fleet, tmp_path):
    """By default a job through HTTP names S3 objects only; the fleet here opted in (MASKFLEET_GATEWAY_LOCAL_FILES)."""
    from maskfleet.gateway.job_desk import JobDesk
    from maskfleet.gateway.api_keys import NO_AUTH
    from maskfleet.gateway.errors import ApiError
    from maskfleet.job import parse_job
    from maskfleet.settings import Settings

    job = parse_job(make_job(fleet, "http-local"))
    with pytest.raises(ApiError) as refused:
        JobDesk(Settings(broker_url=fleet["url"])).submit(job, NO_AUTH)
    assert refused.value.status == 422 and refused.value.message.startswith("latent: ")
    assert "s3://" in refused.value.message


def test_the_gateway_imports_no_engine():
    probe = ("import sys, maskfleet.gateway.app\n"
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'numpy', 'safetensors') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


def test_events_follow_a_job_to_its_end(fleet):
    a = fleet["clients"]["a"]
    job = make_job(fleet, "http-events")
    assert a.post("/v1/jobs", json=job).status_code == 201
    with a.stream("GET", f"/v1/jobs/{job['job_id']}/events") as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(response))
    ids = [i for i, _, _ in events]
    assert ids == sorted(set(ids)), ids  # each event newer than the last
    kinds = [kind for _, kind, _ in events]
    assert kinds[-1] == "succeeded" and set(kinds[:-1]) <= {"queued", "started", "progress"}, kinds
    progress = [data["progress"] for _, kind, data in events if kind == "progress"]
    assert progress and all(p["total"] == 6 for p in progress)
    assert events[-1][2]["result"]["sha256"]
    # The job has ended: a new stream sends the terminal event at once, and ends.
    with a.stream("GET", f"/v1/jobs/{job['job_id']}/events") as response:
        assert [(i, kind) for i, kind, _ in sse_events(response)] == [(events[-1][0], "succeeded")]


def test_events_resume_after_last_event_id_and_end_with_the_cancellation(fleet):
    a = fleet["clients"]["a"]
    job = make_job(fleet, "http-resume", steps=2000)
    assert a.post("/v1/jobs", json=job).status_code == 201
    path = f"/v1/jobs/{job['job_id']}/events"
    with a.stream("GET", path) as response:
        seen = list(sse_events(response, stop=lambda e: e[1] == "progress" and e[2]["progress"]["step"] >= 2))
    last = seen[-1][0]
    with a.stream("GET", path, headers={"Last-Event-ID": str(last)}) as response:
        resumed = sse_events(response)
        first = next(resumed)
        assert first[0] > last and first[1] == "progress"  # nothing older than what the client had
        assert a.post(f"/v1/jobs/{job['job_id']}/cancel").json()["cancelled"] == "running"
        rest = list(resumed)
    assert rest[-1][1] == "cancelled" and rest[-1][2]["state"] == "cancelled"
    assert fleet["clients"]["b"].get(path).status_code == 404  # another key's job has no events either


# A producer no one here wrote: curl and jq, from the upload to the downloaded output.
CURL_PRODUCER = r"""
set -euo pipefail
auth="Authorization: Bearer $KEY"
files='["in.latent", "mask.safetensors", "pos_base.safetensors", "neg_base.safetensors", "pos_mask.safetensors", "neg_mask.safetensors"]'
uploads=$(curl -sf -X POST "$GATEWAY/v1/uploads" -H "$auth" -H 'Content-Type: application/json' -d "{\"files\": $files}")
for name in $(echo "$files" | jq -r '.[]'); do
  curl -sf -X PUT --upload-file "$name" "$(echo "$uploads" | jq -r --arg n "$name" '.files[] | select(.name == $n) | .put_url')"
done
job=$(jq --argjson up "$uploads" --arg out "$OUTPUT" '
  def uri(n): $up.files[] | select(.name == n) | .uri;
  .latent = uri("in.latent") | .mask = uri("mask.safetensors") | .output = $out | del(.job_id)
  | .base_sampler.positive = uri("pos_base.safetensors") | .base_sampler.negative = uri("neg_base.safetensors")
  | .mask_sampler.positive = uri("pos_mask.safetensors") | .mask_sampler.negative = uri("neg_mask.safetensors")' job.json)
id=$(curl -sf -X POST "$GATEWAY/v1/jobs" -H "$auth" -H 'Content-Type: application/json' -d "$job" | jq -r .id)
curl -sfN -H "$auth" "$GATEWAY/v1/jobs/$id/events" > events.txt
curl -sf -H "$auth" "$GATEWAY/v1/jobs/$id?presign=true" > job-done.json
curl -sf -o out.latent "$(jq -r .downloads.output job-done.json)"
"""


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="the producer script needs curl and jq")
def test_a_curl_producer_uploads_submits_follows_and_downloads(fleet):
    work = fleet["root"] / "curl-producer"
    write_case_job(CASE, work)
    env = {**os.environ, "KEY": fleet["tokens"]["a"], "GATEWAY": fleet["gateway"].url,
           "OUTPUT": f"s3://{fleet['bucket']}/outputs/curl.latent"}
    script = subprocess.run(["bash", "-c", CURL_PRODUCER], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert script.returncode == 0, script.stderr
    events = (work / "events.txt").read_text()
    assert "event: started" in events or "event: progress" in events
    assert events.rstrip().split("\n")[-2] == "event: succeeded"  # the last event, then the stream ended
    done = json.loads((work / "job-done.json").read_text())
    assert done["state"] == "succeeded" and done["result"]["output"] == env["OUTPUT"]
    downloaded = (work / "out.latent").read_bytes()
    assert hashlib.sha256(downloaded).hexdigest() == done["result"]["sha256"]
    # The uploads sit under the prefix, in the key's own folder.
    keys = [o["Key"] for o in fleet["s3"].client.list_objects_v2(Bucket=fleet["bucket"], Prefix="uploads/a/")["Contents"]]
    assert len(keys) == 6


def test_uploads_refuse_names_that_are_not_plain_files(fleet):
    a = fleet["clients"]["a"]
    for files, words in (([], "files: "), (["../x.latent"], "plain file name"), (["x.exe"], "must end with"),
                         (["a.png", "a.png"], "unique")):
        answer = a.post("/v1/uploads", json={"files": files})
        assert answer.status_code == 422 and words in answer.json()["error"]["message"], answer.text
    assert fleet["clients"]["reader"].post("/v1/uploads", json={"files": ["a.png"]}).status_code == 403


def test_metrics_count_requests_by_route_and_status(fleet):
    a = fleet["clients"]["a"]
    before = httpx.get(fleet["gateway"].url + "/metrics").text
    assert a.get("/v1/jobs/never-submitted-metrics").status_code == 404
    text = httpx.get(fleet["gateway"].url + "/metrics").text
    line = 'maskfleet_gateway_requests_total{method="GET",route="/v1/jobs/{job_id}",status="404"}'
    count = {t.split(" ")[0]: float(t.split(" ")[1]) for t in text.splitlines() if t.startswith(line)}
    was = {t.split(" ")[0]: float(t.split(" ")[1]) for t in before.splitlines() if t.startswith(line)}
    assert count[line] == was.get(line, 0) + 1
    assert "never-submitted-metrics" not in text  # routes by template, not path
    assert "maskfleet_gateway_request_seconds_bucket" in text
    # Streams the earlier tests closed (one by the client, mid-stream) are no longer followed.
    wait_for(lambda: "maskfleet_gateway_sse_clients 0.0" in httpx.get(fleet["gateway"].url + "/metrics").text, 30,
             "no event stream open")
