"""Our Faster R-CNN equals torchvision's with the same weights and settings (and so does our Mask R-CNN
converted from torchvision's builder; the rest of Mask R-CNN's equivalence is in test_mask_rcnn.py)."""
import pytest
import torch
from torchvision.models.detection import FasterRCNN as TVFasterRCNN

from aligndet.convert import from_torchvision, to_torchvision
from aligndet.models import FasterRCNN, MaskRCNN, build_detector
from conftest import assert_same_detections

SMALL = dict(min_size=128, max_size=192, fpn_channels=64, representation_size=128,
             anchor_sizes=(16, 32, 64, 128, 256), rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=300)


def _random_model(backbone, seed=0, detector="faster_rcnn", **options):
    """A small R-CNN (``faster_rcnn`` or ``mask_rcnn``) of 5 classes with random weights."""
    torch.manual_seed(seed)
    model = build_detector(detector, 5, backbone=backbone, **{**SMALL, **options})
    # Spread the random class scores so that ranking does not hinge on ties.
    torch.nn.init.normal_(model.roi_heads.box_predictor.cls_score.weight, std=0.3)
    torch.nn.init.normal_(model.rpn.head.cls_logits.weight, std=0.3)
    return model


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 120, 150, generator=g), torch.rand(3, 100, 90, generator=g), torch.rand(3, 160, 128, generator=g)]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_eval_detections_match_torchvision(backbone):
    model = _random_model(backbone).eval()
    tv = to_torchvision(model).eval()
    assert isinstance(tv, TVFasterRCNN)
    images = _images()
    with torch.no_grad():
        assert_same_detections(model(images), tv(images))


def test_from_torchvision_round_trip():
    model = _random_model("resnet18", seed=3).eval()
    back = from_torchvision(to_torchvision(model)).eval()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in back.parameters()]
    images = _images(seed=4)
    with torch.no_grad():
        assert_same_detections(model(images), back(images))


def test_training_losses_match_torchvision():
    """With inputs that need no resizing, the same seed samples the same
    anchors and RoIs, so every loss term agrees."""
    model = _random_model("resnet18", seed=5).train()
    tv = to_torchvision(model).train()
    g = torch.Generator().manual_seed(6)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 160, 128, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [80.0, 30.0, 150.0, 100.0]]),
                "labels": torch.tensor([1, 4])},
               {"boxes": torch.tensor([[5.0, 50.0, 40.0, 90.0]]), "labels": torch.tensor([2])}]
    torch.manual_seed(7)
    ours = model(images, targets)
    torch.manual_seed(7)
    theirs = tv(images, targets)
    assert set(ours) == set(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-4, atol=1e-5)
    # Gradients too: the head receives the same signal.
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    torch.testing.assert_close(model.roi_heads.box_predictor.bbox_pred.weight.grad,
                               tv.roi_heads.box_predictor.bbox_pred.weight.grad, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("builder, ours", [("fasterrcnn_resnet50_fpn", FasterRCNN),
                                           ("maskrcnn_resnet50_fpn", MaskRCNN)])
def test_from_torchvision_builder_model(tmp_path, builder, ours):
    """A model made by torchvision's own builder (as for its COCO checkpoints),
    with weights saved to and loaded from a local file, converts and agrees
    (Mask R-CNN: masks too)."""
    import torchvision

    torch.manual_seed(8)
    tv = getattr(torchvision.models.detection, builder)(
        weights=None, weights_backbone=None, num_classes=91, min_size=160, max_size=224,
        rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=300)
    torch.nn.init.normal_(tv.roi_heads.box_predictor.cls_score.weight, std=0.3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    tv.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True))
    tv.eval()
    model = from_torchvision(tv).eval()
    assert type(model) is ours and model.num_classes == 90
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in tv.parameters()]
    images = _images(seed=9)
    with torch.no_grad():
        assert_same_detections(model(images), tv(images))
