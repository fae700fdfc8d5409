"""Webhooks against a real HTTP receiver that verifies signatures with `standardwebhooks`,
and the callback URL policy."""

import logging
import os
import socket
import time
from datetime import datetime

import pytest
from maskfleet.tasks.callback_policy import allowlist_from_env, check_callback_url
from maskfleet.tasks.webhooks import WebhookSender, load_secret
from webhook_receiver import SECRET, clear_proxies

LOGGER = "maskfleet.tasks.webhooks"


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    clear_proxies(monkeypatch)
    monkeypatch.delenv("MASKFLEET_CALLBACK_ALLOWLIST", raising=False)


@pytest.fixture
def sender():
    made = []

    def make(**kwargs):
        options = {"secret": SECRET, "timeout": 3.0, "backoff": 0.05, "max_backoff": 0.2,
                   "deadline": 10.0, "progress_interval": 0.3}
        made.append(WebhookSender(**{**options, **kwargs}))
        return made[-1]

    yield make
    for s in made:
        s.close(timeout=1.0)


# --- signing and order ---

@pytest.mark.parametrize("secret", [SECRET, SECRET.removeprefix("whsec_"),
                                    os.urandom(32)], ids=["whsec", "bare-base64", "bytes"])
def test_events_arrive_in_order_with_valid_signatures(receivers, sender, secret):
    hook = receivers(secret=secret)
    out = sender(secret=secret)
    out.emit(hook.url, "started", {"job_id": "j1"})
    out.emit(hook.url, "progress", {"job_id": "j1", "step": 1, "total": 4})
    out.emit(hook.url, "job.succeeded", {"job_id": "j1", "output": "file:///o.safetensors"})
    assert out.flush(10)

    assert hook.bad == []
    assert hook.types() == ["job.started", "job.progress", "job.succeeded"]
    ids = [msg_id for msg_id, _, _ in hook.received]
    assert len(set(ids)) == 3
    for _, _, body in hook.received:
        assert body["data"]["job_id"] == "j1"
        assert datetime.fromisoformat(body["timestamp"]).tzinfo is not None
    assert hook.received[1][2]["data"]["step"] == 1


def test_secret_from_environment(monkeypatch, receivers):
    monkeypatch.setenv("MASKFLEET_WEBHOOK_SECRET", SECRET)
    hook = receivers()
    out = WebhookSender(backoff=0.05)
    out.emit(hook.url, "failed", {"job_id": "j1", "error": "steps: must be > 0"})
    assert out.close(10)
    assert hook.bad == [] and hook.types() == ["job.failed"]


def test_secret_errors(monkeypatch):
    monkeypatch.delenv("MASKFLEET_WEBHOOK_SECRET", raising=False)
    with pytest.raises(ValueError, match="MASKFLEET_WEBHOOK_SECRET is not set"):
        WebhookSender()
    with pytest.raises(ValueError, match="whsec_"):
        load_secret("whsec_a")  # one base64 character cannot decode
    with pytest.raises(ValueError, match="unknown webhook event"):
        WebhookSender(secret=SECRET).emit("http://127.0.0.1:1/", "finished", {})


# --- never blocking the caller ---

def test_emit_returns_at_once_when_receiver_is_slow(receivers, sender):
    hook = receivers(delay=1.0)
    out = sender()
    started = time.perf_counter()
    out.emit(hook.url, "started", {"job_id": "j1"})
    out.emit(hook.url, "succeeded", {"job_id": "j1"})
    assert time.perf_counter() - started < 0.05
    assert not out.flush(0.05)  # still being delivered
    assert out.flush(10)
    assert hook.types() == ["job.started", "job.succeeded"]


def test_emit_after_close_is_dropped(receivers, sender):
    hook = receivers()
    out = sender()
    out.emit(hook.url, "started", {"job_id": "j1"})
    assert out.close(10)
    out.emit(hook.url, "succeeded", {"job_id": "j1"})
    assert out.flush(1)
    assert hook.types() == ["job.started"]


# --- retries ---

@pytest.mark.parametrize("statuses", [[500, 500], [503], [429, 502]])
def test_retryable_answers_are_retried_with_the_same_id(receivers, sender, statuses):
    hook = receivers(statuses=statuses)
    out = sender()
    out.emit(hook.url, "started", {"job_id": "j1"})
    assert out.flush(10)
    assert len(hook.attempts) == len(statuses) + 1
    assert len({msg_id for msg_id, _ in hook.attempts}) == 1
    assert [(i, t) for i, t, _ in hook.received] == [hook.attempts[0]]


def test_receiver_down_then_up_gets_the_event(receivers, sender, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = sender(backoff=0.1, max_backoff=0.5, max_attempts=30, deadline=20.0)
    out.emit(f"http://127.0.0.1:{port}/hook", "started", {"job_id": "j1"})
    assert wait_until(lambda: any("retry" in r.getMessage() for r in caplog.records), 10)

    hook = receivers(port=port)
    assert out.flush(20)
    assert hook.bad == [] and hook.types() == ["job.started"]


def test_client_errors_are_not_retried(receivers, sender, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    hook = receivers(statuses=[400])
    out = sender()
    out.emit(hook.url, "started", {"job_id": "j1"})
    assert out.flush(10)
    assert len(hook.attempts) == 1 and hook.received == []
    assert any("dropped after 1 attempt" in r.getMessage() for r in caplog.records)
    assert not any("token=abc" in r.getMessage() for r in caplog.records)


def test_redirects_are_not_followed(receivers, sender):
    inner = receivers()
    hook = receivers(statuses=[307], redirect_to=inner.url)
    out = sender()
    out.emit(hook.url, "started", {"job_id": "j1"})
    assert out.flush(10)
    assert len(hook.attempts) == 1
    assert inner.attempts == []


def test_gives_up_after_max_attempts(receivers, sender):
    hook = receivers(statuses=[500] * 10)
    out = sender(max_attempts=3)
    out.emit(hook.url, "started", {"job_id": "j1"})
    out.emit(hook.url, "succeeded", {"job_id": "j1"})
    assert out.flush(10)
    assert [t for _, t in hook.attempts] == ["job.started"] * 3 + ["job.succeeded"] * 3


# --- filter and throttling ---

def test_events_filter_drops_unlisted_events(receivers, sender):
    hook = receivers()
    out = sender()
    wanted = ["started", "job.succeeded"]
    for event in ("started", "progress", "failed", "succeeded"):
        out.emit(hook.url, event, {"job_id": "j1"}, events_filter=wanted)
    assert out.flush(10)
    assert hook.types() == ["job.started", "job.succeeded"]


def test_progress_is_throttled_and_the_last_one_is_sent(receivers, sender):
    hook = receivers()
    out = sender(progress_interval=0.5)
    for step in range(10):
        out.emit(hook.url, "progress", {"job_id": "j1", "step": step})
    assert out.flush(10)
    steps = [body["data"]["step"] for _, _, body in hook.received]
    assert len(steps) <= 2
    assert steps[-1] == 9


def test_final_event_follows_throttled_progress(receivers, sender):
    hook = receivers()
    out = sender(progress_interval=5.0)
    out.emit(hook.url, "started", {"job_id": "j1"})
    for step in range(10):
        out.emit(hook.url, "progress", {"job_id": "j1", "step": step})
    out.emit(hook.url, "cancelled", {"job_id": "j1"})
    assert out.flush(3)  # the final event does not wait out the interval
    assert hook.types() == ["job.started", "job.progress", "job.progress", "job.cancelled"]
    assert [body["data"].get("step") for _, _, body in hook.received] == [None, 0, 9, None]


# --- callback URL policy ---

INTERNAL = ["http://127.0.0.1:8080/hook", "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:9000/", "http://10.0.0.1/", "http://localhost/",
            "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://224.0.0.1/",
            "https://192.168.1.10/", "http://[fe80::1]/", "http://240.0.0.1/"]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused(url):
    with pytest.raises(ValueError, match=r"^callback\.url: host .* resolves to .* address"):
        check_callback_url(url)


@pytest.mark.parametrize("url, entry", [
    ("http://127.0.0.1:8080/hook", "127.0.0.1"),
    ("http://169.254.169.254/latest/", "169.254.169.254"),
    ("http://[::1]:9000/", "::1"),
    ("http://[::1]:9000/", "[::1]:9000"),
    ("http://10.0.0.1/", "10.0.0.1:80"),
    ("https://LOCALHOST/", "localhost:443"),
])
def test_listed_hosts_are_allowed(url, entry):
    check_callback_url(url, allowlist=["example.org", entry])


def test_listed_port_is_the_only_one_allowed():
    check_callback_url("http://127.0.0.1:8080/", allowlist=["127.0.0.1:8080"])
    with pytest.raises(ValueError, match="loopback"):
        check_callback_url("http://127.0.0.1:8081/", allowlist=["127.0.0.1:8080"])


def test_allowlist_from_environment(monkeypatch):
    monkeypatch.setenv("MASKFLEET_CALLBACK_ALLOWLIST", " 127.0.0.1:8080, hooks.internal ,")
    assert allowlist_from_env() == ["127.0.0.1:8080", "hooks.internal"]
    check_callback_url("http://127.0.0.1:8080/hook")
    with pytest.raises(ValueError, match="169.254.169.254"):
        check_callback_url("http://169.254.169.254/")


@pytest.mark.parametrize("url", ["ftp://example.org/x", "file:///etc/passwd",
                                 "gopher://127.0.0.1:6379/", "example.org/hook"])
def test_other_schemes_are_refused(url):
    with pytest.raises(ValueError, match=r"^callback\.url: scheme .* use http or https"):
        check_callback_url(url, allowlist=["127.0.0.1", "example.org"])


def test_public_address_is_allowed_and_unresolvable_host_refused():
    check_callback_url("https://93.184.215.14/hook")
    check_callback_url("http://[2606:4700:4700::1111]:8443/hook")
    with pytest.raises(ValueError, match="does not resolve"):
        check_callback_url("https://no-such-host.invalid/hook")


def test_retry_after_is_read_in_both_forms():
    """A receiver's Retry-After as seconds or as an HTTP date (urllib3's parser); anything else: our own backoff."""
    from email.utils import formatdate

    from maskfleet.tasks.webhooks import _retry_after

    assert _retry_after("3") == 3
    in_a_minute = _retry_after(formatdate(time.time() + 60, usegmt=True))
    assert in_a_minute is not None and 55 <= in_a_minute <= 61
    assert _retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past: at once
    assert _retry_after("soon") is None and _retry_after(None) is None
