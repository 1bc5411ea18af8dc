"""The shared command line (presets as parser defaults) and the one training loop:
what --help shows, that flags win over presets, that a second parse starts from
the parser's own defaults, and the loop's contract (loss dict, weight_dict,
after_step, --max-iters, periodic and non-finite checkpoints)."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import finetune
import train_box
from aligndet.checkpoint import RunCheckpoint, load_checkpoint
from aligndet.cli import PresetParser
from aligndet.engine import (EpochBatches, JsonLog, NonFiniteLossError, iteration_epochs, scaled_iterations,
                             step_schedule_optimizer, train_one_epoch)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parser():
    presets = {"small": dict(width=8, lr=0.1), "large": dict(width=64)}
    p = PresetParser("toy", preset_keys=("preset",), presets=lambda preset: presets[preset])
    p.add_argument("--preset", choices=sorted(presets), default="small")
    p.add_argument("--width", type=int, help="layer width")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate")
    return p


def test_presets_are_defaults_flags_win_and_parses_do_not_leak():
    p = _parser()
    assert vars(p.parse_args([])) == {"preset": "small", "width": 8, "lr": 0.1}
    assert p.parse_args(["--preset", "large"]).width == 64
    assert p.parse_args(["--preset", "large"]).lr == 1.0  # "large" sets no lr: the parser's own default, not small's
    assert p.parse_args(["--preset", "small", "--width", "3"]).width == 3
    assert p.parse_args(["--preset=large"]).width == 64


def test_help_shows_the_value_of_the_chosen_preset(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--preset", "large", "--help"])
    out = capsys.readouterr().out
    assert "layer width (default: 64)" in out


def test_a_preset_naming_an_unknown_option_is_refused():
    p = PresetParser("toy", preset_keys=("preset",), presets=lambda preset: {"nope": 1})
    p.add_argument("--preset", default="a")
    with pytest.raises(KeyError, match="nope"):
        p.parse_args([])


def test_script_help_shows_preset_and_detector_values():
    """finetune.py --help prints what --preset coco --detector fcos will use."""
    out = subprocess.run([sys.executable, "finetune.py", "--preset", "coco", "--detector", "fcos", "--help"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120).stdout
    flat = " ".join(out.split())
    assert "width of the FPN levels and of the heads (default: 256)" in flat
    assert "(scaled to the real batch) (default: 0.01)" in flat  # the one-stage lr
    assert "(faster_rcnn) (default: None)" in flat  # an option FCOS does not have
    demo = train_box.get_args_parser().parse_args(["--detector", "fcos"])
    assert demo.num_samples == 2048 and demo.backbone == "resnet18"
    assert finetune.get_args_parser().parse_args([]).fpn_channels == 32


def test_the_voc_preset_is_the_official_recipe_and_train_box_has_none():
    parse = finetune.get_args_parser().parse_args
    frcnn = parse(["--preset", "voc"])
    assert frcnn.min_size == list(range(480, 801, 32)) and frcnn.max_size == 1333 and frcnn.backbone == "resnet50"
    assert (frcnn.iterations, frcnn.lr_step_iterations, frcnn.lr, frcnn.batch_size) == (12000, [9000, 11000], 0.02, 2)
    fcos = parse(["--preset", "voc", "--detector", "fcos"])
    assert (fcos.lr, fcos.clip_grad_norm, fcos.iterations) == (0.01, 35.0, 12000)
    detr = parse(["--preset", "voc", "--detector", "detr"])
    assert (detr.iterations, detr.epochs, detr.lr_steps, detr.clip_grad_norm, detr.optimizer) == (0, 100, [70], 0.0,
                                                                                                  "adamw")
    assert detr.min_size == frcnn.min_size  # the same multi-scale pipeline
    with pytest.raises(SystemExit):  # pre-training for VOC is COCO's (the paper's transfer)
        train_box.get_args_parser().parse_args(["--preset", "voc"])


def test_an_iteration_schedule_is_scaled_to_the_batch_and_ends_mid_epoch():
    assert scaled_iterations(12000, 2) == 96000 and scaled_iterations(12000, 16) == 12000
    assert iteration_epochs(96000, 1034) == (93, 96000 - 92 * 1034) and iteration_epochs(8, 4) == (2, 4)
    args = argparse.Namespace(lr=0.02, batch_size=2, momentum=0.9, weight_decay=1e-4, warmup_iters=0, lr_steps=[1],
                              iterations=12000, lr_step_iterations=[9000, 11000])
    _, lr_fn = step_schedule_optimizer(nn.Linear(2, 1), args, 1, 1034)
    assert lr_fn(71999) == pytest.approx(0.0025) and lr_fn(72000) == pytest.approx(0.00025)
    assert lr_fn(88000) == pytest.approx(0.000025)  # epoch-based --lr-steps are not used
    loader = EpochBatches(Pairs(), 3, 0, 0, 1, 0, shuffle=False, collate_fn=_collate).loader(0, start=1, stop=3)
    assert len(loader) == 4 and loader.stop == 3 and [x[:, 0].tolist() for x, _ in loader] == [[3, 4, 5], [6, 7, 8]]


class Toy(nn.Module):
    """A model the loop can run: model(x, y) -> loss dict, with a weight_dict and after_step."""

    def __init__(self, weight_dict=None):
        super().__init__()
        self.linear = nn.Linear(2, 1)
        self.weight_dict = weight_dict or {"loss_mse": 2.0}
        self.steps = []

    def forward(self, x, y):
        loss = ((self.linear(x).squeeze(1) - y) ** 2).mean()
        return {"loss_mse": loss, "error": loss.detach().sqrt()}

    def after_step(self, step):
        self.steps.append(step)
        return {"after": float(step)}


class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.tensor([float(i), 1.0]), torch.tensor(float(i % 3))


def _collate(items):
    xs, ys = zip(*items)
    return torch.stack(xs), torch.stack(ys)


def test_loop_weights_losses_calls_after_step_and_caps_iterations(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = EpochBatches(Pairs(), 2, 0, rank=0, world_size=1, seed=0, shuffle=True, collate_fn=_collate,
                           max_iters=3)
    assert len(batches) == 3  # --max-iters caps the epoch in one place
    args = argparse.Namespace(epochs=2)
    checkpoint = RunCheckpoint(str(tmp_path), model, optimizer, None, args, "toy", every=2)
    means = train_one_epoch(model, optimizer, batches.loader(epoch=1), torch.device("cpu"), 1, lambda s: 0.01,
                            checkpoint=checkpoint)
    assert model.steps == [4, 5, 6]  # global optimiser steps of epoch 1, counted from 1
    assert means["loss"] == pytest.approx(2.0 * means["loss_mse"])  # weighted by weight_dict
    assert means["after"] == pytest.approx(5.0)  # what after_step returns is logged
    saved = load_checkpoint(tmp_path / "checkpoint.pth")
    assert saved["epoch"] == 1 and saved["iteration"] == 2 and saved["stage"] == "toy"

    resumed = Toy()
    RunCheckpoint(str(tmp_path), resumed, torch.optim.SGD(resumed.parameters(), lr=0.01), None, args,
                  "toy").resume("auto", log=lambda *a: None)
    assert torch.equal(resumed.linear.weight, saved["model"]["linear.weight"])
    with pytest.raises(Exception, match="not a stage-'other' checkpoint \\(stage 'toy'\\)"):
        RunCheckpoint(str(tmp_path), resumed, optimizer, None, args, "other").resume("auto", log=lambda *a: None)


def test_epoch_record_keeps_full_means_and_the_console_line_rounds_them(tmp_path):
    log = JsonLog(str(tmp_path / "log.jsonl"))
    line = log.write_epoch(3, 12.345, {"loss": 1.23456789, "loss_box": 0.000123456789})
    log.close()
    assert json.loads(line) == {"epoch": 3, "loss": 1.2346, "loss_box": 0.00012346}
    [record] = [json.loads(r) for r in open(tmp_path / "log.jsonl")]
    assert record == {"epoch": 3, "epoch_time": 12.3, "train_loss": 1.23456789, "train_loss_box": 0.000123456789}


def test_loop_refuses_an_unweighted_loss_and_saves_before_a_nonfinite_step(tmp_path):
    model = Toy(weight_dict={"loss_other": 1.0})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    batches = EpochBatches(Pairs(), 2, 0, rank=0, world_size=1, seed=0, shuffle=False, collate_fn=_collate)
    with pytest.raises(KeyError, match="loss_mse"):
        train_one_epoch(model, optimizer, batches.loader(), torch.device("cpu"), 0, lambda s: 0.01)

    model = Toy()
    before = model.linear.weight.detach().clone()
    checkpoint = RunCheckpoint(str(tmp_path), model, torch.optim.SGD(model.parameters(), lr=0.01), None,
                               argparse.Namespace(), "toy")
    with pytest.raises(NonFiniteLossError, match="iteration 0.*Weights before this step"):
        train_one_epoch(_NaN(model), checkpoint.optimizer, batches.loader(), torch.device("cpu"), 0,
                        lambda s: 0.01, checkpoint=checkpoint)
    saved = load_checkpoint(tmp_path / "checkpoint_before_nonfinite.pth")
    assert torch.equal(saved["model"]["linear.weight"], before) and model.steps == []


class _NaN(nn.Module):
    """``model`` whose loss is NaN."""

    def __init__(self, model):
        super().__init__()
        self.model, self.weight_dict = model, model.weight_dict

    def forward(self, x, y):
        out = self.model(x, y)
        return {**out, "loss_mse": out["loss_mse"] * float("nan")}


def test_workers_auto_means_none_on_a_cpu_and_counts_are_checked(tmp_path):
    from aligndet.cli import workers_count
    from aligndet.engine import default_workers, start_run

    assert workers_count("auto") == "auto" and workers_count("0") == 0 and workers_count("3") == 3
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="auto or a number"):
            workers_count(bad)
    assert default_workers(torch.device("cpu")) == 0 and default_workers(torch.device("cuda")) == 2
    args = finetune.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--device", "cpu"])
    assert args.workers == "auto"
    start_run(args)
    assert args.workers == 0
    args = train_box.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--device", "cpu",
                                                   "--workers", "2"])
    start_run(args)
    assert args.workers == 2


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_multi_tensor_optimiser_steps_equal_the_per_tensor_loop(kind):
    """step_schedule_optimizer uses the multi-tensor (foreach) update on every device; its parameters after a few
    steps are those of torch's per-tensor loop, bit for bit, with a backbone group at another lr."""
    def train(foreach):
        torch.manual_seed(0)
        model = nn.ModuleDict({"backbone": nn.Linear(6, 8), "head": nn.Linear(8, 3)})
        args = argparse.Namespace(lr=0.02, batch_size=16, optimizer=kind, momentum=0.9, weight_decay=1e-4,
                                  backbone_lr_mult=0.1, warmup_iters=0, lr_steps=[])
        optimizer, _ = step_schedule_optimizer(model, args, 1, 10)
        assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2] and optimizer.defaults["foreach"]
        if not foreach:
            for group in optimizer.param_groups:
                group["foreach"] = False
        x = torch.randn(20, 6, generator=torch.Generator().manual_seed(1))
        for _ in range(10):
            loss = model["head"](model["backbone"](x).relu()).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(train(True), train(False))
