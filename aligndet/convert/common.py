"""What every converter shares: the backbone's name and normalisation, and
the checks that the input side matches torchvision's."""
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN as TVBackboneWithFPN

from aligndet.models.backbone import NORM_LAYERS, RESNETS
from aligndet.models.transform import IMAGENET_MEAN, IMAGENET_STD


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
    return next(k for k, v in NORM_LAYERS.items() if isinstance(body.bn1, v))


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
    resnet = getattr(torchvision.models, resnet_name(body))(weights=None, norm_layer=NORM_LAYERS[norm_name(body)])
    returned = {f"layer{i}": str(k) for k, i in enumerate(body.returned_layers)}
    in_channels = [body.stage_channels()[i - 1] for i in body.returned_layers]
    return TVBackboneWithFPN(resnet, returned, in_channels, backbone.out_channels, extra_blocks=extra_blocks)


def load_converted(src, dst, rename):
    """Copy ``src``'s weights (renamed) and frozen flags into ``dst``, in ``src``'s train/eval mode."""
    dst.load_state_dict({rename(k): v for k, v in src.state_dict().items()}, strict=True)
    copy_trainable_flags(src, dst, rename)
    return dst.train(src.training)
