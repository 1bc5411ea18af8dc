"""Box coding: boxes <-> regression deltas.

``BoxCoder`` (R-CNN, RetinaNet) encodes a box relative to a reference box
(anchor or proposal) as
    dx = wx * (x - xa) / wa,   dy = wy * (y - ya) / ha,
    dw = ww * log(w / wa),     dh = wh * log(h / ha),
with (x, y) the centre and (w, h) the size, all in absolute pixels and boxes
in xyxy format. Width is x2 - x1 (no "+1"), as in torchvision.

``LinearBoxCoder`` (FCOS) encodes a box as the distances from the reference's
centre (the FCOS point) to its four sides, divided by the reference's size:
    (l, t, r, b) = ((xa - x1) / wa, (ya - y1) / ha, (x2 - xa) / wa, (y2 - ya) / ha).
"""
import math

import torch
from torch import Tensor

# Largest dw/dh accepted when decoding, so exp() cannot overflow (log(1000/16)).
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centre_size(boxes: Tensor):
    """xyxy [..., 4] -> centre x, centre y, width, height, each [...]."""
    widths = boxes[..., 2] - boxes[..., 0]
    heights = boxes[..., 3] - boxes[..., 1]
    ctr_x = boxes[..., 0] + 0.5 * widths
    ctr_y = boxes[..., 1] + 0.5 * heights
    return ctr_x, ctr_y, widths, heights


class BoxCoder:
    """Encodes target boxes as deltas from reference boxes and decodes back.

    Args:
        weights: (wx, wy, ww, wh); (1, 1, 1, 1) for the RPN, (10, 10, 5, 5)
            for the R-CNN box head.
        scale_clamp: upper bound on dw, dh before exp() when decoding.
    """

    def __init__(self, weights=(1.0, 1.0, 1.0, 1.0), scale_clamp: float = DEFAULT_SCALE_CLAMP):
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """boxes, reference: [..., 4] xyxy (broadcastable) -> deltas [..., 4]."""
        wx, wy, ww, wh = self.weights
        ref_x, ref_y, ref_w, ref_h = _centre_size(reference)
        gt_x, gt_y, gt_w, gt_h = _centre_size(boxes)
        dx = wx * (gt_x - ref_x) / ref_w
        dy = wy * (gt_y - ref_y) / ref_h
        dw = ww * torch.log(gt_w / ref_w)
        dh = wh * torch.log(gt_h / ref_h)
        return torch.stack((dx, dy, dw, dh), dim=-1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """deltas [..., 4] (or [..., C*4] for class-specific deltas), reference
        [..., 4] xyxy -> boxes with the shape of deltas, xyxy absolute."""
        shape = deltas.shape
        # Pixel coordinates in float32 at least: under autocast the deltas may be bf16 / fp16.
        deltas = deltas.reshape(*shape[:-1], shape[-1] // 4, 4).to(torch.promote_types(deltas.dtype, torch.float32))
        reference = reference.to(deltas.dtype).unsqueeze(-2)  # [..., 1, 4]
        wx, wy, ww, wh = self.weights
        ref_x, ref_y, ref_w, ref_h = _centre_size(reference)
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.scale_clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.scale_clamp)
        ctr_x = dx * ref_w + ref_x
        ctr_y = dy * ref_h + ref_y
        half_w = 0.5 * (torch.exp(dw) * ref_w)
        half_h = 0.5 * (torch.exp(dh) * ref_h)
        boxes = torch.stack((ctr_x - half_w, ctr_y - half_h, ctr_x + half_w, ctr_y + half_h), dim=-1)
        return boxes.reshape(shape)


class LinearBoxCoder:
    """FCOS's box coding (torchvision's ``BoxLinearCoder(normalize_by_size=True)``):
    side distances from the reference centre, in units of the reference's
    width / height. FCOS's references are squares of side ``anchor size``
    centred on the points, so the deltas are the paper's (l, t, r, b) divided
    by the level's scale."""

    def encode(self, boxes: Tensor, reference: Tensor) -> Tensor:
        """boxes, reference: [..., 4] xyxy (broadcastable) -> deltas [..., 4] (l, t, r, b)."""
        ctr_x = 0.5 * (reference[..., 0] + reference[..., 2])
        ctr_y = 0.5 * (reference[..., 1] + reference[..., 3])
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        distances = torch.stack((ctr_x - boxes[..., 0], ctr_y - boxes[..., 1],
                                 boxes[..., 2] - ctr_x, boxes[..., 3] - ctr_y), dim=-1)
        return distances / torch.stack((ref_w, ref_h, ref_w, ref_h), dim=-1)

    def decode(self, deltas: Tensor, reference: Tensor) -> Tensor:
        """deltas [..., 4] (l, t, r, b), reference [..., 4] xyxy -> boxes [..., 4] xyxy absolute."""
        deltas = deltas.to(torch.promote_types(deltas.dtype, torch.float32))  # pixels: float32 at least
        reference = reference.to(deltas.dtype)
        ctr_x = 0.5 * (reference[..., 0] + reference[..., 2])
        ctr_y = 0.5 * (reference[..., 1] + reference[..., 3])
        ref_w = reference[..., 2] - reference[..., 0]
        ref_h = reference[..., 3] - reference[..., 1]
        distances = deltas * torch.stack((ref_w, ref_h, ref_w, ref_h), dim=-1)
        return torch.stack((ctr_x - distances[..., 0], ctr_y - distances[..., 1],
                            ctr_x + distances[..., 2], ctr_y + distances[..., 3]), dim=-1)
