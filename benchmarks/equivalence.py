"""How closely our detectors agree with torchvision's, with the same weights.

    python benchmarks/equivalence.py                   # every detector, demo and coco sizes
    python benchmarks/equivalence.py --detector fcos --setting demo

For each detector and setting (the sizes of benchmarks/speed.py): build ours
with random weights (the one-stage classifiers' bias lifted so that every
candidate passes the score threshold; the demo RetinaNet with the standard
head, as in benchmarks/speed.py), convert it with
``aligndet.convert.to_torchvision``, and compare on the same random images:

- detections in eval mode: count per image, max |difference| of boxes (pixels),
  scores and (Mask R-CNN) pasted mask probabilities over the matched lists, labels equal;
- training losses on images that need no resizing (same seed, so Faster
  R-CNN samples the same anchors and RoIs): max relative difference per term.

The test suite asserts 1e-4 on small models; this reports the figures at full
size as well.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aligndet.convert import to_torchvision  # noqa: E402
from aligndet.models import TORCHVISION_DETECTORS, build_detector  # noqa: E402
from speed import SIZES, confident, convertible, make_inputs, setting_for  # noqa: E402

# torchvision's names for our loss terms.
TV_LOSSES = {"loss_objectness": "loss_objectness", "loss_rpn_box_reg": "loss_rpn_box_reg",
             "loss_classifier": ("loss_classifier", "classification"),
             "loss_box_reg": ("loss_box_reg", "bbox_regression"), "loss_centerness": "bbox_ctrness",
             "loss_mask": "loss_mask"}


def _their_name(name, theirs):
    names = TV_LOSSES[name]
    return next(n for n in ((names,) if isinstance(names, str) else names) if n in theirs)


def compare(detector, setting):
    cfg = setting_for(detector, setting)
    torch.manual_seed(0)
    ours = confident(build_detector(detector, cfg["num_classes"], backbone=cfg["backbone"],
                                    **convertible(cfg["options"])))
    theirs = to_torchvision(ours)
    images, targets = make_inputs(cfg["batch"], cfg["image_size"], cfg["num_classes"])
    ours.eval(), theirs.eval()
    with torch.no_grad():
        a, b = ours(images), theirs(images)
    counts = [(len(x["boxes"]), len(y["boxes"])) for x, y in zip(a, b)]
    same = [x for x in zip(a, b) if len(x[0]["boxes"]) == len(x[1]["boxes"])]
    box_diff = max((float((x["boxes"] - y["boxes"]).abs().max()) for x, y in same if len(x["boxes"])), default=0.0)
    score_diff = max((float((x["scores"] - y["scores"]).abs().max()) for x, y in same if len(x["boxes"])), default=0.0)
    labels_equal = all(torch.equal(x["labels"], y["labels"]) for x, y in same)
    masks = ""
    if "masks" in a[0]:  # mask probabilities pasted into the image, per pixel
        mask_diff = max((float((x["masks"] - y["masks"]).abs().max()) for x, y in same if len(x["boxes"])), default=0)
        masks = f", max |d mask| {mask_diff:.2e}"
    print(f"{detector:11s} {setting:5s} eval: detections per image ours/theirs "
          f"{', '.join(f'{p}/{q}' for p, q in counts[:4])}{' ...' if len(counts) > 4 else ''}; "
          f"max |d box| {box_diff:.2e} px, max |d score| {score_diff:.2e}{masks}, labels equal {labels_equal}",
          flush=True)

    # Training losses at the resized size, so that neither model resizes.
    scale = min(ours.transform.min_size[-1] / min(cfg["image_size"]), ours.transform.max_size / max(cfg["image_size"]))
    size = [round(s * scale) for s in cfg["image_size"]]
    images, targets = make_inputs(cfg["batch"], size, cfg["num_classes"], seed=1)
    ours.train(), theirs.train()
    torch.manual_seed(1)
    with torch.no_grad():
        mine = ours(images, targets)
    torch.manual_seed(1)
    with torch.no_grad():
        tv = theirs(images, targets)
    diffs = {k: abs(float(v) - float(tv[_their_name(k, tv)])) / max(abs(float(v)), 1e-12) for k, v in mine.items()}
    print(f"{detector:11s} {setting:5s} train: max relative loss difference {max(diffs.values()):.2e} "
          f"({', '.join(f'{k} {float(v):.4f}' for k, v in mine.items())})", flush=True)
    return box_diff, score_diff, labels_equal, max(diffs.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", choices=["all", *TORCHVISION_DETECTORS], default="all")
    p.add_argument("--setting", choices=["all", *SIZES], default="all")
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for detector in (TORCHVISION_DETECTORS if args.detector == "all" else [args.detector]):
        for setting in (SIZES if args.setting == "all" else [args.setting]):
            compare(detector, setting)


if __name__ == "__main__":
    main()
