"""Instance masks in COCO's three encodings, through ``pycocotools.mask``.

A COCO ``segmentation`` is one of:
- polygons: a list of ``[x1, y1, x2, y2, ...]`` outlines in pixels;
- uncompressed RLE: ``{"size": [H, W], "counts": [run lengths]}`` (crowd regions use it);
- compressed RLE: ``{"size": [H, W], "counts": "<COCO's string code>"}``.

``segmentation_problem`` says why one cannot be used (the caller counts it and
keeps the box); ``decode`` rasterises a usable one; ``encode`` turns predicted
binary masks into the compressed RLE that ``COCOeval(iouType="segm")`` reads.
"""
import math

import numpy as np
from pycocotools import mask as mask_utils


def segmentation_problem(segmentation, height, width):
    """None if ``segmentation`` can be decoded onto an ``height`` x ``width``
    image, else a short reason ("missing", "empty polygon", "RLE size ...")."""
    if segmentation is None:
        return "missing"
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty polygon"
        for polygon in segmentation:
            if isinstance(polygon, (list, tuple)) and not polygon:
                return "empty polygon"
            if (not isinstance(polygon, (list, tuple)) or len(polygon) < 6 or len(polygon) % 2
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in polygon)):
                return "malformed polygon"
        return None
    if isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not isinstance(size, (list, tuple)) or len(size) != 2 or not isinstance(counts, (list, str, bytes)):
            return "malformed RLE"
        if height is None or width is None:  # the json gives no size: checked against the decoded image later
            return None
        if [int(size[0]), int(size[1])] != [int(height), int(width)]:
            return f"RLE size {list(size)} is not the image's [{height}, {width}]"
        if isinstance(counts, list) and sum(counts) != height * width:
            return f"RLE run lengths sum to {sum(counts)}, not {height} x {width}"
        return None
    return f"unknown segmentation type {type(segmentation).__name__}"


def decode(segmentation, height, width):
    """A usable segmentation (``segmentation_problem`` is None) -> uint8 [H, W], 1 inside.
    Polygons are rasterised at this size, so parts outside the image are clipped."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)  # uncompressed -> compressed
    else:  # compressed; pycocotools wants its counts as bytes
        counts = segmentation["counts"]
        rle = dict(segmentation, counts=counts.encode("ascii") if isinstance(counts, str) else counts)
    return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def encode(masks):
    """Binary masks uint8/bool [N, H, W] -> COCO compressed RLEs with ``counts`` as str (json-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.asarray(masks, dtype=np.uint8).transpose(1, 2, 0)))
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles
