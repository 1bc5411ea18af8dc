"""RetinaNet and FCOS through the scripts: train_box.py pre-trains them, finetune.py
takes the online detector with its final layers re-initialised, evaluates it,
and both refuse options or checkpoints of another detector with a clear message."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch

import finetune
import train_box
from aligndet.presets import model_options
from conftest import write_squares_coco

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(name, argv, expect_ok=True):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _finetune_args(paths, out, *extra):
    return ["--train-json", paths["train_json"], "--train-images", paths["train_images"],
            "--val-json", paths["val_json"], "--val-images", paths["val_images"], "--epochs", "1",
            "--max-iters", "2", "--batch-size", "2", "--workers", "0", "--max-val-images", "4",
            "--min-size", "64", "--max-size", "64", "--output-dir", str(out), "--device", "cpu", *extra]


@pytest.mark.parametrize("detector, heads, box_extra", [
    ("retinanet", ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"], []),
    ("fcos", ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
              "head.regression_head.bbox_ctrness"], ["--cls-centerness", "--embed-kernel", "3"]),
])
def test_pretrain_then_finetune(tmp_path, detector, heads, box_extra):
    paths = write_squares_coco(str(tmp_path / "data"), num_images=4, size=64)
    box = tmp_path / "box"
    _script("train_box.py", ["--detector", detector, "--images", paths["train_images"], "--json",
                             paths["train_json"], "--proposals", str(tmp_path / "props"), "--proposal-preset", "demo",
                             "--batch-size", "2", "--workers", "0", "--epochs", "1", "--max-iters", "2",
                             "--num-samples", "32", "--output-dir", str(box), "--device", "cpu", *box_extra])
    ckpt = torch.load(box / "checkpoint.pth", weights_only=True)
    assert ckpt["stage"] == "box" and ckpt["detector"] == detector
    assert any(k.startswith("head.regression_head.") for k in ckpt["model"])
    assert any(k.startswith("online_embed.") for k in ckpt["pretrain"])
    epochs = [json.loads(line) for line in open(box / "log.jsonl") if '"epoch_time"' in line]
    if "--cls-centerness" in box_extra:
        assert "online_embed.centerness.weight" in ckpt["pretrain"]
        assert ckpt["pretrain"]["online_embed.mlp.0.weight"].shape[-2:] == (3, 3)
        assert epochs[-1]["train_loss_centerness_cls"] > 0
        assert not [k for k in ckpt["model"] if "centerness" in k and "bbox_ctrness" not in k]
    else:
        assert "train_loss_centerness_cls" not in epochs[-1]

    result = _script("finetune.py", _finetune_args(paths, tmp_path / "ft", "--detector", detector,
                                                   "--init", str(box / "checkpoint.pth")))
    lines = result.stdout.splitlines()
    loaded = [line for line in lines if "loaded" in line and "detector weights" in line]
    reinit = [line for line in lines if "re-initialised" in line]
    assert loaded and "head:" in loaded[0] and "backbone.fpn:" in loaded[0]
    assert reinit and all(h in reinit[0] for h in heads)
    assert "unexpected" not in result.stdout and "shape mismatch" not in result.stdout
    final = torch.load(tmp_path / "ft" / "checkpoint.pth", weights_only=True)
    assert final["metrics"] and 0.0 <= final["metrics"][-1]["AP"] <= 1.0
    # The pre-trained towers arrived: the fine-tuned checkpoint started from them (one SGD step away).
    tower = "head.classification_head.conv.0.weight"
    assert torch.allclose(final["model"][tower], ckpt["model"][tower], atol=0.05)

    # The checkpoint of one detector is refused by another, with the flag to use.
    wrong = _script("finetune.py", _finetune_args(paths, tmp_path / "ft2", "--init", str(box / "checkpoint.pth")),
                    expect_ok=False)
    assert wrong.returncode != 0 and f"pass --detector {detector}" in wrong.stderr
    assert "Traceback" not in wrong.stderr


def test_options_of_another_detector_are_refused():
    args = finetune.get_args_parser().parse_args(["--detector", "retinanet", "--rpn-batch-size-per-image", "64"])
    with pytest.raises(ValueError, match="--rpn-batch-size-per-image does not apply to retinanet"):
        model_options(args.detector, vars(args))
    args = finetune.get_args_parser().parse_args(["--detector", "fcos", "--fpn-channels", "64"])
    options = model_options(args.detector, vars(args))
    assert options["fpn_channels"] == 64 and "rpn_batch_size_per_image" not in options
    assert options["anchor_sizes"] == (8, 16, 32, 64, 128)


def test_embedding_head_flags_of_another_detector_are_refused():
    def options(*argv):
        return train_box.embedding_head_options(train_box.get_args_parser().parse_args(list(argv)))

    assert options("--detector", "fcos", "--cls-centerness", "--embed-init-std", "0.01") == {
        "centerness": True, "init_std": 0.01}
    assert options("--detector", "retinanet", "--embed-kernel", "3") == {"kernel_size": 3}
    assert options() == {}
    with pytest.raises(ValueError, match="--cls-centerness is for --detector fcos"):
        options("--detector", "retinanet", "--cls-centerness")
    with pytest.raises(ValueError, match="dense detectors"):
        options("--embed-kernel", "3")


def test_presets_per_detector():
    parse = finetune.get_args_parser().parse_args
    frcnn = parse(["--preset", "coco"])
    retina = parse(["--preset", "coco", "--detector", "retinanet"])
    assert frcnn.lr == 0.02 and retina.lr == 0.01  # the official recipes at 16 images
    assert retina.rpn_batch_size_per_image is None and retina.anchor_sizes == [32, 64, 128, 256, 512]
    assert parse(["--detector", "retinanet", "--lr", "0.5"]).lr == 0.5  # flags win
    demo = parse(["--detector", "retinanet"])
    assert demo.lr == 0.02 and model_options("retinanet", vars(demo))["head_norm"] == "gn"
    assert model_options("retinanet", vars(parse(["--detector", "retinanet", "--preset", "coco"])))[
        "head_norm"] == "none"  # the standard RetinaNet for COCO
    with pytest.raises(ValueError, match="--head-norm does not apply to faster_rcnn"):
        model_options("faster_rcnn", vars(parse(["--head-norm", "gn"])))

    def box_args(*argv):
        return train_box.get_args_parser().parse_args(list(argv))

    assert box_args("--preset", "coco", "--detector", "retinanet").max_proposals == 50  # the paper's cap
    assert box_args("--preset", "coco", "--detector", "fcos").max_proposals == 0
    assert box_args("--preset", "coco", "--detector", "retinanet").lr == 0.01
    # train_box.py builds finetune.py's architecture for the same preset and detector.
    detector = train_box.build_detector_to_pretrain(box_args("--detector", "fcos"), log=lambda *a: None)
    assert detector.backbone.out_channels == 64  # GroupNorm on P7
    assert isinstance(box_args("--detector", "fcos"), argparse.Namespace)
