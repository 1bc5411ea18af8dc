"""Mask R-CNN trains: it overfits one batch in mask AP, and finetune.py runs it on the demo from a
Faster R-CNN checkpoint (the mask head fresh), with mask AP in metrics.json; no masks, a clear error."""
import json
import os

import pytest
import torch

import finetune
from aligndet.checkpoint import save_checkpoint
from aligndet.data.masks import encode
from aligndet.evaluation import evaluate_detections
from aligndet.models import build_detector
from test_coco_data import ann, write_coco
from test_training import TINY, _coco_from_targets

SIZE = 96


def _discs_batch(n=4, seed=0):
    """Images with two discs each; a disc's channel is its class, its mask the disc (not its box)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    images, targets = [], []
    for _ in range(n):
        image = torch.rand(3, SIZE, SIZE, generator=g) * 0.3
        boxes, labels, masks = [], [], []
        for _ in range(2):
            r = int(torch.randint(10, 18, (1,), generator=g))
            cx, cy = torch.randint(r, SIZE - r, (2,), generator=g).tolist()
            c = int(torch.randint(0, 2, (1,), generator=g))
            disc = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
            image[c][disc] = 1.0
            rows, cols = torch.nonzero(disc, as_tuple=True)
            boxes.append([int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1])
            labels.append(c + 1)
            masks.append(disc)
        images.append(image)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                        "masks": torch.stack(masks).to(torch.uint8)})
    return images, targets


def test_overfits_one_batch_in_mask_ap():
    torch.manual_seed(0)
    images, targets = _discs_batch()
    coco = _coco_from_targets(targets, SIZE)
    annotations = iter(coco.dataset["annotations"])  # in target order: image by image, box by box
    for t in targets:
        for rle in encode(t["masks"].numpy()):
            next(annotations)["segmentation"] = rle
    coco.createIndex()
    model = build_detector("mask_rcnn", 2, backbone="resnet18", mask_layers=(32, 32), mask_hidden=32, **TINY)

    def mask_ap():
        model.eval()
        with torch.no_grad():
            return evaluate_detections(coco, dict(enumerate(model(images))), {1: 1, 2: 2}, verbose=False)

    before = mask_ap().get("mask_AP", 0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(60):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = mask_ap()
    assert before < 0.05 and after["mask_AP"] > 0.5 and after["AP"] > 0.5, (before, after)


def test_finetune_mask_rcnn_from_a_faster_rcnn_checkpoint(tiny_build, tmp_path, capsys):
    out, _ = tiny_build
    common = ["--demo-root", out, "--epochs", "1", "--batch-size", "4", "--workers", "0", "--warmup-iters", "2"]
    box = finetune.main(finetune.get_args_parser().parse_args(common + ["--output-dir", str(tmp_path / "frcnn")]))
    assert "mask_AP" not in box[0]
    # A Faster R-CNN checkpoint stands in for a train_box.py one (stage "box", detector faster_rcnn), with
    # the same keys under backbone / rpn / roi_heads: it is accepted for mask_rcnn, not refused as another detector's.
    state = torch.load(tmp_path / "frcnn" / "checkpoint.pth", weights_only=True)["model"]
    save_checkpoint({"model": state, "epoch": 1, "stage": "box", "args": {"detector": "faster_rcnn"}},
                    tmp_path / "box.pth")
    capsys.readouterr()
    run = tmp_path / "mask"
    metrics = finetune.main(finetune.get_args_parser().parse_args(
        common + ["--detector", "mask_rcnn", "--init", str(tmp_path / "box.pth"), "--output-dir", str(run)]))
    log = capsys.readouterr().out
    assert "roi_heads.mask_head" in log and "roi_heads.mask_predictor" in log
    assert 0.0 <= metrics[-1]["mask_AP"] <= 1.0 and "mask AP" in log
    with open(run / "metrics.json") as f:
        saved = json.load(f)[-1]
    assert {"AP", "AP50", "mask_AP", "mask_AP50", "mask_ARl"} <= set(saved)


def test_mask_rcnn_on_boxes_only_is_a_clear_error(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [1, 2, 10, 5]), ann(2, [0, 0, 8, 8])])
    data = ["--train-images", str(image_dir), "--train-json", str(ann_file), "--val-images", str(image_dir),
            "--val-json", str(ann_file), "--output-dir", str(tmp_path / "run"), "--detector", "mask_rcnn"]
    with pytest.raises(SystemExit, match="needs instance masks, but no annotation .* has a usable 'segmentation'"):
        finetune.main(finetune.get_args_parser().parse_args(data))
    assert os.path.isdir(image_dir)


def test_train_box_points_mask_rcnn_to_the_faster_rcnn_stage():
    import train_box

    with pytest.raises(SystemExit, match="box-domain stage is Faster R-CNN's.*--detector faster_rcnn"):
        train_box.main(train_box.get_args_parser().parse_args(["--detector", "mask_rcnn"]))


def test_two_gloo_processes_fine_tune_and_evaluate_masks(tiny_build, tmp_path):
    """finetune.py --detector mask_rcnn under torchrun on 2 CPU processes: DDP training, masks gathered for COCO eval."""
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(root, "finetune.py"), "--detector", "mask_rcnn", "--demo-root", tiny_build[0], "--epochs", "1",
           "--batch-size", "2", "--max-iters", "2", "--workers", "0", "--warmup-iters", "1", "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), batch 4" in result.stdout and "mask AP" in result.stdout
    with open(out / "metrics.json") as f:
        final = json.load(f)[-1]
    assert final["images"] == 4 and 0.0 <= final["mask_AP"] <= 1.0  # every val scene, from both ranks
