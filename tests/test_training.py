"""Training works: a detector overfits one small batch, the lr schedule is
the documented one, and stage checkpoints load with a report."""
import pytest
import torch
from pycocotools.coco import COCO

from aligndet.checkpoint import CheckpointError, load_pretrained, save_checkpoint
from aligndet.engine import step_lr
from aligndet.evaluation import evaluate_detections
from aligndet.models import build_detector

TINY = dict(norm="bn", trainable_layers=5, min_size=96, max_size=96, fpn_channels=32, representation_size=128,
            anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
            rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
            rpn_batch_size_per_image=64)


def _squares_batch(n=4, size=96, seed=0):
    """Images with two bright squares each; the channel of a square is its class."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, size, size, generator=g) * 0.3
        boxes, labels = [], []
        for _ in range(2):
            x, y = torch.randint(0, size - 40, (2,), generator=g).tolist()
            s = int(torch.randint(20, 36, (1,), generator=g))
            c = int(torch.randint(0, 2, (1,), generator=g))
            image[c, y:y + s, x:x + s] = 1.0
            boxes.append([x, y, x + s, y + s])
            labels.append(c + 1)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels)})
    return images, targets


def _coco_from_targets(targets, size):
    coco = COCO()
    anns = []
    for i, t in enumerate(targets):
        for (x1, y1, x2, y2), label in zip(t["boxes"].tolist(), t["labels"].tolist()):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": label, "iscrowd": 0,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)})
    coco.dataset = {"images": [{"id": i, "width": size, "height": size} for i in range(len(targets))],
                    "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    coco.createIndex()
    return coco


def test_overfits_one_batch():
    torch.manual_seed(0)
    images, targets = _squares_batch()
    model = build_detector("faster_rcnn", 2, backbone="resnet18", **TINY)
    coco = _coco_from_targets(targets, 96)
    model.eval()
    with torch.no_grad():
        before = evaluate_detections(coco, dict(enumerate(model(images))), {1: 1, 2: 2}, verbose=False)["AP"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    history = []
    for _ in range(60):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.3 * sum(history[:5]) / 5
    model.eval()
    with torch.no_grad():
        after = evaluate_detections(coco, dict(enumerate(model(images))), {1: 1, 2: 2}, verbose=False)["AP"]
    assert before < 0.05 and after > 0.6, (before, after)


def test_step_lr_warmup_and_decay():
    kw = dict(base_lr=0.02, iters_per_epoch=100, warmup_iters=50, warmup_factor=0.001, steps=(8, 11))
    assert step_lr(0, **kw) == pytest.approx(0.02 * 0.001)
    assert step_lr(25, **kw) == pytest.approx(0.02 * (0.001 * 0.5 + 0.5))
    assert step_lr(50, **kw) == pytest.approx(0.02)
    assert step_lr(799, **kw) == pytest.approx(0.02)
    assert step_lr(800, **kw) == pytest.approx(0.002)
    assert step_lr(1100, **kw) == pytest.approx(0.0002)


def _small_model(seed, num_classes=2):
    torch.manual_seed(seed)
    return build_detector("faster_rcnn", num_classes, backbone="resnet18", **TINY)


def test_load_detector_checkpoint_reinitialises_output_layers(tmp_path, capsys):
    source = _small_model(1)
    path = tmp_path / "box.pth"
    extra = {"roi_heads.embed.0.weight": torch.zeros(4, 4)}  # e.g. a pre-training projection MLP
    save_checkpoint({"model": {**source.state_dict(), **extra}, "epoch": 12}, path)
    target = _small_model(2)
    predictor_before = target.roi_heads.box_predictor.cls_score.weight.clone()
    report = load_pretrained(target, path)
    out = capsys.readouterr().out
    assert "re-initialised" in out and "roi_heads.box_predictor" in out and "unexpected" in out
    assert report["unexpected"] == ["roi_heads.embed.0.weight"]
    for key, value in target.state_dict().items():
        if key.startswith("roi_heads.box_predictor."):
            assert key in report["reinitialised"]
        elif not key.endswith("num_batches_tracked"):
            assert torch.equal(value, source.state_dict()[key]), key
    assert torch.equal(target.roi_heads.box_predictor.cls_score.weight, predictor_before)
    kept = _small_model(3)
    load_pretrained(kept, path, keep_heads=True, log=lambda *a: None)
    assert torch.equal(kept.roi_heads.box_predictor.cls_score.weight, source.roi_heads.box_predictor.cls_score.weight)


def test_load_backbone_checkpoint_and_class_mismatch(tmp_path):
    source = _small_model(1)
    resnet_state = {k[len("backbone.body."):]: v for k, v in source.state_dict().items()
                    if k.startswith("backbone.body.")}
    path = tmp_path / "image.pth"
    save_checkpoint({"backbone": resnet_state}, path)
    target = _small_model(2)
    report = load_pretrained(target, path, log=lambda *a: None)
    assert all(k.startswith("backbone.body.") for k in report["loaded"])
    assert len(report["loaded"]) == len(resnet_state)
    assert torch.equal(target.backbone.body.layer3[0].conv1.weight, source.backbone.body.layer3[0].conv1.weight)
    assert any(k.startswith("backbone.fpn.") for k in report["reinitialised"])
    # A detector with a different class count: everything but the predictor loads.
    other = _small_model(4, num_classes=5)
    report = load_pretrained(other, tmp_path / "image.pth", log=lambda *a: None)
    assert report["mismatched"] == []
    bad = tmp_path / "bad.pth"
    save_checkpoint({"model": {"foo.weight": torch.zeros(1)}}, bad)
    with pytest.raises(CheckpointError, match="neither a detector nor a ResNet"):
        load_pretrained(other, bad)
