"""Atomic file writing: nothing half-written is left behind if writing fails."""
from __future__ import annotations

import os
import tempfile


def atomic_write(path, write) -> None:
    """Calls ``write(tmp_path)`` on a temporary file beside `path`, then renames it over `path`
    with the permissions a plainly created file would get (umask applied)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".visualad-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
