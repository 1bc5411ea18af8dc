"""COCO box AP, and mask AP for detectors with masks, with pycocotools.

Detections arrive in the detector convention (``boxes`` xyxy pixels in the
original image, ``scores``, ``labels`` in ``1..K``, optionally ``masks``
[M, 1, H, W] probabilities) and are turned into COCO results (``bbox`` xywh
pixels, ``category_id`` through ``label_to_cat``, ``segmentation`` the RLE of
the mask thresholded at 0.5). Evaluation covers exactly the images that were
evaluated (``params.imgIds``), so a subset of a validation set is scored fairly.

With masks, ``COCOeval(iouType="segm")`` runs next to the box evaluation and
its 12 stats join the box ones with a ``mask_`` prefix (``mask_AP``, ...). A
ground-truth instance without a usable segmentation counts as a crowd region
in mask AP (a detection on it is neither a hit nor a miss).
"""
import contextlib
import copy
import io
import logging

import torch
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_convert

from aligndet.data.masks import encode, segmentation_problem
from aligndet.distributed import all_gather_object, is_main_process

logger = logging.getLogger(__name__)

# Order of COCOeval.stats for iouType "bbox".
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
              "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
MASK_STAT_NAMES = tuple(f"mask_{name}" for name in STAT_NAMES)  # the same for iouType "segm"


def to_coco_results(image_id, output, label_to_cat):
    """One image's detections as COCO result dicts (plain python numbers)."""
    boxes = torch.as_tensor(output["boxes"]).detach().float().cpu().reshape(-1, 4)
    boxes = box_convert(boxes, in_fmt="xyxy", out_fmt="xywh")  # [M, 4] pixels
    scores = torch.as_tensor(output["scores"]).detach().float().cpu().reshape(-1).tolist()
    labels = torch.as_tensor(output["labels"]).detach().cpu().reshape(-1).tolist()
    masks = [None] * len(labels)
    if "masks" in output:  # [M, 1, H, W] probabilities -> binary -> RLE
        masks = encode((torch.as_tensor(output["masks"]).detach().cpu()[:, 0] > 0.5).numpy())
    results = []
    for box, score, label, mask in zip(boxes.tolist(), scores, labels, masks):
        if label not in label_to_cat:
            raise ValueError(f"image {image_id}: predicted label {label} has no category; "
                             f"labels must be in 1..{len(label_to_cat)}")
        results.append({"image_id": image_id, "category_id": label_to_cat[label],
                        "bbox": box, "score": score, **({"segmentation": mask} if mask else {})})
    return results


class CocoEvaluator:
    """Collects detections batch by batch, then scores them with COCOeval.

    ``synchronize()`` and ``summarize()`` are collective under torchrun: call
    them on every rank. Images seen twice (DistributedSampler pads the last
    batch by repeating images) count once.
    """

    def __init__(self, coco_gt, label_to_cat):
        self.coco_gt = coco_gt
        self.label_to_cat = {int(k): int(v) for k, v in label_to_cat.items()}
        self.results = {}  # image_id -> list of COCO result dicts
        self._synchronized = False

    def update(self, targets_or_image_ids, outputs):
        """Add a batch: targets (dicts with ``image_id``) or image ids, and outputs."""
        if len(targets_or_image_ids) != len(outputs):
            raise ValueError(f"{len(targets_or_image_ids)} targets but {len(outputs)} outputs")
        for t, output in zip(targets_or_image_ids, outputs):
            image_id = int(t["image_id"]) if isinstance(t, dict) else int(t)
            self.results.setdefault(image_id, to_coco_results(image_id, output, self.label_to_cat))
        self._synchronized = False

    def synchronize(self):
        """Merge every rank's results (a no-op in one process)."""
        merged = {}
        for part in all_gather_object(self.results):
            for image_id, dets in part.items():
                merged.setdefault(image_id, dets)
        self.results = merged
        self._synchronized = True

    def summarize(self, verbose=True):
        """Run COCOeval on rank 0 and return ``{name: value}`` for all 12 stats on every rank.

        ``verbose`` prints pycocotools' table on rank 0.
        """
        if not self._synchronized:
            self.synchronize()
        stats = None
        if is_main_process():
            results = [r for dets in self.results.values() for r in dets]
            stats = _box_and_mask_ap(self.coco_gt, results, sorted(self.results), verbose)
        return all_gather_object(stats)[0]


def evaluate_detections(coco_gt, detections, label_to_cat, image_ids=None, verbose=True, use_categories=True):
    """COCO box AP (and mask AP) of ``detections`` against ``coco_gt`` (a ``pycocotools.coco.COCO``).

    Args:
        detections: ``{image_id: {"boxes" [M, 4] xyxy, "scores" [M], "labels" [M]}}``,
            with ``"masks"`` [M, 1, H, W] for mask AP too.
        label_to_cat: ``{label: category_id}``.
        image_ids: images to score (images without detections count as misses);
            default: the keys of ``detections``.
        use_categories: False scores class-agnostic detections against every ground-truth box,
            whatever its category (COCOeval's ``useCats = 0``).
    Returns:
        dict with the 12 ``STAT_NAMES`` (and the 12 ``MASK_STAT_NAMES`` for detections
        with masks). Without any detection all are 0.0.
        COCOeval reports -1 for a stat with no ground truth (e.g. no small objects).
    """
    image_ids = sorted(int(i) for i in (detections if image_ids is None else image_ids))
    results = []
    for image_id in image_ids:
        if image_id in detections:
            results += to_coco_results(image_id, detections[image_id], label_to_cat)
    return _box_and_mask_ap(coco_gt, results, image_ids, verbose, use_categories)


def _box_and_mask_ap(coco_gt, results, image_ids, verbose, use_categories=True):
    """Box AP of the results; mask AP too (``mask_`` names) where they carry segmentations."""
    with_masks = any("segmentation" in r for r in results)
    stats = _run_cocoeval(coco_gt, [{k: v for k, v in r.items() if k != "segmentation"} for r in results],
                          image_ids, verbose, use_categories=use_categories)
    if with_masks:
        if verbose:
            print("mask AP (segm):")
        # Without "bbox", loadRes takes each result's box and area from its mask.
        segm = _run_cocoeval(_mask_ground_truth(coco_gt), [{k: v for k, v in r.items() if k != "bbox"}
                                                           for r in results], image_ids, verbose, "segm",
                             use_categories)
        stats.update({f"mask_{name}": value for name, value in segm.items()})
    return stats


def _mask_ground_truth(coco_gt):
    """A copy of ``coco_gt`` for COCOeval segm: an annotation without a usable segmentation
    becomes a crowd region covering its box (COCOeval needs a mask for every annotation)."""
    gt = copy.copy(coco_gt)
    gt.anns = {}
    for ann_id, ann in coco_gt.anns.items():
        info = coco_gt.imgs.get(ann["image_id"], {})
        if segmentation_problem(ann.get("segmentation"), info.get("height"), info.get("width")) is not None:
            x, y, w, h = ann["bbox"]
            ann = dict(ann, iscrowd=1, segmentation=[[x, y, x + w, y, x + w, y + h, x, y + h]])
        gt.anns[ann_id] = ann
    gt.imgToAnns = {i: [gt.anns[a["id"]] for a in anns] for i, anns in coco_gt.imgToAnns.items()}
    return gt


def _run_cocoeval(coco_gt, results, image_ids, verbose, iou_type="bbox", use_categories=True):
    """COCOeval (``iou_type`` "bbox" or "segm") of COCO result dicts, restricted to ``image_ids``."""
    unknown = sorted(set(image_ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise ValueError(f"{len(unknown)} evaluated image ids are not in the ground truth, "
                         f"e.g. {unknown[:5]}")
    if not results:
        logger.warning("no detections on %d images; every COCO stat is 0", len(image_ids))
        return dict.fromkeys(STAT_NAMES, 0.0)

    _ensure_gt_area(coco_gt)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # loadRes writes ids and areas into the dicts it gets; give it copies.
        coco_dt = coco_gt.loadRes([dict(r) for r in results])
        coco_eval = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        coco_eval.params.imgIds = image_ids
        coco_eval.params.useCats = int(use_categories)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    if verbose:  # the 12-line table, without pycocotools' progress lines
        print("\n".join(line for line in out.getvalue().splitlines() if "Average" in line))
    return {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}


def _ensure_gt_area(coco_gt):
    """COCOeval needs ``area`` on every gt annotation; fill it from the box if absent."""
    missing = [ann for ann in coco_gt.anns.values() if "area" not in ann]
    if missing:
        logger.warning("%d ground-truth annotations have no 'area'; using box width * height",
                       len(missing))
        for ann in missing:
            ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])

