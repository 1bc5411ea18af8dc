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

Search and filters: ``aligndet/data/proposal_search.py``.
"""
import argparse
import json
import multiprocessing
import os
import sys
import time

import cv2
from tqdm import tqdm

from aligndet.atomic import atomic_write
from aligndet.data.images import ImageReadError, list_images
from aligndet.data.proposal_search import MODES, propose_file
from aligndet.data.proposal_cache import (INDEX_NAME, ProposalCache, ProposalCacheError, build_progress,
                                          export_coco_json, format_progress, import_coco_json, missing_shards,
                                          num_shards, open_cache_for_writing, read_index, write_shard)

# Everything that changes the boxes; a cache records these and refuses others.
SETTINGS = ("mode", "search_side", "decode", "min_size", "max_aspect", "max_scale", "nms_iou", "top_k")
# Settings added after the first release, with the value that reproduces older caches.
LEGACY_SETTINGS = {"decode": "full"}
PRESETS = {
    # Photos (COCO, VOC, your own): the official filter, no NMS, no cap; OpenCV's single strategy at a
    # longer side of 256 px, JPEGs decoded at reduced size. On the Pareto front of benchmarks/proposals.py:
    # higher recall than SoCo's search (the official proposals' tool) at many times its speed. For more
    # boxes and recall at about 8x the time: --mode fast (docs/method.md §5).
    "coco": dict(mode="single", search_side=256, decode="reduced", min_size=32, max_aspect=3.0, max_scale=0.8,
                 nms_iou=0.0, top_k=0),
    # The 128x128 demo scenes: the official rules with the minimum side scaled to the image (32 px on
    # COCO's ~500-px images -> 8 px on 128 px); 32 px would drop most digits (benchmarks/proposals.py).
    "demo": dict(mode="fast", search_side=0, decode="full", min_size=8, max_aspect=3.0, max_scale=0.8,
                 nms_iou=0.0, top_k=0),
}
DEMO_SPLITS = {split: (f"data/demo/{split}", f"data/demo/annotations/instances_{split}.json",
                       f"data/demo/proposals/{split}") for split in ("train", "val")}


def _init_worker():
    # One process per core: keep OpenCV from spawning threads of its own.
    cv2.setNumThreads(1)


def _search_one(task):
    """Worker: (position, path, settings) -> (position, boxes or None, (h, w), error, seconds, level)."""
    position, path, settings = task
    start = time.perf_counter()
    try:
        boxes, level, size = propose_file(path, settings)
        return position, boxes, size, "", time.perf_counter() - start, level
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
    settings = {k: settings[k] if k in settings else LEGACY_SETTINGS[k] for k in SETTINGS}
    workers = workers or default_workers()
    upgrade_legacy_index(cache_dir)
    index = open_cache_for_writing(cache_dir, settings, [r.key for r in records], [r.image_id for r in records],
                                   shard_size, overwrite)
    total_shards = num_shards(len(records), shard_size)
    todo = [j for j in missing_shards(cache_dir, index) if j % shard[1] == shard[0]]
    tasks = [(p, records[p].path, settings) for j in todo
             for p in range(j * shard_size, min((j + 1) * shard_size, len(records)))]
    summary = {"cache": cache_dir, "images": len(tasks), "shards_written": 0,
               "shards_already_done": sum(1 for j in range(total_shards) if j % shard[1] == shard[0]) - len(todo),
               "failed": [], "boxes": 0, "relaxed_size_aspect": 0, "relaxed_size_only": 0, "empty": 0,
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
                summary["relaxed_size_aspect"] += level == 1
                summary["relaxed_size_only"] += level == 2
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
        lines.append(f"  filter relaxed to the minimum size and aspect rule on {s['relaxed_size_aspect']} images, "
                     f"to the minimum size alone on {s['relaxed_size_only']}; {s['empty']} images without any box")
    lines.append(f"  {len(s['failed'])} images failed" + (" (no proposals written for them):" if s["failed"] else ""))
    lines += [f"    {key}: {error}" for key, error in s["failed"][:20]]
    if len(s["failed"]) > 20:
        lines.append(f"    ... and {len(s['failed']) - 20} more")
    return "\n".join(lines)


def upgrade_legacy_index(cache_dir):
    """The index of ``cache_dir`` (or None), first rewritten with ``LEGACY_SETTINGS``
    filled in when it was made before those settings existed, so an older cache
    can still be resumed and compared."""
    index = read_index(cache_dir)
    missing = set(SETTINGS) - set(index["settings"]) if index is not None else set()
    # only a cache of this tool (no unknown keys, e.g. not an imported one) that lacks only newer settings
    if not missing or not missing <= set(LEGACY_SETTINGS) or not set(index["settings"]) <= set(SETTINGS):
        return index
    index["settings"] = {k: index["settings"].get(k, LEGACY_SETTINGS.get(k)) for k in SETTINGS}
    atomic_write(os.path.join(cache_dir, INDEX_NAME), lambda f: f.write(json.dumps(index).encode()))
    return index


def ensure_proposals(records, cache_dir, settings, workers=None, progress=True):
    """Open the cache in ``cache_dir``: a finished cache as it is (whatever its
    settings, e.g. imported), an unfinished one completed with its own settings,
    a missing one built from ``records`` with ``settings``."""
    index = upgrade_legacy_index(cache_dir)
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
    b.add_argument("--mode", choices=MODES, help="OpenCV selective search: fast (2 colour spaces x 2 "
                   "strategies), quality (more of both), single (one of each)")
    b.add_argument("--search-side", type=int, help="shrink the longer side to at most this before the search, "
                   "boxes mapped back (0: native scale)")
    b.add_argument("--decode", choices=["full", "reduced"], help="reduced: JPEGs decode at 1/2, 1/4 or 1/8 "
                   "scale, no smaller than --search-side (faster; needs --search-side)")
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
    n = sub.add_parser("info", help="print a cache's settings and counts; during a build, its progress")
    n.add_argument("--cache", required=True)
    _add_cluster_parser(sub, HelpFormatter)
    return p


def _add_cluster_parser(sub, formatter_class):
    """The ``cluster`` subcommand (``aligndet/data/clusters.py``; here, so ``--help`` needs no torch)."""
    c = sub.add_parser("cluster", help="pseudo-classes for DETR: k-means of the proposals' stage-1 features",
                       formatter_class=formatter_class, description="Gives every box of a cache a cluster id "
                       "(aligndet/data/clusters.py): RoI-aligned features of the frozen stage-1 ResNet, PCA, "
                       "k-means++ fitted on a sample, then every box to its nearest centre. Stored in "
                       "<cache>/clusters/; a killed run resumes, other settings are refused unless --overwrite.")
    c.add_argument("--cache", default="data/demo/proposals/train", help="proposal cache folder")
    c.add_argument("--images", help="the folder the cache's keys are relative to (default: the demo's scenes "
                   "for the demo caches)")
    c.add_argument("--json", help="COCO json whose file_names are relative to --images (optional)")
    c.add_argument("--init", required=True, help="stage-1 checkpoint (train_image.py, or any ResNet checkpoint "
                   "--init of train_box.py reads)")
    c.add_argument("--k", type=int, default=32, help="clusters (the paper: 256 for COCO)")
    c.add_argument("--level", choices=["C2", "C3", "C4", "C5"], default="C4",
                   help="ResNet stage whose map is RoI-aligned (C4 suits the 128 px demo scenes)")
    c.add_argument("--pool", type=int, default=7, help="RoI-align output side, averaged to one vector")
    c.add_argument("--dims", type=int, default=256, help="PCA components kept (at most 256)")
    c.add_argument("--sample", type=int, default=200_000, help="boxes the PCA and k-means are fitted on")
    c.add_argument("--iters", type=int, default=50, help="k-means iterations at most")
    c.add_argument("--max-side", type=int, default=0, help="downscale images whose longer side exceeds this "
                   "(0: native size)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--picture", help="PNG of crops per cluster (default: <cache>/clusters/clusters.png)")
    c.add_argument("--overwrite", action="store_true", help="replace clusters made with other settings")


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
            from aligndet.models.weights import CheckpointError
            try:
                run_cluster(args)
            except CheckpointError as e:
                sys.exit(f"error: {e}")
        elif args.command == "info":
            progress = build_progress(args.cache)
            if not progress["complete"]:  # being built, or interrupted: how far, and how fast so far
                print(format_progress(progress) + f"\n  settings {progress['settings']}")
                return
            cache = ProposalCache(args.cache)
            stats = cache.stats()
            print(f"{args.cache}: {stats['images']} images, {stats['failed']} failed, {stats['boxes']} boxes "
                  f"({stats['boxes'] / max(stats['images'] - stats['failed'], 1):.1f} per image); "
                  f"settings {cache.settings}")
    except (ValueError, FileNotFoundError, ProposalCacheError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
