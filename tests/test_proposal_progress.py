"""build_progress / format_progress on caches complete, half built and not started."""
import os
import time

import numpy as np
import pytest

from aligndet.data.proposal_cache import (ProposalCacheError, build_progress, format_progress,
                                          open_cache_for_writing, shard_name, write_shard)

SETTINGS = {"source": "test", "mode": "fast"}
KEYS = [f"img{i:02d}.png" for i in range(10)]  # shard size 3: shards of 3, 3, 3 and 1 images


@pytest.fixture()
def cache(tmp_path):
    path = str(tmp_path / "cache")
    return path, open_cache_for_writing(path, SETTINGS, KEYS, range(1, 11), shard_size=3)


def _write(path, index, shard, mtime=None):
    n = len(index["keys"][shard * 3:(shard + 1) * 3])
    write_shard(path, index, shard, [(np.array([[0, 0, 5, 5]]), (8, 8), "")] * n)
    if mtime is not None:
        os.utime(os.path.join(path, shard_name(shard)), (mtime, mtime))


def test_half_built_cache_rate_and_time_left(cache):
    path, index = cache
    now = time.time()
    _write(path, index, 2, now - 100)  # written first: starts the clock, not counted in the rate
    _write(path, index, 0, now - 40)
    p = build_progress(path)
    assert (p["images"], p["shards"], p["shard_size"]) == (10, 4, 3)
    assert (p["shards_done"], p["images_done"], p["complete"]) == (2, 6, False)
    assert p["settings"] == SETTINGS
    assert p["images_per_second"] == pytest.approx(3 / 60, rel=1e-6)
    assert p["eta_seconds"] == pytest.approx((10 - 6) / (3 / 60), rel=1e-6)
    assert 40 <= p["seconds_since_last_shard"] < 45
    text = format_progress(p)
    assert "2 of 4 shards (6 of 10 images, 60 %) done" in text
    assert "last shard written 40 s ago" in text or "last shard written 41 s ago" in text
    assert "about 0.05 images/s" in text and "about 1 min 20 s left" in text
    assert len(text.splitlines()) == 2


def test_short_last_shard_counts_its_own_images(cache):
    path, index = cache
    now = time.time()
    _write(path, index, 3, now - 50)
    _write(path, index, 1, now - 30)
    _write(path, index, 0, now - 10)
    p = build_progress(path)
    assert (p["shards_done"], p["images_done"]) == (3, 7)
    assert p["images_per_second"] == pytest.approx(6 / 40, rel=1e-6)
    assert p["eta_seconds"] == pytest.approx(3 / (6 / 40), rel=1e-6)


def test_no_rate_with_fewer_than_two_shards(cache):
    path, index = cache
    p = build_progress(path)
    assert (p["shards_done"], p["images_done"], p["complete"]) == (0, 0, False)
    assert p["images_per_second"] is None and p["eta_seconds"] is None and p["seconds_since_last_shard"] is None
    assert "0 of 4 shards (0 of 10 images, 0 %) done; no shard written yet" in format_progress(p)

    _write(path, index, 1)
    p = build_progress(path)
    assert (p["shards_done"], p["images_done"]) == (1, 3)
    assert p["images_per_second"] is None and p["eta_seconds"] is None
    assert p["seconds_since_last_shard"] is not None
    assert "1 of 4 shards (3 of 10 images, 30 %) done" in format_progress(p)
    assert "no rate yet" in format_progress(p)


def test_complete_cache(cache):
    path, index = cache
    for j in range(4):
        _write(path, index, j)
    p = build_progress(path)
    assert p["complete"] and (p["shards_done"], p["images_done"]) == (4, 10)
    text = format_progress(p)
    assert "complete" in text and "4 shards" in text and "10 images" in text and "left" not in text


def test_temp_files_are_not_shards(cache):
    path, index = cache
    with open(os.path.join(path, f".{shard_name(0)}.abc.tmp"), "wb") as f:
        f.write(b"half")
    assert build_progress(path)["shards_done"] == 0


def test_thousands_and_long_durations():
    p = {"cache_dir": "proposals/train2017", "images": 118287, "shards": 119, "shard_size": 1000,
         "settings": {}, "shards_done": 37, "images_done": 37000, "complete": False,
         "images_per_second": 1.9, "eta_seconds": 81287 / 1.9, "seconds_since_last_shard": 12.2}
    text = format_progress(p)
    assert text.startswith("proposals/train2017: 37 of 119 shards (37,000 of 118,287 images, 31 %) done; "
                           "last shard written 12 s ago")
    assert "about 1.9 images/s" in text and "about 11 h 53 min left" in text


def test_no_index(tmp_path):
    with pytest.raises(ProposalCacheError, match="no proposal cache"):
        build_progress(str(tmp_path))
