"""Max-IoU assignment of predictions to boxes, and balanced mini-batch sampling."""
import torch
from torch import Tensor

BACKGROUND = -1  # matched index of a prediction below the background threshold
IGNORE = -2      # matched index of a prediction between the two thresholds


class IoUMatcher:
    """Assigns each prediction (column) the box (row) it overlaps most.

    Args:
        high: IoU at or above which a prediction is foreground.
        low: IoU below which it is background; in between it is ignored.
        allow_low_quality: also make foreground, for every box, the
            predictions that reach that box's highest IoU even if it is below
            `high` (Faster R-CNN's RPN rule, so every box gets an anchor).
    """

    def __init__(self, high: float, low: float, allow_low_quality: bool = False):
        if low > high:
            raise ValueError(f"background threshold {low} above foreground threshold {high}")
        self.high, self.low = high, low
        self.allow_low_quality = allow_low_quality

    def __call__(self, iou: Tensor) -> Tensor:
        """iou: [num_boxes, num_predictions] -> matched box index per prediction,
        int64 [num_predictions], or BACKGROUND / IGNORE."""
        if iou.shape[0] == 0:
            return torch.full((iou.shape[1],), BACKGROUND, dtype=torch.int64, device=iou.device)
        best_iou, matches = iou.max(dim=0)
        if self.allow_low_quality:
            raw_matches = matches.clone()
        matches[best_iou < self.high] = IGNORE
        matches[best_iou < self.low] = BACKGROUND
        if self.allow_low_quality:
            best_per_box = iou.max(dim=1, keepdim=True).values  # [num_boxes, 1]
            _, pred_idx = torch.nonzero(iou == best_per_box, as_tuple=True)
            matches[pred_idx] = raw_matches[pred_idx]
        return matches


def sample_balanced(labels: Tensor, batch_size: int, positive_fraction: float):
    """Random subset of predictions for the loss, at most `positive_fraction`
    of them foreground.

    labels: [N] int64 per prediction: >= 1 foreground, 0 background, -1 ignore.
    Returns (positive indices, negative indices), each int64.
    """
    positive = torch.nonzero(labels >= 1).squeeze(1)
    negative = torch.nonzero(labels == 0).squeeze(1)
    num_pos = min(int(batch_size * positive_fraction), positive.numel())
    num_neg = min(batch_size - num_pos, negative.numel())
    pos = positive[torch.randperm(positive.numel(), device=labels.device)[:num_pos]]
    neg = negative[torch.randperm(negative.numel(), device=labels.device)[:num_neg]]
    return pos, neg
