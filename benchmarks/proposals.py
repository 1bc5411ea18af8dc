"""Proposal quality and throughput: recall of selective search against ground truth.

For every search setting (OpenCV mode, optional resize before the search) the
raw boxes of each image are made once; every filter setting is then applied
to the same raw boxes. Recall@t is the share of ground-truth boxes with a
proposal of IoU >= t in their image. Throughput runs the real cache builder
(``build_cache``) over the same images with 1 worker and with all workers.

    python benchmarks/proposals.py                      # demo val set (built on first use)
    python benchmarks/proposals.py --images coco/val2017 \\
        --json coco/annotations/instances_val2017.json --max-images 500

Targets on the demo val set: recall@0.5 >= 0.85 at <= 300 proposals per image
after filtering (demo preset); parallel efficiency >= 85 % on 2 cores.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from torchvision.ops import box_iou
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aligndet.data.images import list_images, read_rgb  # noqa: E402
from aligndet.data.proposals import PRESETS, build_cache, default_workers, filter_proposals, selective_search  # noqa: E402

SEARCHES = [("fast", 0), ("quality", 0), ("fast", 256)]
FILTERS = {  # name -> (min_size, max_aspect, max_scale)
    "none": (0, 0, 0),
    "official (32 px)": (PRESETS["coco"]["min_size"], PRESETS["coco"]["max_aspect"], PRESETS["coco"]["max_scale"]),
    "demo (8 px)": (PRESETS["demo"]["min_size"], PRESETS["demo"]["max_aspect"], PRESETS["demo"]["max_scale"]),
}


def ground_truth(json_file):
    """image id -> float32 [N, 4] xyxy boxes (crowd boxes left out)."""
    with open(json_file) as f:
        coco = json.load(f)
    boxes = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            boxes[ann["image_id"]].append([x, y, x + w, y + h])
    return {i: torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for i, b in boxes.items()}


def recall(proposals, gt, thresholds=(0.5, 0.7)):
    """proposals: image id -> [N, 4]; returns ({t: recall}, mean proposals per image)."""
    hits = dict.fromkeys(thresholds, 0)
    total = 0
    for image_id, boxes in proposals.items():
        g = gt[image_id]
        total += len(g)
        if len(g) and len(boxes):
            best = box_iou(g, torch.as_tensor(boxes, dtype=torch.float32)).max(dim=1).values
            for t in thresholds:
                hits[t] += int((best >= t).sum())
    mean_count = float(np.mean([len(b) for b in proposals.values()]))
    return {t: hits[t] / max(total, 1) for t in thresholds}, mean_count


def throughput(records, settings, workers):
    """Seconds per image of the cache builder with this many workers."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_cache(records, tmp, settings, workers=workers, shard_size=100, progress=False)
        return (time.perf_counter() - start) / len(records)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="data/demo/val")
    p.add_argument("--json", default="data/demo/annotations/instances_val.json")
    p.add_argument("--max-images", type=int, default=None, help="first N images only")
    p.add_argument("--throughput-images", type=int, default=200, help="images for the 1-worker / N-worker timing")
    p.add_argument("--workers", type=int, default=default_workers())
    args = p.parse_args()
    if args.images == "data/demo/val":
        from aligndet.data.demo import ensure_demo
        ensure_demo("data/demo")
    records = list_images(args.images, args.json)[:args.max_images]
    gt = ground_truth(args.json)
    print(f"{len(records)} images, {sum(len(gt[r.image_id]) for r in records)} ground-truth boxes "
          f"({args.json})")
    cv2.setNumThreads(1)
    torch.set_num_threads(1)

    rows = []
    for mode, side in SEARCHES:
        raw, sizes = {}, {}
        start = time.perf_counter()
        for r in tqdm(records, desc=f"search {mode} side={side or 'native'}", leave=False):
            image = read_rgb(r.path)
            raw[r.image_id], sizes[r.image_id] = selective_search(image, mode, side), image.shape[:2]
        seconds = (time.perf_counter() - start) / len(records)
        for name, (min_size, max_aspect, max_scale) in FILTERS.items():
            kept = {i: filter_proposals(b, sizes[i], min_size, max_aspect, max_scale)[0] for i, b in raw.items()}
            rec, count = recall(kept, gt)
            rows.append((mode, side or "native", name, rec[0.5], rec[0.7], count, seconds))

    print("\n| mode | search side | filter | recall@0.5 | recall@0.7 | proposals / image | s / image (1 core) |")
    print("|---|---|---|---|---|---|---|")
    for mode, side, name, r5, r7, count, seconds in rows:
        print(f"| {mode} | {side} | {name} | {r5:.3f} | {r7:.3f} | {count:.1f} | {seconds:.3f} |")

    subset = records[:args.throughput_images]
    settings = PRESETS["demo"] if args.images == "data/demo/val" else PRESETS["coco"]
    one = throughput(subset, settings, 1)
    many = throughput(subset, settings, args.workers)
    efficiency = one / many / args.workers
    print(f"\nthroughput over {len(subset)} images (cache builder, {settings['mode']} mode): "
          f"1 worker {one * 1000:.1f} ms/image, {args.workers} workers {many * 1000:.1f} ms/image, "
          f"speed-up {one / many:.2f}x, parallel efficiency {efficiency:.0%}")


if __name__ == "__main__":
    main()
