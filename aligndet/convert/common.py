"""What every converter shares: the backbone's name and normalisation, and
the checks that the input side matches torchvision's."""
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN as TVBackboneWithFPN

from aligndet.models.backbone import FEATURE_FAMILIES, NORM_LAYERS, RESNETS, FeatureBody
from aligndet.models.transform import IMAGENET_MEAN, IMAGENET_STD

# torchvision's MobileNet detectors (fasterrcnn_mobilenet_v3_large_fpn) put an IntermediateLayerGetter over the
# classifier's ``features`` blocks: its keys are backbone.body.<block>..., ours backbone.body.features.<block>...
TV_FEATURES, OUR_FEATURES = "backbone.body.", "backbone.body.features."


def resnet_name(body: nn.Module) -> str:
    """Tell the ResNet depth from the number of blocks per stage."""
    blocks = tuple(len(getattr(body, f"layer{i}")) for i in range(1, 5))
    bottleneck = hasattr(body.layer1[0], "conv3")
    depths = {(2, 2, 2, 2, False): "resnet18", (3, 4, 6, 3, False): "resnet34", (3, 4, 6, 3, True): "resnet50",
              (3, 4, 23, 3, True): "resnet101", (3, 8, 36, 3, True): "resnet152"}
    name = depths.get(blocks + (bottleneck,))
    if name is None or name not in RESNETS:
        raise ValueError(f"unsupported backbone: ResNet stages with {blocks} blocks")
    return name


def norm_name(body: nn.Module) -> str:
    """The ``norm`` of a body (ours or torchvision's): the class of its first batch norm."""
    first = next((m for m in body.modules() if isinstance(m, tuple(NORM_LAYERS.values()))), None)
    return next(k for k, v in NORM_LAYERS.items() if isinstance(first, v)) if first is not None else "frozen_bn"


def body_settings(body: nn.Module) -> dict:
    """``backbone``, ``norm`` and ``returned_blocks`` of a body, ours or torchvision's (an
    IntermediateLayerGetter over a ResNet, or over a MobileNet's ``features`` blocks)."""
    if isinstance(body, FeatureBody):
        if body.returned_blocks is None:
            raise ValueError("only a features trunk read at given blocks (returned_blocks) converts")
        return dict(backbone=body.name, norm=norm_name(body), returned_blocks=body.returned_blocks)
    if hasattr(body, "layer1"):
        return dict(backbone=resnet_name(body), norm=norm_name(body))
    blocks = list(body.children())
    for name in FEATURE_FAMILIES:
        if name.startswith("mobilenet"):
            features = getattr(torchvision.models, name)().features
            if len(features) == len(blocks) and all(type(a) is type(b) for a, b in zip(features, blocks)):
                returned = tuple(sorted(int(k) for k in body.return_layers))
                return dict(backbone=name, norm=norm_name(body), returned_blocks=returned)
    raise ValueError(f"unsupported torchvision backbone body {type(body).__name__}")


def to_tv_backbone_key(key: str) -> str:
    return TV_FEATURES + key[len(OUR_FEATURES):] if key.startswith(OUR_FEATURES) else key


def from_tv_backbone_key(key: str) -> str:
    tail = key[len(TV_FEATURES):]
    return OUR_FEATURES + tail if key.startswith(TV_FEATURES) and tail[:1].isdigit() else key


def check_normalisation(transform):
    """Ours and torchvision's transform both carry image_mean / image_std."""
    for value, expected in ((transform.image_mean, IMAGENET_MEAN), (transform.image_std, IMAGENET_STD)):
        if any(abs(a - b) > 1e-6 for a, b in zip(value, expected)):
            raise ValueError(f"only ImageNet normalisation converts, got mean/std {value}")


def copy_trainable_flags(src: nn.Module, dst: nn.Module, rename):
    """Frozen backbone stages stay frozen across the conversion."""
    dst_params = dict(dst.named_parameters())
    for name, param in src.named_parameters():
        dst_params[rename(name)].requires_grad_(param.requires_grad)


def torchvision_backbone(backbone: nn.Module, extra_blocks) -> TVBackboneWithFPN:
    """torchvision's ResNet + FPN with the layout of our ``BackboneWithFPN``
    (same returned stages, FPN width and extra levels), randomly initialised:
    the converter loads the weights."""
    body = backbone.body
    s = body_settings(body)
    trunk = getattr(torchvision.models, s["backbone"])(weights=None, norm_layer=NORM_LAYERS[s["norm"]])
    if isinstance(body, FeatureBody):
        trunk, returned = trunk.features, {str(b): str(k) for k, b in enumerate(body.returned_blocks)}
    else:
        returned = {f"layer{i}": str(k) for k, i in enumerate(body.returned_layers)}
    return TVBackboneWithFPN(trunk, returned, body.returned_channels(), backbone.out_channels,
                             extra_blocks=extra_blocks)


def load_converted(src, dst, rename):
    """Copy ``src``'s weights (renamed) and frozen flags into ``dst``, in ``src``'s train/eval mode."""
    dst.load_state_dict({rename(k): v for k, v in src.state_dict().items()}, strict=True)
    copy_trainable_flags(src, dst, rename)
    return dst.train(src.training)
