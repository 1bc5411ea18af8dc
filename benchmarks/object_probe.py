"""What does a stage-1 backbone encode of a demo object image: the digit, or the photo behind it?

The demo's object-centric images (``aligndet/data/demo.py``) paste a coloured MNIST digit onto a
64-px crop of one of twelve background photos. This draws fresh images of that kind with both
labels known, takes each backbone's pooled features, and prints the weighted k-NN top-1
(``aligndet/pretrain/knn.py``) for the digit (10 classes) and for the background photo (12).
A backbone that learned the objects scores high on the first; one that learned the
backgrounds, high on the second. ``random`` is an untrained ResNet-18.

    python benchmarks/object_probe.py random outputs/abl/stage1_sup/checkpoint.pth \\
        outputs/moco/scale05/checkpoint.pth
"""
import argparse
import os
import sys

import numpy as np
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.data import demo  # noqa: E402
from aligndet.data.transforms import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from aligndet.models.weights import load_backbone_weights  # noqa: E402
from aligndet.pretrain.knn import knn_top1  # noqa: E402


def object_images(backgrounds, digits, digit_labels, count, seed=0):
    """``count`` demo object images (normalised [N, 3, 64, 64]) with their digit and background labels."""
    rng = np.random.default_rng(seed)
    images, digit, background = [], [], []
    for _ in range(count):
        b, d = int(rng.integers(len(backgrounds))), int(rng.integers(len(digits)))
        images.append(demo.make_object(rng, [backgrounds[b]], digits[d]))  # one photo: its label is known
        digit.append(int(digit_labels[d]))
        background.append(b)
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x, torch.tensor(digit), torch.tensor(background)


@torch.no_grad()
def pooled_features(source, images, arch="resnet18", batch=200):
    """[N, C] global-pooled features of ``images`` by the backbone in ``source`` ("random": untrained)."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)()
    net.fc = torch.nn.Identity()
    if source != "random":
        load_backbone_weights(net, source, log=lambda *a: None)
    net.eval()
    return torch.cat([net(chunk) for chunk in images.split(batch)])


def probe(features, labels, bank_fraction=2 / 3):
    """{name: k-NN top-1} for each ``labels[name]``, the first ``bank_fraction`` of the images as the bank."""
    n = int(len(features) * bank_fraction)
    return {name: knn_top1(features[:n], y[:n], features[n:], y[n:]) for name, y in labels.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("backbones", nargs="+", help="'random', or anything finetune.py --init reads as backbone "
                   "weights (train_image.py checkpoints, MoCo checkpoints, torchvision:<Enum>.<NAME>)")
    p.add_argument("--images", type=int, default=2400, help="images drawn; two thirds form the k-NN bank")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="where the demo's digits and photos are cached (as for the demo dataset)")
    args = p.parse_args()
    paths = demo.fetch_parts(args.cache_dir)
    digits, digit_labels = demo.load_digits(paths["mnist_5k.csv.gz"])
    backgrounds = demo.load_backgrounds(paths)
    images, digit, background = object_images(backgrounds, digits, digit_labels, args.images, args.seed)
    print(f"{args.images} demo object images; chance: digit {1 / 10:.3f}, background {1 / len(backgrounds):.3f}")
    print("| backbone | k-NN top-1, digit | k-NN top-1, background photo |")
    print("|---|---|---|")
    for source in args.backbones:
        result = probe(pooled_features(source, images, args.arch), {"digit": digit, "background": background})
        print(f"| {source} | {result['digit']:.3f} | {result['background']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
