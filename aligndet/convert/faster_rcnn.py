"""Faster R-CNN <-> torchvision's FasterRCNN (fasterrcnn_resnet50_fpn and the like)."""
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead as TVTwoMLPHead
from torchvision.models.detection.rpn import RPNHead as TVRPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from aligndet.models.faster_rcnn import FasterRCNN, build_faster_rcnn

from .common import (body_settings, check_normalisation, from_tv_backbone_key, load_converted, to_tv_backbone_key,
                     torchvision_backbone)

# Our parameter name -> torchvision's, where they differ.
_RPN_CONV = ("rpn.head.conv.", "rpn.head.conv.0.0.")


def to_tv_key(key: str) -> str:
    return key.replace(*_RPN_CONV) if key.startswith(_RPN_CONV[0]) else to_tv_backbone_key(key)


def from_tv_key(key: str) -> str:
    return key.replace(_RPN_CONV[1], _RPN_CONV[0]) if key.startswith(_RPN_CONV[1]) else from_tv_backbone_key(key)


def settings(model) -> dict:
    """The build_faster_rcnn arguments that reproduce `model`, read off a
    Faster (or Mask) R-CNN of ours or of torchvision's."""
    transform, rpn, roi = model.transform, model.rpn, model.roi_heads
    if isinstance(model, TVFasterRCNN):
        if not isinstance(roi.box_head, TVTwoMLPHead) or not isinstance(roi.box_predictor, FastRCNNPredictor):
            raise ValueError("only the two-fc box head (fasterrcnn_resnet50_fpn and the like) converts; "
                             "the _v2 conv head does not")
        if transform.size_divisible != 32 or transform.fixed_size is not None:
            raise ValueError("only size_divisible=32 without fixed_size converts")
        num_classes = roi.box_predictor.cls_score.out_features - 1
        pre, post = rpn._pre_nms_top_n, rpn._post_nms_top_n
        rpn_batch, box_batch = rpn.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.batch_size_per_image
        rpn_iou = rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold
        box_iou = roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold
    else:
        num_classes = model.num_classes
        pre, post = rpn.pre_nms_top_n, rpn.post_nms_top_n
        rpn_batch, box_batch = rpn.batch_size_per_image, roi.batch_size_per_image
        rpn_iou = rpn.matcher.high, rpn.matcher.low
        box_iou = roi.matcher.high, roi.matcher.low
    sizes, ratios = rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios
    if len(set(map(tuple, ratios))) != 1:
        raise ValueError("conversion supports the same anchor ratios on every level")
    unsupported = {"box coder weights": (tuple(roi.box_coder.weights), (10.0, 10.0, 5.0, 5.0)),
                   "RPN IoU thresholds": (rpn_iou, (0.7, 0.3)), "RoI IoU thresholds": (box_iou, (0.5, 0.5)),
                   "RPN min size": (rpn.min_size, 1e-3)}
    for name, (value, expected) in unsupported.items():
        if value != expected:
            raise ValueError(f"only the default {name} {expected} convert, got {value}")
    check_normalisation(transform)
    min_size = tuple(transform.min_size)
    return dict(
        num_classes=num_classes, **body_settings(model.backbone.body),
        fpn_channels=model.backbone.out_channels, min_size=min_size if len(min_size) > 1 else min_size[0],
        max_size=transform.max_size, aspect_ratios=tuple(ratios[0]), rpn_score_thresh=rpn.score_thresh,
        anchor_sizes=tuple(s[0] for s in sizes) if all(len(s) == 1 for s in sizes) else tuple(map(tuple, sizes)),
        rpn_pre_nms_top_n_train=pre["training"], rpn_pre_nms_top_n_test=pre["testing"],
        rpn_post_nms_top_n_train=post["training"], rpn_post_nms_top_n_test=post["testing"],
        rpn_nms_thresh=rpn.nms_thresh, rpn_batch_size_per_image=rpn_batch, box_batch_size_per_image=box_batch,
        representation_size=roi.box_head.fc7.out_features, box_score_thresh=roi.score_thresh,
        box_nms_thresh=roi.nms_thresh, box_detections_per_img=roi.detections_per_img,
    )


def torchvision_kwargs(model, s: dict) -> dict:
    """torchvision's FasterRCNN (or MaskRCNN) arguments for the settings ``s``
    (``settings``) of our ``model``: modules with random weights, which the
    converter then loads."""
    sizes = tuple(tuple(a) if isinstance(a, tuple) else (a,) for a in s["anchor_sizes"])
    anchors = TVAnchorGenerator(sizes, (s["aspect_ratios"],) * len(sizes))
    return dict(
        backbone=torchvision_backbone(model.backbone, LastLevelMaxPool()), min_size=s["min_size"],
        max_size=s["max_size"], rpn_anchor_generator=anchors, rpn_score_thresh=s["rpn_score_thresh"],
        rpn_head=TVRPNHead(s["fpn_channels"], len(sizes[0]) * len(s["aspect_ratios"])),
        rpn_pre_nms_top_n_train=s["rpn_pre_nms_top_n_train"], rpn_pre_nms_top_n_test=s["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_train=s["rpn_post_nms_top_n_train"], rpn_post_nms_top_n_test=s["rpn_post_nms_top_n_test"],
        rpn_nms_thresh=s["rpn_nms_thresh"], rpn_batch_size_per_image=s["rpn_batch_size_per_image"],
        box_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2),
        box_head=TVTwoMLPHead(s["fpn_channels"] * 49, s["representation_size"]),
        box_predictor=FastRCNNPredictor(s["representation_size"], s["num_classes"] + 1),
        box_score_thresh=s["box_score_thresh"], box_nms_thresh=s["box_nms_thresh"],
        box_detections_per_img=s["box_detections_per_img"], box_batch_size_per_image=s["box_batch_size_per_image"],
    )


def faster_rcnn_to_torchvision(model: FasterRCNN) -> TVFasterRCNN:
    """A torchvision FasterRCNN with the same settings and (copied) weights."""
    if not isinstance(model, FasterRCNN):
        raise TypeError(f"expected our FasterRCNN, got {type(model).__name__}")
    return load_converted(model, TVFasterRCNN(**torchvision_kwargs(model, settings(model))), to_tv_key)


def faster_rcnn_from_torchvision(tv_model: TVFasterRCNN) -> FasterRCNN:
    """Our FasterRCNN with the settings and weights of a torchvision one."""
    if not isinstance(tv_model, TVFasterRCNN):
        raise TypeError(f"expected torchvision's FasterRCNN, got {type(tv_model).__name__}")
    s = settings(tv_model)
    num_classes = s.pop("num_classes")
    return load_converted(tv_model, build_faster_rcnn(num_classes, **s), from_tv_key)
