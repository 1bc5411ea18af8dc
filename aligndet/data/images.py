"""Finding and decoding unlabeled images: an image folder (recursive) or a COCO json.

Box-domain pre-training and proposal generation read images without labels,
from either source. Both list them as ``ImageRecord(key, path, image_id)``:

- ``key``: the image's path relative to the image folder, with ``/``
  separators (for a COCO json: its ``file_name``). Proposal caches are keyed
  by it, so a cache built from a folder also serves a json over the same files.
- ``image_id``: the json's id, or ``1..N`` in sorted key order for a folder.

``read_rgb`` decodes any file PIL reads into RGB uint8, including greyscale,
palette, RGBA (alpha dropped), CMYK and 16-bit or float greyscale (rescaled
to 8 bits, not clipped), and raises ``ImageReadError`` naming the file on
anything else. Datasets skip such files, count them, and warn through a
``WarningCap``, so a folder of broken files gives a few lines, not thousands.
"""
import json
import math
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

# Per-item warnings of one kind stop after this many; the rest only count.
MAX_WARNINGS_PER_KIND = 10


class ImageReadError(OSError):
    """An image file is missing, empty, truncated or not an image."""


class WarningCap:
    """``cap(kind, msg, *args)`` logs ``logger.warning(msg, *args)`` for the first
    ``limit`` calls of each ``kind``, then one line saying that the rest are not
    shown; the dataset's ``summary()`` still counts every case."""

    def __init__(self, logger, limit=MAX_WARNINGS_PER_KIND):
        self.logger, self.limit = logger, limit
        self.calls = {}  # kind -> calls so far

    def __call__(self, kind, msg, *args):
        n = self.calls.get(kind, 0)
        if n < self.limit:
            self.logger.warning(msg, *args)
        elif n == self.limit:
            self.logger.warning("further '%s' warnings are not shown; see summary()", kind)
        self.calls[kind] = n + 1


class ImageRecord(NamedTuple):
    key: str       # path relative to the image folder, '/'-separated
    path: str      # path on disk
    image_id: int  # COCO id, or 1..N for a folder


def read_rgb(path):
    """Decode ``path`` into an RGB uint8 array ``[H, W, 3]``."""
    return _decode(path)[0]


def read_rgb_reduced(path, min_side):
    """Decode ``path`` shrunk by the JPEG decoder: (RGB uint8 array, full (height, width)).

    A JPEG decodes at 1/2, 1/4 or 1/8 scale, the smallest whose longer side is
    still at least ``min_side`` px (PIL's draft mode: the DCT is scaled, so
    most of the decoding work is skipped); other formats decode at full size.
    """
    return _decode(path, min_side)


def _decode(path, min_side=0):
    """(RGB uint8 array, the file's full (height, width)); JPEGs shrunk by the decoder for ``min_side``."""
    try:
        with Image.open(path) as im:
            full_size = (im.height, im.width)
            if min_side and im.format == "JPEG" and max(im.size) > min_side:
                scale = min_side / max(im.size)
                im.draft(None, (math.ceil(im.width * scale), math.ceil(im.height * scale)))
            im.load()  # decode now, so truncated files fail here
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                array = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(array.max()), 1.0)
                grey = np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
                return np.repeat(grey[..., None], 3, axis=2), full_size
            return np.array(im.convert("RGB")), full_size  # writable, unlike np.asarray of a PIL image
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ImageReadError(f"cannot read image {path}: {e}") from e


def list_image_folder(root):
    """Every image file under ``root`` (recursive, by extension), sorted by key."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    keys = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                keys.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    keys.sort()
    return [ImageRecord(k, os.path.join(root, k), i) for i, k in enumerate(keys, start=1)]


def list_coco_images(ann_file, image_root):
    """The images of a COCO json (its annotations ignored), sorted by id.

    Files that do not exist are kept: readers count them as failures.
    """
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            images = json.load(f)["images"]
        records = [ImageRecord(str(im["file_name"]).replace(os.sep, "/"),
                               os.path.join(image_root, im["file_name"]), int(im["id"]))
                   for im in images]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"cannot read the image list of {ann_file}: {type(e).__name__}: {e}") from e
    records.sort(key=lambda r: r.image_id)
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{ann_file} lists the same file_name twice")
    return records


def list_images(image_root, ann_file=None):
    """Images of a COCO json (when given) or of a folder tree."""
    if ann_file:
        return list_coco_images(ann_file, image_root)
    return list_image_folder(image_root)
