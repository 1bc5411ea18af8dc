"""Class-agnostic detections of a box-domain (stage-2) detector, scored by what stage 2 trained.

Stage 2 freezes the classifier layers at their initialisation (the embedding head takes their
place, docs/method.md §3.1, §3.4), so a stage-2 detector run as it is ranks its boxes by untrained
scores. What it has learned is where objects are, by the selective-search proposals: the RPN's
objectness and boxes (Faster R-CNN) and the regression branch, centerness included (FCOS). This
wrapper turns those into detections of one class, "object" (label 1):

    Faster R-CNN  the RPN's proposals after its NMS, in its testing mode (pre / post NMS top-n), scored by
                  their objectness probability; the best ``roi_heads.detections_per_img`` of them
    FCOS          every point's decoded box scored by sigmoid(centerness) alone, then FCOS's own
                  score threshold, top-k per level, NMS and ``detections_per_img``

RetinaNet trains only its regression in stage 2 and has no score to rank by; DETR's class head
does train there, on the pseudo-classes (§3.9), so it runs as it is. Both are the checkpoint
loader's business (``aligndet.checkpoint.load_detector``), not this module's.

    model = ObjectnessDetector(detector).eval()
    detections = model(images)  # [{"boxes" [D, 4] xyxy in the input images' pixels, "scores" [D], "labels" [D]}]
"""
import torch
from torch import nn

from aligndet.models import FCOS, FasterRCNN


class ObjectnessDetector(nn.Module):
    """Eval-only wrapper of a Faster R-CNN (or Mask R-CNN) or an FCOS: ``model(images)`` with images a list
    of float [3, H, W] tensors in [0, 1] gives one dict per image, as the detectors' own eval does."""

    CLASS_NAMES = ["object"]

    def __init__(self, detector: nn.Module):
        super().__init__()
        if not isinstance(detector, (FasterRCNN, FCOS)):
            raise TypeError(f"ObjectnessDetector takes a FasterRCNN or an FCOS, got {type(detector).__name__}")
        self.detector = detector

    def forward(self, images):
        if self.training:
            raise RuntimeError("ObjectnessDetector only predicts; call .eval() first")
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, image_sizes, _ = self.detector.transform(images)
        features = list(self.detector.backbone(batch).values())
        if isinstance(self.detector, FasterRCNN):
            detections = self.rpn_objects(batch.shape[-2:], features, image_sizes)
        else:
            detections = self.centerness_objects(batch.shape[-2:], features, image_sizes)
        return self.detector.transform.postprocess(detections, image_sizes, original_sizes)

    def rpn_objects(self, padded_size, features, image_sizes):
        """The RPN's post-NMS proposals with their objectness probabilities, best first (resized-image pixels)."""
        rpn = self.detector.rpn
        logits, deltas = rpn.head(features)                                   # [B, T], [B, T, 4]
        level_anchors = rpn.anchor_generator(padded_size, features)
        proposals = rpn.box_coder.decode(deltas, torch.cat(level_anchors))   # [B, T, 4] xyxy
        found = rpn.filter_proposals(proposals, logits, [a.shape[0] for a in level_anchors], image_sizes)
        n = self.detector.roi_heads.detections_per_img
        return [{"boxes": boxes[:n], "scores": scores[:n],
                 "labels": torch.ones(len(scores[:n]), dtype=torch.int64, device=scores.device)}
                for boxes, scores in found]

    def centerness_objects(self, padded_size, features, image_sizes):
        """FCOS's boxes ranked by sigmoid(centerness) [B, T, 1] instead of its class scores."""
        outputs = self.detector.head(features)
        anchors = self.detector.anchor_generator(padded_size, features)
        return self.detector.postprocess(outputs, anchors, image_sizes, scores=outputs["bbox_ctrness"].sigmoid())
