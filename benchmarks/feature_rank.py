"""Effective rank of a detector's head features: does box-domain pre-training collapse them?

A contrastive loss can train the layers below its projection head into a low-dimensional
subspace ("dimensional collapse", Jing et al., ICLR 2022). For each checkpoint this builds the
demo-preset detector as ``finetune.py --init`` would (output layers re-initialised), runs it on
the first val scenes, and prints the effective rank (Roy & Vetterli, 2007: exp of the entropy of
the normalised singular values of the centred [positions, channels] matrix) of the
classification and regression towers' outputs at P3 and P4 (RetinaNet, FCOS), or of the RoI box
head's output on the RPN's proposals and the RPN conv's output at P2 and P3 (Faster R-CNN). A random
layer is near full rank.

    python benchmarks/feature_rank.py --detector fcos \\
        outputs/abl/stage1_sup/checkpoint.pth outputs/abl/stage2_fcos/checkpoint.pth
"""
import argparse
import json
import os
import sys

import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.checkpoint import load_pretrained  # noqa: E402
from aligndet.models import build_detector  # noqa: E402
from aligndet.presets import finetune_defaults, model_options  # noqa: E402

TOWERS = ("classification_head", "regression_head")


def effective_rank(x):
    """exp(entropy of the singular-value distribution) of ``x`` [N, C] after centring: 1 to C."""
    s = torch.linalg.svdvals(x - x.mean(0))
    p = s / s.sum()
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def map_rank(x):
    """Effective rank of a feature map [B, C, H, W] over all its positions."""
    return effective_rank(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]))


@torch.no_grad()
def hooked_outputs(model, images, modules):
    """{name: [every output of ``modules[name]``, in call order]} of one eval-mode forward pass on ``images``
    (a list of CHW in [0, 1]); the hooks are removed after."""
    outputs = {name: [] for name in modules}
    hooks = [module.register_forward_hook(lambda m, i, o, name=name: outputs[name].append(o))
             for name, module in modules.items()]
    try:
        model.eval()(images)
    finally:
        for hook in hooks:
            hook.remove()
    return outputs


def tower_ranks(model, images, levels=(0, 1)):
    """{(tower, level): effective rank} of each tower's output on ``images``, and the towers' width."""
    outputs = hooked_outputs(model, images, {tower: getattr(model.head, tower).conv for tower in TOWERS})
    # one [B, C, H, W] map per FPN level, in level order
    ranks = {(tower, level): map_rank(maps[level]) for tower, maps in outputs.items() for level in levels}
    return ranks, outputs[TOWERS[0]][0].shape[1]


def two_stage_ranks(model, images, levels=(0, 1)):
    """Faster R-CNN: {("box_head", None): rank of the box head's output over every proposal of ``images``,
    ("rpn", level): rank of the RPN conv's output}, and the box head's width."""
    outputs = hooked_outputs(model, images, {"box_head": model.roi_heads.box_head, "rpn": model.rpn.head.conv})
    ranks = {("box_head", None): effective_rank(torch.cat(outputs["box_head"]))}
    ranks.update({("rpn", level): map_rank(outputs["rpn"][level]) for level in levels})  # one call per level
    return ranks, outputs["box_head"][0].shape[1]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="stage-1 or stage-2 checkpoints (any finetune.py --init source)")
    p.add_argument("--detector", choices=["faster_rcnn", "retinanet", "fcos"], default="fcos")
    p.add_argument("--demo-root", default="data/demo")
    p.add_argument("--images", type=int, default=32, help="first N val scenes")
    p.add_argument("--seed", type=int, default=0, help="initialisation of what the checkpoint does not hold")
    args = p.parse_args()
    annotations = os.path.join(args.demo_root, "annotations", "instances_val.json")
    if not os.path.isfile(annotations):
        sys.exit(f"feature_rank.py: no {annotations}; build the demo first (python -m aligndet.data.demo)")
    files = [im["file_name"] for im in json.load(open(annotations))["images"][:args.images]]
    images = [to_tensor(Image.open(os.path.join(args.demo_root, "val", f)).convert("RGB")) for f in files]
    defaults = finetune_defaults("demo", args.detector)
    options = {**model_options(args.detector, defaults), "backbone_weights": None}
    two_stage = args.detector == "faster_rcnn"
    columns = ["box head", "RPN P2", "RPN P3"] if two_stage else [f"{t.split('_')[0]} P{lv + 3}" for t in TOWERS
                                                                    for lv in (0, 1)]
    print(f"| checkpoint ({args.detector}, {len(images)} val scenes) | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for path in args.checkpoints:
        torch.manual_seed(args.seed)
        model = build_detector(args.detector, 10, backbone=defaults["backbone"], **options)
        load_pretrained(model, path, log=lambda *a: None, detector=args.detector)
        if two_stage:
            ranks, width = two_stage_ranks(model, images)
            cells = [f"{ranks[('box_head', None)]:.1f} / {width}"] + [
                f"{ranks[('rpn', lv)]:.1f} / {options['fpn_channels']}" for lv in (0, 1)]
        else:
            ranks, channels = tower_ranks(model, images)
            cells = [f"{ranks[(t, lv)]:.1f} / {channels}" for t in TOWERS for lv in (0, 1)]
        print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
