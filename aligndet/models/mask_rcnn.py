"""Mask R-CNN (He et al. 2017): Faster R-CNN whose RoI heads also predict a
28x28 mask per RoI and class, following torchvision's detection API:

    model.train(); losses = model(images, targets)   # adds "loss_mask"
    model.eval();  detections = model(images)        # adds "masks" [D, 1, H, W] in [0, 1]

targets additionally hold "masks": uint8 [N, H, W] (1 inside the instance),
in the input image's pixels, and optionally "mask_valid": bool [N], False
where an instance has no usable mask (its box still trains the box heads, its
mask is left out of the mask loss). Detection masks are probabilities in the
input image's pixels: threshold them at 0.5 for binary masks.

The mask branch (He et al. §3): RoI-align 14x14 on the FPN level of each RoI,
four 3x3 convs of 256 with ReLU, a 2x2 stride-2 transposed conv with ReLU and
a 1x1 conv to one mask logit map per class. Its loss is the mean binary
cross-entropy on the ground-truth class's map of each positive RoI, against
the RoI's ground-truth mask RoI-aligned to 28x28.
"""
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import MultiScaleRoIAlign, roi_align

from .faster_rcnn import FasterRCNN, build_faster_rcnn
from .roi_heads import RoIHeads


class MaskHead(nn.Module):
    """Pooled RoI features [R, C, 14, 14] -> convs 3x3 + ReLU -> [R, layers[-1], 14, 14]."""

    def __init__(self, in_channels: int, layers=(256, 256, 256, 256)):
        super().__init__()
        widths = (in_channels, *layers)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths, widths[1:]))
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, x):
        for conv in self.convs:
            x = F.relu(conv(x))
        return x


class MaskPredictor(nn.Module):
    """[R, C, 14, 14] -> 2x upsampling (transposed conv + ReLU) -> mask logits
    [R, K + 1, 28, 28], one map per class (index 0, background, is never trained)."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, hidden, 2, stride=2)
        self.mask_fcn_logits = nn.Conv2d(hidden, num_classes + 1, 1)
        for layer in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, x):
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))


def mask_targets(gt_masks: Tensor, boxes: Tensor, matched: Tensor, size: int) -> Tensor:
    """The part of each RoI's ground-truth mask under the RoI, resampled to
    size x size: gt_masks [N, H, W] (0/1), boxes [R, 4] xyxy in the masks'
    pixels, matched [R] index into gt_masks -> float [R, size, size] in [0, 1]."""
    rois = torch.cat([matched[:, None].to(boxes), boxes], 1)  # roi_align's [batch index, x1, y1, x2, y2]
    return roi_align(gt_masks[:, None].to(boxes), rois, (size, size), spatial_scale=1.0)[:, 0]


def mask_loss(mask_logits: Tensor, labels: Tensor, targets: Tensor) -> Tensor:
    """mask_logits [R, K + 1, M, M], labels [R] in 1..K, targets [R, M, M] ->
    mean BCE over the pixels of each RoI's own class map (zero with no RoIs)."""
    if labels.numel() == 0:
        return mask_logits.sum() * 0
    logits = mask_logits[torch.arange(labels.numel(), device=labels.device), labels]
    return F.binary_cross_entropy_with_logits(logits, targets)


def paste_masks(masks: Tensor, boxes: Tensor, image_size, padding: int = 1) -> Tensor:
    """Place each RoI mask into a full image: masks [D, 1, M, M] probabilities
    over boxes [D, 4] xyxy in the image's pixels -> [D, 1, H, W].

    The M x M map covers its box; a ring of `padding` zero cells is added and
    the box widened to match, so the mask fades to zero at the box's border
    instead of being cut there. The padded map is resized bilinearly onto the
    integer pixel grid of the widened box and clipped to the image."""
    height, width = image_size
    out = masks.new_zeros((masks.shape[0], 1, height, width))
    if masks.shape[0] == 0:
        return out
    side = masks.shape[-1]
    scale = (side + 2 * padding) / side
    padded = F.pad(masks, (padding,) * 4)
    centre, half = (boxes[:, 2:] + boxes[:, :2]) * 0.5, (boxes[:, 2:] - boxes[:, :2]) * 0.5 * scale
    corners = torch.cat([centre - half, centre + half], 1).to(torch.int64).tolist()
    for i, (x1, y1, x2, y2) in enumerate(corners):
        w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)  # inclusive pixel extent of the widened box
        resized = F.interpolate(padded[i:i + 1], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2 + 1, width), min(y2 + 1, height)
        if cx2 > cx1 and cy2 > cy1:
            out[i, 0, cy1:cy2, cx1:cx2] = resized[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1]
    return out


class MaskRoIHeads(RoIHeads):
    """Faster R-CNN's box branch plus the mask branch. In training the mask
    branch sees the positive RoIs among those sampled for the box loss; in
    evaluation it sees the final detections."""

    def __init__(self, box_roi_pool, box_head, box_predictor, mask_roi_pool: MultiScaleRoIAlign,
                 mask_head: MaskHead, mask_predictor: MaskPredictor, **box_options):
        super().__init__(box_roi_pool, box_head, box_predictor, **box_options)
        self.mask_roi_pool = mask_roi_pool
        self.mask_head = mask_head
        self.mask_predictor = mask_predictor

    def mask_logits(self, features, boxes, image_sizes):
        """boxes: list of [R_i, 4] xyxy in resized-image pixels -> [sum R_i, K + 1, 28, 28]."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_sizes)))

    def forward(self, features, proposals, image_sizes, targets=None):
        if not self.training:
            detections, _ = super().forward(features, proposals, image_sizes)
            probs = self.mask_logits(features, [d["boxes"] for d in detections], image_sizes).sigmoid()
            labels = torch.cat([d["labels"] for d in detections])
            probs = probs[torch.arange(labels.numel(), device=labels.device), labels][:, None]  # [D, 1, 28, 28]
            for det, p in zip(detections, probs.split([len(d["boxes"]) for d in detections])):
                det["masks"] = p
            return detections, {}
        losses, proposals, labels, matched = self.box_losses(features, proposals, image_sizes, targets)
        keeps = []  # per image: the positive RoIs whose instance has a usable mask
        for idx, target in zip(matched, targets):
            valid = target.get("mask_valid")
            keeps.append(idx >= 0 if valid is None else (idx >= 0) & valid[idx.clamp(min=0)])
        logits = self.mask_logits(features, [p[k] for p, k in zip(proposals, keeps)], image_sizes)
        goals = [mask_targets(t["masks"], p[k], i[k], logits.shape[-1])
                 for p, i, k, t in zip(proposals, matched, keeps, targets)]
        losses["loss_mask"] = mask_loss(logits, torch.cat([lab[k] for lab, k in zip(labels, keeps)]), torch.cat(goals))
        return [], losses


class MaskRCNN(FasterRCNN):
    """transform -> backbone (+FPN) -> RPN -> box and mask heads -> detections with masks."""

    OUTPUT_LAYERS = FasterRCNN.OUTPUT_LAYERS + ("roi_heads.mask_predictor.mask_fcn_logits.",)
    weight_dict = {**FasterRCNN.weight_dict, "loss_mask": 1.0}

    def forward(self, images, targets=None):
        if self.training:
            check_mask_targets(images, targets)
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        detections = super().forward(images, targets)
        if self.training:
            return detections
        for det, size in zip(detections, original_sizes):  # boxes are in the input image's pixels already
            det["masks"] = paste_masks(det["masks"], det["boxes"], size)
        return detections


def check_mask_targets(images, targets):
    """Clear errors for missing or misshapen masks, before they fail inside roi_align."""
    for i, (image, t) in enumerate(zip(images, targets or [])):
        masks = t.get("masks")
        if masks is None:
            raise ValueError(f"target {i} has no 'masks': Mask R-CNN trains on instance masks "
                             "(uint8 [N, H, W]); use faster_rcnn for boxes only")
        n = len(t["boxes"]) if "boxes" in t else None
        if masks.dim() != 3 or masks.shape[0] != n or tuple(masks.shape[1:]) != tuple(image.shape[-2:]):
            raise ValueError(f"target {i}: masks must be [N, H, W] = [{n}, {image.shape[-2]}, {image.shape[-1]}] "
                             f"(one per box, the image's size), got {tuple(masks.shape)}")


def build_mask_rcnn(num_classes: int, backbone: str = "resnet50", *, mask_layers=(256, 256, 256, 256),
                    mask_hidden: int = 256, **faster_rcnn_options) -> MaskRCNN:
    """Mask R-CNN with a ResNet-FPN backbone: ``build_faster_rcnn``'s detector
    (same options and defaults, torchvision's maskrcnn_resnet50_fpn settings)
    with the mask branch on its RoI heads: ``mask_layers`` are the widths of
    its 3x3 convs, ``mask_hidden`` that of its transposed conv."""
    base = build_faster_rcnn(num_classes, backbone, **faster_rcnn_options)
    box = base.roi_heads
    roi_heads = MaskRoIHeads(
        box.box_roi_pool, box.box_head, box.box_predictor,
        MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=14, sampling_ratio=2),
        MaskHead(base.backbone.out_channels, mask_layers), MaskPredictor(mask_layers[-1], mask_hidden, num_classes),
        fg_iou_thresh=box.matcher.high, bg_iou_thresh=box.matcher.low, batch_size_per_image=box.batch_size_per_image,
        positive_fraction=box.positive_fraction, bbox_reg_weights=tuple(box.box_coder.weights),
        score_thresh=box.score_thresh, nms_thresh=box.nms_thresh, detections_per_img=box.detections_per_img)
    return MaskRCNN(base.backbone, base.transform, base.rpn, roi_heads, num_classes)


# The signature shows Faster R-CNN's options as this builder's own: the scripts' presets and flags read a
# builder's options and defaults off its signature (aligndet/presets.py).
_faster = inspect.signature(build_faster_rcnn).parameters.values()
_mask = [p for p in inspect.signature(build_mask_rcnn).parameters.values() if p.name in ("mask_layers", "mask_hidden")]
build_mask_rcnn.__signature__ = inspect.Signature([*_faster, *_mask], return_annotation=MaskRCNN)
