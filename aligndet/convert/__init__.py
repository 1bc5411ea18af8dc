"""Convert detectors to and from torchvision's implementations.

    tv_model = to_torchvision(model)      # same weights and settings
    model = from_torchvision(tv_model)    # e.g. torchvision's COCO checkpoints

With the same weights both give the same detections (see
tests/test_torchvision_equivalence.py), so torchvision's pre-trained COCO
detectors can be evaluated and fine-tuned here, and our models can be used
wherever torchvision's are. One file per detector holds its name mapping.
"""
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection import RetinaNet as TVRetinaNet

from aligndet.models import FCOS, FasterRCNN, MaskRCNN, RetinaNet

from .faster_rcnn import faster_rcnn_from_torchvision, faster_rcnn_to_torchvision
from .fcos import fcos_from_torchvision, fcos_to_torchvision
from .mask_rcnn import mask_rcnn_from_torchvision, mask_rcnn_to_torchvision
from .retinanet import retinanet_from_torchvision, retinanet_to_torchvision

# (our class, torchvision's class, ours -> theirs, theirs -> ours)
CONVERTERS = [
    (FasterRCNN, TVFasterRCNN, faster_rcnn_to_torchvision, faster_rcnn_from_torchvision),
    (MaskRCNN, TVMaskRCNN, mask_rcnn_to_torchvision, mask_rcnn_from_torchvision),
    (RetinaNet, TVRetinaNet, retinanet_to_torchvision, retinanet_from_torchvision),
    (FCOS, TVFCOS, fcos_to_torchvision, fcos_from_torchvision),
]


def to_torchvision(model):
    """torchvision's detector with the same settings and (copied) weights as ``model``."""
    for ours, _, convert, _ in CONVERTERS:
        if type(model) is ours:
            return convert(model)
    names = ", ".join(c[0].__name__ for c in CONVERTERS)
    raise TypeError(f"to_torchvision converts {names}; got {type(model).__name__}")


def from_torchvision(tv_model):
    """Our detector with the settings and weights of a torchvision one."""
    for _, theirs, _, convert in CONVERTERS:
        if type(tv_model) is theirs:
            return convert(tv_model)
    names = ", ".join(c[1].__name__ for c in CONVERTERS)
    raise TypeError(f"from_torchvision converts torchvision's {names}; got {type(tv_model).__name__}")


__all__ = ["CONVERTERS", "from_torchvision", "to_torchvision"]
