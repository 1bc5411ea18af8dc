"""Faster R-CNN with FPN (Ren et al. 2015; Lin et al. 2017), following
torchvision's detection API:

    model.train(); losses = model(images, targets)   # dict of scalar losses
    model.eval();  detections = model(images)        # [{"boxes", "scores", "labels"}]

images: list of float [3, H, W] tensors in [0, 1]; targets: list of
{"boxes": [N, 4] xyxy pixels, "labels": [N] int64 in 1..num_classes}.
Detections are in the input images' pixel coordinates.
"""
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

from .anchors import AnchorGenerator
from .backbone import BackboneWithFPN, build_backbone
from .roi_heads import BoxPredictor, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead
from .transform import DetectionTransform, check_targets


class FasterRCNN(nn.Module):
    """transform -> backbone (+FPN) -> RPN -> RoI heads -> detections.

    num_classes counts object classes only; label 0 is background.
    """

    # Final layers that fine-tuning re-initialises after pre-training (docs/method.md §3.8).
    OUTPUT_LAYERS = ("roi_heads.box_predictor.",)
    # How a training loop combines the loss terms forward() returns.
    weight_dict = {"loss_objectness": 1.0, "loss_rpn_box_reg": 1.0, "loss_classifier": 1.0, "loss_box_reg": 1.0}

    def __init__(self, backbone: BackboneWithFPN, transform: DetectionTransform, rpn: RegionProposalNetwork,
                 roi_heads: RoIHeads, num_classes: int):
        super().__init__()
        self.transform = transform
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.num_classes = num_classes

    def forward(self, images, targets=None):
        if self.training:
            check_targets(targets, self.num_classes)
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        batch, image_sizes, targets = self.transform(images, targets)
        features = self.backbone(batch)
        proposals, rpn_losses = self.rpn(image_sizes, batch.shape[-2:], list(features.values()), targets)
        detections, roi_losses = self.roi_heads(features, proposals, image_sizes, targets)
        if self.training:
            return {**rpn_losses, **roi_losses}
        return self.transform.postprocess(detections, image_sizes, original_sizes)


def build_faster_rcnn(num_classes: int, backbone: str = "resnet50", *, backbone_weights=None,
                      norm: str = "frozen_bn", trainable_layers: int = 3, fpn_channels: int = 256,
                      min_size=800, max_size: int = 1333, anchor_sizes=(32, 64, 128, 256, 512),
                      aspect_ratios=(0.5, 1.0, 2.0), rpn_pre_nms_top_n_train: int = 2000,
                      rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_train: int = 2000,
                      rpn_post_nms_top_n_test: int = 1000, rpn_nms_thresh: float = 0.7,
                      rpn_batch_size_per_image: int = 256, box_batch_size_per_image: int = 512,
                      representation_size: int = 1024, box_score_thresh: float = 0.05,
                      box_nms_thresh: float = 0.5, box_detections_per_img: int = 100, rpn_score_thresh: float = 0.0,
                      returned_blocks=None) -> FasterRCNN:
    """Faster R-CNN with a ResNet-FPN backbone. Defaults are the standard
    COCO settings (torchvision's fasterrcnn_resnet50_fpn); shrink fpn_channels,
    representation_size, sampling sizes, anchor sizes and image sizes for
    small CPU runs. anchor_sizes holds one size per pyramid level (P2-P6), or a tuple of sizes per level.
    returned_blocks: the ``features`` blocks the FPN reads, for a Swin / ConvNeXt / MobileNet trunk instead of
    its four stages (torchvision's fasterrcnn_mobilenet_v3_large_fpn: (13, 16), rpn_score_thresh 0.05 and
    anchor sizes (32, 64, 128, 256, 512) on each of its three levels)."""
    body = build_backbone(backbone, backbone_weights, norm, trainable_layers, (1, 2, 3, 4), fpn_channels, "maxpool",
                          returned_blocks)
    sizes = tuple(tuple(s) if isinstance(s, (tuple, list)) else (s,) for s in anchor_sizes)
    anchors = AnchorGenerator(sizes, (tuple(aspect_ratios),) * len(sizes))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        batch_size_per_image=rpn_batch_size_per_image,
        pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
        nms_thresh=rpn_nms_thresh, score_thresh=rpn_score_thresh)
    pool = MultiScaleRoIAlign(["0", "1", "2", "3"], output_size=7, sampling_ratio=2)
    roi_heads = RoIHeads(pool, TwoMLPHead(fpn_channels * 7 * 7, representation_size),
                         BoxPredictor(representation_size, num_classes),
                         batch_size_per_image=box_batch_size_per_image, score_thresh=box_score_thresh,
                         nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img)
    transform = DetectionTransform(min_size, max_size)
    return FasterRCNN(body, transform, rpn, roi_heads, num_classes)
