import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from aligndet.data.coco import CocoDetection, collate_fn
from aligndet.data.splits import label_fraction_split
from aligndet.data.transforms import eval_transforms, train_transforms

W, H = 40, 30  # every test image is W x H


def write_coco(tmp_path, annotations, categories=None, images=None, files=None):
    """Write a COCO json and PNGs. ``files`` maps file_name -> bytes to write instead of a PNG."""
    categories = categories or [{"id": 90, "name": "zebra"}, {"id": 3, "name": "car"},
                                {"id": 17, "name": "cat"}]
    images = images or [{"id": i, "file_name": f"{i}.png", "width": W, "height": H}
                        for i in (1, 2)]
    files = files or {}
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for info in images:
        name = info["file_name"]
        if name in files:
            if files[name] is not None:
                (image_dir / name).write_bytes(files[name])
            continue  # None: leave the file missing
        pixels = rng.integers(0, 256, (info["height"], info["width"], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(image_dir / name)
    for i, ann in enumerate(annotations, start=1):
        ann.setdefault("id", i)
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, ann_file


def ann(image_id, bbox, category_id=3, **extra):
    return {"image_id": image_id, "bbox": bbox, "category_id": category_id, **extra}


def test_non_contiguous_categories_map_to_1_to_k(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5], 90), ann(1, [5, 5, 4, 4], 3),
                                                ann(2, [0, 0, 8, 8], 17)])
    ds = CocoDetection(image_dir, ann_file)
    assert ds.cat_to_label == {3: 1, 17: 2, 90: 3}
    assert ds.label_to_cat == {1: 3, 2: 17, 3: 90}
    assert ds.class_names == ["car", "cat", "zebra"]
    assert ds.num_classes == 3
    image, target = ds[0]
    assert target["image_id"] == 1
    assert target["labels"].tolist() == [3, 1]
    assert [ds.label_to_cat[label] for label in target["labels"].tolist()] == [90, 3]


def test_item_format(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5])])
    image, target = CocoDetection(image_dir, ann_file)[0]
    assert type(image) is torch.Tensor and image.dtype == torch.float32
    assert image.shape == (3, H, W) and 0 <= image.min() and image.max() <= 1
    assert type(target["boxes"]) is torch.Tensor and target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[1, 2, 11, 7]]  # xywh -> xyxy
    assert target["labels"].dtype == torch.int64
    expected = np.asarray(Image.open(image_dir / "1.png").convert("RGB"), dtype=np.float32) / 255
    torch.testing.assert_close(image, torch.from_numpy(expected).permute(2, 0, 1))


def test_empty_image_has_empty_target(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5])])
    ds = CocoDetection(image_dir, ann_file, transforms=train_transforms())
    _, target = ds[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_missing_image_is_skipped_and_named(tmp_path, caplog):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5]), ann(2, [1, 2, 10, 5])],
                                     files={"2.png": None})
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(image_dir, ann_file)
    assert ds.ids == [1]
    assert ds.summary()["missing_images"] == 1
    assert "2.png" in caplog.text


def test_corrupt_image_returns_none_and_collate_drops_it(tmp_path, caplog):
    junk = np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes()
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5])], files={"2.png": junk})
    ds = CocoDetection(image_dir, ann_file)
    with caplog.at_level(logging.WARNING):
        assert ds[1] is None
    assert "2.png" in caplog.text
    assert ds.summary()["unreadable_images"] == 1

    images, targets = collate_fn([ds[0], ds[1]])
    assert len(images) == len(targets) == 1 and targets[0]["image_id"] == 1
    assert collate_fn([None, None]) == ([], [])

    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_fn)
    images, targets = next(iter(loader))
    assert [t["image_id"] for t in targets] == [1]


def test_degenerate_boxes_are_dropped(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [
        ann(1, [1, 2, 10, 5]), ann(1, [1, 2, 0, 5]), ann(1, [1, 2, 4, -1]),
        ann(1, [1, 2, float("nan"), 3], area=0)])
    ds = CocoDetection(image_dir, ann_file)
    assert ds[0][1]["boxes"].tolist() == [[1, 2, 11, 7]]
    assert ds.summary()["invalid_boxes"] == 3


def test_boxes_outside_image_are_clipped_or_dropped(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [
        ann(1, [-5, 20, 15, 20]),   # partly outside: clipped
        ann(1, [W + 1, 0, 5, 5]),   # fully outside: empty after clipping
        ann(1, [2, 2, 5, 5])])
    ds = CocoDetection(image_dir, ann_file)
    assert ds[0][1]["boxes"].tolist() == [[0, 20, 10, H], [2, 2, 7, 7]]
    counts = ds.summary()
    assert counts["clipped_boxes"] == 1 and counts["dropped_after_clip"] == 1


def test_crowd_annotations_are_excluded(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5]),
                                                ann(1, [3, 3, 9, 9], iscrowd=1)])
    ds = CocoDetection(image_dir, ann_file)
    assert ds[0][1]["boxes"].tolist() == [[1, 2, 11, 7]]
    assert ds.summary()["crowd"] == 1


def test_unknown_category_is_skipped_and_named(tmp_path, caplog):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5]),
                                                ann(1, [3, 3, 9, 9], 55, id=777)])
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(image_dir, ann_file)
    assert ds[0][1]["labels"].tolist() == [1]
    assert ds.summary()["unknown_category"] == 1
    assert "777" in caplog.text and "55" in caplog.text


def test_empty_images_kept_or_removed(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5]), ann(2, [1, 2, 0, 5])])
    kept = CocoDetection(image_dir, ann_file)
    removed = CocoDetection(image_dir, ann_file, remove_empty=True)
    assert kept.ids == [1, 2] and removed.ids == [1]
    assert kept.summary()["empty_images"] == removed.summary()["empty_images"] == 1
    assert removed.summary()["removed_empty"] == 1
    report = removed.report()
    assert isinstance(report, str) and "1 of 2 images" in report


def test_image_ids_select_and_order(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5]), ann(2, [1, 2, 5, 5])])
    ds = CocoDetection(image_dir, ann_file, image_ids=[2, 1])
    assert ds.ids == [2, 1] and ds[0][1]["image_id"] == 2
    with pytest.raises(ValueError, match="not in"):
        CocoDetection(image_dir, ann_file, image_ids=[1, 99])


def test_bad_paths_raise_clear_errors(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5])])
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(image_dir, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        CocoDetection(image_dir, bad)


def test_horizontal_flip_moves_boxes(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5]), ann(1, [20, 3, 19, 20])])
    plain = CocoDetection(image_dir, ann_file, transforms=eval_transforms())[0]
    flipped = CocoDetection(image_dir, ann_file, transforms=train_transforms(hflip_prob=1.0))[0]
    boxes = plain[1]["boxes"]
    expected = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
    assert flipped[1]["boxes"].tolist() == expected.tolist() == [[29, 2, 39, 7], [1, 3, 20, 23]]
    torch.testing.assert_close(flipped[0], plain[0].flip(-1))
    assert flipped[1]["labels"].tolist() == plain[1]["labels"].tolist()

    unflipped = CocoDetection(image_dir, ann_file, transforms=train_transforms(hflip_prob=0.0))[0]
    torch.testing.assert_close(unflipped[1]["boxes"], boxes)


def test_eval_transforms_equal_no_transforms(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5])])
    a = CocoDetection(image_dir, ann_file)[0]
    b = CocoDetection(image_dir, ann_file, transforms=eval_transforms())[0]
    torch.testing.assert_close(a[0], b[0])
    torch.testing.assert_close(a[1]["boxes"], b[1]["boxes"])


# ---- label_fraction_split ----

IDS = list(range(1000, 1200, 2))  # 100 ids


def test_split_is_deterministic_and_sized():
    a = label_fraction_split(IDS, 0.1, fold=3)
    assert a == label_fraction_split(list(reversed(IDS)), 0.1, fold=3)
    assert len(a) == 10 and set(a) <= set(IDS) and a == sorted(a)
    assert len(label_fraction_split(IDS, 0.001)) == 1  # at least one image


def test_split_is_nested():
    for fold in range(3):
        small = set(label_fraction_split(IDS, 0.01, fold))
        medium = set(label_fraction_split(IDS, 0.05, fold))
        large = set(label_fraction_split(IDS, 0.2, fold))
        assert small <= medium <= large


def test_split_full_fraction_and_folds():
    assert label_fraction_split(IDS, 1.0) == IDS
    assert label_fraction_split(IDS, 0.2, fold=0) != label_fraction_split(IDS, 0.2, fold=1)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "0.5", None])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="fraction"):
        label_fraction_split(IDS, fraction)
