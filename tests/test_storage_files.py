"""Local URIs, bounded reads and atomic writes (storage/file_uris.py)."""

import os
from pathlib import Path

import pytest

from local_xattrs import user_xattr_or_skip
from maskfleet.storage import InvalidFile, local_path, read_bytes, write_atomic


def test_invalid_file_carries_field_and_reason():
    err = InvalidFile("mask", "too big")
    assert (str(err), err.field, err.reason) == ("mask: too big", "mask", "too big")
    assert isinstance(err, ValueError)


def test_file_uri_is_percent_decoded():
    assert local_path("file:///tmp/my%20dir/x%23.latent", "latent") == Path("/tmp/my dir/x#.latent")
    assert local_path("file://localhost/tmp/a.png", "mask") == Path("/tmp/a.png")


def test_plain_paths_resolve_against_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert local_path("in/x.latent", "latent") == tmp_path / "in" / "x.latent"
    assert local_path("/abs/y.png", "mask") == Path("/abs/y.png")


@pytest.mark.parametrize("uri, words", [
    ("s3://bucket/x.latent", "s3:// URI, not a local file path"),
    ("http://example.com/x.png", "unsupported URI scheme 'http://'"),
    ("https://example.com/x.png", "unsupported URI scheme 'https://'"),
    ("file://otherhost/tmp/x.latent", "host 'otherhost'"),
    ("file:///tmp/x.latent?v=1", "query or fragment"),
    ("file:relative/x.latent", "absolute path"),
    ("", "empty"),
])
def test_local_path_rejects(uri, words):
    with pytest.raises(InvalidFile) as info:
        local_path(uri, "latent")
    assert info.value.field == "latent"
    assert words in info.value.reason


def test_write_atomic_creates_parents_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a" / "b" / "out.latent"
    write_atomic(target, b"hello")
    write_atomic(target, b"replaced")
    assert target.read_bytes() == b"replaced"
    assert os.listdir(target.parent) == ["out.latent"]


def test_write_atomic_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.latent"
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


def test_write_atomic_failed_replace_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "out.latent"
    target.write_bytes(b"old")

    def broken_replace(src, dst, **_dir_fds):
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(target, b"new")
    assert os.listdir(tmp_path) == ["out.latent"]
    assert target.read_bytes() == b"old"


def test_read_bytes_reads_within_cap(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"12345")
    assert read_bytes(path, "latent", max_bytes=5) == b"12345"


def test_read_bytes_size_cap_names_size_and_cap(tmp_path):
    path = tmp_path / "x.latent"
    path.write_bytes(b"x" * 11)
    with pytest.raises(InvalidFile) as info:
        read_bytes(path, "latent", max_bytes=10)
    assert "11 bytes" in info.value.reason and "10-byte" in info.value.reason


def test_read_bytes_missing_and_directory(tmp_path):
    with pytest.raises(InvalidFile, match="does not exist"):
        read_bytes(tmp_path / "nope", "mask", max_bytes=10)
    with pytest.raises(InvalidFile, match="not a regular file"):
        read_bytes(tmp_path, "mask", max_bytes=10)


def test_write_atomic_sets_xattrs_before_the_file_appears(tmp_path):
    target = tmp_path / "out.latent"
    write_atomic(target, b"data", xattrs={"user.sha256": b"abc123"})
    assert target.read_bytes() == b"data" and os.listdir(tmp_path) == ["out.latent"]
    stamped = user_xattr_or_skip(target)
    assert stamped == b"abc123"
