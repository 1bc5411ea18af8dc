"""Building blocks of the detectors: box coding, anchors, matching, sampling,
and the Faster R-CNN API on edge cases."""

import pytest
import torch

from aligndet.models import build_detector
from aligndet.models.anchors import AnchorGenerator, cell_anchors
from aligndet.models.box_coder import BoxCoder
from aligndet.models.matcher import BACKGROUND, IGNORE, IoUMatcher, sample_balanced
from aligndet.models.rpn import RPNHead

TINY = dict(min_size=64, max_size=96, fpn_channels=32, representation_size=64, anchor_sizes=(8, 16, 32, 64, 128),
            rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, rpn_pre_nms_top_n_train=200,
            rpn_post_nms_top_n_train=100, box_batch_size_per_image=64)


def _random_boxes(n, g, size=100.0):
    xy = torch.rand(n, 2, generator=g) * size
    wh = torch.rand(n, 2, generator=g) * size / 2 + 1
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_round_trip(weights):
    g = torch.Generator().manual_seed(0)
    coder = BoxCoder(weights)
    boxes, reference = _random_boxes(50, g), _random_boxes(50, g)
    deltas = coder.encode(boxes, reference)
    torch.testing.assert_close(coder.decode(deltas, reference), boxes, rtol=1e-5, atol=1e-4)
    # A box encoded against itself is the zero delta.
    torch.testing.assert_close(coder.encode(boxes, boxes), torch.zeros_like(boxes))


def test_box_coder_class_specific_and_clamp():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    reference = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.zeros(1, 3 * 4)  # three classes
    deltas[0, 4:8] = torch.tensor([10.0, 0.0, 0.0, 0.0])  # class 1 shifts right by one width
    deltas[0, 8:12] = torch.tensor([0.0, 0.0, 1e4, 1e4])   # class 2 asks for an absurd scale
    boxes = coder.decode(deltas, reference).view(3, 4)
    torch.testing.assert_close(boxes[0], reference[0])
    torch.testing.assert_close(boxes[1], torch.tensor([10.0, 0.0, 20.0, 20.0]))
    assert torch.isfinite(boxes[2]).all()
    assert boxes[2, 2] - boxes[2, 0] <= 10.0 * 1000 / 16 + 1e-3


def test_cell_anchors_area_and_ratio():
    anchors = cell_anchors((32, 64), (0.5, 1.0, 2.0))
    assert anchors.shape == (6, 4)
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    expected_area = torch.tensor([32.0, 64.0] * 3) ** 2
    assert torch.allclose(w * h, expected_area, rtol=0.05)
    torch.testing.assert_close(h / w, torch.tensor([0.5, 0.5, 1.0, 1.0, 2.0, 2.0]), rtol=0.06, atol=0)
    # centred on the origin
    assert torch.allclose((anchors[:, 0] + anchors[:, 2]) / 2, torch.zeros(6), atol=0.5)


def test_grid_anchors_layout_matches_head_output():
    gen = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)
    features = [torch.zeros(2, 8, 6, 5), torch.zeros(2, 8, 3, 3)]
    anchors = gen((24, 20), features)
    assert [a.shape[0] for a in anchors] == [6 * 5 * 3, 3 * 3 * 3]
    level0 = anchors[0].view(6, 5, 3, 4)
    centres = (level0[..., :2] + level0[..., 2:]) / 2  # [H, W, A, 2] as (x, y)
    assert torch.allclose(centres[2, 3, 1], torch.tensor([3 * 4.0, 2 * 4.0]))  # stride 24 // 6 = 4
    # The head's output for location (y, x) and anchor a sits at index (y * W + x) * A + a.
    head = RPNHead(8, 3)
    logits, deltas = head(features)
    assert logits.shape == (2, sum(a.shape[0] for a in anchors)) and deltas.shape == (2, logits.shape[1], 4)
    marked = torch.zeros(2, 8, 6, 5)
    marked[:, :, 2, 3] = 1.0
    with torch.no_grad():
        head.conv.weight.zero_(); head.conv.bias.zero_()
        head.conv.weight[:, :, 1, 1] = torch.eye(8)
        head.cls_logits.weight.zero_(); head.cls_logits.bias.zero_()
        head.cls_logits.weight[1, :, 0, 0] = 1.0  # anchor type 1 reads the marked location
        logits, _ = head([marked, torch.zeros(2, 8, 3, 3)])
    assert logits[0].nonzero().flatten().tolist() == [(2 * 5 + 3) * 3 + 1]


def test_anchor_levels_must_match_features():
    gen = AnchorGenerator(((16,),), ((1.0,),))
    with pytest.raises(ValueError, match="levels"):
        gen((32, 32), [torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 4, 4)])


def test_matcher_thresholds_and_low_quality():
    iou = torch.tensor([[0.9, 0.5, 0.2, 0.0],
                        [0.1, 0.6, 0.25, 0.1]])
    matches = IoUMatcher(0.7, 0.3)(iou)
    assert matches.tolist() == [0, IGNORE, BACKGROUND, BACKGROUND]
    matches = IoUMatcher(0.7, 0.3, allow_low_quality=True)(iou)
    assert matches.tolist() == [0, 1, BACKGROUND, BACKGROUND]  # box 1's best prediction is kept
    empty = IoUMatcher(0.5, 0.5)(torch.zeros(0, 3))
    assert empty.tolist() == [BACKGROUND] * 3


def test_sampler_respects_fraction_and_skips_ignored():
    torch.manual_seed(0)
    labels = torch.tensor([1] * 10 + [0] * 100 + [-1] * 50)
    pos, neg = sample_balanced(labels, 32, 0.25)
    assert pos.numel() == 8 and neg.numel() == 24
    assert (labels[pos] >= 1).all() and (labels[neg] == 0).all()
    assert len(set(pos.tolist())) == 8 and len(set(neg.tolist())) == 24
    # Few positives: the negatives fill the batch.
    pos, neg = sample_balanced(torch.tensor([1, 0, 0, 0, 0, -1]), 4, 0.5)
    assert pos.numel() == 1 and neg.numel() == 3


def test_training_with_empty_targets_gives_finite_losses():
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", 3, backbone="resnet18", **TINY).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
               {"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([3])}]
    losses = model(images, targets)
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_eval_outputs_in_input_coordinates_and_empty_when_thresholded():
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", 3, backbone="resnet18", **TINY).eval()
    images = [torch.rand(3, 50, 120), torch.rand(3, 200, 90)]
    with torch.no_grad():
        out = model(images)
    for det, image in zip(out, images):
        h, w = image.shape[-2:]
        assert det["boxes"].shape[1] == 4 and det["scores"].shape == det["labels"].shape
        assert (det["boxes"][:, 0::2] <= w + 1e-3).all() and (det["boxes"][:, 1::2] <= h + 1e-3).all()
        assert ((det["labels"] >= 1) & (det["labels"] <= 3)).all()
    model.roi_heads.score_thresh = 1.0  # nothing can pass
    with torch.no_grad():
        out = model(images)
    assert all(d["boxes"].shape == (0, 4) for d in out)


def test_batched_equals_one_by_one_for_same_size_images():
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", 3, backbone="resnet18", **TINY).eval()
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
    images = [torch.rand(3, 64, 96), torch.rand(3, 64, 96)]
    with torch.no_grad():
        batched = model(images)
        single = [model([im])[0] for im in images]
    for a, b in zip(batched, single):
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-3)
        assert torch.equal(a["labels"], b["labels"])


def test_bad_targets_raise_clear_errors():
    model = build_detector("faster_rcnn", 3, backbone="resnet18", **TINY).train()
    image = [torch.rand(3, 64, 64)]
    with pytest.raises(ValueError, match="zero or negative"):
        model(image, [{"boxes": torch.tensor([[10.0, 10.0, 5.0, 20.0]]), "labels": torch.tensor([1])}])
    with pytest.raises(ValueError, match="labels must lie in 1..3"):
        model(image, [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 20.0]]), "labels": torch.tensor([0])}])
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        model([torch.rand(64, 64)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])


def test_frozen_stages_and_unknown_names():
    model = build_detector("faster_rcnn", 2, backbone="resnet18", trainable_layers=2, **TINY)
    body = model.backbone.body
    assert not any(p.requires_grad for p in body.conv1.parameters())
    assert not any(p.requires_grad for p in body.layer2.parameters())
    assert all(p.requires_grad for p in body.layer3.parameters())
    with pytest.raises(ValueError, match="unknown detector"):
        build_detector("yolo", 2)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_detector("faster_rcnn", 2, backbone="vgg16")
