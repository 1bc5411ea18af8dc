"""benchmarks/object_probe.py: demo object images with both labels, and a k-NN probe that reads them."""
import os
import sys

import numpy as np
import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from object_probe import object_images, pooled_features, probe  # noqa: E402


def _parts():
    rng = np.random.default_rng(0)
    # Three photos a random network tells apart (flat colours), and two "digits": a bar and a ring.
    backgrounds = [np.full((96, 96, 3), c, np.uint8) for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))]
    bar = np.zeros((28, 28), np.uint8)
    bar[4:24, 12:16] = 255
    yy, xx = np.mgrid[:28, :28]
    ring = (np.abs(np.hypot(yy - 13.5, xx - 13.5) - 9) < 2).astype(np.uint8) * 255
    digits = np.stack([bar, ring] * 5)
    return backgrounds, digits + rng.integers(0, 2, digits.shape, dtype=np.uint8), np.array([1, 7] * 5)


def test_object_images_carry_the_digit_and_the_background():
    backgrounds, digits, labels = _parts()
    x, digit, background = object_images(backgrounds, digits, labels, 30, seed=1)
    assert x.shape == (30, 3, 64, 64) and x.dtype == torch.float32
    assert set(digit.tolist()) <= {1, 7} and set(background.tolist()) == {0, 1, 2}
    # Each image's label names its photo: the corner pixel, background in nearly every image (the digit's
    # strokes cover few pixels), has that photo's dominant channel.
    corners = x[:, :, 0, 0].argmax(1)
    assert (corners == background).float().mean() > 0.8


def test_probe_finds_what_the_features_encode(tmp_path):
    backgrounds, digits, labels = _parts()
    x, digit, background = object_images(backgrounds, digits, labels, 60, seed=2)
    features = pooled_features("random", x)
    assert features.shape == (60, 512)
    result = probe(features, {"digit": digit, "background": background})
    assert result["background"] > 0.9  # flat colours: any network separates them
    # A feature of the digit label alone: the probe reads labels, not the images.
    onehot = torch.nn.functional.one_hot(digit).float() + 0.01 * torch.randn(60, 8)
    assert probe(onehot, {"digit": digit})["digit"] == 1.0
    weights = tmp_path / "stage1.pth"  # a train_image.py-style checkpoint loads
    torch.manual_seed(3)
    torch.save({"backbone": torchvision.models.resnet18().state_dict()}, weights)
    assert not torch.allclose(pooled_features(str(weights), x[:4]), features[:4])
