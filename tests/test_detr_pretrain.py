"""DETR's box-domain pre-training (docs/method.md §3.9): both Hungarian passes against brute force, the
copied query_embed, the pseudo-classes through the two views, the transfer to fine-tuning, and train_box.py
--detector detr in one process and under torchrun (gloo), into finetune.py --detector detr.

A ResNet-18, hidden width 32, two decoder layers and four queries keep the unit tests fast; the script runs use
the demo DETR (width 64, 10 queries, frozen C4) on 96 px squares with their ground-truth boxes as proposals.
"""
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.ops import box_convert, generalized_box_iou

import finetune
import train_box
from aligndet.checkpoint import load_checkpoint, load_pretrained
from aligndet.data.clusters import cluster_cache
from aligndet.data.images import ImageRecord, list_images
from aligndet.data.proposal_cache import import_coco_json
from aligndet.data.views import TwoViewDataset, build_view_transform, two_view_collate
from aligndet.models import build_detr
from aligndet.pretrain.box import AlignDet
from aligndet.pretrain.hooks import detr_box_domain, detr_embedding_head
from aligndet.pretrain.momentum import MomentumUpdater, make_momentum_copy
from conftest import fake_runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(min_size=64, max_size=96, num_queries=4, enc_layers=1, dec_layers=2, hidden_dim=32, nheads=4,
            dim_feedforward=64, norm="bn", trainable_layers=5)


def tiny_detr(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return build_detr(num_classes, "resnet18", **TINY)


# ----------------------------------------------------------------------------- the two matching passes


def brute_force(cost):
    """The query of each target (a tuple, one per column of ``cost`` [Q, N]) of least total cost, by enumeration."""
    queries, targets = cost.shape
    return min(itertools.permutations(range(queries), targets),
               key=lambda perm: sum(float(cost[q, j]) for j, q in enumerate(perm)))


def test_both_matching_passes_match_brute_force():
    """Pass 1 (the set loss) matches with class 1 + L1 5 + GIoU 2 against the pseudo-classes, pass 2 (the
    contrastive ids) with L1 5 + GIoU 2 alone, at every decoder layer, on boxes normalised by each image's own
    size in a padded batch of two."""
    detr = tiny_detr().eval()  # no dropout: the captured head outputs are what the hook matched
    with torch.no_grad():
        detr.class_embed.weight.mul_(100)  # confident classes, so that the class term changes the matching
        detr.bbox_embed.layers[-1].weight.mul_(3)  # boxes spread over the image
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 56, generator=g)]
    proposals = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 78.0, 40.0], [10.0, 30.0, 50.0, 62.0]]),
                  "ids": torch.tensor([0, 1, 2]), "classes": torch.tensor([2, 0, 2])},
                 {"boxes": torch.tensor([[8.0, 8.0, 30.0, 60.0], [20.0, 30.0, 54.0, 70.0]]),
                  "ids": torch.tensor([3, 4]), "classes": torch.tensor([1, 2])}]
    captured = {}
    detr.class_embed.register_forward_hook(lambda m, i, o: captured.update(logits=o.detach()))
    detr.bbox_embed.register_forward_hook(lambda m, i, o: captured.update(boxes=o.detach().sigmoid()))
    batch, sizes, targets = detr.transform(images, proposals, resize=False)
    features = detr.backbone.body(batch)
    out = detr_box_domain(detr, features, sizes, batch.shape[-2:], targets, detr_embedding_head(detr, 16))

    logits, boxes = captured["logits"], captured["boxes"]                    # [L, B, Q, K + 1], [L, B, Q, 4]
    layers, _, queries = boxes.shape[:3]
    assert out["embeddings"].shape == (layers * 2 * queries, 16) and out["ids"].shape == (layers * 2 * queries,)
    expected_ids = torch.full((layers, 2, queries), -1)
    differ, num_boxes = 0, 5
    for layer in range(layers):
        suffix = "" if layer == layers - 1 else f"_{layer}"
        l1_sum, classes = 0.0, torch.full((2, queries), detr.num_classes)
        for b, ((h, w), p) in enumerate(zip(sizes, proposals)):
            target = box_convert(p["boxes"], "xyxy", "cxcywh") / torch.tensor([w, h, w, h])  # this image's size
            l1 = torch.cdist(boxes[layer, b], target, p=1)
            giou = generalized_box_iou(box_convert(boxes[layer, b], "cxcywh", "xyxy"), box_convert(target, "cxcywh",
                                                                                                   "xyxy"))
            prob = logits[layer, b].softmax(-1)[:, p["classes"]]
            pass1 = brute_force(-prob + 5 * l1 - 2 * giou)
            pass2 = brute_force(5 * l1 - 2 * giou)
            differ += pass1 != pass2
            expected_ids[layer, b, list(pass2)] = p["ids"]
            classes[b, list(pass1)] = p["classes"]
            l1_sum += sum(float(l1[q, j]) for j, q in enumerate(pass1))
        weight = torch.ones(detr.num_classes + 1)
        weight[-1] = 0.1
        assert out["losses"]["loss_bbox" + suffix].item() == pytest.approx(l1_sum / num_boxes, rel=1e-5)
        ce = F.cross_entropy(logits[layer].transpose(1, 2), classes, weight)
        assert out["losses"]["loss_ce" + suffix].item() == pytest.approx(float(ce), rel=1e-5)
    assert torch.equal(out["ids"].view(layers, 2, queries), expected_ids)
    assert differ > 0, "the class term never changed a matching: the test cannot tell the passes apart"

    momentum = detr_box_domain(detr, features, sizes, batch.shape[-2:],
                               [{k: p[k] for k in ("boxes", "ids")} for p in targets], detr_embedding_head(detr, 16),
                               with_losses=False)  # the momentum view: ids without classes or losses
    assert momentum["losses"] == {} and torch.equal(momentum["ids"], out["ids"])
    with pytest.raises(ValueError, match="pseudo-classes"):
        detr_box_domain(detr, features, sizes, batch.shape[-2:],
                        [{k: p[k] for k in ("boxes", "ids")} for p in targets], detr_embedding_head(detr, 16))


# ----------------------------------------------------------------------------- the momentum detector


def test_query_embed_is_copied_and_the_rest_averaged():
    model = AlignDet(tiny_detr(), embed_dim=16, total_steps=10)
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))  # the optimiser moved the online detector
    old = {n: p.clone() for n, p in model.momentum.named_parameters()}
    m = model.momentum_update(3)
    assert 0.996 < m < 1
    online = dict(model.online.named_parameters())
    for name, p in model.momentum.named_parameters():
        if name.startswith("query_embed."):
            assert torch.equal(p, online[name]), name
        else:
            torch.testing.assert_close(p, m * old[name] + (1 - m) * online[name], rtol=0, atol=1e-6, msg=name)
            assert not torch.equal(p, online[name]), name
    assert [n for n in old if n.startswith("query_embed.")] == ["query_embed.weight"]
    # The updater's option on its own, and a prefix that names nothing.
    online_net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    target = make_momentum_copy(online_net)
    with torch.no_grad():
        online_net[1].weight.add_(1.0)
    MomentumUpdater(online_net, target, base=0.5, schedule="constant", copy_params=("1.",)).update(0)
    assert torch.equal(target[1].weight, online_net[1].weight) and torch.equal(target[0].weight, online_net[0].weight)
    with pytest.raises(ValueError, match="starts with query_embed"):
        MomentumUpdater(online_net, target, copy_params=("query_embed.",))


# ----------------------------------------------------------------------------- data


class Lookup:
    """``get(key, num_boxes)`` over a dict, as the proposal cache and ``ClusterIds`` give them."""

    def __init__(self, values):
        self.values = values

    def get(self, key, num_boxes=None):
        value = self.values[key]
        assert num_boxes is None or num_boxes == len(value)
        return value


def test_two_views_carry_each_proposals_pseudo_class(tmp_path):
    """Classes follow their boxes through the invalid-box filter, the cap and a crop that drops boxes from one view;
    boxes of class -1 are dropped, and an image left with none is skipped and counted."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        records.append(ImageRecord(f"{i}.png", str(tmp_path / f"{i}.png"), i + 1))
    boxes = np.array([[0, 0, 10, 10], [5, 5, 3, 3], [10, 10, 30, 30], [2, 20, 20, 40], [30, 0, 60, 20],
                      [40, 20, 64, 48], [1, 1, 63, 47]], dtype=np.float32)  # row 1 is inverted: dropped
    classes = np.array([4, 9, -1, 1, 2, 3, 0])

    def dataset():
        return TwoViewDataset(records, Lookup({"0.png": boxes, "1.png": boxes[:3]}),
                              build_view_transform(short_sides=(48,), max_size=64, crop=True, crop_scale=(0.3, 0.5)),
                              max_proposals=4, select="first",
                              classes=Lookup({"0.png": classes, "1.png": np.array([-1, 5, -1])}), skip_empty=True)

    counted = dataset()
    assert counted[0]["num_proposals"] == 4 and counted[1] is None  # image 1: no box with a class
    counts = counted.summary()
    assert (counts["invalid_proposals"], counts["unclassified_proposals"], counts["capped_proposals"],
            counts["kept_proposals"], counts["empty_images"], counts["skipped_empty_images"]) == (2, 3, 1, 4, 1, 1)
    views = dataset()
    kept = torch.tensor([4, 1, 2, 3])  # rows 0, 3, 4, 5: valid, classified, the first four
    dropped_somewhere = False
    for epoch in range(4):
        views.set_epoch(epoch)
        for view in views[0]["views"]:
            assert torch.equal(view["classes"], kept[view["ids"]])
            dropped_somewhere |= len(view["ids"]) < 4
    assert dropped_somewhere, "the crop never dropped a box: the test does not follow one"
    views1, _, metas = two_view_collate([views[0], views[1], views[0]])
    assert len(metas) == 2 and all("classes" in v for v in views1)


# ----------------------------------------------------------------------------- transfer


def test_box_checkpoint_transfers_all_but_the_class_head(tmp_path):
    model = AlignDet(tiny_detr(num_classes=5, seed=1), embed_dim=16)
    path = tmp_path / "box.pth"
    torch.save({**model.checkpoint_weights(), "stage": "box", "detector": "detr"}, path)
    stage2 = model.detector_state_dict()
    head = ["class_embed.bias", "class_embed.weight"]

    ft = tiny_detr(num_classes=2, seed=7)
    report = load_pretrained(ft, str(path), log=lambda *a: None, detector="detr")
    own = ft.state_dict()
    assert sorted(report["reinitialised"]) == head
    assert sorted(report["loaded"]) == sorted(k for k in own if k not in head)
    assert not report["unexpected"] and not report["mismatched"]  # the projector is not in "model"
    for prefix in ("backbone.body.", "input_proj.", "transformer.encoder.", "transformer.decoder.", "query_embed.",
                   "bbox_embed."):
        keys = [k for k in report["loaded"] if k.startswith(prefix)]
        assert keys and all(torch.equal(own[k], stage2[k]) for k in keys), prefix
    assert own["class_embed.weight"].shape == (3, 32)

    kept = load_pretrained(tiny_detr(num_classes=2, seed=7), str(path), keep_heads=True, log=lambda *a: None)
    assert sorted(m.split(" ")[0] for m in kept["mismatched"]) == head  # 5 + 1 pseudo-classes vs 2 + 1 classes


# ----------------------------------------------------------------------------- train_box.py


def _box_argv(data, cache, out, *extra):
    return ["--detector", "detr", "--images", data["train_images"], "--json", data["train_json"], "--proposals",
            cache, "--batch-size", "2", "--workers", "0", "--device", "cpu", "--output-dir", out, *extra]


def _finetune_data(data):
    return ["--detector", "detr", "--train-json", data["train_json"], "--train-images", data["train_images"],
            "--val-json", data["val_json"], "--val-images", data["val_images"]]


def test_box_presets_give_the_detr_recipe():
    parse = train_box.get_args_parser().parse_args
    coco = parse(["--detector", "detr", "--preset", "coco"])
    assert (coco.optimizer, coco.lr, coco.weight_decay, coco.clip_grad_norm, coco.warmup_iters, coco.epochs,
            coco.lr_steps, coco.max_proposals, coco.select, coco.num_samples) == \
        ("adamw", 5e-5, 1e-4, 0.1, 0, 50, [40], 50, "first", 0)
    demo = parse(["--detector", "detr"])
    assert (demo.optimizer, demo.clip_grad_norm, demo.select, demo.num_samples) == ("adamw", 0.1, "first", 0)
    from aligndet.presets import model_defaults
    assert demo.max_proposals < model_defaults("detr", "demo")["num_queries"]  # a query for every proposal
    frcnn = parse([])
    assert (frcnn.optimizer, frcnn.clip_grad_norm, frcnn.select) == ("sgd", 0.0, "random")


@pytest.mark.parametrize("max_proposals", ["queries", "0"])
def test_as_many_proposals_as_queries_are_refused_at_start_up(tmp_path, max_proposals):
    from aligndet.presets import model_defaults

    queries = model_defaults("detr", "demo")["num_queries"]
    max_proposals = str(queries) if max_proposals == "queries" else max_proposals
    args = train_box.get_args_parser().parse_args(["--detector", "detr", "--max-proposals", max_proposals,
                                                   "--output-dir", str(tmp_path / "box")])
    with pytest.raises(SystemExit, match=f"--max-proposals must be below DETR's {queries} queries"):
        train_box.main(args)
    assert not (tmp_path / "box").exists()  # refused before anything was made


@pytest.fixture(scope="module")
def clustered(squares_coco, tmp_path_factory):
    """The squares' training boxes as a proposal cache with 3 pseudo-classes, and the stage-1 ResNet-18."""
    tmp = tmp_path_factory.mktemp("detr_box")
    cache = str(tmp / "cache")
    import_coco_json(squares_coco["train_json"], cache)
    init = str(tmp / "stage1.pth")
    torch.manual_seed(0)
    torch.save({"backbone": {k: v for k, v in torchvision.models.resnet18().state_dict().items()
                             if not k.startswith("fc.")}}, init)
    records = {r.key: r.path for r in list_images(squares_coco["train_images"], squares_coco["train_json"])}
    unclustered = str(tmp / "unclustered")
    import_coco_json(squares_coco["train_json"], unclustered)
    cluster_cache(cache, records, init, k=3, progress=False, log=lambda *a: None)
    return {"cache": cache, "init": init, "unclustered": unclustered}


def test_a_cache_without_clusters_names_the_cluster_command(squares_coco, clustered, tmp_path):
    args = train_box.get_args_parser().parse_args(_box_argv(squares_coco, clustered["unclustered"], str(tmp_path)))
    with pytest.raises(SystemExit, match=r"train_box.py: error: .*python -m aligndet.data.proposals cluster --cache"):
        train_box.main(args)


def test_train_box_detr_writes_a_checkpoint_finetune_loads(squares_coco, clustered, tmp_path):
    out = str(tmp_path / "box")
    train_box.main(train_box.get_args_parser().parse_args(_box_argv(
        squares_coco, clustered["cache"], out, "--init", clustered["init"], "--epochs", "1", "--max-iters", "2",
        "--print-freq", "1")))
    ckpt = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert ckpt["stage"] == "box" and ckpt["detector"] == "detr"
    assert ckpt["model"]["class_embed.weight"].shape[0] == 3 + 1  # one class per cluster, and "no object"
    assert torch.equal(ckpt["pretrain"]["momentum.query_embed.weight"], ckpt["model"]["query_embed.weight"])
    assert any(k.startswith("online_embed.") for k in ckpt["pretrain"])
    with open(os.path.join(out, "log.jsonl")) as f:
        steps = [record for record in map(json.loads, f) if "iter" in record]
    assert len(steps) == 2
    for key in ("loss_ce", "loss_bbox", "loss_giou", "loss_giou_0", "contrastive_accuracy", "ema_momentum"):
        assert all(key in s and np.isfinite(s[key]) for s in steps), key

    args = finetune.get_args_parser().parse_args(_finetune_data(squares_coco) +
                                                 ["--init", os.path.join(out, "checkpoint.pth")])
    lines = []
    model = finetune.build_model(args, 2, lines.append)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in ckpt["model"].items() if not k.startswith("class_embed."))
    assert any("re-initialised" in line and "class_embed" in line for line in lines)


MASTER_PORTS = {"train_box": 29541, "finetune": 29542}  # not used by any other test


def _torchrun(script, argv, port):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           os.path.join(ROOT, script), *argv]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es), batch 4" in result.stdout
    return result.stdout


def test_two_process_gloo_runs_of_train_box_and_finetune(squares_coco, clustered, tmp_path):
    box = str(tmp_path / "box")
    _torchrun("train_box.py", _box_argv(squares_coco, clustered["cache"], box, "--init", clustered["init"],
                                        "--epochs", "1", "--max-iters", "2"), MASTER_PORTS["train_box"])
    ckpt = load_checkpoint(os.path.join(box, "checkpoint.pth"))
    assert ckpt["epoch"] == 1 and ckpt["detector"] == "detr"
    assert torch.equal(ckpt["pretrain"]["momentum.query_embed.weight"], ckpt["model"]["query_embed.weight"])
    ft = str(tmp_path / "ft")
    stdout = _torchrun("finetune.py", _finetune_data(squares_coco) + [
        "--init", os.path.join(box, "checkpoint.pth"), "--epochs", "1", "--max-iters", "2", "--batch-size", "2",
        "--workers", "0", "--max-val-images", "4", "--device", "cpu", "--output-dir", ft], MASTER_PORTS["finetune"])
    assert "re-initialised" in stdout and "class_embed" in stdout
    with open(os.path.join(ft, "metrics.json")) as f:
        assert json.load(f)[-1]["images"] == 4  # both ranks' detections gathered


# ----------------------------------------------------------------------------- the pipeline


def test_pipeline_clusters_the_proposals_before_detr_stage2(tmp_path, monkeypatch):
    from aligndet import pipeline

    calls = []
    fake_runs(monkeypatch, calls)
    out = str(tmp_path / "demo")
    seconds = pipeline.run_stages(out, 0.1, seed=0, detector="detr")
    assert list(seconds) == ["stage1", "proposals", "clusters", "stage2", "finetune_a", "finetune_b"]
    image_ckpt = os.path.join(out, "image", "checkpoint.pth")
    cluster = calls[2]
    assert cluster[:3] == ["-m", "aligndet.data.proposals", "cluster"]
    assert cluster[cluster.index("--init") + 1] == image_ckpt  # stage 1's features
    assert cluster[cluster.index("--cache") + 1] == "data/demo/proposals/train"  # the cache train_box.py reads
    assert int(cluster[cluster.index("--k") + 1]) > 1
    assert [c[c.index("--detector") + 1] for c in calls if "--detector" in c] == ["detr"] * 3
    a, b = calls[4], calls[5]
    assert a[a.index("--init") + 1] == image_ckpt and b[b.index("--init") + 1] == os.path.join(out, "box",
                                                                                               "checkpoint.pth")
    assert a[:a.index("--init")] == b[:b.index("--init")]  # one schedule for both
    calls.clear()
    assert pipeline.run_stages(out, 0.1, seed=0, detector="detr").keys() == seconds.keys() and calls == []

    for name, metrics in {"image": [{"epoch": 8, "top1": 0.8}], "ft_a": [{"epoch": 50, "AP": 0.1, "AP50": 0.2}],
                          "ft_b": [{"epoch": 50, "AP": 0.2, "AP50": 0.3}]}.items():
        os.makedirs(os.path.join(out, name), exist_ok=True)
        json.dump(metrics, open(os.path.join(out, name, "metrics.json"), "w"))
    text = pipeline.report(out, {"stage1": 60, "proposals": 60, "clusters": 60, "stage2": 120, "finetune_a": 60,
                                 "finetune_b": 60}, 0.1, detector="detr")
    assert "DETR R18 fine-tuned" in text and "clusters 1.0" in text
    assert "| (b) stage 1 + box-domain (AlignDet) | 0.200 | 0.300 | 5.0 | 1.0 |" in text
