"""Selective-search proposals for unlabeled images, the pseudo-objects of box-domain pre-training.

AlignDet (docs/method.md §3, §5) trains a detector's neck and heads on
class-agnostic boxes from selective search. This module makes them for any
image folder or COCO json and stores them in a resumable shard cache
(``aligndet/data/proposal_cache.py``, where the format is described).

    # the demo's training scenes (the default; builds the demo dataset first if needed)
    python -m aligndet.data.proposals

    # your own images (a folder, searched recursively), all local cores
    python -m aligndet.data.proposals build --images my_images/ --out my_images_proposals/

    # COCO train2017 (labels ignored) on 4 machines sharing a disk: run i = 0..3
    python -m aligndet.data.proposals build --images coco/train2017 \\
        --json coco/annotations/instances_train2017.json --out proposals/train2017 --shard i/4

    # move proposals in and out as COCO-style json (the official release's format)
    python -m aligndet.data.proposals export --cache proposals/train2017 --out train2017_ss.json
    python -m aligndet.data.proposals import --json train2017_ss.json --out proposals/train2017
    python -m aligndet.data.proposals info --cache proposals/train2017

Re-running a build skips finished shards, so a killed run resumes. A cache
made with other settings is refused rather than mixed (``--overwrite``).

Filters (official, for COCO): keep a box when both sides are at least
``min_size`` px, ``1/max_aspect <= w/h <= max_aspect`` and
``sqrt(wh) / sqrt(WH) <= max_scale``; when no box survives, keep those that
pass the aspect rule alone, and if none do, every box. A value of 0 turns a
rule off. Then optional NMS (earlier-ranked boxes win) and a cap on the count.
"""
import argparse
import ctypes
import math
import multiprocessing
import os
import sys
import time

import cv2
import numpy as np
import torch
import torchvision
from tqdm import tqdm

from aligndet.data.images import ImageReadError, list_images, read_rgb
from aligndet.data.proposal_cache import (ProposalCache, ProposalCacheError, export_coco_json, import_coco_json,
                                          missing_shards, num_shards, open_cache_for_writing, read_index,
                                          write_shard)
from aligndet.models.weights import CheckpointError

# Everything that changes the boxes; a cache records these and refuses others.
SETTINGS = ("mode", "search_side", "min_size", "max_aspect", "max_scale", "nms_iou", "top_k")
PRESETS = {
    # The official AlignDet proposals for COCO: fast mode at native scale, no NMS, no cap.
    "coco": dict(mode="fast", search_side=0, min_size=32, max_aspect=3.0, max_scale=0.8, nms_iou=0.0, top_k=0),
    # The 128x128 demo scenes: the official rules with the minimum side scaled to the image (32 px on
    # COCO's ~500-px images -> 8 px on 128 px); 32 px would drop most digits (benchmarks/proposals.py).
    "demo": dict(mode="fast", search_side=0, min_size=8, max_aspect=3.0, max_scale=0.8, nms_iou=0.0, top_k=0),
}
DEMO_SPLITS = {split: (f"data/demo/{split}", f"data/demo/annotations/instances_{split}.json",
                       f"data/demo/proposals/{split}") for split in ("train", "val")}


def _c_library():
    try:
        libc = ctypes.CDLL(None)  # the C library of this process, whose rand() OpenCV's search draws from
        return libc if hasattr(libc, "srand") else None
    except (OSError, TypeError):
        return None


_LIBC = _c_library()


def selective_search(image, mode="fast", search_side=0):
    """Selective search on an RGB uint8 image ``[H, W, 3]``.

    Returns int64 ``[N, 4]`` xyxy boxes in pixels of ``image``, in OpenCV's
    rank order (hierarchy level times a random factor, seeded per call). ``search_side > 0`` resizes the image
    so its longer side is that many pixels before the search and maps the
    boxes back.
    """
    if mode not in ("fast", "quality"):
        raise ValueError(f"mode must be 'fast' or 'quality', got {mode!r}")
    height, width = image.shape[:2]
    scale = search_side / max(height, width) if search_side else 1.0
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if scale != 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        bgr = cv2.resize(bgr, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    if _LIBC is not None:
        # OpenCV ranks regions by hierarchy level times std::rand(), so the order (not the set) of the
        # boxes changes from call to call; a fixed seed makes caches and first-K choices reproducible.
        _LIBC.srand(1)
    search = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    search.setBaseImage(bgr)
    search.switchToSelectiveSearchFast() if mode == "fast" else search.switchToSelectiveSearchQuality()
    xywh = search.process().astype(np.float64).reshape(-1, 4)  # [N, 4] x, y, w, h in the searched image
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) / scale
    boxes = np.round(boxes)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep].astype(np.int64)


def filter_proposals(boxes, image_size, min_size=32, max_aspect=3.0, max_scale=0.8):
    """The official proposal filter with its fall-backs (module docstring).

    Args:
        boxes: ``[N, 4]`` xyxy pixels. image_size: ``(height, width)``.
    Returns:
        (kept boxes, level): level 0 = all rules held, 1 = relaxed to the aspect
        rule alone, 2 = relaxed to no filter.
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    height, width = image_size
    w = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    h = (boxes[:, 3] - boxes[:, 1]).astype(np.float64)
    aspect_ok = (w <= max_aspect * h) & (h <= max_aspect * w) if max_aspect else np.ones(len(boxes), bool)
    strict = aspect_ok.copy()
    if min_size:
        strict &= (w >= min_size) & (h >= min_size)
    if max_scale:
        strict &= np.sqrt(w * h) <= max_scale * math.sqrt(height * width)
    for level, keep in enumerate((strict, aspect_ok)):
        if keep.any():
            return boxes[keep], level
    return boxes, 2


def make_proposals(image, mode="fast", search_side=0, min_size=32, max_aspect=3.0, max_scale=0.8,
                   nms_iou=0.0, top_k=0):
    """Selective search, filter, optional NMS and cap for one RGB uint8 image.
    Returns (int64 [N, 4] xyxy boxes in rank order, filter relaxation level)."""
    boxes = selective_search(image, mode, search_side)
    boxes, level = filter_proposals(boxes, image.shape[:2], min_size, max_aspect, max_scale)
    if nms_iou and len(boxes):
        rank_score = -torch.arange(len(boxes), dtype=torch.float32)  # earlier rank wins
        keep = torchvision.ops.nms(torch.from_numpy(boxes).float(), rank_score, nms_iou).numpy()
        boxes = boxes[np.sort(keep)]
    if top_k:
        boxes = boxes[:top_k]
    return boxes, level


def _init_worker():
    # One process per core: keep OpenCV and torch from spawning threads of their own.
    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def _search_one(task):
    """Worker: (position, path, settings) -> (position, boxes or None, (h, w), error, seconds, level)."""
    position, path, settings = task
    start = time.perf_counter()
    try:
        image = read_rgb(path)
        boxes, level = make_proposals(image, **settings)
        return position, boxes, image.shape[:2], "", time.perf_counter() - start, level
    except ImageReadError as e:
        return position, None, (0, 0), str(e), time.perf_counter() - start, -1
    except Exception as e:  # noqa: BLE001 - one bad image must not end a day-long run
        return position, None, (0, 0), f"{path}: {type(e).__name__}: {e}", time.perf_counter() - start, -1


def default_workers():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def parse_shard(text):
    """'i/n' -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard i/n needs 0 <= i < n, got {text!r}")
    return i, n


def build_cache(records, cache_dir, settings, workers=None, shard=(0, 1), shard_size=1000, overwrite=False,
                progress=True):
    """Make the proposals of ``records`` (``ImageRecord`` list) into ``cache_dir``.

    Only the missing shards numbered ``j`` with ``j % n == i`` for ``shard = (i, n)``
    are made. Returns a summary dict of this run (also printed when ``progress``).
    """
    settings = {k: settings[k] for k in SETTINGS}
    workers = workers or default_workers()
    index = open_cache_for_writing(cache_dir, settings, [r.key for r in records], [r.image_id for r in records],
                                   shard_size, overwrite)
    total_shards = num_shards(len(records), shard_size)
    todo = [j for j in missing_shards(cache_dir, index) if j % shard[1] == shard[0]]
    tasks = [(p, records[p].path, settings) for j in todo
             for p in range(j * shard_size, min((j + 1) * shard_size, len(records)))]
    summary = {"cache": cache_dir, "images": len(tasks), "shards_written": 0,
               "shards_already_done": sum(1 for j in range(total_shards) if j % shard[1] == shard[0]) - len(todo),
               "failed": [], "boxes": 0, "relaxed_aspect_only": 0, "relaxed_unfiltered": 0, "empty": 0,
               "cpu_seconds": 0.0, "wall_seconds": 0.0, "workers": workers}
    start = time.perf_counter()
    pending = {}  # shard -> {position: result}
    bar = tqdm(total=len(tasks), desc="selective search", unit="img", disable=not progress)
    pool = multiprocessing.Pool(workers, _init_worker) if workers > 1 else None
    try:
        if pool is None:
            _init_worker()
        results = pool.imap(_search_one, tasks, chunksize=2) if pool else map(_search_one, tasks)
        for position, boxes, size, error, seconds, level in results:
            j = position // shard_size
            pending.setdefault(j, {})[position] = (boxes, size, error)
            summary["cpu_seconds"] += seconds
            if boxes is None:
                summary["failed"].append((records[position].key, error))
            else:
                summary["boxes"] += len(boxes)
                summary["empty"] += len(boxes) == 0
                summary["relaxed_aspect_only"] += level == 1
                summary["relaxed_unfiltered"] += level == 2
            bar.update(1)
            if len(pending[j]) == min(shard_size, len(records) - j * shard_size):
                done = pending.pop(j)
                write_shard(cache_dir, index, j, [done[p] for p in sorted(done)])
                summary["shards_written"] += 1
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    summary["wall_seconds"] = time.perf_counter() - start
    if progress:
        print(format_summary(summary))
    return summary


def format_summary(s):
    done = s["images"] - len(s["failed"])
    lines = [f"proposals in {s['cache']}: {s['images']} images searched in {s['shards_written']} shards "
             f"({s['shards_already_done']} shards were already done), {s['workers']} workers"]
    if s["images"]:
        lines.append(f"  {s['boxes'] / max(done, 1):.1f} proposals per image, "
                     f"{s['wall_seconds'] / s['images']:.4f} s per image wall-clock, "
                     f"{s['cpu_seconds'] / s['images']:.4f} s per image per worker")
        lines.append(f"  filter relaxed to the aspect rule on {s['relaxed_aspect_only']} images, "
                     f"to no filter on {s['relaxed_unfiltered']}; {s['empty']} images without any box")
    lines.append(f"  {len(s['failed'])} images failed" + (" (no proposals written for them):" if s["failed"] else ""))
    lines += [f"    {key}: {error}" for key, error in s["failed"][:20]]
    if len(s["failed"]) > 20:
        lines.append(f"    ... and {len(s['failed']) - 20} more")
    return "\n".join(lines)


def ensure_proposals(records, cache_dir, settings, workers=None, progress=True):
    """Open the cache in ``cache_dir``: a finished cache as it is (whatever its
    settings, e.g. imported), an unfinished one completed with its own settings,
    a missing one built from ``records`` with ``settings``."""
    index = read_index(cache_dir)
    if index is not None:
        if not missing_shards(cache_dir, index):
            return ProposalCache(cache_dir)
        if set(index["settings"]) != set(SETTINGS):
            raise ProposalCacheError(f"the proposal cache in {cache_dir} is incomplete and was not made by "
                                     f"selective search here ({index['settings']}); import it again")
        settings = index["settings"]
        if progress:
            print(f"finishing the proposal cache in {cache_dir} with its settings {settings}")
    build_cache(records, cache_dir, settings, workers=workers, progress=progress)
    return ProposalCache(cache_dir)


def filter_defaults(preset, images):
    """The build options' defaults: ``preset``'s filters; without one, demo for the demo
    dataset (no --images) and coco otherwise."""
    return PRESETS[preset or ("demo" if images is None else "coco")]


def get_args_parser():
    # The command line's parser is imported here, so the search above copies out with its siblings only.
    from aligndet.cli import HelpFormatter, PresetParser
    from aligndet.data.clusters import add_cluster_parser

    p = argparse.ArgumentParser("python -m aligndet.data.proposals", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", parser_class=PresetParser)
    b = sub.add_parser("build", help="run selective search over images into a cache (default command)",
                       formatter_class=HelpFormatter, preset_keys=("preset", "images"), presets=filter_defaults)
    b.add_argument("--images", help="image folder (searched recursively), or the folder a --json's "
                   "file_names are relative to (default: the demo's training scenes)")
    b.add_argument("--json", help="COCO json whose images to use (annotations ignored)")
    b.add_argument("--out", help="cache folder (default for the demo: data/demo/proposals/<split>)")
    b.add_argument("--demo-split", choices=sorted(DEMO_SPLITS), default="train",
                   help="without --images: which demo split")
    b.add_argument("--preset", choices=sorted(PRESETS), help="filter settings (default: demo for the demo "
                   "dataset, coco otherwise); the defaults below are its values")
    b.add_argument("--mode", choices=["fast", "quality"], help="OpenCV selective-search strategy")
    b.add_argument("--search-side", type=int, help="resize the longer side to this before the search, "
                   "boxes mapped back (0: native scale)")
    b.add_argument("--min-size", type=float, help="minimum box width and height, px (0: off)")
    b.add_argument("--max-aspect", type=float, help="maximum of w/h and h/w (0: off)")
    b.add_argument("--max-scale", type=float, help="maximum sqrt(wh)/sqrt(WH) (0: off)")
    b.add_argument("--nms-iou", type=float, help="NMS IoU threshold after filtering (0: off)")
    b.add_argument("--top-k", type=int, help="keep at most this many boxes per image (0: all)")
    b.add_argument("--workers", type=int, default=default_workers(), help="processes")
    b.add_argument("--shard", default="0/1", help="i/n: make only shards j with j %% n == i (several machines)")
    b.add_argument("--shard-size", type=int, default=1000, help="images per shard file")
    b.add_argument("--overwrite", action="store_true", help="delete a cache made with other settings")
    e = sub.add_parser("export", help="write a cache as COCO-style proposal json")
    e.add_argument("--cache", required=True)
    e.add_argument("--out", required=True, help="json file to write")
    i = sub.add_parser("import", help="make a cache from COCO-style proposal json")
    i.add_argument("--json", required=True)
    i.add_argument("--out", required=True, help="cache folder")
    i.add_argument("--shard-size", type=int, default=1000)
    i.add_argument("--overwrite", action="store_true")
    n = sub.add_parser("info", help="print a cache's settings and counts")
    n.add_argument("--cache", required=True)
    add_cluster_parser(sub, HelpFormatter)
    return p


def resolve_build_args(args):
    """Fill the demo defaults and the preset into ``args``; return the settings dict."""
    if args.images is None:
        from aligndet.data.demo import ensure_demo
        ensure_demo("data/demo")
        args.images, json_file, out = DEMO_SPLITS[args.demo_split]
        args.json = args.json or json_file
        args.out = args.out or out
    if args.out is None:
        raise ValueError("--out is required with --images")
    return {key: getattr(args, key) for key in SETTINGS}  # the preset's, or the flags given


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["build"] + argv
    args = get_args_parser().parse_args(argv)
    try:
        if args.command == "build":
            settings = resolve_build_args(args)
            records = list_images(args.images, args.json)
            if not records:
                raise ValueError(f"no images found in {args.images}")
            print(f"{len(records)} images from {args.json or args.images}; settings {settings}")
            build_cache(records, args.out, settings, args.workers, parse_shard(args.shard), args.shard_size,
                        args.overwrite)
        elif args.command == "export":
            images, boxes = export_coco_json(args.cache, args.out)
            print(f"wrote {boxes} proposals of {images} images to {args.out}")
        elif args.command == "import":
            cache = import_coco_json(args.json, args.out, args.shard_size, args.overwrite)
            print(f"imported {cache.stats()['boxes']} proposals of {len(cache)} images into {args.out}")
        elif args.command == "cluster":
            from aligndet.data.clusters import run_cluster
            run_cluster(args)
        elif args.command == "info":
            cache = ProposalCache(args.cache)
            stats = cache.stats()
            print(f"{args.cache}: {stats['images']} images, {stats['failed']} failed, {stats['boxes']} boxes "
                  f"({stats['boxes'] / max(stats['images'] - stats['failed'], 1):.1f} per image); "
                  f"settings {cache.settings}")
    except (ValueError, FileNotFoundError, ProposalCacheError, CheckpointError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
