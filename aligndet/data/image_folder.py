"""Object-centric images for image-domain pre-training (stage 1): an ImageNet-style
folder tree ``root/<class>/<image>`` or, for self-supervised methods, any folder.

Unlike ``torchvision.datasets.ImageFolder`` it does not stop at the first bad
input of a large tree:

- a class folder without images is named, counted and left out of the class
  list (pass the training set's ``classes`` to the validation set so indices
  agree; val images of a class training lacks are counted and skipped);
- an unreadable file is skipped when it is loaded: ``__getitem__`` returns
  ``None``, ``collate_skipping`` drops it from the batch and counts it, and
  the first failure of each file is printed with its path and the reason.

Labels are class indices in sorted folder-name order, or ``-1`` for an image
that sits directly in ``root`` (no class).
"""
import os
import sys

import torch
from PIL import Image

from aligndet.data.images import ImageReadError, list_image_folder, read_rgb


class ImageFolder(torch.utils.data.Dataset):
    """Images under ``root``, labelled by their first-level folder.

    Args:
        root: the folder tree.
        transform: PIL image -> tensor (or anything, e.g. two views).
        classes: class names to use instead of ``root``'s folders (pass the
            training set's to a validation set, so indices agree).
    """

    def __init__(self, root, transform=None, classes=None):
        records = list_image_folder(root)  # FileNotFoundError if root is missing
        found = sorted({r.key.split("/")[0] for r in records if "/" in r.key}
                       | {e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")})
        with_images = {r.key.split("/")[0] for r in records if "/" in r.key}
        self.empty_classes = [c for c in found if c not in with_images]
        self.classes = list(classes) if classes is not None else [c for c in found if c in with_images]
        index = {c: i for i, c in enumerate(self.classes)}
        self.root, self.transform = root, transform
        self.samples, unknown = [], 0
        for r in records:
            folder = r.key.split("/")[0] if "/" in r.key else None
            if folder is not None and folder not in index:
                unknown += 1
                continue
            self.samples.append((r.path, index[folder] if folder is not None else -1))
        self.unknown_class_images = unknown
        self.unlabeled = sum(label < 0 for _, label in self.samples)
        if not self.samples:
            raise ValueError(f"no images under {root} (extensions: .jpg .png ...)")

    def __len__(self):
        return len(self.samples)

    @property
    def labeled(self):
        """True when every image has a class (a classification / k-NN set)."""
        return self.unlabeled == 0 and len(self.classes) > 1

    def summary(self):
        """One line on what was found, bad input included."""
        parts = [f"{len(self.samples)} images in {self.root}"]
        if self.classes:
            parts.append(f"{len(self.classes)} classes")
        if self.unlabeled:
            parts.append(f"{self.unlabeled} outside any class folder")
        if self.empty_classes:
            shown = ", ".join(self.empty_classes[:10]) + (" ..." if len(self.empty_classes) > 10 else "")
            parts.append(f"{len(self.empty_classes)} empty class folders skipped ({shown})")
        if self.unknown_class_images:
            parts.append(f"{self.unknown_class_images} images in folders that are not training classes, skipped")
        return ", ".join(parts)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            image = Image.fromarray(read_rgb(path))
        except ImageReadError as e:
            print(f"warning: skipping {e}", file=sys.stderr, flush=True)
            return None
        return (self.transform(image) if self.transform else image), label


def collate_skipping(batch):
    """Stack ``(image, label)`` samples, dropping unreadable ones (``None``).

    Returns ``(images, labels, skipped)``; images is a tensor ``[B, 3, H, W]``
    or a tuple of such tensors when the transform makes several views. With
    every sample unreadable, images is an empty list.
    """
    kept = [s for s in batch if s is not None]
    skipped = len(batch) - len(kept)
    if not kept:
        return [], torch.zeros(0, dtype=torch.int64), skipped
    images, labels = zip(*kept)
    if isinstance(images[0], (tuple, list)):  # several views per image
        images = tuple(torch.stack(views) for views in zip(*images))
    else:
        images = torch.stack(images)
    return images, torch.as_tensor(labels, dtype=torch.int64), skipped
