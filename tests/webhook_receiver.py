"""A real webhook receiver for the tests: an HTTP server on 127.0.0.1 that verifies every
request with the `standardwebhooks` package and records it.

Shared by the sender's own tests (test_webhooks.py), the fleet's (test_fleet_webhooks.py)
and the receiver-fault tests (test_fault_webhooks.py), which also need to know when each
attempt came in (``log``) to see the sender's backoff.
"""
from __future__ import annotations

import base64
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET = "whsec_" + base64.b64encode(os.urandom(24)).decode()
# Proxy settings under which the sender's POSTs to a loopback receiver would go to a proxy instead.
PROXY_ENV = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


def clear_proxies(monkeypatch) -> None:
    """Remove PROXY_ENV from the environment for the test (a pytest MonkeyPatch undoes it)."""
    for name in PROXY_ENV:
        monkeypatch.delenv(name, raising=False)


@dataclass(frozen=True)
class Attempt:
    """One verified request: when it arrived (time.monotonic()), its webhook-id, type and our answer."""

    at: float
    msg_id: str
    type: str
    status: int


class Receiver:
    """An HTTP server on 127.0.0.1 that checks every request's signature and records it.

    ``statuses``: the answers to the first requests (then 200). ``delay``: seconds it
    takes to answer each request (``delays``: for the first requests, then ``delay``).
    ``redirect_to``: the Location sent with a 3xx.
    """

    def __init__(self, secret=SECRET, port=0, statuses=(), delay=0.0, redirect_to=None, delays=()):
        self.webhook = Webhook(secret)
        self.statuses = list(statuses)
        self.delay = delay
        self.delays = list(delays)
        self.redirect_to = redirect_to
        self.attempts = []  # (webhook-id, type) of every request
        self.received = []  # (webhook-id, type, body) of the requests answered 2xx
        self.log: list[Attempt] = []  # every verified request, with its arrival time and answer
        self.bad = []       # requests whose signature or headers did not verify
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=abc"

    def types(self):
        with self.lock:
            return [event_type for _, event_type, _ in self.received]

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _handler_class(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                arrived = time.monotonic()
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver.lock:
                    delay = receiver.delays.pop(0) if receiver.delays else receiver.delay
                time.sleep(delay)  # the receiver being slow, not synchronisation
                try:
                    payload = receiver.webhook.verify(body, dict(self.headers))
                    assert self.headers["Content-Type"] == "application/json"
                except (WebhookVerificationError, AssertionError) as exc:
                    with receiver.lock:
                        receiver.bad.append(repr(exc))
                    self.send_response(401)
                    self.end_headers()
                    return
                msg_id = self.headers["webhook-id"]
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.attempts.append((msg_id, payload["type"]))
                    receiver.log.append(Attempt(arrived, msg_id, payload["type"], status))
                    if status < 300:
                        receiver.received.append((msg_id, payload["type"], payload))
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.redirect_to)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        return Handler
