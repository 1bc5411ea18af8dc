"""DETR (aligndet/models/detr.py, hungarian.py, transformer.py,
position_encoding.py): the Hungarian matcher against brute force, the set loss
against a naive per-image loop, the positional encoding under padding, where
the encodings enter the attention, the eval output format, overfitting one
batch, and loading weights in the layout of the paper's release. ResNet-18,
hidden width 32-64, one or two layers and a few queries keep the file fast.
"""
import itertools
import os
import math

import pytest
import torch
from torchvision.ops import box_convert, box_iou

from aligndet.engine import weighted_loss
from aligndet.models import DETECTORS, build_detector, build_detr
from aligndet.models.detr import DETR, SetCriterion, detr_state_dict_from_reference, padding_mask
from aligndet.models.hungarian import HungarianMatcher
from aligndet.models.position_encoding import PositionEmbeddingSine
from aligndet.models.transformer import Transformer

TINY = dict(min_size=64, max_size=96, num_queries=5, enc_layers=1, dec_layers=2, hidden_dim=32, nheads=4,
            dim_feedforward=64)


def _tiny_model(seed=0, num_classes=3, **options):
    torch.manual_seed(seed)
    return build_detr(num_classes, "resnet18", **{**TINY, **options})


def _random_boxes(n, generator):
    """[n, 4] normalised cxcywh boxes that stay inside the unit square."""
    wh = 0.1 + 0.4 * torch.rand(n, 2, generator=generator)
    centre = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=generator)
    return torch.cat([centre, wh], 1)


def _targets(sizes, num_classes, generator):
    return [{"classes": torch.randint(0, num_classes, (n,), generator=generator), "boxes": _random_boxes(n, generator)}
            for n in sizes]


# ----------------------------------------------------------------------------- matcher


@pytest.mark.parametrize("cost_class", [1.0, 0.0])
def test_matcher_cost_is_the_brute_force_minimum(cost_class):
    matcher = HungarianMatcher(cost_class=cost_class, cost_bbox=5.0, cost_giou=2.0)
    g = torch.Generator().manual_seed(0)
    num_queries, num_classes = 5, 4
    for trial in range(12):
        n = trial % 4                                                  # 0-3 targets
        logits = torch.randn(1, num_queries, num_classes + 1, generator=g) * 2
        boxes = _random_boxes(num_queries, g)[None]
        (t,) = _targets([n], num_classes, g)
        classes = [t["classes"]] if cost_class else None
        (rows, cols), = matcher(logits, boxes, classes, [t["boxes"]])
        assert rows.dtype == cols.dtype == torch.int64 and len(rows) == len(cols) == n
        assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))   # one-to-one
        cost = matcher.cost_matrix(logits[0], boxes[0], t["classes"], t["boxes"])       # [Q, N]
        best = min((sum(cost[q, j].item() for j, q in enumerate(perm)) for perm in
                    itertools.permutations(range(num_queries), n)), default=0.0)
        assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-5)


def test_matcher_cost_terms():
    """cost = -p(class) + 5 L1 + 2 (-GIoU), on one hand-made pair."""
    logits = torch.tensor([[0.0, math.log(3.0)]])                     # p = (1/4, 3/4)
    pred, target = torch.tensor([[0.5, 0.5, 0.2, 0.2]]), torch.tensor([[0.5, 0.5, 0.4, 0.2]])
    cost = HungarianMatcher(1.0, 5.0, 2.0).cost_matrix(logits, pred, torch.tensor([1]), target)
    giou = 0.5                                                         # nested boxes: IoU = area ratio, no hull term
    assert cost.item() == pytest.approx(-0.75 + 5 * 0.2 - 2 * giou, abs=1e-6)


def test_matcher_batched_equals_each_image_alone():
    matcher = HungarianMatcher()
    g = torch.Generator().manual_seed(1)
    sizes = [2, 0, 3]
    logits = torch.randn(3, 6, 5, generator=g)
    boxes = torch.stack([_random_boxes(6, g) for _ in sizes])
    targets = _targets(sizes, 4, g)
    batched = matcher(logits, boxes, [t["classes"] for t in targets], [t["boxes"] for t in targets])
    for i, t in enumerate(targets):
        (alone,) = matcher(logits[i:i + 1], boxes[i:i + 1], [t["classes"]], [t["boxes"]])
        assert torch.equal(batched[i][0], alone[0]) and torch.equal(batched[i][1], alone[1])
    assert batched[1][0].numel() == batched[1][1].numel() == 0


def test_matcher_empty_targets():
    matcher = HungarianMatcher()
    out = matcher(torch.randn(2, 4, 3), torch.rand(2, 4, 4), [torch.zeros(0, dtype=torch.int64)] * 2,
                  [torch.zeros(0, 4)] * 2)
    assert len(out) == 2 and all(r.numel() == c.numel() == 0 and r.dtype == torch.int64 for r, c in out)
    with pytest.raises(ValueError, match="not all 0"):
        HungarianMatcher(0, 0, 0)


# ----------------------------------------------------------------------------- set criterion


def _naive_giou(a, b):
    """GIoU of paired xyxy boxes [M, 4], written out."""
    inter_wh = (torch.min(a[:, 2:], b[:, 2:]) - torch.max(a[:, :2], b[:, :2])).clamp(min=0)
    inter = inter_wh[:, 0] * inter_wh[:, 1]
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    union = area(a) + area(b) - inter
    hull_wh = torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])
    hull = hull_wh[:, 0] * hull_wh[:, 1]
    return inter / union - (hull - union) / hull


def _naive_layer_losses(logits, boxes, targets, matcher, num_classes, eos_coef, num_boxes):
    """One decoder layer's losses, image by image, query by query."""
    ce_sum, weight_sum, l1, giou = 0.0, 0.0, 0.0, 0.0
    for i, t in enumerate(targets):
        (rows, cols), = matcher(logits[i:i + 1], boxes[i:i + 1], [t["classes"]], [t["boxes"]])
        assigned = {int(q): int(j) for q, j in zip(rows, cols)}
        log_probs = logits[i].log_softmax(-1)
        for q in range(logits.shape[1]):
            c = int(t["classes"][assigned[q]]) if q in assigned else num_classes  # unmatched: no object
            w = 1.0 if q in assigned else eos_coef
            ce_sum += -w * log_probs[q, c].item()
            weight_sum += w
            if q in assigned:
                pred, target = boxes[i, q], t["boxes"][assigned[q]]
                l1 += (pred - target).abs().sum().item()
                xyxy = box_convert(torch.stack([pred, target]), "cxcywh", "xyxy")
                giou += 1 - _naive_giou(xyxy[:1], xyxy[1:]).item()
    return {"loss_ce": ce_sum / weight_sum, "loss_bbox": l1 / num_boxes, "loss_giou": giou / num_boxes}


def test_criterion_equals_naive_loop():
    num_classes, eos_coef = 4, 0.1
    matcher = HungarianMatcher()
    criterion = SetCriterion(num_classes, matcher, eos_coef)
    g = torch.Generator().manual_seed(2)
    targets = _targets([2, 0, 3], num_classes, g)
    layers = [{"pred_logits": torch.randn(3, 6, num_classes + 1, generator=g),
               "pred_boxes": torch.stack([_random_boxes(6, g) for _ in range(3)])} for _ in range(3)]
    outputs = {**layers[-1], "aux_outputs": layers[:-1]}
    losses = criterion(outputs, targets)
    expected = {}
    for suffix, layer in [("", layers[-1]), ("_0", layers[0]), ("_1", layers[1])]:
        naive = _naive_layer_losses(layer["pred_logits"], layer["pred_boxes"], targets, matcher, num_classes,
                                    eos_coef, num_boxes=5)
        expected.update({k + suffix: v for k, v in naive.items()})
    assert set(expected) == {k for k in losses if k.startswith("loss")}
    for k, v in expected.items():
        assert losses[k].item() == pytest.approx(v, abs=1e-5), k
    assert 0 <= losses["class_error"].item() <= 100


def test_criterion_without_targets():
    criterion = SetCriterion(2, HungarianMatcher())
    outputs = {"pred_logits": torch.randn(2, 4, 3, requires_grad=True), "pred_boxes": torch.rand(2, 4, 4)}
    losses = criterion(outputs, _targets([0, 0], 2, torch.Generator().manual_seed(0)))
    assert losses["loss_bbox"].item() == losses["loss_giou"].item() == 0
    target = torch.full((2, 4), 2)                                     # every query: no object
    torch.testing.assert_close(losses["loss_ce"], torch.nn.functional.cross_entropy(
        outputs["pred_logits"].transpose(1, 2), target))               # a uniform weight cancels out
    losses["loss_ce"].backward()


# ----------------------------------------------------------------------------- positional encoding, transformer


def test_position_encoding_ignores_padding():
    encode = PositionEmbeddingSine(num_pos_feats=16)
    alone = encode(torch.zeros(1, 5, 7, dtype=torch.bool))            # [1, 32, 5, 7]
    assert alone.shape == (1, 32, 5, 7)
    mask = padding_mask([(5, 7), (8, 10)], (8, 10), "cpu")             # image 0 padded right and bottom
    padded = encode(mask)
    torch.testing.assert_close(padded[:1, :, :5, :7], alone)
    torch.testing.assert_close(padded[1:], encode(torch.zeros(1, 8, 10, dtype=torch.bool)))
    # y channels come first and vary along rows only; the last valid row has the normalised coordinate 2 pi.
    assert torch.allclose(alone[0, 0], alone[0, 0, :, :1].expand(5, 7))
    torch.testing.assert_close(alone[0, 0, -1], torch.full((7,), math.sin(2 * math.pi)), atol=1e-4, rtol=0)
    torch.testing.assert_close(alone[0, 1, -1], torch.full((7,), math.cos(2 * math.pi)), atol=1e-4, rtol=0)


def test_positions_enter_queries_and_keys_only():
    """Hooks record every attention's inputs: at every layer the queries and keys carry the encodings
    and the values are the un-encoded tokens; every decoder output goes through the one final norm."""
    torch.manual_seed(0)
    transformer = Transformer(d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=32,
                              dropout=0.0).eval()
    inputs, outputs, attention = {}, {}, []
    hooks = []
    for name, m in transformer.named_modules():
        if name.endswith("attn"):
            hooks.append(m.register_forward_pre_hook(
                lambda m, args, kwargs, name=name: attention.append((name, args, kwargs)), with_kwargs=True))
        elif name.endswith(("layers.0", "layers.1", "norm1")):
            hooks.append(m.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0])))
            hooks.append(m.register_forward_hook(lambda m, args, out, name=name: outputs.__setitem__(name, out)))
    src, pos = torch.randn(2, 16, 3, 4), torch.randn(2, 16, 3, 4)
    mask = padding_mask([(3, 4), (2, 3)], (3, 4), "cpu")
    query_embed = torch.randn(5, 16)
    with torch.no_grad():
        hs, memory = transformer(src, mask, query_embed, pos)
    for h in hooks:
        h.remove()
    flat_pos, flat_mask = pos.flatten(2).transpose(1, 2), mask.flatten(1)   # [B, HW, d], [B, HW]
    query_pos = query_embed[None].expand(2, -1, -1)                         # [B, Q, d]
    memory = memory.flatten(2).transpose(1, 2)
    assert len(attention) == 2 + 2 * 2
    for name, args, kwargs in attention:
        layer, kind = name.rsplit(".", 1)
        q, k, v = args[0], args[1], kwargs["value"]
        x = inputs[layer]                                                   # the layer's src (encoder) / tgt
        if layer.startswith("encoder"):
            for tensor, expected in ((q, x + flat_pos), (k, x + flat_pos), (v, x)):
                torch.testing.assert_close(tensor, expected)
            assert torch.equal(kwargs["key_padding_mask"], flat_mask)
        elif kind == "self_attn":
            for tensor, expected in ((q, x + query_pos), (k, x + query_pos), (v, x)):
                torch.testing.assert_close(tensor, expected)
        else:                                                               # cross-attention
            for tensor, expected in ((q, outputs[layer + ".norm1"] + query_pos), (k, memory + flat_pos),
                                     (v, memory)):
                torch.testing.assert_close(tensor, expected)
            assert torch.equal(kwargs["key_padding_mask"], flat_mask)
    assert torch.equal(inputs["decoder.layers.0"], torch.zeros(2, 5, 16))   # the target starts at zeros
    assert hs.shape == (2, 2, 5, 16)                                        # [L, B, Q, d]
    for i in range(2):
        torch.testing.assert_close(hs[i], transformer.decoder.norm(outputs[f"decoder.layers.{i}"]))
    torch.testing.assert_close(inputs["decoder.layers.1"], outputs["decoder.layers.0"])  # the norm feeds no layer


def test_padded_features_do_not_change_the_decoder():
    """No query attends to a padded pixel: whatever the features there, the decoder's outputs stay the same."""
    torch.manual_seed(0)
    transformer = Transformer(d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=2, dim_feedforward=32,
                              dropout=0.0).eval()
    src, pos, query = torch.randn(1, 16, 4, 5), torch.randn(1, 16, 4, 5), torch.randn(3, 16)
    mask = padding_mask([(3, 4)], (4, 5), "cpu")
    garbage = torch.where(mask[:, None], torch.randn(1, 16, 4, 5) * 10, src)
    with torch.no_grad():
        clean, _ = transformer(src, mask, query, pos)
        dirty, _ = transformer(garbage, mask, query, pos)
    assert clean.shape == (2, 1, 3, 16)
    torch.testing.assert_close(clean, dirty)


# ----------------------------------------------------------------------------- the detector


def test_eval_output_format():
    model = _tiny_model(num_classes=3).eval()
    torch.nn.init.normal_(model.class_embed.weight, std=1.0)                # spread the scores: no near-ties
    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 70, 90, generator=g), torch.rand(3, 120, 80, generator=g)]  # both resized inside
    with torch.no_grad():
        detections = model(images)
        batch, sizes, _ = model.transform(images)
        raw = model.predict(model.backbone(batch), sizes, batch.shape[-2:])
    assert sizes[0] != tuple(images[0].shape[-2:]) and sizes[1] != tuple(images[1].shape[-2:])
    assert len(detections) == 2
    for det, image, logits, boxes in zip(detections, images, raw["pred_logits"], raw["pred_boxes"]):
        h, w = image.shape[-2:]
        assert set(det) == {"boxes", "scores", "labels"} and len(det["boxes"]) == len(det["scores"]) == 5
        assert det["labels"].dtype == torch.int64 and ((det["labels"] >= 1) & (det["labels"] <= 3)).all()
        assert (det["scores"][:-1] >= det["scores"][1:]).all() and ((det["scores"] > 0) & (det["scores"] <= 1)).all()
        b = det["boxes"]
        assert (b[:, 2:] >= b[:, :2]).all() and (b >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
        # Score: the best real class's probability, "no object" (the last index) dropped; label = index + 1.
        scores, classes = logits.softmax(-1)[:, :3].max(-1)
        order = scores.argsort(descending=True)
        torch.testing.assert_close(det["scores"], scores[order])
        assert torch.equal(det["labels"], classes[order] + 1)
        # Boxes in input pixels: the normalised boxes times the input size (the internal resize undone).
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        expected = torch.min((box_convert(boxes[order], "cxcywh", "xyxy") * scale).clamp(min=0), scale)
        torch.testing.assert_close(b, expected, atol=1e-3, rtol=1e-4)
    model.detections_per_img = 2
    with torch.no_grad():
        assert [len(d["boxes"]) for d in model(images)] == [2, 2]


def test_training_losses_and_weight_dict():
    model = _tiny_model(num_classes=3, dec_layers=3).train()
    images = [torch.rand(3, 64, 80), torch.rand(3, 64, 64)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0], [20.0, 10.0, 70.0, 60.0]]),
                "labels": torch.tensor([1, 3])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model(images, targets)
    terms = ["loss_ce", "loss_bbox", "loss_giou"]
    assert model.weight_dict == {f"{k}{s}": w for s in ("", "_0", "_1") for k, w in zip(terms, (1.0, 5.0, 2.0))}
    assert {k for k in losses if k.startswith("loss")} == set(model.weight_dict) and "class_error" in losses
    loss, total, logged = weighted_loss(losses, model.weight_dict)     # the training loop's sum
    assert total == pytest.approx(sum(losses[k].item() * w for k, w in model.weight_dict.items()), rel=1e-6)
    loss.backward()
    assert model.query_embed.weight.grad.abs().sum() > 0 and model.input_proj.weight.grad.abs().sum() > 0
    no_aux = _tiny_model(aux_loss=False).train()
    assert set(no_aux(images, targets)) == {*terms, "class_error"} and set(no_aux.weight_dict) == set(terms)
    with pytest.raises(ValueError, match="labels must lie in 1..3"):
        model(images, [targets[0], {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([0])}])


def test_backbone_options():
    model = _tiny_model(trainable_layers=2)
    trainable = {n.split(".")[1] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}
    assert model.backbone(torch.rand(1, 3, 64, 96)).shape == (1, 512, 2, 3)              # C5, stride 32
    torch.manual_seed(0)
    dc5 = build_detr(2, "resnet50", dilation=True, **{**TINY, "enc_layers": 0, "dec_layers": 1})
    assert dc5.backbone(torch.rand(1, 3, 64, 96)).shape == (1, 2048, 4, 6)              # DC5, stride 16
    with pytest.raises(ValueError, match="bottleneck"):
        build_detr(2, "resnet18", dilation=True)


def test_overfits_one_batch():
    """Two images with three boxes in all: AdamW drives the loss down and eval recovers every box."""
    torch.manual_seed(0)
    model = build_detr(2, "resnet18", trainable_layers=0, min_size=64, max_size=64, num_queries=5, enc_layers=1,
                       dec_layers=2, hidden_dim=64, nheads=4, dim_feedforward=128, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) * 0.2 for _ in range(2)]
    images[0][:, 8:32, 10:40] = torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    images[0][:, 36:60, 30:58] = torch.tensor([0.2, 0.2, 1.0])[:, None, None]
    images[1][:, 20:50, 4:30] = torch.tensor([0.2, 0.2, 1.0])[:, None, None]
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 40.0, 32.0], [30.0, 36.0, 58.0, 60.0]]),
                "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[4.0, 20.0, 30.0, 50.0]]), "labels": torch.tensor([2])}]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    model.train()
    history = []
    for _ in range(150):
        loss, total, _ = weighted_loss(model(images, targets), model.weight_dict)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(total)
    assert sum(history[-10:]) / 10 < 0.1 * sum(history[:10]) / 10 and history[-1] < 1.0
    model.eval()
    with torch.no_grad():
        detections = model(images)
    for det, target in zip(detections, targets):
        n = len(target["boxes"])
        iou = box_iou(det["boxes"][:n], target["boxes"])               # the n best detections against the boxes
        best_iou, best = iou.max(0)
        assert (best_iou > 0.5).all() and len(set(best.tolist())) == n
        assert torch.equal(det["labels"][:n][best], target["labels"]) and (det["scores"][:n] > 0.5).all()


def test_build_detector():
    assert "detr" in DETECTORS
    model = build_detector("detr", 2, backbone="resnet18", **TINY)
    assert isinstance(model, DETR) and model.class_embed.out_features == 3 and model.query_embed.num_embeddings == 5
    assert model.backbone.out_channels == 512 and model.transformer.d_model == 32


# ----------------------------------------------------------------------------- the paper release's layout


def _reference_keys(model):
    """The key names of the paper release (detr-r50-e632da11.pth) for a model of this size, written out."""
    resnet = [k for k in model.backbone.body.state_dict()]
    keys = [f"backbone.0.body.{k}" for k in resnet] + ["input_proj.weight", "input_proj.bias", "query_embed.weight",
                                                        "class_embed.weight", "class_embed.bias"]
    keys += [f"bbox_embed.layers.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    attn = ["in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"]
    for i in range(len(model.transformer.encoder.layers)):
        keys += [f"transformer.encoder.layers.{i}.self_attn.{p}" for p in attn]
        keys += [f"transformer.encoder.layers.{i}.{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2")
                 for p in ("weight", "bias")]
    for i in range(len(model.transformer.decoder.layers)):
        keys += [f"transformer.decoder.layers.{i}.{a}.{p}" for a in ("self_attn", "multihead_attn") for p in attn]
        keys += [f"transformer.decoder.layers.{i}.{m}.{p}" for m in ("linear1", "linear2", "norm1", "norm2", "norm3")
                 for p in ("weight", "bias")]
    return set(keys + ["transformer.decoder.norm.weight", "transformer.decoder.norm.bias"])


def test_state_dict_from_reference_layout():
    source = _tiny_model(seed=4, num_classes=3, enc_layers=2).eval()
    resnet_keys = [k for k in source.backbone.body.state_dict()]
    assert all(k.startswith(("conv1.", "bn1.", "layer")) for k in resnet_keys)  # frozen BN: no batch counters
    reference = {"model": {k.replace("backbone.body.", "backbone.0.body.", 1): v.clone()
                           for k, v in source.state_dict().items()}}
    assert set(reference["model"]) == _reference_keys(source)
    target = _tiny_model(seed=5, num_classes=3, enc_layers=2).eval()
    converted = detr_state_dict_from_reference(reference)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in target.state_dict().items()}
    target.load_state_dict(converted, strict=True)
    images = [torch.rand(3, 64, 80), torch.rand(3, 90, 64)]
    with torch.no_grad():
        for a, b in zip(source(images), target(images)):
            for k in ("boxes", "scores", "labels"):
                assert torch.equal(a[k], b[k])
    with pytest.raises(ValueError, match="only the ResNet"):
        detr_state_dict_from_reference({"backbone.1.row_embed.weight": torch.zeros(1)})


def test_state_dict_from_reference_keeps_chosen_classes():
    """A release class head over 5 indices + no object, our labels 1..2 = release indices 1 and 3."""
    model = _tiny_model(num_classes=2)
    reference = {k.replace("backbone.body.", "backbone.0.body.", 1): v for k, v in model.state_dict().items()}
    reference["class_embed.weight"], reference["class_embed.bias"] = torch.randn(6, 32), torch.randn(6)
    converted = detr_state_dict_from_reference(reference, category_ids=[1, 3])
    torch.testing.assert_close(converted["class_embed.weight"], reference["class_embed.weight"][[1, 3, 5]])
    torch.testing.assert_close(converted["class_embed.bias"], reference["class_embed.bias"][[1, 3, 5]])
    model.load_state_dict(converted, strict=True)


# ----------------------------------------------------------------------------- fine-tuning (finetune.py)

FINETUNE_TINY = ["--backbone", "resnet18", "--min-size", "64", "--max-size", "96", "--num-queries", "5",
                 "--enc-layers", "1", "--dec-layers", "1", "--hidden-dim", "32", "--nheads", "4",
                 "--dim-feedforward", "64", "--batch-size", "4", "--workers", "0", "--print-freq", "1"]


def _batch():
    """Two images of different sizes in [0, 1] with pixel xyxy boxes and labels 1..2."""
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 30.0, 60.0], [30.0, 30.0, 60.0, 70.0]]),
                "labels": torch.tensor([2, 1])}]
    return images, targets


def _finetune_argv(paths, out, *extra):
    return ["--detector", "detr", "--train-json", paths["train_json"], "--train-images", paths["train_images"],
            "--val-json", paths["val_json"], "--val-images", paths["val_images"], *FINETUNE_TINY,
            "--output-dir", out, *extra]


def test_finetune_presets_give_the_detr_recipe():
    import finetune
    parse = finetune.get_args_parser().parse_args
    coco = parse(["--detector", "detr", "--preset", "coco"])
    assert (coco.optimizer, coco.lr, coco.weight_decay, coco.backbone_lr_mult, coco.clip_grad_norm) == \
        ("adamw", 1e-4, 1e-4, 0.1, 0.1)
    assert (coco.epochs, coco.lr_steps, coco.num_queries, coco.enc_layers, coco.dec_layers, coco.hidden_dim,
            coco.nheads, coco.dim_feedforward, coco.dropout, coco.norm) == (150, [100], 100, 6, 6, 256, 8, 2048,
                                                                              0.1, "frozen_bn")
    assert coco.fpn_channels is None and coco.dilation is False
    demo = parse(["--detector", "detr"])
    assert demo.optimizer == "adamw" and demo.fpn_channels is None and demo.backbone == "resnet18"
    frcnn = parse([])  # the other detectors keep SGD and have no DETR option
    assert (frcnn.optimizer, frcnn.backbone_lr_mult, frcnn.clip_grad_norm) == ("sgd", 1.0, 0.0)
    assert frcnn.num_queries is None and frcnn.dilation is None


def test_adamw_backbone_group_and_clipping():
    """The backbone's parameters train at backbone_lr_mult x the lr through the schedule, and the gradient norm
    the optimiser sees is clipped."""
    import argparse

    from aligndet.engine import step_schedule_optimizer, train_one_epoch

    model = build_detr(2, "resnet18", **TINY)
    args = argparse.Namespace(lr=1e-3, batch_size=16, optimizer="adamw", weight_decay=1e-4, momentum=0.9,
                              backbone_lr_mult=0.1, warmup_iters=0, lr_steps=[])
    optimizer, lr_fn = step_schedule_optimizer(model, args, 1, 1)
    assert isinstance(optimizer, torch.optim.AdamW) and [g["lr_mult"] for g in optimizer.param_groups] == [1.0, 0.1]
    backbone = {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == backbone
    norms = []
    real_step = optimizer.step

    def step(*a, **kw):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return real_step(*a, **kw)

    optimizer.step = step
    images, targets = _batch()

    class Batches(list):
        start = 0

    train_one_epoch(model, optimizer, Batches([(images, targets)] * 2), torch.device("cpu"), 0, lr_fn,
                    clip_grad_norm=0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-3), pytest.approx(1e-4)]
    assert len(norms) == 2 and max(norms) <= 0.1 + 1e-6


TRAINED_BACKBONE = ["--trainable-layers", "5", "--norm", "bn", "--feature-stage", "4", "--no-cache-backbone-features"]


def test_finetune_detr_runs_and_round_trips_through_init(squares_coco, tmp_path):
    """finetune.py --detector detr trains and evaluates, with the backbone trained at its own lr; its checkpoint,
    given to --init with --keep-heads, rebuilds the same DETR (the same detections)."""
    import finetune
    from aligndet.checkpoint import load_checkpoint

    out = str(tmp_path / "detr")
    metrics = finetune.main(finetune.get_args_parser().parse_args(
        _finetune_argv(squares_coco, out, *TRAINED_BACKBONE, "--epochs", "1", "--max-iters", "2", "--eval-every",
                       "1")))
    assert metrics[-1]["images"] == 12 and 0 <= metrics[-1]["AP"] <= 1
    checkpoint = load_checkpoint(os.path.join(out, "checkpoint.pth"))
    assert len(checkpoint["optimizer"]["param_groups"]) == 2  # the backbone's own lr
    args = finetune.get_args_parser().parse_args(
        _finetune_argv(squares_coco, str(tmp_path / "again"), *TRAINED_BACKBONE, "--init",
                       os.path.join(out, "checkpoint.pth"), "--keep-heads"))
    rebuilt = finetune.build_model(args, 2, lambda *a: None)
    trained = build_detr(2, "resnet18", **{**TINY, "dec_layers": 1}, norm="bn", trainable_layers=5)
    trained.load_state_dict(checkpoint["model"])
    images, _ = _batch()
    with torch.no_grad():
        for a, b in zip(trained.eval()(images), rebuilt.eval()(images)):
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])


def test_finetune_detr_demo_preset_caches_the_frozen_backbone(squares_coco, tmp_path, capsys):
    """The demo preset: a frozen C4 backbone whose features are computed once per distinct input; asking it to
    train the backbone with the cache on is refused with the flag that turns the cache off."""
    import finetune

    parse = finetune.get_args_parser().parse_args
    demo = parse(["--detector", "detr"])
    assert (demo.trainable_layers, demo.norm, demo.feature_stage, demo.cache_backbone_features) == \
        (0, "frozen_bn", 3, True)
    finetune.main(parse(_finetune_argv(squares_coco, str(tmp_path / "cached"), "--epochs", "2", "--max-iters", "3",
                                       "--eval-every", "2")))
    assert "backbone feature cache: " in capsys.readouterr().out
    with pytest.raises(ValueError, match="--no-cache-backbone-features"):
        finetune.build_model(parse(_finetune_argv(squares_coco, "x", "--trainable-layers", "2")), 2, lambda *a: None)


def test_init_reads_the_reference_release_layout(tmp_path):
    """--init of a checkpoint in the reference DETR layout loads every tensor (load_pretrained converts it); with
    --keep-heads and category ids the class head keeps the chosen rows."""
    from aligndet.checkpoint import load_pretrained

    torch.manual_seed(0)
    source = build_detr(4, "resnet18", **TINY).eval()
    reference = {("backbone.0.body." + k[len("backbone.body."):] if k.startswith("backbone.body.") else k): v
                 for k, v in source.state_dict().items()}
    path = tmp_path / "detr-reference.pth"
    torch.save({"model": reference}, path)
    target = build_detr(4, "resnet18", **TINY).eval()
    report = load_pretrained(target, str(path), keep_heads=True, log=lambda *a: None, detector="detr")
    assert report["source"] == "detector" and not report["mismatched"] and not report["unexpected"]
    images, _ = _batch()
    with torch.no_grad():
        for a, b in zip(source(images), target(images)):
            assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["labels"], b["labels"])
    two = build_detr(2, "resnet18", **TINY).eval()
    load_pretrained(two, str(path), keep_heads=True, log=lambda *a: None, category_ids=[3, 1])
    rows = torch.tensor([3, 1, 4])  # the chosen classes, then "no object"
    assert torch.equal(two.class_embed.weight, source.class_embed.weight[rows])
    # Without --keep-heads the class head starts afresh (DETR.OUTPUT_LAYERS), the box MLP transfers.
    fresh = build_detr(2, "resnet18", **TINY)
    report = load_pretrained(fresh, str(path), log=lambda *a: None)
    assert "class_embed.weight" in report["reinitialised"]
    assert torch.equal(fresh.bbox_embed.layers[2].weight, source.bbox_embed.layers[2].weight)


def test_feature_stage_c4_reads_layer3_and_freezes_layer4():
    model = build_detr(2, "resnet18", **TINY, feature_stage=3, trainable_layers=5)
    assert model.backbone.out_channels == 256 and model.input_proj.in_channels == 256
    x = torch.rand(1, 3, 64, 96)
    assert model.backbone(x).shape[-2:] == (4, 6)  # stride 16
    assert not any(p.requires_grad for p in model.backbone.body.layer4.parameters())
    images, targets = _batch()
    losses, _, _ = weighted_loss(model.train()(images, targets), model.weight_dict)
    losses.backward()
    assert model.backbone.body.layer3[0].conv1.weight.grad is not None
    with pytest.raises(ValueError, match="feature_stage must be 3"):
        build_detr(2, "resnet18", **TINY, feature_stage=2)


def test_feature_cache_gives_the_same_outputs_and_needs_a_frozen_backbone():
    torch.manual_seed(0)
    model = build_detr(2, "resnet18", **TINY, trainable_layers=0)  # frozen_bn, the builder's default
    cached = build_detr(2, "resnet18", **TINY, trainable_layers=0)
    cached.load_state_dict(model.state_dict())
    cached.enable_feature_cache()
    images, targets = _batch()
    model.eval(), cached.eval()
    with torch.no_grad():
        for _ in range(2):  # a miss, then a hit: the same detections both times
            for a, b in zip(model(images), cached(images)):
                assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["scores"], b["scores"])
    assert (cached.feature_cache_misses, cached.feature_cache_hits) == (2, 2)
    losses = cached.train()(images, targets)  # training reads the cache too, and the transformer gets gradients
    weighted_loss(losses, cached.weight_dict)[0].backward()
    assert cached.input_proj.weight.grad is not None and cached.feature_cache_hits == 4
    with pytest.raises(ValueError, match="frozen backbone"):
        build_detr(2, "resnet18", **TINY, trainable_layers=1).enable_feature_cache()
    with pytest.raises(ValueError, match="frozen backbone"):
        build_detr(2, "resnet18", **TINY, trainable_layers=0, norm="bn").enable_feature_cache()
