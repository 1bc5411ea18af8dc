"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection"),
following torchvision's detection API and its retinanet_resnet50_fpn:

    transform -> ResNet + FPN (P3-P7) -> head, shared over levels:
        classification tower (4 x conv3x3 + ReLU) -> conv3x3 -> A * K logits per location
        regression tower     (4 x conv3x3 + ReLU) -> conv3x3 -> A * 4 deltas per location
    A = 9 anchors per location: sizes s, s * 2^(1/3), s * 2^(2/3) (s = 32 on P3 ... 512 on P7)
    times aspect ratios h/w in (0.5, 1, 2).

Training matches every anchor to the target boxes by IoU (>= 0.5 foreground,
< 0.4 background, in between ignored; each box also keeps the anchors that
overlap it most) and uses a sigmoid focal loss over the non-ignored anchors
and an L1 loss on the (1, 1, 1, 1)-weighted box deltas (or GIoU on the decoded
boxes) of the foreground anchors, both divided by the number of foreground
anchors of the image, then averaged over images.

The classifier has one sigmoid output per class, K in all, and label k
(1..K) is channel k - 1: there is no background slot. torchvision's
RetinaNet uses channel k for label k, so a torchvision model of ours has
num_classes = K + 1 with a dead channel 0 (see aligndet/convert/retinanet.py).

AlignDet box-domain pre-training (docs/method.md §4, RetinaNet row;
``aligndet/pretrain/hooks.py``, not needed for supervised use): the anchors are matched to the
selective-search proposals with the same IoU rule as above, each anchor takes
its proposal's instance id (-1 background, ignored anchors dropped), 2048
anchors per image are kept for the contrastive loss (positives first,
background filling up), their embeddings come from a 1x1-conv MLP on the
classification tower in place of ``cls_logits``, and the regression branch
learns the L1 loss on deltas towards the matched proposals.
"""
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from .anchors import AnchorGenerator
from .backbone import BackboneWithFPN, build_backbone
from .box_coder import BoxCoder
from .matcher import IGNORE, IoUMatcher
from .one_stage import ClassificationHead, ConvTower, OneStageDetector, flatten_predictions
from .transform import DetectionTransform

BOX_LOSSES = ("l1", "giou")
NUM_LEVELS = 5  # P3-P7


class RegressionHead(nn.Module):
    """Tower, then a 3x3 conv giving 4 box deltas per anchor (relative to the
    anchor, ``BoxCoder((1, 1, 1, 1))``). Returns {"bbox_regression": [B, T, 4]}."""

    def __init__(self, channels: int, num_anchors: int, group_norm: bool = False):
        super().__init__()
        self.num_anchors = num_anchors
        self.conv = ConvTower(channels, group_norm=group_norm)
        self.bbox_reg = nn.Conv2d(channels, num_anchors * 4, 3, padding=1)
        nn.init.normal_(self.bbox_reg.weight, std=0.01)
        nn.init.zeros_(self.bbox_reg.bias)

    def forward(self, features):
        deltas = [flatten_predictions(self.bbox_reg(self.conv(x)), self.num_anchors) for x in features]
        return {"bbox_regression": torch.cat(deltas, 1)}


class RetinaNetHead(nn.Module):
    """Classification and regression heads, shared by all pyramid levels.
    Returns {"cls_logits": [B, T, K], "bbox_regression": [B, T, 4]}.
    group_norm: GroupNorm(32) in the towers (the head of retinanet_resnet50_fpn_v2)."""

    def __init__(self, channels: int, num_anchors: int, num_classes: int, group_norm: bool = False):
        super().__init__()
        self.group_norm = group_norm
        self.classification_head = ClassificationHead(channels, num_anchors, num_classes, group_norm=group_norm)
        self.regression_head = RegressionHead(channels, num_anchors, group_norm)

    def forward(self, features):
        return {**self.classification_head(features), **self.regression_head(features)}


class RetinaNet(OneStageDetector):
    """RetinaNet on ``OneStageDetector`` (which runs detection and the AlignDet hook).

    Args (besides ``OneStageDetector``'s):
        matcher: assigns anchors to boxes (IoU 0.5 / 0.4 with low-quality matches).
        box_loss: "l1" on the box deltas or "giou" on the decoded boxes.
        focal_alpha, focal_gamma: of the sigmoid focal loss.
    """

    # Final layers that fine-tuning re-initialises after pre-training (docs/method.md §3.8).
    OUTPUT_LAYERS = ("head.classification_head.cls_logits.", "head.regression_head.bbox_reg.")
    # How a training loop combines the loss terms forward() returns.
    weight_dict = {"loss_classifier": 1.0, "loss_box_reg": 1.0}

    def __init__(self, backbone: BackboneWithFPN, transform: DetectionTransform, anchor_generator: AnchorGenerator,
                 head: RetinaNetHead, num_classes: int, matcher: IoUMatcher, box_loss: str = "l1",
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 300, topk_candidates: int = 1000):
        super().__init__(backbone, transform, anchor_generator, head, num_classes, score_thresh, nms_thresh,
                         detections_per_img, topk_candidates)
        if box_loss not in BOX_LOSSES:
            raise ValueError(f"unknown box_loss {box_loss!r}; choose one of {', '.join(BOX_LOSSES)}")
        self.matcher = matcher
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.box_loss = box_loss
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def match(self, anchors: Tensor, boxes: Tensor, level_sizes=None) -> Tensor:
        """anchors [T, 4], boxes [N, 4] xyxy pixels -> int64 [T]: box index,
        -1 background (every anchor when N = 0), -2 ignored."""
        return self.matcher(box_iou(boxes, anchors))  # IoU [N, T]

    def class_scores(self, outputs: dict) -> Tensor:
        return outputs["cls_logits"].sigmoid()

    def compute_loss(self, outputs: dict, anchors: Tensor, matched, targets) -> dict:
        """Focal loss over the non-ignored anchors, per image divided by its
        number of foreground anchors, averaged over images; plus the box loss."""
        losses = []
        for logits, matched_i, target in zip(outputs["cls_logits"].float(), matched, targets):  # [T, K], [T]
            foreground = matched_i >= 0
            classes = torch.zeros_like(logits)
            classes[foreground, target["labels"][matched_i[foreground]] - 1] = 1.0  # label k -> channel k - 1
            valid = matched_i != IGNORE
            loss = sigmoid_focal_loss(logits[valid], classes[valid], self.focal_alpha, self.focal_gamma, "sum")
            losses.append(loss / foreground.sum().clamp(min=1))
        return {"loss_classifier": torch.stack(losses).mean(),
                **self.regression_losses(outputs, anchors, matched, [t["boxes"] for t in targets])}

    def regression_losses(self, outputs: dict, anchors: Tensor, matched, boxes) -> dict:
        """Box loss of the foreground anchors towards their matched boxes ([N_i, 4]
        xyxy per image; the proposals in box-domain pre-training), per image
        divided by its number of foreground anchors, averaged over images. An
        image without foreground anchors adds 0 (still attached to the graph).
        Computed in float32, also under mixed precision."""
        losses = []
        for deltas, matched_i, boxes_i in zip(outputs["bbox_regression"].float(), matched, boxes):  # [T, 4], [T]
            foreground = torch.nonzero(matched_i >= 0).squeeze(1)
            deltas, reference = deltas[foreground], anchors[foreground].float()
            target = boxes_i[matched_i[foreground]].float()
            if self.box_loss == "l1":
                loss = F.l1_loss(deltas, self.box_coder.encode(target, reference), reduction="sum")
            else:
                loss = generalized_box_iou_loss(self.box_coder.decode(deltas, reference), target, reduction="sum")
            losses.append(loss / max(1, foreground.numel()))
        return {"loss_box_reg": torch.stack(losses).mean()}


def build_retinanet(num_classes: int, backbone: str = "resnet50", *, backbone_weights=None, norm: str = "frozen_bn",
                    trainable_layers: int = 3, fpn_channels: int = 256, min_size=800, max_size: int = 1333,
                    anchor_sizes=(32, 64, 128, 256, 512), aspect_ratios=(0.5, 1.0, 2.0), scales_per_octave: int = 3,
                    head_norm: str = "none", fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                    box_loss: str = "l1",
                    focal_alpha: float = 0.25, focal_gamma: float = 2.0, score_thresh: float = 0.05,
                    nms_thresh: float = 0.5, detections_per_img: int = 300,
                    topk_candidates: int = 1000) -> RetinaNet:
    """RetinaNet with a ResNet-FPN backbone (P3-P7). Defaults are the standard
    COCO settings (torchvision's retinanet_resnet50_fpn).

    anchor_sizes holds one base size per level (P3-P7); each level gets the
    sizes ``int(s * 2 ** (i / scales_per_octave))`` for i < scales_per_octave,
    times every aspect ratio (h / w). box_loss is "l1" (on the box deltas,
    torchvision's default) or "giou" (on the decoded boxes, as in
    retinanet_resnet50_fpn_v2). head_norm "gn" puts GroupNorm(32) in the
    towers (also as in the _v2 model): a small RetinaNet trained briefly
    learns far faster with it (benchmarks/RESULTS.md), the standard one has
    none. Shrink fpn_channels, anchor sizes and image sizes for small CPU runs.
    """
    if head_norm not in ("none", "gn"):
        raise ValueError(f"head_norm must be 'none' or 'gn', got {head_norm!r}")
    if len(anchor_sizes) != NUM_LEVELS:
        raise ValueError(f"RetinaNet predicts on {NUM_LEVELS} levels (P3-P7): give {NUM_LEVELS} anchor sizes, "
                         f"got {tuple(anchor_sizes)}")
    if scales_per_octave < 1 or not aspect_ratios:
        raise ValueError(f"need scales_per_octave >= 1 and at least one aspect ratio, got {scales_per_octave} "
                         f"and {tuple(aspect_ratios)}")
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"unknown box_loss {box_loss!r}; choose one of {', '.join(BOX_LOSSES)}")
    if focal_gamma < 0 or focal_alpha > 1:
        raise ValueError(f"focal loss needs gamma >= 0 and alpha <= 1 (alpha < 0: no weighting), "
                         f"got gamma {focal_gamma}, alpha {focal_alpha}")
    body = build_backbone(backbone, backbone_weights, norm, trainable_layers, (2, 3, 4), fpn_channels, "p6p7")
    sizes = tuple(tuple(int(s * 2 ** (i / scales_per_octave)) for i in range(scales_per_octave))
                  for s in anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * NUM_LEVELS)
    head = RetinaNetHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes, head_norm == "gn")
    matcher = IoUMatcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality=True)
    return RetinaNet(body, DetectionTransform(min_size, max_size), anchors, head, num_classes, matcher,
                     box_loss=box_loss, focal_alpha=focal_alpha, focal_gamma=focal_gamma, score_thresh=score_thresh,
                     nms_thresh=nms_thresh, detections_per_img=detections_per_img, topk_candidates=topk_candidates)
