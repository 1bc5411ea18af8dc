"""Two augmented views of one image and its proposals, for box-domain pre-training.

AlignDet (section 3.2 of the paper, docs/method.md §5) trains the online
detector on view ``x1 = t1(x)`` and the momentum detector on ``x2 = t2(x)``,
where ``t1, t2`` are two independent draws of one random augmentation and the
selective-search proposals ``P`` move with the image: ``P1 = t1(P)``,
``P2 = t2(P)``. Proposal ``i`` carries **instance id** ``i`` in both views;
the box contrastive loss pairs predictions across views by that id.

An item of ``TwoViewDataset`` is::

    {"image_id": int, "key": str, "orig_size": (H, W), "num_proposals": K,
     "proposals": float32 [K, 4] xyxy pixels of the original image (id i = row i),
     "views": [view1, view2]}
    view = {"image": float32 [3, h, w] in [0, 1],  # no normalisation: the detector does it
            "boxes": float32 [M, 4] xyxy pixels of this view,
            "ids":   int64 [M], a subset of 0..K-1, increasing,
            "classes": int64 [M], the boxes' pseudo-classes (only with ``classes``, for DETR)}

``K`` is the number of proposals kept for the image; ``M <= K`` because a box
pushed out of a view by a crop is dropped from **that view only**. Ids are
never renumbered, so id ``i`` means the same proposal in both views.
With ``classes`` (DETR, docs/method.md §3.9) each box also carries its cluster
id, which follows it through every drop; boxes without one (-1) are dropped.

One view's augmentation (``build_view_transform``, the official views):
one photometric op with a random magnitude (``RandomPhotometric``), an
optional random crop (ablation, off by default), a resize with a random
short side and a capped long side, a horizontal flip, conversion to float.

Determinism: item ``index`` of epoch ``e`` depends only on ``(seed, e,
index)``, not on the DataLoader worker or the order of calls, because every
random draw inside ``__getitem__`` runs under a forked torch RNG seeded from
those three numbers (torchvision's v2 transforms draw from torch's global RNG).
"""
import logging
import math

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from .images import ImageReadError, WarningCap, read_rgb

logger = logging.getLogger(__name__)

# Official COCO views; the demo preset scales them to 128x128 scenes
# (800 -> 128, 640 -> ~104, 1333 -> ~213).
COCO_VIEW = dict(short_sides=tuple(range(640, 801, 32)), max_size=1333)
DEMO_VIEW = dict(short_sides=(104, 112, 120, 128), max_size=213)

PHOTOMETRIC_OPS = ("identity", "autocontrast", "equalize", "solarize", "color", "contrast",
                   "brightness", "sharpness", "posterize")


def apply_photometric(image, op, magnitude, sign=1, num_levels=10):
    """One photometric op on a uint8 image ``[..., 3, H, W]``; returns the same type.

    ``level = magnitude / num_levels`` (magnitude 1..9 of 10 in AlignDet) sets
    the strength:

    - color (saturation), contrast, brightness, sharpness: factor ``1 + sign * 0.9 * level``
      (``sign`` is +1 or -1, so the factor lies in ``[0.19, 1.81]``);
    - solarize: pixels ``>= 256 * (1 - level)`` are inverted;
    - posterize: keep ``8 - round(4 * level)`` bits (4..8);
    - identity, autocontrast, equalize: no magnitude.
    """
    level = magnitude / num_levels
    factor = 1.0 + sign * 0.9 * level
    if op == "identity":
        return image
    if op == "autocontrast":
        return F.autocontrast(image)
    if op == "equalize":
        return F.equalize(image)
    if op == "solarize":
        return F.solarize(image, threshold=256.0 * (1.0 - level))
    if op == "color":
        return F.adjust_saturation(image, factor)
    if op == "contrast":
        return F.adjust_contrast(image, factor)
    if op == "brightness":
        return F.adjust_brightness(image, factor)
    if op == "sharpness":
        return F.adjust_sharpness(image, factor)
    if op == "posterize":
        return F.posterize(image, bits=8 - round(4 * level))
    raise ValueError(f"unknown photometric op {op!r}; expected one of {PHOTOMETRIC_OPS}")


class RandomPhotometric(T.Transform):
    """Apply one op drawn uniformly from ``ops`` with a magnitude drawn uniformly
    from ``magnitudes`` and a random sign; see ``apply_photometric`` for the mapping.

    Only the image changes; boxes and everything else pass through. Meant for
    uint8 images (put it before ``ToDtype``).
    """

    def __init__(self, ops=PHOTOMETRIC_OPS, magnitudes=tuple(range(1, 10)), num_levels=10):
        super().__init__()
        unknown = [op for op in ops if op not in PHOTOMETRIC_OPS]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {PHOTOMETRIC_OPS}, got {ops}")
        if not magnitudes or not all(0 <= m <= num_levels for m in magnitudes):
            raise ValueError(f"magnitudes must be a non-empty list in 0..{num_levels}, "
                             f"got {magnitudes}")
        self.ops = tuple(ops)
        self.magnitudes = tuple(magnitudes)
        self.num_levels = num_levels

    def make_params(self, flat_inputs):
        # Always three draws, whatever the op, so the RNG stream has one shape.
        op = self.ops[int(torch.randint(len(self.ops), ()))]
        magnitude = self.magnitudes[int(torch.randint(len(self.magnitudes), ()))]
        sign = 1 if torch.rand(()) < 0.5 else -1
        return dict(op=op, magnitude=magnitude, sign=sign)

    def transform(self, inpt, params):
        if not isinstance(inpt, tv_tensors.Image):
            return inpt
        return apply_photometric(inpt, params["op"], params["magnitude"], params["sign"],
                                 self.num_levels)


class RandomAreaCrop(T.Transform):
    """Crop a random window covering ``scale`` of the image area with aspect
    ratio (w/h) in ``ratio`` (log-uniform), without resizing.

    The window is drawn like ``RandomResizedCrop``'s (10 tries, then the whole
    image), but the output keeps the window's size so the resize that follows
    sets the scale. Boxes are shifted and clipped to the window; a box outside
    it becomes degenerate and must be removed by ``SanitizeBoundingBoxes``.
    """

    def __init__(self, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)):
        super().__init__()
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)

    def make_params(self, flat_inputs):
        image = next(x for x in flat_inputs if isinstance(x, tv_tensors.Image))
        height, width = F.get_size(image)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = height * width * float(torch.empty(()).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(()).uniform_(*log_ratio)))
            w = int(round(math.sqrt(area * aspect)))
            h = int(round(math.sqrt(area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(height - h + 1, ()))
                left = int(torch.randint(width - w + 1, ()))
                return dict(top=top, left=left, height=h, width=w)
        return dict(top=0, left=0, height=height, width=width)

    def transform(self, inpt, params):
        if not isinstance(inpt, (tv_tensors.Image, tv_tensors.BoundingBoxes)):
            return inpt
        return F.crop(inpt, **params)


def build_view_transform(short_sides=COCO_VIEW["short_sides"], max_size=COCO_VIEW["max_size"],
                         hflip_prob=0.5, photometric=True, crop=False, crop_scale=(0.3, 1.0)):
    """One view's augmentation: ``{"image": uint8 Image, "boxes": BoundingBoxes, ...}`` in,
    the same dict out with a float32 image in ``[0, 1]`` and boxes moved with it.

    Order: photometric op on uint8 -> optional ``RandomAreaCrop`` -> resize so the
    short side is one of ``short_sides`` (long side at most ``max_size``) ->
    horizontal flip -> float. ``TwoViewDataset`` clips and sanitises the boxes
    afterwards, so this transform need not.

    Presets: ``build_view_transform(**COCO_VIEW)``, ``build_view_transform(**DEMO_VIEW)``.
    """
    ops = [RandomPhotometric()] if photometric else []
    if crop:
        ops.append(RandomAreaCrop(scale=crop_scale))
    ops += [
        T.RandomShortestSize(min_size=list(short_sides), max_size=max_size, antialias=True),
        T.RandomHorizontalFlip(p=hflip_prob),
        T.ToDtype(torch.float32, scale=True),  # images only; boxes stay float32 pixels
    ]
    return T.Compose(ops)


def _view_ids(sample):
    """Tells ``SanitizeBoundingBoxes`` to drop ids together with their boxes."""
    return sample["ids"]


class TwoViewDataset(torch.utils.data.Dataset):
    """Unlabeled images with their proposals, returned as two augmented views.

    Args:
        records: ``ImageRecord`` list (``aligndet.data.images.list_images``).
        proposals: anything with ``.get(key)`` giving a numpy array ``[N, 4]``
            (xyxy pixels, any numeric dtype) for ``record.key``, or ``None`` when
            proposals are missing for that image (e.g. generation failed).
        view_transform: callable on ``{"image": tv_tensors.Image uint8 [3, H, W],
            "boxes": tv_tensors.BoundingBoxes float32 XYXY, "ids": int64 [N]}``
            returning the same keys, e.g. ``build_view_transform(**COCO_VIEW)``.
            Called twice per item, once per view.
        max_proposals: keep at most this many proposals per image (``None``: all).
        select: ``"first"`` keeps the first ``max_proposals`` in cache order,
            ``"random"`` a random subset, redrawn every epoch. Either way the kept
            proposals stay in cache order and get ids ``0..K-1``.
        seed: base seed of every random draw (subset and both views).
        classes: anything with ``.get(key, num_boxes)`` giving an int64 array ``[N]``
            of pseudo-classes, one per box of ``proposals.get(key)`` in its order
            (``aligndet.data.clusters.ClusterIds``), or ``None``. Boxes of class -1 are
            dropped before selection, and the views carry ``"classes"``.
        skip_empty: return ``None`` for an image left without proposals (DETR, whose
            cluster ids are -1 for every box of an image unreadable when clustering)
            instead of views without boxes.

    Proposals with non-finite coordinates or ``x2 <= x1`` / ``y2 <= y1`` are
    dropped, the rest clipped to the image, before selection. Images that cannot
    be decoded or have ``None`` proposals make ``__getitem__`` return ``None``
    (``two_view_collate`` drops it). ``summary()`` counts all of this, for the
    items loaded so far in this process (DataLoader workers keep their own counts;
    every epoch counts again).

    Call ``set_epoch(e)`` before each epoch for fresh views; with DataLoader
    workers this needs ``persistent_workers=False`` (the default), so that the
    workers receive the dataset anew each epoch.
    """

    def __init__(self, records, proposals, view_transform, max_proposals=None, select="random",
                 seed=0, classes=None, skip_empty=False):
        if select not in ("first", "random"):
            raise ValueError(f"select must be 'first' or 'random', got {select!r}")
        if max_proposals is not None and (int(max_proposals) != max_proposals or max_proposals < 0):
            raise ValueError(f"max_proposals must be None or an int >= 0, got {max_proposals}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed}")
        self.records = list(records)
        self.proposals = proposals
        self.view_transform = view_transform
        self.max_proposals = None if max_proposals is None else int(max_proposals)
        self.select = select
        self.seed = int(seed)
        self.classes, self.skip_empty = classes, skip_empty
        self.epoch = 0
        self._sanitize = T.Compose([
            T.ClampBoundingBoxes(),  # partly-outside boxes are clipped, not dropped, by Sanitize
            T.SanitizeBoundingBoxes(labels_getter=_view_ids),  # drops w or h < 1 px
        ])
        self._counts = dict.fromkeys(
            ["missing_proposals", "unreadable_images", "proposals_read", "invalid_proposals",
             "clipped_proposals", "dropped_after_clip", "unclassified_proposals", "capped_proposals",
             "kept_proposals", "empty_images", "skipped_empty_images", "dropped_from_view"], 0)
        self._warn = WarningCap(logger)

    def set_epoch(self, epoch):
        """Views (and random subsets) of epoch ``epoch``; call before iterating."""
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        record = self.records[index]
        boxes = self.proposals.get(record.key)
        if boxes is None:
            self._counts["missing_proposals"] += 1
            self._warn("proposals", "no proposals for image %s; skipping it", record.key)
            return None
        try:
            rgb = read_rgb(record.path)  # [H, W, 3] uint8
        except ImageReadError as e:
            self._counts["unreadable_images"] += 1
            self._warn("unreadable", "%s; skipping it", e)
            return None
        height, width = rgb.shape[:2]
        raw = np.asarray(boxes)
        boxes, rows = self._clean_proposals(raw, record.key, height, width)  # [N, 4] xyxy, their rows in raw
        classes = None
        if self.classes is not None:  # one per cached box, in cache order
            classes = self.classes.get(record.key, len(raw) if raw.size else 0)[rows]
            classified = classes >= 0
            self._counts["unclassified_proposals"] += int((~classified).sum())
            boxes, classes = boxes[classified], classes[classified]

        # Independent streams for the subset and the views, all from (seed, epoch, index).
        subset_seq, view_seq = np.random.SeedSequence([self.seed, self.epoch, index]).spawn(2)
        keep = self._select(len(boxes), np.random.default_rng(subset_seq))
        boxes = boxes[keep]  # [K, 4]
        num_proposals = len(boxes)
        self._counts["kept_proposals"] += num_proposals
        self._counts["empty_images"] += int(num_proposals == 0)
        if num_proposals == 0 and self.skip_empty:
            self._counts["skipped_empty_images"] += 1
            self._warn("empty", "no proposal left for image %s; skipping it", record.key)
            return None

        image = tv_tensors.Image(torch.from_numpy(rgb.transpose(2, 0, 1).copy()))  # [3, H, W] uint8
        sample = {
            "image": image,
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(boxes), format="XYXY",
                                              canvas_size=(height, width)),
            "ids": torch.arange(num_proposals, dtype=torch.int64),
        }
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
            torch.manual_seed(int(view_seq.generate_state(1, np.uint64)[0]))
            views = [self._view(sample), self._view(sample)]
        if classes is not None:
            classes = torch.from_numpy(classes[keep])  # [K], row i is proposal i's
            views = [dict(view, classes=classes[view["ids"]]) for view in views]
        return {"image_id": record.image_id, "key": record.key, "orig_size": (height, width),
                "num_proposals": num_proposals, "proposals": torch.from_numpy(boxes), "views": views}

    def _clean_proposals(self, boxes, key, height, width):
        """Validated proposals as float32 ``[N, 4]`` xyxy, clipped to the image, and the rows
        of ``boxes`` they come from ``[N]``."""
        boxes = np.asarray(boxes)
        if boxes.size == 0:
            return np.zeros((0, 4), dtype=np.float32), np.zeros(0, dtype=np.int64)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or not np.issubdtype(boxes.dtype, np.number):
            raise ValueError(f"proposals of image {key} must be a numeric [N, 4] array, "
                             f"got shape {boxes.shape} and dtype {boxes.dtype}")
        boxes = boxes.astype(np.float32)
        self._counts["proposals_read"] += len(boxes)
        valid = (np.isfinite(boxes).all(axis=1)
                 & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))
        self._counts["invalid_proposals"] += int((~valid).sum())
        boxes = boxes[valid]
        clipped = boxes.copy()
        clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
        clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
        inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        self._counts["dropped_after_clip"] += int((~inside).sum())
        self._counts["clipped_proposals"] += int(((clipped != boxes).any(axis=1) & inside).sum())
        return clipped[inside], np.flatnonzero(valid)[inside]

    def _select(self, num_boxes, rng):
        """Indices of at most ``max_proposals`` of ``num_boxes`` proposals, in cache order."""
        k = self.max_proposals
        if k is None or num_boxes <= k:
            return np.arange(num_boxes)
        self._counts["capped_proposals"] += num_boxes - k
        if self.select == "first":
            return np.arange(k)
        return np.sort(rng.choice(num_boxes, size=k, replace=False))

    def _view(self, sample):
        """One random view: the transform, then boxes clipped and empty ones dropped."""
        out = self._sanitize(self.view_transform(dict(sample)))
        self._counts["dropped_from_view"] += len(sample["ids"]) - len(out["ids"])
        image = F.to_dtype(out["image"], torch.float32, scale=True)
        return {"image": image.as_subclass(torch.Tensor),
                "boxes": out["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4),
                "ids": torch.as_tensor(out["ids"], dtype=torch.int64)}

    def summary(self):
        """Counts of what was skipped, dropped, clipped or kept so far, as a dict of ints."""
        return dict(self._counts, images=len(self.records))


def two_view_collate(batch):
    """Batch as ``(views1, views2, metas)``, dropping ``None`` (skipped) items.

    ``views1[j]`` / ``views2[j]`` are image ``j``'s views ``{"image", "boxes", "ids"}``
    and ``metas[j]`` is ``{"image_id", "key", "orig_size", "num_proposals"}``.

    Ids are made unique across the batch, as the contrastive loss needs:
    image ``j``'s ids are offset by the number of proposals **kept** for images
    ``0..j-1`` (``num_proposals``), not by how many boxes survived in a view, so
    the offset is the same in both views and id ``i`` still names one proposal
    in both. A batch in which every item was skipped gives ``([], [], [])``.
    """
    batch = [item for item in batch if item is not None]
    views1, views2, metas = [], [], []
    offset = 0
    for item in batch:
        for views, view in zip((views1, views2), item["views"]):
            views.append(dict(view, ids=view["ids"] + offset))
        metas.append({k: item[k] for k in ("image_id", "key", "orig_size", "num_proposals")})
        offset += item["num_proposals"]
    return views1, views2, metas
