"""Shared fixtures: small datasets made on the fly."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_squares_coco(root, num_images=12, size=96, seed=0, category_ids=(3, 7)):
    """A COCO-format dataset of coloured squares (class = colour) with
    non-contiguous category ids. Returns a dict of the four finetune paths."""
    rng = np.random.default_rng(seed)
    paths = {}
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, anns = [], []
        for i in range(num_images):
            pixels = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                s = int(rng.integers(18, 36))
                x, y = (int(v) for v in rng.integers(0, size - s, 2))
                c = int(rng.integers(0, len(category_ids)))
                pixels[y:y + s, x:x + s] = 0
                pixels[y:y + s, x:x + s, c] = 255
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": category_ids[c],
                             "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
            Image.fromarray(pixels).save(os.path.join(root, split, f"{i:04d}.png"))
            images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": size, "height": size})
        cats = [{"id": c, "name": f"class{c}"} for c in category_ids]
        ann_file = os.path.join(root, f"instances_{split}.json")
        with open(ann_file, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)
        paths[f"{split}_json"], paths[f"{split}_images"] = ann_file, os.path.join(root, split)
    return paths


@pytest.fixture(scope="session")
def squares_coco(tmp_path_factory):
    return write_squares_coco(str(tmp_path_factory.mktemp("squares")))
