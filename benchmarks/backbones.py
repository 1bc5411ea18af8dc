"""Faster R-CNN on each backbone family at the demo size: parameters and the time of a training step and of
an inference batch, every backbone in one process, timed in turns (A, B, C, A, B, C, ...) so that machine
noise hits them alike; the median of the repeats is reported.

    python benchmarks/backbones.py                          # every backbone, demo preset, 2 threads
    python benchmarks/backbones.py --backbones resnet18 mobilenet_v2 swin_t --threads 1 --repeats 20

The model is finetune.py's demo Faster R-CNN (128 px, 32 FPN channels, BN trained in every stage, batch 8)
with ``--backbone`` swapped; the scenes are random, with three boxes each.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aligndet.engine import weighted_loss  # noqa: E402
from aligndet.models import build_detector  # noqa: E402
from aligndet.models.backbone import BACKBONES  # noqa: E402
from aligndet.presets import model_defaults, model_options  # noqa: E402

DEFAULT = ("resnet18", "resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "convnext_tiny",
           "swin_t")


def batch(size, count, generator):
    images = [torch.rand(3, size, size, generator=generator) for _ in range(count)]
    corners = torch.rand(count, 3, 2, generator=generator) * size * 0.6
    sides = 12 + torch.rand(count, 3, 2, generator=generator) * size * 0.3
    targets = [{"boxes": torch.cat([c, c + s], 1), "labels": torch.ones(3, dtype=torch.int64)}
               for c, s in zip(corners, sides)]
    return images, targets


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=list(DEFAULT), choices=BACKBONES, metavar="NAME")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    options = model_options("faster_rcnn", model_defaults("faster_rcnn", "demo"))
    models, optimisers = {}, {}
    for name in args.backbones:
        torch.manual_seed(0)
        models[name] = build_detector("faster_rcnn", 10, backbone=name, **options)
        optimisers[name] = torch.optim.SGD([q for q in models[name].parameters() if q.requires_grad], lr=1e-3,
                                           momentum=0.9)
    images, targets = batch(options["min_size"][0], args.batch_size, torch.Generator().manual_seed(0))
    train, infer = {n: [] for n in models}, {n: [] for n in models}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, model in models.items():
            model.train()
            t0 = time.perf_counter()
            loss, _, _ = weighted_loss(model(images, targets), model.weight_dict)
            optimisers[name].zero_grad()
            loss.backward()
            optimisers[name].step()
            t1 = time.perf_counter()
            with torch.no_grad():
                model.eval()(images)
            t2 = time.perf_counter()
            if repeat:
                train[name].append(t1 - t0)
                infer[name].append(t2 - t1)
    print(f"Faster R-CNN, demo preset ({options['min_size'][0]} px, batch {args.batch_size}), {args.threads} "
          f"thread(s), median of {args.repeats}")
    print("| backbone | parameters, M (trunk) | training step, ms | inference, ms |")
    print("|---|---|---|---|")
    for name, model in models.items():
        total = sum(q.numel() for q in model.parameters()) / 1e6
        trunk = sum(q.numel() for q in model.backbone.body.parameters()) / 1e6
        print(f"| {name} | {total:.1f} ({trunk:.1f}) | {statistics.median(train[name]) * 1000:.0f} | "
              f"{statistics.median(infer[name]) * 1000:.0f} |")


if __name__ == "__main__":
    main()
