"""Mask R-CNN: equal to torchvision's (detections, masks, losses), its mask
loss against a naive per-RoI computation, pasting, and bad targets."""
import math

import pytest
import torch
from torchvision.models.detection import MaskRCNN as TVMaskRCNN

from aligndet.convert import from_torchvision, to_torchvision
from aligndet.models import MaskRCNN
from aligndet.models.mask_rcnn import mask_loss, mask_targets, paste_masks
from conftest import assert_same_detections

from test_torchvision_equivalence import _images
from test_torchvision_equivalence import _random_model as _random_rcnn


def _random_model(seed=0, **options):
    return _random_rcnn("resnet18", seed, "mask_rcnn", mask_layers=(32, 32, 32, 32), mask_hidden=32, **options)


def _box_mask(boxes, size):
    """uint8 [N, H, W]: an ellipse inside each xyxy box."""
    ys, xs = torch.meshgrid(torch.arange(size[0]) + 0.5, torch.arange(size[1]) + 0.5, indexing="ij")
    masks = []
    for x1, y1, x2, y2 in boxes.tolist():
        cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2, (y2 - y1) / 2
        masks.append(((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1)
    return torch.stack(masks).to(torch.uint8) if masks else torch.zeros((0, *size), dtype=torch.uint8)


def _targets():
    boxes = [torch.tensor([[10.0, 12.0, 60.0, 70.0], [80.0, 30.0, 150.0, 100.0]]),
             torch.tensor([[5.0, 50.0, 40.0, 90.0]])]
    sizes = [(128, 160), (160, 128)]
    return [{"boxes": b, "labels": torch.tensor(labels), "masks": _box_mask(b, s)}
            for b, labels, s in zip(boxes, ([1, 4], [2]), sizes)]


def test_eval_detections_and_masks_match_torchvision():
    model = _random_model().eval()
    tv = to_torchvision(model).eval()
    assert isinstance(tv, TVMaskRCNN)
    images = _images()
    with torch.no_grad():
        ours, theirs = model(images), tv(images)
    assert_same_detections(ours, theirs)
    for det, image in zip(ours, images):
        assert det["masks"].shape == (len(det["boxes"]), 1, *image.shape[-2:])
        assert 0 <= float(det["masks"].min()) and float(det["masks"].max()) <= 1 and float(det["masks"].max()) > 0.5


def test_from_torchvision_round_trip():
    model = _random_model(seed=3).eval()
    back = from_torchvision(to_torchvision(model)).eval()
    assert type(back) is MaskRCNN
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    images = _images(seed=4)
    with torch.no_grad():
        assert_same_detections(model(images), back(images))


def test_training_losses_match_torchvision():
    """Inputs that need no resizing: the same seed samples the same anchors and RoIs."""
    model = _random_model(seed=5).train()
    tv = to_torchvision(model).train()
    g = torch.Generator().manual_seed(6)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 160, 128, generator=g)]
    torch.manual_seed(7)
    ours = model(images, _targets())
    torch.manual_seed(7)
    theirs = tv(images, _targets())
    assert set(ours) == set(theirs) == set(model.weight_dict)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    torch.testing.assert_close(model.roi_heads.mask_predictor.mask_fcn_logits.weight.grad,
                               tv.roi_heads.mask_predictor.mask_fcn_logits.weight.grad, rtol=1e-3, atol=1e-6)


def test_resized_targets_keep_masks_aligned_with_boxes():
    """Multi-scale training resizes the masks with the image (nearest): each resized mask's
    pixels still lie inside its resized box."""
    model = _random_model(seed=2, min_size=(96, 200), max_size=400).train()
    images = [torch.rand(3, 128, 160), torch.rand(3, 160, 128)]
    for seed in range(3):
        torch.manual_seed(seed)
        _, _, resized = model.transform(images, _targets())
        for target, image in zip(resized, images):
            assert target["masks"].dtype == torch.uint8
            for box, mask in zip(target["boxes"], target["masks"]):
                ys, xs = torch.nonzero(mask, as_tuple=True)
                assert xs.min() >= box[0] - 1 and xs.max() <= box[2] and ys.min() >= box[1] - 1 and ys.max() <= box[3]


def _naive_roi_align_bin_mean(mask, box, size):
    """roi_align (aligned=False, adaptive sampling) of one [H, W] map over one box, by hand."""
    height, width = mask.shape
    x1, y1, x2, y2 = box
    roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bin_w, bin_h = roi_w / size, roi_h / size
    grid_w, grid_h = math.ceil(roi_w / size), math.ceil(roi_h / size)

    def sample(y, x):
        if y < -1 or y > height or x < -1 or x > width:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        y1_, x1_ = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
        if y0 >= height - 1:
            y = y0 = height - 1
        if x0 >= width - 1:
            x = x0 = width - 1
        ly, lx = y - y0, x - x0
        return ((1 - ly) * (1 - lx) * mask[y0, x0] + (1 - ly) * lx * mask[y0, x1_]
                + ly * (1 - lx) * mask[y1_, x0] + ly * lx * mask[y1_, x1_])

    out = torch.zeros(size, size)
    for i in range(size):
        for j in range(size):
            total = 0.0
            for a in range(grid_h):
                for b in range(grid_w):
                    total += sample(y1 + i * bin_h + (a + 0.5) * bin_h / grid_h,
                                    x1 + j * bin_w + (b + 0.5) * bin_w / grid_w)
            out[i, j] = total / (grid_h * grid_w)
    return out


def test_mask_loss_equals_naive_per_roi_computation():
    torch.manual_seed(0)
    gt = _box_mask(torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 2.0, 44.0, 30.0]]), (48, 48))
    boxes = torch.tensor([[3.0, 5.0, 31.0, 42.0], [18.5, 0.0, 47.0, 33.0], [6.0, 8.0, 25.0, 30.0]])
    matched, labels = torch.tensor([0, 1, 0]), torch.tensor([2, 1, 2])
    logits = torch.randn(3, 3, 8, 8)
    targets = mask_targets(gt, boxes, matched, 8)
    naive_loss = 0.0
    for r in range(3):
        naive = _naive_roi_align_bin_mean(gt[matched[r]].double(), boxes[r].tolist(), 8).float()
        torch.testing.assert_close(targets[r], naive, rtol=0, atol=1e-5)
        x = logits[r, labels[r]]  # BCE with logits, written out
        naive_loss += float((torch.clamp(x, min=0) - x * naive + torch.log1p(torch.exp(-x.abs()))).mean())
    assert float(mask_loss(logits, labels, targets)) == pytest.approx(naive_loss / 3, rel=1e-5)
    assert float(mask_loss(logits[:0], labels[:0], targets[:0])) == 0.0


def test_paste_covers_the_box():
    """A mask of ones pasted over a box, thresholded at 0.5, fills the box to a pixel."""
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [-5.0, 30.0, 20.0, 70.0], [60.0, 0.0, 64.0, 3.0]])
    pasted = paste_masks(torch.ones(3, 1, 28, 28), boxes, (64, 80))
    assert pasted.shape == (3, 1, 64, 80)
    for box, mask in zip(boxes, pasted[:, 0] > 0.5):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        x1, y1, x2, y2 = box.clamp(min=0).tolist()
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - min(x2, 80)) <= 1
        assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - min(y2, 64)) <= 1
    assert paste_masks(torch.ones(0, 1, 28, 28), boxes[:0], (64, 80)).shape == (0, 1, 64, 80)


def test_images_without_objects_train_and_masks_can_be_invalid():
    model = _random_model(seed=1).train()
    images = [torch.rand(3, 128, 160), torch.rand(3, 160, 128)]
    targets = _targets()
    targets[0] = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                  "masks": torch.zeros(0, 128, 160, dtype=torch.uint8)}
    losses = model(images, targets)
    assert all(torch.isfinite(v.detach()) for v in losses.values()) and float(losses["loss_mask"].detach()) > 0
    targets[1]["mask_valid"] = torch.tensor([False])  # no usable mask left: the box heads still train
    losses = model(images, targets)
    assert losses["loss_mask"].item() == 0.0 and losses["loss_box_reg"].item() > 0
    model.eval()
    with torch.no_grad():
        model.roi_heads.score_thresh = 1.1  # nothing passes
        det = model(images)
    assert det[0]["masks"].shape == (0, 1, 128, 160)


def test_missing_or_misshapen_masks_are_clear_errors():
    model = _random_model().train()
    images = [torch.rand(3, 128, 160), torch.rand(3, 160, 128)]
    targets = _targets()
    del targets[1]["masks"]
    with pytest.raises(ValueError, match="target 1 has no 'masks'.*faster_rcnn"):
        model(images, targets)
    targets = _targets()
    targets[0]["masks"] = targets[0]["masks"][:, :100]
    with pytest.raises(ValueError, match=r"target 0: masks must be \[N, H, W\] = \[2, 128, 160\]"):
        model(images, targets)
