"""Box-domain pre-training (AlignDet stage 2, docs/method.md §3): what trains
and what stays frozen, the momentum detector, and the Faster R-CNN hook on edge
cases. The transfer to fine-tuning and the train_box.py -> finetune.py scripts
are in test_box_scripts.py.

Everything runs on tiny images (48-96 px) with a ResNet-18, 16 FPN channels
and 64-wide box heads, so the whole file stays well under a minute on 2 cores.
"""
import logging
import math

import pytest
import torch

from aligndet.data.images import list_images
from aligndet.data.views import TwoViewDataset, build_view_transform, two_view_collate
from aligndet.models import build_detector
from aligndet.models.faster_rcnn import FasterRCNN
from aligndet.models.transform import IMAGENET_MEAN, IMAGENET_STD, DetectionTransform
from aligndet.engine import batch_image_ids, to_device
from aligndet.pretrain.box import AlignDet
from aligndet.pretrain.hooks import HOOKS, faster_rcnn_box_domain
from aligndet.pretrain.momentum import momentum_at
from conftest import squares_views, write_squares_coco

CPU = torch.device("cpu")
TOTAL_STEPS = 10
NUM_SAMPLES = 16


def small_detector(num_classes=1, seed=0):
    torch.manual_seed(seed)
    return build_detector("faster_rcnn", num_classes, backbone="resnet18", norm="bn", trainable_layers=5,
                          fpn_channels=16, representation_size=64, min_size=64, max_size=96,
                          anchor_sizes=(8, 16, 32, 64, 128), rpn_pre_nms_top_n_train=100,
                          rpn_post_nms_top_n_train=50)


def small_aligndet(seed=0):
    return AlignDet(small_detector(seed=seed), embed_dim=32, total_steps=TOTAL_STEPS, num_samples=NUM_SAMPLES)


def loss_sum(out):
    return sum(v for k, v in out.items() if k.startswith("loss"))


def by_prefix(model, prefixes):
    return {n: p for n, p in model.named_parameters() if n.startswith(tuple(prefixes))}


def box_step(model, batch, device):
    """What the training loop does with a box-domain batch: (the model's outputs, the batch's image ids)."""
    return model(*to_device(batch, device)), batch_image_ids(batch)


ONLINE_BODY = "online.backbone.body."
CLASSIFIER = tuple("online." + c for c in HOOKS[FasterRCNN].classifier_layers)
MOMENTUM = ("momentum.", "momentum_embed.")


# ----------------------------------------------------------------------------- what trains


def test_two_view_dataset_batch_runs_through_the_model(tmp_path):
    """The real data path: TwoViewDataset -> two_view_collate -> the model, as the training loop runs it."""
    paths = write_squares_coco(str(tmp_path), num_images=2, size=64)
    records = list_images(paths["train_images"], paths["train_json"])
    boxes = {r.key: torch.tensor([[4, 4, 30, 30], [20, 10, 50, 44], [0, 30, 40, 63]]).numpy() for r in records}
    dataset = TwoViewDataset(records, boxes, build_view_transform(short_sides=(64, 72), max_size=96))
    views1, views2, metas = batch = two_view_collate([dataset[0], dataset[1]])
    assert torch.cat([v["ids"] for v in views1]).tolist() == [0, 1, 2, 3, 4, 5]  # unique across the batch
    model = small_aligndet().train()
    out, image_ids = box_step(model, batch, CPU)
    assert image_ids == [r.image_id for r in records]
    assert {"loss_contrastive", "loss_box_reg", "loss_objectness"} <= set(out)
    assert all(torch.isfinite(v).all() for v in out.values())
    assert out["instances"] > 0 and out["matched_instances"] > 0


def test_gradients_reach_only_the_online_neck_heads_and_embedding():
    model = small_aligndet().train()
    views1, views2, metas = squares_views()
    out, _ = box_step(model, (views1, views2, metas), CPU)
    assert out["loss_contrastive"] > 0
    loss_sum(out).backward()

    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad, "no gradient at all"
    for name in with_grad:
        assert name.startswith(("online.", "online_embed.")), name
        assert not name.startswith(ONLINE_BODY), name
        assert not name.startswith(CLASSIFIER), name
    # Every trainable tensor is reached, and only those are trainable.
    assert with_grad == trainable
    frozen = {**by_prefix(model, [ONLINE_BODY]), **by_prefix(model, MOMENTUM), **by_prefix(model, CLASSIFIER)}
    assert frozen and len(by_prefix(model, [ONLINE_BODY])) > 0 and len(by_prefix(model, MOMENTUM)) > 0
    for name, p in frozen.items():
        assert p.grad is None and not p.requires_grad, name
    for group in ("online.backbone.fpn.", "online.rpn.", "online.roi_heads.box_head.",
                  "online.roi_heads.box_predictor.bbox_pred.", "online_embed."):
        params = by_prefix(model, [group])
        assert params, group
        assert all(p.grad is not None for p in params.values()), group
        assert any(p.grad.abs().sum() > 0 for p in params.values()), group


def test_optimiser_step_and_momentum_update():
    model = small_aligndet().train()
    body = {n: p.detach().clone() for n, p in model.body.state_dict().items()}
    momentum = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(MOMENTUM)}
    online = dict(model.named_parameters())

    # The momentum detector starts as an exact copy of the online one (docs/method.md §3.1) ...
    for name, p in momentum.items():
        assert torch.equal(p, online["online" + name[len("momentum"):]]), name
    # ... shares no storage with it ...
    online_ptrs = {p.data_ptr() for n, p in model.named_parameters() if n.startswith(("online.", "online_embed."))}
    online_ptrs |= {b.data_ptr() for n, b in model.named_buffers() if n.startswith(("online.", "online_embed."))}
    momentum_tensors = [t for n, t in [*model.named_parameters(), *model.named_buffers()] if n.startswith(MOMENTUM)]
    assert momentum_tensors and not online_ptrs & {t.data_ptr() for t in momentum_tensors}
    # ... and has no backbone body of its own: both branches run the same body module.
    assert not [n for n, _ in model.momentum.named_parameters() if n.startswith("backbone.body.")]
    calls = []
    handle = model.body.register_forward_hook(lambda mod, inp, outp: calls.append(inp[0].shape))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    out, _ = box_step(model, squares_views(), CPU)
    handle.remove()
    assert len(calls) == 2  # view 1 for the online branch, view 2 for the momentum branch
    optimizer.zero_grad()
    loss_sum(out).backward()
    optimizer.step()

    for n, t in model.body.state_dict().items():
        assert torch.equal(t, body[n]), f"backbone.body.{n} changed in the optimiser step"
    for n, p in model.named_parameters():
        if n.startswith(MOMENTUM):
            assert torch.equal(p, momentum[n]), f"{n} changed in the optimiser step"
    moved = [n for n, p in model.named_parameters()
             if n.startswith(("online.", "online_embed.")) and p.requires_grad
             and not torch.equal(p, momentum["momentum" + n[len("online"):]])]
    assert moved, "the optimiser step changed no online parameter"

    step = 3
    m = model.momentum_update(step)
    assert m == pytest.approx(momentum_at(step, TOTAL_STEPS, 0.996))
    assert 0.996 < m < 1
    for name, old in momentum.items():
        new = dict(model.named_parameters())[name]
        target = online["online" + name[len("momentum"):]].detach()
        torch.testing.assert_close(new, m * old + (1 - m) * target, rtol=1e-5, atol=1e-7)
    for name in moved[:5]:  # the online parameters that moved pulled their momentum copies along
        mname = "momentum" + name[len("online"):]
        assert not torch.equal(dict(model.named_parameters())[mname], momentum[mname])
    # Buffers outside the body are copied; the body is untouched by the update.
    buffers = dict(model.named_buffers())
    for name, b in buffers.items():
        if name.startswith("momentum."):
            assert torch.equal(b, buffers["online." + name[len("momentum."):]]), name
    for n, t in model.body.state_dict().items():
        assert torch.equal(t, body[n]), f"backbone.body.{n} changed in the momentum update"


def test_body_stays_in_eval_mode_and_keeps_its_batch_norm_statistics():
    model = small_aligndet()
    model.train()
    assert not any(m.training for m in model.body.modules())
    assert model.online.backbone.fpn.training and model.online.rpn.training and model.online_embed.training
    stats = {n: b.clone() for n, b in model.body.named_buffers()}
    assert any("running_mean" in n for n in stats)
    box_step(model, squares_views(), CPU)
    for n, b in model.body.named_buffers():
        assert torch.equal(b, stats[n]), n
    model.eval()
    model.train(True)
    assert not any(m.training for m in model.body.modules())


def estimate_body_statistics(detector, images):
    """Batch-norm statistics of the body from ``images``: a stand-in for the
    stage-1 backbone. A random ResNet keeps running statistics (0, 1), so its
    activations grow layer after layer; box features then differ mostly in
    scale, embeddings start nearly parallel and SGD at lr 0.01 diverges."""
    body = detector.backbone.body
    norms = [m for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over this one pass
    batch, _, _ = detector.transform(images, None, resize=False)
    body.train()
    with torch.no_grad():
        body(batch)
    body.eval()


def test_pretraining_loss_falls_on_a_fixed_batch():
    """The pre-training objective is optimisable: 35 SGD steps on one fixed batch.

    ``rpn_post_nms_top_n_train=0`` makes the RoIs the proposals themselves, so
    the objective stays the same from step to step (otherwise RPN boxes that
    start to overlap a proposal join as RoIs with large regression targets and
    the loss jumps up and down); the RPN still trains on its anchors."""
    steps = 35
    torch.manual_seed(1)
    det = build_detector("faster_rcnn", 1, backbone="resnet18", norm="bn", trainable_layers=5, fpn_channels=16,
                         representation_size=64, min_size=64, max_size=96, anchor_sizes=(8, 16, 32, 64, 128),
                         rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=0)
    views1, views2, metas = batch = squares_views(num_proposals=6, seed=1, sides=(10, 22))
    estimate_body_statistics(det, [v["image"] for v in views1 + views2])
    model = AlignDet(det, embed_dim=32, base_momentum=0.99, total_steps=steps, num_samples=NUM_SAMPLES).train()
    lr = 0.01
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    totals, contrastive = [], []
    for step in range(1, steps + 1):
        out, _ = box_step(model, batch, CPU)
        assert out["queries"] == 12  # 6 proposals in each of 2 images, every step
        loss = loss_sum(out)
        totals.append(loss.item())
        contrastive.append(out["loss_contrastive"].item())
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 5)  # short warm-up
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.momentum_update(step)
    assert all(map(math.isfinite, totals)), totals
    last_total = sum(totals[-5:]) / 5
    last_contrastive = sum(contrastive[-5:]) / 5
    # Seen over 10 data / weight seeds: the total ends at 0.56-0.64 of the first step, L_con at 0.77-0.88.
    assert last_total < 0.8 * totals[0], totals
    assert last_contrastive < 0.95 * contrastive[0], contrastive


# ----------------------------------------------------------------------------- bad input and the hook


def _empty_view(h, w):
    return {"image": torch.rand(3, h, w), "boxes": torch.zeros(0, 4), "ids": torch.zeros(0, dtype=torch.int64)}


def test_batch_without_any_proposal_gives_zero_contrastive_loss(caplog):
    model = small_aligndet().train()
    views1 = [_empty_view(64, 80), _empty_view(72, 64)]
    views2 = [_empty_view(64, 80), _empty_view(72, 64)]
    with caplog.at_level(logging.WARNING, logger="aligndet.pretrain.box"):
        out, _ = box_step(model, (views1, views2, [{"image_id": 1}, {"image_id": 2}]), CPU)
    assert out["loss_contrastive"].item() == 0.0
    assert all(torch.isfinite(v).all() for v in out.values()), out
    assert out["instances"] == 0 and out["queries"] == 0
    assert any(r.name == "aligndet.pretrain.box" and r.levelno == logging.WARNING for r in caplog.records)
    loss_sum(out).backward()  # the RPN still learns "no object here"
    assert any(p.grad is not None for p in model.online.rpn.parameters())


def test_batch_with_one_image_without_proposals_is_finite():
    model = small_aligndet().train()
    views1, views2, metas = squares_views(num_images=1)
    views1.append(_empty_view(72, 64))
    views2.append(_empty_view(72, 64))
    out, _ = box_step(model, (views1, views2, metas + [{"image_id": 2}]), CPU)
    assert all(torch.isfinite(v).all() for v in out.values()), out
    assert out["loss_contrastive"] > 0
    loss_sum(out).backward()


def test_view_whose_proposals_were_all_cropped_out_is_finite():
    """--crop can push every proposal out of one view (TwoViewDataset drops them
    from that view only); the other view's queries then use themselves as keys."""
    model = small_aligndet().train()
    views1, views2, metas = squares_views()
    views2 = [dict(v, boxes=v["boxes"][:0], ids=v["ids"][:0]) for v in views2]
    out, _ = box_step(model, (views1, views2, metas), CPU)
    assert all(torch.isfinite(v).all() for v in out.values()), out
    assert out["instances"] == 12 and out["matched_instances"] == 0
    loss_sum(out).backward()


def test_hook_caps_samples_per_image_and_returns_only_own_proposal_ids():
    model = small_aligndet().train()
    det = model.online
    # 20 proposals per image: the proposals alone (IoU 1 with themselves) exceed num_samples.
    views1, _, _ = squares_views(num_images=3, num_proposals=20, seed=3)
    images = [v["image"] for v in views1]
    proposals = [{"boxes": v["boxes"], "ids": v["ids"]} for v in views1]
    batch, sizes, proposals = det.transform(images, proposals, resize=False)
    with torch.no_grad():
        body = model.body(batch)
        for _ in range(3):  # the subset is random: several draws
            out = faster_rcnn_box_domain(det, body, sizes, batch.shape[-2:], proposals, model.online_embed,
                                         NUM_SAMPLES)
            ids = out["ids"]
            assert out["embeddings"].shape == (len(ids), 32)
            assert ids.dtype == torch.int64
            seen = 0
            for p in proposals:
                mine = torch.isin(ids, p["ids"])
                assert int(mine.sum()) == NUM_SAMPLES  # capped, and the cap is reached
                seen += int(mine.sum())
            assert seen == len(ids)  # every returned id is one of some image's own proposal ids
            # Image j's RoIs come in image order, so its ids form one contiguous block.
            for j, p in enumerate(proposals):
                block = ids[j * NUM_SAMPLES:(j + 1) * NUM_SAMPLES]
                assert torch.isin(block, p["ids"]).all()

        # The momentum view: the same RoIs and ids, no losses, and the RPN never matches its anchors.
        def refuse(*args):
            raise AssertionError("the momentum view computed an RPN loss")

        det.rpn.compute_loss = refuse
        out = faster_rcnn_box_domain(det, body, sizes, batch.shape[-2:], proposals, model.online_embed,
                                     NUM_SAMPLES, with_losses=False)
        assert out["losses"] == {} and out["embeddings"].shape == (3 * NUM_SAMPLES, 32)
        assert all(int(torch.isin(out["ids"], p["ids"]).sum()) == NUM_SAMPLES for p in proposals)


# ----------------------------------------------------------------------------- transform


def test_transform_without_resize_keeps_sizes_and_boxes():
    transform = DetectionTransform(min_size=200, max_size=400).train()  # resizing would change every size
    images = [torch.rand(3, 50, 70), torch.rand(3, 64, 40)]
    targets = [{"boxes": torch.tensor([[1.0, 2.0, 30.0, 40.0]]), "ids": torch.tensor([0])},
               {"boxes": torch.tensor([[0.0, 0.0, 40.0, 64.0], [5.5, 6.5, 7.5, 9.5]]), "ids": torch.tensor([1, 2])}]
    batch, sizes, out = transform(images, targets, resize=False)
    assert sizes == [(50, 70), (64, 40)]
    assert batch.shape == (2, 3, 64, 96)  # padded to a multiple of 32
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        torch.testing.assert_close(batch[i, :, :h, :w], (image - mean) / std)
        padded = batch[i].clone()
        padded[:, :h, :w] = 0
        assert not padded.any()
        assert torch.equal(out[i]["boxes"], targets[i]["boxes"])
        assert torch.equal(out[i]["ids"], targets[i]["ids"])


def test_batch_norm_recalibration_uses_the_views_and_keeps_weights():
    """--bn-stats scenes: the frozen backbone's statistics become averages over the
    views of the given batches; weights, momenta and eval mode are as before."""
    model = small_aligndet()
    model.train()
    body = model.body
    weights = {k: v.clone() for k, v in body.state_dict().items() if "running" not in k and "num_batches" not in k}
    before = body.bn1.running_mean.clone()
    batches = [squares_views(num_images=2, seed=s) for s in range(3)]

    # By hand: bn1 normalises conv1's output; its cumulative mean over the 2 x 2 forwards used.
    means = []
    with torch.no_grad():
        for views1, views2, _ in batches[:2]:
            for views in (views1, views2):
                batch = model.online.transform([v["image"] for v in views], resize=False)[0]
                means.append(body.conv1(batch).mean(dim=(0, 2, 3)))
    used = model.recalibrate_batch_norm(iter(batches), 2, torch.device("cpu"))
    assert used == 2
    torch.testing.assert_close(body.bn1.running_mean, torch.stack(means).mean(0), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(body.bn1.running_mean, before)
    assert all(not m.training and m.momentum == 0.1 for m in body.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
    after = body.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights.items())


def test_frozen_body_runs_channels_last_with_ordinary_outputs_and_checkpoint():
    """The frozen body is kept channels-last (faster without gradient on a CPU): its features
    equal those of the same weights in the default layout, and the checkpoint loads into an
    ordinary detector, whose own backbone gives the same features."""
    model = small_aligndet()
    model.train()
    convs = [p for p in model.body.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    views1 = squares_views()[0]
    batch = model.online.transform([v["image"] for v in views1], resize=False)[0]
    plain = small_detector(seed=5)
    plain.load_state_dict(model.detector_state_dict())
    plain.eval()
    assert all(p.is_contiguous() for p in plain.backbone.body.parameters())
    with torch.no_grad():
        ours = model.body(batch.contiguous(memory_format=torch.channels_last))
        theirs = plain.backbone.body(batch)
    assert list(ours) == list(theirs)
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=1e-4)
    out, _ = box_step(model, squares_views(), CPU)
    assert math.isfinite(loss_sum(out).item())
