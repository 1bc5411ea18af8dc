"""What the one-stage (dense) detectors share: RetinaNet and FCOS predict a
class score and a box at every anchor (or point) of every pyramid level.

    transform -> backbone + FPN (P3-P7) -> head: classification tower + regression tower
        train: match(anchors, boxes) -> compute_loss          (each detector's own rule and losses)
        eval:  postprocess: per level score > thresh, top-k, decode; then class-wise NMS

A subclass provides ``match``, ``compute_loss``, ``regression_losses``,
``class_scores`` and a ``box_coder``; ``OneStageDetector`` runs the rest.
AlignDet pre-training reuses ``match`` and ``regression_losses`` from outside
(``aligndet/pretrain/hooks.py``, docs/method.md §4); nothing here depends on it.

Prediction layout, everywhere: ``[B, T, C]`` with ``T = sum_l H_l * W_l * A``,
levels in order, locations row-major (y, then x) and the A anchors of a
location innermost; anchors ``[T, 4]`` are xyxy pixels of the padded batch.
"""
import math

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, clip_boxes_to_image

from .backbone import BackboneWithFPN
from .transform import DetectionTransform, check_targets


def flatten_predictions(x: Tensor, num_anchors: int) -> Tensor:
    """[B, A * C, H, W] conv output -> [B, H * W * A, C] (the layout above)."""
    b, _, h, w = x.shape
    return x.view(b, num_anchors, -1, h, w).permute(0, 3, 4, 1, 2).reshape(b, h * w * num_anchors, -1)


class ConvTower(nn.Sequential):
    """``num_convs`` x (3x3 conv, optional GroupNorm, ReLU) at constant width:
    RetinaNet's towers have no norm, FCOS's use GroupNorm(32). Weights start
    as normal(0, 0.01), biases at 0, as in torchvision. (Without a norm, four
    such convs pass on little of their input's variance, the less the
    narrower the tower: a 32-channel RetinaNet barely learns in a short run,
    hence the GroupNorm option of ``build_retinanet`` for small models.)
    """

    def __init__(self, channels: int, num_convs: int = 4, group_norm: bool = False, num_groups: int = 32):
        if group_norm and channels % num_groups:
            raise ValueError(f"GroupNorm({num_groups}) needs a channel count divisible by {num_groups}, "
                             f"got {channels} FPN channels")
        layers = []
        for _ in range(num_convs):
            conv = nn.Conv2d(channels, channels, 3, padding=1)
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.GroupNorm(num_groups, channels)] if group_norm else [conv]
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ClassificationHead(nn.Module):
    """Tower, then a 3x3 conv giving one logit per anchor and class.

    The logits' bias starts at -log((1 - prior) / prior), so every anchor
    starts as background with probability 1 - prior (RetinaNet paper, 4.1):
    the focal loss is not swamped by the many easy negatives at step one.
    Returns {"cls_logits": [B, T, num_classes]}.
    """

    def __init__(self, channels: int, num_anchors: int, num_classes: int, group_norm: bool = False,
                 prior: float = 0.01):
        super().__init__()
        self.num_anchors, self.num_classes = num_anchors, num_classes
        self.conv = ConvTower(channels, group_norm=group_norm)
        self.cls_logits = nn.Conv2d(channels, num_anchors * num_classes, 3, padding=1)
        nn.init.normal_(self.cls_logits.weight, std=0.01)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, features):
        logits = [flatten_predictions(self.cls_logits(self.conv(x)), self.num_anchors) for x in features]
        return {"cls_logits": torch.cat(logits, 1)}


class OneStageDetector(nn.Module):
    """A dense detector following torchvision's detection API (see faster_rcnn.py).

    Args:
        backbone: ResNet + FPN with P6/P7 (``extra="p6p7"``).
        transform: resizing / normalisation / batching.
        anchor_generator: anchors (RetinaNet) or one square per point (FCOS).
        head: has ``classification_head`` (a ``ClassificationHead``) and
            ``regression_head``; ``head(features)`` returns the union of their dicts.
        num_classes: object classes; labels are 1..num_classes, and the
            classifier has one sigmoid output per class (no background slot).
        score_thresh, topk_candidates: per level, keep the candidates (anchor,
            class) above the score and then the ``topk_candidates`` best.
        nms_thresh, detections_per_img: class-wise NMS, then the best N.
    """

    OUTPUT_LAYERS = ()  # final layers re-initialised at fine-tuning (docs/method.md §3.8); set by subclasses
    weight_dict = {}    # loss term -> weight in the training loop; set by subclasses

    def __init__(self, backbone: BackboneWithFPN, transform: DetectionTransform, anchor_generator: nn.Module,
                 head: nn.Module, num_classes: int, score_thresh: float, nms_thresh: float,
                 detections_per_img: int, topk_candidates: int):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.anchor_generator = anchor_generator
        self.head = head
        self.num_classes = num_classes
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.topk_candidates = topk_candidates

    # -------------------------------------------------------------- what a subclass provides

    def match(self, anchors: Tensor, boxes: Tensor, level_sizes) -> Tensor:
        """anchors [T, 4], boxes [N, 4] xyxy, level_sizes [T_l] -> int64 [T]: the
        index of the box each prediction is assigned to, -1 background, -2 ignored."""
        raise NotImplementedError

    def compute_loss(self, outputs: dict, anchors: Tensor, matched, targets) -> dict:
        raise NotImplementedError

    def regression_losses(self, outputs: dict, anchors: Tensor, matched, boxes) -> dict:
        """The box losses of the predictions matched to ``boxes`` (per image [N_i, 4])."""
        raise NotImplementedError

    def class_scores(self, outputs: dict) -> Tensor:
        """Detection scores [B, T, num_classes] in [0, 1]."""
        raise NotImplementedError

    # -------------------------------------------------------------- detection

    def forward(self, images, targets=None):
        if self.training:
            check_targets(targets, self.num_classes)
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, image_sizes, targets = self.transform(images, targets)
        features = list(self.backbone(batch).values())
        outputs = self.head(features)
        anchors_per_level = self.anchor_generator(batch.shape[-2:], features)
        if self.training:
            anchors = torch.cat(anchors_per_level)
            level_sizes = [a.shape[0] for a in anchors_per_level]
            matched = [self.match(anchors, t["boxes"], level_sizes) for t in targets]
            return self.compute_loss(outputs, anchors, matched, targets)
        detections = self.postprocess(outputs, anchors_per_level, image_sizes)
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    def postprocess(self, outputs, anchors_per_level, image_sizes, scores=None):
        """-> per image {"boxes" [D, 4] xyxy in resized-image pixels, "scores" [D], "labels" [D] in 1..K}.

        ``scores``: [B, T, K] in [0, 1] to rank the predictions by instead of ``class_scores(outputs)``
        (e.g. a class-agnostic score, K = 1); the boxes are decoded and suppressed as usual."""
        level_sizes = [a.shape[0] for a in anchors_per_level]
        scores_all = self.class_scores(outputs) if scores is None else scores  # [B, T, K]
        regression_all = outputs["bbox_regression"]    # [B, T, 4]
        num_classes = scores_all.shape[-1]
        results = []
        for scores_i, regression_i, size in zip(scores_all, regression_all, image_sizes):
            boxes, scores, labels = [], [], []
            for scores_l, regression_l, anchors_l in zip(scores_i.split(level_sizes), regression_i.split(level_sizes),
                                                         anchors_per_level):
                flat = scores_l.flatten()                # [T_l * K], anchor-major
                candidates = torch.nonzero(flat > self.score_thresh).squeeze(1)
                top = flat[candidates].topk(min(self.topk_candidates, candidates.numel()))
                idx = candidates[top.indices]
                anchor_idx = torch.div(idx, num_classes, rounding_mode="floor")
                boxes.append(clip_boxes_to_image(self.box_coder.decode(regression_l[anchor_idx], anchors_l[anchor_idx]),
                                                 size))
                scores.append(top.values)
                labels.append(idx % num_classes + 1)
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
