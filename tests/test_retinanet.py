"""RetinaNet: equal to torchvision's with the same weights (detections, losses,
conversion both ways), edge cases, overfitting one batch, and the AlignDet
box-domain hook, whose embeddings must line up with the ids of the anchors
they come from when a batch holds several padded images.

Everything runs on small images with a ResNet-18 and narrow FPNs, except one
torchvision-built ResNet-50 model, so the file stays well under a minute on 2 cores.
"""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection import RetinaNet as TVRetinaNet
from torchvision.ops import box_iou

from aligndet.checkpoint import CheckpointError, load_pretrained
from aligndet.convert import from_torchvision, to_torchvision
from aligndet.models.matcher import IGNORE
from aligndet.models.retinanet import RetinaNet, build_retinanet
from aligndet.pretrain.box import AlignDet
from aligndet.pretrain.hooks import dense_box_domain, dense_embedding_head
from conftest import assert_no_detections, assert_same_detections, squares_views

SMALL = dict(min_size=128, max_size=192, fpn_channels=32, anchor_sizes=(16, 32, 64, 128, 256))
TV_LOSS_NAMES = {"loss_classifier": "classification", "loss_box_reg": "bbox_regression"}


def _spread(head, cls_bias=-3.0, feature_scale=3.0):
    """Random towers with unit gain and spread class logits, so that many
    (anchor, class) pairs pass the score threshold, each with its own score.
    ``feature_scale``: rough std of the FPN features (~3 for our small ResNet-18s)."""
    for m in head.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, std=(2 / (m.in_channels * 9)) ** 0.5)
    for tower in (head.classification_head.conv, head.regression_head.conv):
        first = next(m for m in tower.modules() if isinstance(m, nn.Conv2d))
        first.weight.data /= feature_scale
    cls, reg = head.classification_head.cls_logits, head.regression_head.bbox_reg
    nn.init.normal_(cls.weight, std=1.5 / (cls.in_channels * 9) ** 0.5)   # logits spread over a few units
    nn.init.constant_(cls.bias, cls_bias)
    nn.init.normal_(reg.weight, std=0.5 / (reg.in_channels * 9) ** 0.5)   # deltas of a few tenths


def _random_model(seed=0, num_classes=5, **options):
    torch.manual_seed(seed)
    model = build_retinanet(num_classes, "resnet18", **{**SMALL, **options})
    _spread(model.head)
    return model


def _images(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 120, 150, generator=g), torch.rand(3, 100, 90, generator=g),
            torch.rand(3, 160, 128, generator=g)]


# ----------------------------------------------------------------------------- torchvision equivalence


def test_eval_detections_match_torchvision():
    model = _random_model(detections_per_img=1000).eval()  # keep scores down to the threshold
    tv = to_torchvision(model).eval()
    assert isinstance(tv, TVRetinaNet) and tv.head.classification_head.num_classes == 6
    with torch.no_grad():
        ours, theirs = model(_images()), tv(_images())
    assert_same_detections(ours, theirs)
    assert all(1 <= int(d["labels"].min()) and int(d["labels"].max()) <= 5 for d in ours)


def test_from_torchvision_round_trip():
    model = _random_model(seed=3).eval()
    back = from_torchvision(to_torchvision(model)).eval()
    assert type(back) is RetinaNet and back.num_classes == model.num_classes
    for (k, v), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in back.parameters()]
    with torch.no_grad():
        assert_same_detections(model(_images(seed=4)), back(_images(seed=4)))


def test_from_torchvision_builder_model():
    """A model made by torchvision's own builder (as for its COCO checkpoints:
    91 channels, channel 0 the never-trained background slot) converts and agrees."""
    torch.manual_seed(8)
    tv = torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=91, min_size=128, max_size=160)
    _spread(tv.head, feature_scale=30.0)  # random BatchNorm ResNet-50: large features
    cls = tv.head.classification_head.cls_logits
    with torch.no_grad():  # a trained background slot: never positive
        cls.weight.view(9, 91, -1)[:, 0] = 0
        cls.bias.view(9, 91)[:, 0] = -30
    tv.eval()
    model = from_torchvision(tv).eval()
    assert model.num_classes == 90 and model.anchor_generator.sizes == tv.anchor_generator.sizes
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in tv.parameters()]
    images = _images(seed=9)[:2]
    with torch.no_grad():
        assert_same_detections(model(images), tv(images))


@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_training_losses_match_torchvision(box_loss):
    """Images that need no resizing; RetinaNet samples nothing, so the losses agree."""
    model = _random_model(seed=5, box_loss=box_loss, min_size=128, max_size=160).train()
    tv = to_torchvision(model).train()
    assert tv.head.regression_head._loss_type == box_loss
    g = torch.Generator().manual_seed(6)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 160, 128, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [80.0, 30.0, 150.0, 100.0]]),
                "labels": torch.tensor([1, 4])},
               {"boxes": torch.tensor([[5.0, 50.0, 40.0, 90.0]]), "labels": torch.tensor([5])}]
    ours, theirs = model(images, targets), tv(images, targets)
    assert set(ours) == set(TV_LOSS_NAMES)
    for name, tv_name in TV_LOSS_NAMES.items():
        torch.testing.assert_close(ours[name], theirs[tv_name], rtol=1e-4, atol=1e-6)
    sum(ours.values()).backward()
    sum(theirs.values()).backward()
    for name in ("regression_head.bbox_reg.weight", "classification_head.conv.6.weight"):
        tv_name = name.replace("conv.6.", "conv.3.0.")
        torch.testing.assert_close(model.head.get_parameter(name).grad, tv.head.get_parameter(tv_name).grad,
                                   rtol=1e-3, atol=1e-6)


def test_conversion_refuses_what_torchvision_cannot_express():
    with pytest.raises(ValueError, match="focal loss"):
        to_torchvision(_random_model(focal_alpha=0.5))
    tv = torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3)
    with pytest.raises(ValueError, match="GroupNorm"):
        from_torchvision(tv)
    with pytest.raises(ValueError, match="head_norm='none'"):
        to_torchvision(_random_model(head_norm="gn"))


def test_group_norm_head():
    """head_norm="gn": GroupNorm(32) after every tower conv; trains and detects like the plain head."""
    model = build_retinanet(3, "resnet18", **{**SMALL, "fpn_channels": 64}, head_norm="gn")
    for tower in (model.head.classification_head.conv, model.head.regression_head.conv):
        norms = [m for m in tower if isinstance(m, nn.GroupNorm)]
        assert len(norms) == 4 and all(n.num_groups == 32 and n.num_channels == 64 for n in norms)
    images = _two_images()
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[10.0, 10.0, 30.0, 34.0]]), "labels": torch.tensor([3])}]
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg"} and all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="head_norm"):
        build_retinanet(3, "resnet18", head_norm="bn")


def test_build_rejects_bad_options():
    with pytest.raises(ValueError, match="box_loss"):
        build_retinanet(2, "resnet18", box_loss="smooth_l1")
    with pytest.raises(ValueError, match="5 anchor sizes"):
        build_retinanet(2, "resnet18", anchor_sizes=(32, 64, 128, 256))


# ----------------------------------------------------------------------------- edge cases and training


def _two_images():
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 64, 80, generator=g), torch.rand(3, 64, 64, generator=g)]




@pytest.mark.parametrize("box_loss", ["l1", "giou"])
def test_empty_targets_train(box_loss):
    model = _random_model(seed=2, min_size=64, max_size=96, box_loss=box_loss).train()
    images = _two_images()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    one = {"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([2])}
    for targets in ([empty, one], [empty, empty]):
        losses = model(images, targets)
        assert all(torch.isfinite(v) for v in losses.values())
        sum(losses.values()).backward()


def test_no_detection_above_threshold_gives_empty_tensors():
    """Also what a freshly initialised RetinaNet gives: every score starts at the prior 0.01 < 0.05."""
    model = _random_model(seed=2, min_size=64, max_size=96).eval()
    images = _two_images()
    nn.init.constant_(model.head.classification_head.cls_logits.bias, -30.0)
    with torch.no_grad():
        assert_no_detections(model(images))


def test_overfits_one_batch():
    torch.manual_seed(0)
    model = build_retinanet(2, "resnet18", trainable_layers=0, fpn_channels=32, min_size=64, max_size=96,
                            anchor_sizes=(8, 16, 32, 64, 128)).train()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 64, 64, generator=g) * 0.3, torch.rand(3, 64, 64, generator=g) * 0.3]
    images[0][:, 10:40, 8:30] = 1.0
    images[1][1, 30:60, 20:50] = 1.0
    targets = [{"boxes": torch.tensor([[8.0, 10.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[20.0, 30.0, 50.0, 60.0]]), "labels": torch.tensor([2])}]
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(30):
        loss = sum(model(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert history[-1] < 0.3 * history[0], history


# ----------------------------------------------------------------------------- the AlignDet box-domain hook


class PositionEmbedding(nn.Module):
    """Stands in for the embedding MLP: the D = 6 vector of anchor a at (y, x)
    of a [B, C, H, W] level of image b is (b, H, W, y, x, a)."""

    def __init__(self, num_anchors):
        super().__init__()
        self.num_anchors = num_anchors

    def forward(self, x):
        b, _, h, w = x.shape
        grid = lambda v: v.to(x.dtype).expand(b, 1, h, w)  # noqa: E731
        fields = [grid(torch.arange(b).view(b, 1, 1, 1)), grid(torch.tensor(float(h)).view(1, 1, 1, 1)),
                  grid(torch.tensor(float(w)).view(1, 1, 1, 1)), grid(torch.arange(h).view(1, 1, h, 1)),
                  grid(torch.arange(w).view(1, 1, 1, w))]
        return torch.cat([torch.cat(fields + [grid(torch.tensor(float(a)).view(1, 1, 1, 1))], 1)
                          for a in range(self.num_anchors)], 1)  # [B, A * 6, H, W], anchor-major


def _independent_anchors(sizes, ratios, level_shapes, padded):
    """Every anchor, written out from the RetinaNet definition: per level, row-major
    locations (y, x), then anchor a = (ratio a // S, size a % S), centred on
    (x * stride, y * stride) with h / w = ratio. Returns [T, 4] xyxy and level offsets."""
    anchors, offsets = [], [0]
    for level_sizes, (h, w) in zip(sizes, level_shapes):
        cells = []
        for r in ratios:
            for s in level_sizes:
                half_w = torch.tensor(s, dtype=torch.float32) / torch.sqrt(torch.tensor(r)) / 2
                half_h = torch.tensor(s, dtype=torch.float32) * torch.sqrt(torch.tensor(r)) / 2
                cells.append(torch.stack([-half_w, -half_h, half_w, half_h]).round())
        sy, sx = padded[0] // h, padded[1] // w
        ys, xs = torch.meshgrid(torch.arange(h) * sy, torch.arange(w) * sx, indexing="ij")
        shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).float()
        anchors.append((shifts + torch.stack(cells)[None]).reshape(-1, 4))
        offsets.append(offsets[-1] + anchors[-1].shape[0])
    return torch.cat(anchors), offsets


def _expected_ids(anchors, boxes, ids):
    """RetinaNet's rule, written out: max IoU >= 0.5 positive, < 0.4 background,
    in between ignored, and every proposal keeps the anchors of its best IoU."""
    if boxes.numel() == 0:
        return torch.full((anchors.shape[0],), -1, dtype=torch.int64)
    iou = box_iou(boxes, anchors)                                     # [P, T]
    best, arg = iou.max(0)
    low_quality = (iou == iou.max(1, keepdim=True).values).any(0)
    expected = torch.where(best < 0.4, -1, IGNORE)
    return torch.where((best >= 0.5) | low_quality, ids[arg], expected)


def _hook_batch():
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 128, 160, generator=g), torch.rand(3, 112, 136, generator=g)]
    proposals, offset = [], 0
    for im in images:
        h, w = im.shape[-2:]
        side = torch.randint(16, 64, (6, 1), generator=g).float()
        x = (torch.rand(6, 1, generator=g) * (w - side)).floor()
        y = (torch.rand(6, 1, generator=g) * (h - side)).floor()
        boxes = torch.cat([x, y, x + side, y + side * 0.8], 1)
        proposals.append({"boxes": boxes, "ids": torch.arange(6) + offset})  # ids offset as two_view_collate
        offset += 6
    return images, proposals


@pytest.mark.parametrize("num_samples", [400, 12])
def test_box_domain_embeddings_align_with_their_anchor_ids(num_samples):
    model = _random_model(seed=4).train()
    images, proposals = _hook_batch()
    batch, image_sizes, proposals = model.transform(images, proposals, resize=False)
    padded = tuple(batch.shape[-2:])
    num_anchors = model.head.classification_head.num_anchors
    with torch.no_grad():
        body = model.backbone.body(batch)
        level_shapes = [tuple(f.shape[-2:]) for f in model.backbone.fpn(body).values()]
        out = dense_box_domain(model, body, image_sizes, padded, proposals, PositionEmbedding(num_anchors),
                               num_samples)
    heights = [h for h, _ in level_shapes]
    assert len(set(heights)) == len(heights), "levels must be told apart by their height"
    anchors, offsets = _independent_anchors(model.anchor_generator.sizes, (0.5, 1.0, 2.0), level_shapes, padded)

    emb, ids = out["embeddings"], out["ids"]                          # [S, 6], [S]
    assert emb.shape[0] == ids.shape[0]
    image = emb[:, 0].long()
    assert torch.equal(image, image.sort().values), "samples are grouped by image, in batch order"
    for b, p in enumerate(proposals):
        expected = _expected_ids(anchors, p["boxes"], p["ids"])
        mine = image == b
        h, w, y, x, a = emb[mine, 1:].long().unbind(1)
        level = torch.tensor([heights.index(v) for v in h.tolist()], dtype=torch.int64)
        assert torch.equal(w, torch.tensor([level_shapes[l][1] for l in level.tolist()], dtype=torch.int64))
        index = torch.tensor(offsets)[level] + (y * w + x) * num_anchors + a
        assert (expected[index] != IGNORE).all(), "ignored anchors are never sampled"
        assert torch.equal(ids[mine], expected[index])
        # Positives first, then background; all positives that fit are kept.
        positive = (ids[mine] >= 0).long()
        assert torch.equal(positive, positive.sort(descending=True).values)
        num_positive = int((expected >= 0).sum())
        assert num_positive > 0 and int(positive.sum()) == min(num_positive, num_samples)
        assert mine.sum() == num_samples  # background fills up to num_samples
        assert set(ids[mine].tolist()) - {-1} <= set(p["ids"].tolist())  # own ids only: distinct across images
    assert torch.isfinite(out["losses"]["loss_box_reg"])


def test_box_domain_regression_with_an_image_without_proposals():
    model = _random_model(seed=6).train()
    images, proposals = _hook_batch()
    proposals[1] = {"boxes": torch.zeros(0, 4), "ids": torch.zeros(0, dtype=torch.int64)}
    batch, image_sizes, proposals = model.transform(images, proposals, resize=False)
    with torch.no_grad():
        body = model.backbone.body(batch)
    out = dense_box_domain(model, body, image_sizes, batch.shape[-2:], proposals, dense_embedding_head(model, 16), 64)
    loss = out["losses"]["loss_box_reg"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    grad = model.head.regression_head.bbox_reg.weight.grad
    assert grad is not None and torch.isfinite(grad).all()
    assert out["embeddings"].shape == (128, 16)
    assert (out["ids"][64:] == -1).all() and (out["ids"][:64] >= 0).any()


def test_embeddings_at_the_kept_anchors_only_equal_the_dense_ones():
    """DenseEmbeddingHead's last conv runs only where predictions are kept (``project``);
    the result equals running the head on every location and gathering, values and gradients."""
    model = _random_model(seed=7).train()
    images, proposals = _hook_batch()
    batch, image_sizes, proposals = model.transform(images, proposals, resize=False)
    with torch.no_grad():
        body = model.backbone.body(batch)
    head = dense_embedding_head(model, 16, kernel_size=3)
    dense = torch.nn.Sequential(*head.mlp)  # the same layers, not a DenseEmbeddingHead: the dense path
    results = []
    for module in (head, dense):
        torch.manual_seed(3)
        out = dense_box_domain(model, body, image_sizes, batch.shape[-2:], proposals, module, 64)
        head.zero_grad()
        out["embeddings"].square().sum().backward()
        results.append((out["embeddings"].detach(), out["ids"], [p.grad.clone() for p in head.parameters()]))
    (sparse, ids, grads), (full, ids_dense, grads_dense) = results
    assert head.num_anchors == 9 and sparse.shape == (128, 16)
    assert torch.equal(ids, ids_dense)
    torch.testing.assert_close(sparse, full, atol=1e-5, rtol=1e-5)
    for g, g_dense in zip(grads, grads_dense):
        torch.testing.assert_close(g, g_dense, atol=1e-4, rtol=1e-4)


def _small_detector(seed=0):
    torch.manual_seed(seed)
    return build_retinanet(1, "resnet18", norm="bn", trainable_layers=5, fpn_channels=16, min_size=64,
                           max_size=96, anchor_sizes=(8, 16, 32, 64, 128))


def test_aligndet_wrapper_trains_neck_and_heads_only():
    model = AlignDet(_small_detector(), embed_dim=32, total_steps=10, num_samples=32).train()
    out = model(*squares_views()[:2])
    assert {"loss_contrastive", "loss_box_reg"} <= set(out)
    assert all(torch.isfinite(out[k]) for k in ("loss_contrastive", "loss_box_reg"))
    assert out["loss_contrastive"] > 0 and out["instances"] > 0
    (out["loss_contrastive"] + out["loss_box_reg"]).backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    for name in with_grad:
        assert name.startswith(("online.", "online_embed.")), name
        assert not name.startswith(("online.backbone.body.", "online.head.classification_head.cls_logits.")), name
    for group in ("online.backbone.fpn.", "online.head.classification_head.conv.", "online.head.regression_head.",
                  "online_embed."):
        params = [p for n, p in model.named_parameters() if n.startswith(group)]
        assert params and all(p.grad is not None for p in params), group
        assert any(p.grad.abs().sum() > 0 for p in params), group
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01).step()
    before = model.momentum.head.regression_head.bbox_reg.weight.clone()
    m = model.momentum_update(1)
    assert 0.996 <= m < 1
    assert not torch.equal(before, model.momentum.head.regression_head.bbox_reg.weight)


@pytest.mark.parametrize("keep_heads", [False, True])
def test_transfer_reinitialises_output_layers(tmp_path, keep_heads):
    pretrained = _small_detector(seed=1).state_dict()
    path = tmp_path / "stage2.pth"
    torch.save({"model": pretrained}, path)
    model = _small_detector(seed=2)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, str(path), keep_heads=keep_heads, log=lambda *a: None)
    for key, value in model.state_dict().items():
        output_layer = key.startswith(RetinaNet.OUTPUT_LAYERS)
        source = own if output_layer and not keep_heads else pretrained
        assert torch.equal(value, source[key]), key
        assert (key in report["reinitialised"]) == (output_layer and not keep_heads), key


def test_transfer_can_leave_a_whole_tower_at_its_initialisation(tmp_path):
    """--init-skip: the classification tower stays as initialised, the regression tower and the rest load."""
    pretrained = _small_detector(seed=1).state_dict()
    path = tmp_path / "stage2.pth"
    torch.save({"model": pretrained}, path)
    model = _small_detector(seed=2)
    own = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_pretrained(model, str(path), log=lambda *a: None, skip=["head.classification_head."])
    assert report["source"] == "detector"
    for key, value in model.state_dict().items():
        fresh = key.startswith(("head.classification_head.", *RetinaNet.OUTPUT_LAYERS))
        assert torch.equal(value, (own if fresh else pretrained)[key]), key
    assert any(k.startswith("head.regression_head.conv") for k in report["loaded"])
    with pytest.raises(CheckpointError, match="no key of the model starts with head.cls_tower."):
        load_pretrained(model, str(path), log=lambda *a: None, skip=["head.cls_tower."])


def test_box_skip_applies_to_box_domain_checkpoints_only(tmp_path):
    """box_skip (finetune.py --box-init-skip): a train_box.py checkpoint leaves the tower out, a finetune.py one
    loads it, backbone weights ignore it."""
    pretrained = _small_detector(seed=1).state_dict()
    fresh = {k: v.clone() for k, v in _small_detector(seed=2).state_dict().items()}
    key = "head.classification_head.conv.0.weight"
    assert key in pretrained
    for stage, skipped in (("box", True), ("finetune", False)):
        path = tmp_path / f"{stage}.pth"
        torch.save({"model": pretrained, "stage": stage, "detector": "retinanet"}, path)
        model, lines = _small_detector(seed=2), []
        report = load_pretrained(model, str(path), log=lines.append, detector="retinanet",
                                 box_skip=["head.classification_head."])
        assert torch.equal(model.state_dict()[key], (fresh if skipped else pretrained)[key]), stage
        assert (key in report["reinitialised"]) == skipped
        assert torch.equal(model.state_dict()["head.regression_head.conv.0.weight"],
                           pretrained["head.regression_head.conv.0.weight"])
        assert any("--box-init-skip" in line for line in lines) == skipped
    backbone = tmp_path / "stage1.pth"
    torch.save({"backbone": {k[len("backbone.body."):]: v for k, v in pretrained.items()
                             if k.startswith("backbone.body.")}}, backbone)
    report = load_pretrained(_small_detector(seed=2), str(backbone), log=lambda *a: None,
                             box_skip=["head.classification_head."])
    assert report["source"] == "backbone" and report["loaded"]
