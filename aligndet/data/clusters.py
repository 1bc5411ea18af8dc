"""Pseudo-classes of proposals: one cluster id per cached box, the classes of DETR's box-domain pre-training.

DETR's stage 2 matches queries to proposals with a Hungarian cost that has a
class term (docs/method.md §3), so every proposal needs a class. The paper
clusters the proposals' features; the official code never released that step.
This module is our version of it:

1. **Features.** The frozen stage-1 ResNet (``--init``) runs on each image
   (ImageNet-normalised, native size unless ``--max-side``); every cached box is
   RoI-aligned on stage ``--level`` (C4, stride 16, by default) to
   ``--pool`` x ``--pool``, averaged to one vector and L2-normalised.
2. **PCA.** Fitted (``torch.linalg.svd`` of the centred sample) on the boxes of a
   seeded random sample of images, at most ``--sample`` boxes; ``--dims`` (<= 256) components.
3. **k-means.** k-means++ seeding and Lloyd iterations on the same sample, seeded (both in ``kmeans.py``).
4. **Assignment.** A second pass over every image gives each box its nearest centre (the sampled
   images' features are kept from the fit, the others computed).

Storage, beside the cache (``<cache>/clusters/``)::

    index.json          the settings that made the ids and the cache they belong to
    model.npz           PCA mean and components, k-means centres (written once fitted)
    shard-00000.npz ... ids (int32, one per box, in the cache's box order) per cache shard

The layout follows the cache's own: files are written atomically, so a killed
run resumes at the first missing shard; a folder made with other settings (or
for a cache whose boxes changed) is refused, never mixed, unless ``overwrite``.

    python -m aligndet.data.proposals cluster --cache data/demo/proposals/train \\
        --init outputs/image/checkpoint.pth --k 32
"""
import hashlib
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torchvision.ops import roi_align
from tqdm import tqdm

from aligndet.atomic import atomic_write, file_sha256
from aligndet.data.images import ImageReadError, read_rgb
from aligndet.data.kmeans import assign, fit_pca, kmeans, project
from aligndet.data.proposal_cache import ProposalCache, ProposalCacheError, num_shards, shard_name
from aligndet.models.transform import IMAGENET_MEAN, IMAGENET_STD

FORMAT = "aligndet-clusters"
VERSION = 1
FOLDER = "clusters"
LEVEL_STRIDES = {"C2": 4, "C3": 8, "C4": 16, "C5": 32}


def cluster_dir(cache_dir):
    return os.path.join(cache_dir, FOLDER)


# ---- features -------------------------------------------------------------------------------------------------

def load_feature_body(init, level):
    """The frozen trunk of ``init`` up to stage ``level`` (eval mode). ``init`` is a checkpoint (any layout
    ``aligndet.models.weights`` reads; the architecture is found from its tensors: a ResNet's depth, or the
    torchvision family whose ``features`` it fills exactly) or ``torchvision:<Enum>.<NAME>``."""
    from aligndet.models.backbone import BACKBONES, build_body
    from aligndet.models.weights import TORCHVISION, parse_torchvision_weights, read_checkpoint

    if level not in LEVEL_STRIDES:
        raise ValueError(f"unknown level {level!r}; choose one of {', '.join(LEVEL_STRIDES)}")
    if init.startswith(TORCHVISION):
        weights = type(parse_torchvision_weights(init))
        arch = next((n for n in BACKBONES if torchvision.models.get_model_weights(n) is weights), None)
        if arch is None:
            raise ValueError(f"{init} are weights of none of the backbones ({', '.join(BACKBONES)})")
    elif not os.path.isfile(init):
        raise FileNotFoundError(f"no stage-1 checkpoint at {init} (a file, or {TORCHVISION}<Enum>.<NAME>)")
    else:
        arch = checkpoint_architecture(read_checkpoint(init), init)
    body = build_body(arch, weights=init, norm="frozen_bn", trainable_layers=0, returned_layers=(int(level[1]) - 1,))
    return body.eval()


def checkpoint_architecture(checkpoint, where):
    """The ``BACKBONES`` name of the trunk inside a loaded checkpoint."""
    from aligndet.models.backbone import BACKBONES
    from aligndet.models.weights import CheckpointError, extract_backbone_state, trunk_key

    for name in BACKBONES:  # the one whose trunk it fills exactly, names and shapes (ResNeXt is wider than ResNet)
        with torch.device("meta"):  # names and shapes only
            own = getattr(torchvision.models, name)().state_dict()
        pattern = trunk_key(own)
        own = {k: v.shape for k, v in own.items() if pattern.match(k)}
        try:
            state, _, _ = extract_backbone_state(checkpoint, own)
        except CheckpointError:
            continue
        if {k: v.shape for k, v in state.items()} == own:
            return name
    raise CheckpointError(f"{where} holds no backbone of a known architecture ({', '.join(BACKBONES)})")


@torch.inference_mode()
def box_features(body, image, boxes, level, pool, max_side=0):
    """L2-normalised RoI features ``[N, C]`` of ``boxes`` (xyxy pixels, ``[N, 4]``) in ``image`` (RGB uint8)."""
    x = torch.from_numpy(image).permute(2, 0, 1).float().div_(255)
    scale = 1.0
    if max_side and max(x.shape[1:]) > max_side:
        scale = max_side / max(x.shape[1:])
        x = F.interpolate(x[None], scale_factor=scale, mode="bilinear", align_corners=False,
                          recompute_scale_factor=False)[0]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    feature = next(iter(body(((x - mean) / std)[None]).values()))  # [1, C, h, w]
    rois = torch.as_tensor(boxes, dtype=torch.float32) * scale
    pooled = roi_align(feature, [rois], output_size=pool, spatial_scale=1.0 / LEVEL_STRIDES[level],
                       sampling_ratio=2, aligned=True)  # [N, C, pool, pool]
    return F.normalize(pooled.mean(dim=(2, 3)), dim=1)


# ---- the cluster folder ---------------------------------------------------------------------------------------

def _cache_fingerprint(cache):
    """What the ids belong to: the cache's settings and its boxes per image."""
    counts = hashlib.sha256()
    for key in cache.keys:
        boxes = cache.get(key)
        counts.update(f"{key}:{0 if boxes is None else len(boxes)};".encode())
    return {"cache_settings": cache.settings, "images": len(cache.keys), "box_counts_sha256": counts.hexdigest()}


def _write_json(path, obj):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def open_cluster_folder(cache, cache_dir, settings, overwrite=False):
    """Create ``<cache>/clusters/index.json`` or check the one there: the same settings and the same boxes.
    Returns the index. ``overwrite`` deletes a folder made otherwise."""
    folder = cluster_dir(cache_dir)
    index = {"format": FORMAT, "version": VERSION, "settings": settings, **_cache_fingerprint(cache)}
    path = os.path.join(folder, "index.json")
    if os.path.isfile(path):
        old = json.load(open(path))
        same = {k: old.get(k) for k in index} == index
        if not same and not overwrite:
            diff = [k for k in index if old.get(k) != index[k]]
            detail = {k: (old.get("settings", {}).get(k), settings[k]) for k in settings
                      if old.get("settings", {}).get(k) != settings[k]}
            raise ProposalCacheError(
                f"{folder} was made with other settings or for other boxes ({', '.join(diff)}"
                f"{'; ' + ', '.join(f'{k} {a!r} -> {b!r}' for k, (a, b) in detail.items()) if detail else ''}); "
                f"pass --overwrite to replace it")
        if not same:
            for name in os.listdir(folder):
                if name.endswith(".npz") or name.endswith(".png"):
                    os.unlink(os.path.join(folder, name))
    _write_json(path, index)
    return index


def _fit(cache, records, body, settings, log):
    """PCA and k-means on the boxes of a seeded random sample of images. Returns them and the sampled
    images' features ``{key: [N, C]}``, which the assignment pass reuses instead of computing them again."""
    g = np.random.default_rng(settings["seed"])
    feats, total = {}, 0
    for i in g.permutation(len(cache.keys)):
        key = cache.keys[i]
        boxes = cache.get(key)
        if boxes is None or not len(boxes):
            continue
        try:
            image = read_rgb(records[key])
        except ImageReadError:  # named and counted by the assignment pass
            continue
        feats[key] = box_features(body, image, boxes, settings["level"], settings["pool"], settings["max_side"])
        total += len(boxes)
        if total >= settings["sample"]:
            break
    if not feats:
        raise ValueError("no boxes to cluster: every image of the cache failed or has no proposal")
    x = torch.cat(list(feats.values()))[:settings["sample"]]
    log(f"fitting PCA ({x.shape[1]} -> {min(settings['dims'], *x.shape)} dims) and k-means (k = {settings['k']}) "
        f"on {len(x)} boxes of {len(feats)} images")
    mean, components = fit_pca(x, settings["dims"])
    centres = kmeans(project(x, mean, components), settings["k"], settings["iters"], settings["seed"])
    return mean, components, centres, feats


def cluster_cache(cache_dir, records, init, k, level="C4", pool=7, dims=256, sample=200_000, seed=0, iters=50,
                  max_side=0, overwrite=False, log=print, progress=True):
    """Give every box of the cache at ``cache_dir`` a cluster id (see the module docstring); ``records`` maps a
    cache key to its image path. Resumes a killed run; a finished folder is left as it is. Returns the
    cluster sizes ``[k]``."""
    cache = ProposalCache(cache_dir)
    missing = [key for key in cache.keys if key not in records]
    if missing:
        raise ValueError(f"{len(missing)} cache keys have no image (first: {missing[0]}); check --images")
    if dims < 1 or pool < 1 or sample < 1:
        raise ValueError("--dims, --pool and --sample must be positive")
    # What index.json records; another value of any of them is another clustering (init_sha256: the stage-1
    # checkpoint file's digest, or the torchvision weights' name).
    settings = dict(k=k, level=level, pool=pool, dims=min(dims, 256), sample=sample, seed=seed, iters=iters,
                    max_side=max_side, init_sha256=file_sha256(init) if os.path.isfile(init) else init)
    index = open_cluster_folder(cache, cache_dir, settings, overwrite)
    folder = cluster_dir(cache_dir)
    body = load_feature_body(init, level)
    model_path = os.path.join(folder, "model.npz")
    sampled = {}  # features already computed for the fit
    if os.path.isfile(model_path):
        model = np.load(model_path)
        mean, components, centres = (torch.from_numpy(model[n]) for n in ("mean", "components", "centres"))
    else:
        mean, components, centres, sampled = _fit(cache, records, body, settings, log)
        atomic_write(model_path, lambda f: np.savez(f, mean=mean.numpy(), components=components.numpy(),
                                                    centres=centres.numpy()))
    shards = num_shards(len(cache.keys), cache.shard_size)
    todo = [j for j in range(shards) if not os.path.isfile(os.path.join(folder, shard_name(j)))]
    skipped = 0
    for j in tqdm(todo, desc="assigning clusters (shards)", disable=not progress or not todo):
        keys = cache.keys[j * cache.shard_size:(j + 1) * cache.shard_size]
        ids, offsets = [], [0]
        for key in keys:
            boxes = cache.get(key)
            n = 0 if boxes is None else len(boxes)
            if n:
                try:
                    feats = sampled.pop(key, None)
                    if feats is None:
                        feats = box_features(body, read_rgb(records[key]), boxes, level, pool, max_side)
                    ids.append(assign(project(feats, mean, components), centres).numpy().astype(np.int32))
                except ImageReadError as e:  # the box keeps no class: DETR pre-training skips the image
                    skipped += 1
                    log(f"skipped {key}: {e}")
                    ids.append(np.full(n, -1, np.int32))
            offsets.append(offsets[-1] + n)
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int32)
        atomic_write(os.path.join(folder, shard_name(j)),
                     lambda f: np.savez_compressed(f, keys=np.array(keys), offsets=np.array(offsets), ids=ids))
    if skipped:
        log(f"{skipped} unreadable images: their boxes have id -1")
    return ClusterIds(cache_dir, k=k, index=index).sizes()


class ClusterIds:
    """The cluster id of every box of a cache, in the cache's box order: ``get(key)`` -> int64 ``[N]``
    (-1 for the boxes of an image that could not be read when clustering)."""

    def __init__(self, cache_dir, k=None, index=None):
        folder = cluster_dir(cache_dir)
        path = os.path.join(folder, "index.json")
        hint = (f"run python -m aligndet.data.proposals cluster --cache {cache_dir} --init <stage-1 checkpoint> "
                f"--k <clusters>")
        if not os.path.isfile(path):
            raise ProposalCacheError(f"{cache_dir} has no pseudo-classes (no {path}): {hint}")
        self.index = index or json.load(open(path))
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ProposalCacheError(f"{path} is not an {FORMAT} v{VERSION} index")
        self.k = self.index["settings"]["k"]
        if k is not None and k != self.k:
            raise ProposalCacheError(f"{folder} holds {self.k} clusters, not {k}")
        cache = ProposalCache(cache_dir)
        if cache.settings != self.index["cache_settings"] or len(cache.keys) != self.index["images"]:
            raise ProposalCacheError(f"{folder} was made for other proposals than those now in {cache_dir}: "
                                     f"{hint} --overwrite")
        self.shard_size = cache.shard_size
        self.keys = cache.keys
        self._position = {key: i for i, key in enumerate(cache.keys)}
        shards = num_shards(len(cache.keys), cache.shard_size)
        absent = [j for j in range(shards) if not os.path.isfile(os.path.join(folder, shard_name(j)))]
        if absent:
            raise ProposalCacheError(f"{folder} is incomplete ({len(absent)} of {shards} shards missing): {hint}, "
                                     f"which resumes it")
        self._shards = [dict(np.load(os.path.join(folder, shard_name(j)))) for j in range(shards)]

    def get(self, key, num_boxes=None):
        """The ids of image ``key``'s boxes; ``num_boxes`` (the cache's count) is checked when given."""
        i = self._position[key]
        shard = self._shards[i // self.shard_size]
        j = i % self.shard_size
        ids = shard["ids"][shard["offsets"][j]:shard["offsets"][j + 1]].astype(np.int64)
        if num_boxes is not None and len(ids) != num_boxes:
            raise ProposalCacheError(f"{key}: {len(ids)} cluster ids for {num_boxes} proposals; the cache changed "
                                     f"after clustering: run the cluster command again with --overwrite")
        return ids

    def sizes(self):
        """Boxes per cluster ``[k]`` (boxes with id -1 not counted)."""
        ids = np.concatenate([s["ids"] for s in self._shards]) if self._shards else np.zeros(0, np.int32)
        return np.bincount(ids[ids >= 0], minlength=self.k)


def size_histogram(sizes, bins=8):
    """Text lines: the cluster sizes' extremes, then how many clusters fall in each of ``bins`` equal size ranges."""
    sizes = np.asarray(sizes)
    lines = [f"{len(sizes)} clusters, {int(sizes.sum())} boxes: smallest {int(sizes.min())}, median "
             f"{int(np.median(sizes))}, largest {int(sizes.max())}, empty {int((sizes == 0).sum())}"]
    counts, edges = np.histogram(sizes, bins=min(bins, len(sizes)))
    width = max(int(counts.max()), 1)
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        lines.append(f"  {int(np.ceil(lo)):>8d}-{int(hi):<8d} boxes: {c:4d} clusters {'#' * round(40 * c / width)}")
    return lines


def cluster_picture(cache_dir, records, out, clusters=8, per_cluster=8, tile=48, seed=0):
    """A PNG grid: one row per cluster (the ``clusters`` largest), ``per_cluster`` random crops of its boxes."""
    from PIL import Image, ImageDraw

    ids = ClusterIds(cache_dir)
    cache = ProposalCache(cache_dir)
    sizes = ids.sizes()
    rows = [int(c) for c in np.argsort(-sizes, kind="stable")[:clusters] if sizes[c] > 0]
    members = {c: [] for c in rows}
    for key in cache.keys:  # every (key, box index) of the shown clusters
        for b, c in enumerate(ids.get(key)):
            if int(c) in members:
                members[int(c)].append((key, b))
    g = np.random.default_rng(seed)
    label = 64
    picture = Image.new("RGB", (label + per_cluster * (tile + 2), len(rows) * (tile + 2)), "white")
    draw = ImageDraw.Draw(picture)
    for r, c in enumerate(rows):
        draw.text((4, r * (tile + 2) + tile // 2 - 6), f"#{c} ({sizes[c]})", fill=(0, 0, 0))
        chosen = g.choice(len(members[c]), size=min(per_cluster, len(members[c])), replace=False)
        for col, m in enumerate(sorted(chosen)):
            key, b = members[c][m]
            x1, y1, x2, y2 = (int(round(v)) for v in cache.get(key)[b])
            crop = Image.fromarray(read_rgb(records[key])).crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))
            picture.paste(crop.resize((tile, tile)), (label + col * (tile + 2), r * (tile + 2)))
    atomic_write(out, lambda f: picture.save(f, format="PNG"))
    return out


# ---- the command line: python -m aligndet.data.proposals cluster ----------------------------------------------

def run_cluster(args):
    """The ``cluster`` subcommand: cluster the cache, print the size histogram, draw the crops."""
    from aligndet.data.images import list_images
    from aligndet.data.proposals import DEMO_SPLITS

    if args.images is None:
        demo = {os.path.normpath(out): images for images, _, out in DEMO_SPLITS.values()}
        if os.path.normpath(args.cache) not in demo:
            raise ValueError("--images is required for a cache outside the demo dataset")
        args.images = demo[os.path.normpath(args.cache)]
    records = {r.key: r.path for r in list_images(args.images, args.json)}
    sizes = cluster_cache(args.cache, records, args.init, args.k, args.level, args.pool, args.dims, args.sample,
                          args.seed, args.iters, args.max_side, args.overwrite)
    print("\n".join(size_histogram(sizes)))
    picture = cluster_picture(args.cache, records, args.picture or os.path.join(cluster_dir(args.cache),
                                                                                "clusters.png"))
    print(f"cluster ids in {cluster_dir(args.cache)}; crops of the largest clusters: {picture}")
