"""Selective search and the proposal filter for one image; ``proposals.py`` runs them over datasets.

Search: OpenCV's selective search in ``fast`` (2 colour spaces x 2
strategies), ``quality`` or ``single`` (one colour space, one strategy) mode,
on the image shrunk so its longer side is at most ``search_side`` px (never
enlarged), boxes mapped back to the original pixels. ``decode="reduced"`` lets
the JPEG decoder itself produce the smaller image (libjpeg's DCT scaling by
1/2, 1/4 or 1/8), which skips most of the decoding work.

Filters (official, for COCO): keep a box when both sides are at least
``min_size`` px, ``1/max_aspect <= w/h <= max_aspect`` and
``sqrt(wh) / sqrt(WH) <= max_scale``; when no box survives, keep those that
pass the minimum size and the aspect rule, then those that pass the minimum
size alone, as the official proposals' post-processing does (docs/method.md
§5); an image where even that leaves nothing gets no proposals and is counted.
A value of 0 turns a rule off. Then optional NMS (earlier-ranked boxes win)
and a cap on the count.
"""
import ctypes
import math

import cv2
import numpy as np

from aligndet.data.images import read_rgb, read_rgb_reduced

MODES = ("fast", "quality", "single")


def _c_library():
    try:
        libc = ctypes.CDLL(None)  # the C library of this process, whose rand() OpenCV's search draws from
        return libc if hasattr(libc, "srand") else None
    except (OSError, TypeError):
        return None


_LIBC = _c_library()


def selective_search(image, mode="fast", search_side=0, original_size=None):
    """Selective search on an RGB uint8 image ``[H, W, 3]``.

    Returns int64 ``[N, 4]`` xyxy boxes in OpenCV's rank order (hierarchy level
    times a random factor, seeded per call), in pixels of ``image``, or of an
    image of ``original_size`` ``(height, width)`` that ``image`` is a shrunken
    copy of (reduced decoding). ``search_side > 0`` shrinks the image so its
    longer side is at most that many pixels before the search; a smaller image
    is searched as it is.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    height, width = image.shape[:2]
    out_height, out_width = original_size or (height, width)
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if search_side and max(height, width) > search_side:
        scale = search_side / max(height, width)
        bgr = cv2.resize(bgr, (max(1, round(width * scale)), max(1, round(height * scale))),
                         interpolation=cv2.INTER_AREA)
    if _LIBC is not None:
        # OpenCV ranks regions by hierarchy level times std::rand(), so the order (not the set) of the
        # boxes changes from call to call; a fixed seed makes caches and first-K choices reproducible.
        _LIBC.srand(1)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    {"fast": search.switchToSelectiveSearchFast, "quality": search.switchToSelectiveSearchQuality,
     "single": search.switchToSingleStrategy}[mode]()
    xywh = search.process().astype(np.float64).reshape(-1, 4)  # [N, 4] x, y, w, h in the searched image
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    boxes[:, 0::2] *= out_width / bgr.shape[1]
    boxes[:, 1::2] *= out_height / bgr.shape[0]
    boxes = np.round(boxes)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, out_width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, out_height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep].astype(np.int64)


def read_for_search(path, search_side=0, decode="full"):
    """Decode ``path`` for a search at ``search_side``: (RGB uint8 image, original (height, width)).

    With ``decode="reduced"`` and a JPEG, the decoder scales by 1/2, 1/4 or 1/8,
    the most that keeps the longer side at least ``search_side`` (PIL's draft
    mode); other files, and ``decode="full"``, are decoded at full size.
    """
    if decode not in ("full", "reduced"):
        raise ValueError(f"decode must be 'full' or 'reduced', got {decode!r}")
    if decode == "reduced" and search_side:
        return read_rgb_reduced(path, search_side)
    image = read_rgb(path)
    return image, image.shape[:2]


def filter_proposals(boxes, image_size, min_size=32, max_aspect=3.0, max_scale=0.8):
    """The official proposal filter with its fall-backs (module docstring).

    Args:
        boxes: ``[N, 4]`` xyxy pixels. image_size: ``(height, width)``.
    Returns:
        (kept boxes, level): level 0 = all rules held, 1 = relaxed to the
        minimum size and the aspect rule, 2 = relaxed to the minimum size alone,
        3 = not even that held (no box kept).
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    height, width = image_size
    w = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    h = (boxes[:, 3] - boxes[:, 1]).astype(np.float64)
    size_ok = (w >= min_size) & (h >= min_size) if min_size else np.ones(len(boxes), bool)
    size_aspect_ok = size_ok & ((w <= max_aspect * h) & (h <= max_aspect * w) if max_aspect else True)
    strict = size_aspect_ok & (np.sqrt(w * h) <= max_scale * math.sqrt(height * width) if max_scale else True)
    for level, keep in enumerate((strict, size_aspect_ok, size_ok)):
        if keep.any():
            return boxes[keep], level
    return boxes[:0], 3


def nms_in_rank_order(boxes, iou_threshold):
    """Greedy NMS where an earlier box beats a later one: indices kept, ascending.
    Plain numpy, so the proposal tool needs no torch."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    alive = np.ones(len(boxes), bool)
    for i in range(len(boxes)):
        if not alive[i]:
            continue
        rest = np.flatnonzero(alive[i + 1:]) + i + 1
        if not len(rest):
            break
        iw = np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0])
        ih = np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1])
        inter = iw.clip(0) * ih.clip(0)
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, 1e-12)
        alive[rest[iou > iou_threshold]] = False
    return np.flatnonzero(alive)


def make_proposals(image, mode="fast", search_side=0, min_size=32, max_aspect=3.0, max_scale=0.8,
                   nms_iou=0.0, top_k=0, decode="full", original_size=None):
    """Selective search, filter, optional NMS and cap for one RGB uint8 image
    (``original_size``: see ``selective_search``; ``decode`` is only recorded).
    Returns (int64 [N, 4] xyxy boxes in rank order, filter relaxation level)."""
    boxes = selective_search(image, mode, search_side, original_size)
    boxes, level = filter_proposals(boxes, original_size or image.shape[:2], min_size, max_aspect, max_scale)
    if nms_iou and len(boxes):
        boxes = boxes[nms_in_rank_order(boxes, nms_iou)]
    if top_k:
        boxes = boxes[:top_k]
    return boxes, level


def propose_file(path, settings):
    """Decode ``path`` as ``settings`` say and make its proposals:
    (boxes in original pixels, filter level, original (height, width))."""
    image, size = read_for_search(path, settings["search_side"], settings.get("decode", "full"))
    boxes, level = make_proposals(image, original_size=size, **settings)
    return boxes, level, size
