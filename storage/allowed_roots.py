"""Confining a worker's local reads and writes to configured directories.

A job names its files; on a shared worker it must not be able to read ``/etc/shadow`` or
overwrite a model. When ``MASKFLEET_ALLOWED_ROOTS`` is set (absolute directories,
colon-separated), every local path a job reads or writes must lie inside one of them
once symlinks are resolved; set but empty, no local path is allowed at all (an S3-only
worker). Unset, nothing is confined: the local CLI runs the user's own jobs.
"""

import os
from pathlib import Path

from .errors import InvalidFile

ROOTS_ENV = "MASKFLEET_ALLOWED_ROOTS"


def allowed_roots() -> list[Path] | None:
    """The resolved roots from the environment, or None when confinement is off."""
    value = os.environ.get(ROOTS_ENV)
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
    real = path.parent.resolve() / path.name if writing else path.resolve()
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
