"""Detectors. `build_detector(name, num_classes, backbone=..., **options)`
builds any of them by name; options are the named arguments of each
detector's `build_*` function."""
from .detr import DETR, build_detr
from .faster_rcnn import FasterRCNN, build_faster_rcnn
from .fcos import FCOS, build_fcos
from .mask_rcnn import MaskRCNN, build_mask_rcnn
from .retinanet import RetinaNet, build_retinanet

DETECTORS = {
    "faster_rcnn": build_faster_rcnn,
    "mask_rcnn": build_mask_rcnn,
    "retinanet": build_retinanet,
    "fcos": build_fcos,
    "detr": build_detr,
}
# The detectors torchvision also has: aligndet.convert maps them both ways, and the equivalence benchmark compares.
TORCHVISION_DETECTORS = ("faster_rcnn", "mask_rcnn", "retinanet", "fcos")


def build_detector(name: str, num_classes: int, backbone: str = "resnet50", **options):
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(sorted(DETECTORS))}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    return DETECTORS[name](num_classes, backbone=backbone, **options)


__all__ = ["DETECTORS", "DETR", "FCOS", "FasterRCNN", "MaskRCNN", "RetinaNet", "TORCHVISION_DETECTORS",
           "build_detector", "build_detr", "build_faster_rcnn", "build_fcos", "build_mask_rcnn", "build_retinanet"]
