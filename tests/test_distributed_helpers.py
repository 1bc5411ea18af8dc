"""aligndet.distributed: no-ops in one process, real collectives under torchrun (gloo)."""
import torch

from aligndet import distributed as D
from conftest import run_gloo_workers


def test_single_process_helpers_are_no_ops(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = D.init_distributed(device="cpu")
    assert info == {"rank": 0, "world_size": 1, "local_rank": 0, "device": torch.device("cpu")}
    assert not D.is_dist()
    assert D.get_rank() == 0 and D.get_world_size() == 1 and D.is_main_process()
    D.barrier()
    obj = {"a": [1, 2]}
    assert D.all_gather_object(obj) == [obj]
    losses = {"loss_a": torch.tensor(1.5), "loss_b": torch.tensor(0.25)}
    assert D.reduce_dict(losses) == losses
    assert D.reduce_dict(losses, average=False) == losses
    D.cleanup()


WORKER = """
import torch
from aligndet import distributed as D
info = D.init_distributed(device="cpu")
rank, world = info["rank"], info["world_size"]
assert D.is_dist() and D.get_rank() == rank and D.get_world_size() == world == 2
assert D.is_main_process() == (rank == 0)
assert D.all_gather_object({"rank": rank}) == [{"rank": 0}, {"rank": 1}]
mean = D.reduce_dict({"x": torch.tensor(float(rank)), "y": torch.tensor(2.0)})
total = D.reduce_dict({"x": torch.tensor(float(rank))}, average=False)
assert mean["x"].item() == 0.5 and mean["y"].item() == 2.0 and total["x"].item() == 1.0

# CocoEvaluator merges ranks and counts an image seen on two ranks once.
from pycocotools.coco import COCO
from aligndet.evaluation import CocoEvaluator
coco = COCO()
coco.dataset = {"images": [{"id": 1, "width": 50, "height": 50}, {"id": 2, "width": 50, "height": 50}],
                "annotations": [{"id": 1, "image_id": 1, "bbox": [5, 5, 20, 20], "category_id": 7,
                                 "area": 400, "iscrowd": 0},
                                {"id": 2, "image_id": 2, "bbox": [10, 0, 30, 40], "category_id": 7,
                                 "area": 1200, "iscrowd": 0}],
                "categories": [{"id": 7, "name": "x"}]}
coco.createIndex()
dets = {1: {"boxes": torch.tensor([[5., 5, 25, 25]]), "scores": torch.ones(1), "labels": torch.tensor([1])},
        2: {"boxes": torch.tensor([[10., 0, 40, 40]]), "scores": torch.ones(1), "labels": torch.tensor([1])}}
evaluator = CocoEvaluator(coco, {1: 7})
ids = [1] if rank == 0 else [2, 1]
evaluator.update(ids, [dets[i] for i in ids])
stats = evaluator.summarize(verbose=False)
assert stats["AP"] == 1.0, stats
assert D.all_gather_object(stats)[0] == stats
D.barrier()
D.cleanup()
print("ok", rank)
"""


def test_two_gloo_processes():
    """The torchrun path: RANK/WORLD_SIZE in the environment, gloo on CPU."""
    run_gloo_workers(WORKER)
