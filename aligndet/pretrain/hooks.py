"""The box-domain hooks: how each detector takes part in AlignDet pre-training
(docs/method.md §3.3-3.6 and the table in §4).

A hook runs the trainable part of one detector (neck and heads) on the frozen
backbone's features of one view, assigns every prediction to a
selective-search proposal with the detector's *own* label-assignment rule,
and returns

    {"embeddings": [S, D], "ids": [S] int64 (-1 background), "losses": {name: scalar}}

for the contrastive loss and the detector's own box losses. The hooks live
here, not in the detectors, so that a detector copied out for supervised
training carries no pre-training code; they only call what every detector
already has for supervised training (its matcher, box coder, heads).

| detector     | predictions          | native rule                    | kept for L_con      | embedding head     |
|--------------|----------------------|--------------------------------|---------------------|--------------------|
| Faster R-CNN | RPN RoIs + proposals | max IoU >= 0.5, no background  | 4096 pos. per image | MLP on box feature |
| RetinaNet    | anchors P3-P7        | ``RetinaNet.match`` 0.5 / 0.4  | 2048 per image      | convs on cls tower |
| FCOS         | points P3-P7         | ``FCOS.match`` (FCOS rule)     | 2048 per batch      | convs on cls tower |
| DETR         | queries x layers     | Hungarian, box-only cost       | all queries         | MLP on decoder out |

DETR also runs its own set loss against the proposals, with their
pseudo-classes (cluster ids) as labels (docs/method.md §3.9).

``AlignDet`` (``box.py``) finds a detector's hook with ``hook_for(detector)``.
"""
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from aligndet.models.detr import DETR
from aligndet.models.faster_rcnn import FasterRCNN
from aligndet.models.fcos import FCOS
from aligndet.models.hungarian import HungarianMatcher
from aligndet.models.one_stage import flatten_predictions
from aligndet.models.retinanet import RetinaNet


# ---------------------------------------------------------------- Faster R-CNN

def faster_rcnn_embedding_head(detector: FasterRCNN, dim: int = 256) -> nn.Module:
    """Projection MLP on the RoI box-head feature, in place of the classifier:
    [R, hidden] -> Linear -> ReLU -> Linear -> [R, dim]."""
    hidden = detector.roi_heads.box_predictor.cls_score.in_features
    return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


def faster_rcnn_box_domain(detector: FasterRCNN, body_features, image_sizes, padded_size, proposals,
                           embedding_head: nn.Module, num_samples: int, with_losses: bool = True) -> dict:
    """Faster R-CNN row of docs/method.md §4.

    Args:
        body_features: the frozen backbone's outputs for the padded batch.
        image_sizes: (h, w) of each image in the batch; padded_size: (H, W).
        proposals: per image {"boxes": [P_i, 4] xyxy pixels, "ids": [P_i] int64}.
        num_samples: positive RoIs kept per image.
        with_losses: False for the momentum view, whose losses nobody uses.

    The RPN trains class-agnostically on the proposals. The RoIs are the RPN's
    proposals plus the selective-search proposals themselves; a RoI takes the
    id of the proposal it overlaps most if that IoU is >= 0.5 and is dropped
    otherwise (no background). Losses: the RPN's, plus "loss_box_reg",
    class-agnostic L1 on the deltas to the matched proposal.
    """
    features = detector.backbone.fpn(body_features)
    if with_losses:
        targets = [{"boxes": p["boxes"]} for p in proposals]
        rpn_boxes, losses = detector.rpn(image_sizes, padded_size, list(features.values()), targets)
    else:  # the RPN's matching of every anchor to every proposal is the costly part of its loss
        rpn_boxes, losses = detector.rpn.propose(image_sizes, padded_size, list(features.values()))[0], {}
    rois, ids, matched = [], [], []
    for boxes_i, p in zip(rpn_boxes, proposals):
        candidates = torch.cat([boxes_i, p["boxes"].to(boxes_i.dtype)])  # [R_i, 4]
        if p["boxes"].numel() == 0:
            keep = torch.zeros(0, dtype=torch.int64, device=candidates.device)
            best = keep
        else:
            best_iou, best = box_iou(p["boxes"], candidates).max(dim=0)  # [R_i]
            keep = torch.nonzero(best_iou >= 0.5).squeeze(1)
            keep = keep[torch.randperm(keep.numel(), device=keep.device)[:num_samples]]
        rois.append(candidates[keep])
        ids.append(p["ids"][best[keep]])
        matched.append(p["boxes"][best[keep]])
    roi_heads = detector.roi_heads
    box_features = roi_heads.box_features(features, rois, image_sizes)  # [R, hidden]
    embeddings = embedding_head(box_features)                           # [R, D]
    if not with_losses:
        return {"embeddings": embeddings, "ids": torch.cat(ids), "losses": {}}
    deltas = roi_heads.box_predictor.bbox_pred(box_features)
    deltas = deltas.reshape(deltas.shape[0], deltas.shape[1] // 4, 4)[:, 1]  # class-agnostic: first object slot
    target_deltas = roi_heads.box_coder.encode(torch.cat(matched), torch.cat(rois))
    losses["loss_box_reg"] = F.l1_loss(deltas, target_deltas, reduction="sum") / max(deltas.shape[0], 1)
    return {"embeddings": embeddings, "ids": torch.cat(ids), "losses": losses}


# ---------------------------------------------------------------- RetinaNet and FCOS

class DenseEmbeddingHead(nn.Module):
    """The projection MLP that replaces a dense detector's classifier, on the
    classification tower, one D-dim embedding per anchor / point:
    [B, C, H, W] -> conv k x k -> ReLU -> conv 1x1 -> [B, A * D, H, W].

    ``kernel_size`` of the first conv: 1 here by default, 3 in the official
    code; ``init_std``: None keeps PyTorch's default init, 0.01 is the
    official N(0, 0.01). ``centerness=True`` (FCOS) adds a stage-2-only 3x3
    conv predicting the centerness logit from the same tower, trained by
    ``loss_centerness_cls`` (docs/method.md §4): it gives the tower that is
    transferred a gradient besides the contrastive loss's, as the official
    FCOS head with its centerness branch on the classification tower does.
    It is not part of the detector and is dropped at fine-tuning."""

    def __init__(self, channels: int, num_anchors: int, dim: int, kernel_size: int = 1, init_std=None,
                 centerness: bool = False):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"embedding head kernel_size must be 1 or 3, not {kernel_size}")
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2),
                                 nn.ReLU(inplace=True), nn.Conv2d(channels, num_anchors * dim, 1))
        self.centerness = nn.Conv2d(channels, num_anchors, 3, padding=1) if centerness else None
        convs = [self.mlp[0], self.mlp[2]] + ([self.centerness] if centerness else [])
        for conv in convs if init_std is not None else []:
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)
        self.weight_dict = {"loss_centerness_cls": 1.0} if centerness else {}
        self.num_anchors = num_anchors

    def forward(self, tower: Tensor) -> Tensor:
        """Every location's embeddings: [B, C, H, W] -> [B, A * D, H, W]."""
        return self.mlp(tower)

    def hidden(self, tower: Tensor) -> Tensor:
        """The first conv and ReLU: [B, C, H, W] -> [B, C, H, W]."""
        return F.relu(self.mlp[0](tower))

    def project(self, hidden: Tensor, anchor: Tensor) -> Tensor:
        """The last (1x1) conv at chosen locations only: ``hidden`` [S, C] of the locations,
        ``anchor`` [S] which of the A anchors there -> [S, D]; equal to ``forward`` there."""
        last = self.mlp[2]
        out = F.linear(hidden, last.weight.flatten(1), last.bias)               # [S, A * D]
        return out.view(len(hidden), self.num_anchors, -1)[torch.arange(len(hidden), device=out.device), anchor]


def dense_embedding_head(detector, dim: int = 256, kernel_size: int = 1, init_std=None,
                         centerness: bool = False) -> nn.Module:
    """``DenseEmbeddingHead`` for ``detector``'s FPN width and anchors per location."""
    if centerness and not hasattr(detector, "centerness_targets"):
        raise ValueError(f"a centerness branch on the classification tower needs FCOS, not "
                         f"{type(detector).__name__}")
    return DenseEmbeddingHead(detector.backbone.out_channels, detector.head.classification_head.num_anchors, dim,
                              kernel_size, init_std, centerness)


def dense_box_domain(detector, body_features, image_sizes, padded_size, proposals, embedding_head: nn.Module,
                     num_samples: int, per_image: bool = True, with_losses: bool = True) -> dict:
    """RetinaNet and FCOS rows of docs/method.md §4 (arguments as in ``faster_rcnn_box_domain``).

    Every anchor / point is matched to the proposals with the detector's own
    rule (``detector.match``) and takes its proposal's id (-1 background,
    ignored ones dropped); ``num_samples`` are kept, per image or per batch,
    positives first and background filling the rest. Embeddings and ids are
    gathered with one flat index over (image, prediction), so they stay aligned
    however many images the batch holds. Losses: the detector's own regression
    losses (``detector.regression_losses``) towards the matched proposals;
    ``with_losses=False`` (the momentum view) skips them and the regression head.
    """
    features = list(detector.backbone.fpn(body_features).values())
    anchors_per_level = detector.anchor_generator(padded_size, features)
    anchors = torch.cat(anchors_per_level)                                  # [T, 4]
    level_sizes = [a.shape[0] for a in anchors_per_level]
    classification = detector.head.classification_head
    num_anchors = classification.num_anchors
    towers = [classification.conv(x) for x in features]
    matched = [detector.match(anchors, p["boxes"], level_sizes) for p in proposals]
    boxes = [p["boxes"] for p in proposals]
    losses = {}
    if with_losses:
        losses = detector.regression_losses(detector.head.regression_head(features), anchors, matched, boxes)
    if with_losses and getattr(embedding_head, "centerness", None) is not None:  # FCOS, stage-2-only branch
        logits = torch.cat([flatten_predictions(embedding_head.centerness(t), num_anchors) for t in towers], 1)
        positive, target = detector.centerness_targets(anchors, matched, boxes)
        losses["loss_centerness_cls"] = F.binary_cross_entropy_with_logits(
            logits[positive].squeeze(1).float(), target, reduction="sum") / max(1, int(positive.sum()))

    matched = torch.stack(matched)                                          # [B, T]
    ids = torch.full_like(matched, -1)
    for i, p in enumerate(proposals):
        positive = matched[i] >= 0
        ids[i, positive] = p["ids"][matched[i, positive]]
    picks = sample_positives_first(matched, num_samples, per_image)         # flat over B * T
    if isinstance(embedding_head, DenseEmbeddingHead):
        # Only the kept predictions need an embedding: the last 1x1 conv runs at their locations.
        hidden = torch.cat([flatten_predictions(embedding_head.hidden(t), 1) for t in towers], 1)  # [B, L, C]
        image, prediction = picks // matched.shape[1], picks % matched.shape[1]
        kept = embedding_head.project(hidden[image, prediction // num_anchors], prediction % num_anchors)
    else:  # any module [B, C, H, W] -> [B, A * D, H, W]
        embeddings = torch.cat([flatten_predictions(embedding_head(t), num_anchors) for t in towers], 1)  # [B, T, D]
        kept = embeddings.flatten(0, 1)[picks]
    return {"embeddings": kept, "ids": ids.flatten()[picks], "losses": losses}


def sample_positives_first(matched: Tensor, num_samples: int, per_image: bool = True) -> Tensor:
    """Indices into ``matched.flatten()`` ([B, T]: >= 0 positive, -1 background,
    -2 ignored): up to ``num_samples`` positives in random order, then random
    background to fill up to ``num_samples``; per image, or over the whole batch."""
    groups = matched.unbind(0) if per_image else [matched.flatten()]
    width = matched.shape[1] if per_image else 0
    picks = []
    for g, labels in enumerate(groups):
        positive = torch.nonzero(labels >= 0).squeeze(1)
        background = torch.nonzero(labels == -1).squeeze(1)
        positive = positive[torch.randperm(positive.numel(), device=labels.device)[:num_samples]]
        fill = num_samples - positive.numel()
        background = background[torch.randperm(background.numel(), device=labels.device)[:fill]]
        picks.append(torch.cat([positive, background]) + g * width)
    return torch.cat(picks)


# ---------------------------------------------------------------- DETR

def detr_embedding_head(detector: DETR, dim: int = 256) -> nn.Module:
    """The projector on every decoder layer's query outputs: [..., d] -> Linear -> ReLU -> Linear -> [..., dim].
    DETR keeps its class head, which trains on the pseudo-classes (docs/method.md §3.9)."""
    d = detector.transformer.d_model
    return nn.Sequential(nn.Linear(d, d), nn.ReLU(inplace=True), nn.Linear(d, dim))


def detr_box_domain(detector: DETR, body_features, image_sizes, padded_size, proposals, embedding_head: nn.Module,
                    num_samples: int = 0, with_losses: bool = True) -> dict:
    """DETR row of docs/method.md §4 (arguments as in ``faster_rcnn_box_domain``).

    proposals: per image {"boxes": [P_i, 4] xyxy pixels, "ids": [P_i] int64 instance ids,
    "classes": [P_i] int64 pseudo-classes (cluster ids, 0..K-1)}; num_samples is unused (every query
    of every decoder layer is kept).

    Pass 1 (``with_losses``): DETR's own set loss, with the proposals as the targets and their
    cluster ids as the classes: Hungarian matching (class 1, L1 5, GIoU 2) at every decoder layer,
    then cross-entropy, L1 and GIoU (``loss_ce``, ``loss_bbox``, ``loss_giou`` and the ``_i``
    auxiliary terms). Pass 2: ``query_instance_ids``, a box-only matching at every layer, gives each
    query its proposal's instance id or -1. Embeddings: the projector on all L x B x Q queries,
    flattened layer-major like the ids.
    """
    hs = detector.decode(body_features["0"], image_sizes, padded_size)      # [L, B, Q, d]
    boxes = detector.bbox_embed(hs).sigmoid()                              # [L, B, Q, 4] cxcywh / image size
    if with_losses and not all("classes" in p for p in proposals):
        raise ValueError("DETR's box-domain pre-training needs the proposals' pseudo-classes (\"classes\"): "
                         "give TwoViewDataset the cache's ClusterIds")
    # DETR's labels are 1..K; the momentum view (no losses) needs the normalised boxes only, its labels are unused.
    targets = detector.normalise_targets(
        [{"boxes": p["boxes"], "labels": p["classes"] + 1 if with_losses else torch.ones_like(p["ids"])}
         for p in proposals], image_sizes)
    losses = {}
    if with_losses:
        losses = detector.criterion(detector.layer_outputs(detector.class_embed(hs), boxes), targets)
    matcher = detector.criterion.matcher
    ids = query_instance_ids(boxes, [t["boxes"] for t in targets], [p["ids"] for p in proposals],
                             HungarianMatcher(0.0, matcher.cost_bbox, matcher.cost_giou))
    return {"embeddings": embedding_head(hs).flatten(0, 2), "ids": ids.flatten(), "losses": losses}


@torch.no_grad()
def query_instance_ids(boxes: Tensor, target_boxes, target_ids, matcher: HungarianMatcher) -> Tensor:
    """Pass 2 of DETR's box-domain assignment: at every decoder layer, ``matcher`` (box-only: L1 + GIoU, no class
    term; docs/method.md §7, item 17) pairs each image's queries one-to-one with its proposals.

    boxes [L, B, Q, 4] normalised cxcywh; per image target_boxes [N_i, 4] normalised cxcywh and target_ids [N_i]
    int64. Returns ids [L, B, Q] int64: the instance id of the proposal each query is matched to, or -1."""
    ids = torch.full(boxes.shape[:3], -1, dtype=torch.int64, device=boxes.device)
    for layer, layer_boxes in enumerate(boxes):
        for image, (query, target) in enumerate(matcher(None, layer_boxes, None, target_boxes)):
            ids[layer, image, query.to(ids.device)] = target_ids[image][target.to(target_ids[image].device)]
    return ids


# ---------------------------------------------------------------- registry

class BoxDomainHook(NamedTuple):
    """What ``AlignDet`` needs of one detector family.

    embedding_head(detector, dim, **options) -> the projection MLP;
    forward(detector, body_features, image_sizes, padded_size, proposals, embedding_head, num_samples,
            with_losses=True) -> dict;
    classifier_layers: name prefixes of the classifier the MLP replaces (frozen in
        pre-training, re-initialised at fine-tuning);
    num_samples: the official number of predictions kept for the contrastive loss (0: all);
    copied_params: name prefixes of the detector's parameters that the momentum detector
        copies from the online one at every step instead of averaging (docs/method.md §3.2).
    """
    embedding_head: Callable
    forward: Callable
    classifier_layers: tuple
    num_samples: int
    copied_params: tuple = ()


DENSE_CLASSIFIER = ("head.classification_head.cls_logits.",)
HOOKS = {
    FasterRCNN: BoxDomainHook(faster_rcnn_embedding_head, faster_rcnn_box_domain,
                              ("roi_heads.box_predictor.cls_score.",), 4096),
    RetinaNet: BoxDomainHook(dense_embedding_head, dense_box_domain, DENSE_CLASSIFIER, 2048),  # per image
    FCOS: BoxDomainHook(dense_embedding_head, partial(dense_box_domain, per_image=False),  # per batch (official)
                        DENSE_CLASSIFIER, 2048),
    # No classifier is replaced: the class head trains on the pseudo-classes. query_embed is copied (official).
    DETR: BoxDomainHook(detr_embedding_head, detr_box_domain, (), 0, copied_params=("query_embed.",)),
}

# The build_detector names train_box.py offers: those whose class has a hook above.
BOX_DOMAIN_DETECTORS = ("faster_rcnn", "retinanet", "fcos", "detr")


def hook_for(detector: nn.Module) -> BoxDomainHook:
    """The hook of ``detector``'s class (or of its nearest registered base class)."""
    for cls in type(detector).__mro__:
        if cls in HOOKS:
            return HOOKS[cls]
    raise ValueError(f"{type(detector).__name__} has no box-domain hook; registered: "
                     f"{', '.join(c.__name__ for c in HOOKS)}")
