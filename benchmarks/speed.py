"""Speed of our Faster R-CNN against torchvision's, same weights, inputs and threads.

    python benchmarks/speed.py                       # both settings below
    python benchmarks/speed.py --setting demo --repeats 20
    python benchmarks/speed.py --device cuda --amp bf16

Settings: "demo" is finetune.py's demo preset (ResNet-18, 128-px images,
batch 8, read from finetune.PRESETS); "coco" is the standard ResNet-50-FPN
at 800 px (batch 2, images 800x1067). The two models are timed alternately in one process (ours, theirs,
ours, ...) so machine noise hits both alike; the median of the repeats is
reported with the ratio ours / theirs (below 1 means we are faster).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aligndet.convert import to_torchvision  # noqa: E402
from aligndet.models import build_detector  # noqa: E402
from finetune import PRESETS, model_options  # noqa: E402

DEMO = PRESETS["demo"]
SETTINGS = {
    "demo": dict(backbone=DEMO["backbone"], batch=DEMO["batch_size"], image_size=(128, 128), num_classes=10,
                 options=model_options(argparse.Namespace(**DEMO))),
    "coco": dict(backbone="resnet50", batch=2, image_size=(800, 1067), num_classes=80, options=dict()),
}


def make_inputs(batch, size, num_classes, seed=0):
    """Images with a few boxes of random colour: [3, H, W] in [0, 1] and targets."""
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
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                        "labels": torch.randint(1, num_classes + 1, (4,), generator=g)})
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


def bench(setting, repeats, warmup, device, amp):
    cfg = SETTINGS[setting]
    torch.manual_seed(0)
    ours = build_detector("faster_rcnn", cfg["num_classes"], backbone=cfg["backbone"], **cfg["options"])
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
        print(f"{setting:5s} {name:11s} batch {cfg['batch']} {cfg['image_size'][0]}x{cfg['image_size'][1]}: "
              f"ours {a * 1000:8.1f} ms   torchvision {b * 1000:8.1f} ms   ratio {a / b:.3f}", flush=True)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=["all", *SETTINGS], default="all")
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
    for setting in (SETTINGS if args.setting == "all" else [args.setting]):
        bench(setting, args.repeats, args.warmup, device, args.amp)


if __name__ == "__main__":
    main()
