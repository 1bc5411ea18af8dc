"""Mask R-CNN <-> torchvision's MaskRCNN (maskrcnn_resnet50_fpn and the like).

Everything but the mask branch is Faster R-CNN's conversion; the mask branch
has the same layers under other names (torchvision's head blocks are
``mask_head.<i>.0``, ours ``mask_head.convs.<i>``)."""
import re

from torchvision.models.detection import MaskRCNN as TVMaskRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from aligndet.models.mask_rcnn import MaskRCNN, build_mask_rcnn

from .common import load_converted
from .faster_rcnn import from_tv_key, settings, to_tv_key, torchvision_kwargs

_OURS, _THEIRS = r"roi_heads\.mask_head\.convs\.(\d+)\.", r"roi_heads\.mask_head\.(\d+)\.0\."


def _to_tv_key(key: str) -> str:
    return re.sub(_OURS, r"roi_heads.mask_head.\1.0.", to_tv_key(key))


def _from_tv_key(key: str) -> str:
    return re.sub(_THEIRS, r"roi_heads.mask_head.convs.\1.", from_tv_key(key))


def _mask_settings(model) -> dict:
    """mask_layers and mask_hidden of a Mask R-CNN of ours or of torchvision's."""
    roi = model.roi_heads
    pool = roi.mask_roi_pool
    if tuple(pool.output_size) != (14, 14) or pool.sampling_ratio != 2 or list(pool.featmap_names) != list("0123"):
        raise ValueError("only the 14x14 mask RoI-align on P2-P5 with sampling ratio 2 converts")
    if isinstance(model, TVMaskRCNN):
        if not isinstance(roi.mask_head, MaskRCNNHeads) or not isinstance(roi.mask_predictor, MaskRCNNPredictor):
            raise ValueError("only the conv mask head and predictor of maskrcnn_resnet50_fpn convert")
        convs = [block[0] for block in roi.mask_head]
        if any(c.dilation != (1, 1) for c in convs) or any(len(block) != 2 for block in roi.mask_head):
            raise ValueError("only undilated mask convs without normalisation convert (not the _v2 head)")
    else:
        convs = list(roi.mask_head.convs)
    return dict(mask_layers=tuple(c.out_channels for c in convs),
                mask_hidden=roi.mask_predictor.conv5_mask.out_channels)


def mask_rcnn_to_torchvision(model: MaskRCNN) -> TVMaskRCNN:
    """A torchvision MaskRCNN with the same settings and (copied) weights."""
    if not isinstance(model, MaskRCNN):
        raise TypeError(f"expected our MaskRCNN, got {type(model).__name__}")
    s, m = settings(model), _mask_settings(model)
    fpn = s["fpn_channels"]
    tv = TVMaskRCNN(**torchvision_kwargs(model, s),
                    mask_roi_pool=MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2),
                    mask_head=MaskRCNNHeads(fpn, list(m["mask_layers"]), 1),
                    mask_predictor=MaskRCNNPredictor(m["mask_layers"][-1], m["mask_hidden"], s["num_classes"] + 1))
    return load_converted(model, tv, _to_tv_key)


def mask_rcnn_from_torchvision(tv_model: TVMaskRCNN) -> MaskRCNN:
    """Our MaskRCNN with the settings and weights of a torchvision one."""
    if not isinstance(tv_model, TVMaskRCNN):
        raise TypeError(f"expected torchvision's MaskRCNN, got {type(tv_model).__name__}")
    s = settings(tv_model)
    num_classes = s.pop("num_classes")
    return load_converted(tv_model, build_mask_rcnn(num_classes, **s, **_mask_settings(tv_model)), _from_tv_key)
