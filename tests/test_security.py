"""Security of the fleet, end to end: real worker processes on a password-protected
redis-server of the test's own, a real S3-compatible server, a real HTTP receiver.

- Messages are JSON only: a pickled task message (what anyone who can write to the
  broker could send) is refused by the worker without being unpickled, is not
  redelivered, and the worker goes on; the client never unpickles a stored result.
- Secrets (the Redis password in the broker URL, AWS_SECRET_ACCESS_KEY,
  MASKFLEET_WEBHOOK_SECRET) appear in no worker log line (text or JSON format), no Redis
  value, no result and no webhook request, after a job that succeeds, one that fails on
  bad input and one whose S3 access fails; a callback URL's query (a token) is kept out
  of the worker's log lines.
- Webhooks of real jobs verify with the `standardwebhooks` package, and do not once a
  byte of the body, the timestamp or the id is changed.
- Redis with a password works, a wrong password is a clear error with nothing queued,
  and the worker's banner masks the password.

The container side (non-root user, no privilege escalation) is checked statically in
test_deploy_files.py.
"""
from __future__ import annotations

import base64
import json
import os
import pickle
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu.exceptions import DecodeError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from fleet_workers import Worker, stop_workers
from golden_jobs import IN_REPO_GOLDEN, make_models_dir, write_case_job
from maskfleet.client import JobFailed, _app, handle, submit
from maskfleet.tasks.redis_keys import submitted_key
from maskfleet.tasks.settings import TASK_NAME
from maskfleet.tasks.webhooks import load_secret
from redis_server import RedisServer
from webhook_receiver import clear_proxies

CASE = IN_REPO_GOLDEN / "cases" / "c03_euler_normal_s6_o0"
DEADLINE_S = 60.0


def _alnum_base64(n_bytes: int) -> str:
    """Base64 of random bytes with no '+', '/' or '=', so it reads the same in every log encoding."""
    while True:
        text = base64.b64encode(os.urandom(n_bytes)).decode()
        if text.isalnum():
            return text


REDIS_PASSWORD = "redispw" + secrets.token_hex(12)
AWS_SECRET = "awssecret" + secrets.token_hex(16)
WEBHOOK_SECRET = "whsec_" + _alnum_base64(24)
CALLBACK_TOKEN = "cbtoken" + secrets.token_hex(12)

# Every form a secret could take on the way out: the strings, the webhook key's base64 and its bytes.
SECRET_FORMS: dict[str, bytes] = {
    "redis password": REDIS_PASSWORD.encode(),
    "AWS secret": AWS_SECRET.encode(),
    "webhook secret": WEBHOOK_SECRET.encode(),
    "webhook secret base64": WEBHOOK_SECRET.removeprefix("whsec_").encode(),
    "webhook key hex": load_secret(WEBHOOK_SECRET).hex().encode(),
    "webhook key bytes": load_secret(WEBHOOK_SECRET),
}
FORMATS = ("text", "json")  # MASKFLEET_LOG_FORMAT of the two workers


def leaked(data: bytes | str) -> list[str]:
    """The names of the secrets found in `data`."""
    raw = data.encode() if isinstance(data, str) else data
    return [name for name, form in SECRET_FORMS.items() if form in raw]


class RawReceiver:
    """An HTTP server on 127.0.0.1 that keeps every request as sent: path, headers, body bytes.

    It verifies nothing itself, so the tests can check (and tamper with) exactly what came
    over the wire. ``statuses``: the answers to the next requests (then 200).
    """

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.statuses: list[int] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    receiver.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook?token={CALLBACK_TOKEN}"

    def of_job(self, job_id: str) -> list[tuple[str, dict[str, str], bytes]]:
        with self.lock:
            return [r for r in self.requests if json.loads(r[2])["data"].get("job_id") == job_id]

    def wait_final(self, job_id: str, kind: str, timeout: float = DEADLINE_S) -> list:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            seen = self.of_job(job_id)
            if any(json.loads(body)["type"] == kind for _, _, body in seen):
                return seen
            time.sleep(0.02)
        raise AssertionError(f"no {kind} webhook for {job_id}: {[json.loads(b)['type'] for _, _, b in self.of_job(job_id)]}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MarkerOnUnpickle:
    """Unpickling this creates `path` (open(path, "w")): a visible trace if anyone unpickles it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def queue_of(kind: str) -> str:
    return f"maskfleet.security.{kind}"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, s3_server):
    """Two workers (text and JSON logs) on a password-protected Redis, with every secret set."""
    root = tmp_path_factory.mktemp("security")
    server = RedisServer(root, password=REDIS_PASSWORD).start()
    url = server.url(0)
    hook = RawReceiver()
    allowed = f"127.0.0.1:{hook.port}"
    bucket = s3_server.make_bucket()
    models = make_models_dir(root)
    env = pytest.MonkeyPatch()
    workers: dict[str, Worker] = {}
    try:
        clear_proxies(env)
        env.setenv("MASKFLEET_CALLBACK_ALLOWLIST", allowed)  # this process submits callbacks to the receiver too
        common = {**s3_server.environment(), "AWS_SECRET_ACCESS_KEY": AWS_SECRET,  # moto takes any key
                  "MASKFLEET_WEBHOOK_SECRET": WEBHOOK_SECRET, "MASKFLEET_CALLBACK_ALLOWLIST": allowed,
                  "MASKFLEET_STORAGE_RETRIES": "0", "MASKFLEET_S3_MAX_ATTEMPTS": "2",
                  "MASKFLEET_TORCH_THREADS": "1"}
        for kind in FORMATS:
            workers[kind] = Worker(f"security-{kind}", [queue_of(kind)], url, models, root / f"worker-{kind}.log",
                                   extra_env={**common, "MASKFLEET_LOG_FORMAT": kind})
        app = _app(url)
        for worker in workers.values():
            worker.wait_ready(app)
        yield {"url": url, "server": server, "root": root, "app": app, "hook": hook, "bucket": bucket,
               "s3": s3_server, "workers": workers}
    finally:
        stop_workers(workers.values())
        env.undo()
        hook.close()
        server.stop()


def make_job(fleet, name: str, **changes) -> dict:
    job_path, _, _ = write_case_job(CASE, fleet["root"] / name)
    job = json.loads(job_path.read_text())
    job["job_id"] = f"sec-{name}-{time.time_ns()}"
    job["callback"] = {"url": fleet["hook"].url()}
    job.update(changes)
    return job


@pytest.fixture(scope="module")
def runs(fleet):
    """On each worker: a job that succeeds (S3 in and out), one with bad input, one whose S3 bucket is missing.

    The success job's first webhook is answered 500, so the worker logs a retry naming
    the callback URL (which must come without its query).
    """
    s3, bucket, hook = fleet["s3"].client, fleet["bucket"], fleet["hook"]
    out: dict[str, dict] = {}
    for kind in FORMATS:
        queue = queue_of(kind)
        ok = make_job(fleet, f"ok-{kind}", steps=2)
        s3.upload_file(ok["latent"].removeprefix("file://"), bucket, f"in-{kind}.latent")
        ok["latent"] = f"s3://{bucket}/in-{kind}.latent"
        ok["output"] = f"s3://{bucket}/out-{kind}.latent"
        with hook.lock:
            hook.statuses = [500]
        ok_result = submit(ok, broker_url=fleet["url"], queue=queue).wait(DEADLINE_S)
        hook.wait_final(ok["job_id"], "job.succeeded")

        bad = make_job(fleet, f"bad-{kind}")
        bad["mask"] = (fleet["root"] / "no-such-mask.safetensors").as_uri()
        with pytest.raises(JobFailed) as bad_failed:
            submit(bad, broker_url=fleet["url"], queue=queue).wait(DEADLINE_S)
        hook.wait_final(bad["job_id"], "job.failed")

        nos3 = make_job(fleet, f"nos3-{kind}")
        nos3["latent"] = f"s3://no-such-bucket-{secrets.token_hex(4)}/in.latent"
        with pytest.raises(JobFailed) as s3_failed:
            submit(nos3, broker_url=fleet["url"], queue=queue).wait(DEADLINE_S)
        hook.wait_final(nos3["job_id"], "job.failed")
        out[kind] = {"ok": (ok, ok_result), "bad": (bad, bad_failed.value), "nos3": (nos3, s3_failed.value)}
    return out


def test_leak_detector_finds_each_secret():
    for name, form in SECRET_FORMS.items():
        expected = [name, "webhook secret base64"] if name == "webhook secret" else [name]  # whsec_ + the base64
        assert leaked(b"log line " + form + b" more") == expected
    assert leaked("nothing here") == []


# --- the jobs themselves ---

def test_jobs_end_as_expected(fleet, runs):
    for kind in FORMATS:
        ok, result = runs[kind]["ok"]
        head = fleet["s3"].client.head_object(Bucket=fleet["bucket"], Key=f"out-{kind}.latent")
        assert result["output"] == ok["output"] and head["Metadata"]["sha256"] == result["sha256"]
        _, bad = runs[kind]["bad"]
        assert bad.state == "FAILURE" and bad.message.startswith("mask:") and "does not exist" in bad.message
        nos3_job, nos3 = runs[kind]["nos3"]
        assert nos3.state == "FAILURE" and nos3.message.startswith("latent:"), nos3.message
        assert nos3_job["latent"].split("/")[2] in nos3.message


# --- secrets ---

@pytest.mark.parametrize("kind", FORMATS)
def test_worker_log_holds_no_secret(fleet, runs, kind):
    text = fleet["workers"][kind].log.read_text()
    for job_kind in ("ok", "bad", "nos3"):  # the log covers all three jobs
        assert runs[kind][job_kind][0]["job_id"] in text
    if kind == "json":
        assert any(line.startswith("{") and json.loads(line)["logger"] for line in text.splitlines())
    assert leaked(text) == []


def test_redis_holds_no_secret(fleet, runs):
    conn = fleet["server"].client()
    dumped: list[bytes] = []
    keys = list(conn.scan_iter(count=1000))
    for key in keys:
        kind = conn.type(key).decode()
        if kind == "none":  # gone between SCAN and TYPE (kombu's unacked_mutex lives a moment)
            continue
        if kind == "string":
            values = [conn.get(key)]
        elif kind == "hash":
            values = [b for kv in conn.hgetall(key).items() for b in kv]
        elif kind == "list":
            values = conn.lrange(key, 0, -1)
        elif kind == "set":
            values = list(conn.smembers(key))
        elif kind == "zset":
            values = [member for member, _ in conn.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":  # the webhook dead letters
            values = [b for _, fields in conn.xrange(key) for kv in fields.items() for b in kv]
        else:
            raise AssertionError(f"unexpected Redis type {kind} of {key!r}")
        dumped += [key, *(v for v in values if v is not None)]
    blob = b"\n".join(dumped)
    for kind in FORMATS:  # the results of every job are among what was searched
        for job_kind in ("ok", "bad", "nos3"):
            assert f"celery-task-meta-{runs[kind][job_kind][0]['job_id']}".encode() in keys
    assert leaked(blob) == []


def test_results_hold_no_secret(fleet, runs):
    for kind in FORMATS:
        for job_kind in ("ok", "bad", "nos3"):
            job = runs[kind][job_kind][0]
            status = handle(job["job_id"], broker_url=fleet["url"]).status()
            assert status["state"] in ("SUCCESS", "FAILURE")
            assert leaked(json.dumps(status, default=str)) == []
            assert leaked(json.dumps(runs[kind][job_kind][1], default=lambda e: vars(e))) == []


def test_webhooks_hold_no_secret(fleet, runs):
    for kind in FORMATS:
        for job_kind in ("ok", "bad", "nos3"):
            requests = fleet["hook"].of_job(runs[kind][job_kind][0]["job_id"])
            assert requests
            for path, headers, body in requests:
                shown = {k: v for k, v in headers.items() if k != "webhook-signature"}
                assert leaked(path) == [] and leaked(json.dumps(shown)) == [] and leaked(body) == []


@pytest.mark.parametrize("kind", FORMATS)
def test_callback_query_is_not_logged(fleet, runs, kind):
    """The 500 on the success job's first webhook made the worker log a retry, naming the URL without its query."""
    text = fleet["workers"][kind].log.read_text()
    retries = [line for line in text.splitlines() if "webhook job.started" in line and "retry 1" in line]
    assert retries, text[-3000:]
    assert all(f"http://127.0.0.1:{fleet['hook'].port}/hook" in line for line in retries)
    assert CALLBACK_TOKEN not in text and "token=" not in text
    assert all(path.endswith(f"?token={CALLBACK_TOKEN}") for path, _, _ in fleet["hook"].requests)  # it was there to leak


def test_remote_control_replies_hold_no_secret(fleet):
    """What anyone on the broker can ask a worker (Flower does): its configuration, stats and bug report."""
    for worker in fleet["workers"].values():
        inspect = fleet["app"].control.inspect(destination=[worker.name], timeout=10)
        replies = {"conf": inspect.conf(with_defaults=True), "stats": inspect.stats(), "report": inspect.report()}
        for what, reply in replies.items():
            assert reply and worker.name in reply, (what, reply)
            assert leaked(json.dumps(reply, default=str)) == [], what
        assert replies["conf"][worker.name]["broker_url"] == f"redis://:********@127.0.0.1:{fleet['server'].port}/0"
        assert replies["stats"][worker.name]["broker"]["port"] == fleet["server"].port


# --- signatures ---

def test_webhooks_verify_and_tampering_fails(fleet, runs):
    checked = 0
    webhook = Webhook(WEBHOOK_SECRET)
    other = Webhook("whsec_" + _alnum_base64(24))
    for kind in FORMATS:
        for job_kind in ("ok", "bad", "nos3"):
            for _, headers, body in fleet["hook"].of_job(runs[kind][job_kind][0]["job_id"]):
                assert webhook.verify(body, headers)["data"]["job_id"] == runs[kind][job_kind][0]["job_id"]
                for i in (0, len(body) // 2, len(body) - 1):  # one byte changed, anywhere
                    tampered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]
                    with pytest.raises(WebhookVerificationError):
                        webhook.verify(tampered, headers)
                later = {**headers, "webhook-timestamp": str(int(headers["webhook-timestamp"]) + 1)}
                with pytest.raises(WebhookVerificationError):
                    webhook.verify(body, later)
                renamed = {**headers, "webhook-id": headers["webhook-id"] + "x"}
                with pytest.raises(WebhookVerificationError):
                    webhook.verify(body, renamed)
                with pytest.raises(WebhookVerificationError):
                    other.verify(body, headers)
                checked += 1
    assert checked >= 2 * 3 * 2  # started + final at least, of three jobs on two workers


# --- Redis password ---

@pytest.mark.parametrize("kind", FORMATS)
def test_banner_masks_redis_password(fleet, kind):
    text = fleet["workers"][kind].log.read_text()
    masked = f"redis://:**@127.0.0.1:{fleet['server'].port}/0"
    assert f"transport:   {masked}" in text and f"results:     {masked}" in text
    assert REDIS_PASSWORD not in text


def test_wrong_password_is_refused_and_nothing_is_queued(fleet):
    """With a job_id the client claims the id in Redis first: AUTH fails there, at once."""
    bad_url = fleet["url"].replace(REDIS_PASSWORD, "wrong" + secrets.token_hex(4))
    conn = fleet["server"].client()
    job = make_job(fleet, "wrong-password")
    with pytest.raises(redis.AuthenticationError, match="invalid username-password pair"):
        submit(job, broker_url=bad_url, queue=queue_of("text"))
    assert not conn.exists(submitted_key(job["job_id"]))
    assert conn.llen(queue_of("text")) == 0 and conn.hlen("unacked") == 0
    assert job["job_id"] not in fleet["workers"]["text"].log.read_text()


def test_wrong_password_without_job_id_is_a_clear_error(fleet):
    bad_url = fleet["url"].replace(REDIS_PASSWORD, "wrong" + secrets.token_hex(4))
    conn = fleet["server"].client()
    anonymous = {k: v for k, v in make_job(fleet, "wrong-password-noid").items() if k != "job_id"}
    started = time.monotonic()
    try:
        submit(anonymous, broker_url=bad_url, queue=queue_of("text"))
    except Exception as exc:  # noqa: BLE001 - which one is the point of the test
        error = exc
    else:
        raise AssertionError("submit with a wrong password succeeded")
    assert conn.llen(queue_of("text")) == 0 and conn.hlen("unacked") == 0  # nothing queued, whatever the error
    assert isinstance(error, redis.AuthenticationError), repr(error)
    assert time.monotonic() - started < 5


# --- pickle ---

def test_pickled_message_is_refused_and_the_worker_goes_on(fleet):
    marker = fleet["root"] / "unpickled-marker"
    worker = fleet["workers"]["text"]
    conn = fleet["server"].client()
    attacker = Celery("attacker", broker=fleet["url"])  # anyone who can write to the broker
    task_id = f"pickled-{time.time_ns()}"
    attacker.send_task(TASK_NAME, args=[MarkerOnUnpickle(marker)], task_id=task_id, queue=queue_of("text"),
                       serializer="pickle")
    attacker.close()

    refusal = "Refusing to deserialize untrusted content of type pickle (application/x-python-serialize)"
    end = time.monotonic() + DEADLINE_S
    while time.monotonic() < end:
        text = worker.log.read_text()
        if refusal in text and conn.llen(queue_of("text")) == 0 and conn.hlen("unacked") == 0:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"pickled message not refused and dropped:\n{worker.log.read_text()[-3000:]}")
    assert str(marker) in text[text.index(refusal):]  # the refused body it dumps is ours
    assert not marker.exists()
    assert not conn.exists(f"celery-task-meta-{task_id}")  # never ran
    assert conn.zcard("unacked_index") == 0

    after = make_job(fleet, "after-pickle", steps=1)
    assert submit(after, broker_url=fleet["url"], queue=queue_of("text")).wait(DEADLINE_S)["output"] == after["output"]
    assert worker.log.read_text().count("Received invalid task message") == 1  # refused once, not redelivered
    assert not marker.exists()


def test_client_does_not_unpickle_a_stored_result(fleet):
    marker = fleet["root"] / "client-unpickled-marker"
    task_id = f"pickled-result-{time.time_ns()}"
    assert fleet["app"].conf.result_accept_content == ["json"]
    payload = pickle.dumps({"status": "SUCCESS", "result": MarkerOnUnpickle(marker), "task_id": task_id,
                            "traceback": None, "children": []})
    fleet["server"].client().set(f"celery-task-meta-{task_id}", payload)
    with pytest.raises(DecodeError):
        handle(task_id, broker_url=fleet["url"]).status()
    assert not marker.exists()


# --- callback URLs ---

def test_callback_url_with_credentials_is_refused():
    """urllib would take 'user:pw@host' for the host name: such a URL could never be delivered."""
    from maskfleet.tasks.callback_policy import check_callback_url

    with pytest.raises(ValueError, match=r"^callback\.url: "):
        check_callback_url("http://user:pw@127.0.0.1:8080/hook", allowlist=["127.0.0.1"])
