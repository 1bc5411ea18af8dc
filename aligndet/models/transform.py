"""Input side of a detector: resize, normalise and batch images; map
detections back to the input images' coordinates."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_boxes(boxes: Tensor, old_size, new_size) -> Tensor:
    """Scale xyxy boxes [N, 4] from an (H, W) image to another (H, W)."""
    ratio_h = torch.tensor(new_size[0], dtype=torch.float32) / torch.tensor(old_size[0], dtype=torch.float32)
    ratio_w = torch.tensor(new_size[1], dtype=torch.float32) / torch.tensor(old_size[1], dtype=torch.float32)
    scale = torch.stack([ratio_w, ratio_h, ratio_w, ratio_h]).to(boxes.device)
    return boxes * scale


class DetectionTransform(nn.Module):
    """Resizes each image so its short side is `min_size` (long side at most
    `max_size`), normalises it, and pads the batch to a multiple of
    `size_divisible`.

    Args:
        min_size: short side in pixels; a tuple means one is drawn at random
            per image in training (multi-scale training), the last is used in eval.
        max_size: cap on the long side.
    """

    def __init__(self, min_size=800, max_size=1333, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                 size_divisible: int = 32):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        self.max_size = max_size
        self.image_mean = tuple(image_mean)
        self.image_std = tuple(image_std)
        self.size_divisible = size_divisible

    def resize(self, image: Tensor, target: dict = None):
        """image [3, H, W] -> resized image; target boxes (and masks, if any) scaled alike."""
        if self.training:  # torch's generator, so one seed fixes the whole step
            short = self.min_size[int(torch.rand(1).item() * len(self.min_size))]
        else:
            short = self.min_size[-1]
        h, w = image.shape[-2:]
        scale = min(short / min(h, w), self.max_size / max(h, w))
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear",
                              recompute_scale_factor=True, align_corners=False)[0]
        if target is not None:
            target = dict(target, boxes=resize_boxes(target["boxes"], (h, w), image.shape[-2:]))
            if "masks" in target:  # instance masks [N, H, W]: nearest, with the image's scale factor
                masks = F.interpolate(target["masks"][:, None].float(), scale_factor=scale, recompute_scale_factor=True)
                target["masks"] = masks[:, 0].byte()
        return image, target

    def forward(self, images, targets=None, resize: bool = True):
        """images: list of [3, H_i, W_i] floats in [0, 1]; targets: list of dicts
        with "boxes" [N_i, 4] xyxy pixels (optional). ``resize=False`` keeps the
        images' own sizes (box-domain pre-training: the views are already resized).

        Returns (batch [B, 3, H, W] normalised and zero-padded,
        image_sizes [(h_i, w_i)] after resizing, targets in resized coordinates).
        """
        for image in images:
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected images as [3, H, W] tensors, got shape {tuple(image.shape)}")
        mean = torch.tensor(self.image_mean, dtype=images[0].dtype, device=images[0].device)[:, None, None]
        std = torch.tensor(self.image_std, dtype=images[0].dtype, device=images[0].device)[:, None, None]
        resized, new_targets = [], []
        for i, image in enumerate(images):
            # Normalise before resizing (as torchvision does, so inputs match bit for bit).
            target = targets[i] if targets is not None else None
            image = (image - mean) / std
            if resize:
                image, target = self.resize(image, target)
            resized.append(image)
            new_targets.append(target)
        image_sizes = [tuple(im.shape[-2:]) for im in resized]
        stride = self.size_divisible
        pad_h = -(-max(s[0] for s in image_sizes) // stride) * stride
        pad_w = -(-max(s[1] for s in image_sizes) // stride) * stride
        batch = resized[0].new_zeros((len(resized), 3, pad_h, pad_w))
        for i, image in enumerate(resized):
            batch[i, :, : image.shape[1], : image.shape[2]] = image
        return batch, image_sizes, (new_targets if targets is not None else None)

    def postprocess(self, detections, image_sizes, original_sizes):
        """Scale detection boxes from resized back to original image sizes."""
        for det, size, original in zip(detections, image_sizes, original_sizes):
            det["boxes"] = resize_boxes(det["boxes"], size, original)
        return detections


def check_targets(targets, num_classes: int):
    """Clear errors for missing or malformed training targets, before they fail deep inside torch."""
    if targets is None:
        raise ValueError("targets are needed in training mode")
    for i, t in enumerate(targets):
        boxes, labels = t.get("boxes"), t.get("labels")
        if boxes is None or labels is None:
            raise ValueError(f"target {i} needs 'boxes' and 'labels'")
        if boxes.dim() != 2 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:1]:
            raise ValueError(f"target {i}: boxes must be [N, 4] and labels [N], got {tuple(boxes.shape)} "
                             f"and {tuple(labels.shape)}")
        if boxes.numel() and not bool(((boxes[:, 2:] > boxes[:, :2]).all())):
            bad = torch.nonzero((boxes[:, 2:] <= boxes[:, :2]).any(1)).flatten().tolist()
            raise ValueError(f"target {i}: boxes {bad} have zero or negative width/height (xyxy expected)")
        if labels.numel() and not (1 <= int(labels.min()) and int(labels.max()) <= num_classes):
            raise ValueError(f"target {i}: labels must lie in 1..{num_classes}, got {labels.tolist()}")
