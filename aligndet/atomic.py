"""Atomic file writes: a crash mid-write never leaves a half file under the real name.

Checkpoints, proposal-cache shards and indexes, and the demo's parts all go
through ``atomic_write``, which is what makes runs killed at any moment resumable.
``file_sha256`` is the digest that checks (or records) what such a file holds.
Written files get the mode the user's umask gives any new file (``0o666 & ~umask``), so
they are as readable on a shared disk as files made with ``open``.
"""
import hashlib
import os
import secrets


def _create_temp(folder, name):
    """Create a new empty file ``.<name>.<random>.tmp`` in ``folder`` and return ``(fd, path)``.

    Opened with mode 0o666 rather than through ``tempfile.mkstemp`` (always 0o600), so the
    umask alone decides who may read the file; ``O_EXCL`` makes the name ours alone.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write(path, write):
    """Call ``write(file)`` on a temp file beside ``path`` (same folder, so the same
    filesystem), fsync it, then rename it to ``path``. The folder is created if
    needed; on any error the temp file is removed and the error re-raised."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = _create_temp(folder, os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def file_sha256(path, chunk=1 << 20):
    """The SHA-256 hex digest of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
