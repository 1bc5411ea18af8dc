"""The search levers (reduced JPEG decoding, search side, numpy NMS), older caches, and a torch-free tool."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from aligndet.data.images import list_images, read_rgb, read_rgb_reduced
from aligndet.data.proposal_cache import INDEX_NAME, ProposalCache, open_cache_for_writing, write_shard
from aligndet.data.proposal_search import make_proposals, nms_in_rank_order, propose_file
from aligndet.data.proposals import LEGACY_SETTINGS, PRESETS, SETTINGS, build_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(path, size=(300, 400), seed=0):
    """A JPEG with flat rectangles on a smooth background (height, width = size)."""
    rng = np.random.default_rng(seed)
    h, w = size
    pixels = np.zeros((h, w, 3), np.uint8) + np.linspace(40, 90, w, dtype=np.uint8)[None, :, None]
    side = min(h, w) // 4
    for _ in range(4):
        y, x = int(rng.integers(0, h - 2 * side)), int(rng.integers(0, w - 2 * side))
        pixels[y:y + int(rng.integers(side, 2 * side)), x:x + int(rng.integers(side, 2 * side))] = \
            rng.integers(120, 256, 3)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def test_reduced_decoding_scales_jpegs_only(tmp_path):
    jpeg = _photo(str(tmp_path / "a.jpg"))
    image, size = read_rgb_reduced(jpeg, 100)  # 400 / 4 = 100 is still >= 100: a quarter
    assert size == (300, 400) and image.shape == (75, 100, 3)
    image, _ = read_rgb_reduced(jpeg, 101)  # a quarter would be too small: a half
    assert image.shape == (150, 200, 3)
    assert read_rgb_reduced(jpeg, 400)[0].shape == (300, 400, 3)
    # the reduced decode is the image, smaller: close to an area-resize of the full decode
    full = read_rgb(jpeg).astype(np.float64)
    half = read_rgb_reduced(jpeg, 200)[0].astype(np.float64)
    assert np.abs(full.reshape(150, 2, 200, 2, 3).mean(axis=(1, 3)) - half).mean() < 4
    png = str(tmp_path / "b.png")
    Image.fromarray(read_rgb(jpeg)).save(png)
    image, size = read_rgb_reduced(png, 100)
    assert image.shape == (300, 400, 3) and size == (300, 400)


@pytest.mark.parametrize("decode", ["full", "reduced"])
def test_propose_file_maps_boxes_to_the_original_image(tmp_path, decode):
    jpeg = _photo(str(tmp_path / "a.jpg"))
    settings = dict(PRESETS["coco"], search_side=128, decode=decode, min_size=0, max_scale=0, max_aspect=0)
    boxes, level, size = propose_file(jpeg, settings)
    assert size == (300, 400) and level == 0 and len(boxes) > 0
    assert boxes[:, 0::2].max() <= 400 and boxes[:, 1::2].max() <= 300
    assert [0, 0, 400, 300] in boxes.tolist()  # the last merge: the whole image, in original pixels
    # the same search as on the decoded image (the search side is what shrinks it)
    image = read_rgb_reduced(jpeg, 128)[0] if decode == "reduced" else read_rgb(jpeg)
    expected, _ = make_proposals(image, original_size=(300, 400), **settings)
    assert np.array_equal(boxes, expected)


def test_numpy_nms_equals_torchvision():
    rng = np.random.default_rng(0)
    xy = rng.integers(0, 80, (300, 2))
    boxes = np.concatenate([xy, xy + rng.integers(4, 40, (300, 2))], axis=1)
    for iou in (0.3, 0.5, 0.7):
        rank = -torch.arange(len(boxes), dtype=torch.float32)  # earlier wins
        expected = np.sort(torchvision.ops.nms(torch.from_numpy(boxes).float(), rank, iou).numpy())
        assert np.array_equal(nms_in_rank_order(boxes, iou), expected)
    assert nms_in_rank_order(np.zeros((0, 4)), 0.5).tolist() == []


def test_a_cache_from_before_the_decode_setting_resumes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        _photo(str(folder / f"{i}.jpg"), (60, 80), seed=i)
    records = list_images(str(folder))
    old = {k: v for k, v in PRESETS["demo"].items() if k not in LEGACY_SETTINGS}
    out = str(tmp_path / "cache")
    index = open_cache_for_writing(out, old, [r.key for r in records], [r.image_id for r in records], shard_size=2)
    first = [propose_file(r.path, PRESETS["demo"]) for r in records[:2]]
    write_shard(out, index, 0, [(boxes, size, "") for boxes, _, size in first])  # killed after one shard
    summary = build_cache(records, out, PRESETS["demo"], workers=1, shard_size=2, progress=False)
    assert summary["shards_already_done"] == 1 and summary["shards_written"] == 1
    cache = ProposalCache(out)
    assert set(cache.settings) == set(SETTINGS) and cache.settings["decode"] == "full" and len(cache) == 4
    with open(os.path.join(out, INDEX_NAME)) as f:
        assert json.load(f)["settings"] == PRESETS["demo"]


def test_the_tool_never_imports_torch(tmp_path):
    """--help, build and info run without torch (its import is most of a CLI's start-up)."""
    folder = tmp_path / "images"
    folder.mkdir()
    _photo(str(folder / "a.jpg"), (60, 80))
    out = str(tmp_path / "cache")
    code = f"""
import sys
from aligndet.data.proposals import main
for argv in (["build", "--images", {str(folder)!r}, "--out", {out!r}, "--workers", "1"], ["info", "--cache", {out!r}]):
    main(argv)
try:
    main(["--help"])
except SystemExit:
    pass
print("torch imported:", "torch" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 images searched" in done.stdout and "1 images, 0 failed" in done.stdout
    assert "torch imported: False" in done.stdout
