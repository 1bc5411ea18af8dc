"""Box-domain pre-training (AlignDet stage 2, docs/method.md §3) into
fine-tuning: the transfer of the online detector to a fine-tuning detector, and
the train_box.py -> finetune.py scripts (resume, fine-tuning from the stage-2
checkpoint, a non-finite loss stopping training).

Tiny images (64 px) and the small models of test_box_pretrain.py keep it fast.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import train_box
from aligndet.checkpoint import load_checkpoint, load_pretrained
from aligndet.data.images import list_images
from aligndet.data.proposals import PRESETS as PROPOSAL_PRESETS
from aligndet.engine import NonFiniteLossError
from aligndet.pretrain.losses import box_contrastive
from conftest import squares_views, write_squares_coco
from test_box_pretrain import CPU, NUM_SAMPLES, box_step, loss_sum, small_aligndet, small_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- transfer


def test_stage2_checkpoint_transfers_to_a_finetuning_detector(tmp_path):
    model = small_aligndet().train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    out, _ = box_step(model, squares_views(), CPU)
    loss_sum(out).backward()
    optimizer.step()
    model.momentum_update(1)
    path = tmp_path / "box.pth"
    state = model.state_dict()
    torch.save({"model": model.detector_state_dict(),  # as train_box.py saves it
                "pretrain": {k: v for k, v in state.items() if not k.startswith("online.")},
                "optimizer": optimizer.state_dict(), "epoch": 1, "iteration": 0, "stage": "box"}, path)
    stage2 = {k: v.clone() for k, v in model.detector_state_dict().items()}
    assert not [k for k in stage2 if "embed" in k]

    ft = small_detector(num_classes=3, seed=7)
    fresh = {k: v.clone() for k, v in ft.state_dict().items()}
    # A different initialisation and a training step: equal tensors below mean "loaded".
    assert all(not torch.equal(fresh[k], stage2[k]) for k in fresh if fresh[k].dim() > 1)
    lines = []
    report = load_pretrained(ft, str(path), log=lines.append)
    head = "roi_heads.box_predictor."
    for key, value in ft.state_dict().items():
        if key.startswith(head):
            assert torch.equal(value, fresh[key]), key
        else:
            assert torch.equal(value, stage2[key]), key
    heads = sorted(k for k in fresh if k.startswith(head))
    assert len(heads) == 4
    assert sorted(report["reinitialised"]) == heads
    assert not report["unexpected"] and not report["mismatched"]
    assert not [k for k in report["loaded"] if k.startswith(head) or "embed" in k]
    assert any(k.startswith("backbone.body.") for k in report["loaded"])
    assert any(k.startswith("rpn.") for k in report["loaded"])  # the RPN is kept whole
    assert any("re-initialised" in line and head in line for line in lines)

    ft2 = small_detector(num_classes=3, seed=7)
    report = load_pretrained(ft2, str(path), keep_heads=True, log=lambda *a: None)
    assert sorted(m.split(" ")[0] for m in report["mismatched"]) == heads  # 1 vs 3 classes
    for key, value in ft2.state_dict().items():
        if key.startswith(head):
            assert torch.equal(value, fresh[key]), key


# ----------------------------------------------------------------------------- scripts


def _train_box_args(paths, tmp, *extra):
    return ["--images", paths["train_images"], "--json", paths["train_json"], "--proposals", str(tmp / "props"),
            "--proposal-preset", "demo", "--batch-size", "2", "--workers", "0", "--output-dir",
            str(tmp / "box"), "--num-samples", str(NUM_SAMPLES), "--device", "cpu", *extra]


def _script(name, argv):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, os.path.join(ROOT, name), *argv], capture_output=True, text=True,
                            env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_train_box_resume_and_finetune_scripts(tmp_path):
    paths = write_squares_coco(str(tmp_path / "data"), num_images=6, size=64)
    out = tmp_path / "box"
    _script("train_box.py", _train_box_args(paths, tmp_path, "--epochs", "1", "--max-iters", "2"))

    assert (tmp_path / "props").is_dir() and os.listdir(tmp_path / "props")
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["stage"] == "box" and ckpt["epoch"] == 1
    assert ckpt["args"]["proposal_preset"] == "demo"  # what made the boxes travels with the weights
    assert ckpt["args"]["proposal_settings"] == PROPOSAL_PRESETS["demo"]
    assert {"model", "pretrain", "optimizer"} <= set(ckpt)
    assert any(k.startswith("backbone.body.") for k in ckpt["model"])
    assert any(k.startswith("roi_heads.box_head.") for k in ckpt["model"])
    assert any(k.startswith("online_embed.") for k in ckpt["pretrain"])
    assert not [k for k in ckpt["pretrain"] if k.startswith("online.")]
    with open(out / "log.jsonl") as f:
        lines = [json.loads(line) for line in f]
    steps = [line for line in lines if "loss_contrastive" in line]
    assert steps
    for key in ("loss_box_reg", "loss_objectness", "contrastive_accuracy", "matched_instances"):
        assert all(key in line for line in steps), key
    momenta = [line["ema_momentum"] for line in lines if "ema_momentum" in line]
    assert momenta and all(0.996 <= m <= 1 for m in momenta)

    stdout = _script("train_box.py", _train_box_args(paths, tmp_path, "--epochs", "2", "--max-iters", "2",
                                                     "--resume"))
    assert "resumed" in stdout and "epoch 1, iteration 0" in stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["epoch"] == 2
    with open(out / "log.jsonl") as f:
        epochs = [json.loads(line)["epoch"] for line in f]
    assert epochs.count(0) == len(lines) and epochs.count(1) >= 1  # epoch 0 not trained again

    stdout = _script("finetune.py", [
        "--train-json", paths["train_json"], "--train-images", paths["train_images"],
        "--val-json", paths["val_json"], "--val-images", paths["val_images"], "--init", str(out / "checkpoint.pth"),
        "--epochs", "1", "--max-iters", "2", "--batch-size", "2", "--workers", "0", "--max-val-images", "4",
        "--min-size", "64", "--max-size", "64", "--output-dir", str(tmp_path / "ft"), "--device", "cpu"])
    loaded = [line for line in stdout.splitlines() if "loaded" in line]
    reinit = [line for line in stdout.splitlines() if "re-initialised" in line]
    assert loaded and "detector weights" in loaded[0] and "rpn:" in loaded[0] and "roi_heads:" in loaded[0]
    assert reinit and "roi_heads.box_predictor" in reinit[0]
    assert "unexpected" not in stdout  # no embedding MLP in the online detector's weights
    assert (tmp_path / "ft" / "checkpoint.pth").is_file()


def test_nonfinite_loss_stops_training(tmp_path, monkeypatch):
    paths = write_squares_coco(str(tmp_path / "data"), num_images=4, size=64)
    real = box_contrastive

    def nan_loss(q, *args, **kwargs):
        return q.sum() * float("nan"), real(q, *args, **kwargs)[1]

    monkeypatch.setattr("aligndet.pretrain.box.box_contrastive", nan_loss)
    args = train_box.get_args_parser().parse_args(_train_box_args(paths, tmp_path, "--epochs", "1",
                                                                  "--max-iters", "2"))
    with pytest.raises(NonFiniteLossError) as info:
        train_box.main(args)
    message = str(info.value)
    # The first batch of epoch 0, in the sampler's order.
    records = list_images(paths["train_images"], paths["train_json"])
    sampler = torch.utils.data.DistributedSampler(records, num_replicas=1, rank=0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    first = [records[i].image_id for i in list(sampler)[:2]]
    assert "iteration 0" in message
    assert f"images {first}" in message, message
    assert re.search(r"loss_contrastive=nan", message)
    ckpt = load_checkpoint(tmp_path / "box" / "checkpoint_before_nonfinite.pth")
    assert ckpt["stage"] == "box"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())  # the NaN step was not applied


def test_train_box_recomputes_batch_norm_statistics_on_the_scenes(tmp_path, capsys):
    paths = write_squares_coco(str(tmp_path / "data"), num_images=4, size=64)
    common = ("--epochs", "1", "--lr", "0", "--weight-decay", "0", "--seed", "3")
    train_box.main(train_box.get_args_parser().parse_args(_train_box_args(paths, tmp_path, *common)))
    kept = load_checkpoint(tmp_path / "box" / "checkpoint.pth")["model"]
    args = train_box.get_args_parser().parse_args(
        _train_box_args(paths, tmp_path / "re", *common, "--bn-stats", "scenes", "--bn-batches", "2"))
    train_box.main(args)
    assert "batch-norm statistics recomputed on 2 batches" in capsys.readouterr().out
    recomputed = load_checkpoint(tmp_path / "re" / "box" / "checkpoint.pth")["model"]
    stats = [k for k in kept if k.startswith("backbone.body.") and "running_" in k]
    assert stats and all(not torch.equal(kept[k], recomputed[k]) for k in stats)
    weights = [k for k in kept if k.startswith("backbone.body.") and k.endswith(".weight")]
    assert weights and all(torch.equal(kept[k], recomputed[k]) for k in weights)  # the backbone stays frozen


def test_custom_images_get_the_official_proposal_filter(tmp_path, capsys):
    """Without --proposal-preset: demo for the demo dataset, coco for anything else, printed; small images get
    a note naming the flag."""
    paths = write_squares_coco(str(tmp_path / "data"), num_images=3, size=64)
    records = list_images(paths["train_images"], paths["train_json"])
    args = train_box.get_args_parser().parse_args(["--images", paths["train_images"]])
    assert args.proposal_preset is None  # no preset sets it: --preset demo must not pick the demo filter here
    train_box.resolve_proposal_preset(args, records, demo=False, main_proc=True)
    out = capsys.readouterr().out
    assert args.proposal_preset == "coco" and "coco (the default for your own images)" in out
    assert "shorter side is about 64 px" in out and "--proposal-preset demo" in out
    args = train_box.get_args_parser().parse_args([])
    train_box.resolve_proposal_preset(args, records, demo=True, main_proc=True)
    out = capsys.readouterr().out
    assert args.proposal_preset == "demo" and "the default for the demo dataset" in out and "note" not in out
    args = train_box.get_args_parser().parse_args(["--images", "x", "--proposal-preset", "demo"])
    train_box.resolve_proposal_preset(args, records, demo=False, main_proc=True)
    assert args.proposal_preset == "demo" and "demo (given)" in capsys.readouterr().out
