"""The durability primitives every writer in kms uses: write everything, fsync a directory, and
replace a file whole.

A rename or a new file is only durable once its directory is fsync'd; `os.write` may write less
than asked.  One definition, so the maildir writer, the store's index, the queue and the key and
state files agree.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (os.write may stop short)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(directory: Path) -> None:
    """Make the directory's entries (new files, renames, unlinks) durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(
    path: Path,
    data: bytes | Iterable[bytes],
    mode: int = 0o600,
    tmp: Path | None = None,
    sync_dir: bool = False,
) -> int:
    """Replace ``path`` whole: a crash leaves the old file or the new one, never half of either.

    The data goes to a temporary file beside it (``tmp``, or a fresh hidden name), created with
    exactly ``mode`` whatever the umask and never through a symlink, fsync'd, then renamed over
    ``path``; ``sync_dir`` also fsyncs the folder (the rename itself durable).  On any error the
    temporary file is removed.  Returns the bytes written.
    """
    tmp = tmp or path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(tmp, flags, mode)
    size = 0
    try:
        os.fchmod(fd, mode)
        for chunk in (data,) if isinstance(data, bytes) else data:
            write_all(fd, chunk)
            size += len(chunk)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)
    return size


def create_private_file(path: Path) -> None:
    """Create ``path`` empty and 0600 if it does not exist (before SQLite makes it with the umask).

    Only when it does not exist: closing any descriptor of a file drops every POSIX lock this
    process holds on it, so opening and closing an existing SQLite file beside live connections
    (another thread's, another object's) silently drops their locks; another process's last
    connection then checkpoints and removes the WAL under them, and they read a frozen snapshot
    from then on (seen: kmsctl user and lockout changes never reaching a running server).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)
