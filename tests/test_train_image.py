"""train_image.py (stage 1): the image folder with bad input, supervised and MoCo v2
runs end to end, resume, and the hand-over of the backbone to the next stages."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

import train_image
from aligndet.checkpoint import CheckpointError, load_checkpoint, load_pretrained
from aligndet.data.image_folder import ImageFolder, collate_skipping
from aligndet.engine import cosine_lr
from aligndet.models import build_detector
from aligndet.models.weights import trunk_key
from conftest import write_image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "resnet18", "--crop-size", "32", "--val-resize", "32", "--batch-size", "4", "--workers", "0",
        "--print-freq", "1"]


def run_main(argv):
    args = train_image.get_args_parser().parse_args(argv)
    train_image.main(args)
    return args


def test_image_folder_names_empty_classes_and_skips_unreadable_files(tmp_path, capsys):
    root = write_image_folder(tmp_path / "train", classes=("cat", "dog"), per_class=3)
    os.makedirs(tmp_path / "train" / "empty")
    (tmp_path / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    data = ImageFolder(root, transform=torchvision.transforms.v2.Compose(
        [torchvision.transforms.v2.ToImage(), torchvision.transforms.v2.ToDtype(torch.float32, scale=True)]))
    assert data.classes == ["cat", "dog"] and data.empty_classes == ["empty"]
    assert "1 empty class folders skipped (empty)" in data.summary()
    assert data.labeled and len(data) == 7
    batch = collate_skipping([data[i] for i in range(len(data))])
    images, labels, skipped = batch
    assert skipped == 1 and images.shape == (6, 3, 32, 32)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert "broken.png" in capsys.readouterr().err
    # A batch of unreadable images only is empty, not an error.
    assert collate_skipping([None, None])[0] == [] and collate_skipping([None])[2] == 1

    val = ImageFolder(write_image_folder(tmp_path / "val", classes=("dog", "eel"), per_class=2), classes=data.classes)
    assert [label for _, label in val.samples] == [1, 1]  # the training set's index; 'eel' is skipped
    assert val.unknown_class_images == 2 and "not training classes" in val.summary()


def test_flat_folder_is_unlabeled_and_supervised_refuses_it(tmp_path):
    root = write_image_folder(tmp_path / "flat", classes=("x",), per_class=4)
    for name in os.listdir(os.path.join(root, "x")):
        os.rename(os.path.join(root, "x", name), os.path.join(root, name))
    os.rmdir(os.path.join(root, "x"))
    data = ImageFolder(root)
    assert not data.labeled and data.unlabeled == 4 and {label for _, label in data.samples} == {-1}
    with pytest.raises(ValueError, match="class folders"):
        run_main(["--train", root, "--output-dir", str(tmp_path / "out"), "--epochs", "1", *TINY])
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(str(tmp_path / "out"))


def test_cosine_lr_warms_up_then_decays_to_zero():
    assert cosine_lr(0, 1.0, 100, 10) == pytest.approx(0.001)
    assert cosine_lr(10, 1.0, 100, 10) == pytest.approx(1.0)
    assert cosine_lr(55, 1.0, 100, 10) == pytest.approx(0.5)
    assert cosine_lr(100, 1.0, 100, 10) == pytest.approx(0.0, abs=1e-12)
    lrs = [cosine_lr(i, 1.0, 100, 10) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_supervised_run_resumes_and_hands_its_backbone_to_the_detector(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=8)
    val = write_image_folder(tmp_path / "val", per_class=3, seed=1)
    out = tmp_path / "out"
    common = ["--train", train, "--val", val, "--output-dir", str(out), "--optimizer", "adamw", "--lr", "0.05",
              "--eval-every", "1", *TINY]
    run_main([*common, "--epochs", "1"])
    first = load_checkpoint(out / "checkpoint.pth")
    assert first["stage"] == "image" and first["method"] == "supervised" and first["epoch"] == 1
    assert first["classes"] == ["a", "b", "c"]
    assert not any(k.startswith("fc.") for k in first["backbone"])
    assert set(first["backbone"]) == {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    # Resume continues at epoch 1 and trains one more epoch (the weights move).
    run_main([*common, "--epochs", "2", "--resume"])
    second = load_checkpoint(out / "checkpoint.pth")
    assert second["epoch"] == 2 and len(second["history"]) == 2
    assert not torch.equal(first["backbone"]["layer4.1.conv2.weight"], second["backbone"]["layer4.1.conv2.weight"])
    metrics = json.load(open(out / "metrics.json"))
    assert [m["epoch"] for m in metrics] == [1, 2] and 0.0 <= metrics[-1]["top1"] <= 1.0
    lines = [json.loads(line) for line in open(out / "log.jsonl")]
    assert any("train_loss_ce" in line for line in lines) and any("acc_top1" in line for line in lines)

    # finetune.py / train_box.py --init read it: the detector's backbone equals the saved ResNet.
    detector = build_detector("faster_rcnn", 3, backbone="resnet18", norm="frozen_bn", fpn_channels=16,
                              representation_size=32)
    report = load_pretrained(detector, str(out / "checkpoint.pth"), log=lambda *a: None)
    body = detector.backbone.body.state_dict()
    for key, value in second["backbone"].items():
        if key in body:
            assert torch.equal(body[key], value), key
    assert len(report["loaded"]) >= 100


def test_resume_refuses_a_checkpoint_of_another_method(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=4)
    out = tmp_path / "out"
    run_main(["--train", train, "--output-dir", str(out), "--epochs", "1", "--max-iters", "1", *TINY])
    with pytest.raises(Exception, match="not a train_image.py --method mocov2 checkpoint"):
        run_main(["--train", train, "--output-dir", str(out), "--epochs", "1", "--max-iters", "1",
                  "--method", "mocov2", "--queue-size", "16", "--resume", *TINY])


def test_mocov2_run_reports_knn_and_keeps_its_queue(tmp_path):
    train = write_image_folder(tmp_path / "train", per_class=8)
    val = write_image_folder(tmp_path / "val", per_class=3, seed=1)
    out = tmp_path / "moco"
    run_main(["--method", "mocov2", "--train", train, "--val", val, "--output-dir", str(out), "--epochs", "1",
              "--queue-size", "16", "--shuffle-splits", "2", "--lr", "0.1", "--knn-k", "5", *TINY])
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert ckpt["method"] == "mocov2"
    assert any("queue" in k for k in ckpt["model"])
    assert set(ckpt["backbone"]) == {k for k in torchvision.models.resnet18().state_dict() if not k.startswith("fc.")}
    metrics = json.load(open(out / "metrics.json"))
    assert 0.0 <= metrics[-1]["knn_top1"] <= 1.0
    # The saved backbone is the query encoder's: it loads as a stage-1 backbone.
    resnet = torchvision.models.resnet18()
    missing, unexpected = resnet.load_state_dict(ckpt["backbone"], strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_help_shows_the_runbook():
    out = subprocess.run([sys.executable, "train_image.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0
    assert "torchrun --nproc_per_node 8 train_image.py" in out.stdout and "--method" in out.stdout


@pytest.mark.parametrize("method", ["supervised", "mocov2"])
def test_two_processes_under_torchrun(method, tmp_path):
    """DDP on CPU (gloo): both methods train, evaluate over both ranks and save one checkpoint."""
    train = write_image_folder(tmp_path / "train", per_class=6)
    val = write_image_folder(tmp_path / "val", per_class=3, seed=1)
    out = str(tmp_path / "out")
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(REPO, "train_image.py"), "--method", method, "--train", train, "--val", val,
           "--output-dir", out, "--epochs", "1", "--queue-size", "16", "--shuffle-splits", "2", "--knn-k", "3",
           *TINY]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), batch 8" in result.stdout
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt["epoch"] == 1 and ckpt["method"] == method
    metric = "top1" if method == "supervised" else "knn_top1"
    assert 0.0 <= json.load(open(os.path.join(out, "metrics.json")))[-1][metric] <= 1.0


def test_training_skips_and_counts_unreadable_images(tmp_path, capsys):
    train = write_image_folder(tmp_path / "train", per_class=4)
    (tmp_path / "train" / "b" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    os.makedirs(tmp_path / "train" / "empty_class")
    run_main(["--train", train, "--output-dir", str(tmp_path / "out"), "--epochs", "1", *TINY])
    printed = capsys.readouterr()
    assert "1 empty class folders skipped (empty_class)" in printed.out
    assert "epoch 0: 1 unreadable images skipped" in printed.out and "truncated.png" in printed.err
    epoch_line = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl") if "epoch_time" in line][-1]
    assert epoch_line["train_skipped_unreadable_images"] == 1
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pth")["classes"] == ["a", "b", "c"]


@pytest.mark.parametrize("method,arch", [("supervised", "mobilenet_v3_large"), ("supervised", "mobilenet_v2"),
                                         ("supervised", "swin_t"), ("supervised", "resnext50_32x4d"),
                                         ("mocov2", "convnext_tiny"), ("mocov2", "swin_t"),
                                         ("supervised", "convnext_small"), ("mocov2", "swin_s"),
                                         ("supervised", "swin_b")])
def test_other_families_train_in_stage_1_and_hand_their_trunk_to_a_detector(method, arch, tmp_path):
    """Stage 1 of every family: the checkpoint's backbone is the classifier's trunk (no head), which every
    detector's body loads whole."""
    train = write_image_folder(tmp_path / "train", per_class=4)
    out = tmp_path / "run"
    extra = ["--queue-size", "16", "--shuffle-splits", "2", "--knn-k", "3"] if method == "mocov2" else []
    run_main(["--method", method, "--train", train, "--val", train, "--output-dir", str(out), "--epochs", "1",
              "--max-iters", "2", *TINY[2:], "--arch", arch, *extra])
    ckpt = load_checkpoint(out / "checkpoint.pth")
    state = getattr(torchvision.models, arch)().state_dict()
    trunk = {k for k in state if trunk_key(state).match(k)}  # conv1 ... layer4, or features.*: no classifier
    assert set(ckpt["backbone"]) == trunk and ckpt["args"]["arch"] == arch
    model = build_detector("faster_rcnn", 2, backbone=arch, norm="bn", trainable_layers=5, min_size=64, max_size=64)
    report = load_pretrained(model, str(out / "checkpoint.pth"), log=lambda *a: None, backbone=arch)
    assert report["source"] == "backbone" and len(report["loaded"]) == len(trunk)
    with pytest.raises(CheckpointError, match=f"made on a {arch} backbone"):
        load_pretrained(build_detector("faster_rcnn", 2, backbone="resnet18"), str(out / "checkpoint.pth"),
                        log=lambda *a: None, backbone="resnet18")
