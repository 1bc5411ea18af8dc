"""Transforms: fine-tuning ``(image, target) -> (image, target)`` and image-domain pre-training.

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


# Image-domain pre-training (train_image.py): PIL image -> normalised float tensor [3, S, S].
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


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
