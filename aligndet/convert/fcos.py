"""FCOS <-> torchvision's FCOS (fcos_resnet50_fpn and the like).

Parameter names are the same on both sides; only the classifier differs.
torchvision's FCOS predicts ``num_classes`` channels and reports the channel
index as the label, so its COCO models have 91 channels of which channel 0 is
an unused background slot (no target ever has label 0). Ours has one channel
per object class (labels 1..K on channels 0..K-1). To torchvision we add that
slot in front, with zero weights and a bias of -30: its score stays ~1e-7,
below any threshold, and it adds ~1e-26 per point to the focal loss, so
detections and losses agree. From torchvision we drop it.
"""
import math

import torch
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.fcos import FCOSHead as TVFCOSHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from aligndet.models.fcos import FCOS, build_fcos

from .common import check_normalisation, copy_trainable_flags, norm_name, resnet_name, torchvision_backbone

CLS_LOGITS = "head.classification_head.cls_logits."
BACKGROUND_BIAS = -30.0  # the torchvision-only label-0 channel never fires


def _torchvision_scale_ranges(anchor_generator):
    """torchvision's fixed rule, per level: (4, 8) x anchor side, open at both ends of the pyramid."""
    sides = [float(cell[0, 2] - cell[0, 0]) for cell in anchor_generator.cell_anchors]
    ranges = [[4 * s, 8 * s] for s in sides]
    ranges[0][0], ranges[-1][1] = 0.0, math.inf
    return tuple(tuple(r) for r in ranges)


def _settings(model) -> dict:
    """The build_fcos arguments that reproduce ``model``, read off an FCOS of ours or of torchvision's."""
    transform, body = model.transform, model.backbone.body
    if isinstance(model, TVFCOS):
        if not isinstance(model.head, TVFCOSHead):
            raise ValueError("only torchvision's default FCOSHead converts")
        tower = model.head.classification_head.conv
        if len(tower) != 12 or not isinstance(tower[1], torch.nn.GroupNorm) or tower[1].num_groups != 32:
            raise ValueError("only the head with 4 convs and GroupNorm(32) per tower converts")
        if transform.size_divisible != 32 or transform.fixed_size is not None:
            raise ValueError("only size_divisible=32 without fixed_size converts")
        returned = tuple(int(name[len("layer"):]) for name in body.return_layers)
        num_classes = model.head.classification_head.num_classes - 1
        if num_classes < 1:
            raise ValueError("torchvision's FCOS needs at least 2 class channels (channel 0 is the unused label 0)")
    else:
        if model.box_loss != "giou" or (model.focal_alpha, model.focal_gamma) != (0.25, 2.0):
            raise ValueError("torchvision's FCOS trains with the GIoU loss and focal loss alpha 0.25, gamma 2; "
                             f"got box_loss={model.box_loss!r}, alpha={model.focal_alpha}, gamma={model.focal_gamma}")
        if model.scale_ranges is not None and model.scale_ranges != _torchvision_scale_ranges(model.anchor_generator):
            raise ValueError(f"torchvision's FCOS has fixed scale ranges (4, 8) x anchor size "
                             f"{_torchvision_scale_ranges(model.anchor_generator)}; got {model.scale_ranges}")
        returned = body.returned_layers
        num_classes = model.num_classes
    if returned != (2, 3, 4) or not isinstance(model.backbone.fpn.extra_blocks, LastLevelP6P7) \
            or not model.backbone.fpn.extra_blocks.use_P5:
        raise ValueError("only the P3-P7 pyramid (layers 2-4, P6 from P5, P7) converts")
    sizes, ratios = model.anchor_generator.sizes, model.anchor_generator.aspect_ratios
    if any(len(s) != 1 for s in sizes) or any(tuple(r) != (1.0,) for r in ratios):
        raise ValueError("FCOS converts with one square anchor (ratio 1.0) per level")
    check_normalisation(transform)
    min_size = tuple(transform.min_size)
    return dict(
        num_classes=num_classes, backbone=resnet_name(body), norm=norm_name(body),
        fpn_channels=model.backbone.out_channels, min_size=min_size if len(min_size) > 1 else min_size[0],
        max_size=transform.max_size, anchor_sizes=tuple(s[0] for s in sizes),
        center_sampling_radius=model.center_sampling_radius, score_thresh=model.score_thresh,
        nms_thresh=model.nms_thresh, detections_per_img=model.detections_per_img,
        topk_candidates=model.topk_candidates,
    )


def fcos_to_torchvision(model: FCOS) -> TVFCOS:
    """A torchvision FCOS with the same settings and (copied) weights, and one
    more class channel in front (label 0, never firing; see the module docstring)."""
    if not isinstance(model, FCOS):
        raise TypeError(f"expected our FCOS, got {type(model).__name__}")
    s = _settings(model)
    anchors = TVAnchorGenerator(tuple((a,) for a in s["anchor_sizes"]), ((1.0,),) * len(s["anchor_sizes"]))
    tv = TVFCOS(torchvision_backbone(model.backbone, LastLevelP6P7(s["fpn_channels"], s["fpn_channels"])),
                s["num_classes"] + 1, min_size=s["min_size"], max_size=s["max_size"], anchor_generator=anchors,
                center_sampling_radius=s["center_sampling_radius"], score_thresh=s["score_thresh"],
                nms_thresh=s["nms_thresh"], detections_per_img=s["detections_per_img"],
                topk_candidates=s["topk_candidates"])
    state = model.state_dict()
    weight, bias = state[CLS_LOGITS + "weight"], state[CLS_LOGITS + "bias"]  # [K, C, 3, 3], [K]
    state[CLS_LOGITS + "weight"] = torch.cat([weight.new_zeros((1,) + weight.shape[1:]), weight])
    state[CLS_LOGITS + "bias"] = torch.cat([bias.new_full((1,), BACKGROUND_BIAS), bias])
    tv.load_state_dict(state, strict=True)
    copy_trainable_flags(model, tv, lambda key: key)
    return tv.train(model.training)


def fcos_from_torchvision(tv_model: TVFCOS) -> FCOS:
    """Our FCOS with the settings and weights of a torchvision one; its
    channel 0 (the unused background slot of label 0) is dropped."""
    if not isinstance(tv_model, TVFCOS):
        raise TypeError(f"expected torchvision's FCOS, got {type(tv_model).__name__}")
    s = _settings(tv_model)
    model = build_fcos(s.pop("num_classes"), **s)
    state = tv_model.state_dict()
    state[CLS_LOGITS + "weight"] = state[CLS_LOGITS + "weight"][1:]
    state[CLS_LOGITS + "bias"] = state[CLS_LOGITS + "bias"][1:]
    model.load_state_dict(state, strict=True)
    copy_trainable_flags(tv_model, model, lambda key: key)
    return model.train(tv_model.training)
