"""FCOS: fully convolutional one-stage detection (Tian et al. 2019), as
torchvision builds it (``fcos_resnet50_fpn``):

    transform -> ResNet + FPN (P3-P7) -> head, shared over levels:
        classification tower (4 x conv + GroupNorm + ReLU) -> 3x3 conv: K class logits per point
        regression tower     (4 x conv + GroupNorm + ReLU) -> 3x3 conv + ReLU: 4 side distances (l, t, r, b)
                                                          -> 3x3 conv: 1 centerness logit

A point of level l is the centre of a square "anchor" of side ``anchor_sizes[l]``
(the level's stride by default; ``AnchorGenerator`` with ratio 1.0), so the
shared ``OneStageDetector`` handles FCOS's points like anchors, and the
distances are coded relative to that square (``LinearBoxCoder``).

Assignment (``FCOS.match``, torchvision's rule): a point is positive for a box
if it lies strictly inside the box, within ``center_sampling_radius`` x anchor
size of the box centre (Chebyshev distance, "centre sampling"), and its
largest side distance max(l, t, r, b) lies in the level's scale range; among
several such boxes the smallest wins. Losses, normalised by the number of
positive points in the batch: sigmoid focal loss over all points, GIoU loss on
the decoded boxes of positive points, and binary cross-entropy of the
centerness logit against sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)).
Detection score: sqrt(sigmoid(class logit) * sigmoid(centerness logit)).

AlignDet (docs/method.md §4, FCOS row; ``aligndet/pretrain/hooks.py``, not
needed for supervised use): the same rule assigns every point to
a selective-search proposal; the point's embedding (a conv MLP on the
classification tower, in place of ``cls_logits``) takes the proposal's id;
2048 points per batch, positives first, feed the contrastive loss, and the
regression branch trains with the GIoU + centerness losses to the matched
proposals. Boxes are xyxy pixels throughout.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from .anchors import AnchorGenerator
from .backbone import BackboneWithFPN, build_backbone
from .box_coder import LinearBoxCoder
from .one_stage import ClassificationHead, ConvTower, OneStageDetector, flatten_predictions
from .transform import DetectionTransform

BOX_LOSSES = ("giou", "iou")


class RegressionHead(nn.Module):
    """Regression tower (with GroupNorm), then two 3x3 convs on it: the
    normalised side distances (ReLU: distances are >= 0) and the centerness
    logit. Returns {"bbox_regression": [B, T, 4], "bbox_ctrness": [B, T, 1]}."""

    def __init__(self, channels: int, num_anchors: int = 1):
        super().__init__()
        self.num_anchors = num_anchors
        self.conv = ConvTower(channels, group_norm=True)
        self.bbox_reg = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(channels, num_anchors, 3, padding=1)
        for layer in (self.bbox_reg, self.bbox_ctrness):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features):
        regression, ctrness = [], []
        for x in features:
            x = self.conv(x)
            regression.append(flatten_predictions(F.relu(self.bbox_reg(x)), self.num_anchors))
            ctrness.append(flatten_predictions(self.bbox_ctrness(x), self.num_anchors))
        return {"bbox_regression": torch.cat(regression, 1), "bbox_ctrness": torch.cat(ctrness, 1)}


class FCOSHead(nn.Module):
    """Classification and regression heads, shared over the pyramid levels."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.classification_head = ClassificationHead(channels, 1, num_classes, group_norm=True)
        self.regression_head = RegressionHead(channels)

    def forward(self, features):
        return {**self.classification_head(features), **self.regression_head(features)}


def pairwise_iou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - IoU of paired xyxy boxes [N, 4], [N, 4] -> [N] (the GIoU loss without
    its enclosing-box term; the FCOS paper's -log IoU differs only in weighting)."""
    top_left = torch.max(boxes1[:, :2], boxes2[:, :2])
    bottom_right = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(1)
    return 1 - inter / (area1 + area2 - inter + eps)


class FCOS(OneStageDetector):
    """FCOS following torchvision's detection API (see ``OneStageDetector``).

    Args (beyond ``OneStageDetector``'s):
        center_sampling_radius: a point must lie within this many anchor sizes
            (Chebyshev distance) of a box's centre to be positive for it.
        scale_ranges: per level (lo, hi): a point of that level is positive
            only if lo < max(l, t, r, b) < hi (pixels). None is torchvision's
            rule: (4, 8) x anchor size, with 0 for the first level's lower
            bound and inf for the last level's upper bound.
        box_loss: "giou" (torchvision) or "iou" (1 - IoU).
        focal_alpha, focal_gamma: of the sigmoid focal loss.
    """

    OUTPUT_LAYERS = ("head.classification_head.cls_logits.", "head.regression_head.bbox_reg.",
                     "head.regression_head.bbox_ctrness.")
    # How a training loop combines the loss terms forward() returns.
    weight_dict = {"loss_classifier": 1.0, "loss_box_reg": 1.0, "loss_centerness": 1.0}

    def __init__(self, backbone: BackboneWithFPN, transform: DetectionTransform, anchor_generator: AnchorGenerator,
                 head: FCOSHead, num_classes: int, center_sampling_radius: float = 1.5, scale_ranges=None,
                 box_loss: str = "giou", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
                 score_thresh: float = 0.2, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 topk_candidates: int = 1000):
        super().__init__(backbone, transform, anchor_generator, head, num_classes, score_thresh, nms_thresh,
                         detections_per_img, topk_candidates)
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"unknown box_loss {box_loss!r}; choose one of {', '.join(BOX_LOSSES)}")
        if any(n != 1 for n in anchor_generator.num_anchors_per_location()):
            raise ValueError("FCOS needs one anchor (a square of ratio 1.0) per point and level")
        num_levels = len(anchor_generator.sizes)
        if scale_ranges is not None:
            scale_ranges = tuple((float(lo), float(hi)) for lo, hi in scale_ranges)
            if len(scale_ranges) != num_levels or any(not 0 <= lo < hi for lo, hi in scale_ranges):
                raise ValueError(f"scale_ranges needs one (lo, hi) with 0 <= lo < hi per level ({num_levels}), "
                                 f"got {scale_ranges}")
        self.center_sampling_radius = center_sampling_radius
        self.scale_ranges = scale_ranges
        self.box_loss = box_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.box_coder = LinearBoxCoder()

    # -------------------------------------------------------------- assignment

    def scale_bounds(self, sizes: Tensor, level_sizes):
        """Per point (lower, upper) bounds [T], [T] on max(l, t, r, b); ``sizes`` [T] are the anchor sizes."""
        if self.scale_ranges is not None:
            ranges = torch.tensor(self.scale_ranges, dtype=sizes.dtype, device=sizes.device)   # [L, 2]
            counts = torch.tensor(level_sizes, device=sizes.device)
            ranges = ranges.repeat_interleave(counts, dim=0)                                    # [T, 2]
            return ranges[:, 0], ranges[:, 1]
        lower, upper = sizes * 4, sizes * 8
        lower[: level_sizes[0]] = 0
        upper[-level_sizes[-1]:] = math.inf
        return lower, upper

    def match(self, anchors: Tensor, boxes: Tensor, level_sizes) -> Tensor:
        """anchors [T, 4] (squares centred on the points), boxes [N, 4], both
        xyxy pixels -> int64 [T]: the box each point is assigned to, -1 none."""
        matched = torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device)
        if boxes.numel() == 0:
            return matched
        points = (anchors[:, :2] + anchors[:, 2:]) / 2                                       # [T, 2] (x, y)
        sizes = anchors[:, 2] - anchors[:, 0]                                                # [T]
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2                                          # [N, 2]
        near_centre = ((points[:, None] - centres[None]).abs().amax(2)
                       < self.center_sampling_radius * sizes[:, None])                      # [T, N]
        x, y = points[:, 0, None], points[:, 1, None]
        sides = torch.stack((x - boxes[:, 0], y - boxes[:, 1], boxes[:, 2] - x, boxes[:, 3] - y), 2)  # [T, N, 4]
        lower, upper = self.scale_bounds(sizes, level_sizes)
        reach = sides.amax(2)                                                                # [T, N]
        candidate = (near_centre & (sides.amin(2) > 0)
                     & (reach > lower[:, None]) & (reach < upper[:, None]))
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])                    # [N]
        # Smallest box wins. (torchvision ranks by 1e8 - area in float32, so it
        # calls areas within a few px^2 of each other a tie; this is exact.)
        areas = torch.where(candidate, areas[None], torch.full_like(areas[None], math.inf))
        smallest, best = areas.min(1)
        found = smallest.isfinite()
        matched[found] = best[found]
        return matched

    # -------------------------------------------------------------- losses

    def compute_loss(self, outputs: dict, anchors: Tensor, matched, targets) -> dict:
        cls_logits = outputs["cls_logits"]                                                   # [B, T, K]
        cls_targets = torch.zeros_like(cls_logits)
        for i, (m, t) in enumerate(zip(matched, targets)):
            positive = torch.nonzero(m >= 0).squeeze(1)
            cls_targets[i, positive, t["labels"][m[positive]] - 1] = 1.0  # label k -> channel k - 1
        num_positive = max(1, sum(int((m >= 0).sum()) for m in matched))
        loss_cls = sigmoid_focal_loss(cls_logits, cls_targets, self.focal_alpha, self.focal_gamma, reduction="sum")
        losses = self.regression_losses(outputs, anchors, matched, [t["boxes"] for t in targets])
        return {"loss_classifier": loss_cls / num_positive, **losses}

    def regression_losses(self, outputs: dict, anchors: Tensor, matched, boxes) -> dict:
        """IoU-type loss on the decoded boxes and centerness loss of the positive
        points, summed and divided by the batch's number of positive points.
        matched: per image [T]; boxes: per image [N_i, 4] xyxy."""
        positive, target, reference = self._positive_pairs(anchors, matched, boxes)
        num_positive = max(1, int(positive.sum()))
        predicted = self.box_coder.decode(outputs["bbox_regression"][positive].float(), reference)  # [F, 4]
        if self.box_loss == "giou":
            loss_box = generalized_box_iou_loss(predicted, target, reduction="sum")
        else:
            loss_box = pairwise_iou_loss(predicted, target).sum()
        ctrness = self._centerness(target, reference)
        loss_ctrness = F.binary_cross_entropy_with_logits(outputs["bbox_ctrness"][positive].squeeze(1), ctrness,
                                                          reduction="sum")
        return {"loss_box_reg": loss_box / num_positive, "loss_centerness": loss_ctrness / num_positive}

    def centerness_targets(self, anchors: Tensor, matched, boxes):
        """(positive [B, T] bool, centerness target [F] of the positive points, image-major)."""
        positive, target, reference = self._positive_pairs(anchors, matched, boxes)
        return positive, self._centerness(target, reference)

    @staticmethod
    def _positive_pairs(anchors: Tensor, matched, boxes):
        """(positive [B, T], matched box [F, 4], point's anchor square [F, 4]) of the positive points."""
        matched = torch.stack(list(matched))                                                 # [B, T]
        positive = matched >= 0
        _, point = torch.nonzero(positive, as_tuple=True)                                    # image-major, like below
        # Boxes in float32 even under autocast: bf16 cannot tell 1000 px from 1004 px.
        target = torch.cat([b[m[m >= 0]] for b, m in zip(boxes, matched)]).float()          # [F, 4]
        return positive, target, anchors[point].float()

    def _centerness(self, target: Tensor, reference: Tensor) -> Tensor:
        """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of each point's side distances."""
        sides = self.box_coder.encode(target, reference)                                     # [F, 4] (l, t, r, b)
        left_right, top_bottom = sides[:, [0, 2]], sides[:, [1, 3]]
        return torch.sqrt(left_right.amin(1) / left_right.amax(1) * (top_bottom.amin(1) / top_bottom.amax(1)))

    def class_scores(self, outputs: dict) -> Tensor:
        """sqrt(class probability x centerness probability): [B, T, K]."""
        return torch.sqrt(torch.sigmoid(outputs["cls_logits"]) * torch.sigmoid(outputs["bbox_ctrness"]))


def build_fcos(num_classes: int, backbone: str = "resnet50", *, backbone_weights=None, norm: str = "frozen_bn",
               trainable_layers: int = 3, fpn_channels: int = 256, min_size=800, max_size: int = 1333,
               anchor_sizes=(8, 16, 32, 64, 128), center_sampling_radius: float = 1.5, scale_ranges=None,
               box_loss: str = "giou", focal_alpha: float = 0.25, focal_gamma: float = 2.0,
               score_thresh: float = 0.2, nms_thresh: float = 0.6, detections_per_img: int = 100,
               topk_candidates: int = 1000) -> FCOS:
    """FCOS with a ResNet-FPN backbone (P3-P7). Defaults are the standard COCO
    settings (torchvision's fcos_resnet50_fpn).

    anchor_sizes: one per level, the side of the square around each point
    (the strides 8-128 by default); it scales the centre-sampling radius and
    the default scale ranges. For small images pass ``scale_ranges`` (one
    (lo, hi) per level, pixels) so that objects spread over the levels.
    fpn_channels must be divisible by 32 (GroupNorm(32) in the towers).
    """
    if len(anchor_sizes) != 5:
        raise ValueError(f"FCOS has 5 pyramid levels (P3-P7): pass 5 anchor sizes, got {len(anchor_sizes)}")
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"unknown box_loss {box_loss!r}; choose one of {', '.join(BOX_LOSSES)}")
    body = build_backbone(backbone, backbone_weights, norm, trainable_layers, (2, 3, 4), fpn_channels, "p6p7")
    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * len(anchor_sizes))
    head = FCOSHead(fpn_channels, num_classes)
    transform = DetectionTransform(min_size, max_size)
    return FCOS(body, transform, anchors, head, num_classes, center_sampling_radius=center_sampling_radius,
                scale_ranges=scale_ranges, box_loss=box_loss, focal_alpha=focal_alpha, focal_gamma=focal_gamma,
                score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                topk_candidates=topk_candidates)
