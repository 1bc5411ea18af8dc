"""Fine-tuning transforms: ``(image, target) -> (image, target)``.

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
