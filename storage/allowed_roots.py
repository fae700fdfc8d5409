"""Confining a worker's local reads and writes to configured directories.

A job names its files; on a shared worker it must not be able to read ``/etc/shadow`` or
overwrite a model. When ``MASKFLEET_ALLOWED_ROOTS`` is set (absolute directories,
colon-separated), every local path a job reads or writes must lie inside one of them
once symlinks are resolved; set but empty, no local path is allowed at all (an S3-only
worker). Unset, nothing is confined: the local CLI runs the user's own jobs.

The check resolves the path; the I/O then opens what the check resolved with
`open_confined`, one component at a time from the root's directory, never following a
symlink (O_NOFOLLOW) and never leaving the directory it is in: a symlink swapped into
the path between the check and the open (by whoever else can write under a root) makes
the open fail instead of escaping the root.
"""

import errno
import os
import stat
from pathlib import Path

from ..settings import load_settings, variable
from .errors import InvalidFile
from .file_uris import resolve_path

ROOTS_ENV = variable("allowed_roots")


def allowed_roots() -> list[Path] | None:
    """The resolved roots from the environment, or None when confinement is off."""
    value = load_settings().allowed_roots
    if value is None:
        return None
    roots = []
    for entry in filter(None, value.split(":")):
        if not os.path.isabs(entry):
            raise ValueError(f"{ROOTS_ENV}: {entry!r} is not an absolute path")
        roots.append(Path(entry).resolve())
    return roots


def confine(path: Path, field: str, writing: bool = False) -> Path:
    """Return where ``path`` really reads from (or writes to), checked against the roots.

    For reads every symlink is resolved. For writes the parent directory is resolved and
    the name kept: the atomic rename replaces a symlink at the final name rather than
    following it. Callers should use the returned path, so the check and the I/O agree.
    Without confinement ``path`` is returned as given.
    """
    if writing and path.name in ("", ".."):
        raise InvalidFile(field, f"{path} does not name a file")
    roots = allowed_roots()
    if roots is None:
        return path
    real = resolve_path(path.parent, field) / path.name if writing else resolve_path(path, field)
    if not roots:
        raise InvalidFile(
            field, f"{path}: local files are not allowed on this worker ({ROOTS_ENV} is "
            "empty); use an s3:// URI")
    if not any(real.is_relative_to(root) for root in roots):
        via = f" (it resolves to {real})" if real != path else ""
        shown = ", ".join(str(root) for root in roots)
        raise InvalidFile(
            field, f"{path} is outside the allowed roots{via}; local files must be under "
            f"{shown}")
    return real


def open_confined(real: Path, field: str, *, directory: bool = False, create: bool = False) -> int:
    """A file descriptor for ``real`` (a path `confine` returned), for reading, or for a
    directory (``directory``, creating missing ones with ``create``); the caller closes it.

    With confinement on, the walk starts at the root ``real`` lies in and opens each
    component relative to the previous one with O_NOFOLLOW: a component that is (now) a
    symlink fails with InvalidFile naming the field. Files open non-blocking (a FIFO must
    not hang the worker; the reader checks for a regular file). Unconfined: a plain open.
    """
    file_flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    dir_flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    roots = allowed_roots()
    if roots is None:
        if create:
            real.mkdir(parents=True, exist_ok=True)
        return os.open(real, dir_flags if directory else file_flags)
    root = next((r for r in roots if real.is_relative_to(r)), None)
    if root is None:  # confine() refuses these first; a caller that skipped it gets the same answer
        raise InvalidFile(field, f"{real} is outside the allowed roots")
    fd = os.open(root, dir_flags)
    parts = real.relative_to(root).parts
    try:
        for i, name in enumerate(parts):
            last_file = i == len(parts) - 1 and not directory
            if create and not last_file:
                try:
                    os.mkdir(name, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass
            flags = (file_flags if last_file else dir_flags) | os.O_NOFOLLOW
            try:
                next_fd = os.open(name, flags, dir_fd=fd)
            except OSError as e:
                # O_NOFOLLOW refuses a symlink with ELOOP, or ENOTDIR along with O_DIRECTORY.
                if e.errno in (errno.ELOOP, errno.ENOTDIR) and _is_symlink(name, fd):
                    raise InvalidFile(field, f"{real} changed while it was opened: {name!r} is now a symlink "
                                      "(refused: it could lead outside the allowed roots)") from None
                raise
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
