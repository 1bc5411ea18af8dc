"""On-disk cache of class-agnostic proposals: shards plus an index.

Layout of a cache folder::

    index.json                  format, version, the settings that made the boxes,
                                shard size, and every image's key and id in order
    shard-00000.npz ...         one file per ``shard_size`` consecutive images

``index.json`` fixes which images a shard holds (shard ``j`` = images
``j*S .. (j+1)*S - 1`` of the index), so shards can be written in any order,
by any number of processes or machines, and a shard file that exists is
complete: each is written to a temporary name and renamed, never appended to.
A run killed at any moment (``kill -9`` included) loses at most the shards in
flight; the next run writes only the missing ones.

A shard (``numpy.savez_compressed``) holds, for its ``n`` images:

    keys     str     [n]      image keys (checked against the index on load)
    status   int8    [n]      1 = proposals made, 0 = image failed (unreadable)
    sizes    int32   [n, 2]   image (height, width); 0 for failed images
    offsets  int64   [n + 1]  image i's boxes are boxes[offsets[i]:offsets[i+1]]
    boxes    uint16  [M, 4]   xyxy, pixels, in the original image (float32 when
                              a box is fractional or beyond 65535, e.g. imported)
    errors   str     [n]      why an image failed ("" otherwise)

Disk cost: 8 bytes per box before compression; the compressed shards of the
demo set take about 4 MB per million boxes (``benchmarks/RESULTS.md``).

Loading one image's proposals after ``ProposalCache(path)`` is a dict lookup
and a slice of an already loaded shard: O(1) per image, O(shard) once per
shard; the most recently used ``max_open_shards`` shards stay in memory.

``build_progress(path)`` reads a cache that is complete or still being built
(or interrupted): shards and images done, and a rate and time left estimated
from the shard files' modification times; ``format_progress`` puts it in words.
"""
import json
import math
import os
import time
from collections import OrderedDict

import numpy as np

from aligndet.atomic import atomic_write

FORMAT = "aligndet-proposals"
VERSION = 1
INDEX_NAME = "index.json"


class ProposalCacheError(RuntimeError):
    """A cache is missing, incomplete, corrupt or made with other settings."""


def shard_name(shard):
    return f"shard-{shard:05d}.npz"


def num_shards(num_images, shard_size):
    return -(-num_images // shard_size)


def read_index(cache_dir):
    """The index dict of a cache folder, or ``None`` when there is none."""
    path = os.path.join(cache_dir, INDEX_NAME)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            index = json.load(f)
    except ValueError as e:
        raise ProposalCacheError(f"{path} is not valid json ({e}); delete the cache folder to rebuild it") from e
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise ProposalCacheError(f"{path} is not an {FORMAT} v{VERSION} index "
                                 f"(format {index.get('format')!r}, version {index.get('version')!r})")
    return index


def open_cache_for_writing(cache_dir, settings, keys, image_ids, shard_size=1000, overwrite=False):
    """Create ``cache_dir`` with its index, or check that the index already
    there was made with the same ``settings`` and images. Returns the index.

    Refuses (``ProposalCacheError``) to mix boxes made with other settings or
    for other images, unless ``overwrite`` deletes the old shards first.
    """
    index = {"format": FORMAT, "version": VERSION, "settings": dict(settings),
             "shard_size": int(shard_size), "keys": list(keys), "image_ids": [int(i) for i in image_ids]}
    if len(set(index["keys"])) != len(index["keys"]):
        raise ValueError("image keys must be unique")
    os.makedirs(cache_dir, exist_ok=True)
    old = read_index(cache_dir)
    if old is not None and not overwrite:
        if old["settings"] != index["settings"]:
            diff = ", ".join(f"{k}: cache {old['settings'].get(k)!r} vs requested {index['settings'].get(k)!r}"
                             for k in sorted(set(old["settings"]) | set(index["settings"]))
                             if old["settings"].get(k) != index["settings"].get(k))
            raise ProposalCacheError(
                f"the proposal cache in {cache_dir} was made with other settings ({diff}). "
                f"Use another output folder, the cache's settings, or --overwrite to rebuild it.")
        if old["keys"] != index["keys"] or old["image_ids"] != index["image_ids"]:
            raise ProposalCacheError(
                f"the proposal cache in {cache_dir} lists other images ({len(old['keys'])} in the cache, "
                f"{len(index['keys'])} requested). Use another output folder or --overwrite.")
        if old["shard_size"] != index["shard_size"]:
            raise ProposalCacheError(f"the proposal cache in {cache_dir} uses shards of {old['shard_size']} "
                                     f"images, not {index['shard_size']}; pass --shard-size {old['shard_size']}")
        return old
    if overwrite:
        for name in os.listdir(cache_dir):
            if name.startswith("shard-") and name.endswith(".npz"):
                os.unlink(os.path.join(cache_dir, name))
    atomic_write(os.path.join(cache_dir, INDEX_NAME), lambda f: f.write(json.dumps(index).encode()))
    return index


def missing_shards(cache_dir, index):
    """Shard numbers of ``index`` without a file in ``cache_dir``."""
    return [j for j in range(num_shards(len(index["keys"]), index["shard_size"]))
            if not os.path.isfile(os.path.join(cache_dir, shard_name(j)))]


def _shard_images(index, shard):
    """How many images shard ``shard`` of ``index`` holds (the last one may hold fewer)."""
    size, total = index["shard_size"], len(index["keys"])
    return max(0, min((shard + 1) * size, total) - shard * size)


def build_progress(cache_dir):
    """How far the build of the cache in ``cache_dir`` is, complete or not, as a dict.

    Keys: ``cache_dir``, ``images``, ``shards``, ``shard_size``, ``settings``,
    ``shards_done``, ``images_done``, ``complete``, ``images_per_second``,
    ``eta_seconds`` and ``seconds_since_last_shard``. The rate counts the images of
    every present shard but the earliest written over the time from that shard to the
    newest (``None`` with fewer than 2 shards or no time between them); the time left
    assumes the build goes on at that rate. Raises ``ProposalCacheError`` without an index.
    """
    index = read_index(cache_dir)
    if index is None:
        raise ProposalCacheError(f"no proposal cache in {cache_dir} (no {INDEX_NAME}); nothing has been built "
                                 f"there yet, or the folder is wrong")
    total = len(index["keys"])
    shards = num_shards(total, index["shard_size"])
    done = []  # (mtime, images) of each shard file present
    for j in range(shards):
        try:
            mtime = os.stat(os.path.join(cache_dir, shard_name(j))).st_mtime
        except FileNotFoundError:
            continue
        done.append((mtime, _shard_images(index, j)))
    images_done = sum(n for _, n in done)
    rate = eta = since = None
    if done:
        done.sort()
        since = max(0.0, time.time() - done[-1][0])
        span = done[-1][0] - done[0][0]
        if len(done) >= 2 and span > 0:
            rate = sum(n for _, n in done[1:]) / span
            eta = (total - images_done) / rate
    return {"cache_dir": str(cache_dir), "images": total, "shards": shards, "shard_size": index["shard_size"],
            "settings": index["settings"], "shards_done": len(done), "images_done": images_done,
            "complete": len(done) == shards, "images_per_second": rate, "eta_seconds": eta,
            "seconds_since_last_shard": since}


def _duration(seconds):
    """``seconds`` in words at a useful precision: 12 s, 5 min 3 s, 11 h 52 min, 3 d 4 h."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} d {seconds % 86400 // 3600} h"


def _rate(rate):
    return f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"


def format_progress(progress):
    """One or two lines on a ``build_progress`` dict, for people reading ``info``."""
    p = progress
    if p["complete"]:
        return (f"{p['cache_dir']}: complete, {p['shards']:,} shards, {p['images']:,} images "
                f"({p['shard_size']:,} per shard)")
    percent = math.floor(100 * p["images_done"] / p["images"]) if p["images"] else 100
    line = (f"{p['cache_dir']}: {p['shards_done']:,} of {p['shards']:,} shards ({p['images_done']:,} of "
            f"{p['images']:,} images, {percent} %) done")
    if p["seconds_since_last_shard"] is None:
        return line + "; no shard written yet"
    line += f"; last shard written {_duration(p['seconds_since_last_shard'])} ago"
    if p["images_per_second"] is None:
        return line + "\nno rate yet: it needs at least 2 shards written some time apart"
    return (line + f"\nabout {_rate(p['images_per_second'])} images/s over the shards so far, about "
            f"{_duration(p['eta_seconds'])} left (if the build is still running)")


def _box_array(boxes):
    """Concatenated boxes [M, 4] as uint16 when exact, else float32."""
    if boxes.size == 0 or (np.all(boxes == np.round(boxes)) and boxes.min() >= 0 and boxes.max() <= 65535):
        return boxes.astype(np.uint16)
    return boxes.astype(np.float32)


def write_shard(cache_dir, index, shard, results):
    """Write shard ``shard`` atomically. ``results`` lists, in index order, one
    ``(boxes [N, 4] xyxy or None, (height, width), error message)`` per image."""
    size = index["shard_size"]
    keys = index["keys"][shard * size:(shard + 1) * size]
    if len(results) != len(keys):
        raise ValueError(f"shard {shard} needs {len(keys)} results, got {len(results)}")
    counts = [0 if boxes is None else len(boxes) for boxes, _, _ in results]
    arrays = dict(
        keys=np.array(keys, dtype=str),
        status=np.array([boxes is not None for boxes, _, _ in results], dtype=np.int8),
        sizes=np.array([hw for _, hw, _ in results], dtype=np.int32).reshape(-1, 2),
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        boxes=_box_array(np.concatenate([np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
                                         for boxes, _, _ in results if boxes is not None] or [np.zeros((0, 4))])),
        errors=np.array([err or "" for _, _, err in results], dtype=str),
    )
    atomic_write(os.path.join(cache_dir, shard_name(shard)), lambda f: np.savez_compressed(f, **arrays))


class ProposalCache:
    """Read access to a finished cache: ``cache.get(key)`` -> float32 [N, 4]
    xyxy boxes in pixels of the original image, or ``None`` for an image whose
    proposals could not be made (unreadable file).

    Raises ``ProposalCacheError`` on open when shards are missing, naming them.
    """

    def __init__(self, cache_dir, max_open_shards=16):
        self.cache_dir = str(cache_dir)
        index = read_index(cache_dir)
        if index is None:
            raise ProposalCacheError(f"no proposal cache in {cache_dir} (no {INDEX_NAME}); build one with "
                                     f"`python -m aligndet.data.proposals build --out {cache_dir} ...`")
        missing = missing_shards(cache_dir, index)
        if missing:
            raise ProposalCacheError(
                f"the proposal cache in {cache_dir} is incomplete: {len(missing)} of "
                f"{num_shards(len(index['keys']), index['shard_size'])} shards missing (e.g. "
                f"{', '.join(shard_name(j) for j in missing[:3])}). Re-run the same build command to finish it.")
        self.index = index
        self.settings = index["settings"]
        self.keys = index["keys"]
        self.image_ids = index["image_ids"]
        self.shard_size = index["shard_size"]
        self._position = {key: i for i, key in enumerate(self.keys)}
        self._shards = OrderedDict()
        self.max_open_shards = max_open_shards

    def __len__(self):
        return len(self.keys)

    def __contains__(self, key):
        return key in self._position

    def _shard(self, j):
        if j in self._shards:
            self._shards.move_to_end(j)
            return self._shards[j]
        path = os.path.join(self.cache_dir, shard_name(j))
        try:
            with np.load(path) as z:
                shard = {name: z[name] for name in z.files}
        except (OSError, ValueError, KeyError) as e:
            raise ProposalCacheError(f"cannot read {path} ({e}); delete it and re-run the build to remake it") from e
        expected = self.keys[j * self.shard_size:(j + 1) * self.shard_size]
        if shard["keys"].tolist() != expected:
            raise ProposalCacheError(f"{path} does not hold the images the index lists for it; "
                                     f"delete it and re-run the build")
        self._shards[j] = shard
        if len(self._shards) > self.max_open_shards:
            self._shards.popitem(last=False)
        return shard

    def _locate(self, key):
        try:
            i = self._position[key]
        except KeyError:
            raise KeyError(f"image {key!r} is not in the proposal cache {self.cache_dir}") from None
        return self._shard(i // self.shard_size), i % self.shard_size

    def get(self, key):
        shard, i = self._locate(key)
        if not shard["status"][i]:
            return None
        return shard["boxes"][shard["offsets"][i]:shard["offsets"][i + 1]].astype(np.float32)

    def image_size(self, key):
        """(height, width) of the image when the proposals were made (0, 0 if it failed)."""
        shard, i = self._locate(key)
        return tuple(int(v) for v in shard["sizes"][i])

    def error(self, key):
        shard, i = self._locate(key)
        return str(shard["errors"][i])

    def stats(self):
        """Counts over the whole cache: images, failed, boxes, and the failed keys."""
        images = failed = boxes = 0
        failed_keys = []
        for j in range(num_shards(len(self.keys), self.shard_size)):
            shard = self._shard(j)
            images += len(shard["status"])
            bad = shard["status"] == 0
            failed += int(bad.sum())
            failed_keys += shard["keys"][bad].tolist()
            boxes += int(shard["offsets"][-1])
        return {"images": images, "failed": failed, "boxes": boxes, "failed_keys": failed_keys}


def export_coco_json(cache, out_file, category_name="object"):
    """Write the cache as the COCO-style proposal json AlignDet's authors released:
    one category, each box an annotation ``[x, y, w, h]`` with ``score`` = 1 - rank / N.
    Failed images are left out."""
    cache = cache if isinstance(cache, ProposalCache) else ProposalCache(cache)
    images, annotations = [], []
    for key, image_id in zip(cache.keys, cache.image_ids):
        boxes = cache.get(key)
        if boxes is None:
            continue
        h, w = cache.image_size(key)
        images.append({"id": image_id, "file_name": key, "height": h, "width": w})
        for rank, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                "iscrowd": 0, "score": 1.0 - rank / max(len(boxes), 1)})
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": category_name}]}
    atomic_write(out_file, lambda f: f.write(json.dumps(coco).encode()))
    return len(images), len(annotations)


def import_coco_json(json_file, cache_dir, shard_size=1000, overwrite=False):
    """Make a cache from a COCO-style proposal json (boxes ``[x, y, w, h]``;
    categories ignored). Boxes keep the json's order; annotations with a
    ``score`` are ordered by it, highest first. Images need ``file_name``."""
    try:
        with open(json_file) as f:
            coco = json.load(f)
        images = sorted(coco["images"], key=lambda im: int(im["id"]))
        per_image = {int(im["id"]): [] for im in images}
        for ann in coco.get("annotations", []):
            per_image[int(ann["image_id"])].append(ann)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ProposalCacheError(f"cannot read proposals from {json_file}: {type(e).__name__}: {e}") from e
    settings = {"source": "imported", "file": os.path.basename(json_file)}
    keys = [str(im["file_name"]) for im in images]
    index = open_cache_for_writing(cache_dir, settings, keys, [int(im["id"]) for im in images],
                                   shard_size, overwrite)
    for shard in missing_shards(cache_dir, index):
        results = []
        for im in images[shard * shard_size:(shard + 1) * shard_size]:
            anns = per_image[int(im["id"])]
            if any("score" in a for a in anns):
                anns = sorted(anns, key=lambda a: -a.get("score", 0.0))
            xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            results.append((boxes, (int(im.get("height", 0)), int(im.get("width", 0))), ""))
        write_shard(cache_dir, index, shard, results)
    return ProposalCache(cache_dir)
