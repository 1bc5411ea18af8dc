"""atomic_write: files get the umask's permissions, and a failed write leaves nothing behind."""
import os
import stat

import numpy as np
import pytest

from aligndet.atomic import atomic_write
from aligndet.data.proposal_cache import INDEX_NAME, export_coco_json, open_cache_for_writing, shard_name, write_shard

posix_modes = pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")


@pytest.fixture()
def umask():
    """Set the process umask for one test and put the old one back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _write_bytes(data):
    return lambda f: f.write(data)


@posix_modes
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_new_file_gets_umask_mode(tmp_path, umask, mask, expected):
    umask(mask)
    path = tmp_path / "sub" / "file.bin"
    assert atomic_write(str(path), _write_bytes(b"hello")) == str(path)
    assert path.read_bytes() == b"hello"
    assert _mode(path) == expected
    assert os.listdir(tmp_path / "sub") == ["file.bin"]


@posix_modes
def test_replaced_file_gets_umask_mode_not_the_old_one(tmp_path, umask):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    umask(0o022)
    atomic_write(str(path), _write_bytes(b"new"))
    assert path.read_bytes() == b"new" and _mode(path) == 0o644


def _failing(f):
    f.write(b"half")
    raise RuntimeError("disk on fire")


def test_failed_write_leaves_no_temp_and_no_target(tmp_path):
    path = tmp_path / "file.bin"
    with pytest.raises(RuntimeError, match="disk on fire"):
        atomic_write(str(path), _failing)
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_content(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        atomic_write(str(path), _failing)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.bin"]


def test_temp_name_already_taken_is_left_alone(tmp_path, monkeypatch):
    import aligndet.atomic as atomic
    taken = tmp_path / ".file.bin.taken.tmp"
    taken.write_bytes(b"someone else's")
    names = iter(["taken", "free"])
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names))
    atomic_write(str(tmp_path / "file.bin"), _write_bytes(b"mine"))
    assert (tmp_path / "file.bin").read_bytes() == b"mine" and taken.read_bytes() == b"someone else's"
    assert sorted(os.listdir(tmp_path)) == [".file.bin.taken.tmp", "file.bin"]


@posix_modes
def test_proposal_cache_and_export_are_readable_by_others(tmp_path, umask):
    umask(0o022)
    cache = tmp_path / "cache"
    keys = ["a.png", "b.png", "c.png"]
    index = open_cache_for_writing(str(cache), {"source": "test"}, keys, [1, 2, 3], shard_size=2)
    boxes = np.array([[0, 0, 10, 10], [2, 3, 8, 9]], dtype=np.float64)
    write_shard(str(cache), index, 0, [(boxes, (20, 30), ""), (None, (0, 0), "unreadable")])
    write_shard(str(cache), index, 1, [(boxes[:1], (20, 30), "")])
    out = tmp_path / "export" / "proposals.json"
    assert export_coco_json(str(cache), str(out)) == (2, 3)
    for path in (cache / INDEX_NAME, cache / shard_name(0), cache / shard_name(1), out):
        assert _mode(path) == 0o644, path
