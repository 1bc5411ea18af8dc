"""python -m aligndet.predict on torchvision's detectors (converted to ours, the same detections as theirs) and
on box-domain checkpoints (what stage 2 trained: class-agnostic objects, or DETR's pseudo-classes).

finetune.py checkpoints are predicted in tests/test_finetune.py."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision.ops import clip_boxes_to_image

import train_box
from aligndet import predict
from aligndet.checkpoint import CheckpointError, load_checkpoint, load_detector
from aligndet.objectness import ObjectnessDetector


@pytest.fixture(scope="module")
def tv_file(tmp_path_factory):
    """A randomly initialised torchvision Faster R-CNN (COCO's 91 classes) saved as a state dict, as its
    release files are; and the model itself."""
    torch.manual_seed(0)
    model = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
    path = tmp_path_factory.mktemp("tv") / "frcnn.pth"
    torch.save(model.state_dict(), path)
    return path, model


def test_a_torchvision_detector_predicts_what_torchvision_does(tv_file, tmp_path):
    path, tv_model = tv_file
    rng = np.random.default_rng(0)
    image = (rng.random((80, 96, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    out = tmp_path / "d.json"
    outputs = predict.main(["--torchvision", "fasterrcnn_resnet50_fpn", "--checkpoint", str(path), "--images",
                            str(tmp_path / "a.png"), "--out", str(out), "--score-threshold", "0", "--device", "cpu"])
    with torch.no_grad():
        theirs = tv_model([torch.from_numpy(image).permute(2, 0, 1).float() / 255])[0]
    ours = outputs[1]
    assert len(theirs["boxes"]) > 0 and torch.equal(ours["labels"], theirs["labels"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-5, rtol=0)
    results = json.load(open(out))
    assert len(results) == len(theirs["boxes"])  # torchvision's labels are COCO's category ids
    assert {r["category_id"] for r in results} == set(theirs["labels"].tolist())


def test_torchvision_options_are_checked(tv_file, tmp_path):
    path, _ = tv_file
    with pytest.raises(SystemExit, match="not a fasterrcnn_resnet50_fpn state dict with 5 classes"):
        predict.main(["--torchvision", "fasterrcnn_resnet50_fpn", "--checkpoint", str(path), "--num-classes", "5",
                      "--images", str(tmp_path)])
    with pytest.raises(SystemExit, match="must name a builder"):
        predict.main(["--torchvision", "resnet50", "--checkpoint", str(path), "--images", str(tmp_path)])
    _, names, label_to_cat = predict.load_torchvision_detector("fasterrcnn_resnet50_fpn", str(path))
    assert names[0] == "person" and len(names) == 90 and label_to_cat[90] == 90


# ----------------------------------------------------------------------------- box-domain (train_box.py) checkpoints
# Each is written by train_box.py's main itself, one step on four 64 px scenes whose ground-truth boxes are the
# proposals (and, for DETR, the pseudo-classes of two k-means clusters).


@pytest.fixture(scope="module")
def box_run(tmp_path_factory):
    """``box_run(detector)`` -> (path of its train_box.py checkpoint, the data's paths); each made once."""
    import torchvision

    from aligndet.data.clusters import cluster_cache
    from aligndet.data.images import list_images
    from aligndet.data.proposal_cache import import_coco_json
    from conftest import write_squares_coco

    tmp = tmp_path_factory.mktemp("box_predict")
    data = write_squares_coco(str(tmp / "data"), num_images=4, size=64)
    cache = str(tmp / "proposals")
    import_coco_json(data["train_json"], cache)
    made = {}

    def run(detector):
        if detector not in made:
            extra = []
            if detector == "detr":
                init = str(tmp / "stage1.pth")
                torch.manual_seed(0)
                torch.save({"backbone": {k: v for k, v in torchvision.models.resnet18().state_dict().items()
                                         if not k.startswith("fc.")}}, init)
                records = {r.key: r.path for r in list_images(data["train_images"], data["train_json"])}
                cluster_cache(cache, records, init, k=2, progress=False, log=lambda *a: None)
                extra = ["--init", init]
            out = str(tmp / f"box_{detector}")
            train_box.main(train_box.get_args_parser().parse_args([
                "--detector", detector, "--images", data["train_images"], "--json", data["train_json"],
                "--proposals", cache, "--batch-size", "2", "--workers", "0", "--epochs", "1", "--max-iters", "1",
                "--device", "cpu", "--output-dir", out, *extra]))
            made[detector] = os.path.join(out, "checkpoint.pth")
        return made[detector], data
    return run


def stored_detector(path):
    """The online detector of a train_box.py checkpoint, built by train_box.py's own builder from the checkpoint's
    args and loaded with its weights (not through aligndet.checkpoint)."""
    ckpt = load_checkpoint(path)
    args = argparse.Namespace(**dict(ckpt["args"], init=None))
    num_classes = ckpt["model"]["class_embed.weight"].shape[0] - 1 if args.detector == "detr" else 1
    detector = train_box.build_detector_to_pretrain(args, log=lambda *a: None, num_classes=num_classes)
    detector.load_state_dict(ckpt["model"])
    return detector.eval()


def scene(data, tmp_path):
    """A 64 x 48 crop of a validation scene saved as a PNG (not square, so the two axes resize differently) and
    the image as a [3, H, W] float tensor."""
    rgb = np.asarray(Image.open(os.path.join(data["val_images"], "0000.png")).convert("RGB"))[:48]
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    return tmp_path / "scene.png", torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255


def predict_all(path, image, tmp_path, *extra):
    return predict.main(["--checkpoint", str(path), "--images", str(image), "--out", str(tmp_path / "d.json"),
                         "--score-threshold", "0", "--device", "cpu", *extra])[1]


def assert_scored_by_source(boxes, scores, candidates, candidate_scores):
    """Each box [N, 4] is one of ``candidates`` [T, 4] (all in one coordinate frame) and has the score
    (``candidate_scores`` [T]) of one it is identical to (an image border can clip two candidates alike)."""
    same = (boxes[:, None] - candidates[None]).abs().amax(-1) < 1e-4  # [N, T]
    assert same.any(1).all()
    assert (same & ((scores[:, None] - candidate_scores[None]).abs() < 1e-5)).any(1).all()


def test_a_box_domain_faster_rcnn_predicts_its_rpn_proposals_as_objects(box_run, tmp_path, capsys):
    path, data = box_run("faster_rcnn")
    image_file, image = scene(data, tmp_path)
    ours = predict_all(path, image_file, tmp_path, "--draw", str(tmp_path / "pictures"), "--draw-threshold", "0")

    model, names, label_to_cat = load_detector(path)
    assert isinstance(model, ObjectnessDetector) and not model.training
    assert names == ["object"] and label_to_cat == {1: 1}
    detector = stored_detector(path)
    with torch.no_grad():  # the RPN's own eval path: transform, backbone, proposals after NMS (testing top-n)
        batch, sizes, _ = detector.transform([image])
        features = list(detector.backbone(batch).values())
        (proposals,), _ = detector.rpn.propose(sizes, batch.shape[-2:], features)
        logits, deltas = detector.rpn.head(features)
        anchors = torch.cat(detector.rpn.anchor_generator(batch.shape[-2:], features))
        decoded = clip_boxes_to_image(detector.rpn.box_coder.decode(deltas, anchors)[0], sizes[0])  # [T, 4]
    n = detector.roi_heads.detections_per_img
    assert 0 < len(ours["boxes"]) == min(n, len(proposals))
    (h, w), (h0, w0) = sizes[0], image.shape[-2:]
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])  # resized -> the image's own pixels
    torch.testing.assert_close(ours["boxes"], proposals[:n] * scale, atol=1e-4, rtol=0)
    # Each detection scores the objectness probability of the anchor its box was decoded from.
    assert_scored_by_source(proposals[:n], ours["scores"], decoded, torch.sigmoid(logits[0]))
    assert (ours["scores"][:-1] >= ours["scores"][1:]).all() and (ours["labels"] == 1).all()
    results = json.load(open(tmp_path / "d.json"))
    assert len(results) == len(ours["boxes"]) and {r["category_id"] for r in results} == {1}
    assert os.listdir(tmp_path / "pictures") == ["scene.png"]
    # with ground truth, the objects are scored class-agnostically: any ground-truth box is an object
    predict.main(["--checkpoint", str(path), "--images", data["val_images"], "--json", data["val_json"],
                  "--out", str(tmp_path / "v.json"), "--device", "cpu"])
    assert "class-agnostic COCO AP" in capsys.readouterr().out


def test_a_box_domain_fcos_ranks_its_boxes_by_centerness(box_run, tmp_path):
    path, data = box_run("fcos")
    image_file, image = scene(data, tmp_path)
    ours = predict_all(path, image_file, tmp_path)
    model, names, _ = load_detector(path)
    assert isinstance(model, ObjectnessDetector) and names == ["object"]

    detector = stored_detector(path)
    with torch.no_grad():
        batch, sizes, _ = detector.transform([image])
        features = list(detector.backbone(batch).values())
        outputs = detector.head(features)
        level_anchors = detector.anchor_generator(batch.shape[-2:], features)
        centerness = outputs["bbox_ctrness"].sigmoid()  # [B, T, 1]
        (resized,) = detector.postprocess(outputs, level_anchors, sizes, scores=centerness)
        (own,) = detector.postprocess(outputs, level_anchors, sizes)
        (classes,) = detector.postprocess(outputs, level_anchors, sizes, scores=detector.class_scores(outputs))
        decoded = clip_boxes_to_image(detector.box_coder.decode(outputs["bbox_regression"][0],
                                                                torch.cat(level_anchors)), sizes[0])  # [T, 4]
    for key in own:  # scores= the class scores is the detector's own postprocess
        assert torch.equal(own[key], classes[key]), key
    assert len(ours["boxes"]) > 0 and (ours["labels"] == 1).all()
    # Each detection scores sigmoid(centerness) of the point its box was decoded from.
    assert_scored_by_source(resized["boxes"], ours["scores"], decoded, centerness[0, :, 0])
    torch.testing.assert_close(ours["scores"], resized["scores"], atol=1e-6, rtol=0)
    (h, w), (h0, w0) = sizes[0], image.shape[-2:]
    scale = torch.tensor([w0 / w, h0 / h, w0 / w, h0 / h])
    torch.testing.assert_close(ours["boxes"], resized["boxes"] * scale, atol=1e-4, rtol=0)


def test_a_box_domain_retinanet_is_refused_with_the_reason(box_run, tmp_path):
    path, data = box_run("retinanet")
    with pytest.raises(SystemExit, match=r"^error: .*box-domain RetinaNet: stage 2 trains its box regression only.*"
                                         r"fine-tune it first \(finetune.py --detector retinanet --init"):
        predict.main(["--checkpoint", str(path), "--images", data["val_images"], "--out", str(tmp_path / "d.json")])


def test_a_box_domain_detr_predicts_its_pseudo_classes(box_run, tmp_path):
    path, data = box_run("detr")
    image_file, image = scene(data, tmp_path)
    ours = predict_all(path, image_file, tmp_path, "--draw", str(tmp_path / "pictures"))
    model, names, label_to_cat = load_detector(path)
    assert names == ["cluster 0", "cluster 1"] and label_to_cat == {1: 1, 2: 2}  # label l is cluster l - 1
    with torch.no_grad():
        (theirs,) = stored_detector(path)([image])  # DETR as it is
    assert len(theirs["boxes"]) > 0 and torch.equal(ours["labels"], theirs["labels"])
    torch.testing.assert_close(ours["boxes"], theirs["boxes"], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours["scores"], theirs["scores"], atol=1e-6, rtol=0)
    results = json.load(open(tmp_path / "d.json"))
    assert [r["category_id"] for r in results] == ours["labels"].tolist()
    assert os.listdir(tmp_path / "pictures") == ["scene.png"]


def test_a_stage1_checkpoint_has_no_detector(tmp_path):
    backbone = {k: v for k, v in torchvision.models.resnet18().state_dict().items() if not k.startswith("fc.")}
    torch.save({"backbone": backbone, "model": {}, "stage": "image", "args": {"arch": "resnet18"}}, tmp_path / "a.pth")
    torch.save({"backbone": backbone}, tmp_path / "b.pth")  # backbone weights alone
    for name in ("a.pth", "b.pth"):
        with pytest.raises(SystemExit, match=r"^error: .*a stage-1 backbone checkpoint has no detector; "
                                             r"pre-train one on it \(train_box.py --init"):
            predict.main(["--checkpoint", str(tmp_path / name), "--images", str(tmp_path)])
    torch.save({"model": {}, "stage": "other"}, tmp_path / "c.pth")
    with pytest.raises(CheckpointError, match="not a finetune.py or train_box.py checkpoint"):
        load_detector(tmp_path / "c.pth")
