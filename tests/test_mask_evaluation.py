"""COCO mask AP (COCOeval segm) next to box AP."""
import contextlib
import io

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from aligndet.evaluation import MASK_STAT_NAMES, STAT_NAMES, CocoEvaluator, evaluate_detections

SIZE = 64
LABEL_TO_CAT = {1: 7, 2: 20}
# image id -> [(polygon, category id)]; boxes are the polygons' extents.
OBJECTS = {
    1: [([5, 5, 30, 5, 30, 40, 5, 40], 7), ([35, 10, 60, 20, 40, 55], 20)],
    2: [([10, 30, 50, 30, 30, 60], 7)],
}


def _box(polygon):
    xs, ys = polygon[0::2], polygon[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def make_gt(broken=()):
    """COCO ground truth with polygon masks; annotation ids in ``broken`` lose their segmentation."""
    anns = []
    for image_id, objects in OBJECTS.items():
        for polygon, cat in objects:
            ann = {"id": len(anns) + 1, "image_id": image_id, "bbox": _box(polygon), "category_id": cat,
                   "area": _box(polygon)[2] * _box(polygon)[3], "iscrowd": 0, "segmentation": [polygon]}
            if ann["id"] in broken:
                del ann["segmentation"]
            anns.append(ann)
    coco = COCO()
    coco.dataset = {"images": [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in OBJECTS],
                    "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in (7, 20)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def detections(masks_of=lambda polygon: polygon):
    """The ground truth as detections, each mask rasterised from ``masks_of(polygon)``."""
    cat_to_label = {c: label for label, c in LABEL_TO_CAT.items()}
    out = {}
    for image_id, objects in OBJECTS.items():
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (_box(p) for p, _ in objects)], dtype=torch.float)
        masks = [mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([masks_of(p)], SIZE, SIZE)))
                 for p, _ in objects]
        out[image_id] = {"boxes": boxes, "scores": torch.linspace(1.0, 0.9, len(objects)),
                         "labels": torch.tensor([cat_to_label[c] for _, c in objects]),
                         "masks": torch.from_numpy(np.stack(masks)).float()[:, None] * 0.9}  # probabilities
    return out


def test_ground_truth_masks_as_predictions_are_perfect(capsys):
    stats = evaluate_detections(make_gt(), detections(), LABEL_TO_CAT)
    assert list(stats) == list(STAT_NAMES) + list(MASK_STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["mask_AP"] == pytest.approx(1.0)
    assert stats["mask_AR100"] == pytest.approx(1.0)
    assert "mask AP (segm)" in capsys.readouterr().out


def test_right_boxes_with_wrong_masks_score_only_box_ap():
    """Masks shifted by 12 px: the boxes are still perfect, the masks are not."""
    shifted = detections(lambda p: [v + 12 if i % 2 == 0 else v for i, v in enumerate(p)])
    stats = evaluate_detections(make_gt(), shifted, LABEL_TO_CAT, verbose=False)
    assert stats["AP"] == pytest.approx(1.0)
    assert stats["mask_AP"] < 0.5


def test_gt_without_a_mask_is_ignored_in_mask_ap():
    """Annotation 3 has no segmentation: mask AP counts it as a crowd region, box AP as usual."""
    stats = evaluate_detections(make_gt(broken=(3,)), detections(), LABEL_TO_CAT, verbose=False)
    assert stats["AP"] == pytest.approx(1.0) and stats["mask_AP"] == pytest.approx(1.0)
    dets = detections()
    del dets[2]  # the only detection of the broken instance goes: nothing is missed in mask AP
    stats = evaluate_detections(make_gt(broken=(3,)), dets, LABEL_TO_CAT, image_ids=[1, 2], verbose=False)
    assert stats["mask_AR100"] == pytest.approx(1.0) and stats["AR100"] < 1.0


def test_evaluator_collects_masks_batch_by_batch():
    evaluator = CocoEvaluator(make_gt(), LABEL_TO_CAT)
    for image_id, det in detections().items():
        evaluator.update([image_id], [det])
    stats = evaluator.summarize(verbose=False)
    assert stats["mask_AP"] == pytest.approx(1.0)
    assert "segmentation" in evaluator.results[1][0] and isinstance(evaluator.results[1][0]["segmentation"]["counts"],
                                                                    str)
