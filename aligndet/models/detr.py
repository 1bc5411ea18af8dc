"""DETR: end-to-end object detection with transformers (Carion et al., ECCV
2020), following torchvision's detection API like the other detectors here:

    model.train(); losses = model(images, targets)   # dict of scalar losses, combined by model.weight_dict
    model.eval();  detections = model(images)        # [{"boxes", "scores", "labels"}]

images: list of float [3, H, W] tensors in [0, 1]; targets: list of
{"boxes": [N, 4] xyxy pixels, "labels": [N] int64 in 1..num_classes}.
Detections are xyxy in the input images' pixels.

    transform (normalise, resize, pad) -> ResNet C5 [B, C, H/32, W/32] -> 1x1 conv input_proj to d
    -> + sine positional encoding of the padding mask -> transformer encoder-decoder, Q learned object queries
    -> per decoder layer and query: class_embed (K + 1 logits), bbox_embed (3-layer MLP, sigmoid: cx, cy, w, h)

Labels: class-head index ``l - 1`` is label ``l`` (1..K) and index ``K``, the
last, is "no object"; detections carry labels 1..K. Boxes inside the model are
(cx, cy, w, h) normalised by each image's own size before padding (§3.2).

Training (§3.1): per decoder layer, a Hungarian matching (``hungarian.py``)
pairs queries with target boxes; the loss is the cross-entropy over the K + 1
classes of every query (unmatched queries target "no object", weighted
``eos_coef`` = 0.1) plus L1 and GIoU losses on the matched boxes, summed and
divided by the number of target boxes (averaged over processes). Each
intermediate decoder layer adds the same losses, suffixed ``_0``, ``_1``, ...
(auxiliary decoding losses, §3.2). Eval: each query's best real class and its
softmax probability, the box clipped to the image; no NMS (the one-to-one
matching teaches the queries not to duplicate each other, §3.1).
"""
import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, clip_boxes_to_image, generalized_box_iou_loss

from .backbone import build_body
from .hungarian import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .transform import DetectionTransform, check_targets
from .transformer import Transformer


class MLP(nn.Module):
    """num_layers linear layers with ReLU between them (the box head: d -> d -> d -> 4)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class C5Backbone(nn.Module):
    """The body (any family of ``backbone.build_body``), returning its last stage only:
    [B, 3, H, W] -> [B, C, H/32, W/32]
    (H/16 with a dilated layer4, DC5; or C4, stride 16, when the body stops at layer3)."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.out_channels = body.stage_channels()[max(body.returned_layers) - 1]

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)["0"]


def padding_mask(image_sizes, padded_size, device) -> Tensor:
    """[B, H, W] bool, True on the padding of each image in the batch."""
    mask = torch.ones((len(image_sizes), *padded_size), dtype=torch.bool, device=device)
    for m, (h, w) in zip(mask, image_sizes):
        m[:h, :w] = False
    return mask


def num_target_boxes(targets, device) -> Tensor:
    """Target boxes per process, at least 1: the normaliser of the box losses (averaged over processes
    so that every process divides by the same number)."""
    count = torch.as_tensor(float(sum(len(t["boxes"]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1)


class SetCriterion(nn.Module):
    """DETR's set loss (§3.1, Eq. 2) of one or more decoder layers.

    Args:
        num_classes: K real classes; class index K is "no object".
        matcher: a ``HungarianMatcher``.
        eos_coef: weight of the "no object" class in the cross-entropy
            (§3.1: down-weighted by 10 to account for class imbalance).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, eos_coef: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        class_weight = torch.ones(num_classes + 1)
        class_weight[-1] = eos_coef
        self.register_buffer("class_weight", class_weight, persistent=False)  # not a weight: no checkpoint key

    def layer_losses(self, logits: Tensor, boxes: Tensor, targets, num_boxes: Tensor) -> dict:
        """One decoder layer: logits [B, Q, K + 1], boxes [B, Q, 4] normalised cxcywh -> {loss_ce,
        loss_bbox, loss_giou, class_error} after its own Hungarian matching."""
        indices = self.matcher(logits, boxes, [t["classes"] for t in targets], [t["boxes"] for t in targets])
        image_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(logits.device)
        query_idx = torch.cat([q for q, _ in indices]).to(logits.device)
        matched_classes = torch.cat([t["classes"][j.to(t["classes"].device)] for t, (_, j) in zip(targets, indices)])
        target_boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, indices)])
        matched_classes = matched_classes.to(logits.device)
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[image_idx, query_idx] = matched_classes                                      # [B, Q]; K = no object
        # Mean over all queries, weighted: sum_q w(c_q) * CE_q / sum_q w(c_q).
        loss_ce = F.cross_entropy(logits.transpose(1, 2).float(), classes, self.class_weight)
        matched = boxes[image_idx, query_idx].float()                                         # [M, 4] cxcywh
        target_boxes = target_boxes.to(matched)
        loss_bbox = F.l1_loss(matched, target_boxes, reduction="sum")
        loss_giou = generalized_box_iou_loss(box_convert(matched, "cxcywh", "xyxy"),
                                             box_convert(target_boxes, "cxcywh", "xyxy"), reduction="sum")
        wrong = (logits[image_idx, query_idx].argmax(-1) != matched_classes).float()
        return {"loss_ce": loss_ce, "loss_bbox": loss_bbox / num_boxes, "loss_giou": loss_giou / num_boxes,
                "class_error": 100 * wrong.mean() if wrong.numel() else wrong.sum()}

    def forward(self, outputs: dict, targets) -> dict:
        """outputs: {"pred_logits" [B, Q, K + 1], "pred_boxes" [B, Q, 4], "aux_outputs": [the same, per
        intermediate decoder layer]}; targets: per image {"classes": [N] int64 in 0..K-1, "boxes": [N, 4]
        normalised cxcywh}. Returns the unweighted losses, those of ``aux_outputs[i]`` suffixed ``_i``, and
        ``class_error`` (% of the last layer's matched queries whose best class is wrong; logged, not optimised)."""
        num_boxes = num_target_boxes(targets, outputs["pred_boxes"].device)
        losses = self.layer_losses(outputs["pred_logits"], outputs["pred_boxes"], targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self.layer_losses(aux["pred_logits"], aux["pred_boxes"], targets, num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items() if k.startswith("loss")})
        return losses


class DETR(nn.Module):
    """transform -> backbone C5 -> input_proj -> transformer -> class / box heads.

    Args:
        backbone: a ``C5Backbone``.
        transform: resizing / normalisation / batching.
        transformer: a ``Transformer`` (its ``d_model`` is the hidden width d).
        num_classes: K object classes (labels 1..K); the class head has K + 1 outputs.
        num_queries: Q learned object queries, the most objects one image can hold.
        criterion: a ``SetCriterion``; its layers' losses are weighted by ``loss_weights``.
        loss_weights: {"loss_ce", "loss_bbox", "loss_giou"} -> weight (1, 5, 2 in the paper).
        aux_loss: add the losses of every intermediate decoder layer.
        detections_per_img: the best queries kept per image in eval (None: all Q).
    """

    # The layer fine-tuning re-initialises after pre-training (docs/method.md §3.8): the class head only. The box
    # MLP, the queries, input_proj and the transformer transfer whole, as in the official DETR pre-training.
    OUTPUT_LAYERS = ("class_embed.",)

    def __init__(self, backbone: C5Backbone, transform: DetectionTransform, transformer: Transformer,
                 num_classes: int, num_queries: int, criterion: SetCriterion, loss_weights: dict,
                 aux_loss: bool = True, detections_per_img: int = None):
        super().__init__()
        d = transformer.d_model
        self.transform = transform
        self.backbone = backbone
        self.input_proj = nn.Conv2d(backbone.out_channels, d, kernel_size=1)
        self.position_embedding = PositionEmbeddingSine(d // 2)
        self.transformer = transformer
        self.query_embed = nn.Embedding(num_queries, d)
        self.class_embed = nn.Linear(d, num_classes + 1)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.criterion = criterion
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.aux_loss = aux_loss
        self.detections_per_img = detections_per_img
        # How a training loop combines the loss terms forward() returns: the same weights at every decoder layer.
        num_aux = len(transformer.decoder.layers) - 1 if aux_loss else 0
        self.weight_dict = {f"{k}{s}": float(w) for s in [""] + [f"_{i}" for i in range(num_aux)]
                            for k, w in loss_weights.items()}

    def forward(self, images, targets=None):
        if self.training:
            check_targets(targets, self.num_classes)
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, image_sizes, targets = self.transform(images, targets)
        outputs = self.predict(self.backbone_features(batch), image_sizes, batch.shape[-2:])
        if self.training:
            return self.criterion(outputs, self.normalise_targets(targets, image_sizes))
        detections = self.postprocess(outputs, image_sizes)
        return self.transform.postprocess(detections, image_sizes, original_sizes)

    def enable_feature_cache(self, max_images: int = 50_000):
        """Remember the backbone's output for every padded input it has seen, keyed by the input's bytes:
        with a frozen backbone (no trainable parameter, frozen batch norm) the same input gives the same
        features, so each training image costs one backbone pass per distinct augmentation instead of one
        per step (the demo's many cheap DETR steps). At most ``max_images`` entries are kept; later inputs
        are computed as usual. Raises ``ValueError`` for a backbone that trains or normalises by batch."""
        trainable = [n for n, p in self.backbone.named_parameters() if p.requires_grad]
        batch_norms = [n for n, m in self.backbone.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if trainable or batch_norms:
            raise ValueError("the feature cache needs a frozen backbone: trainable_layers=0 and norm='frozen_bn' "
                             f"(trainable: {trainable[:2]}, batch norm: {batch_norms[:2]})")
        self._feature_cache, self._feature_cache_size = {}, max_images
        self.feature_cache_hits = self.feature_cache_misses = 0

    def backbone_features(self, batch: Tensor) -> Tensor:
        """The backbone's C5 (or C4) of the padded ``batch``, from the feature cache where it is enabled."""
        cache = getattr(self, "_feature_cache", None)
        if cache is None:
            return self.backbone(batch)
        keys = [hashlib.blake2b(str(tuple(image.shape)).encode() + image.detach().cpu().numpy().tobytes(),
                                digest_size=16).digest() for image in batch]
        missing = [i for i, key in enumerate(keys) if key not in cache]
        self.feature_cache_hits += len(keys) - len(missing)
        self.feature_cache_misses += len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                computed = self.backbone(batch[missing])
            fresh = dict(zip(missing, computed))
            for i in missing:
                if len(cache) < self._feature_cache_size:
                    cache[keys[i]] = fresh[i]
        return torch.stack([fresh[i] if i in fresh else cache[key] for i, key in enumerate(keys)])

    def predict(self, features: Tensor, image_sizes, padded_size) -> dict:
        """features [B, C, h, w] (the backbone's C5 of the padded batch of size ``padded_size``)
        -> {"pred_logits" [B, Q, K + 1], "pred_boxes" [B, Q, 4] normalised cxcywh, of the last
        decoder layer, and "aux_outputs": the same for the earlier layers if ``aux_loss``}."""
        hs = self.decode(features, image_sizes, padded_size)
        return self.layer_outputs(self.class_embed(hs), self.bbox_embed(hs).sigmoid())

    def decode(self, features: Tensor, image_sizes, padded_size) -> Tensor:
        """features [B, C, h, w] -> hs [L, B, Q, d]: every decoder layer's query outputs (after the shared
        final norm), before the heads. Box-domain pre-training puts its projector on them (docs/method.md §3.9)."""
        mask = padding_mask(image_sizes, padded_size, features.device)
        mask = F.interpolate(mask[None].float(), size=features.shape[-2:], mode="nearest")[0].bool()  # [B, h, w]
        pos = self.position_embedding(mask).to(features.dtype)                                         # [B, d, h, w]
        hs, _ = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)      # [L, B, Q, d]
        return hs

    def layer_outputs(self, logits: Tensor, boxes: Tensor) -> dict:
        """Per-layer head outputs, logits [L, B, Q, K + 1] and boxes [L, B, Q, 4], as ``criterion`` takes them."""
        outputs = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            outputs["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return outputs

    @staticmethod
    def normalise_targets(targets, image_sizes):
        """xyxy pixel boxes and labels 1..K -> {"classes": labels - 1, "boxes": cxcywh / image size}."""
        normalised = []
        for t, (h, w) in zip(targets, image_sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=t["boxes"].device)
            normalised.append({"classes": t["labels"] - 1,
                               "boxes": box_convert(t["boxes"].float(), "xyxy", "cxcywh") / scale})
        return normalised

    def postprocess(self, outputs: dict, image_sizes):
        """-> per image {"boxes" [D, 4] xyxy in resized-image pixels, "scores" [D], "labels" [D] in 1..K},
        the D = ``detections_per_img`` best queries by score, in descending order."""
        probs = outputs["pred_logits"].float().softmax(-1)[..., :-1]    # [B, Q, K]: "no object" dropped
        scores, classes = probs.max(-1)
        keep = scores.shape[1] if self.detections_per_img is None else min(self.detections_per_img, scores.shape[1])
        results = []
        for scores_i, classes_i, boxes_i, (h, w) in zip(scores, classes, outputs["pred_boxes"].float(), image_sizes):
            top = scores_i.topk(keep).indices                           # sorted, best first
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=boxes_i.device)
            boxes = clip_boxes_to_image(box_convert(boxes_i[top], "cxcywh", "xyxy") * scale, (h, w))
            results.append({"boxes": boxes, "scores": scores_i[top], "labels": classes_i[top] + 1})
        return results


def build_detr(num_classes: int, backbone: str = "resnet50", *, backbone_weights=None, norm: str = "frozen_bn",
               trainable_layers: int = 3, min_size=800, max_size: int = 1333, num_queries: int = 100,
               enc_layers: int = 6, dec_layers: int = 6, hidden_dim: int = 256, nheads: int = 8,
               dim_feedforward: int = 2048, dropout: float = 0.1, aux_loss: bool = True, dilation: bool = False,
               eos_coef: float = 0.1, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
               ce_loss_coef: float = 1.0, bbox_loss_coef: float = 5.0, giou_loss_coef: float = 2.0,
               detections_per_img: int = None, feature_stage: int = 4) -> DETR:
    """DETR on the last stage of any backbone of ``backbone.build_body``; defaults are the paper's DETR-R50
    (``dilation=True``: DETR-DC5).
    trainable_layers 3 trains layer2-layer4, as the paper's release does (at a 10x lower lr, which is
    the optimiser's business). Shrink hidden_dim, the layer counts, dim_feedforward, num_queries and
    the image sizes for small CPU runs; hidden_dim must be divisible by nheads and by 4.
    feature_stage 3 feeds the transformer C4 (stride 16) instead of C5: the stride of DC5 for a
    ResNet-18/34, which cannot dilate; layer4 is then unused and frozen."""
    if hidden_dim % 4:
        raise ValueError(f"hidden_dim must be divisible by 4 (sin/cos pairs for y and x), got {hidden_dim}")
    if feature_stage not in (3, 4):
        raise ValueError(f"feature_stage must be 3 (C4) or 4 (C5), got {feature_stage}")
    if feature_stage == 3 and dilation:
        raise ValueError("dilation dilates layer4, which feature_stage 3 does not use")
    body = build_body(backbone, backbone_weights, norm, trainable_layers, (feature_stage,), dilation)
    if feature_stage == 3:
        for module in body.stage(4):  # never run: no gradient, and no unused parameters under DDP
            module.requires_grad_(False)
    transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward, dropout)
    matcher = HungarianMatcher(cost_class, cost_bbox, cost_giou)
    criterion = SetCriterion(num_classes, matcher, eos_coef)
    weights = {"loss_ce": ce_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    return DETR(C5Backbone(body), DetectionTransform(min_size, max_size), transformer, num_classes, num_queries,
                criterion, weights, aux_loss, detections_per_img)


REFERENCE_BACKBONE = "backbone.0.body."  # the paper release nests the ResNet in backbone[0] (backbone[1]: position)


def detr_state_dict_from_reference(state_dict: dict, category_ids=None) -> dict:
    """Our DETR's state dict from one in the layout of the paper's release
    (``detr-r50-e632da11.pth``: ``{"model": {...}}`` or the inner dict).

    Our parameter names are the release's except for the backbone prefix:
    ``backbone.0.body.*`` -> ``backbone.body.*``. The release's batch norms are
    frozen (no ``num_batches_tracked``), so load it into ``norm="frozen_bn"``.

    category_ids: the release's class index for each of our labels 1..K, in
    order (for COCO with contiguous labels: ``[label_to_cat[l] for l in 1..80]``,
    since the release's index is the COCO category id). The class head keeps
    those rows and the last ("no object") row. None keeps every row as it is:
    release index i becomes our label i + 1.
    """
    if isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(REFERENCE_BACKBONE):
            key = "backbone.body." + key[len(REFERENCE_BACKBONE):]
        elif key.startswith("backbone."):
            raise ValueError(f"{key}: only the ResNet (backbone.0.body) and the sine position encoding, which "
                             "has no weights, are supported")
        converted[key] = value
    if category_ids is not None:
        rows = torch.as_tensor([int(c) for c in category_ids] + [converted["class_embed.weight"].shape[0] - 1])
        for key in ("class_embed.weight", "class_embed.bias"):
            converted[key] = converted[key][rows]
    return converted
