"""FCOS (aligndet/models/fcos.py, aligndet/convert/fcos.py): box coding,
equality with torchvision's FCOS (detections, losses, assignment), the
assignment rule on hand-made cases, edge cases, overfitting, and loading
pre-trained weights. The AlignDet box-domain hook is in test_fcos_pretrain.py.
Tiny images, ResNet-18 and 32 FPN channels keep the file fast.
"""
import math

import pytest
import torch
import torchvision
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import _utils as det_utils

from aligndet.checkpoint import load_pretrained
from aligndet.convert import from_torchvision, to_torchvision
from aligndet.models.box_coder import LinearBoxCoder
from aligndet.models.fcos import FCOS, build_fcos
from conftest import assert_no_detections, assert_same_detections

SMALL = dict(min_size=128, max_size=192, fpn_channels=32)
# torchvision's rule for the default anchor sizes (8, ..., 128), written out.
TV_RANGES = ((0, 64), (64, 128), (128, 256), (256, 512), (512, math.inf))


def _random_model(seed=0, num_classes=5, **options):
    torch.manual_seed(seed)
    model = build_fcos(num_classes, "resnet18", **{**SMALL, **options})
    # Spread the random class scores so that ranking does not hinge on ties.
    torch.nn.init.normal_(model.head.classification_head.cls_logits.weight, std=0.3)
    torch.nn.init.normal_(model.head.regression_head.bbox_reg.weight, std=0.1)
    return model


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in ((120, 150), (100, 90), (160, 128))]


def _training_batch():
    """Images that need no resizing with SMALL (short side 128, long side <= 192)."""
    g = torch.Generator().manual_seed(6)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 160, 128, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [30.0, 20.0, 150.0, 120.0],
                                       [90.0, 80.0, 120.0, 100.0]]),
                "labels": torch.tensor([1, 4, 5])},
               {"boxes": torch.tensor([[5.0, 50.0, 40.0, 90.0]]), "labels": torch.tensor([2])}]
    return images, targets


# ----------------------------------------------------------------------------- box coding


def test_linear_box_coder_round_trip_and_torchvision():
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(50, 2, generator=g) * 200
    sides = torch.tensor([8.0, 16.0, 32.0, 64.0, 128.0])[torch.randint(0, 5, (50,), generator=g)]
    reference = torch.cat([centres - sides[:, None] / 2, centres + sides[:, None] / 2], 1)
    boxes = torch.cat([centres - torch.rand(50, 2, generator=g) * 90, centres + torch.rand(50, 2, generator=g) * 90], 1)
    coder, tv_coder = LinearBoxCoder(), det_utils.BoxLinearCoder(normalize_by_size=True)
    deltas = coder.encode(boxes, reference)
    assert (deltas > 0).all()  # the centres lie inside the boxes: all four distances positive
    torch.testing.assert_close(coder.decode(deltas, reference), boxes)
    torch.testing.assert_close(deltas, tv_coder.encode(reference, boxes))  # torchvision: encode(reference, boxes)
    torch.testing.assert_close(coder.decode(deltas, reference), tv_coder.decode(deltas, reference))


# ----------------------------------------------------------------------------- torchvision equivalence


def test_eval_detections_match_torchvision():
    model = _random_model().eval()
    tv = to_torchvision(model).eval()
    assert isinstance(tv, TVFCOS) and tv.head.classification_head.num_classes == 6  # + unused label 0
    with torch.no_grad():
        assert_same_detections(model(_images()), tv(_images()))


def test_from_torchvision_round_trip():
    model = _random_model(seed=3).eval()
    back = from_torchvision(to_torchvision(model)).eval()
    assert type(back) is FCOS and back.num_classes == 5
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in back.parameters()]
    with torch.no_grad():
        assert_same_detections(model(_images(seed=4)), back(_images(seed=4)))


def test_from_torchvision_builder_model():
    """A model from torchvision's own builder (as for its COCO checkpoint) converts and agrees.
    Its channel 0 is the unused label-0 slot: a trained model never fires it;
    with random weights we switch it off as training would."""
    torch.manual_seed(8)
    tv = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91,
                                                        min_size=128, max_size=160, score_thresh=0.3)
    cls_logits = tv.head.classification_head.cls_logits
    torch.nn.init.normal_(cls_logits.weight, std=0.3)
    with torch.no_grad():
        cls_logits.weight[0] = 0
        cls_logits.bias[0] = -30
    tv.eval()
    model = from_torchvision(tv).eval()
    assert model.num_classes == 90 and model.head.classification_head.cls_logits.out_channels == 90
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in tv.parameters()]
    images = _images(seed=9)
    with torch.no_grad():
        assert_same_detections(model(images), tv(images))


def test_training_losses_match_torchvision():
    model = _random_model(seed=5).train()
    tv = to_torchvision(model).train()
    images, targets = _training_batch()
    ours, theirs = model(images, targets), tv(images, targets)
    names = {"loss_classifier": "classification", "loss_box_reg": "bbox_regression", "loss_centerness": "bbox_ctrness"}
    assert set(ours) == set(names) and set(theirs) == set(names.values())
    for name, tv_name in names.items():
        torch.testing.assert_close(ours[name], theirs[tv_name], rtol=1e-4, atol=1e-6)
    # Gradients too: the regression layer receives the same signal.
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    torch.testing.assert_close(model.head.regression_head.bbox_reg.weight.grad,
                               tv.head.regression_head.bbox_reg.weight.grad, rtol=1e-3, atol=1e-6)


def test_assignment_matches_torchvision_and_explicit_ranges():
    """Both assign the same points on random boxes (areas apart, so that
    torchvision's float32 area ranking has no ties); explicit scale ranges equal
    to torchvision's rule change nothing. Anchor sizes 4-64 spread small boxes over the levels."""
    model = _random_model(seed=10, anchor_sizes=(4, 8, 16, 32, 64), min_size=160, max_size=160).train()
    tv = to_torchvision(model).train()
    g = torch.Generator().manual_seed(11)
    images, targets = [torch.rand(3, 160, 160, generator=g) for _ in range(2)], []
    for _ in images:
        xy = torch.rand(16, 2, generator=g) * 100
        wh = 8 + torch.rand(16, 2, generator=g) * 140
        boxes = torch.cat([xy, (xy + wh).clamp(max=160)], 1)
        areas = (boxes[:, 2:] - boxes[:, :2]).prod(1)
        keep = [i for i in range(16) if all(abs(areas[i] - areas[j]) > 16 for j in range(i))]
        targets.append({"boxes": boxes[keep], "labels": torch.ones(len(keep), dtype=torch.int64)})

    captured = {}  # each model's per-image matches, taken where they reach the loss

    def tv_loss(targets, outputs, anchors, matched):
        captured["tv"] = matched
        return {}

    def our_loss(outputs, anchors, matched, targets):
        captured["ours"] = matched
        return {}

    tv.head.compute_loss, model.compute_loss = tv_loss, our_loss

    def run_ours():
        model(images, targets)
        return captured.pop("ours")

    tv(images, targets)
    ours = run_ours()
    for a, b in zip(ours, captured["tv"]):
        assert torch.equal(a, b)
        assert (a >= 0).sum() > 10
    sizes = [n * n for n in (20, 10, 5, 3, 2)]  # 160 px, strides 8-128
    level = torch.repeat_interleave(torch.arange(5), torch.tensor(sizes))
    levels_hit = set(level[ours[0] >= 0].tolist()) | set(level[ours[1] >= 0].tolist())
    assert len(levels_hit) >= 3
    model.scale_ranges = ((0, 32), (32, 64), (64, 128), (128, 256), (256, math.inf))  # (4, 8) x (4, 8, ..., 64)
    for a, b in zip(run_ours(), ours):
        assert torch.equal(a, b)


def test_conversion_refuses_what_torchvision_cannot_do():
    for options in (dict(box_loss="iou"), dict(scale_ranges=((0, 32),) + TV_RANGES[1:]), dict(focal_alpha=0.5)):
        with pytest.raises(ValueError):
            to_torchvision(_random_model(**options))
    to_torchvision(_random_model(scale_ranges=TV_RANGES))  # torchvision's own rule, written out: fine
    model = _random_model()
    model.transform.image_mean = (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="ImageNet"):
        to_torchvision(model)


@pytest.mark.parametrize("options, message", [
    (dict(box_loss="l1"), "box_loss"),
    (dict(anchor_sizes=(8, 16, 32, 64)), "5 anchor sizes"),
    (dict(scale_ranges=((0, 64), (64, math.inf))), "scale_ranges"),
    (dict(scale_ranges=((0, 64), (64, 32), (128, 256), (256, 512), (512, math.inf))), "scale_ranges"),
    (dict(fpn_channels=48), "divisible by 32"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        build_fcos(2, "resnet18", **options)


# ----------------------------------------------------------------------------- the assignment rule


def _points(*levels):
    """Hand-made points: per level (anchor sizes 8, 16, ..., 128) a list of (x, y)
    -> anchors [T, 4] (squares centred on the points) and level sizes."""
    anchors, level_sizes = [], []
    for size, points in zip((8, 16, 32, 64, 128), levels):
        for x, y in points:
            anchors.append([x - size / 2, y - size / 2, x + size / 2, y + size / 2])
        level_sizes.append(len(points))
    return torch.tensor(anchors, dtype=torch.float32), level_sizes


def test_match_scale_ranges():
    model = _random_model()
    centre = [(500.0, 500.0)]
    anchors, level_sizes = _points(*[centre] * 5)  # the same point on every level

    def match(half_side):
        box = torch.tensor([[500.0 - half_side, 500.0 - half_side, 500.0 + half_side, 500.0 + half_side]])
        return model.match(anchors, box, level_sizes).tolist()

    # max(l, t, r, b) = half_side; ranges (0, 64), (64, 128), (128, 256), (256, 512), (512, inf), open.
    assert match(50) == [0, -1, -1, -1, -1]
    assert match(100) == [-1, 0, -1, -1, -1]
    assert match(300) == [-1, -1, -1, 0, -1]
    assert match(600) == [-1, -1, -1, -1, 0]  # the last level has no upper bound
    assert match(64) == [-1, -1, -1, -1, -1]  # on a boundary: neither level (strict on both sides)
    model.scale_ranges = ((0, 40), (40, 80), (80, 160), (160, 320), (320, math.inf))
    assert match(50) == [-1, 0, -1, -1, -1]
    model.scale_ranges = TV_RANGES
    assert match(100) == [-1, 0, -1, -1, -1]


def test_match_centre_sampling_and_inside():
    model = _random_model()
    box = torch.tensor([[0.0, 0.0, 100.0, 100.0]])  # centre (50, 50); on P3 the radius is 1.5 x 8 = 12
    points = [(61.0, 50.0), (62.0, 50.0), (50.0, 38.5), (61.0, 61.0), (38.0, 50.0)]
    anchors, sizes = _points(points, [], [], [], [])
    # Chebyshev distance: (61, 61) is 15.6 away but within 11 on both axes.
    assert model.match(anchors, box, sizes).tolist() == [0, -1, 0, 0, -1]
    thin = torch.tensor([[0.0, 0.0, 100.0, 4.0]])  # centre (50, 2)
    anchors, sizes = _points([(50.0, 2.0), (50.0, 6.0), (50.0, 4.0)], [], [], [], [])
    # (50, 6) is near the centre but outside the box; (50, 4) lies on its edge.
    assert model.match(anchors, thin, sizes).tolist() == [0, -1, -1]
    model.center_sampling_radius = 2.0  # radius 16 on P3
    anchors, sizes = _points([(62.0, 50.0)], [], [], [], [])
    assert model.match(anchors, box, sizes).tolist() == [0]


def test_match_smallest_box_wins():
    model = _random_model()
    big, small = [0.0, 0.0, 110.0, 110.0], [50.0, 50.0, 90.0, 90.0]  # centres 55 and 70
    anchors, sizes = _points([(62.0, 62.0), (56.0, 56.0), (75.0, 80.0), (200.0, 200.0)], [], [], [], [])
    # (62, 62) fits both -> the smaller; (56, 56) is too far from the small box's centre;
    # (75, 80): inside both, but 20 from the big box's centre -> small only.
    assert model.match(anchors, torch.tensor([big, small]), sizes).tolist() == [1, 0, 1, -1]
    assert model.match(anchors, torch.tensor([small, big]), sizes).tolist() == [0, 1, 0, -1]
    assert model.match(anchors, torch.zeros(0, 4), sizes).tolist() == [-1, -1, -1, -1]


# ----------------------------------------------------------------------------- edge cases and training


def test_empty_targets_train_and_empty_detections():
    model = _random_model().train()
    images, targets = _training_batch()
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)} for _ in images]
    losses = model(images, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_classifier"] > 0 and losses["loss_box_reg"] == 0 and losses["loss_centerness"] == 0
    sum(losses.values()).backward()
    losses = model(images, [targets[0], empty[1]])  # one image without objects
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())

    model.eval().score_thresh = 1.0
    with torch.no_grad():
        assert_no_detections(model(images))


def test_overfits_one_batch():
    torch.manual_seed(0)
    # 64 FPN channels: GroupNorm(32) needs more than one value per group on the 1x1 P7 of a single image.
    model = build_fcos(2, "resnet18", trainable_layers=0, min_size=64, max_size=64, fpn_channels=64,
                       scale_ranges=((0, 24), (24, 48), (48, 96), (96, 192), (192, math.inf))).train()
    image = torch.rand(3, 64, 64) * 0.2
    image[:, 8:32, 10:40] = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    image[:, 36:60, 30:58] = torch.tensor([0.2, 0.2, 1.0])[:, None, None]
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 40.0, 32.0], [30.0, 36.0, 58.0, 60.0]]),
                "labels": torch.tensor([1, 2])}]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    history = []
    for _ in range(30):
        losses = model([image], targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.5 * history[0], history


# ----------------------------------------------------------------------------- loading weights


def test_load_pretrained_reinitialises_output_layers(tmp_path):
    source = _random_model(seed=20)
    torch.save(source.state_dict(), tmp_path / "fcos.pth")
    saved = source.state_dict()
    for keep_heads in (False, True):
        fresh = _random_model(seed=21)
        initial = {k: v.clone() for k, v in fresh.state_dict().items()}
        load_pretrained(fresh, tmp_path / "fcos.pth", keep_heads=keep_heads, log=lambda *a: None)
        for key, value in fresh.state_dict().items():
            reinitialised = key.startswith(FCOS.OUTPUT_LAYERS) and not keep_heads
            assert torch.equal(value, initial[key] if reinitialised else saved[key]), key
    assert sum(k.startswith(FCOS.OUTPUT_LAYERS) for k in saved) == 6
