"""RetinaNet <-> torchvision's RetinaNet (retinanet_resnet50_fpn and the like).

Two differences in layout:

- the towers: ours are flat ``conv.{2i}`` (conv, ReLU, conv, ...), torchvision's
  ``conv.{i}.0`` (one Conv2dNormActivation per layer);
- the classifier: ours has K channels per anchor, label k on channel k - 1;
  torchvision's label k is channel k, so its num_classes is K + 1 and channel 0
  is the unused background slot (its COCO models: 91 channels, 0 = background,
  never a target). ``to_torchvision`` fills that slot with zero weights and a
  bias of -30 (sigmoid ~ 1e-13: never above a score threshold, ~0 focal loss),
  so both models give the same detections and losses. ``from_torchvision``
  drops channel 0: a torchvision model that does detect label 0 loses those
  detections.
"""
import math
import re

import torch
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead as TVRetinaNetHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from aligndet.models.box_coder import DEFAULT_SCALE_CLAMP
from aligndet.models.retinanet import RetinaNet, build_retinanet

from .common import check_normalisation, copy_trainable_flags, norm_name, resnet_name, torchvision_backbone

DEAD_LOGIT = -30.0  # bias of torchvision's unused label-0 channel
CLS_LOGITS = "head.classification_head.cls_logits."
_OUR_TOWER = re.compile(r"^(head\.(?:classification|regression)_head\.conv\.)(\d+)\.")
_TV_TOWER = re.compile(r"^(head\.(?:classification|regression)_head\.conv\.)(\d+)\.0\.")


def _to_tv_key(key: str) -> str:
    return _OUR_TOWER.sub(lambda m: f"{m.group(1)}{int(m.group(2)) // 2}.0.", key)


def _from_tv_key(key: str) -> str:
    return _TV_TOWER.sub(lambda m: f"{m.group(1)}{2 * int(m.group(2))}.", key)


def _settings(model) -> dict:
    """The build_retinanet arguments that reproduce ``model``, read off a
    RetinaNet of ours or of torchvision's."""
    transform, backbone, head = model.transform, model.backbone, model.head
    if isinstance(model, TVRetinaNet):
        if not isinstance(head, TVRetinaNetHead):
            raise ValueError(f"only torchvision's RetinaNetHead converts, got {type(head).__name__}")
        for tower in (head.classification_head.conv, head.regression_head.conv):
            if len(tower) != 4 or any(len(block) != 2 for block in tower):
                raise ValueError("only towers of 4 x (conv, ReLU) convert; the normalised towers of "
                                 "retinanet_resnet50_fpn_v2 (GroupNorm) do not")
        if transform.size_divisible != 32 or transform.fixed_size is not None or transform._skip_resize:
            raise ValueError("only size_divisible=32 with resizing and without fixed_size converts")
        extra = backbone.fpn.extra_blocks
        if not isinstance(extra, LastLevelP6P7) or not extra.use_P5:
            raise ValueError("only P6/P7 computed from P5 convert (LastLevelP6P7(C, C) as in "
                             "retinanet_resnet50_fpn, not P6 from C5 as in the _v2 model)")
        if backbone.body.return_layers != {"layer2": "0", "layer3": "1", "layer4": "2"}:
            raise ValueError(f"only an FPN on layer2-layer4 converts, got {backbone.body.return_layers}")
        num_classes = head.classification_head.num_classes - 1
        if num_classes < 1:
            raise ValueError("torchvision's model has only the background slot (num_classes=1): nothing to convert")
        matcher = model.proposal_matcher
        iou = (matcher.high_threshold, matcher.low_threshold, matcher.allow_low_quality_matches)
        box_loss = head.regression_head._loss_type
        coders = (model.box_coder, head.regression_head.box_coder)
        coder = [(tuple(c.weights), c.bbox_xform_clip) for c in coders]
        focal = (0.25, 2.0)  # fixed in torchvision
    else:
        if backbone.body.returned_layers != (2, 3, 4):
            raise ValueError(f"only an FPN on layer2-layer4 converts, got {backbone.body.returned_layers}")
        if head.group_norm:
            raise ValueError("only towers without a norm convert (head_norm='none'), as in retinanet_resnet50_fpn")
        num_classes = model.num_classes
        iou = (model.matcher.high, model.matcher.low, model.matcher.allow_low_quality)
        box_loss = model.box_loss
        coder = [(tuple(model.box_coder.weights), model.box_coder.scale_clamp)]
        focal = (model.focal_alpha, model.focal_gamma)
    unsupported = {"box loss": (box_loss in ("l1", "giou"), "l1 or giou", box_loss),
                   "box coder": (all(w == (1.0,) * 4 and math.isclose(c, DEFAULT_SCALE_CLAMP) for w, c in coder),
                                 "weights (1, 1, 1, 1)", coder),
                   "matcher": (iou[2], "low-quality matches", iou),
                   "focal loss": (focal == (0.25, 2.0), "alpha 0.25, gamma 2", focal)}
    for name, (ok, expected, value) in unsupported.items():
        if not ok:
            raise ValueError(f"only {name} {expected} converts, got {value}")
    check_normalisation(transform)
    sizes, ratios = model.anchor_generator.sizes, model.anchor_generator.aspect_ratios
    scales = len(sizes[0])
    base = tuple(s[0] for s in sizes)
    expected = tuple(tuple(int(b * 2 ** (i / scales)) for i in range(scales)) for b in base)
    if len(sizes) != 5 or tuple(map(tuple, sizes)) != expected or len(set(map(tuple, ratios))) != 1:
        raise ValueError("only anchors of 5 levels with sizes s * 2^(i / scales_per_octave) and the same aspect "
                         f"ratios on every level convert, got sizes {sizes} and ratios {ratios}")
    min_size = tuple(transform.min_size)
    return dict(
        num_classes=num_classes, backbone=resnet_name(backbone.body), norm=norm_name(backbone.body),
        fpn_channels=backbone.out_channels, min_size=min_size if len(min_size) > 1 else min_size[0],
        max_size=transform.max_size, anchor_sizes=base, aspect_ratios=tuple(ratios[0]), scales_per_octave=scales,
        fg_iou_thresh=iou[0], bg_iou_thresh=iou[1], box_loss=box_loss, score_thresh=model.score_thresh,
        nms_thresh=model.nms_thresh, detections_per_img=model.detections_per_img,
        topk_candidates=model.topk_candidates,
    )


def _per_anchor(t: torch.Tensor, num_anchors: int) -> torch.Tensor:
    """cls_logits weight [A * K, ...] or bias [A * K] -> [A, K, ...]."""
    return t.reshape(num_anchors, -1, *t.shape[1:])


def retinanet_to_torchvision(model: RetinaNet) -> TVRetinaNet:
    """A torchvision RetinaNet with the same settings and (copied) weights;
    its classifier has num_classes + 1 channels, channel 0 dead."""
    if not isinstance(model, RetinaNet):
        raise TypeError(f"expected our RetinaNet, got {type(model).__name__}")
    s = _settings(model)
    num_anchors = model.head.classification_head.num_anchors
    sizes = tuple(tuple(int(b * 2 ** (i / s["scales_per_octave"])) for i in range(s["scales_per_octave"]))
                  for b in s["anchor_sizes"])
    tv = TVRetinaNet(
        torchvision_backbone(model.backbone, LastLevelP6P7(s["fpn_channels"], s["fpn_channels"])),
        s["num_classes"] + 1, min_size=s["min_size"], max_size=s["max_size"],
        anchor_generator=TVAnchorGenerator(sizes, (s["aspect_ratios"],) * len(sizes)),
        head=TVRetinaNetHead(s["fpn_channels"], num_anchors, s["num_classes"] + 1),
        score_thresh=s["score_thresh"], nms_thresh=s["nms_thresh"], detections_per_img=s["detections_per_img"],
        fg_iou_thresh=s["fg_iou_thresh"], bg_iou_thresh=s["bg_iou_thresh"], topk_candidates=s["topk_candidates"],
    )
    tv.head.regression_head._loss_type = s["box_loss"]
    state = {_to_tv_key(k): v for k, v in model.state_dict().items()}
    weight, bias = _per_anchor(state[CLS_LOGITS + "weight"], num_anchors), _per_anchor(state[CLS_LOGITS + "bias"],
                                                                                        num_anchors)
    state[CLS_LOGITS + "weight"] = torch.cat([torch.zeros_like(weight[:, :1]), weight], 1).flatten(0, 1)
    state[CLS_LOGITS + "bias"] = torch.cat([torch.full_like(bias[:, :1], DEAD_LOGIT), bias], 1).flatten(0, 1)
    tv.load_state_dict(state, strict=True)
    copy_trainable_flags(model, tv, _to_tv_key)
    return tv.train(model.training)


def retinanet_from_torchvision(tv_model: TVRetinaNet) -> RetinaNet:
    """Our RetinaNet with the settings and weights of a torchvision one; its
    channel 0 (the background slot, label 0) is dropped, so num_classes is one less."""
    if not isinstance(tv_model, TVRetinaNet):
        raise TypeError(f"expected torchvision's RetinaNet, got {type(tv_model).__name__}")
    s = _settings(tv_model)
    model = build_retinanet(s.pop("num_classes"), **s)
    num_anchors = model.head.classification_head.num_anchors
    state = {_from_tv_key(k): v for k, v in tv_model.state_dict().items()}
    for name in ("weight", "bias"):
        state[CLS_LOGITS + name] = _per_anchor(state[CLS_LOGITS + name], num_anchors)[:, 1:].flatten(0, 1)
    model.load_state_dict(state, strict=True)
    copy_trainable_flags(tv_model, model, _from_tv_key)
    return model.train(tv_model.training)
