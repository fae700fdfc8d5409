"""Which callback URLs a job may name: no requests to internal or metadata addresses.

A job's ``callback.url`` comes from whoever submits the job, and the worker that
posts to it sits inside our network. Without a check, a job could make the worker
call the cloud metadata service (169.254.169.254), Redis, or anything else on a
private network. So a callback host must resolve, and every address it resolves
to must be a public one, unless an operator lists the host in
``MASKFLEET_CALLBACK_ALLOWLIST`` (comma-separated ``host`` or ``host:port``;
IPv6 as ``[::1]:8080`` or bare ``::1``).

The check runs when a job is submitted and again when it runs; the webhook sender
itself does not follow redirects, so a public receiver cannot bounce it inward.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from ..settings import load_settings, variable

ALLOWLIST_ENV = variable("callback_allowlist")
DEFAULT_PORTS = {"http": 80, "https": 443}

# (property of ipaddress.IPv4Address/IPv6Address, what we call it in the error)
_REFUSED_KINDS = (
    ("is_unspecified", "unspecified"),
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local (cloud metadata lives here)"),
    ("is_private", "private"),
    ("is_multicast", "multicast"),
    ("is_reserved", "reserved"),
)


def allowlist_from_env() -> list[str]:
    """The entries of ``MASKFLEET_CALLBACK_ALLOWLIST`` (empty when unset)."""
    raw = load_settings().callback_allowlist
    return [entry.strip() for entry in raw.split(",") if entry.strip()]


def check_callback_url(url: str, allowlist: list[str] | None = None) -> None:
    """Raise ``ValueError("callback.url: ...")`` unless ``url`` may receive callbacks.

    ``allowlist`` defaults to :func:`allowlist_from_env`.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"callback.url: scheme {parts.scheme or '(none)'!r} is not allowed, "
                         "use http or https")
    host = (parts.hostname or "").lower()
    if not host:
        raise ValueError(f"callback.url: {url!r} has no host")
    if parts.username is not None or parts.password is not None:
        # urllib would take "user:pw@host" for the host name: never deliverable.
        raise ValueError("callback.url: user:password@ is not supported; put a token in the path or query")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError as exc:  # a port that is not a number or out of range
        raise ValueError(f"callback.url: {exc}") from None

    addresses = _resolve(host, port)
    if _is_listed(host, port, allowlist_from_env() if allowlist is None else allowlist):
        return
    for address in addresses:
        reason = _refusal(address)
        if reason:
            raise ValueError(
                f"callback.url: host {host!r} resolves to {address}, a {reason} address; "
                f"list the host in {ALLOWLIST_ENV} to allow it")


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"callback.url: host {host!r} does not resolve ({exc})") from None
    # Drop an IPv6 zone ("fe80::1%eth0") before parsing.
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def _refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is internal, or None for a public address."""
    # ::ffff:127.0.0.1 reaches 127.0.0.1: judge the IPv4 address inside.
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    for attribute, name in _REFUSED_KINDS:
        if getattr(address, attribute):
            return name
    return None


def _is_listed(host: str, port: int, allowlist: list[str]) -> bool:
    for entry in allowlist:
        listed_host, listed_port = _parse_entry(entry)
        if listed_host == host and listed_port in (None, port):
            return True
    return False


def _parse_entry(entry: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 -> (host, port or None)."""
    entry = entry.strip().lower()
    try:
        if entry.startswith("["):
            host, _, rest = entry[1:].partition("]")
            return host, int(rest[1:]) if rest.startswith(":") else None
        if entry.count(":") == 1:
            host, _, port = entry.partition(":")
            return host, int(port)
    except ValueError:
        raise ValueError(f"{ALLOWLIST_ENV}: bad entry {entry!r}, "
                         "expected host or host:port") from None
    return entry, None
