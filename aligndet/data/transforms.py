"""Transforms: fine-tuning ``(image, target) -> (image, target)`` and image-domain
pre-training (ImageNet classification, MoCo v2's two views).

Built from ``torchvision.transforms.v2``, which moves ``target["boxes"]``
(``tv_tensors.BoundingBoxes``, as ``CocoDetection`` hands them over) together
with the image. The output image is a float32 ``[3, H, W]`` tensor in ``[0, 1]``.

No resizing or normalisation here: the detector does both inside, like
torchvision's detection models, so predictions come back in the coordinates
of the image given to it.

A horizontal flip cannot make a box degenerate, so no
``SanitizeBoundingBoxes`` is needed. Append one (it finds ``target["labels"]``
by itself) if you add crops or zooms that can push boxes off the image.
"""
import torch
from torchvision.transforms import v2 as T

from aligndet.models.transform import IMAGENET_MEAN, IMAGENET_STD


def train_transforms(hflip_prob=0.5):
    """PIL/tensor image -> float image, with a random horizontal flip of image and boxes."""
    return T.Compose([
        T.ToImage(),
        T.RandomHorizontalFlip(p=hflip_prob),
        T.ToDtype(torch.float32, scale=True),  # images only; boxes keep their dtype
    ])


def eval_transforms():
    """PIL/tensor image -> float image in [0, 1]; boxes untouched."""
    return T.Compose([
        T.ToImage(),
        T.ToDtype(torch.float32, scale=True),
    ])


# Image-domain pre-training (train_image.py): PIL image -> float tensor [3, S, S], normalised
# with the ImageNet mean and std the detectors use (aligndet/models/transform.py).
def classification_train_transforms(size=224, scale=(0.08, 1.0), hflip_prob=0.5):
    """The standard ImageNet training augmentation: random resized crop and flip."""
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=scale, antialias=True),
        T.RandomHorizontalFlip(p=hflip_prob),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def classification_eval_transforms(size=224, resize=256):
    """Resize the short side to ``resize``, centre-crop ``size``."""
    return T.Compose([
        T.ToImage(),
        T.Resize(resize, antialias=True),
        T.CenterCrop(size),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_moco_v2_transform(size=224, scale=(0.2, 1.0), blur=True, blur_sigma=(0.1, 2.0), jitter_strength=0.5,
                            grayscale=0.2):
    """MoCo v2's augmentation (its ``aug_plus``): PIL image -> float tensor
    [3, size, size], normalised with the ImageNet mean and std. The blur
    kernel is ~10% of ``size`` (odd, at least 3), as in SimCLR; its sigma range
    ``blur_sigma`` (pixels) is SimCLR's for 224-px crops by default. Colour
    jitter has SimCLR's strength parameterisation, (0.8 s, 0.8 s, 0.8 s, 0.2 s)
    for brightness, contrast, saturation and hue; MoCo v2 uses s = 0.5 and
    grayscale with probability 0.2."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.Compose([
        T.ToImage(),
        T.RandomResizedCrop(size, scale=scale, antialias=True),
        T.RandomApply([T.ColorJitter(*[0.8 * jitter_strength] * 3, min(0.5, 0.2 * jitter_strength))], p=0.8),
        T.RandomGrayscale(p=grayscale),
        *([T.RandomApply([T.GaussianBlur(kernel, sigma=tuple(blur_sigma))], p=0.5)] if blur else []),
        T.RandomHorizontalFlip(),
        T.ToDtype(torch.float32, scale=True),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        T.ToPureTensor(),
    ])


class TwoCrops:
    """Two independent draws of ``transform`` on one image: MoCo's query and key views."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image):
        return self.transform(image), self.transform(image)
