"""FCOS in box-domain pre-training (AlignDet): the box-domain hook, whose
embeddings must carry the id of the proposal their own point is assigned to,
and the AlignDet wrapper training FCOS's neck and heads. Tiny images,
ResNet-18 and 32 FPN channels keep the file fast.
"""
import math

import torch

from aligndet.models.fcos import build_fcos
from aligndet.pretrain.box import AlignDet
from aligndet.pretrain.hooks import dense_embedding_head, hook_for
from conftest import squares_views


# ----------------------------------------------------------------------------- box-domain pre-training (AlignDet)


class PositionHead(torch.nn.Module):
    """An 'embedding head' that writes where each point is: [B, C, H, W] ->
    [B, 5, H, W] holding (image index, H, W, y, x); H and W name the level."""

    def forward(self, x):
        b, _, h, w = x.shape
        index = torch.meshgrid(torch.arange(b), torch.arange(h), torch.arange(w), indexing="ij")
        fields = [index[0], torch.full_like(index[0], h), torch.full_like(index[0], w), index[1], index[2]]
        return torch.stack(fields, 1).to(x.dtype)


def _reference_assignment(x, y, size, scale_range, boxes, radius=1.5):
    """The FCOS rule for one point, written as a plain loop: the index of the
    smallest box the point is assigned to, or -1."""
    best, best_area = -1, math.inf
    for j, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        sides = (x - x1, y - y1, x2 - x, y2 - y)
        near = max(abs(x - (x1 + x2) / 2), abs(y - (y1 + y2) / 2)) < radius * size
        if min(sides) > 0 and near and scale_range[0] < max(sides) < scale_range[1]:
            area = (x2 - x1) * (y2 - y1)
            if area < best_area:
                best, best_area = j, area
    return best


RANGES = ((0, 12), (12, 24), (24, 48), (48, 96), (96, math.inf))  # spreads 10-80 px proposals over the levels


def _hook_inputs(model, empty_second=False):
    g = torch.Generator().manual_seed(12)
    sizes, proposals, images, offset = [(80, 96), (96, 128)], [], [], 0
    for h, w in sizes:
        n = 0 if (empty_second and offset) else 16
        xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 20.0, h - 20.0])
        wh = 10 + torch.rand(n, 2, generator=g) * 70
        boxes = torch.cat([xy, torch.min(xy + wh, torch.tensor([float(w), float(h)]))], 1)
        proposals.append({"boxes": boxes, "ids": torch.arange(n) + offset})  # ids distinct across images
        images.append(torch.rand(3, h, w, generator=g))
        offset += 100
    batch, image_sizes, proposals = model.transform(images, proposals, resize=False)
    with torch.no_grad():
        body = model.backbone.body(batch)
    return body, image_sizes, tuple(batch.shape[-2:]), proposals


def test_box_domain_hook_aligns_every_embedding_with_its_points_proposal():
    torch.manual_seed(0)
    model = build_fcos(1, "resnet18", fpn_channels=32, scale_ranges=RANGES)
    body, image_sizes, padded, proposals = _hook_inputs(model)
    assert padded == (96, 128)
    feature_sizes = [(12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # P3-P7 of the padded batch
    total = 2 * sum(h * w for h, w in feature_sizes)

    out = hook_for(model).forward(model, body, image_sizes, padded, proposals, PositionHead(), total)
    embeddings, ids = out["embeddings"], out["ids"]
    assert embeddings.shape == (total, 5) and ids.shape == (total,)
    positives = int((ids >= 0).sum())
    assert 10 < positives < total
    assert (ids[:positives] >= 0).all() and (ids[positives:] == -1).all()  # positives of the whole batch first
    seen, levels = set(), set()
    for (b, h, w, y, x), point_id in zip(embeddings.round().long().tolist(), ids.tolist()):
        level = feature_sizes.index((h, w))
        stride_y, stride_x = padded[0] // h, padded[1] // w
        p = proposals[b]
        j = _reference_assignment(x * stride_x, y * stride_y, 8 * 2 ** level, RANGES[level], p["boxes"])
        assert point_id == (int(p["ids"][j]) if j >= 0 else -1), (b, level, y, x)
        seen.add((b, level, y, x))
        if j >= 0:
            levels.add(level)
    assert len(seen) == total and len(levels) >= 3  # every point exactly once; positives on several levels
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert set(out["losses"]) == {"loss_box_reg", "loss_centerness"}

    # Fewer samples than positives: only positives, still aligned, capped per batch.
    out = hook_for(model).forward(model, body, image_sizes, padded, proposals, PositionHead(), 10)
    assert out["ids"].shape == (10,) and (out["ids"] >= 0).all()
    for (b, h, w, y, x), point_id in zip(out["embeddings"].round().long().tolist(), out["ids"].tolist()):
        level = feature_sizes.index((h, w))
        j = _reference_assignment(x * (128 // w), y * (96 // h), 8 * 2 ** level, RANGES[level], proposals[b]["boxes"])
        assert point_id == int(proposals[b]["ids"][j])


def test_box_domain_hook_with_an_image_without_proposals():
    torch.manual_seed(0)
    model = build_fcos(1, "resnet18", fpn_channels=32, scale_ranges=RANGES)
    body, image_sizes, padded, proposals = _hook_inputs(model, empty_second=True)
    assert proposals[1]["boxes"].shape == (0, 4)
    out = hook_for(model).forward(model, body, image_sizes, padded, proposals, dense_embedding_head(model, 16), 64)
    assert out["embeddings"].shape == (64, 16) and len(out["ids"]) == 64
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert set(out["ids"].tolist()) <= set(proposals[0]["ids"].tolist()) | {-1}
    proposals[0] = {"boxes": torch.zeros(0, 4), "ids": torch.zeros(0, dtype=torch.int64)}
    out = hook_for(model).forward(model, body, image_sizes, padded, proposals, dense_embedding_head(model, 16), 64)
    assert (out["ids"] == -1).all() and all(v == 0 for v in out["losses"].values())


def test_aligndet_wrapper_trains_fcos_neck_and_heads():
    torch.manual_seed(0)
    detector = build_fcos(1, "resnet18", norm="bn", trainable_layers=5, fpn_channels=32, min_size=64, max_size=96,
                          scale_ranges=((0, 12), (12, 24), (24, 48), (48, 96), (96, math.inf)))
    model = AlignDet(detector, embed_dim=32, total_steps=10, num_samples=64).train()
    out = model(*squares_views()[:2])
    assert {"loss_contrastive", "loss_box_reg", "loss_centerness"} <= set(out)
    assert all(torch.isfinite(v) for v in out.values()) and out["instances"] > 0
    sum(v for k, v in out.items() if k.startswith("loss")).backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    for prefix in ("online.backbone.fpn.", "online.head.classification_head.conv.", "online.head.regression_head.",
                   "online_embed."):
        assert any(n.startswith(prefix) for n in grads), prefix
    assert not any(n.startswith(("online.backbone.body.", "online.head.classification_head.cls_logits.",
                                 "momentum")) for n in grads)
    assert 0.996 <= model.momentum_update(1) < 1


def test_classification_tower_centerness_branch():
    """--cls-centerness: BCE of a centerness logit predicted from the classification tower,
    against the FCOS centerness of each positive point, by hand; its gradient reaches the
    tower; without losses (the momentum view) neither it nor the regression head runs."""
    torch.manual_seed(0)
    model = build_fcos(1, "resnet18", fpn_channels=32, scale_ranges=RANGES)
    body, image_sizes, padded, proposals = _hook_inputs(model)
    head = dense_embedding_head(model, 16, kernel_size=3, init_std=0.01, centerness=True)
    assert head.mlp[0].kernel_size == (3, 3) and float(head.mlp[0].bias.detach().abs().max()) == 0.0
    assert 0.005 < float(head.mlp[0].weight.detach().std()) < 0.015
    assert head.weight_dict == {"loss_centerness_cls": 1.0}
    torch.manual_seed(1)  # the background samples are drawn at random
    out = hook_for(model).forward(model, body, image_sizes, padded, proposals, head, 64)
    assert set(out["losses"]) == {"loss_box_reg", "loss_centerness", "loss_centerness_cls"}

    features = list(model.backbone.fpn(body).values())
    anchors_per_level = model.anchor_generator(padded, features)
    anchors = torch.cat(anchors_per_level)
    level_sizes = [a.shape[0] for a in anchors_per_level]
    terms, count = [], 0
    for i, p in enumerate(proposals):
        matched = model.match(anchors, p["boxes"], level_sizes)
        logits = torch.cat([head.centerness(model.head.classification_head.conv(x))[i].flatten() for x in features])
        for t in torch.nonzero(matched >= 0).squeeze(1).tolist():
            x1, y1, x2, y2 = p["boxes"][matched[t]].tolist()
            cx, cy = (anchors[t, 0] + anchors[t, 2]) / 2, (anchors[t, 1] + anchors[t, 3]) / 2
            l, r, top, b = cx - x1, x2 - cx, cy - y1, y2 - cy
            target = math.sqrt(min(l, r) / max(l, r) * min(top, b) / max(top, b))
            terms.append(torch.nn.functional.binary_cross_entropy_with_logits(logits[t], torch.tensor(target)))
            count += 1
    assert count > 10
    torch.testing.assert_close(out["losses"]["loss_centerness_cls"], torch.stack(terms).sum() / count,
                               atol=1e-5, rtol=1e-5)
    out["losses"]["loss_centerness_cls"].backward()
    tower = model.head.classification_head.conv
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tower.parameters())
    assert head.centerness.weight.grad is not None

    torch.manual_seed(1)
    without = hook_for(model).forward(model, body, image_sizes, padded, proposals, head, 64, with_losses=False)
    assert without["losses"] == {}
    torch.testing.assert_close(without["embeddings"], out["embeddings"].detach())
    model.zero_grad()
    model.head.regression_head.register_forward_hook(lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
    hook_for(model).forward(model, body, image_sizes, padded, proposals, head, 64, with_losses=False)


def test_centerness_branch_needs_fcos_and_joins_the_weight_dict():
    from aligndet.models import build_detector
    retinanet = build_detector("retinanet", 1, backbone="resnet18", fpn_channels=32)
    try:
        dense_embedding_head(retinanet, 16, centerness=True)
    except ValueError as e:
        assert "FCOS" in str(e)
    else:
        raise AssertionError("a centerness branch was built for RetinaNet")
    detector = build_fcos(1, "resnet18", fpn_channels=32)
    model = AlignDet(detector, embed_dim=16, num_samples=32, head_options={"centerness": True})
    assert model.weight_dict["loss_centerness_cls"] == 1.0
    assert model.momentum_embed.centerness is not None  # copied, but never trained nor used
