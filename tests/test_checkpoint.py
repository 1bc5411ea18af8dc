import argparse
import os
from pathlib import Path

import pytest
import torch

from aligndet.checkpoint import (CheckpointError, args_to_dict, latest_checkpoint,
                                 load_checkpoint, save_checkpoint)


def make_state():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}


def test_round_trip_weights_only(tmp_path):
    state = make_state()
    path = save_checkpoint(state, tmp_path / "nested" / "dir" / "checkpoint.pth")
    assert path.is_file()
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3
    for k, v in state["model"].items():
        torch.testing.assert_close(loaded["model"][k], v)
    assert loaded["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    torch.load(path, weights_only=True)  # readable without our helper


def test_atomic_write_leaves_no_temp_file(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pth")
    save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pth")  # overwrite
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 2


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint({"epoch": 1}, path)
    with pytest.raises(Exception):
        save_checkpoint({"bad": lambda: None}, path)  # lambdas cannot be pickled
    assert os.listdir(tmp_path) == ["checkpoint.pth"]
    assert load_checkpoint(path)["epoch"] == 1


def test_missing_file_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nope.pth")


def test_truncated_file_error(tmp_path):
    path = save_checkpoint(make_state(), tmp_path / "checkpoint.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="checkpoint.pth.*partial write"):
        load_checkpoint(path)


def test_namespace_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match="args_to_dict"):
        load_checkpoint(path)


def test_args_to_dict_round_trips(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/x"))
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--steps", type=int, nargs=2, default=(8, 11))
    parser.add_argument("--amp", action="store_true")
    parser.add_argument("--resume", default=None)
    args = parser.parse_args(["--amp"])
    args.dtype = torch.bfloat16
    d = args_to_dict(args)
    assert d == {"output_dir": "outputs/x", "lr": 0.02, "steps": [8, 11], "amp": True,
                 "resume": None, "dtype": "torch.bfloat16"}
    path = save_checkpoint({"args": d}, tmp_path / "checkpoint.pth")
    assert load_checkpoint(path)["args"] == d
    assert args_to_dict(d) == d


def test_latest_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert latest_checkpoint(tmp_path / "missing") is None
    save_checkpoint({"epoch": 0}, tmp_path / "checkpoint.pth")
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint.pth"
