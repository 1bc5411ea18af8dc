"""Detector architecture presets, shared by ``train_box.py`` and ``finetune.py`` so
that box-domain weights transfer to fine-tuning one to one.

A preset names only what differs from the detector's ``build_*`` defaults
(which are the standard COCO settings); ``model_defaults`` fills in the rest
from the builder's signature, so the scripts' ``--help`` shows every value a
model will be built with. The schedules (epochs, lr, ...) are each script's own.
"""
import inspect

from aligndet.models import DETECTORS

# The build_detector options the scripts expose as flags (--fpn-channels, ...); each
# detector accepts those its build function names.
MODEL_OPTIONS = ("backbone_weights", "norm", "trainable_layers", "fpn_channels", "min_size", "max_size",
                 "anchor_sizes", "head_norm", "representation_size", "rpn_pre_nms_top_n_train",
                 "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                 "rpn_batch_size_per_image", "box_batch_size_per_image")

BACKBONES = {
    # Small and fast: the demo dataset on a laptop CPU, ResNet-18 at 128 px, trained from scratch.
    "demo": dict(backbone="resnet18", backbone_weights=None, norm="bn", trainable_layers=5, fpn_channels=32,
                 min_size=[128], max_size=128),
    # The standard COCO setting: torchvision's ImageNet ResNet-50, the builders' defaults otherwise.
    "coco": dict(backbone="resnet50", backbone_weights="imagenet"),
}
DETECTOR_PRESETS = {
    # The RoI-align backward pass dominates on a CPU, hence 64 sampled RoIs per image in the demo.
    ("faster_rcnn", "demo"): dict(representation_size=256, anchor_sizes=[16, 32, 64, 128, 256],
                                  rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                                  rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                                  rpn_batch_size_per_image=128, box_batch_size_per_image=64),
    # Anchors of half the COCO sizes on P3-P7 for 20-56 px digits in 128 px scenes. GroupNorm in the towers: without
    # it a small RetinaNet barely starts learning in 500 iterations (benchmarks/RESULTS.md); 64 FPN channels, as
    # GroupNorm(32) needs more than one value per group on the 1x1 P7 map of a 128 px image.
    ("retinanet", "demo"): dict(anchor_sizes=[16, 32, 64, 128, 256], head_norm="gn", fpn_channels=64),
    # 64 FPN channels for FCOS's GroupNorm too.
    ("fcos", "demo"): dict(fpn_channels=64),
}
PRESET_NAMES = tuple(BACKBONES)


def model_defaults(detector, preset):
    """``{"backbone": ..., option: value}`` for every name in ``MODEL_OPTIONS``: the
    preset's value, else the builder's default, else None (an option the detector lacks)."""
    accepted = inspect.signature(DETECTORS[detector]).parameters
    values = {"backbone": accepted["backbone"].default}
    values.update({key: accepted[key].default if key in accepted else None for key in MODEL_OPTIONS})
    values.update(BACKBONES[preset])
    values.update(DETECTOR_PRESETS.get((detector, preset), {}))
    return values


def model_options(detector, values):
    """The ``build_detector`` keyword options among ``values`` (a dict such as
    ``vars(args)``). An option set for a detector that does not have it is an
    error, not silently ignored."""
    accepted = inspect.signature(DETECTORS[detector]).parameters
    options = {}
    for key in MODEL_OPTIONS:
        value = values.get(key)
        if key not in accepted:
            if value is not None:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to {detector}")
            continue
        if value in ("none", "None", "") and key == "backbone_weights":
            value = None
        options[key] = tuple(value) if isinstance(value, list) else value
    return options
