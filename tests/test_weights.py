"""Backbone import (aligndet/models/weights.py): checkpoints in the layouts of
torchvision, ours, MoCo v1/v2/v3, SwAV, DINO and DenseCL, made here from a
random ResNet-18, load tensor for tensor; other architectures and unknown
torchvision names are refused with the reason; nothing is downloaded."""
import pytest
import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from aligndet.checkpoint import CheckpointError, load_pretrained, save_checkpoint
from aligndet.models import build_detector
from aligndet.models.backbone import build_backbone, load_resnet
from aligndet.models.weights import (describe_resnet, extract_backbone_state, load_backbone_weights,
                                     parse_torchvision_weights)

SMALL = dict(trainable_layers=5, min_size=96, max_size=96, fpn_channels=32, representation_size=128,
             anchor_sizes=(16, 32, 64, 128, 256))


def _random_state(arch, seed):
    """A torchvision ResNet's state dict with every float tensor random (BN statistics too,
    so that 'equal after loading' cannot hold by chance)."""
    torch.manual_seed(seed)
    state = getattr(torchvision.models, arch)().state_dict()
    return {k: torch.randn_like(v) if v.is_floating_point() else v + seed for k, v in state.items()}


@pytest.fixture(scope="module")
def resnet18_state():
    return _random_state("resnet18", 0)


def _trunk(state):
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def _other(state):
    """Another copy of the same network (a momentum encoder, DINO's student): other values."""
    return {k: v + 1 for k, v in state.items()}


def _head(prefix, *names):
    return {f"{prefix}{name}": torch.randn(8, 4) for name in names}


# name -> (checkpoint made from a torchvision ResNet-18 state dict, layout report, expected unexpected keys
# or None for many)
LAYOUTS = {
    "torchvision": (lambda s: s, "top level, no prefix", ["fc.weight", "fc.bias"]),
    "bare trunk, no fc (DINO's released backbones)": (_trunk, "top level, no prefix", []),
    "ours: train_image.py": (lambda s: {"backbone": _trunk(s), "epoch": 3, "args": {"arch": "resnet18"}},
                             "under 'backbone', no prefix", []),
    "ours: model": (lambda s: {"model": _trunk(s)}, "under 'model', no prefix", []),
    "MoCo v1/v2": (lambda s: {"epoch": 200, "arch": "resnet18", "state_dict": {
        **_prefixed("module.encoder_q.", _trunk(s)), **_head("module.encoder_q.fc.", "0.weight", "0.bias", "2.weight"),
        **_prefixed("module.encoder_k.", _other(s)), "module.queue": torch.randn(4, 16),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long)}},
        "under 'state_dict', prefix 'module.encoder_q.'", None),  # see test_unexpected_keys_are_listed_by_module
    "MoCo v3": (lambda s: {"state_dict": {
        **_prefixed("module.base_encoder.", _trunk(s)), **_head("module.base_encoder.fc.", "0.weight", "1.weight"),
        **_prefixed("module.momentum_encoder.", _other(_trunk(s))), **_head("module.predictor.", "0.weight")}},
        "under 'state_dict', prefix 'module.base_encoder.'", None),
    "SwAV": (lambda s: {**_prefixed("module.", _trunk(s)), **_head("module.projection_head.", "0.weight", "1.bias"),
                        "module.prototypes.weight": torch.randn(30, 8)},
             "top level, prefix 'module.'",
             ["module.projection_head.0.weight", "module.projection_head.1.bias", "module.prototypes.weight"]),
    "DINO": (lambda s: {"student": {**_prefixed("module.backbone.", _other(_trunk(s))),
                                    **_head("module.head.", "mlp.0.weight")},
                        "teacher": {**_prefixed("backbone.", _trunk(s)), **_head("head.", "mlp.0.weight")},
                        "epoch": 100},
             "under 'teacher', prefix 'backbone.'", ["head.mlp.0.weight"]),
    "DenseCL / mmselfsup": (lambda s: {"meta": {"epoch": 200}, "state_dict": {
        **_prefixed("backbone.", _trunk(s)), **_head("neck.", "mlp.0.weight", "mlp2.0.weight"),
        **_head("head.", "fc.weight")}},
        "under 'state_dict', prefix 'backbone.'", ["neck.mlp.0.weight", "neck.mlp2.0.weight", "head.fc.weight"]),
    "DenseCL original (encoder_q = [backbone, neck])": (lambda s: {"state_dict": {
        **_prefixed("module.encoder_q.0.", _trunk(s)), **_head("module.encoder_q.1.", "mlp.0.weight"),
        **_prefixed("module.encoder_k.0.", _other(_trunk(s)))}},
        "under 'state_dict', prefix 'module.encoder_q.0.'", None),
    "our detector, into a bare ResNet": (lambda s: {"model": {
        **_prefixed("backbone.body.", _trunk(s)), **_head("backbone.fpn.", "inner_blocks.0.0.weight"),
        **_head("rpn.head.", "conv.0.0.weight")}},
        "under 'model', prefix 'backbone.body.'", ["backbone.fpn.inner_blocks.0.0.weight", "rpn.head.conv.0.0.weight"]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_loads_the_same_tensors(layout, resnet18_state, tmp_path):
    make, where, unexpected = LAYOUTS[layout]
    path = tmp_path / "weights.pth"
    save_checkpoint(make(resnet18_state), path)
    torch.manual_seed(1)
    resnet = torchvision.models.resnet18()
    lines = []
    report = load_backbone_weights(resnet, path, log=lines.append)
    for key, value in resnet.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, resnet18_state[key]), key
    trunk = [k for k in resnet18_state if not k.startswith("fc.")]
    assert sorted(report["loaded"]) == sorted(trunk)
    assert report["missing"] == [] and report["mismatched"] == []
    if unexpected is not None:
        assert sorted(report["unexpected"]) == sorted(unexpected)
    assert lines[0] == f"init backbone resnet18 from {path} ({where})"
    assert lines[1] == "  loaded 100/100 tensors"  # 60 parameters + 40 BN statistics
    assert lines[2] == "  missing: none"
    assert lines[3].startswith("  unexpected (ignored): " if unexpected != [] else "  unexpected: none")


def test_unexpected_keys_are_listed_by_module(resnet18_state, tmp_path):
    save_checkpoint(LAYOUTS["MoCo v1/v2"][0](resnet18_state), tmp_path / "moco.pth")
    lines = []
    load_backbone_weights(torchvision.models.resnet18(), tmp_path / "moco.pth", log=lines.append)
    assert lines[3] == ("  unexpected (ignored): 107: module.encoder_q.fc.* (3), module.encoder_k.* (100), "
                        "module.encoder_k.fc.* (2), module.queue, module.queue_ptr")


def test_extract_returns_resnet_names(resnet18_state):
    checkpoint = LAYOUTS["SwAV"][0](resnet18_state)
    state, where, dropped = extract_backbone_state(checkpoint, resnet18_state)
    assert where == "top level, prefix 'module.'"
    assert set(state) == {k for k in resnet18_state if not k.startswith("fc.")}
    assert dropped == ["module.projection_head.0.weight", "module.projection_head.1.bias", "module.prototypes.weight"]


def test_partial_checkpoint_reports_missing_keys(resnet18_state, tmp_path, capsys):
    # Only parameters, no BN statistics (60 of 100 tensors): loads, and says what is missing.
    params = dict(torchvision.models.resnet18().named_parameters())
    save_checkpoint({k: v for k, v in _trunk(resnet18_state).items() if k in params}, tmp_path / "params.pth")
    resnet = torchvision.models.resnet18()
    report = load_backbone_weights(resnet, tmp_path / "params.pth")
    out = capsys.readouterr().out
    assert "loaded 60/100 tensors" in out
    assert "missing (kept as initialised): 40: bn1.* (2), layer1.0.* (4)," in out
    assert "bn1.running_mean" in report["missing"] and "layer4.1.bn2.running_var" in report["missing"]
    assert torch.equal(resnet.layer4[1].conv2.weight, resnet18_state["layer4.1.conv2.weight"])


def test_frozen_batchnorm_loads_batchnorm_checkpoints_and_back(resnet18_state, tmp_path):
    save_checkpoint(LAYOUTS["MoCo v1/v2"][0](resnet18_state), tmp_path / "moco.pth")
    frozen = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d)
    report = load_backbone_weights(frozen, tmp_path / "moco.pth", log=lambda *a: None)
    assert report["missing"] == [] and not any("num_batches_tracked" in k for k in report["unexpected"])
    for key, value in frozen.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(value, resnet18_state[key]), key
    # Our frozen-BN detector backbone's body, built from the file by load_resnet.
    body = build_backbone("resnet18", str(tmp_path / "moco.pth"), norm="frozen_bn").body
    assert torch.equal(body.layer2[0].bn1.running_var, resnet18_state["layer2.0.bn1.running_var"])
    # And a frozen-BN checkpoint (no num_batches_tracked) into BatchNorm2d.
    save_checkpoint({"backbone": body.state_dict()}, tmp_path / "frozen.pth")
    bn = torchvision.models.resnet18()
    report = load_backbone_weights(bn, tmp_path / "frozen.pth", log=lambda *a: None)
    assert report["missing"] == []
    assert torch.equal(bn.layer2[0].bn1.running_var, resnet18_state["layer2.0.bn1.running_var"])


def test_another_architecture_is_refused_naming_the_mismatch(resnet18_state, tmp_path):
    save_checkpoint({"state_dict": _prefixed("module.", _random_state("resnet50", 2))}, tmp_path / "r50.pth")
    resnet = torchvision.models.resnet18()
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_backbone_weights(resnet, tmp_path / "r50.pth", log=lambda *a: None)
    message = str(error.value)
    assert "does not fit resnet18" in message
    assert "bottleneck ResNet (has layer1.0.conv3) with blocks [3, 4, 6, 3] and widths [256, 512, 1024, 2048]" \
        in message and "the layout of resnet50" in message
    assert "basic-block ResNet (no layer1.0.conv3) with blocks [2, 2, 2, 2] and widths [64, 128, 256, 512]" in message
    assert "layer1.0.conv1.weight checkpoint (64, 64, 1, 1) vs model (64, 64, 3, 3)" in message
    assert all(torch.equal(v, before[k]) for k, v in resnet.state_dict().items())  # nothing loaded in part
    # Same shapes but another depth: a ResNet-18 is the first blocks of a ResNet-34, and still refused.
    save_checkpoint(resnet18_state, tmp_path / "r18.pth")
    with pytest.raises(CheckpointError, match=r"blocks \[2, 2, 2, 2\].*the model is .*blocks \[3, 4, 6, 3\]"):
        load_backbone_weights(torchvision.models.resnet34(), tmp_path / "r18.pth", log=lambda *a: None)


def test_unrelated_checkpoints_are_refused(resnet18_state, tmp_path):
    save_checkpoint({"model": {"encoder.weight": torch.randn(4, 4), "decoder.bias": torch.randn(4)}},
                    tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="neither a detector nor a ResNet.*encoder.weight"):
        load_backbone_weights(torchvision.models.resnet18(), tmp_path / "other.pth")
    # One key in common is not a backbone either.
    save_checkpoint({"conv1.weight": resnet18_state["conv1.weight"], "blocks.0.weight": torch.randn(3)},
                    tmp_path / "stem.pth")
    with pytest.raises(CheckpointError, match=r"1/100 tensors match.*no ResNet stages"):
        load_backbone_weights(torchvision.models.resnet18(), tmp_path / "stem.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*torchvision:ResNet50_Weights.IMAGENET1K_V2"):
        load_backbone_weights(torchvision.models.resnet18(), "ResNet50_Weights.IMAGENET1K_V2")


def test_describe_resnet_names_torchvision_layouts():
    for arch in ("resnet18", "resnet34", "resnet50"):
        shapes = {k: v.shape for k, v in getattr(torchvision.models, arch)().state_dict().items()}
        assert describe_resnet(shapes).endswith(f"the layout of {arch}")


def test_torchvision_weight_names():
    W = torchvision.models
    assert parse_torchvision_weights("torchvision:ResNet50_Weights.IMAGENET1K_V2") is W.ResNet50_Weights.IMAGENET1K_V2
    assert parse_torchvision_weights("torchvision:ResNet50_Weights.DEFAULT") is W.ResNet50_Weights.IMAGENET1K_V2
    assert parse_torchvision_weights("imagenet", "resnet18") is W.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(ValueError) as error:
        parse_torchvision_weights("torchvision:ResNet50_Weights.NOPE")
    message = str(error.value)
    assert "unknown torchvision weights 'ResNet50_Weights.NOPE'" in message
    for name in ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT"):
        assert f"torchvision:ResNet50_Weights.{name}" in message
    assert "ResNet18" not in message and message.count("DEFAULT") == 1
    with pytest.raises(ValueError, match="ResNet18_Weights.IMAGENET1K_V1.*ResNet50_Weights.IMAGENET1K_V2"):
        parse_torchvision_weights("torchvision:ResNet51_Weights.IMAGENET1K_V1")


def _fail(*args, **kwargs):
    raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")


def test_torchvision_weights_offline_say_how_to_pass_a_local_file(monkeypatch):
    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", _fail)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    for load in (lambda: load_backbone_weights(torchvision.models.resnet18(), f"torchvision:{weights}"),
                 lambda: load_resnet("resnet18", "imagenet")):
        with pytest.raises(CheckpointError) as error:
            load()
        message = str(error.value)
        assert "Temporary failure in name resolution" in message
        assert torch.hub.get_dir() in message and weights.url in message
        assert "pass the local file's path to --init" in message


def test_torchvision_weights_of_another_depth_are_refused_before_downloading(monkeypatch):
    monkeypatch.setattr(torchvision.models.ResNet50_Weights, "get_state_dict", _fail)
    with pytest.raises(CheckpointError, match="another architecture; the model is resnet18.*ResNet18_Weights"):
        load_backbone_weights(torchvision.models.resnet18(), "torchvision:ResNet50_Weights.DEFAULT")


def test_torchvision_weights_into_a_detector_through_load_pretrained(resnet18_state, monkeypatch):
    calls = []

    def local_state_dict(self, progress=True, **kwargs):
        calls.append(self)
        return dict(resnet18_state)

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", local_state_dict)
    torch.manual_seed(3)
    detector = build_detector("faster_rcnn", num_classes=3, backbone="resnet18", norm="frozen_bn", **SMALL)
    fresh = {k: v.clone() for k, v in detector.state_dict().items()}
    lines = []
    report = load_pretrained(detector, "torchvision:ResNet18_Weights.IMAGENET1K_V1", log=lines.append)
    assert calls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    for key, value in detector.state_dict().items():
        if key.startswith("backbone.body."):
            assert torch.equal(value, resnet18_state[key[len("backbone.body."):]]), key
        else:
            assert torch.equal(value, fresh[key]), key
    assert len(report["loaded"]) == 100 and all(k.startswith("backbone.body.") for k in report["loaded"])
    assert report["unexpected"] == ["fc.weight", "fc.bias"] and report["mismatched"] == []
    assert any(k.startswith("roi_heads.box_predictor.") for k in report["reinitialised"])
    assert lines[0] == ("init backbone resnet18 from torchvision:ResNet18_Weights.IMAGENET1K_V1 "
                        "(top level, no prefix)")
    assert lines[1:4] == ["  loaded 100/100 tensors", "  missing: none",
                          "  unexpected (ignored): 2: fc.weight, fc.bias"]
    assert lines[4].startswith("  rest of the model (initialised as usual): backbone.fpn.*, rpn.head.*")
    # The old shortcut goes the same way.
    load_pretrained(detector, "imagenet", log=lambda *a: None)
    assert calls[-1] is torchvision.models.ResNet18_Weights.IMAGENET1K_V1


def test_load_pretrained_tells_backbone_layouts_from_detectors(resnet18_state, tmp_path):
    # mmselfsup's 'backbone.' keys are a backbone, not a detector (whose keys are 'backbone.body.').
    save_checkpoint(LAYOUTS["DenseCL / mmselfsup"][0](resnet18_state), tmp_path / "densecl.pth")
    detector = build_detector("faster_rcnn", num_classes=3, backbone="resnet18", norm="bn", **SMALL)
    report = load_pretrained(detector, tmp_path / "densecl.pth", log=lambda *a: None)
    assert len(report["loaded"]) == 120  # with BatchNorm2d's num_batches_tracked
    assert torch.equal(detector.backbone.body.layer3[1].bn2.running_mean, resnet18_state["layer3.1.bn2.running_mean"])
    # A whole detector still loads whole.
    save_checkpoint({"model": detector.state_dict()}, tmp_path / "detector.pth")
    other = build_detector("faster_rcnn", num_classes=3, backbone="resnet18", norm="bn", **SMALL)
    report = load_pretrained(other, tmp_path / "detector.pth", keep_heads=True, log=lambda *a: None)
    assert any(k.startswith("rpn.") for k in report["loaded"])
    predictor = detector.roi_heads.box_predictor
    assert torch.equal(other.roi_heads.box_predictor.cls_score.weight, predictor.cls_score.weight)
    # A ResNet-50 backbone into the ResNet-18 detector: refused, not loaded in part.
    save_checkpoint({"backbone": _trunk(_random_state("resnet50", 2))}, tmp_path / "r50.pth")
    with pytest.raises(CheckpointError, match="does not fit resnet18.*the layout of resnet50"):
        load_pretrained(other, tmp_path / "r50.pth", log=lambda *a: None)
