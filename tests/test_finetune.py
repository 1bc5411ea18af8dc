"""finetune.py end to end: training, COCO evaluation, checkpoints, resume,
low-data splits, and two processes under torchrun."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import finetune
from aligndet.checkpoint import load_checkpoint
from aligndet.data.coco import collate_fn
from aligndet.engine import EpochBatches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--min-size", "96", "--max-size", "96", "--fpn-channels", "32", "--representation-size", "64",
         "--batch-size", "4", "--workers", "0", "--warmup-iters", "2", "--print-freq", "1"]


def _data_args(paths):
    return ["--train-json", paths["train_json"], "--train-images", paths["train_images"],
            "--val-json", paths["val_json"], "--val-images", paths["val_images"]]


def _run(argv):
    return finetune.main(finetune.get_args_parser().parse_args(argv))


def test_finetune_trains_evaluates_and_resumes(squares_coco, tmp_path):
    out = str(tmp_path / "run")
    argv = _data_args(squares_coco) + SMALL + ["--epochs", "2", "--eval-every", "1", "--output-dir", out]
    metrics = _run(argv)
    assert [m["epoch"] for m in metrics] == [1, 2]
    with open(os.path.join(out, "metrics.json")) as f:
        saved = json.load(f)
    assert saved == metrics
    for m in saved:
        assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"} <= set(m)
        assert m["images"] == 12  # every val image evaluated
    ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 0 and ckpt["args"]["epochs"] == 2
    assert ckpt["label_to_cat"] == {1: 3, 2: 7}  # non-contiguous category ids map back
    with open(os.path.join(out, "log.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert {line["epoch"] for line in lines} == {0, 1}
    assert all("loss" in line for line in lines if "iter" in line)

    # Resume to a third epoch: only epoch 2 is trained, the metrics history is kept.
    metrics = _run(argv[:-4] + ["--epochs", "3", "--output-dir", out, "--resume"])
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    with open(os.path.join(out, "log.jsonl")) as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert epochs.count(2) >= 1 and epochs.count(0) == epochs.count(1) >= 1
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["epoch"] == 3


def test_mid_epoch_checkpoint_resumes_at_the_next_batch(squares_coco, tmp_path):
    out = str(tmp_path / "run")
    argv = _data_args(squares_coco) + SMALL + ["--epochs", "1", "--checkpoint-every", "1", "--max-iters", "2",
                                                 "--output-dir", out, "--eval-every", "5"]
    _run(argv)
    # The mid-epoch checkpoint was overwritten by the epoch-end one; check the batch arithmetic directly.
    args = finetune.get_args_parser().parse_args(_data_args(squares_coco) + SMALL)
    train_set, _ = finetune.build_datasets(args)
    batches = EpochBatches(train_set, 4, 0, rank=0, world_size=1, seed=0, shuffle=True, collate_fn=collate_fn)
    full = [t for _, targets in batches.loader(epoch=1) for t in targets]
    tail = [t for _, targets in batches.loader(epoch=1, start=1) for t in targets]
    assert [t["image_id"] for t in full[4:]] == [t["image_id"] for t in tail]
    other_epoch = [t["image_id"] for _, targets in batches.loader(epoch=2) for t in targets]
    assert sorted(other_epoch) == sorted(t["image_id"] for t in full) and other_epoch != [t["image_id"] for t in full]


def test_label_fraction_subset(squares_coco):
    args = finetune.get_args_parser().parse_args(_data_args(squares_coco) + ["--label-fraction", "0.5", "--fold", "1"])
    train_set, val_set = finetune.build_datasets(args)
    again, _ = finetune.build_datasets(args)
    assert len(train_set) == 6 and train_set.ids == again.ids
    assert len(val_set) == 12


def test_partial_data_arguments_exit_clearly(squares_coco):
    with pytest.raises(SystemExit, match="give all of"):
        _run(["--train-json", squares_coco["train_json"]])


def test_two_process_ddp_run(squares_coco, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
           os.path.join(ROOT, "finetune.py")] + _data_args(squares_coco) + SMALL + [
        "--epochs", "1", "--batch-size", "2", "--max-iters", "3", "--output-dir", out]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), batch 4" in result.stdout
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics[-1]["images"] == 12  # both ranks' detections gathered on rank 0
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["epoch"] == 1


def test_init_skip_needs_a_detector_checkpoint(squares_coco, tmp_path):
    """--init-skip names detector modules: with backbone weights alone it is refused, with a detector it applies."""
    import torchvision
    from aligndet.checkpoint import CheckpointError
    backbone = tmp_path / "stage1.pth"
    torch.save({"backbone": torchvision.models.resnet18().state_dict()}, backbone)
    argv = _data_args(squares_coco) + SMALL + ["--init", str(backbone), "--init-skip", "rpn."]
    args = finetune.get_args_parser().parse_args(argv)
    with pytest.raises(CheckpointError, match="--init-skip needs a detector checkpoint"):
        finetune.build_model(args, num_classes=3, log=lambda *a: None)
    detector = tmp_path / "detector.pth"
    source = finetune.build_model(finetune.get_args_parser().parse_args(_data_args(squares_coco) + SMALL), 3,
                                  log=lambda *a: None)
    torch.save({"model": source.state_dict()}, detector)
    args = finetune.get_args_parser().parse_args(argv[:-4] + ["--init", str(detector), "--init-skip", "rpn."])
    model = finetune.build_model(args, num_classes=3, log=lambda *a: None)
    own, src = model.state_dict(), source.state_dict()
    assert all(not torch.equal(own[k], src[k]) for k in own if k.startswith("rpn.") and k.endswith("weight"))
    assert torch.equal(own["backbone.fpn.layer_blocks.0.0.weight"], src["backbone.fpn.layer_blocks.0.0.weight"])


def test_box_init_skip_defaults_follow_the_preset(squares_coco, tmp_path):
    """The demo one-stage presets leave a box-domain checkpoint's classification tower out (docs/method.md §7);
    Faster R-CNN and --preset coco transfer everything; an empty --box-init-skip restores the full transfer; and
    the preset's value is no error with backbone weights (the stage-1-only arm of a comparison)."""
    import torchvision
    parse = finetune.get_args_parser().parse_args
    data = _data_args(squares_coco)
    assert parse(data + ["--detector", "fcos"]).box_init_skip == ["head.classification_head."]
    assert parse(data + ["--detector", "retinanet"]).box_init_skip == ["head.classification_head."]
    assert parse(data + ["--detector", "fcos", "--box-init-skip"]).box_init_skip == []
    assert not parse(data).box_init_skip
    assert not parse(data + ["--detector", "fcos", "--preset", "coco"]).box_init_skip
    backbone = tmp_path / "stage1.pth"
    torch.save({"backbone": torchvision.models.resnet18().state_dict()}, backbone)
    args = parse(data + ["--detector", "fcos", "--fpn-channels", "32", "--min-size", "64", "--max-size", "64",
                         "--init", str(backbone)])
    model = finetune.build_model(args, num_classes=3, log=lambda *a: None)
    assert torch.equal(model.backbone.body.conv1.weight,
                       torch.load(backbone, weights_only=True)["backbone"]["conv1.weight"])


def test_a_finetuned_checkpoint_rebuilds_its_detector_and_draws_detections(squares_coco, tmp_path, capsys):
    from PIL import Image

    from aligndet import pipeline
    from aligndet.checkpoint import CheckpointError, load_finetuned_detector

    out = tmp_path / "demo"
    for run in ("ft_a", "ft_b"):  # the pipeline's two fine-tuning folders
        _run(_data_args(squares_coco) + SMALL + ["--epochs", "1", "--max-iters", "1", "--output-dir", str(out / run)])
    path = out / "ft_a" / "checkpoint.pth"
    model, names, label_to_cat = load_finetuned_detector(path)
    ckpt = torch.load(path, weights_only=True)
    assert not model.training and label_to_cat == {1: 3, 2: 7} and names == ckpt["class_names"] and len(names) == 2
    state = model.state_dict()
    assert state.keys() == ckpt["model"].keys() and all(torch.equal(v, ckpt["model"][k]) for k, v in state.items())

    png = pipeline.detections_picture(str(out), squares_coco["val_json"], squares_coco["val_images"], count=2,
                                      threshold=0.0)
    image = Image.open(png)
    assert image.size == (3 * 96 * 3 + 2 * 8, 24 + 2 * 96 * 3 + 8)  # 3 columns, 2 scenes, magnified 3x

    # python -m aligndet.predict: results json with the data's category ids, pictures, AP, unreadable files named
    from aligndet import predict
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in sorted(os.listdir(squares_coco["val_images"]))[:2]:
        shutil.copy(os.path.join(squares_coco["val_images"], name), folder / name)
    (folder / "broken.png").write_bytes(b"not an image")
    outputs = predict.main(["--checkpoint", str(path), "--images", str(folder), "--out", str(tmp_path / "d.json"),
                            "--draw", str(tmp_path / "pictures"), "--score-threshold", "0", "--draw-threshold", "0"])
    assert len(outputs) == 2 and len(os.listdir(tmp_path / "pictures")) == 2
    results = json.load(open(tmp_path / "d.json"))
    assert results and {r["category_id"] for r in results} <= {3, 7} and {r["image_id"] for r in results} <= {1, 2}
    predict.main(["--checkpoint", str(path), "--images", squares_coco["val_images"], "--json",
                  squares_coco["val_json"], "--out", str(tmp_path / "val.json")])
    printed = capsys.readouterr().out
    assert "broken.png: cannot read image" in printed and "1 images could not be read" in printed
    assert "12 images" in printed and "COCO AP " in printed

    torch.save({"stage": "box", "args": {"detector": "faster_rcnn"}}, tmp_path / "box.pth")
    with pytest.raises(CheckpointError, match="not a finetune.py checkpoint"):
        load_finetuned_detector(tmp_path / "box.pth")


def test_voc_sets_train_by_iterations_and_evaluate(squares_coco, tmp_path):
    """--voc-root: the sets converted to COCO json in the output folder; --iterations counts 16-image steps,
    scaled to the real batch, and stops mid-epoch; the classes must be VOC's unless --voc-classes data."""
    from aligndet.data.voc import coco_to_voc

    root = str(tmp_path / "VOCdevkit")
    coco_to_voc(squares_coco["train_json"], squares_coco["train_images"], root, "2007", "trainval")
    coco_to_voc(squares_coco["val_json"], squares_coco["val_images"], root, "2007", "test")
    out = str(tmp_path / "run")
    voc = ["--voc-root", root, "--train-sets", "2007-trainval", "--val-set", "2007-test", "--output-dir", out]
    with pytest.raises(ValueError, match="pass --voc-classes data"):
        _run(voc + SMALL)
    # batch 4: 2 iterations of 16 images are 8 steps, 3 per epoch of 12 images, so epoch 2 stops after 2
    metrics = _run(voc + SMALL + ["--voc-classes", "data", "--iterations", "2", "--lr-step-iterations", "1",
                                  "--lr", "0.02", "--eval-every", "5"])
    assert [m["epoch"] for m in metrics] == [3] and {"AP", "AP50", "AP75"} <= set(metrics[0])
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [(r["epoch"], r["iter"], r["lr"]) for r in map(json.loads, f) if "iter" in r]
    assert [(e, i) for e, i, _ in steps] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    base = 0.02 * 4 / 16
    assert steps[3][2] == pytest.approx(base) and steps[4][2] == pytest.approx(base * 0.1)  # step at 4 = 1 x 16 / 4
    with open(os.path.join(out, "voc_train.json")) as f:
        assert [c["name"] for c in json.load(f)["categories"]] == ["class3", "class7"]
    assert load_checkpoint(os.path.join(out, "checkpoint.pth"))["class_names"] == ["class3", "class7"]
