"""A TCP fault proxy of the tests' own, between boto3 and the S3 test server.

The fault tests point a worker's ``AWS_ENDPOINT_URL`` at this proxy and switch faults
on and off while the worker runs, so the worker meets the failures a real network and a
real store produce (connections reset, requests that never get an answer, 503 Slow Down)
through its real botocore stack, with nothing patched in the worker.

The proxy reads just enough HTTP to fault one request and not another: each client
connection carries exactly one request. It is forwarded upstream with ``Connection:
close`` and its answer comes back with ``Connection: close``, so urllib3 opens a fresh
connection for the next request and every request meets the rules. A rule applies to
requests whose request line (``PUT /bucket/out/x.latent HTTP/1.1``) matches its
pattern, for its first ``count`` matches and/or until its ``seconds`` run out:

- ``drop``: the connection is reset (RST) as soon as the request head arrived;
- ``delay``: the request is held without an answer for ``hold`` seconds (past the
  client's read timeout), then the connection is closed; it never reaches the store
  (a PUT with ``Expect: 100-continue`` gets its ``100 Continue``, as from a store, and
  then waits for an answer that does not come);
- ``error``: answered ``HTTP/1.1 <status>`` with an S3 XML error (503 SlowDown by
  default) and ``Connection: close``; it never reaches the store;
- ``cut``: forwarded, but the answer is cut off ``hold`` bytes into its body (a
  download whose connection drops half-way: botocore does not retry the body).

Every request is recorded with what was done to it (``requests``), so a test can count
the attempts botocore made and the task's retries.
"""
from __future__ import annotations

import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

IO_TIMEOUT_S = 30.0
MAX_HEAD = 64 << 10
ACTIONS = ("drop", "delay", "error", "cut")
_REASONS = {500: "Internal Server Error", 502: "Bad Gateway", 503: "Slow Down", 504: "Gateway Timeout"}
_CODES = {500: "InternalError", 502: "BadGateway", 503: "SlowDown", 504: "GatewayTimeout"}


@dataclass
class Rule:
    """One fault; ``hits`` counts the requests it was applied to."""

    action: str
    pattern: re.Pattern | None = None
    count: int | None = None
    until: float | None = None  # time.monotonic() after which it no longer applies
    hold: float = 0.0
    status: int = 503
    hits: int = 0

    def applies(self, request_line: str, now: float) -> bool:
        if self.count is not None and self.hits >= self.count:
            return False
        if self.until is not None and now >= self.until:
            return False
        return self.pattern is None or self.pattern.search(request_line) is not None


@dataclass(frozen=True)
class Seen:
    """A request that reached the proxy: when (monotonic), its method and target, and what was done."""

    at: float
    method: str
    target: str
    action: str  # "pass" or one of ACTIONS


@dataclass
class FaultProxy:
    """A running proxy to ``upstream`` (host, port); ``url`` is what boto3 should use."""

    upstream: tuple[str, int]
    rules: list[Rule] = field(default_factory=list)
    requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        self._listener.settimeout(0.1)
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- switching faults ---

    def fault(self, action: str, *, match: str | None = None, count: int | None = None,
              seconds: float | None = None, hold: float = 0.0, status: int = 503) -> Rule:
        """Add a rule (see the module docstring); the first rule that applies to a request wins."""
        if action not in ACTIONS:
            raise ValueError(f"unknown fault {action!r}; expected one of {ACTIONS}")
        rule = Rule(action, re.compile(match) if match else None, count,
                    None if seconds is None else time.monotonic() + seconds, hold, status)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Back to passing everything through."""
        with self._lock:
            self.rules.clear()

    def reset(self) -> None:
        """No rules and an empty request log, as for a new test."""
        with self._lock:
            self.rules.clear()
            self.requests.clear()

    def seen(self, match: str | None = None, action: str | None = None) -> list[Seen]:
        """Recorded requests whose ``METHOD target`` matches ``match`` and whose action is ``action``."""
        pattern = re.compile(match) if match else None
        with self._lock:
            return [s for s in self.requests
                    if (pattern is None or pattern.search(f"{s.method} {s.target}"))
                    and (action is None or s.action == action)]

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- serving ---

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _pick(self, request_line: str) -> Rule | None:
        now = time.monotonic()
        method, _, rest = request_line.partition(" ")
        with self._lock:
            rule = next((r for r in self.rules if r.applies(request_line, now)), None)
            if rule is not None:
                rule.hits += 1
            self.requests.append(Seen(now, method, rest.rpartition(" ")[0],
                                      "pass" if rule is None else rule.action))
        return rule

    def _serve(self, client: socket.socket) -> None:
        with client:
            client.settimeout(IO_TIMEOUT_S)
            try:
                head, rest = _read_head(client)
                if head is None:
                    return
                rule = self._pick(head.split(b"\r\n", 1)[0].decode("latin-1"))
                if rule is None or rule.action == "cut":
                    self._forward(client, head, rest, None if rule is None else int(rule.hold))
                elif rule.action == "drop":
                    _reset(client)
                elif rule.action == "delay":
                    if b"100-continue" in head.lower():  # as the store would: the body comes, no answer does
                        client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    self._stopping.wait(rule.hold)
                else:
                    if b"100-continue" not in head.lower():
                        _drain_body(client, head, rest)
                    client.sendall(_error_response(rule.status, head.startswith(b"HEAD ")))
            except OSError:
                pass  # the client gave up (its timeout) or the proxy is closing

    def _forward(self, client: socket.socket, head: bytes, rest: bytes, cut: int | None = None) -> None:
        with socket.create_connection(self.upstream, timeout=IO_TIMEOUT_S) as upstream:
            upstream.sendall(_connection_close(head) + rest)
            pump = threading.Thread(target=_pump, args=(client, upstream), daemon=True)
            pump.start()  # the request body, and whatever follows an Expect: 100-continue
            buffered = b""
            while True:  # 1xx heads pass as they are; the final head gets Connection: close
                response, buffered = _read_head(upstream, buffered)
                if response is None:
                    return
                if not response.startswith(b"HTTP/1.1 1"):
                    client.sendall(_connection_close(response) + buffered[:cut])
                    break
                client.sendall(response + b"\r\n\r\n")
            if cut is None:
                _pump(upstream, client)
                return
            sent = len(buffered)
            while sent < cut and (chunk := upstream.recv(65536)):
                client.sendall(chunk[:cut - sent])
                sent += len(chunk)
            _reset(client)


def _read_head(sock: socket.socket, data: bytes = b"") -> tuple[bytes | None, bytes]:
    """(head without its final CRLFCRLF, bytes read past it); (None, b"") on EOF before a head."""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEAD:
            raise OSError("head too large")
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def _connection_close(head: bytes) -> bytes:
    lines = [line for line in head.split(b"\r\n")
             if not line.lower().startswith((b"connection:", b"keep-alive:"))]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _header(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def _drain_body(sock: socket.socket, head: bytes, rest: bytes) -> None:
    """Read the request body, so that closing after an answer does not reset the connection."""
    length = _header(head, b"content-length")
    if length is not None:
        remaining = int(length) - len(rest)
        while remaining > 0:
            chunk = sock.recv(min(remaining, 65536))
            if not chunk:
                return
            remaining -= len(chunk)
    elif (_header(head, b"transfer-encoding") or b"").lower() == b"chunked":
        data = rest
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                return
            data = data[-8:] + chunk


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    try:
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER on, zero timeout), as a crashed peer or a middlebox does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _error_response(status: int, head_request: bool) -> bytes:
    code = _CODES.get(status, "InternalError")
    body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + code.encode()
            + b"</Code><Message>injected by the test's fault proxy</Message>"
            b"<RequestId>fault-proxy</RequestId></Error>")
    head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()
    return head if head_request else head + body
