"""COCO-format detection dataset for fine-tuning and evaluation.

Items are ``(image, target)`` in torchvision's detection convention:

- ``image``: float32 tensor ``[3, H, W]`` in ``[0, 1]``;
- ``target["boxes"]``: float32 ``[N, 4]``, xyxy, absolute pixels;
- ``target["labels"]``: int64 ``[N]``, contiguous labels ``1..K`` (0 is background);
- ``target["image_id"]``: int, the COCO image id;
- with ``masks=True`` also ``target["masks"]``: uint8 ``[N, H, W]`` (1 inside the
  instance) and ``target["mask_valid"]``: bool ``[N]``, False where the
  annotation's segmentation is missing or broken (its box is kept; the mask
  loss leaves it out).

Category ids in the json may be anything (COCO uses 1..90 with gaps). They are
sorted and mapped to labels ``1..K``; ``cat_to_label`` / ``label_to_cat`` hold
both directions, ``class_names[label - 1]`` the name.

Bad input never reaches torch. Missing image files, degenerate or crowd boxes,
annotations of unknown categories and images left without boxes are dropped at
construction and counted (``summary()``, ``report()``); an image that cannot be
decoded at load time makes ``__getitem__`` return ``None``, which
``collate_fn`` drops.
"""
import contextlib
import io
import logging
import math
import os

import numpy as np
import torch
from PIL import Image
from pycocotools.coco import COCO
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from aligndet.data.images import WarningCap
from aligndet.data.masks import decode, segmentation_problem

logger = logging.getLogger(__name__)


class CocoDetection(torch.utils.data.Dataset):
    """Detection dataset over a COCO json and a folder of images.

    Args:
        image_dir: folder that ``file_name`` in the json is relative to.
        ann_file: COCO instances json.
        transforms: callable ``(image, target) -> (image, target)``; it receives
            a PIL RGB image and ``target["boxes"]`` as ``tv_tensors.BoundingBoxes``
            (XYXY, ``canvas_size=(H, W)``), so torchvision v2 transforms move the
            boxes with the image. ``None`` only converts to a float tensor.
        image_ids: use only these image ids, in this order (e.g. from
            ``aligndet.data.splits.label_fraction_split``). Default: all ids, sorted.
        remove_empty: drop images without valid boxes (common for training).
        masks: also decode each box's ``segmentation`` (polygons, RLE or
            uncompressed RLE); ``target["masks"]`` is then a ``tv_tensors.Mask``
            for the transforms, so flips and resizes move it with the image.
    """

    def __init__(self, image_dir, ann_file, transforms=None, image_ids=None, remove_empty=False, masks=False):
        if not os.path.isfile(ann_file):
            raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"image folder not found: {image_dir}")
        self.image_dir = str(image_dir)
        self.ann_file = str(ann_file)
        self.transforms = transforms
        self.remove_empty = remove_empty
        self.masks = masks
        self.coco = _load_coco(ann_file)

        cat_ids = sorted(self.coco.cats)
        self.cat_to_label = {cat_id: label for label, cat_id in enumerate(cat_ids, start=1)}
        self.label_to_cat = {label: cat_id for cat_id, label in self.cat_to_label.items()}
        self.class_names = [self.coco.cats[c].get("name", str(c)) for c in cat_ids]
        self.num_classes = len(cat_ids)

        if image_ids is None:
            image_ids = sorted(self.coco.imgs)
        else:
            image_ids = [int(i) for i in image_ids]
            unknown = [i for i in image_ids if i not in self.coco.imgs]
            if unknown:
                raise ValueError(f"{len(unknown)} image ids are not in {ann_file}, "
                                 f"e.g. {unknown[:5]}")

        self._counts = dict.fromkeys(
            ["images_in_json", "missing_images", "annotations", "kept_boxes", "crowd",
             "unknown_category", "invalid_boxes", "clipped_boxes", "dropped_after_clip",
             "empty_images", "removed_empty", "unreadable_images", "missing_masks", "broken_masks"], 0)
        self._counts["images_in_json"] = len(self.coco.imgs)
        self._warn = WarningCap(logger)

        self.ids, self._paths, self._boxes, self._labels, self._segmentations = [], [], [], [], []
        for image_id in image_ids:
            info = self.coco.imgs[image_id]
            path = os.path.join(self.image_dir, info["file_name"])
            if not os.path.exists(path):
                self._counts["missing_images"] += 1
                self._warn("missing", "image file %s (id %d) does not exist; skipping it",
                           path, image_id)
                continue
            boxes, labels, segmentations = self._parse_annotations(image_id, info)
            if len(boxes) == 0:
                self._counts["empty_images"] += 1
                if remove_empty:
                    self._counts["removed_empty"] += 1
                    continue
            self.ids.append(image_id)
            self._paths.append(path)
            self._boxes.append(boxes)
            self._labels.append(labels)
            self._segmentations.append(segmentations)
        if not self.ids:
            logger.warning("no usable images in %s: %s", ann_file, self.report())

    def _parse_annotations(self, image_id, info):
        """Valid, non-crowd boxes of one image: float32 [N, 4] xyxy, int64 [N] labels and, with
        ``masks``, their N segmentations (None where missing or broken, counted)."""
        width, height = info.get("width"), info.get("height")
        boxes, labels, segmentations = [], [], []
        for ann in self.coco.imgToAnns.get(image_id, []):
            self._counts["annotations"] += 1
            cat_id = ann.get("category_id")
            if cat_id not in self.cat_to_label:
                self._counts["unknown_category"] += 1
                self._warn("category", "annotation %s (image %d) has category id %s, which is "
                           "not in categories; skipping it", ann.get("id"), image_id, cat_id)
                continue
            if ann.get("iscrowd", 0):
                # Crowd regions are not instances to learn; COCOeval ignores
                # matches to them on the ground-truth side.
                self._counts["crowd"] += 1
                continue
            bbox = ann.get("bbox")
            if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
                    or bbox[2] <= 0 or bbox[3] <= 0):
                self._counts["invalid_boxes"] += 1
                continue
            x, y, w, h = bbox
            box = [x, y, x + w, y + h]  # xywh -> xyxy, pixels
            if width and height:
                clipped = [min(max(box[0], 0), width), min(max(box[1], 0), height),
                           min(max(box[2], 0), width), min(max(box[3], 0), height)]
                if clipped != box:
                    if clipped[2] <= clipped[0] or clipped[3] <= clipped[1]:
                        self._counts["dropped_after_clip"] += 1
                        continue
                    self._counts["clipped_boxes"] += 1
                    box = clipped
            boxes.append(box)
            labels.append(self.cat_to_label[cat_id])
            if self.masks:
                segmentations.append(self._check_segmentation(ann, image_id, height, width))
        self._counts["kept_boxes"] += len(boxes)
        return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                np.asarray(labels, dtype=np.int64), segmentations)

    def _check_segmentation(self, ann, image_id, height, width):
        """The annotation's segmentation if it can be decoded, else None (counted, warned)."""
        problem = segmentation_problem(ann.get("segmentation"), height, width)
        if problem is None:
            return ann["segmentation"]
        self._counts["missing_masks" if problem == "missing" else "broken_masks"] += 1
        self._warn("mask", "annotation %s (image %d): %s segmentation; its box is kept, without a mask",
                   ann.get("id"), image_id, problem)
        return None

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        image_id, path = self.ids[index], self._paths[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")  # decodes now, so corrupt files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # Counted in this process only (DataLoader workers keep their own count).
            self._counts["unreadable_images"] += 1
            logger.warning("cannot read image %s (id %d): %s; skipping it", path, image_id, e)
            return None

        boxes = torch.from_numpy(self._boxes[index].copy())  # [N, 4] xyxy pixels
        info = self.coco.imgs[image_id]
        json_size = (info.get("width"), info.get("height")) == (image.width, image.height)
        if not json_size:
            self._warn("size", "image %s is %dx%d but the json says %sx%s; clipping boxes to "
                       "the real size", path, image.width, image.height,
                       info.get("width"), info.get("height"))
        boxes[:, 0::2].clamp_(0, image.width)
        boxes[:, 1::2].clamp_(0, image.height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY",
                                              canvas_size=(image.height, image.width)),
            "labels": torch.from_numpy(self._labels[index])[keep],
            "image_id": image_id,
        }
        if self.masks:
            masks, valid = self._decode_masks(index, image.height, image.width, json_size)
            target["masks"], target["mask_valid"] = tv_tensors.Mask(masks[keep]), valid[keep]
        if self.transforms is not None:
            image, target = self.transforms(image, target)

        if isinstance(image, Image.Image):
            image = F.to_image(image)
        image = F.to_dtype(image, torch.float32, scale=True).as_subclass(torch.Tensor)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor).float().reshape(-1, 4)
        target["labels"] = torch.as_tensor(target["labels"], dtype=torch.int64)
        if self.masks:
            target["masks"] = target["masks"].as_subclass(torch.Tensor).to(torch.uint8)
        return image, target

    def _decode_masks(self, index, height, width, json_size):
        """uint8 [N, H, W] masks of image ``index`` at its real size, and bool [N] valid flags.
        ``json_size``: the image has the json's size, which the segmentations were checked against."""
        masks = np.zeros((len(self._segmentations[index]), height, width), dtype=np.uint8)
        valid = np.zeros(len(masks), dtype=bool)
        for i, segmentation in enumerate(self._segmentations[index]):
            if segmentation is None:
                continue
            # Polygons rasterise at any size; an RLE of the json's size cannot fit another.
            if json_size or segmentation_problem(segmentation, height, width) is None:
                masks[i], valid[i] = decode(segmentation, height, width), True
            else:
                self._warn("mask size", "image id %d: an RLE mask of the json's size does not fit the %dx%d "
                           "image; training that instance without a mask", self.ids[index], width, height)
        return torch.from_numpy(masks), torch.from_numpy(valid)

    def summary(self):
        """Counts of everything skipped, clipped or kept, as a dict of ints."""
        return dict(self._counts, images=len(self.ids))

    def report(self):
        """The summary as one human-readable paragraph."""
        c = self.summary()
        return (f"{self.ann_file}: using {c['images']} of {c['images_in_json']} images "
                f"({c['missing_images']} missing on disk, {c['empty_images']} without valid "
                f"boxes, {c['removed_empty']} of those removed, {c['unreadable_images']} "
                f"unreadable so far). Of {c['annotations']} annotations, {c['kept_boxes']} "
                f"boxes are used: {c['crowd']} crowd, {c['unknown_category']} with an unknown "
                f"category and {c['invalid_boxes']} with non-positive or invalid size were "
                f"skipped; {c['clipped_boxes']} were clipped to the image and "
                f"{c['dropped_after_clip']} dropped as empty after clipping. "
                f"{self.num_classes} classes."
                + (f" Masks: {c['missing_masks']} boxes without a segmentation and {c['broken_masks']} with a "
                   "broken one train without a mask." if self.masks else ""))


def _load_coco(ann_file):
    """pycocotools.COCO without its progress prints, with the file named on errors."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(ann_file))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        # json.JSONDecodeError is a ValueError; missing keys are KeyErrors.
        raise ValueError(f"cannot parse COCO annotation file {ann_file}: "
                         f"{type(e).__name__}: {e}") from e


def collate_fn(batch):
    """Batch as ``(images, targets)``, two lists, dropping ``None`` (unreadable) items.

    Images keep their own sizes; the detector resizes and pads inside. A batch in
    which every item was unreadable gives ``([], [])``; the training loop skips it.
    """
    batch = [item for item in batch if item is not None]
    if not batch:
        return [], []
    images, targets = zip(*batch)
    return list(images), list(targets)
