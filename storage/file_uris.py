"""Local file access: turning job URIs into paths, bounded reads and atomic writes.

Jobs name files as ``file://`` URIs or plain paths. This module is where those names are
checked, where inputs are read with a size cap (a job must not make a worker read a
100 GB file into memory), and where outputs are written whole or not at all (temp file
in the same directory, fsync, ``os.replace``), so a consumer never sees half a latent.
"""

import os
import secrets
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .errors import InvalidFile

DEFAULT_MAX_INPUT_BYTES = 1 << 30
NAME_MAX = 255  # bytes in one path component on Linux filesystems (ext4, XFS, tmpfs, overlayfs)
_TEMP_TAIL = 1 + 16 + 4  # ".<16 hex digits>.tmp" after the name in a temporary file's name


def local_path(uri: str, field: str) -> Path:
    """Return the local path named by ``uri``.

    Accepts ``file:///abs/path`` (percent-decoded; host empty or ``localhost``) and plain
    absolute or relative paths (made absolute against the current directory). Any other
    scheme raises InvalidFile, ``s3://`` included: ``objects.py`` dispatches on the
    scheme and sends only local names here.
    """
    if not uri:
        raise InvalidFile(field, "empty path")
    try:
        parts = urlsplit(uri)
    except ValueError as e:  # "file://[" : an unclosed IPv6 host
        raise InvalidFile(field, f"{uri!r} is not a valid URI: {e}") from None
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidFile(
                field, f"file:// URI {uri!r} names host {parts.netloc!r}; only local files "
                "are supported (use file:///absolute/path)")
        if parts.query or parts.fragment:
            raise InvalidFile(
                field, f"file:// URI {uri!r} has a query or fragment; percent-encode "
                "'?' as %3F and '#' as %23 in file names")
        path = unquote(parts.path)
        if not path.startswith("/"):
            raise InvalidFile(field, f"file:// URI {uri!r} must hold an absolute path")
    elif "://" in uri:
        if scheme == "s3":
            reason = f"{uri!r} is an s3:// URI, not a local file path"
        else:
            reason = (f"unsupported URI scheme {parts.scheme + '://'!r}; "
                      "use an s3:// or file:// URI or a local path")
        raise InvalidFile(field, reason)
    else:
        path = uri
    if "\0" in path:
        raise InvalidFile(field, "path contains a NUL character")
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidFile(field, "path is not valid Unicode (it holds a lone surrogate)") from None
    for part in Path(path).parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise InvalidFile(
                field, f"path component {part[:40]!r}... is {len(os.fsencode(part))} bytes; "
                f"file and folder names hold at most {NAME_MAX}")
    return Path(path).absolute()


def resolve_path(path: Path, field: str) -> Path:
    """``path.resolve()``, with a symlink loop (RuntimeError) or an OS refusal as InvalidFile naming ``field``."""
    try:
        return path.resolve()
    except RuntimeError:
        raise InvalidFile(field, f"{path}: symlink loop") from None
    except OSError as e:
        raise InvalidFile(field, f"cannot resolve {path}: {e.strerror or e}") from None


def temp_name(name: str) -> str:
    """A fresh hidden name beside ``name`` for an atomic write, within NAME_MAX bytes.

    ``.<name>.<random>.tmp``, with ``name`` cut short when it is long: an output may use
    all 255 bytes of its own name without its temporary file going over.
    """
    room = NAME_MAX - 1 - _TEMP_TAIL
    stem = os.fsencode(name)[:room].decode(errors="ignore") if len(os.fsencode(name)) > room else name
    return f".{stem}.{secrets.token_hex(8)}.tmp"


def write_atomic(path: Path, data: bytes, xattrs: Mapping[str, bytes] | None = None,
                 open_dir: Callable[[], int] | None = None) -> None:
    """Write ``data`` to ``path`` whole or not at all, creating parent directories.

    The bytes go to a temporary file next to ``path``, are fsynced, then renamed over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched.
    ``xattrs`` (such as ``{"user.sha256": b"..."}``) are set on the temporary file before
    the rename, so the file appears with them; best effort: skipped where the filesystem
    or platform has no extended attributes. Everything happens relative to one descriptor
    of the parent directory: ``open_dir`` gives it (allowed_roots.open_confined, which
    creates the parents without following links), else a plain open after mkdir -p.
    """
    if open_dir is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        dir_fd = open_dir()
    try:
        tmp = temp_name(path.name)
        # O_EXCL with mode 0o666 so the final file gets the usual umask permissions.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                for name, value in (xattrs or {}).items():
                    _set_xattr(f.fileno(), name, value)
                os.fsync(f.fileno())
            os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            raise
        try:  # make the rename durable; best effort where directories cannot be synced
            os.fsync(dir_fd)
        except OSError:
            pass
    finally:
        os.close(dir_fd)


def _set_xattr(fd: int, name: str, value: bytes) -> None:
    setxattr = getattr(os, "setxattr", None)  # Linux only
    if setxattr is None:
        return
    try:
        setxattr(fd, name, value)
    except OSError:  # ENOTSUP, or a filesystem mounted without user xattrs
        pass


def read_bytes(path: Path, field: str, max_bytes: int = DEFAULT_MAX_INPUT_BYTES,
               open_file: Callable[[], int] | None = None) -> bytes:
    """Read a whole regular file, refusing missing files and files over ``max_bytes``.

    ``open_file`` gives the descriptor (allowed_roots.open_confined); else a plain open.
    The checks are made on the open file (fstat), so they hold for the bytes read.
    """
    try:
        fd = open_file() if open_file is not None else os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InvalidFile(field, f"{path} does not exist") from None
    except OSError as e:
        raise InvalidFile(field, f"cannot access {path}: {e.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidFile(field, f"{path} is not a regular file")
        raise InvalidFile(field, f"{path} is {info.st_size} bytes, over the {max_bytes}-byte input cap")
    with os.fdopen(fd, "rb") as f:
        try:
            # Read what fstat() saw (+1 byte to notice growth), not up to the cap: read(n)
            # reserves n bytes first, a gigabyte per input against the worker's memory limit.
            data = f.read(info.st_size + 1)
        except OSError as e:
            raise InvalidFile(field, f"cannot read {path}: {e.strerror}") from None
    if len(data) > info.st_size:  # the file grew after fstat(): being written, not an input yet
        raise InvalidFile(field, f"{path} changed while it was read")
    return data
