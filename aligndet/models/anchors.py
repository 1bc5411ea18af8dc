"""Anchor boxes for every feature-map location of every pyramid level."""

import torch
from torch import Tensor, nn


def cell_anchors(sizes, aspect_ratios) -> Tensor:
    """Anchors centred on (0, 0): [len(aspect_ratios) * len(sizes), 4] xyxy.

    Ordered ratio-major (all sizes of the first ratio, then the next ratio);
    the head's output channels follow the same order. aspect_ratio = h / w,
    and every anchor of one size has the area size**2. Coordinates are rounded
    to whole pixels.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.float32)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
    return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()


class AnchorGenerator(nn.Module):
    """Anchors for a feature pyramid.

    Args:
        sizes: one tuple of anchor sizes (pixels, sqrt of area) per level.
        aspect_ratios: one tuple of h/w ratios per level.

    The stride of a level is the padded batch size integer-divided by the
    feature size (so an odd-sized extra level may get e.g. 61 rather than 64,
    as in torchvision). Grids are cached per (feature sizes, batch size, device).
    """

    def __init__(self, sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=((0.5, 1.0, 2.0),) * 5):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError(f"{len(sizes)} levels of anchor sizes but {len(aspect_ratios)} of aspect ratios")
        self.sizes = tuple(tuple(s) for s in sizes)
        self.aspect_ratios = tuple(tuple(a) for a in aspect_ratios)
        self.cell_anchors = [cell_anchors(s, a) for s, a in zip(self.sizes, self.aspect_ratios)]
        self._cache = {}

    def num_anchors_per_location(self):
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid_anchors(self, feature_sizes, image_size, device, dtype=torch.float32):
        """feature_sizes: [(H_l, W_l)] per level; image_size: padded (H, W).

        Returns a list of per-level anchors [H_l * W_l * A_l, 4] xyxy, ordered
        row-major over locations (y, then x) and anchor type within a location.
        """
        key = (tuple(feature_sizes), tuple(image_size), str(device), dtype)
        if key in self._cache:
            return self._cache[key]
        if len(feature_sizes) != len(self.cell_anchors):
            raise ValueError(
                f"the anchor generator has {len(self.cell_anchors)} levels but the backbone gives "
                f"{len(feature_sizes)} feature maps: pass one anchor-size tuple per level"
            )
        anchors = []
        for (h, w), base in zip(feature_sizes, self.cell_anchors):
            stride_y, stride_x = image_size[0] // h, image_size[1] // w
            shift_y = torch.arange(h, dtype=torch.int32, device=device) * stride_y
            shift_x = torch.arange(w, dtype=torch.int32, device=device) * stride_x
            shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
            shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
            anchors.append((shifts + base.to(device).view(1, -1, 4)).reshape(-1, 4).to(dtype))
        if len(self._cache) > 32:  # many distinct input sizes (multi-scale training)
            self._cache.clear()
        self._cache[key] = anchors
        return anchors

    def forward(self, image_size, features) -> list:
        """Per-level anchors for a padded batch of `image_size` (H, W), float32 at
        least whatever the features' dtype (bf16 cannot hold pixel coordinates)."""
        sizes = [tuple(f.shape[-2:]) for f in features]
        dtype = torch.promote_types(features[0].dtype, torch.float32)
        return self.grid_anchors(sizes, image_size, features[0].device, dtype)
