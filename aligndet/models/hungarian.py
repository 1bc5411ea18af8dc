"""One-to-one assignment of DETR's queries to the ground-truth boxes
(Carion et al., ECCV 2020, §3.1, Eq. 1 and the matching cost of Eq. 2).

For query q and box j of the same image the cost is

    cost_class * (-p_q(c_j))  +  cost_bbox * ||b_q - b_j||_1  +  cost_giou * (-GIoU(b_q, b_j))

with p_q the softmax over the query's class logits and boxes as normalised
(cx, cy, w, h). The assignment of least total cost (Hungarian algorithm,
``scipy.optimize.linear_sum_assignment``) matches min(Q, N) pairs; the other
queries predict "no object". ``cost_class=0`` gives a box-only cost (AlignDet
matches queries to proposals' instance ids that way, docs/method.md §4).
"""
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher:
    """Args: the weights of the three cost terms (DETR's defaults 1, 5, 2)."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0):
        if min(cost_class, cost_bbox, cost_giou) < 0 or cost_class == cost_bbox == cost_giou == 0:
            raise ValueError(f"cost weights must be >= 0 and not all 0, got class {cost_class}, "
                             f"bbox {cost_bbox}, giou {cost_giou}")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou

    def cost_matrix(self, logits: Tensor, boxes: Tensor, target_classes: Tensor, target_boxes: Tensor) -> Tensor:
        """logits [P, C], boxes [P, 4] cxcywh of P predictions; target_classes [N]
        int64 indices into C, target_boxes [N, 4] cxcywh -> cost [P, N].
        logits and target_classes may be None when cost_class is 0."""
        cost = self.cost_bbox * torch.cdist(boxes.float(), target_boxes.float(), p=1)
        if self.cost_giou:
            giou = generalized_box_iou(box_convert(boxes.float(), "cxcywh", "xyxy"),
                                       box_convert(target_boxes.float(), "cxcywh", "xyxy"))
            cost = cost - self.cost_giou * giou
        if self.cost_class:
            # -p(class): the probability stands in for the log-likelihood, so the class term is on the
            # scale of the box terms (§3.1).
            cost = cost - self.cost_class * logits.float().softmax(-1)[:, target_classes]
        return cost

    @torch.no_grad()
    def __call__(self, pred_logits: Tensor, pred_boxes: Tensor, target_classes, target_boxes):
        """pred_logits [B, Q, C] (None if cost_class is 0); pred_boxes [B, Q, 4]
        normalised cxcywh; per image target_classes [N_i] int64 class indices
        (None if cost_class is 0) and target_boxes [N_i, 4] normalised cxcywh.

        Returns per image (query indices, target indices), int64 [min(Q, N_i)] each,
        on the CPU: query ``pred[k]`` predicts target ``tgt[k]``.
        """
        b, q = pred_boxes.shape[:2]
        sizes = [len(t) for t in target_boxes]
        empty = torch.empty(0, dtype=torch.int64)
        if sum(sizes) == 0:
            return [(empty, empty.clone()) for _ in range(b)]
        classes = torch.cat(list(target_classes)) if self.cost_class else None
        logits = pred_logits.flatten(0, 1) if self.cost_class else None
        # One cost matrix for the whole batch (a single device op), then each image's own block of it.
        cost = self.cost_matrix(logits, pred_boxes.flatten(0, 1), classes, torch.cat(list(target_boxes)))
        cost = cost.view(b, q, -1).cpu()
        indices = []
        for i, block in enumerate(cost.split(sizes, -1)):
            rows, cols = linear_sum_assignment(block[i].numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
