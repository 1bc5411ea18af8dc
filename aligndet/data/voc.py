"""Pascal VOC (the VOCdevkit layout) as COCO json, so every script here reads it.

    # VOC07+12 trainval for training, VOC07 test for evaluation (the paper's VOC protocol)
    python -m aligndet.data.voc to-coco --voc-root VOCdevkit --sets 2007-trainval 2012-trainval \\
        --out VOCdevkit/voc0712_trainval.json
    python -m aligndet.data.voc to-coco --voc-root VOCdevkit --sets 2007-test --out VOCdevkit/voc07_test.json
    python finetune.py --train-json VOCdevkit/voc0712_trainval.json --train-images VOCdevkit \\
        --val-json VOCdevkit/voc07_test.json --val-images VOCdevkit ...

    # the other way: a COCO json as a VOC set (the demo data as VOC07, to try the VOC path)
    python -m aligndet.data.voc from-coco --json data/demo/annotations/instances_train.json \
        --images data/demo/train --voc-root outputs/demo_voc --set 2007-trainval

A set ``YEAR-SPLIT`` is ``VOC<YEAR>/ImageSets/Main/<SPLIT>.txt`` under ``--voc-root``; each listed id has
``VOC<YEAR>/Annotations/<id>.xml`` and ``VOC<YEAR>/JPEGImages/<id>.jpg``. The json's ``file_name`` is
relative to ``--voc-root``. Classes are the 20 standard ones in their standard order (category ids 1..20),
or ``--classes-from-data`` for the names found, sorted.

Boxes: VOC's ``xmin ymin xmax ymax`` are 1-based inclusive pixels; the json holds
``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]``. A ``difficult`` object is marked
``iscrowd: 1``, so training ignores it and COCOeval neither rewards nor penalises detecting it, as VOC's
own evaluation does. ``truncated`` objects are ordinary objects. A missing or malformed XML skips its
image; an object of a class outside the list, or with a broken box, is skipped; each is counted and named.
"""
import argparse
import json
import os
import shutil
import sys
import xml.etree.ElementTree as ET

from aligndet.atomic import atomic_write

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")


def parse_set(name):
    """'2007-trainval' -> ('2007', 'trainval')."""
    year, _, split = str(name).partition("-")
    if not year or not split:
        raise ValueError(f"a VOC set looks like YEAR-SPLIT (e.g. 2007-trainval), got {name!r}")
    return year, split


def parse_annotation(path):
    """``(width, height, [(name, difficult, truncated, (xmin, ymin, xmax, ymax))])`` of one VOC XML file."""
    root = ET.parse(path).getroot()
    size = root.find("size")
    width, height = int(float(size.findtext("width"))), int(float(size.findtext("height")))
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        coords = tuple(float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")) if box is not None else None
        objects.append((obj.findtext("name", "").strip(), int(obj.findtext("difficult", "0") or 0),
                        int(obj.findtext("truncated", "0") or 0), coords))
    return width, height, objects


def voc_to_coco(voc_root, sets, classes=VOC_CLASSES, classes_from_data=False):
    """COCO dict of the images of ``sets`` and a report dict of what was skipped and why."""
    report = {"images": 0, "objects": 0, "difficult": 0, "truncated": 0, "missing_xml": [], "malformed_xml": [],
              "unknown_class": [], "broken_box": []}
    entries = []
    for name in sets:
        year, split = parse_set(name)
        folder = os.path.join(voc_root, f"VOC{year}")
        listing = os.path.join(folder, "ImageSets", "Main", f"{split}.txt")
        if not os.path.isfile(listing):
            raise FileNotFoundError(f"no image list for set {name}: {listing}")
        with open(listing) as f:
            ids = [line.split()[0] for line in f if line.strip()]
        for image_id in ids:
            xml = os.path.join(folder, "Annotations", f"{image_id}.xml")
            if not os.path.isfile(xml):
                report["missing_xml"].append(f"VOC{year}/{image_id}")
                continue
            try:
                width, height, objects = parse_annotation(xml)
            except (ET.ParseError, AttributeError, TypeError, ValueError) as e:
                report["malformed_xml"].append(f"VOC{year}/{image_id}: {type(e).__name__}: {e}")
                continue
            entries.append((f"VOC{year}/JPEGImages/{image_id}.jpg", width, height, objects, f"VOC{year}/{image_id}"))
    if classes_from_data:
        classes = tuple(sorted({o[0] for *_, objects, _ in entries for o in objects if o[0]}))
    category = {n: i for i, n in enumerate(classes, start=1)}
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": n} for n, i in category.items()]}
    for file_name, width, height, objects, where in entries:
        image_id = len(coco["images"]) + 1
        coco["images"].append({"id": image_id, "file_name": file_name, "width": width, "height": height})
        for name, difficult, truncated, coords in objects:
            if name not in category:
                report["unknown_class"].append(f"{where}: {name!r}")
                continue
            if coords is None or not coords[2] >= coords[0] or not coords[3] >= coords[1]:
                report["broken_box"].append(f"{where}: {name} {coords}")
                continue
            x1, y1, x2, y2 = coords
            w, h = x2 - x1 + 1, y2 - y1 + 1
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": category[name], "bbox": [x1 - 1, y1 - 1, w, h],
                                        "area": w * h, "iscrowd": int(bool(difficult))})
            report["objects"] += 1
            report["difficult"] += int(bool(difficult))
            report["truncated"] += int(bool(truncated))
    report["images"] = len(coco["images"])
    return coco, report


def coco_to_voc(json_file, images, voc_root, year, split, prefix=None):
    """Write a COCO json's images and boxes as the VOCdevkit set ``<year>-<split>`` under ``voc_root``
    (``voc_to_coco``'s inverse): one XML per image, its image as JPEG (copied if it is one, else
    written at quality 95) and the set's list, with ids ``<prefix><file stem>`` (prefix: ``<split>_``).
    Crowd boxes become ``difficult`` objects. Returns the number of images written."""
    from PIL import Image

    with open(json_file) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    boxes = {}
    for ann in coco.get("annotations", []):
        boxes.setdefault(ann["image_id"], []).append(ann)
    folder = os.path.join(voc_root, f"VOC{year}")
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    prefix = f"{split}_" if prefix is None else prefix
    ids = []
    for image in coco["images"]:
        image_id = prefix + os.path.splitext(os.path.basename(image["file_name"]))[0]
        source, target = os.path.join(images, image["file_name"]), os.path.join(folder, "JPEGImages", image_id + ".jpg")
        if source.lower().endswith((".jpg", ".jpeg")):
            shutil.copyfile(source, target)
        else:
            Image.open(source).convert("RGB").save(target, quality=95)
        root = ET.Element("annotation")
        ET.SubElement(root, "filename").text = image_id + ".jpg"
        size = ET.SubElement(root, "size")
        for key, value in (("width", image["width"]), ("height", image["height"]), ("depth", 3)):
            ET.SubElement(size, key).text = str(value)
        for ann in boxes.get(image["id"], []):
            obj = ET.SubElement(root, "object")
            ET.SubElement(obj, "name").text = names[ann["category_id"]]
            ET.SubElement(obj, "truncated").text = "0"
            ET.SubElement(obj, "difficult").text = str(int(bool(ann.get("iscrowd", 0))))
            x, y, w, h = ann["bbox"]
            box = ET.SubElement(obj, "bndbox")  # 1-based inclusive pixels
            for key, value in (("xmin", x + 1), ("ymin", y + 1), ("xmax", x + w), ("ymax", y + h)):
                ET.SubElement(box, key).text = f"{value:g}"
        xml = ET.tostring(root)
        atomic_write(os.path.join(folder, "Annotations", image_id + ".xml"), lambda f: f.write(xml))
        ids.append(image_id)
    listing = "".join(i + "\n" for i in ids).encode()
    atomic_write(os.path.join(folder, "ImageSets", "Main", f"{split}.txt"), lambda f: f.write(listing))
    return len(ids)


def format_report(report):
    lines = [f"{report['images']} images, {report['objects']} objects ({report['difficult']} difficult, ignored as "
             f"crowd; {report['truncated']} truncated, kept)"]
    for key, what in (("missing_xml", "images without an annotation file (skipped)"),
                      ("malformed_xml", "unreadable annotation files (image skipped)"),
                      ("unknown_class", "objects of a class not in the list (skipped)"),
                      ("broken_box", "objects without a valid box (skipped)")):
        if report[key]:
            lines.append(f"  {len(report[key])} {what}: " + "; ".join(report[key][:5])
                         + (" ..." if len(report[key]) > 5 else ""))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser("python -m aligndet.data.voc", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("to-coco", help="write the images and boxes of VOC sets as one COCO json")
    c.add_argument("--voc-root", required=True, help="the VOCdevkit folder (holding VOC2007, VOC2012, ...)")
    c.add_argument("--sets", nargs="+", required=True, help="YEAR-SPLIT, e.g. 2007-trainval 2012-trainval")
    c.add_argument("--out", required=True, help="json to write")
    c.add_argument("--classes-from-data", action="store_true", help="the class names found, sorted, instead of "
                   "the 20 standard ones")
    e = sub.add_parser("from-coco", help="write a COCO json's images and boxes as a VOC set (e.g. to try the VOC "
                       "path on the demo data)")
    e.add_argument("--json", required=True, help="COCO instances json")
    e.add_argument("--images", required=True, help="folder its file_names are relative to")
    e.add_argument("--voc-root", required=True, help="the VOCdevkit folder to write into")
    e.add_argument("--set", required=True, help="YEAR-SPLIT to write, e.g. 2007-trainval")
    args = p.parse_args(argv)
    if args.command == "from-coco":
        year, split = parse_set(args.set)
        count = coco_to_voc(args.json, args.images, args.voc_root, year, split)
        print(f"wrote {count} images as VOC{year} {split} under {args.voc_root}")
        return count
    try:
        coco, report = voc_to_coco(args.voc_root, args.sets, classes_from_data=args.classes_from_data)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    atomic_write(args.out, lambda f: f.write(json.dumps(coco).encode()))
    print(format_report(report) + f"\nwrote {args.out} ({len(coco['categories'])} categories)")
    return coco, report


if __name__ == "__main__":
    main()
