"""ResNet trunk from torchvision.models and a feature pyramid on top of it."""
from collections import OrderedDict

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from .weights import load_backbone_weights

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
STAGES = ("conv1", "layer1", "layer2", "layer3", "layer4")  # stem counts as stage 0
NORM_LAYERS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "sync_bn": nn.BatchNorm2d}


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
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(RESNETS)}")
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
    """ResNet body + FPN: returns an OrderedDict of pyramid levels, each
    [B, out_channels, H / stride, W / stride].

    extra: "maxpool" adds a stride-2 max-pooled level on top (Faster R-CNN's
    P6), "p6p7" adds two conv levels (RetinaNet / FCOS), None adds nothing.
    """

    def __init__(self, body: ResNetBody, out_channels: int = 256, extra="maxpool"):
        super().__init__()
        self.body = body
        stage_channels = body.stage_channels()
        in_channels = [stage_channels[i - 1] for i in body.returned_layers]
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
                   returned_layers=(1, 2, 3, 4), fpn_channels=256, extra="maxpool") -> BackboneWithFPN:
    resnet = load_resnet(name, weights, norm)
    body = ResNetBody(resnet, trainable_layers, returned_layers)
    if norm == "sync_bn" and torch.distributed.is_available() and torch.distributed.is_initialized():
        body = nn.SyncBatchNorm.convert_sync_batchnorm(body)
    return BackboneWithFPN(body, fpn_channels, extra)
