"""Atomic file writes: a crash mid-write never leaves a half file under the real name.

Checkpoints, proposal-cache shards and indexes, and the demo's parts all go
through ``atomic_write``, which is what makes runs killed at any moment resumable.
``file_sha256`` is the digest that checks (or records) what such a file holds.
"""
import hashlib
import os
import tempfile


def atomic_write(path, write):
    """Call ``write(file)`` on a temp file beside ``path`` (same folder, so the same
    filesystem), fsync it, then rename it to ``path``. The folder is created if
    needed; on any error the temp file is removed and the error re-raised."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
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
