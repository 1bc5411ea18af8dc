"""Backbone trunks from torchvision.models and a feature pyramid on top of them.

Two bodies give the outputs C2..C5 (strides 4, 8, 16, 32) of a torchvision classifier: ``ResNetBody``
for the ResNets and ResNeXts (torchvision's parameter names: conv1, layer1...), and ``FeatureBody`` for
the families whose trunk is a ``features`` sequence (Swin, ConvNeXt, MobileNet; names features.0...),
cut into a stem and four stages. Both load the classifier's state dicts as they are. Norms: the CNNs
take ``norm`` (BN, frozen BN or SyncBN); Swin and ConvNeXt keep their LayerNorms, and their stages are
frozen by ``requires_grad`` like every family's.
"""
from collections import OrderedDict

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from .weights import load_backbone_weights

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
           "wide_resnet50_2")
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")  # stem counts as stage 0
NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "sync_bn": nn.BatchNorm2d}
# The families with a ``features`` trunk: where each of the four stages starts in ``features`` (the stem is
# what comes before), whether its maps are channels-last, and whether it has batch norms ``norm`` replaces.
# Swin / ConvNeXt: features = stem, stage 1, then (downsampling, stage) x 3. MobileNet: a stage starts at each
# stride-2 block (torchvision's ``_is_cn``), so C2..C5 are the last maps at strides 4..32.
FEATURE_FAMILIES = {
    "swin_t": ((1, 2, 4, 6), True, False), "swin_s": ((1, 2, 4, 6), True, False),
    "swin_b": ((1, 2, 4, 6), True, False),
    "convnext_tiny": ((1, 2, 4, 6), False, False), "convnext_small": ((1, 2, 4, 6), False, False),
    "mobilenet_v2": ((2, 4, 7, 14), False, True), "mobilenet_v3_large": ((2, 4, 7, 13), False, True),
}
BACKBONES = RESNETS + tuple(FEATURE_FAMILIES)


def load_resnet(name: str, weights=None, norm: str = "frozen_bn", dilation: bool = False) -> nn.Module:
    """A torchvision ResNet.

    weights: None (random init), "imagenet" (torchvision's DEFAULT weights for
    ``name``), "torchvision:ResNet50_Weights.IMAGENET1K_V2" (any torchvision
    weights name; both download once, see ``weights.py`` for offline use), or
    the path of a checkpoint holding a ResNet (ours, MoCo, SwAV, DINO, DenseCL...).
    dilation: layer4 with stride 1 and dilation 2 (DETR's DC5; ResNet-50 and
    deeper only). The weights' shapes do not change, so every source loads.
    """
    if name not in RESNETS:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if norm not in NORM_LAYERS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_LAYERS)}")
    options = {}
    if dilation:
        if name in ("resnet18", "resnet34"):
            raise ValueError(f"dilation needs a bottleneck ResNet (resnet50 or deeper), got {name}")
        options["replace_stride_with_dilation"] = [False, False, True]
    resnet = getattr(torchvision.models, name)(weights=None, norm_layer=NORM_LAYERS[norm], **options)
    if weights is not None:
        load_backbone_weights(resnet, weights, log=(lambda *a: None) if _other_rank() else print, arch=name)
    return resnet


def load_classifier(name: str, weights=None, norm: str = "frozen_bn") -> nn.Module:
    """A torchvision classifier of a ``FEATURE_FAMILIES`` name (weights as for ``load_resnet``); its batch
    norms are ``norm``'s, where it has any (MobileNet), and LayerNorm stays LayerNorm (Swin, ConvNeXt)."""
    if name not in FEATURE_FAMILIES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    if norm not in NORM_LAYERS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORM_LAYERS)}")
    options = {"norm_layer": NORM_LAYERS[norm]} if FEATURE_FAMILIES[name][2] else {}
    model = getattr(torchvision.models, name)(weights=None, **options)
    if weights is not None:
        load_backbone_weights(model, weights, log=(lambda *a: None) if _other_rank() else print, arch=name)
    return model


class FeatureBody(nn.Module):
    """The ``features`` trunk of a torchvision classifier (Swin, ConvNeXt, MobileNet) cut into a stem and
    four stages, returning the chosen stages' outputs as [B, C, H / stride, W / stride] maps (channels-last
    maps, Swin's, are permuted). Parameter names are the classifier's (features.0...), so its state dicts
    load directly. ``trainable_layers`` and ``returned_layers`` mean what they mean for ``ResNetBody``;
    ``returned_blocks`` (indices into ``features``) returns the outputs of those blocks instead, e.g.
    (13, 16) for the two maps torchvision's ``fasterrcnn_mobilenet_v3_large_fpn`` puts its FPN on.
    ``name``: the torchvision builder the features come from.
    """

    def __init__(self, features: nn.Sequential, starts, channels_last=False, trainable_layers: int = 3,
                 returned_layers=(1, 2, 3, 4), returned_blocks=None, name=None):
        super().__init__()
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        if returned_blocks is not None and not all(0 <= b < len(features) for b in returned_blocks):
            raise ValueError(f"returned_blocks must index the {len(features)} blocks of features, got "
                             f"{returned_blocks}")
        self.features, self.name = features, name
        self.bounds = list(zip((0, *starts), (*starts, len(features))))  # [start, end) of stem, stage 1..4
        self.channels_last, self.returned_layers = channels_last, tuple(returned_layers)
        self.returned_blocks = None if returned_blocks is None else tuple(returned_blocks)
        for stage, (start, end) in enumerate(self.bounds):
            trainable = stage >= 5 - trainable_layers
            for block in list(features)[start:end]:
                block.requires_grad_(trainable)
        was_training = self.training
        self.eval()  # the channels of C2..C5 from one small forward, in eval mode: batch-norm statistics stay
        with torch.no_grad():
            x = torch.zeros(1, 3, 64, 64)
            self._channels = [t.shape[1] for t in self._stages(x, range(1, 5)).values()]
            self._returned_channels = [t.shape[1] for t in self.forward(x).values()]
        self.train(was_training)

    def stage_channels(self):
        """Output channels of stages 1..4."""
        return list(self._channels)

    def returned_channels(self):
        """Channels of each map ``forward`` returns, in order."""
        return list(self._returned_channels)

    def stage(self, i):
        """The modules of stage ``i`` (0: the stem)."""
        start, end = self.bounds[i]
        return list(self.features)[start:end]

    def _stages(self, x, returned):
        out = OrderedDict()
        for stage, (start, end) in enumerate(self.bounds):
            for block in list(self.features)[start:end]:
                x = block(x)
            if stage in returned:  # named "0", "1", ... in order, as ResNetBody's
                out[str(len(out))] = x.permute(0, 3, 1, 2) if self.channels_last else x
            if stage == max(returned):
                break
        return out

    def forward(self, x):
        if self.returned_blocks is None:
            return self._stages(x, self.returned_layers)
        out = OrderedDict()
        for i, block in enumerate(list(self.features)[:max(self.returned_blocks) + 1]):
            x = block(x)
            if i in self.returned_blocks:
                out[str(len(out))] = x.permute(0, 3, 1, 2) if self.channels_last else x
        return out


def build_body(name="resnet50", weights=None, norm="frozen_bn", trainable_layers=3, returned_layers=(1, 2, 3, 4),
               dilation=False, returned_blocks=None) -> nn.Module:
    """The trunk of any ``BACKBONES`` name: a ``ResNetBody`` or a ``FeatureBody`` returning ``returned_layers``
    (stages 1-4; ``FeatureBody``: or ``returned_blocks``), SyncBN under torch.distributed for
    ``norm="sync_bn"``. ``dilation``: ResNets only (DC5)."""
    if name in FEATURE_FAMILIES:
        if dilation:
            raise ValueError(f"dilation is for bottleneck ResNets, not {name}")
        starts, channels_last, _ = FEATURE_FAMILIES[name]
        body = FeatureBody(load_classifier(name, weights, norm).features, starts, channels_last, trainable_layers,
                           returned_layers, returned_blocks, name)
    else:
        if returned_blocks is not None:
            raise ValueError(f"returned_blocks is for the features trunks ({', '.join(FEATURE_FAMILIES)}), not {name}")
        body = ResNetBody(load_resnet(name, weights, norm, dilation=dilation), trainable_layers, returned_layers)
    if norm == "sync_bn" and torch.distributed.is_available() and torch.distributed.is_initialized():
        body = nn.SyncBatchNorm.convert_sync_batchnorm(body)
    return body


def remove_classifier(model: nn.Module) -> int:
    """Replace the last ``nn.Linear`` of a torchvision classifier (ResNet's ``fc``, Swin's ``head``, the
    end of ConvNeXt's or MobileNet's ``classifier``) by ``nn.Identity``, so that ``model(x)`` gives the
    pooled features [B, C]; returns C. What precedes it stays (ConvNeXt's LayerNorm, MobileNetV3's 1280-wide
    layer), as in the classifier the weights were trained in."""
    name, last = next(((n, m) for n, m in reversed(list(model.named_modules())) if isinstance(m, nn.Linear)),
                      (None, None))
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier to remove")
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return last.in_features


def _other_rank():
    """True on ranks other than 0 under torch.distributed, which stay silent about
    the weights (torch only, so ``models/`` copies out without our distributed helpers)."""
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


class ResNetBody(nn.Module):
    """The ResNet without its classifier, returning the outputs of the chosen
    stages. Parameter names are torchvision's (conv1, bn1, layer1...), so
    ResNet state dicts load directly.

    Args:
        trainable_layers: how many of the last stages (layer4, layer3, ...,
            conv1) train; 5 trains all, 0 freezes the trunk.
        returned_layers: stage numbers (1-4) whose outputs are returned.
    """

    def __init__(self, resnet: nn.Module, trainable_layers: int = 3, returned_layers=(1, 2, 3, 4)):
        super().__init__()
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(resnet, name))
        self.returned_layers = tuple(returned_layers)
        trainable = STAGES[len(STAGES) - trainable_layers:]
        for name, param in self.named_parameters():
            stage = "conv1" if name.startswith(("conv1", "bn1")) else name.split(".")[0]
            param.requires_grad_(stage in trainable)

    def stage(self, i):
        """The modules of stage ``i`` (0: the stem)."""
        return [self.conv1, self.bn1] if i == 0 else [getattr(self, f"layer{i}")]

    def returned_channels(self):
        """Channels of each map ``forward`` returns, in order."""
        return [self.stage_channels()[i - 1] for i in self.returned_layers]

    def stage_channels(self):
        """Output channels of layer1..layer4."""
        return [self._out_channels(getattr(self, f"layer{i}")) for i in range(1, 5)]

    @staticmethod
    def _out_channels(layer):
        last = layer[-1]
        return (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = OrderedDict()
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            if i in self.returned_layers:  # named "0", "1", ... in order, as in torchvision
                out[str(len(out))] = x
            if i == max(self.returned_layers):
                break
        return out


class BackboneWithFPN(nn.Module):
    """Body (``ResNetBody`` or ``FeatureBody``) + FPN: returns an OrderedDict of pyramid levels, each
    [B, out_channels, H / stride, W / stride].

    extra: "maxpool" adds a stride-2 max-pooled level on top (Faster R-CNN's
    P6), "p6p7" adds two conv levels (RetinaNet / FCOS), None adds nothing.
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra="maxpool"):
        super().__init__()
        self.body = body
        in_channels = body.returned_channels()
        if extra == "maxpool":
            extra_block = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7(out_channels, out_channels)
        elif extra is None:
            extra_block = None
        else:
            raise ValueError(f"unknown extra FPN block {extra!r}")
        self.fpn = FeaturePyramidNetwork(in_channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels

    def forward(self, x):
        return self.fpn(self.body(x))


def build_backbone(name="resnet50", weights=None, norm="frozen_bn", trainable_layers=3,
                   returned_layers=(1, 2, 3, 4), fpn_channels=256, extra="maxpool",
                   returned_blocks=None) -> BackboneWithFPN:
    return BackboneWithFPN(build_body(name, weights, norm, trainable_layers, returned_layers,
                                      returned_blocks=returned_blocks), fpn_channels, extra)
