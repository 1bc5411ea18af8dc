"""Pascal VOC to COCO json: the VOCdevkit layout, difficult objects as crowd, every bad input counted."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from aligndet.data.coco import CocoDetection
from aligndet.data.voc import VOC_CLASSES, main, voc_to_coco
from aligndet.evaluation import evaluate_detections

OBJECT = """<object><name>{name}</name><truncated>{truncated}</truncated><difficult>{difficult}</difficult>
<bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"""


def write_voc(root):
    """VOC2007 with a trainval list of 5 ids: a (dog, difficult person, truncated cat), b (no XML),
    c (malformed XML), d (a cat and an unknown 'unicorn'), e (a box with xmax < xmin); VOC2012 with f."""
    def image(year, image_id, size=(60, 80)):
        folder = os.path.join(root, f"VOC{year}", "JPEGImages")
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(np.full((*size, 3), 100, np.uint8)).save(os.path.join(folder, f"{image_id}.jpg"))

    def xml(year, image_id, objects, text=None):
        folder = os.path.join(root, f"VOC{year}", "Annotations")
        os.makedirs(folder, exist_ok=True)
        body = "".join(OBJECT.format(**o) for o in objects)
        with open(os.path.join(folder, f"{image_id}.xml"), "w") as f:
            f.write(text if text is not None else
                    f"<annotation><size><width>80</width><height>60</height></size>{body}</annotation>")

    def listing(year, ids):
        folder = os.path.join(root, f"VOC{year}", "ImageSets", "Main")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "trainval.txt"), "w") as f:
            f.write("\n".join(ids) + "\n")

    o = dict(truncated=0, difficult=0)
    xml("2007", "a", [dict(o, name="dog", x1=11, y1=21, x2=40, y2=50), dict(o, name="person", difficult=1, x1=1,
                      y1=1, x2=10, y2=10), dict(o, name="cat", truncated=1, x1=50, y1=5, x2=79, y2=30)])
    xml("2007", "c", [], text="<annotation><size><width>80")
    xml("2007", "d", [dict(o, name="cat", x1=5, y1=5, x2=25, y2=25), dict(o, name="unicorn", x1=1, y1=1, x2=9, y2=9)])
    xml("2007", "e", [dict(o, name="car", x1=30, y1=5, x2=20, y2=25)])
    xml("2012", "f", [dict(o, name="horse", x1=1, y1=1, x2=80, y2=60)])
    for image_id in "acde":
        image("2007", image_id)
    image("2012", "f")
    listing("2007", ["a", "b", "c", "d", "e"])
    listing("2012", ["f"])
    return root


def test_voc_sets_become_one_coco_json_and_bad_input_is_counted(tmp_path):
    root = write_voc(str(tmp_path / "VOCdevkit"))
    coco, report = voc_to_coco(root, ["2007-trainval", "2012-trainval"])
    assert [im["file_name"] for im in coco["images"]] == ["VOC2007/JPEGImages/a.jpg", "VOC2007/JPEGImages/d.jpg",
                                                          "VOC2007/JPEGImages/e.jpg", "VOC2012/JPEGImages/f.jpg"]
    assert [c["name"] for c in coco["categories"]] == list(VOC_CLASSES) and coco["categories"][0]["id"] == 1
    assert report["missing_xml"] == ["VOC2007/b"] and len(report["malformed_xml"]) == 1
    assert report["unknown_class"] == ["VOC2007/d: 'unicorn'"] and len(report["broken_box"]) == 1
    assert report["objects"] == 5 and report["difficult"] == 1 and report["truncated"] == 1
    dog = coco["annotations"][0]
    assert dog["bbox"] == [10, 20, 30, 30] and dog["iscrowd"] == 0  # 1-based inclusive -> 0-based xywh
    person = coco["annotations"][1]
    assert person["category_id"] == VOC_CLASSES.index("person") + 1 and person["iscrowd"] == 1
    horse = coco["annotations"][-1]
    assert horse["bbox"] == [0, 0, 80, 60]  # the whole image, exactly

    # the json reads as any COCO dataset: difficult objects are crowd, ignored by training
    out = str(tmp_path / "voc.json")
    main(["to-coco", "--voc-root", root, "--sets", "2007-trainval", "2012-trainval", "--out", out])
    data = CocoDetection(root, out)
    _, target = data[0]
    assert target["boxes"].shape == (2, 4) and data.summary()["crowd"] == 1
    # and COCOeval scores the ground truth as predictions 1.0, difficult objects neither helping nor hurting
    gt = COCO(out)
    cat_to_label = {c["id"]: c["id"] for c in coco["categories"]}
    detections = {}
    for ann in coco["annotations"]:
        if not ann["iscrowd"]:
            x, y, w, h = ann["bbox"]
            d = detections.setdefault(ann["image_id"], {"boxes": [], "scores": [], "labels": []})
            d["boxes"].append([x, y, x + w, y + h]), d["scores"].append(1.0), d["labels"].append(ann["category_id"])
    detections = {i: {k: torch.tensor(v) for k, v in d.items()} for i, d in detections.items()}
    stats = evaluate_detections(gt, detections, cat_to_label, image_ids=[im["id"] for im in coco["images"]],
                                verbose=False)
    assert stats["AP"] == pytest.approx(1.0)
    with open(out) as f:
        assert json.load(f) == coco


def test_class_names_from_the_data_and_clear_errors(tmp_path):
    root = write_voc(str(tmp_path / "VOCdevkit"))
    coco, report = voc_to_coco(root, ["2007-trainval"], classes_from_data=True)
    assert [c["name"] for c in coco["categories"]] == ["car", "cat", "dog", "person", "unicorn"]
    assert report["unknown_class"] == []
    with pytest.raises(SystemExit, match="no image list for set 2007-test"):
        main(["to-coco", "--voc-root", root, "--sets", "2007-test", "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="YEAR-SPLIT"):
        main(["to-coco", "--voc-root", root, "--sets", "trainval", "--out", str(tmp_path / "x.json")])


def test_a_coco_json_written_as_a_voc_set_reads_back_the_same(squares_coco, tmp_path):
    root = str(tmp_path / "VOCdevkit")
    with open(squares_coco["train_json"]) as f:
        source = json.load(f)
    source["annotations"][0]["iscrowd"] = 1  # becomes a difficult object, and crowd again
    crowd_json = str(tmp_path / "crowd.json")
    with open(crowd_json, "w") as f:
        json.dump(source, f)
    assert main(["from-coco", "--json", crowd_json, "--images", squares_coco["train_images"], "--voc-root", root,
                 "--set", "2007-trainval"]) == len(source["images"])
    back, report = voc_to_coco(root, ["2007-trainval"], classes_from_data=True)
    assert report["difficult"] == 1 and not report["unknown_class"] and not report["broken_box"]
    assert [c["name"] for c in back["categories"]] == ["class3", "class7"]
    assert [im["file_name"] for im in back["images"]] == [
        f"VOC2007/JPEGImages/trainval_{os.path.splitext(im['file_name'])[0]}.jpg" for im in source["images"]]
    name_of = {c["id"]: c["name"] for c in source["categories"]}
    back_name = {c["id"]: c["name"] for c in back["categories"]}
    assert [(a["bbox"], name_of[a["category_id"]], a["iscrowd"]) for a in source["annotations"]] == \
        [(a["bbox"], back_name[a["category_id"]], a["iscrowd"]) for a in back["annotations"]]
    picture = Image.open(os.path.join(root, back["images"][0]["file_name"]))
    assert picture.format == "JPEG" and picture.size == (96, 96)
