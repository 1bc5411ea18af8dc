"""Shared fixtures: small datasets made on the fly."""
import json
import os

# OpenMP threads that spin while waiting starve each other (and the scripts the tests start) on a busy
# 2-core machine; set before torch loads its OpenMP runtime, inherited by subprocesses.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def write_squares_coco(root, num_images=12, size=96, seed=0, category_ids=(3, 7)):
    """A COCO-format dataset of coloured squares (class = colour) with
    non-contiguous category ids. Returns a dict of the four finetune paths."""
    rng = np.random.default_rng(seed)
    paths = {}
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, anns = [], []
        for i in range(num_images):
            pixels = (rng.random((size, size, 3)) * 80).astype(np.uint8)
            for _ in range(int(rng.integers(1, 4))):
                s = int(rng.integers(18, 36))
                x, y = (int(v) for v in rng.integers(0, size - s, 2))
                c = int(rng.integers(0, len(category_ids)))
                pixels[y:y + s, x:x + s] = 0
                pixels[y:y + s, x:x + s, c] = 255
                anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": category_ids[c],
                             "bbox": [x, y, s, s], "area": s * s, "iscrowd": 0})
            Image.fromarray(pixels).save(os.path.join(root, split, f"{i:04d}.png"))
            images.append({"id": i + 1, "file_name": f"{i:04d}.png", "width": size, "height": size})
        cats = [{"id": c, "name": f"class{c}"} for c in category_ids]
        ann_file = os.path.join(root, f"instances_{split}.json")
        with open(ann_file, "w") as f:
            json.dump({"images": images, "annotations": anns, "categories": cats}, f)
        paths[f"{split}_json"], paths[f"{split}_images"] = ann_file, os.path.join(root, split)
    return paths


@pytest.fixture(scope="session")
def squares_coco(tmp_path_factory):
    return write_squares_coco(str(tmp_path_factory.mktemp("squares")))


def write_image_folder(root, classes=("a", "b", "c"), per_class=6, size=32, seed=0):
    """An ImageNet-style folder ``root/<class>/<i>.png``: class k is a bright square in
    colour channel k % 3 at a random place on dark noise. Returns ``root``."""
    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            pixels = (rng.random((size, size, 3)) * 60).astype(np.uint8)
            s = size // 2
            x, y = (int(v) for v in rng.integers(0, size - s, 2))
            pixels[y:y + s, x:x + s, k % 3] = 255
            Image.fromarray(pixels).save(os.path.join(root, name, f"{i:03d}.png"))
    return str(root)

def squares_views(num_images=2, size=64, num_proposals=6, seed=0, sides=(12, 28)):
    """``(views1, views2, metas)`` of images of coloured squares: view 1 is the
    image, view 2 its mirror with a brightness change; the proposals are the
    squares, ids offset per image as ``two_view_collate`` does."""
    g = torch.Generator().manual_seed(seed)
    views1, views2, metas, offset = [], [], [], 0
    for j in range(num_images):
        h, w = size, size + 16 * j  # different sizes: the batch is padded
        image = torch.rand(3, h, w, generator=g) * 0.3
        boxes = []
        for c in range(num_proposals):
            s = int(torch.randint(sides[0], sides[1], (1,), generator=g))
            x = int(torch.randint(0, w - s, (1,), generator=g))
            y = int(torch.randint(0, h - s, (1,), generator=g))
            # Each proposal sits on a square of its own colour, so instances differ.
            image[:, y:y + s, x:x + s] = (0.2 + 0.8 * torch.rand(3, 1, 1, generator=g))
            boxes.append([x, y, x + s, y + s])
        boxes = torch.tensor(boxes, dtype=torch.float32)
        ids = torch.arange(num_proposals, dtype=torch.int64) + offset
        flipped = boxes.clone()
        flipped[:, 0], flipped[:, 2] = w - boxes[:, 2], w - boxes[:, 0]
        views1.append({"image": image, "boxes": boxes, "ids": ids})
        views2.append({"image": (image.flip(-1) * 0.8 + 0.1), "boxes": flipped, "ids": ids.clone()})
        metas.append({"image_id": j + 1})
        offset += num_proposals
    return views1, views2, metas


def assert_same_detections(ours, theirs):
    """Two detectors' outputs on the same images agree: boxes, scores (and masks, where there are
    any) to 1e-4, labels exactly."""
    for a, b in zip(ours, theirs, strict=True):
        assert set(a) == set(b)
        assert a["boxes"].shape == b["boxes"].shape and a["boxes"].shape[0] > 0
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-4)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-4)
        assert torch.equal(a["labels"], b["labels"])
        if "masks" in a:
            torch.testing.assert_close(a["masks"], b["masks"], rtol=0, atol=1e-4)


def assert_no_detections(detections):
    for det in detections:
        assert det["boxes"].shape == (0, 4) and det["scores"].shape == (0,) and det["labels"].shape == (0,)
        assert det["labels"].dtype == torch.int64


def run_gloo_workers(code, world_size=2, timeout=120):
    """Run ``code`` (a python program) as ``world_size`` processes of one gloo process
    group, as torchrun would (RANK / WORLD_SIZE / MASTER_* in the environment), and
    check that rank r exited 0 and printed ``ok r``."""
    import socket
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([repo, os.path.join(repo, "tests"), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=repo, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, out
        assert f"ok {rank}" in out
    return outputs


class FakeProcess:
    """``subprocess.Popen`` for the side-by-side fine-tuning runs: records its argv (without the
    interpreter) and environment when started, and the order of starts and waits, in ``events``."""

    def __init__(self, events, codes):
        self.events, self.codes = events, codes

    def __call__(self, argv, cwd, env, stdout, stderr):
        self.argv, self.env, self.stdout = argv[1:], env, stdout
        self.events.append(("start", self))
        return self

    def wait(self):
        self.events.append(("wait", self))
        return self.codes.get(self.argv[self.argv.index("--output-dir") + 1].rsplit(os.sep, 1)[-1], 0)


def fake_runs(monkeypatch, calls, codes=None):
    """Every stage's argv in ``calls`` in the order started, whether run alone or side by side;
    returns the side-by-side events. ``codes``: exit code per fine-tuning folder name (ft_a ...)."""
    from aligndet import pipeline

    events = []
    monkeypatch.setattr(pipeline.subprocess, "call", lambda argv, cwd: calls.append(argv[1:]) or 0)

    def popen(argv, **kwargs):
        calls.append(argv[1:])
        return FakeProcess(events, codes or {})(argv, **kwargs)
    monkeypatch.setattr(pipeline.subprocess, "Popen", popen)
    return events


# A demo build of 8 + 4 scenes (tests/test_demo.py and the finetune.py tests that need real demo data).
TINY_DEMO = dict(num_train=8, num_val=4, num_objects_train=20, num_objects_val=10, progress=False)


@pytest.fixture(scope="session")
def parts():
    """The demo's real parts, fetched once into the user cache."""
    from aligndet.data import demo

    return demo.fetch_parts()


@pytest.fixture(scope="session")
def tiny_build(parts, tmp_path_factory):
    """(folder, manifest) of a tiny demo build, seed 0."""
    from aligndet.data import demo

    out = str(tmp_path_factory.mktemp("demo_a"))
    return out, demo.build_demo(out, seed=0, **TINY_DEMO)
