import contextlib
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from aligndet.data.coco import CocoDetection
from aligndet.evaluation import STAT_NAMES, CocoEvaluator, evaluate_detections

# Non-contiguous category ids, as in COCO: labels 1, 2, 3 <-> categories 5, 11, 80.
LABEL_TO_CAT = {1: 5, 2: 11, 3: 80}
CAT_TO_LABEL = {c: label for label, c in LABEL_TO_CAT.items()}
GT = {  # image_id -> list of (xywh box, category id)
    1: [([10, 10, 20, 20], 5), ([50, 40, 40, 45], 80)],
    2: [([5, 60, 30, 25], 11), ([60, 5, 35, 35], 5), ([30, 30, 12, 50], 80)],
    3: [([0, 0, 64, 64], 11)],
}


def make_gt():
    anns = []
    for image_id, objects in GT.items():
        for box, cat in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": box,
                         "category_id": cat, "area": box[2] * box[3], "iscrowd": 0})
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in GT],
        "annotations": anns,
        "categories": [{"id": c, "name": f"c{c}"} for c in sorted(CAT_TO_LABEL)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_as_detections(shift=0.0, image_ids=GT):
    """Ground truth in the detector convention: xyxy boxes, labels 1..K, score 1."""
    detections = {}
    for image_id in image_ids:
        boxes = torch.tensor([[x + shift, y, x + w + shift, y + h]
                              for (x, y, w, h), _ in GT[image_id]])
        labels = torch.tensor([CAT_TO_LABEL[c] for _, c in GT[image_id]])
        detections[image_id] = {"boxes": boxes, "scores": torch.ones(len(labels)),
                                "labels": labels}
    return detections


def test_ground_truth_as_predictions_is_perfect(capsys):
    stats = evaluate_detections(make_gt(), gt_as_detections(), LABEL_TO_CAT)
    assert list(stats) == list(STAT_NAMES)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
    assert stats["AR100"] == pytest.approx(1.0)
    assert "Average Precision" in capsys.readouterr().out


def test_class_agnostic_detections_score_against_every_box():
    """One class, "object" (label 1 -> category 5): with categories it finds only category 5's boxes; class-agnostic
    (useCats 0) every ground-truth box counts, so the ground truth as objects is perfect."""
    objects = {i: dict(d, labels=torch.ones_like(d["labels"])) for i, d in gt_as_detections().items()}
    by_class = evaluate_detections(make_gt(), objects, {1: 5}, verbose=False)
    agnostic = evaluate_detections(make_gt(), objects, {1: 5}, verbose=False, use_categories=False)
    assert agnostic["AP"] == pytest.approx(1.0) and agnostic["AR100"] == pytest.approx(1.0)
    assert by_class["AP"] < 1.0


def test_evaluator_matches_function_and_dedups():
    coco, detections = make_gt(), gt_as_detections()
    evaluator = CocoEvaluator(coco, LABEL_TO_CAT)
    evaluator.update([{"image_id": 1}, {"image_id": 2}], [detections[1], detections[2]])
    evaluator.update([3, 1], [detections[3], detections[1]])  # image 1 repeated, as padding does
    stats = evaluator.summarize(verbose=False)
    assert stats == evaluate_detections(coco, detections, LABEL_TO_CAT, verbose=False)
    assert stats["AP"] == pytest.approx(1.0)


def test_shifted_boxes_score_lower():
    coco = make_gt()
    shifted = evaluate_detections(coco, gt_as_detections(shift=6.0), LABEL_TO_CAT, verbose=False)
    assert 0 <= shifted["AP"] < 1.0 and shifted["AP75"] < 1.0


def test_evaluation_restricted_to_evaluated_images():
    coco = make_gt()
    stats = evaluate_detections(coco, gt_as_detections(image_ids=[1, 3]), LABEL_TO_CAT,
                                verbose=False)
    assert stats["AP"] == pytest.approx(1.0)  # image 2 not evaluated, so its gt is not missed
    with_misses = evaluate_detections(coco, gt_as_detections(image_ids=[1, 3]), LABEL_TO_CAT,
                                      image_ids=[1, 2, 3], verbose=False)
    assert with_misses["AR100"] < 1.0


def test_no_detections_gives_zeros():
    coco = make_gt()
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
             "labels": torch.zeros(0, dtype=torch.int64)}
    assert evaluate_detections(coco, {1: empty, 2: empty}, LABEL_TO_CAT) == \
        dict.fromkeys(STAT_NAMES, 0.0)
    assert CocoEvaluator(coco, LABEL_TO_CAT).summarize() == dict.fromkeys(STAT_NAMES, 0.0)


def test_bad_labels_and_image_ids_raise():
    coco = make_gt()
    bad = {1: {"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([0])}}
    with pytest.raises(ValueError, match="label 0"):
        evaluate_detections(coco, bad, LABEL_TO_CAT)
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluate_detections(coco, gt_as_detections(), LABEL_TO_CAT, image_ids=[1, 42])


def test_dataset_targets_evaluate_perfectly(tmp_path):
    """The dataset's label maps and box format round-trip through the evaluator."""
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    coco = make_gt()
    for i in GT:
        Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(image_dir / f"{i}.png")
    ann_file = tmp_path / "gt.json"
    ann_file.write_text(json.dumps(coco.dataset))
    ds = CocoDetection(image_dir, ann_file)
    evaluator = CocoEvaluator(ds.coco, ds.label_to_cat)
    for image, target in ds:
        output = {"boxes": target["boxes"], "labels": target["labels"],
                  "scores": torch.ones(len(target["labels"]))}
        evaluator.update([target], [output])
    stats = evaluator.summarize(verbose=False)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP50"] == pytest.approx(1.0)
