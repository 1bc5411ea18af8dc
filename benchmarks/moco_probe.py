"""Can MoCo v2 learn the demo's digits when nothing but the digit identifies an image?

The demo's object images paste a coloured MNIST digit onto a 64-px crop of a background photo
(``aligndet/data/demo.py``). Both MoCo views of an image are crops of the same picture, so the
background patch and the digit's colour tell instances apart without any digit shape. This
rebuilds the demo's 4,000 training object images from their layers (background, digit mask,
colour: the same images as ``data/demo/objects/train``) and, for each view independently,
can paste the digit onto a fresh crop of a random background photo (``--swap``) and give it a
fresh colour (``--recolour``), before MoCo v2's usual augmentation. With both at 1, only the
digit's shape (and the crop's scale and position) is shared by the two views.

It trains ``aligndet.pretrain.moco.MoCo`` with ``train_image.py``'s demo MoCo v2 preset (ResNet-18,
batch 64 (``--batch-size``), SGD lr 0.24 per 256, one warm-up epoch then cosine over ``--total-epochs``, queue
1,024, m 0.99, T 0.2) and prints, every epoch, the loss, the instance top-1 and the k-NN top-1
on the digit classes of the 1,000 val object images (bank: the training images as stored).
``--optimizer adamw`` trains with the demo supervised preset's AdamW instead (lr 0.016 per 256, wd 0.05);
``--crop-scale`` and ``--blur-sigma`` change MoCo v2's crops and blur.
``--queue-size`` and ``--momentum`` change the queue's length and the key encoder's m.
``--in-batch-negatives`` adds the current batch's other keys to the queue's negatives: then a
positive cannot win only by being the one key in its logits made by this step's key encoder.
``--plain`` is the control: every image (training, bank and val) is its digit in white on black, with no
background photo and no colour, as in MNIST; ``--swap`` and ``--recolour`` are then ignored.
``--simclr`` swaps MoCo for a second, independent contrastive learner on the same encoder, head and views:
SimCLR's NT-Xent over the 2B views of a batch (no momentum encoder, no queue, batch norm over the whole batch).

    python benchmarks/moco_probe.py --swap 1 --recolour 1 --epochs 5 --total-epochs 30
"""
import argparse
import math
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.data import demo  # noqa: E402
from aligndet.data.transforms import build_moco_v2_transform, classification_eval_transforms  # noqa: E402
from aligndet.pretrain.knn import extract_features, knn_top1  # noqa: E402
from aligndet.engine import cosine_lr  # noqa: E402
from aligndet.pretrain.moco import MoCo  # noqa: E402
from train_image import build_optimizer  # noqa: E402


def demo_object_layers(parts, split, count, seed=0):
    """[(background, alpha, colour, digit class)] of the demo's object images of ``split``, drawn
    with the demo build's own random streams (``build_demo``)."""
    digits, labels = demo.load_digits(parts["mnist_5k.csv.gz"])
    backgrounds = demo.load_backgrounds(parts)
    split_id = ("train", "val").index(split)
    pool = demo.split_digits(labels, seed)[split_id]
    layers = []
    for j in range(count):
        index = int(pool[j % len(pool)])
        layers.append((*demo.object_layers(demo.object_rng(seed, split, j), backgrounds, digits[index]),
                       int(labels[index])))
    return layers, backgrounds


class SwappedViews(torch.utils.data.Dataset):
    """Two MoCo views per object image, each with its own background (``swap``) and colour (``recolour``)."""

    def __init__(self, layers, backgrounds, view, swap, recolour, seed=1):
        self.layers, self.backgrounds, self.view = layers, backgrounds, view
        self.swap, self.recolour = swap, recolour
        self.rng = np.random.default_rng(seed)

    def __len__(self):
        return len(self.layers)

    def _one(self, index):
        background, alpha, colour, _ = self.layers[index]
        if self.rng.random() < self.swap:
            photo = self.backgrounds[int(self.rng.integers(len(self.backgrounds)))]
            background = demo._crop(self.rng, photo, demo.OBJECT_SIZE).astype(np.float32)
        if self.rng.random() < self.recolour:
            colour = demo._colour(self.rng)
        return self.view(Image.fromarray(demo.compose(background, alpha, colour)))

    def __getitem__(self, index):
        return self._one(index), self._one(index)


class InBatchMoCo(MoCo):
    """MoCo whose logits also hold the current batch's other keys as negatives."""

    def forward(self, im_q, im_k):
        self._awaiting_momentum_update = True
        q = self.encode_queries(im_q)
        k, all_k = self.encode_keys(im_k)
        in_batch = (q @ k.T).masked_fill(torch.eye(len(q), dtype=torch.bool, device=q.device), float("-inf"))
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone(), in_batch], 1) / self.temperature
        self._dequeue_and_enqueue(all_k)
        return {"loss_contrastive": F.cross_entropy(logits, logits.new_zeros(len(q), dtype=torch.long)),
                "acc_top1": (logits.argmax(1) == 0).float().mean()}


class SimCLR(torch.nn.Module):
    """NT-Xent (Chen et al., 2020): each view's positive is the other view of its image, the other 2B - 2
    views of the batch are its negatives."""

    def __init__(self, encoder, feature_dim, dim=128, temperature=0.2):
        super().__init__()
        self.backbone_q = encoder
        self.head = torch.nn.Sequential(torch.nn.Linear(feature_dim, feature_dim), torch.nn.ReLU(inplace=True),
                                        torch.nn.Linear(feature_dim, dim))
        self.temperature = temperature

    def forward(self, im_q, im_k):
        z = F.normalize(self.head(self.backbone_q(torch.cat([im_q, im_k]))), dim=1)  # [2B, dim]
        n = len(im_q)
        logits = (z @ z.T / self.temperature).fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return {"loss_contrastive": F.cross_entropy(logits, target),
                "acc_top1": (logits.argmax(1) == target).float().mean()}

    def after_step(self, step):
        pass


def plain_layers(layers):
    """The same digits, sizes and places in white on a black background."""
    return [(np.zeros_like(background), alpha, np.full(3, 255.0, np.float32), label)
            for background, alpha, _, label in layers]


def stored_set(layers, transform, batch=256):
    """[(images, digit classes)] batches of the images as the demo stores them."""
    images = torch.stack([transform(Image.fromarray(demo.compose(*layer[:3]))) for layer in layers])
    labels = torch.tensor([layer[3] for layer in layers])
    return [(images[i:i + batch], labels[i:i + batch]) for i in range(0, len(images), batch)]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--swap", type=float, default=1.0, help="probability that a view gets a new background")
    p.add_argument("--recolour", type=float, default=0.0, help="probability that a view's digit gets a new colour")
    p.add_argument("--plain", action="store_true", help="white digits on black, no photo, no colour (the control)")
    p.add_argument("--simclr", action="store_true", help="SimCLR's in-batch loss in place of MoCo (the control)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (the demo preset's 64)")
    p.add_argument("--in-batch-negatives", action="store_true", help="the batch's other keys are negatives too")
    p.add_argument("--shuffle-splits", type=int, default=8, help="shuffle-BN groups (the demo preset's 8)")
    p.add_argument("--queue-size", type=int, default=1024, help="negative keys kept (the demo preset's 1,024)")
    p.add_argument("--momentum", type=float, default=0.99, help="m of the key encoder's EMA (the demo preset's 0.99)")
    p.add_argument("--epochs", type=int, default=3, help="epochs to run")
    p.add_argument("--total-epochs", type=int, default=10, help="length of the cosine schedule")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: the demo MoCo v2 preset's; adamw: the demo supervised preset's")
    p.add_argument("--lr", type=float, help="per 256 images (default: 0.24 for sgd, 0.016 for adamw)")
    p.add_argument("--weight-decay", type=float, help="default: 5e-4 for sgd, 0.05 for adamw")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), help="random-resized-crop area range")
    p.add_argument("--blur-sigma", type=float, nargs=2, default=(0.1, 2.0), help="Gaussian-blur sigma range (px)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    parts = demo.fetch_parts()
    train, backgrounds = demo_object_layers(parts, "train", 4000)
    val, _ = demo_object_layers(parts, "val", 1000)
    swap, recolour = args.swap, args.recolour
    if args.plain:
        train, val = plain_layers(train), plain_layers(val)
        swap = recolour = 0.0
    view = build_moco_v2_transform(64, tuple(args.crop_scale), blur_sigma=tuple(args.blur_sigma), jitter_strength=0.5,
                                   grayscale=0.2)
    evaluation = classification_eval_transforms(64, 64)
    bank, val_set = stored_set(train, evaluation), stored_set(val, evaluation)

    resnet = torchvision.models.resnet18(weights=None)
    resnet.fc = torch.nn.Identity()
    if args.simclr:
        model = SimCLR(resnet, 512)
    else:
        model = (InBatchMoCo if args.in_batch_negatives else MoCo)(
            resnet, 512, queue_size=args.queue_size, momentum=args.momentum, temperature=0.2,
            shuffle_splits=args.shuffle_splits)
    adamw = args.optimizer == "adamw"
    base_lr = (args.lr or (0.016 if adamw else 0.24)) * args.batch_size / 256
    weight_decay = args.weight_decay if args.weight_decay is not None else (0.05 if adamw else 5e-4)
    optimizer = build_optimizer(model, SimpleNamespace(optimizer=args.optimizer, weight_decay=weight_decay,
                                                       momentum=0.9), base_lr)
    loader = torch.utils.data.DataLoader(SwappedViews(train, backgrounds, view, swap, recolour),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True)
    per_epoch, step = len(loader), 0
    if args.simclr:
        chance = math.log(2 * args.batch_size - 1)
    else:
        chance = math.log(1 + args.queue_size + (args.batch_size - 1 if args.in_batch_negatives else 0))  # ln(logits)
    total = args.total_epochs * per_epoch

    def knn():
        bank_features, bank_labels = extract_features(model.backbone_q, bank, "cpu")
        val_features, val_labels = extract_features(model.backbone_q, val_set, "cpu")
        return knn_top1(bank_features, bank_labels, val_features, val_labels, k=20)

    print(f"epoch 0: k-NN top-1 {knn():.3f} (chance 0.100)", flush=True)
    for epoch in range(1, args.epochs + 1):
        t0, losses, accuracies = time.time(), [], []
        for im_q, im_k in loader:
            for group in optimizer.param_groups:  # warm-up from 0 over the first epoch, then cosine
                group["lr"] = cosine_lr(step, base_lr, total, per_epoch, warmup_factor=0.0)
            out = model(im_q, im_k)
            optimizer.zero_grad()
            out["loss_contrastive"].backward()
            optimizer.step()
            model.after_step(step)
            step += 1
            losses.append(out["loss_contrastive"].item())
            accuracies.append(out["acc_top1"].item())
        print(f"epoch {epoch}: loss {np.mean(losses):.3f} (chance {chance:.2f}), instance top-1 "
              f"{np.mean(accuracies):.3f}, k-NN top-1 {knn():.3f}, {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
