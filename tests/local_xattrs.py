"""Reading the sha256 xattr our local writes set, where the test's filesystem has user xattrs."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest


def user_xattr_or_skip(path: Path, name: str = "user.sha256") -> bytes:
    """The xattr's value; skips the test on a filesystem without user xattrs (a missing one still fails)."""
    try:
        return os.getxattr(path, name)
    except OSError as e:
        if e.errno != errno.ENOTSUP:  # ENODATA (not set) is a failure
            raise
        pytest.skip("this filesystem has no user xattrs")
