"""The presets of ``finetune.py`` and ``train_box.py``: one architecture table for
both, so box-domain weights transfer to fine-tuning one to one, and each
stage's schedule. They become parser defaults (``aligndet.cli.PresetParser``),
so ``--help`` shows the value every flag takes for a ``--preset`` and
``--detector``; a flag given on the command line wins.

An architecture preset names only what differs from the detector's ``build_*``
defaults (the standard COCO settings); ``model_defaults`` fills in the rest
from the builder's signature.
"""
import inspect

from aligndet.data.views import COCO_VIEW, DEMO_VIEW
from aligndet.models import DETECTORS

# The build_detector options the scripts expose as flags (--fpn-channels, ...); each
# detector accepts those its build function names.
MODEL_OPTIONS = ("backbone_weights", "norm", "trainable_layers", "fpn_channels", "min_size", "max_size",
                 "anchor_sizes", "head_norm", "representation_size", "rpn_pre_nms_top_n_train",
                 "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test",
                 "rpn_batch_size_per_image", "box_batch_size_per_image",
                 "num_queries", "enc_layers", "dec_layers", "hidden_dim", "nheads", "dim_feedforward", "dropout",
                 "dilation", "eos_coef", "feature_stage", "mask_layers", "mask_hidden")

BACKBONES = {
    # Small and fast: the demo dataset on a laptop CPU, ResNet-18 at 128 px, trained from scratch.
    "demo": dict(backbone="resnet18", backbone_weights=None, norm="bn", trainable_layers=5, fpn_channels=32,
                 min_size=[128], max_size=128),
    # The standard COCO setting: torchvision's ImageNet ResNet-50, the builders' defaults otherwise.
    "coco": dict(backbone="resnet50", backbone_weights="imagenet"),
    # Pascal VOC (fine-tuning only: the paper pre-trains on COCO and transfers): COCO's model, trained at a short
    # side drawn from 480, 512, ..., 800 and tested at 800, the official VOC pipeline.
    "voc": dict(backbone="resnet50", backbone_weights="imagenet", min_size=list(range(480, 801, 32)), max_size=1333),
}
# The RoI-align backward pass dominates on a CPU, hence 64 sampled RoIs per image in the demo.
FASTER_RCNN_DEMO = dict(representation_size=256, anchor_sizes=[16, 32, 64, 128, 256], rpn_pre_nms_top_n_train=600,
                        rpn_post_nms_top_n_train=300, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                        rpn_batch_size_per_image=128, box_batch_size_per_image=64)
DETECTOR_PRESETS = {
    ("faster_rcnn", "demo"): FASTER_RCNN_DEMO,
    # Faster R-CNN's demo preset, whose box-domain checkpoint it fine-tunes from, and a mask head as wide as the FPN.
    ("mask_rcnn", "demo"): dict(FASTER_RCNN_DEMO, mask_layers=[32, 32, 32, 32], mask_hidden=32),
    # Anchors of half the COCO sizes on P3-P7 for 20-56 px digits in 128 px scenes. GroupNorm in the towers: without
    # it a small RetinaNet barely starts learning in 500 iterations (benchmarks/RESULTS.md); 64 FPN channels, as
    # GroupNorm(32) needs more than one value per group on the 1x1 P7 map of a 128 px image.
    ("retinanet", "demo"): dict(anchor_sizes=[16, 32, 64, 128, 256], head_norm="gn", fpn_channels=64),
    # 64 FPN channels for FCOS's GroupNorm too.
    ("fcos", "demo"): dict(fpn_channels=64),
    # A small DETR for 128 px scenes (benchmarks/RESULTS.md, "DETR"): 2 + 2 layers of width 128, 10 queries (a scene
    # holds at most 6 digits), no dropout, on the C4 map (8x8 tokens) of a frozen stage-1 ResNet-18, whose features
    # finetune.py caches: DETR needs many steps, and with the backbone trained it did not learn in 2,000.
    ("detr", "demo"): dict(num_queries=10, enc_layers=2, dec_layers=2, hidden_dim=128, nheads=4, dim_feedforward=512,
                           dropout=0.0, feature_stage=3, norm="frozen_bn", trainable_layers=0),
}
PRESET_NAMES = tuple(BACKBONES)  # finetune.py's; train_box.py has BOX_PRESET_NAMES

# Fine-tuning (finetune.py).
FINETUNE = {
    # The demo dataset on 2 CPU cores in a few minutes.
    "demo": dict(epochs=4, batch_size=8, lr=0.04, weight_decay=1e-4, warmup_iters=100, lr_steps=[3], eval_every=2,
                 box_init_skip=[]),
    # The standard COCO 1x recipe (12 epochs, steps at 8 and 11).
    "coco": dict(epochs=12, batch_size=2, lr=0.02, weight_decay=1e-4, warmup_iters=500, lr_steps=[8, 11],
                 eval_every=1, box_init_skip=[]),
    # The official VOC recipe: 12k iterations of 16 images, lr steps at 9k and 11k (scaled to the real batch).
    "voc": dict(epochs=None, iterations=12000, lr_step_iterations=[9000, 11000], batch_size=2, lr=0.02,
                weight_decay=1e-4, warmup_iters=500, lr_steps=[], eval_every=4, box_init_skip=[]),
}
# The one-stage detectors' lr is half Faster R-CNN's, as in torchvision's and the paper's recipes. On the demo their
# classification tower is not taken from a box-domain checkpoint: stage 2 collapses it there (docs/method.md §7).
ONE_STAGE_DEMO_SKIP = ["head.classification_head."]
# DETR trains with AdamW, the backbone at 0.1 x the lr and gradients clipped at 0.1; on COCO the official AlignDet
# fine-tuning: 1e-4 per 16 images, 150 epochs with a step at 100 (50- and 100-epoch variants: --epochs, --lr-steps).
DETR_OPTIMISER = dict(optimizer="adamw", weight_decay=1e-4, backbone_lr_mult=0.1, clip_grad_norm=0.1)
FINETUNE_PER_DETECTOR = {("retinanet", "demo"): dict(lr=0.02, box_init_skip=ONE_STAGE_DEMO_SKIP),
                         ("retinanet", "coco"): dict(lr=0.01),
                         ("fcos", "demo"): dict(lr=0.02, box_init_skip=ONE_STAGE_DEMO_SKIP),
                         ("fcos", "coco"): dict(lr=0.01),
                         ("detr", "demo"): dict(**DETR_OPTIMISER, lr=5e-4, warmup_iters=200, epochs=40, lr_steps=[35],
                                                eval_every=10, cache_backbone_features=True),
                         ("detr", "coco"): dict(**DETR_OPTIMISER, lr=1e-4, warmup_iters=0, epochs=150,
                                                lr_steps=[100]),
                         # The official VOC settings: lr 0.01 for the one-stage detectors, FCOS's gradients clipped
                         # at 35; DETR by epochs (100, step at 70) and without clipping.
                         ("retinanet", "voc"): dict(lr=0.01),
                         ("fcos", "voc"): dict(lr=0.01, clip_grad_norm=35.0),
                         ("detr", "voc"): dict(**dict(DETR_OPTIMISER, clip_grad_norm=0.0), lr=1e-4, warmup_iters=0,
                                               epochs=100, lr_steps=[70], iterations=0, lr_step_iterations=[])}

# Box-domain pre-training (train_box.py).
BOX = {
    # The demo on 2 CPU cores in about 9 minutes. 8 epochs at lr 0.04 gave +2.7 AP at 10 % labels where
    # 4 epochs at 0.02 gave +1.3 (benchmarks/RESULTS.md): the contrastive task is still learning at the end.
    "demo": dict(epochs=8, batch_size=8, lr=0.04, weight_decay=1e-4, warmup_iters=100, lr_steps=[6],
                 num_samples=64, max_proposals=32, views="demo"),
    # The official recipe (16 images per step on 8 GPUs).
    "coco": dict(epochs=12, batch_size=2, lr=0.02, weight_decay=1e-4, warmup_iters=500, lr_steps=[8, 11],
                 num_samples=0, max_proposals=0, views="coco"),
}
# The paper pre-trains RetinaNet and FCOS at lr 0.01 and keeps 50 proposals per image for RetinaNet;
# num_samples counts predictions per image for Faster R-CNN (positive RoIs) and RetinaNet (anchors) but per
# batch for FCOS (points), as in the official settings (0: the official number, aligndet/pretrain/hooks.py).
BOX_PER_DETECTOR = {
    ("retinanet", "demo"): dict(lr=0.02, num_samples=128),
    ("retinanet", "coco"): dict(lr=0.01, max_proposals=50),
    ("fcos", "demo"): dict(lr=0.02, num_samples=2048),  # the official number: 512 gave -0.8 AP, 2048 -0.4
    ("fcos", "coco"): dict(lr=0.01),
    # DETR (docs/method.md §3.9): fine-tuning's AdamW and clipping (the backbone is frozen here, so its lr multiple
    # does not matter), every query kept (num_samples 0), the first proposals in cache order, fewer than the queries.
    # coco: the official stage 2, 2e-4 per 64 images = 5e-5 per 16, 50 epochs with a step at 40, the first 50
    # proposals. demo: not tuned yet (one run in benchmarks/RESULTS.md): the demo's 8 epochs / step 6 at 1e-4 per 16
    # images, 8 proposals for 10 queries.
    ("detr", "demo"): dict(**DETR_OPTIMISER, lr=1e-4, warmup_iters=0, num_samples=0, max_proposals=8, select="first"),
    ("detr", "coco"): dict(**DETR_OPTIMISER, lr=5e-5, warmup_iters=0, epochs=50, lr_steps=[40], num_samples=0,
                           max_proposals=50, select="first"),
}
BOX_PRESET_NAMES = tuple(BOX)
BOX_VIEWS = {"demo": DEMO_VIEW, "coco": COCO_VIEW}


def finetune_defaults(preset, detector):
    """Every default of ``finetune.py --preset preset --detector detector``: architecture, then schedule."""
    return {**model_defaults(detector, preset), **FINETUNE[preset], **FINETUNE_PER_DETECTOR.get((detector, preset), {})}


def box_defaults(preset, detector):
    """Every default of ``train_box.py --preset preset --detector detector`` (its architecture is
    ``model_defaults``, built as finetune.py builds it)."""
    return {"backbone": model_defaults(detector, preset)["backbone"], **BOX[preset],
            **BOX_PER_DETECTOR.get((detector, preset), {})}


def model_defaults(detector, preset):
    """``{"backbone": ..., option: value}`` for every name in ``MODEL_OPTIONS``: the
    preset's value, else the builder's default, else None (an option the detector lacks)."""
    accepted = inspect.signature(DETECTORS[detector]).parameters
    values = {"backbone": accepted["backbone"].default}
    for key in MODEL_OPTIONS:
        default = accepted[key].default if key in accepted else None
        values[key] = list(default) if isinstance(default, tuple) else default  # as a nargs="+" flag gives it
    # The backbone table names options of the FPN detectors too (fpn_channels); a detector without them keeps None.
    values.update({k: v for k, v in BACKBONES[preset].items() if k == "backbone" or k in accepted})
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
        if key == "backbone_weights" and value in ("none", "None", ""):
            value = None
        options[key] = tuple(value) if isinstance(value, list) else value
    return options
