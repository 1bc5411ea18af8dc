"""Speed of our detectors (Faster R-CNN, RetinaNet, FCOS) against torchvision's, same
weights, inputs and threads; and of a box-domain pre-training step against a
supervised fine-tuning step (those three and DETR).

    python benchmarks/speed.py                       # every detector, both settings below
    python benchmarks/speed.py --detector fcos --setting demo --repeats 20
    python benchmarks/speed.py --device cuda --amp bf16

Settings: "demo" is finetune.py's demo preset of each detector (ResNet-18,
128-px images, batch 8, read from aligndet/presets.py); "coco" is the standard
ResNet-50-FPN at 800 px (batch 2, images 800x1067). The two models are timed
alternately in one process (ours, theirs, ours, ...) so machine noise hits
both alike; the median of the repeats is reported with the ratio ours /
theirs (below 1 means we are faster). The one-stage detectors' classifier
biases are set so that every candidate passes the score threshold: inference
then times the full post-processing (top-k per level, NMS), the worst case.
The demo RetinaNet is timed against torchvision's with the standard head
(no GroupNorm), which torchvision can express.

Pre-training vs fine-tuning (--what pretrain): the same images; the
fine-tuning step trains the detector on their boxes, the pre-training step
runs AlignDet on two views (the image and its mirror) with the boxes plus
random proposals (train_box.py's max proposals for demo; 300 for coco, 50
for RetinaNet and DETR), frozen backbone, momentum detector, embedding MLP and EMA
update included. DETR's proposals get random pseudo-classes among PSEUDO_CLASSES
(what the cluster command gives them), and its online detector has that many classes.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aligndet.convert import to_torchvision  # noqa: E402
from aligndet.engine import weighted_loss  # noqa: E402
from aligndet.models import DETECTORS, TORCHVISION_DETECTORS, build_detector  # noqa: E402
from aligndet.presets import box_defaults, model_defaults, model_options  # noqa: E402
from aligndet.pretrain.box import AlignDet  # noqa: E402
from aligndet.pretrain.hooks import BOX_DOMAIN_DETECTORS, hook_for  # noqa: E402

SIZES = {"demo": dict(batch=8, image_size=(128, 128), num_classes=10),
         "coco": dict(batch=2, image_size=(800, 1067), num_classes=80)}
PSEUDO_CLASSES = {"demo": 32, "coco": 256}  # DETR's clusters: the pipeline's k, and the paper's


def setting_for(detector, setting):
    """Backbone, build options, proposals per image and contrastive samples for one detector and setting."""
    # The architecture finetune.py and train_box.py build for this preset, train_box.py's sampling.
    architecture, box = model_defaults(detector, setting), box_defaults(setting, detector)
    options = dict(model_options(detector, architecture), backbone_weights=None)  # random weights: no download
    return dict(SIZES[setting], backbone=architecture["backbone"], options=options,
                max_proposals=box["max_proposals"], num_samples=box["num_samples"])


def convertible(options):
    """torchvision's RetinaNet has no GroupNorm head with P6 from P5: the demo preset's
    RetinaNet is compared to torchvision's with the standard head (same size otherwise)."""
    return {**options, "head_norm": "none"} if options.get("head_norm") == "gn" else options


def confident(model):
    """One-stage detectors start with a 0.01 prior, below every score threshold; lift the
    classifier bias so all candidates pass it and post-processing is timed in full."""
    head = getattr(getattr(model, "head", None), "classification_head", None)
    if head is not None:
        torch.nn.init.constant_(head.cls_logits.bias, -2.0)
    return model


def make_inputs(batch, size, num_classes, seed=0):
    """Images with a few boxes of random colour: [3, H, W] in [0, 1] and targets (with masks)."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    images, targets = [], []
    for _ in range(batch):
        image = torch.rand(3, h, w, generator=g) * 0.5
        boxes = []
        for _ in range(4):
            bw, bh = int(w * (0.1 + 0.3 * torch.rand(1, generator=g))), int(h * (0.1 + 0.3 * torch.rand(1, generator=g)))
            x, y = int((w - bw) * torch.rand(1, generator=g)), int((h - bh) * torch.rand(1, generator=g))
            image[:, y:y + bh, x:x + bw] = torch.rand(3, 1, 1, generator=g)
            boxes.append([x, y, x + bw, y + bh])
        images.append(image)
        masks = torch.zeros(len(boxes), h, w, dtype=torch.uint8)  # each box's rectangle (for mask_rcnn)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes):
            mask[y1:y2, x1:x2] = 1
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.randint(1, num_classes + 1, (4,), generator=g), "masks": masks})
    return images, targets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_pair(fns, repeats, warmup, device):
    """Alternate the callables; return each one's list of times (seconds)."""
    times = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[i].append(time.perf_counter() - t0)
    return times


def bench(detector, setting, repeats, warmup, device, amp):
    cfg = setting_for(detector, setting)
    torch.manual_seed(0)
    ours = confident(build_detector(detector, cfg["num_classes"], backbone=cfg["backbone"],
                                    **convertible(cfg["options"])))
    theirs = to_torchvision(ours)
    ours.to(device)
    theirs.to(device)
    images, targets = make_inputs(cfg["batch"], cfg["image_size"], cfg["num_classes"])
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    def infer(model):
        def run():
            with torch.no_grad(), autocast():
                model(images)
        return run

    def train_step(model):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

        def run():
            with autocast():
                loss = sum(model(images, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        return run

    results = {}
    ours.eval(), theirs.eval()
    results["inference"] = time_pair([infer(ours), infer(theirs)], repeats, warmup, device)
    ours.train(), theirs.train()
    results["train step"] = time_pair([train_step(ours), train_step(theirs)], repeats, warmup, device)
    for name, (t_ours, t_theirs) in results.items():
        a, b = statistics.median(t_ours), statistics.median(t_theirs)
        print(f"{detector:11s} {setting:5s} {name:11s} batch {cfg['batch']} {cfg['image_size'][0]}x{cfg['image_size'][1]}: "
              f"ours {a * 1000:8.1f} ms   torchvision {b * 1000:8.1f} ms   ratio {a / b:.3f}", flush=True)
    return results


def make_views(images, targets, num_proposals, seed=0, num_classes=0):
    """Two views of each image for box-domain pre-training: the image with its boxes
    plus random proposals (ids 0..N-1, offset per image), and its mirror image; with
    ``num_classes``, each proposal also gets a random pseudo-class (DETR)."""
    g = torch.Generator().manual_seed(seed)
    views1, views2, offset = [], [], 0
    for image, target in zip(images, targets):
        h, w = image.shape[-2:]
        extra = num_proposals - len(target["boxes"])
        xy = torch.rand(extra, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (0.1 + 0.2 * torch.rand(extra, 2, generator=g)) * torch.tensor([w, h])
        boxes = torch.cat([target["boxes"].cpu(), torch.cat([xy, xy + wh], 1)]).to(image.device)
        ids = torch.arange(offset, offset + len(boxes), device=image.device)
        mirrored = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], 1)
        views1.append({"image": image, "boxes": boxes, "ids": ids})
        views2.append({"image": image.flip(-1), "boxes": mirrored, "ids": ids})
        if num_classes:
            classes = torch.randint(num_classes, (len(boxes),), generator=g).to(image.device)
            views1[-1]["classes"] = views2[-1]["classes"] = classes
        offset += len(boxes)
    return views1, views2


def bench_pretrain(detector, setting, repeats, warmup, device, amp):
    """Box-domain pre-training step vs supervised fine-tuning step of the same detector, same batch."""
    cfg = setting_for(detector, setting)
    torch.manual_seed(0)
    supervised = build_detector(detector, cfg["num_classes"], backbone=cfg["backbone"], **cfg["options"])
    pseudo_classes = PSEUDO_CLASSES[setting] if detector == "detr" else 0
    online = build_detector(detector, pseudo_classes or 1, backbone=cfg["backbone"], **cfg["options"])
    num_proposals = cfg["max_proposals"] or 300  # as many as selective search keeps on a COCO image, roughly
    num_samples = cfg["num_samples"] or hook_for(online).num_samples
    pretrain = AlignDet(online, num_samples=num_samples)
    supervised.to(device).train()
    pretrain.to(device).train()
    images, targets = make_inputs(cfg["batch"], cfg["image_size"], cfg["num_classes"])
    images = [im.to(device) for im in images]
    targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    views1, views2 = make_views(images, targets, num_proposals, num_classes=pseudo_classes)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

    def step(model, loss_fn):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

        def run():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                out = loss_fn()
            loss = weighted_loss(out, model.weight_dict)[0]  # as the training loop sums the terms
            opt.zero_grad()
            loss.backward()
            opt.step()
            if hasattr(model, "after_step"):
                model.after_step(1)
        return run

    t_pre, t_sup = time_pair([step(pretrain, lambda: pretrain(views1, views2)),
                              step(supervised, lambda: supervised(images, targets))], repeats, warmup, device)
    a, b = statistics.median(t_pre), statistics.median(t_sup)
    print(f"{detector:11s} {setting:5s} pre-training step ({num_proposals} proposals/image, {num_samples} "
          f"samples) vs fine-tuning step, batch {cfg['batch']}: {a * 1000:8.1f} ms vs {b * 1000:8.1f} ms   "
          f"ratio {a / b:.3f}", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", choices=["all", *DETECTORS], default="all",
                   help="all: every detector (DETR has no torchvision twin, so --what pretrain only)")
    p.add_argument("--setting", choices=["all", *SIZES], default="all")
    p.add_argument("--what", choices=["all", "torchvision", "pretrain"], default="all",
                   help="ours vs torchvision, and/or the pre-training step vs the fine-tuning step")
    p.add_argument("--repeats", type=int, default=10, help="timed runs per model (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, amp {args.amp}")
    for detector in (DETECTORS if args.detector == "all" else [args.detector]):
        for setting in (SIZES if args.setting == "all" else [args.setting]):
            if args.what in ("all", "torchvision") and detector in TORCHVISION_DETECTORS:
                bench(detector, setting, args.repeats, args.warmup, device, args.amp)
            if args.what in ("all", "pretrain") and detector in BOX_DOMAIN_DETECTORS:  # mask_rcnn: faster_rcnn's
                bench_pretrain(detector, setting, args.repeats, args.warmup, device, args.amp)


if __name__ == "__main__":
    main()
