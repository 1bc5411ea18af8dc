"""Proposal generation, the shard cache (round trip, resume, refusal), COCO-json import/export."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from aligndet.data.images import list_images, read_rgb
from aligndet.data.proposal_cache import (ProposalCache, ProposalCacheError, export_coco_json, import_coco_json,
                                          shard_name)
from aligndet.data.proposal_search import filter_proposals, make_proposals, selective_search
from aligndet.data.proposals import PRESETS, build_cache, main, parse_shard

SETTINGS = dict(PRESETS["demo"])
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _scene(rng, size=(48, 64)):
    """Noise background with a few flat rectangles: something for selective search to find."""
    h, w = size
    pixels = (rng.random((h, w, 3)) * 60).astype(np.uint8)
    for _ in range(3):
        y, x = int(rng.integers(0, h - 16)), int(rng.integers(0, w - 16))
        pixels[y:y + int(rng.integers(8, 16)), x:x + int(rng.integers(8, 16))] = rng.integers(120, 256, 3)
    return pixels


def write_folder(root, n=7, seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "sub"), exist_ok=True)
    for i in range(n):
        folder = root if i % 2 else os.path.join(root, "sub")
        Image.fromarray(_scene(rng, size)).save(os.path.join(folder, f"img{i:02d}.png"))
    return root


@pytest.fixture()
def folder(tmp_path):
    return write_folder(str(tmp_path / "images"))


# ---------------------------------------------------------------- filters

def test_filter_rules_on_hand_made_boxes():
    boxes = np.array([
        [0, 0, 40, 40],     # passes everything
        [0, 0, 20, 40],     # aspect 0.5: fine; but 20 < 32 px
        [0, 0, 100, 30],    # aspect 3.33 > 3
        [0, 0, 95, 95],     # sqrt(wh)/sqrt(WH) = 0.95 > 0.8
        [10, 10, 42, 106],  # w 32, h 96: aspect exactly 3, sides >= 32: kept
    ])
    kept, level = filter_proposals(boxes, (100, 100), min_size=32, max_aspect=3, max_scale=0.8)
    assert level == 0
    assert kept.tolist() == [[0, 0, 40, 40], [10, 10, 42, 106]]
    # a rule set to 0 is off
    kept, _ = filter_proposals(boxes, (100, 100), min_size=0, max_aspect=3, max_scale=0.8)
    assert [0, 0, 20, 40] in kept.tolist()
    kept, _ = filter_proposals(boxes, (100, 100), min_size=32, max_aspect=0, max_scale=0.8)
    assert [0, 0, 100, 30] not in kept.tolist() and len(kept) == 2  # 100x30 fails min size anyway
    kept, _ = filter_proposals(boxes, (100, 100), min_size=32, max_aspect=3, max_scale=0)
    assert [0, 0, 95, 95] in kept.tolist()


def test_filter_relaxes_step_by_step():
    """No box passes all rules: keep those with the minimum size and a good aspect, then those with the
    minimum size alone; with none of at least the minimum size, the image keeps nothing."""
    boxes = np.array([[0, 0, 90, 90],     # sides >= 32, aspect 1, but sqrt(wh)/sqrt(WH) = 0.9 > 0.8
                      [0, 0, 100, 32],    # sides >= 32, aspect 3.1, scale 0.57
                      [0, 0, 10, 10]])    # too small
    kept, level = filter_proposals(boxes, (100, 100))
    assert level == 1 and kept.tolist() == [[0, 0, 90, 90]]
    wide = np.array([[0, 0, 100, 32], [0, 0, 33, 100], [0, 0, 20, 20]])  # big enough, both too elongated
    kept, level = filter_proposals(wide, (100, 100))
    assert level == 2 and kept.tolist() == [[0, 0, 100, 32], [0, 0, 33, 100]]
    small = np.array([[0, 0, 10, 10], [0, 0, 50, 5]])  # nothing reaches 32 px
    kept, level = filter_proposals(small, (100, 100))
    assert level == 3 and kept.shape == (0, 4)
    kept, level = filter_proposals(np.zeros((0, 4)), (100, 100))
    assert len(kept) == 0 and level == 3
    # with the minimum size off, the aspect rule alone is the second step, and every box the third
    kept, level = filter_proposals(small, (100, 100), min_size=0, max_scale=0.05)
    assert level == 1 and kept.tolist() == [[0, 0, 10, 10]]
    kept, level = filter_proposals(np.array([[0, 0, 50, 5]]), (100, 100), min_size=0)
    assert level == 2 and kept.tolist() == [[0, 0, 50, 5]]


# ---------------------------------------------------------------- search

def test_selective_search_boxes_are_valid_and_map_back():
    image = _scene(np.random.default_rng(1), (60, 90))
    for mode in ("fast", "quality", "single"):
        boxes = selective_search(image, mode)
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) > 0
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert boxes[:, 0::2].min() >= 0 and boxes[:, 0::2].max() <= 90
        assert boxes[:, 1::2].min() >= 0 and boxes[:, 1::2].max() <= 60
    # searched at half the size, boxes come back in original pixels
    small = selective_search(image, "fast", search_side=45)
    assert small[:, 0::2].max() <= 90 and small[:, 1::2].max() <= 60
    assert [0, 0, 90, 60] in small.tolist()  # the whole-image box is found at any scale
    # a search side above the image's is no resize
    assert np.array_equal(selective_search(image, "fast", search_side=180), selective_search(image, "fast"))
    with pytest.raises(ValueError, match="mode"):
        selective_search(image, "best")


@pytest.mark.parametrize("size", [(1, 1), (2, 3), (5, 1)])
def test_tiny_images(size):
    image = np.full((*size, 3), 128, np.uint8)
    boxes, _ = make_proposals(image, **SETTINGS)
    assert boxes.shape[1] == 4
    assert (boxes[:, 2] <= size[1]).all() and (boxes[:, 3] <= size[0]).all()


def test_nms_and_top_k_keep_rank_order():
    image = _scene(np.random.default_rng(2), (64, 64))
    plain, _ = make_proposals(image, **dict(SETTINGS, nms_iou=0.0))
    nms, _ = make_proposals(image, **dict(SETTINGS, nms_iou=0.5))
    capped, _ = make_proposals(image, **dict(SETTINGS, nms_iou=0.5, top_k=5))
    assert len(nms) < len(plain)
    positions = [plain.tolist().index(b) for b in nms.tolist()]
    assert positions == sorted(positions) and positions[0] == 0  # a subsequence; the top box survives
    assert capped.tolist() == nms[:5].tolist()


# ---------------------------------------------------------------- images of any mode

def test_read_rgb_any_mode(tmp_path):
    rng = np.random.default_rng(0)
    rgb = (rng.random((9, 7, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg")
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(tmp_path / "deep.png")
    for name in ("grey.png", "rgba.png", "palette.png", "rgb.jpg"):
        out = read_rgb(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == (9, 7, 3), name
    assert np.array_equal(read_rgb(tmp_path / "rgba.png"), rgb)
    deep = read_rgb(tmp_path / "deep.png")
    assert deep.shape == (1, 3, 3) and deep[0, :, 0].tolist() == [0, 100, 255]  # rescaled, not clipped


# ---------------------------------------------------------------- cache

def _build(folder, out, **kw):
    kw.setdefault("workers", 1)
    kw.setdefault("shard_size", 2)
    return build_cache(list_images(folder), str(out), SETTINGS, progress=False, **kw)


def test_cache_round_trip_matches_direct_search(folder, tmp_path):
    records = list_images(folder)
    assert [r.key for r in records][:2] == ["img01.png", "img03.png"] and "sub/img00.png" in [r.key for r in records]
    summary = _build(folder, tmp_path / "cache")
    assert summary["images"] == 7 and summary["shards_written"] == 4 and not summary["failed"]
    cache = ProposalCache(tmp_path / "cache")
    assert len(cache) == 7 and cache.settings == SETTINGS
    for r in records:
        expected, _ = make_proposals(read_rgb(r.path), **SETTINGS)
        got = cache.get(r.key)
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert cache.image_size(r.key) == (48, 64)
    assert cache.stats()["boxes"] == summary["boxes"]
    with pytest.raises(KeyError, match="not in the proposal cache"):
        cache.get("nope.png")


def test_parallel_build_equals_serial(folder, tmp_path):
    _build(folder, tmp_path / "one", workers=1)
    _build(folder, tmp_path / "two", workers=2)
    one, two = ProposalCache(tmp_path / "one"), ProposalCache(tmp_path / "two")
    for key in one.keys:
        assert np.array_equal(one.get(key), two.get(key))


def test_resume_after_crash_between_and_inside_shards(folder, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    reference = tmp_path / "reference"
    _build(folder, reference)

    # crash inside the third shard write: two shards on disk, no partial third under the real name
    import aligndet.data.proposal_cache as pc
    real_savez, calls = np.savez_compressed, []

    def dying_savez(f, **arrays):
        calls.append(1)
        if len(calls) == 3:
            f.write(b"half a shard")
            raise KeyboardInterrupt("killed mid-shard")
        real_savez(f, **arrays)

    monkeypatch.setattr(pc.np, "savez_compressed", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        _build(folder, out)
    monkeypatch.undo()
    assert sorted(n for n in os.listdir(out) if n.startswith("shard-")) == [shard_name(0), shard_name(1)]
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    with pytest.raises(ProposalCacheError, match="incomplete: 2 of 4 shards missing"):
        ProposalCache(out)

    mtime = os.path.getmtime(out / shard_name(0))
    summary = _build(folder, out)
    assert summary["shards_written"] == 2 and summary["shards_already_done"] == 2 and summary["images"] == 3
    assert os.path.getmtime(out / shard_name(0)) == mtime  # finished shards are not redone

    # a shard lost between runs is remade alone
    os.unlink(out / shard_name(1))
    summary = _build(folder, out)
    assert summary["shards_written"] == 1 and summary["images"] == 2
    done, ref = ProposalCache(out), ProposalCache(reference)
    for key in ref.keys:
        assert np.array_equal(done.get(key), ref.get(key))
    assert _build(folder, out)["images"] == 0  # nothing left to do


def test_resume_after_kill_9(tmp_path):
    # big enough (~0.1 s of search per image) that the kill lands mid-run on any machine
    folder = write_folder(str(tmp_path / "images"), n=40, seed=3, size=(160, 200))
    out = tmp_path / "cache"
    cmd = [sys.executable, "-m", "aligndet.data.proposals", "build", "--images", folder, "--out", str(out),
           "--preset", "demo", "--workers", "1", "--shard-size", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and not (out.is_dir() and any(n.startswith("shard-") for n in os.listdir(out))):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = [n for n in os.listdir(out) if n.startswith("shard-")]
    assert 1 <= len(written) < 20, "the kill should land mid-run"
    summary = _build(folder, out)
    assert summary["shards_written"] == 20 - summary["shards_already_done"]
    cache = ProposalCache(out)  # complete, every shard readable
    for key in cache.keys:
        assert np.array_equal(cache.get(key), make_proposals(read_rgb(os.path.join(folder, key)), **SETTINGS)[0])


def test_shards_split_across_machines(folder, tmp_path):
    out = tmp_path / "cache"
    first = _build(folder, out, shard=(0, 2))
    assert first["shards_written"] == 2 and first["images"] == 4  # shards 0 and 2
    with pytest.raises(ProposalCacheError, match="incomplete"):
        ProposalCache(out)
    second = _build(folder, out, shard=(1, 2))
    assert second["shards_written"] == 2 and second["images"] == 3
    assert len(ProposalCache(out)) == 7
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1-4", "-1/2"):
        with pytest.raises(ValueError, match="shard"):
            parse_shard(bad)


def test_other_settings_or_images_are_refused(folder, tmp_path):
    out = tmp_path / "cache"
    _build(folder, out)
    other = dict(SETTINGS, min_size=16)
    with pytest.raises(ProposalCacheError, match=r"other settings \(min_size: cache 8 vs requested 16\)"):
        build_cache(list_images(folder), str(out), other, workers=1, shard_size=2, progress=False)
    with pytest.raises(ProposalCacheError, match="other images"):
        build_cache(list_images(folder)[:3], str(out), SETTINGS, workers=1, shard_size=2, progress=False)
    with pytest.raises(ProposalCacheError, match="--shard-size 2"):
        _build(folder, out, shard_size=3)
    build_cache(list_images(folder), str(out), other, workers=1, shard_size=2, overwrite=True, progress=False)
    assert ProposalCache(out).settings["min_size"] == 16


def test_bad_images_are_counted_and_the_run_goes_on(folder, tmp_path):
    open(os.path.join(folder, "empty.png"), "wb").close()
    with open(os.path.join(folder, "corrupt.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = Image.fromarray(_scene(np.random.default_rng(5)))
    good.save(os.path.join(folder, "truncated.png"))
    data = open(os.path.join(folder, "truncated.png"), "rb").read()
    with open(os.path.join(folder, "truncated.png"), "wb") as f:
        f.write(data[: len(data) // 2])
    summary = _build(folder, tmp_path / "cache")
    failed = dict(summary["failed"])
    assert sorted(failed) == ["corrupt.jpg", "empty.png", "truncated.png"]
    assert all("cannot read image" in msg and key in msg for key, msg in failed.items())
    cache = ProposalCache(tmp_path / "cache")
    assert len(cache) == 10 and cache.stats()["failed"] == 3
    assert cache.get("empty.png") is None and "empty.png" in cache.error("empty.png")
    assert cache.get("img01.png") is not None


def test_coco_json_input_and_missing_files(folder, tmp_path):
    records = list_images(folder)
    images = [{"id": 100 + i, "file_name": r.key, "width": 64, "height": 48} for i, r in enumerate(records)]
    images.append({"id": 999, "file_name": "gone.png", "width": 64, "height": 48})
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": [], "categories": []}))
    from_json = list_images(folder, str(ann_file))
    assert [r.image_id for r in from_json] == [100 + i for i in range(7)] + [999]
    summary = build_cache(from_json, str(tmp_path / "cache"), SETTINGS, workers=1, shard_size=4, progress=False)
    assert [key for key, _ in summary["failed"]] == ["gone.png"]
    cache = ProposalCache(tmp_path / "cache")
    assert cache.image_ids[-1] == 999 and cache.get("gone.png") is None


def test_coco_json_export_import_round_trip(folder, tmp_path):
    _build(folder, tmp_path / "cache")
    cache = ProposalCache(tmp_path / "cache")
    n_images, n_boxes = export_coco_json(cache, str(tmp_path / "props.json"))
    exported = json.loads((tmp_path / "props.json").read_text())
    assert n_images == 7 and n_boxes == cache.stats()["boxes"] == len(exported["annotations"])
    assert exported["categories"] == [{"id": 1, "name": "object"}]
    first = exported["annotations"][0]
    x1, y1, x2, y2 = cache.get(cache.keys[0])[0].tolist()
    assert first["bbox"] == [x1, y1, x2 - x1, y2 - y1] and first["image_id"] == cache.image_ids[0]

    back = import_coco_json(str(tmp_path / "props.json"), str(tmp_path / "imported"))
    assert back.keys == cache.keys and back.image_ids == cache.image_ids
    for key in cache.keys:
        assert np.array_equal(back.get(key), cache.get(key))
        assert back.image_size(key) == cache.image_size(key)

    # fractional boxes (someone else's proposals) survive exactly, in score order
    frac = {"images": [{"id": 5, "file_name": "a.jpg", "height": 30, "width": 40}],
            "annotations": [{"id": 1, "image_id": 5, "bbox": [1.5, 2.25, 10, 3], "score": 0.2},
                            {"id": 2, "image_id": 5, "bbox": [0, 0, 7, 7], "score": 0.9}],
            "categories": [{"id": 1, "name": "object"}]}
    (tmp_path / "frac.json").write_text(json.dumps(frac))
    imported = import_coco_json(str(tmp_path / "frac.json"), str(tmp_path / "frac"))
    assert imported.get("a.jpg").tolist() == [[0, 0, 7, 7], [1.5, 2.25, 11.5, 5.25]]
    with pytest.raises(ProposalCacheError, match="other settings"):
        build_cache([r._replace(key="a.jpg") for r in list_images(folder)[:1]], str(tmp_path / "frac"),
                    SETTINGS, workers=1, progress=False)


def test_cli_build_info_export_import(folder, tmp_path, capsys):
    out = str(tmp_path / "cache")
    main(["build", "--images", folder, "--out", out, "--preset", "demo", "--min-size", "10", "--workers", "1",
          "--shard-size", "3"])
    text = capsys.readouterr().out
    assert "7 images searched in 3 shards" in text and "0 images failed" in text
    assert ProposalCache(out).settings == dict(SETTINGS, min_size=10.0)
    main(["info", "--cache", out])
    assert "7 images, 0 failed" in capsys.readouterr().out
    main(["export", "--cache", out, "--out", str(tmp_path / "p.json")])
    main(["import", "--json", str(tmp_path / "p.json"), "--out", str(tmp_path / "back")])
    assert ProposalCache(tmp_path / "back").stats()["boxes"] == ProposalCache(out).stats()["boxes"]
    with pytest.raises(SystemExit, match="other settings"):
        main(["build", "--images", folder, "--out", out, "--preset", "demo", "--workers", "1", "--shard-size", "3"])
    with pytest.raises(SystemExit, match="no proposal cache"):
        main(["info", "--cache", str(tmp_path / "nothing")])
    os.unlink(os.path.join(out, shard_name(1)))  # as during a build, or after one was killed
    main(["info", "--cache", out])
    assert "2 of 3 shards (4 of 7 images, 57 %) done" in capsys.readouterr().out
