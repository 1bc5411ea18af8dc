"""torchvision's other backbone families (ResNeXt, Swin, ConvNeXt, MobileNet) in every detector: the stages and
their strides, frozen stages and norms per family, weights from torchvision files and self-supervised layouts."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from aligndet.models import build_detector
from aligndet.models import weights as weights_module
from aligndet.models.backbone import FEATURE_FAMILIES, FeatureBody, build_body
from aligndet.models.weights import CheckpointError

SMALL = ["resnext50_32x4d", "swin_t", "convnext_tiny", "mobilenet_v2", "mobilenet_v3_large"]
LISTED = SMALL + ["swin_s", "swin_b", "convnext_small"]  # every family next to the ResNets
DETECTORS = ["faster_rcnn", "mask_rcnn", "retinanet", "fcos", "detr"]


def tiny_options(detector):
    options = dict(min_size=64, max_size=64, norm="bn", trainable_layers=5)
    if detector == "detr":
        return dict(options, num_queries=5, enc_layers=1, dec_layers=1, hidden_dim=32, nheads=2, dim_feedforward=64)
    return dict(options, fpn_channels=64)  # GroupNorm(32) in FCOS's towers needs > 1 value per group on P7


@pytest.mark.parametrize("backbone", LISTED)
@pytest.mark.parametrize("detector", DETECTORS)
def test_every_family_trains_a_step_and_detects_in_every_detector(backbone, detector):
    torch.manual_seed(0)
    model = build_detector(detector, 3, backbone=backbone, **tiny_options(detector))
    target = {"boxes": torch.tensor([[5.0, 6.0, 40.0, 44.0]]), "labels": torch.tensor([2])}
    if detector == "mask_rcnn":
        target["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
        target["masks"][0, 6:44, 5:40] = 1
    losses = model([torch.rand(3, 64, 64)], [target])
    total = sum(losses[k] * model.weight_dict[k] for k in model.weight_dict if k in losses)
    assert torch.isfinite(total)
    total.backward()
    body = model.backbone.body
    grads = [p.grad for p in body.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)  # the trunk is trained
    with torch.no_grad():
        (out,) = model.eval()([torch.rand(3, 64, 64)])
    assert out["boxes"].shape[1] == 4 and len(out["boxes"]) == len(out["scores"]) == len(out["labels"])


@pytest.mark.parametrize("name", sorted(FEATURE_FAMILIES))
def test_the_four_stages_have_strides_4_to_32_and_the_classifier_channels(name):
    body = build_body(name, norm="bn", trainable_layers=5).eval()
    with torch.no_grad():
        out = body(torch.rand(1, 3, 128, 128))
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert [t.shape[1] for t in out.values()] == body.stage_channels()
    classifier = getattr(torchvision.models, name)()
    with torch.no_grad():  # C5 is the classifier's last feature map
        last = classifier.features(torch.rand(1, 3, 128, 128))
    assert body.stage_channels()[-1] == last.shape[-1 if name.startswith("swin") else 1]


def test_frozen_stages_and_norms_per_family():
    mobilenet = build_body("mobilenet_v2", norm="frozen_bn", trainable_layers=2)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in mobilenet.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in mobilenet.modules())
    trainable = [any(p.requires_grad for m in mobilenet.stage(i) for p in m.parameters()) for i in range(5)]
    assert trainable == [False, False, False, True, True]  # stages 3 and 4 of stem + 1..4

    swin = build_body("swin_t", norm="frozen_bn", trainable_layers=0)  # LayerNorm stays; nothing trains
    assert any(isinstance(m, nn.LayerNorm) for m in swin.modules())
    assert not any(p.requires_grad for p in swin.parameters())

    bn = build_body("mobilenet_v3_large", norm="bn")  # building runs a forward: it leaves the statistics alone
    assert all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean))
               for m in bn.modules() if isinstance(m, nn.BatchNorm2d))

    detr = build_detector("detr", 2, backbone="convnext_tiny", feature_stage=3, **tiny_options("detr"))
    assert detr.backbone.out_channels == 384  # C4 of ConvNeXt-T; stage 4 never runs and never trains
    assert not any(p.requires_grad for m in detr.backbone.body.stage(4) for p in m.parameters())
    with pytest.raises(ValueError, match="dilation is for bottleneck ResNets"):
        build_body("swin_t", dilation=True)
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'; choose one of resnet18.*swin_t"):
        build_body("vgg16")


def test_weights_of_the_family_load_from_a_file_a_prefixed_checkpoint_and_torchvision(tmp_path, monkeypatch):
    torch.manual_seed(1)
    classifier = torchvision.models.mobilenet_v2()
    torch.save(classifier.state_dict(), tmp_path / "mbv2.pth")
    body = build_body("mobilenet_v2", str(tmp_path / "mbv2.pth"), norm="bn")
    for key, value in body.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key
    # a self-supervised layout (e.g. SimMIM's encoder. prefix, a momentum copy beside it) loads the encoder
    state = classifier.state_dict()
    torch.save({"model": {**{f"encoder.{k}": v for k, v in state.items()},
                          **{f"momentum_encoder.{k}": torch.zeros_like(v) for k, v in state.items()}}},
               tmp_path / "ssl.pth")
    loaded = build_body("mobilenet_v2", str(tmp_path / "ssl.pth"), norm="bn")
    assert torch.equal(loaded.features[3].conv[0][0].weight, classifier.features[3].conv[0][0].weight)

    swin = torchvision.models.swin_t()
    monkeypatch.setattr(weights_module, "fetch_torchvision_state", lambda w: swin.state_dict())  # offline
    body = build_body("swin_t", "torchvision:Swin_T_Weights.IMAGENET1K_V1")
    assert torch.equal(body.features[1][0].attn.qkv.weight, swin.features[1][0].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="weights for another architecture; the model is convnext_tiny"):
        build_body("convnext_tiny", "torchvision:Swin_T_Weights.IMAGENET1K_V1")
    with pytest.raises(CheckpointError, match="does not fit mobilenet_v3_large"):
        build_body("mobilenet_v3_large", str(tmp_path / "mbv2.pth"))


def authors_swin_names(state, window=7):
    """A torchvision Swin state dict written in the Swin authors' naming, as their code and SimMIM save it:
    patch_embed, layers.i.blocks.j (mlp.fc1 / fc2), layers.i.downsample, a square relative-position index and
    the shifted blocks' attention masks."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "features":
            out[key] = value  # norm, head
            continue
        index = int(parts[1])
        if index == 0:
            out[f"patch_embed.{'proj' if parts[2] == '0' else 'norm'}.{parts[3]}"] = value
        elif index % 2:
            rest = ".".join(parts[3:]).replace("mlp.0.", "mlp.fc1.").replace("mlp.3.", "mlp.fc2.")
            if rest == "attn.relative_position_index":
                value = value.reshape(window * window, window * window)
            out[f"layers.{index // 2}.blocks.{parts[2]}.{rest}"] = value
            if rest == "norm1.weight" and int(parts[2]) % 2:
                out[f"layers.{index // 2}.blocks.{parts[2]}.attn_mask"] = torch.zeros(4, window ** 2, window ** 2)
        else:
            out[f"layers.{index // 2 - 1}.downsample.{'.'.join(parts[2:])}"] = value
    return out


def test_swin_in_its_authors_naming_loads_from_a_simmim_checkpoint(tmp_path):
    """SimMIM's checkpoints hold the encoder in the original Swin naming under 'encoder.', beside its mask token
    and decoder: the same trunk, renamed, gives the same features."""
    torch.manual_seed(2)
    swin = torchvision.models.swin_t().eval()
    state = authors_swin_names(swin.state_dict())
    assert "layers.2.blocks.5.mlp.fc2.weight" in state and "layers.0.downsample.reduction.weight" in state
    torch.save({"model": {**{f"encoder.{k}": v for k, v in state.items()}, "encoder.mask_token": torch.zeros(1, 1, 96),
                          "decoder.0.weight": torch.zeros(3072, 768, 1, 1)}, "epoch": 99}, tmp_path / "simmim.pth")
    lines = []
    body = build_body("swin_t", str(tmp_path / "simmim.pth"), norm="bn")
    report = weights_module.load_backbone_weights(build_body("swin_t"), str(tmp_path / "simmim.pth"),
                                                  log=lines.append, arch="swin_t")
    assert not report["missing"] and "prefix 'encoder.'" in lines[0], lines
    assert "encoder.mask_token" in report["unexpected"] and "decoder.0.weight" in report["unexpected"]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(body.eval()(x)["3"], swin.features(x).permute(0, 3, 1, 2), atol=1e-5)

    # SimMIM pre-trains at window 6: its bias tables (11 x 11 offsets) are resized to window 7's (13 x 13)
    small = {k: (torch.full((121, v.shape[1]), 0.25) if k.endswith("relative_position_bias_table") else v)
             for k, v in state.items() if not k.endswith(("relative_position_index", "attn_mask"))}
    torch.save({"model": {f"encoder.{k}": v for k, v in small.items()}}, tmp_path / "window6.pth")
    resized = build_body("swin_t", str(tmp_path / "window6.pth"), norm="bn")
    table = resized.features[5][3].attn.relative_position_bias_table
    assert table.shape == (169, 12) and torch.allclose(table, torch.full_like(table, 0.25))
    assert torch.equal(resized.features[5][3].attn.qkv.weight, swin.features[5][3].attn.qkv.weight)
    with pytest.raises(CheckpointError, match="does not fit convnext_tiny"):
        build_body("convnext_tiny", str(tmp_path / "simmim.pth"))


def test_a_feature_body_returns_only_the_asked_stages():
    body = FeatureBody(torchvision.models.convnext_tiny().features, (1, 2, 4, 6), returned_layers=(2, 4)).eval()
    with torch.no_grad():
        out = body(torch.rand(1, 3, 64, 64))
    assert list(out) == ["0", "1"] and [t.shape[1] for t in out.values()] == [192, 768]


def test_stage_2_on_a_mobilenet_transfers_to_the_same_backbone_and_refuses_another(tmp_path):
    import train_box
    from aligndet.checkpoint import load_pretrained
    from aligndet.data.proposal_cache import import_coco_json
    from conftest import write_squares_coco

    data = write_squares_coco(str(tmp_path / "data"), num_images=4, size=64)
    import_coco_json(data["train_json"], str(tmp_path / "proposals"))
    out = str(tmp_path / "box")
    train_box.main(train_box.get_args_parser().parse_args([
        "--backbone", "mobilenet_v3_large", "--images", data["train_images"], "--json", data["train_json"],
        "--proposals", str(tmp_path / "proposals"), "--batch-size", "2", "--workers", "0", "--epochs", "1",
        "--max-iters", "1", "--device", "cpu", "--output-dir", out]))
    path = out + "/checkpoint.pth"
    options = dict(min_size=128, max_size=128, fpn_channels=32, representation_size=256, norm="bn",
                   trainable_layers=5, anchor_sizes=(16, 32, 64, 128, 256))
    model = build_detector("faster_rcnn", 2, backbone="mobilenet_v3_large", **options)
    report = load_pretrained(model, path, log=lambda *a: None, detector="faster_rcnn", backbone="mobilenet_v3_large")
    assert report["source"] == "detector" and not report["mismatched"]
    assert any(k.startswith("backbone.body.features.") for k in report["loaded"])
    assert any(k.startswith("backbone.fpn.") for k in report["loaded"])  # the neck transfers whole
    other = build_detector("faster_rcnn", 2, backbone="mobilenet_v2", **options)
    with pytest.raises(CheckpointError, match="made on a mobilenet_v3_large backbone .* has a mobilenet_v2; "
                                              "pass --backbone mobilenet_v3_large"):
        load_pretrained(other, path, log=lambda *a: None, detector="faster_rcnn", backbone="mobilenet_v2")


def test_torchvision_mobilenet_v3_faster_rcnn_converts_to_ours_and_back_with_equal_detections_and_losses():
    import warnings

    from conftest import assert_same_detections

    from aligndet.convert import from_torchvision, to_torchvision

    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision warns that an untrained backbone trains every layer
        warnings.simplefilter("ignore")
        tv = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
            weights=None, weights_backbone=None, num_classes=5, min_size=160, max_size=200).eval()
    ours = from_torchvision(tv).eval()
    body = ours.backbone.body
    assert isinstance(body, FeatureBody) and body.name == "mobilenet_v3_large" and body.returned_blocks == (13, 16)
    assert ours.rpn.score_thresh == 0.05 and ours.rpn.anchor_generator.sizes == ((32, 64, 128, 256, 512),) * 3
    images = [torch.rand(3, 150, 190), torch.rand(3, 120, 160)]
    with torch.no_grad():
        theirs, mine = tv(images), ours(images)
    assert_same_detections(mine, theirs)
    back = to_torchvision(ours).eval()
    assert back.state_dict().keys() == tv.state_dict().keys()
    with torch.no_grad():
        assert_same_detections(back(images), theirs)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 80.0, 90.0]]), "labels": torch.tensor([2])}] * 2
    torch.manual_seed(1)
    their_losses = tv.train()(images, targets)
    torch.manual_seed(1)
    our_losses = ours.train()(images, targets)
    assert their_losses.keys() == our_losses.keys()
    for k in their_losses:
        torch.testing.assert_close(our_losses[k], their_losses[k], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    from conftest import write_squares_coco

    return write_squares_coco(str(tmp_path_factory.mktemp("families")), num_images=4, size=64)


@pytest.mark.parametrize("backbone", SMALL)
@pytest.mark.parametrize("detector", ["faster_rcnn", "retinanet", "fcos", "detr"])
def test_stage_2_and_fine_tuning_from_it_run_on_every_family(backbone, detector, squares, tmp_path):
    """A stage-1 trunk of the family -> one train_box.py step (DETR: on k-means pseudo-classes of that trunk's
    features) -> one finetune.py step from the box-domain checkpoint, with the same --backbone."""
    import finetune
    import train_box
    from aligndet.data.clusters import cluster_cache
    from aligndet.data.images import list_images
    from aligndet.data.proposal_cache import import_coco_json
    from aligndet.models.weights import trunk_key

    state = getattr(torchvision.models, backbone)().state_dict()
    init = str(tmp_path / "stage1.pth")
    torch.save({"backbone": {k: v for k, v in state.items() if trunk_key(state).match(k)}}, init)
    cache = str(tmp_path / "proposals")
    import_coco_json(squares["train_json"], cache)
    if detector == "detr":
        records = {r.key: r.path for r in list_images(squares["train_images"], squares["train_json"])}
        cluster_cache(cache, records, init, k=2, progress=False, log=lambda *a: None)
    box = str(tmp_path / "box")
    common = ["--backbone", backbone, "--detector", detector, "--batch-size", "2", "--workers", "0", "--epochs", "1",
              "--max-iters", "1", "--device", "cpu"]
    train_box.main(train_box.get_args_parser().parse_args(
        common + ["--images", squares["train_images"], "--json", squares["train_json"], "--proposals", cache,
                  "--init", init, "--output-dir", box]))
    metrics = finetune.main(finetune.get_args_parser().parse_args(
        common + ["--train-json", squares["train_json"], "--train-images", squares["train_images"],
                  "--val-json", squares["val_json"], "--val-images", squares["val_images"], "--max-val-images", "2",
                  "--init", box + "/checkpoint.pth", "--output-dir", str(tmp_path / "ft")]))
    assert metrics and 0.0 <= metrics[-1]["AP"] <= 1.0
