"""Second stage of Faster R-CNN: pool a feature per proposal, classify it and
refine its box (Girshick 2015; Lin et al. 2017 for the FPN level mapping)."""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from .box_coder import BoxCoder
from .matcher import IoUMatcher, sample_balanced


class TwoMLPHead(nn.Module):
    """Pooled RoI feature [R, C, S, S] -> flatten -> fc6 -> ReLU -> fc7 -> ReLU -> [R, hidden]."""

    def __init__(self, in_features: int, hidden: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)

    def forward(self, x):
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class logits [R, K + 1] (index 0 background) and class-specific box
    deltas [R, (K + 1) * 4]."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, (num_classes + 1) * 4)

    def forward(self, x):
        return self.cls_score(x), self.bbox_pred(x)


class RoIHeads(nn.Module):
    """Box branch of Faster R-CNN.

    Train: the ground-truth boxes join the proposals; proposals with IoU >=
    fg_iou_thresh take their box's class, below bg_iou_thresh are background;
    `batch_size_per_image` are sampled (a quarter objects at most) for a
    cross-entropy loss and a smooth-L1 loss on the true class's deltas.
    Eval: per-class boxes with score > score_thresh, class-wise NMS, the
    `detections_per_img` best kept.
    """

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_head: nn.Module, box_predictor: BoxPredictor,
                 fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=512, positive_fraction=0.25,
                 bbox_reg_weights=(10.0, 10.0, 5.0, 5.0), score_thresh=0.05, nms_thresh=0.5,
                 detections_per_img=100):
        super().__init__()
        self.box_roi_pool = box_roi_pool
        self.box_head = box_head
        self.box_predictor = box_predictor
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.matcher = IoUMatcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality=False)
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img

    def sample_proposals(self, proposals, targets):
        """Adds the gt boxes to each image's proposals, labels and samples them.

        Returns per image: sampled proposals [S, 4], their labels [S] (0 =
        background), regression targets [S, 4] (zero for background) and the
        index of each one's ground-truth box [S] (-1 for background; the mask
        branch reads its mask there).
        """
        out_props, out_labels, out_deltas, out_matched = [], [], [], []
        for props, target in zip(proposals, targets):
            gt, gt_labels = target["boxes"], target["labels"]
            props = torch.cat([props, gt.to(props.dtype)])
            if gt.numel() == 0:
                labels = torch.zeros(props.shape[0], dtype=torch.int64, device=props.device)
                matches = torch.full_like(labels, -1)
                matched = torch.zeros_like(props)
            else:
                matches = self.matcher(box_iou(gt, props))
                labels = gt_labels[matches.clamp(min=0)].to(torch.int64)
                labels[matches == -1] = 0
                labels[matches == -2] = -1
                matched = gt[matches.clamp(min=0)]
            pos, neg = sample_balanced(labels, self.batch_size_per_image, self.positive_fraction)
            keep = torch.cat([pos, neg])
            labels = labels[keep]
            deltas = torch.zeros_like(props[keep])
            deltas[: pos.numel()] = self.box_coder.encode(matched[pos], props[pos])
            out_props.append(props[keep])
            out_labels.append(labels)
            out_deltas.append(deltas)
            out_matched.append(torch.where(labels > 0, matches[keep], -1))
        return out_props, out_labels, out_deltas, out_matched

    def box_features(self, features, proposals, image_sizes):
        """RoI-align every proposal on its FPN level -> box-head features [R, hidden]."""
        return self.box_head(self.box_roi_pool(features, proposals, image_sizes))

    def compute_loss(self, class_logits, box_deltas, labels, target_deltas):
        labels = torch.cat(labels)
        target_deltas = torch.cat(target_deltas)
        loss_cls = F.cross_entropy(class_logits, labels)
        pos = torch.nonzero(labels > 0).squeeze(1)
        box_deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)[pos, labels[pos]]
        loss_box = F.smooth_l1_loss(box_deltas, target_deltas[pos], beta=1 / 9, reduction="sum") / labels.numel()
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    def postprocess(self, class_logits, box_deltas, proposals, image_sizes):
        """-> list of {"boxes" [D, 4] xyxy, "scores" [D], "labels" [D] in 1..K}."""
        num_classes = class_logits.shape[-1]
        boxes_all = self.box_coder.decode(box_deltas, torch.cat(proposals))  # [R, K+1 * 4]
        boxes_all = boxes_all.reshape(-1, num_classes, 4)
        scores_all = F.softmax(class_logits, -1)
        counts = [p.shape[0] for p in proposals]
        results = []
        for boxes, scores, size in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes):
            boxes = clip_boxes_to_image(boxes, size)[:, 1:].reshape(-1, 4)  # drop background
            labels = torch.arange(1, num_classes, device=boxes.device).repeat(scores.shape[0])
            scores = scores[:, 1:].reshape(-1)
            keep = torch.nonzero(scores > self.score_thresh).squeeze(1)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = remove_small_boxes(boxes, min_size=1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results

    def box_losses(self, features, proposals, image_sizes, targets):
        """Training: sample the proposals, then the box losses. Returns (losses, and per image the
        sampled proposals, their labels and matched gt indices, which the mask branch reuses)."""
        if targets is None:
            raise ValueError("targets are needed in training mode")
        proposals, labels, target_deltas, matched = self.sample_proposals(proposals, targets)
        class_logits, box_deltas = self.box_predictor(self.box_features(features, proposals, image_sizes))
        return self.compute_loss(class_logits, box_deltas, labels, target_deltas), proposals, labels, matched

    def forward(self, features, proposals, image_sizes, targets=None):
        """features: OrderedDict of pyramid levels; proposals: list of [P_i, 4]
        xyxy in resized-image pixels. Returns (detections or [], losses)."""
        if self.training:
            return [], self.box_losses(features, proposals, image_sizes, targets)[0]
        class_logits, box_deltas = self.box_predictor(self.box_features(features, proposals, image_sizes))
        return self.postprocess(class_logits, box_deltas, proposals, image_sizes), {}
