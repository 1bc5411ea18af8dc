"""train_box.py under torchrun: two CPU processes (gloo) share one proposal cache, for every detector."""
import os
import subprocess
import sys

import pytest
import torch

from aligndet.data.images import list_images
from aligndet.data.proposals import PRESETS, build_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("detector, port", [("faster_rcnn", 29533), ("retinanet", 29534), ("fcos", 29535)])
def test_two_processes(squares_coco, tmp_path, detector, port):
    records = list_images(squares_coco["train_images"], squares_coco["train_json"])
    build_cache(records, str(tmp_path / "props"), PRESETS["demo"], workers=1, progress=False)
    out = str(tmp_path / "box")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, "train_box.py"), "--images", squares_coco["train_images"],
           "--json", squares_coco["train_json"], "--proposals", str(tmp_path / "props"),
           "--epochs", "1", "--batch-size", "2", "--max-iters", "2", "--workers", "0", "--num-samples", "16",
           "--output-dir", out, "--detector", detector]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), batch 4" in result.stdout
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["stage"] == "box" and ckpt["detector"] == detector
    assert any(k.startswith("momentum.") for k in ckpt["pretrain"])
