"""Region proposal network (Faster R-CNN, Ren et al. 2015) on a feature pyramid."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from .anchors import AnchorGenerator
from .box_coder import BoxCoder
from .matcher import IoUMatcher, sample_balanced


class RPNHead(nn.Module):
    """3x3 conv + ReLU shared over levels, then per anchor one objectness
    logit and four box deltas."""

    def __init__(self, in_channels: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.cls_logits = nn.Conv2d(in_channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 1)
        for layer in (self.conv, self.cls_logits, self.bbox_pred):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, features):
        """features: list of [B, C, H_l, W_l] -> (objectness [B, sum_l H_l*W_l*A],
        deltas [B, sum_l H_l*W_l*A, 4]), locations row-major, anchors innermost."""
        logits, deltas = [], []
        for x in features:
            t = F.relu(self.conv(x))
            b, _, h, w = t.shape
            logits.append(self.cls_logits(t).permute(0, 2, 3, 1).reshape(b, -1))
            deltas.append(self.bbox_pred(t).view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, 4))
        return torch.cat(logits, 1), torch.cat(deltas, 1)


class RegionProposalNetwork(nn.Module):
    """Scores anchors, decodes the best into proposals and suppresses duplicates.

    Train: anchors are labelled by IoU with the ground truth (>= fg_iou_thresh
    object, < bg_iou_thresh background, plus each box's best anchors), and
    `batch_size_per_image` of them (half objects at most) give a BCE objectness
    loss and a smooth-L1 box loss. Proposals are detached (the approximate
    joint training of Faster R-CNN).

    pre_nms_top_n / post_nms_top_n are dicts {"training": n, "testing": n}:
    the per-level candidates kept before NMS and the proposals kept per image.
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: RPNHead, fg_iou_thresh=0.7, bg_iou_thresh=0.3,
                 batch_size_per_image=256, positive_fraction=0.5, pre_nms_top_n=None, post_nms_top_n=None,
                 nms_thresh=0.7, score_thresh=0.0, min_size=1e-3):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = IoUMatcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality=True)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.pre_nms_top_n = pre_nms_top_n or {"training": 2000, "testing": 1000}
        self.post_nms_top_n = post_nms_top_n or {"training": 2000, "testing": 1000}
        self.nms_thresh = nms_thresh
        self.score_thresh = score_thresh
        self.min_size = min_size

    def _mode(self):
        return "training" if self.training else "testing"

    def filter_proposals(self, proposals: Tensor, logits: Tensor, level_sizes, image_sizes):
        """proposals [B, T, 4] xyxy, logits [B, T] -> per image (boxes [P, 4], scores [P])."""
        pre_nms = self.pre_nms_top_n[self._mode()]
        logits = logits.detach()
        # Top-k anchors per level (on logits; sigmoid is monotonic).
        top_idx, levels, start = [], [], 0
        for lvl, n in enumerate(level_sizes):
            k = min(pre_nms, n)
            idx = logits[:, start:start + n].topk(k, dim=1).indices + start  # [B, k]
            top_idx.append(idx)
            levels.append(torch.full((k,), lvl, dtype=torch.int64, device=logits.device))
            start += n
        top_idx = torch.cat(top_idx, 1)
        levels = torch.cat(levels)
        batch = torch.arange(logits.shape[0], device=logits.device)[:, None]
        scores = torch.sigmoid(logits[batch, top_idx])
        boxes = proposals[batch, top_idx]
        results = []
        for boxes_i, scores_i, size in zip(boxes, scores, image_sizes):
            boxes_i = clip_boxes_to_image(boxes_i, size)
            keep = remove_small_boxes(boxes_i, self.min_size)
            keep = keep[scores_i[keep] >= self.score_thresh]
            keep = keep[batched_nms(boxes_i[keep], scores_i[keep], levels[keep], self.nms_thresh)]
            keep = keep[: self.post_nms_top_n[self._mode()]]
            results.append((boxes_i[keep], scores_i[keep]))
        return results

    def assign_targets(self, anchors: Tensor, targets):
        """Objectness labels (1 object, 0 background, -1 ignore) [B, T] and the
        matched box of every anchor [B, T, 4]."""
        labels, matched_boxes = [], []
        for target in targets:
            gt = target["boxes"]
            if gt.numel() == 0:
                labels.append(torch.zeros(anchors.shape[0], device=anchors.device))
                matched_boxes.append(torch.zeros_like(anchors))
                continue
            matches = self.matcher(box_iou(gt, anchors))
            matched_boxes.append(gt[matches.clamp(min=0)])
            label = (matches >= 0).to(torch.float32)
            label[matches == -2] = -1.0
            labels.append(label)
        return torch.stack(labels), torch.stack(matched_boxes)

    def compute_loss(self, logits, deltas, anchors, targets):
        labels, matched = self.assign_targets(anchors, targets)
        pos, neg = [], []
        for i, label in enumerate(labels):
            p, n = sample_balanced(label.to(torch.int64), self.batch_size_per_image, self.positive_fraction)
            pos.append(p + i * label.numel())
            neg.append(n + i * label.numel())
        pos, neg = torch.cat(pos), torch.cat(neg)
        sampled = torch.cat([pos, neg])
        logits, deltas, labels = logits.reshape(-1), deltas.reshape(-1, 4), labels.reshape(-1)
        num_anchors = anchors.shape[0]
        target_deltas = self.box_coder.encode(matched.reshape(-1, 4)[pos], anchors[pos % num_anchors])
        box_loss = F.smooth_l1_loss(deltas[pos], target_deltas, beta=1 / 9, reduction="sum") / max(sampled.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(logits[sampled], labels[sampled])
        return {"loss_objectness": objectness_loss, "loss_rpn_box_reg": box_loss}

    def forward(self, image_sizes, padded_size, features, targets=None):
        """features: list of pyramid levels [B, C, H_l, W_l]; image_sizes: the
        unpadded (h, w) per image; padded_size: (H, W) of the batch.

        Returns (proposals: list of [P_i, 4] xyxy in resized-image pixels, losses).
        """
        if self.training and targets is None:
            raise ValueError("targets are needed in training mode")
        boxes, (logits, deltas, anchors) = self.propose(image_sizes, padded_size, features)
        losses = {}
        if self.training:
            losses = self.compute_loss(logits, deltas, anchors, targets)
        return boxes, losses

    def propose(self, image_sizes, padded_size, features):
        """The proposals alone, with the current mode's top-n settings and no loss:
        (proposals per image, (objectness, deltas, anchors) for ``compute_loss``)."""
        logits, deltas = self.head(features)
        level_anchors = self.anchor_generator(padded_size, features)
        anchors = torch.cat(level_anchors)  # [T, 4]
        proposals = self.box_coder.decode(deltas.detach(), anchors)  # [B, T, 4]
        level_sizes = [a.shape[0] for a in level_anchors]
        boxes = [b for b, _ in self.filter_proposals(proposals, logits, level_sizes, image_sizes)]
        return boxes, (logits, deltas, anchors)
