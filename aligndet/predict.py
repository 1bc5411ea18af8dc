"""Run a fine-tuned or box-domain detector on images: COCO results json, pictures, COCO AP if there is ground truth.

    # a folder (recursive) or one file; results with the training data's category ids
    python -m aligndet.predict --checkpoint outputs/demo/ft_b/checkpoint.pth --images my_images/ \\
        --out detections.json --draw pictures/

    # the images of a COCO json: also prints box (and mask) AP against its annotations
    python -m aligndet.predict --checkpoint outputs/demo/ft_b/checkpoint.pth \\
        --images data/demo/val --json data/demo/annotations/instances_val.json --out val_detections.json

A ``finetune.py`` checkpoint: the detector is rebuilt from its own arguments
and weights, and its class names and category ids come with it (a checkpoint
without them gets numbered labels).

A box-domain checkpoint (``train_box.py``) gives what stage 2 trained. Stage 2
leaves the classifiers at their initialisation (the embedding head replaces
them), so its detector knows where objects are, not which: Faster R-CNN gives its
RPN's proposals after NMS scored by objectness, FCOS its boxes scored by
centerness alone, at most 100 per image, as one class "object" (category id 1).
DETR's class head trains on the proposals' k-means pseudo-classes, so it runs as
it is: label l is named "cluster l-1" (the id in the cache's clusters/ folder)
and keeps l as its category id. RetinaNet trains only its box regression there
and is refused: fine-tune it first. A stage-1 checkpoint holds no detector.

    python -m aligndet.predict --checkpoint outputs/box/checkpoint.pth --images data/demo/val --draw objects/ \\
        --draw-top 10 --json data/demo/annotations/instances_val.json   # + class-agnostic AP

``--torchvision BUILDER`` runs one of torchvision's detectors instead, converted
to ours (``aligndet.convert``), from its state dict file or its default COCO weights:

    python -m aligndet.predict --torchvision fasterrcnn_resnet50_fpn --checkpoint default --images my_images/

Unreadable images are named and skipped. Pictures draw the boxes with score >=
``--draw-threshold`` (the best ``--draw-top`` of them), with class names and
scores (and Mask R-CNN's masks).
"""
import argparse
import json
import os
import sys

import torch
from tqdm import tqdm

from aligndet.atomic import atomic_write
from aligndet.checkpoint import CheckpointError, load_detector
from aligndet.data.images import ImageReadError, ImageRecord, list_images, read_rgb
from aligndet.evaluation import evaluate_detections, to_coco_results
from aligndet.visualize import draw_labelled
from aligndet.objectness import ObjectnessDetector


def input_records(images, json_file=None):
    """``ImageRecord`` list of a file, a folder (recursive) or a COCO json's images under ``images``."""
    if os.path.isfile(images) and not json_file:
        return [ImageRecord(os.path.basename(images), images, 1)]
    return list_images(images, json_file)


def load_torchvision_detector(name, path, num_classes=91):
    """(our detector, class names, label -> category id) from torchvision's detector ``name`` with the
    weights in ``path`` (a torchvision state dict, e.g. its release file), or its default COCO weights when
    ``path`` is "default" (a download). torchvision's labels are COCO's category ids; label 0 is background."""
    import torchvision

    from aligndet.convert import from_torchvision
    from aligndet.models.weights import read_checkpoint

    builder = getattr(torchvision.models.detection, name, None)
    if not callable(builder) or not name.islower():
        raise ValueError(f"--torchvision must name a builder of torchvision.models.detection, got {name!r}")
    weights = torchvision.models.get_model_weights(builder).DEFAULT
    if path == "default":
        try:
            tv_model = builder(weights=weights)
        except (OSError, RuntimeError) as e:  # offline, or a broken download
            raise CheckpointError(f"could not fetch torchvision's {name} weights ({e}); download {weights.url} "
                                  "and pass that file as --checkpoint") from None
        num_classes = len(weights.meta["categories"])
    else:
        state = read_checkpoint(path)
        tv_model = builder(weights=None, weights_backbone=None, num_classes=num_classes)
        try:
            tv_model.load_state_dict(state.get("model", state))
        except RuntimeError as e:
            raise CheckpointError(f"{path} is not a {name} state dict with {num_classes} classes: {e}") from None
    categories = weights.meta["categories"] if num_classes == len(weights.meta["categories"]) else []
    names = list(categories[1:]) or [str(i) for i in range(1, num_classes)]
    return from_torchvision(tv_model).eval(), names, {i: i for i in range(1, num_classes)}


def predict(model, records, device="cpu", batch_size=4, score_threshold=0.05, progress=True):
    """Detections (score >= ``score_threshold``) of every readable image: ``({image_id: output dict on the
    CPU}, [(key, error) of each unreadable image])``."""
    model.to(device).eval()
    outputs, failed = {}, []
    bar = tqdm(total=len(records), desc="predict", unit="img", disable=not progress)
    for start in range(0, len(records), batch_size):
        batch, ids = [], []
        for r in records[start:start + batch_size]:
            try:
                rgb = read_rgb(r.path)
            except ImageReadError as e:
                failed.append((r.key, str(e)))
                continue
            batch.append(torch.from_numpy(rgb).permute(2, 0, 1).float().div(255).to(device))
            ids.append(r.image_id)
        if batch:
            with torch.no_grad():
                found = model(batch)
            for image_id, out in zip(ids, found):
                keep = out["scores"] >= score_threshold
                outputs[image_id] = {k: v[keep].float().cpu() if k != "labels" else v[keep].cpu()
                                     for k, v in out.items()}
        bar.update(len(records[start:start + batch_size]))
    bar.close()
    return outputs, failed


def label_texts(output, class_names, threshold):
    """(boxes, "name score" texts, bool masks or None) of the detections at or above ``threshold``."""
    keep = output["scores"] >= threshold
    names = [class_names[int(label) - 1] if 0 < int(label) <= len(class_names) else str(int(label))
             for label in output["labels"][keep]]
    masks = output["masks"][keep][:, 0] > 0.5 if "masks" in output else None  # [N, H, W]
    return (output["boxes"][keep].numpy(), [f"{n} {float(s):.2f}" for n, s in zip(names, output["scores"][keep])],
            masks)


def get_args_parser():
    p = argparse.ArgumentParser("python -m aligndet.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a finetune.py checkpoint, or a train_box.py one (class-"
                   "agnostic 'object' detections by what stage 2 trained: Faster R-CNN's RPN objectness, FCOS's "
                   "centerness; DETR's pseudo-classes; RetinaNet refused); with --torchvision, that model's state "
                   "dict file, or 'default' for its COCO weights (downloaded)")
    p.add_argument("--torchvision", metavar="BUILDER", help="a torchvision detector instead, converted to ours "
                   "(e.g. fasterrcnn_resnet50_fpn, maskrcnn_resnet50_fpn, retinanet_resnet50_fpn, fcos_resnet50_fpn)")
    p.add_argument("--num-classes", type=int, default=91, help="with --torchvision and a file: its classes, "
                   "background included (91: COCO, named)")
    p.add_argument("--images", required=True, help="an image file, a folder (recursive), or the folder "
                   "--json's file_names are relative to")
    p.add_argument("--json", help="COCO json: predict its images and print COCO AP against its annotations")
    p.add_argument("--out", default="detections.json", help="COCO results json to write")
    p.add_argument("--draw", help="folder for one PNG per image with the detections drawn")
    p.add_argument("--score-threshold", type=float, default=0.05, help="detections kept in the json")
    p.add_argument("--draw-threshold", type=float, default=0.5, help="detections drawn in the pictures")
    p.add_argument("--draw-top", type=int, default=0, help="draw at most this many of each image's best detections "
                   "(0: all above --draw-threshold; e.g. 10 for a box-domain detector, whose objects are many)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when available)")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        model, class_names, label_to_cat = (
            load_torchvision_detector(args.torchvision, args.checkpoint, args.num_classes) if args.torchvision
            else load_detector(args.checkpoint))
        records = input_records(args.images, args.json)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    if not records:
        sys.exit(f"error: no images in {args.json or args.images}")
    label_to_cat = label_to_cat or {i: i for i in range(1, len(class_names) + 1)}
    outputs, failed = predict(model, records, device, args.batch_size, args.score_threshold)
    results = [r for image_id in sorted(outputs) for r in to_coco_results(image_id, outputs[image_id], label_to_cat)]
    atomic_write(args.out, lambda f: f.write(json.dumps(results).encode()))
    print(f"{len(outputs)} images, {len(results)} detections (score >= {args.score_threshold:g}) -> {args.out}; "
          f"{len(failed)} images could not be read" + (":" if failed else ""))
    for key, error in failed[:20]:
        print(f"  {key}: {error}")
    if args.draw:
        os.makedirs(args.draw, exist_ok=True)
        for r in records:
            if r.image_id in outputs:
                rgb = read_rgb(r.path)
                found = outputs[r.image_id]
                if args.draw_top:
                    best = found["scores"].argsort(descending=True)[:args.draw_top]
                    found = {k: v[best] for k, v in found.items()}
                boxes, texts, masks = label_texts(found, class_names, args.draw_threshold)
                picture = draw_labelled(rgb, boxes, texts, scale=max(1.0, 384 / max(rgb.shape[:2])), masks=masks)
                picture.save(os.path.join(args.draw, r.key.replace("/", "__").rsplit(".", 1)[0] + ".png"))
        print(f"pictures in {args.draw}")
    if args.json:
        from pycocotools.coco import COCO
        with open(os.devnull, "w") as quiet:  # pycocotools prints while loading
            stdout, sys.stdout = sys.stdout, quiet
            try:
                coco = COCO(args.json)
            finally:
                sys.stdout = stdout
        agnostic = class_names == ObjectnessDetector.CLASS_NAMES  # box-domain: any ground-truth box is an object
        stats = evaluate_detections(coco, outputs, label_to_cat, image_ids=[r.image_id for r in records],
                                    verbose=False, use_categories=not agnostic)
        shown = ("AP", "AP50", "AP75", "mask_AP", "mask_AP50")
        print(("class-agnostic COCO " if agnostic else "COCO ")
              + ", ".join(f"{k} {v:.4f}" for k, v in stats.items() if k in shown))
    return outputs


if __name__ == "__main__":
    main()
