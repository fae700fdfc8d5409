"""The gateway's API keys: bearer tokens kept only as their SHA-256, each with scopes.

The key file (MASKFLEET_API_KEYS_FILE) holds `{"name", "sha256", "scopes"}` entries, as a
JSON list or one per line; `maskfleet api-key NAME --scopes submit,read >> keys.jsonl`
prints a fresh key once (stderr) and appends its entry. A request's token is hashed and compared with every entry by `hmac.compare_digest`
(no early exit), so neither the token nor a timing difference leaves the process; tokens
are never logged. Scopes: submit, read, cancel, and admin, which sees and cancels every
job (the others only the jobs their key submitted).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

Scope = Literal["submit", "read", "cancel", "admin"]
SCOPES: tuple[str, ...] = Scope.__args__
TOKEN_PREFIX = "mf_"


class ApiKey(BaseModel):
    """One entry of the key file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the token")
    scopes: frozenset[Scope]

    @property
    def admin(self) -> bool:
        return "admin" in self.scopes

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or self.admin


# The caller when the gateway runs with --insecure-no-auth (loopback only): may do everything.
NO_AUTH = ApiKey(name="local", sha256="0" * 64, scopes=frozenset(SCOPES))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_key(name: str, scopes: list[str]) -> tuple[str, dict]:
    """A fresh token and its key file entry (the token is shown once and stored nowhere)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entry = ApiKey(name=name, sha256=token_hash(token), scopes=frozenset(scopes))
    return token, {"name": entry.name, "sha256": entry.sha256, "scopes": sorted(entry.scopes)}


def load_keys(path: str | Path) -> tuple[ApiKey, ...]:
    """The key file's entries; ValueError naming the file and the entry when it is not a valid key list."""
    try:
        text = Path(path).read_text()
        data = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines()
                                                                          if line.strip()]
        entries = TypeAdapter(list[ApiKey]).validate_python(data)
    except OSError as e:
        raise ValueError(f"MASKFLEET_API_KEYS_FILE: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"MASKFLEET_API_KEYS_FILE: {path} is not JSON: {e}") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"MASKFLEET_API_KEYS_FILE: {path}: entry {where}: {first['msg']}") from None
    if not entries:
        raise ValueError(f"MASKFLEET_API_KEYS_FILE: {path} holds no keys")
    names = [k.name for k in entries]
    if len(set(names)) != len(names):
        raise ValueError(f"MASKFLEET_API_KEYS_FILE: {path}: key names must be unique")
    return tuple(entries)


def find_key(keys: tuple[ApiKey, ...], token: str) -> ApiKey | None:
    """The entry whose hash is the token's, comparing with every entry in constant time."""
    digest = token_hash(token).encode()
    found = None
    for key in keys:
        if hmac.compare_digest(digest, key.sha256.encode()):
            found = key
    return found
